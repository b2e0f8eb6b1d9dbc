// Runs a table panel's data through Grafana's own frontend code (@grafana/data, the package
// Grafana's web app is built from): the panel's transformations, then its field config
// (defaults and overrides), then each field's display processor, which applies value mappings,
// thresholds and colours. tests/e2e/test_grafana.py feeds it the data frame Grafana's Prometheus
// datasource makes of a table query and checks what each cell would show.
//
// stdin:  {"panel": <panel JSON>, "frames": [{"refId", "fields": [{"name", "type", "values"}]}],
//          "colors": [colour names]}
// stdout: {"fields": [{"name", "custom", "cells": [{"value", "text", "color"}]}],
//          "colors": {colour name: the CSS colour Grafana's default theme draws it in}}
"use strict";

// What @grafana/data reads of a browser: window.grafanaBootData (feature toggles) when it
// loads, navigator.language for date formats (Node 21 and later have a navigator).
globalThis.window = globalThis;
if (globalThis.navigator === undefined) {
  globalThis.navigator = { language: "en-US", languages: ["en-US"] };
}
const grafana = require("@grafana/data");

// The field options a table panel's field config uses, as Grafana's web app registers them
// (public/app/core/components/OptionsUI/registry.tsx): the standard ones with the override
// processors @grafana/data exports, and the table's custom ones (custom.*) unchanged.
const standard = [
  { id: "color", path: "color", process: grafana.identityOverrideProcessor },
  { id: "mappings", path: "mappings", process: grafana.valueMappingsOverrideProcessor },
  { id: "thresholds", path: "thresholds", process: grafana.thresholdsOverrideProcessor },
  { id: "links", path: "links", process: grafana.dataLinksOverrideProcessor },
  { id: "unit", path: "unit", process: grafana.unitOverrideProcessor },
  { id: "displayName", path: "displayName", process: grafana.displayNameOverrideProcessor },
].map((item) => ({ ...item, name: item.id, override: () => null, editor: () => null,
                   shouldApply: () => true }));
grafana.standardFieldConfigEditorRegistry.setInit(() => standard);

// Every transformer @grafana/data defines (standardTransformers names some twice).
const transformers = new Map(Object.values(grafana.standardTransformers)
  .map((transformer) => [transformer.id, transformer]));
grafana.standardTransformersRegistry.setInit(() => [...transformers.values()].map(
  (transformer) => ({ id: transformer.id, aliasIds: transformer.aliasIds,
                      name: transformer.name, transformation: transformer,
                      editor: () => null, imageDark: "", imageLight: "" })));

function customOptions(fieldConfig) {
  const paths = new Set(Object.keys(fieldConfig.defaults.custom || {}));
  for (const override of fieldConfig.overrides || []) {
    for (const property of override.properties) {
      if (property.id.startsWith("custom.")) paths.add(property.id.slice("custom.".length));
    }
  }
  return [...paths].map((path) => ({
    id: `custom.${path}`, path, name: path, isCustom: true, shouldApply: () => true,
    process: grafana.identityOverrideProcessor, override: () => null, editor: () => null,
  }));
}

async function main() {
  const input = JSON.parse(require("fs").readFileSync(0, "utf8"));
  const { panel } = input;
  const frames = input.frames.map((frame) => grafana.toDataFrame(frame));
  const transformed = await new Promise((resolve, reject) => {
    grafana.transformDataFrame(panel.transformations || [], frames).subscribe({
      next: resolve, error: reject,
    });
  });
  const theme = grafana.createTheme();
  const registry = grafana.createFieldConfigRegistry({}, "table");
  for (const item of customOptions(panel.fieldConfig)) registry.register(item);
  if (transformed.length !== 1) {
    throw new Error(`the transformations leave ${transformed.length} frames, a table shows one`);
  }
  const [rendered] = grafana.applyFieldOverrides({
    data: transformed, fieldConfig: panel.fieldConfig, fieldConfigRegistry: registry,
    replaceVariables: (value) => value, theme, timeZone: "utc",
  });
  const colors = {};
  for (const name of input.colors || []) {
    colors[name] = theme.visualization.getColorByName(name);
  }
  process.stdout.write(JSON.stringify({
    colors,
    length: rendered.length,
    fields: rendered.fields.map((field) => ({
      name: grafana.getFieldDisplayName(field, rendered, [rendered]),
      custom: field.config.custom || {},
      cells: field.values.map((value) => {
        const shown = field.display(value);
        return { value, text: shown.text, color: shown.color ?? null };
      }),
    })),
  }));
}

main().catch((error) => {
  process.stderr.write(`render-table: ${error.stack || error}\n`);
  process.exit(1);
});
