"""The YAML files people write for gpuwatch (the exporter's configs, the reservations file,
scenarios): read safely, and every problem one line naming the file, the line or the key.

Each reader raises its own error type (a subclass of ValueError, usually of YamlFileError)
so its caller can print it and stop.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


class YamlFileError(ValueError):
    """A YAML file that cannot be used; the message names the file and what is wrong."""


def parse_yaml(text: str, source: object, error: type[ValueError] = YamlFileError) -> Any:
    """The YAML document in text; `error` naming the source and the line when it is not
    YAML. The files gpuwatch reads from its users go through here."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise error(f"{source}: not valid YAML{where}: "
                    f"{getattr(e, 'problem', None) or e}") from None


def load_mapping(path: Path, error: type[ValueError] = YamlFileError) -> dict[str, Any]:
    """The mapping of settings in the file (empty for an empty file); `error` when it
    cannot be read, is not YAML or holds something else."""
    try:
        text = path.read_text()
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}") from e
    data = parse_yaml(text, path, error)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def reject_unknown_keys(source: object, where: str, data: Mapping[str, Any], known: set[str],
                        error: type[ValueError] = YamlFileError) -> None:
    """`error` naming the source, the place and the first key that is not one of `known`."""
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"{source}: {where}unknown key {unknown[0]!r}; known keys: "
                    f"{', '.join(sorted(known))}")
