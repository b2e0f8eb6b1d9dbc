// The lab's page of gpuwatch serve: the fleet grid, its detail, filters and bookings.
// Plain JavaScript under a strict CSP: no inline script or style; the grid is built as one
// string and written with one innerHTML per render; every request is same-origin JSON.
// The grid's unit is the cell: a whole GPU ("0") or a MIG slice ("0/7": its parent's index
// and its GPU instance id). A MIG-enabled GPU is not a cell: its slices are shown as cells
// in one group under its host, and the group itself never has a state.
"use strict";

(function () {
  const API = "/api/v1";
  const SESSION_AGAIN_MS = 5 * 60 * 1000; // the refresh interval may change in Prometheus
  const body = document.body;
  const FREE = body.dataset.stateFree;
  const DOWN = body.dataset.stateDown;
  const $ = (id) => document.getElementById(id);
  const grid = $("grid");
  const detail = $("detail");
  const banner = $("banner");
  const pauseButton = $("pause");

  const page = {
    session: null,
    sessionAt: 0,
    fleet: null, // the last answer of /api/v1/fleet
    fetchedAt: 0, // performance.now() of that answer
    problem: "", // why the service or Prometheus cannot be asked now ("" when all is well)
    reservations: [],
    byKey: new Map(), // "host\u0000cell" -> the cell's object of /api/v1/fleet
    stale: false,
    paused: false,
    timer: 0,
    rendered: 0,
    focused: null, // the cell whose detail is shown
    extending: null, // the booking being changed
  };

  // -- small helpers ---------------------------------------------------------------------

  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  function esc(value) {
    return String(value == null ? "" : value).replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }
  function key(host, cell) {
    return host + "\u0000" + cell;
  }
  function isSlice(g) {
    return g.gpu_instance_id != null;
  }
  function cellText(g) {
    // what the API and the CLI call the cell: "0" (a whole GPU) or "0/7" (a MIG slice)
    return isSlice(g) ? g.gpu + "/" + g.gpu_instance_id : String(g.gpu);
  }
  function cellJson(text) {
    // a cell as the API's JSON takes it: an index for a whole GPU, "G/I" for a slice
    return /^\d+$/.test(text) ? Number(text) : text;
  }
  function gpusBody(text) {
    // the gpus of a booking: a list of cells ("0", "0,2", "0/7,0/8"), else the text as
    // typed ("0-3", "all"), which the service reads as the CLI does
    const parts = text.split(",").map((p) => p.trim());
    if (parts.length && parts.every((p) => /^\d+(\/\d+)?$/.test(p))) return parts.map(cellJson);
    return text;
  }
  function cellWords(g) {
    return isSlice(g) ? "MIG slice " + cellText(g) + (g.profile ? " (" + g.profile + ")" : "") :
      "GPU " + g.gpu;
  }
  const GIB = 1024 * 1024 * 1024;
  function gib(bytes) {
    if (bytes == null) return "?";
    const v = bytes / GIB;
    return v >= 10 || v === 0 ? v.toFixed(v >= 100 || Number.isInteger(v) ? 0 : 1) : v.toFixed(1);
  }
  function memText(g) {
    if (g.memory_used_bytes == null && g.memory_total_bytes == null) return "? GiB";
    return gib(g.memory_used_bytes) + "/" + gib(g.memory_total_bytes) + " GiB";
  }
  function utilText(g) {
    if (g.utilization_ratio == null) return isSlice(g) ? "util n/a" : "? %"; // none per slice
    return Math.round(g.utilization_ratio * 100) + " %";
  }
  function when(seconds) {
    if (seconds == null) return "unknown";
    const d = new Date(seconds * 1000);
    return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
  }
  function ago(seconds, now) {
    let s = Math.max(0, Math.round(now - seconds));
    if (s < 90) return s + " s";
    const m = Math.round(s / 60);
    if (m < 90) return m + " min";
    const h = Math.floor(m / 60);
    if (h < 48) return h + " h " + (m % 60) + " min";
    return Math.floor(h / 24) + " days";
  }
  function localInput(date) {
    // the value of a datetime-local input for a Date, in the browser's zone
    const pad = (n) => String(n).padStart(2, "0");
    return date.getFullYear() + "-" + pad(date.getMonth() + 1) + "-" + pad(date.getDate()) +
      "T" + pad(date.getHours()) + ":" + pad(date.getMinutes());
  }
  function isoFromInput(value) {
    const d = new Date(value);
    if (Number.isNaN(d.getTime())) return null;
    return d.toISOString().replace(/\.\d{3}Z$/, "Z");
  }

  async function ask(path, options) {
    // {ok, status, data, error}: never throws; error is one line in words
    const init = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
    init.headers = Object.assign({ Accept: "application/json" }, init.headers);
    if (init.body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(init.body);
    }
    const limit = Math.max(10, page.session ? page.session.refresh_seconds : 15);
    if (window.AbortSignal && AbortSignal.timeout) init.signal = AbortSignal.timeout(limit * 1000);
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      const why = e && e.name === "TimeoutError" ? "no answer within " + limit + " s" :
        (e && e.message ? e.message : String(e));
      return { ok: false, status: 0, data: null,
        error: "gpuwatch serve cannot be reached (" + why + ")" };
    }
    let data = null;
    if (response.status !== 204) {
      try {
        data = await response.json();
      } catch (e) {
        data = null;
      }
    }
    if (response.ok) return { ok: true, status: response.status, data: data, error: "" };
    const said = data && typeof data.error === "string" ? data.error : "";
    return { ok: false, status: response.status, data: data,
      error: said || "the service answered HTTP " + response.status + " " +
        (response.statusText || "without a reason") };
  }

  // -- what a GPU is now -----------------------------------------------------------------

  function freshness() {
    // {stale: bool, why: ""}: whether the shown data may be trusted now
    const s = page.session;
    const f = page.fleet;
    if (page.problem) return { stale: true, why: page.problem };
    if (!f || !s) return { stale: true, why: "" };
    const staleAfter = s.stale_after_seconds;
    const waited = (performance.now() - page.fetchedAt) / 1000;
    if (f.updated == null) {
      return f.gpus.length ? { stale: true, why: "Prometheus does not say how fresh the " +
        "grid is; no GPU is shown free." } : { stale: false, why: "" };
    }
    // the answer's own age (as the server's clock has it), and how long the page has gone
    // without a new one: past one refresh and the stale time (a request that hangs), or
    // past the stale time while paused
    const age = f.now - f.updated;
    const without = waited - (page.paused ? 0 : s.refresh_seconds);
    if (age > staleAfter || without > staleAfter) {
      return { stale: true, why: "The data is " + ago(0, age + waited) + " old (from " +
        when(f.updated) + "; fresh data is under " + Math.round(staleAfter) + " s old): " +
        "no GPU is shown free until it is fresh again." };
    }
    return { stale: false, why: "" };
  }

  function gpuStale(g, fresh) {
    if (fresh.stale || g.updated == null) return true;
    return (page.fleet.now - g.updated) > page.session.stale_after_seconds;
  }

  function me() {
    return page.session && page.session.user;
  }
  function modelName(g) {
    // a slice is its parent's model and its profile: "A100-SXM4-80GB 1g.10gb"
    if (g.display_name) return g.display_name;
    if (isSlice(g)) return (g.model || "?") + (g.profile ? " " + g.profile : "");
    return g.model || "?";
  }
  function parentName(g) {
    // the MIG-enabled GPU a slice is of, by its display name without the profile
    const name = modelName(g);
    const tail = g.profile ? " " + g.profile : "";
    return tail && name.endsWith(tail) ? name.slice(0, -tail.length) : (g.model || "?");
  }
  function isMine(g) {
    const user = me();
    if (!user) return false;
    return g.users.indexOf(user) >= 0 ||
      (g.reservation && g.reservation.user === user) || (g.claim && g.claim.user === user);
  }
  function bookable(g, stale) {
    return !stale && g.state === FREE && !!me();
  }

  // -- filters ---------------------------------------------------------------------------

  function filters() {
    return {
      cluster: $("filter-cluster").value,
      model: $("filter-model").value,
      state: $("filter-state").value,
      onlyFree: $("only-free").checked,
      search: $("search").value.trim().toLowerCase(),
    };
  }
  function matches(g, f, stale) {
    if (f.cluster && (g.cluster || "") !== f.cluster) return false;
    if (f.model && modelName(g) !== f.model) return false;
    if (f.state && (stale ? "" : g.state) !== f.state) return false;
    if (f.onlyFree && (stale || g.state !== FREE)) return false;
    if (f.search) {
      const names = g.users.slice();
      if (g.reservation && g.reservation.user) names.push(g.reservation.user);
      if (g.claim && g.claim.user) names.push(g.claim.user);
      if (!names.some((n) => n.toLowerCase().indexOf(f.search) >= 0)) return false;
    }
    return true;
  }
  function fillSelect(select, values, allText) {
    const chosen = select.value;
    const wanted = [""].concat(values);
    const have = Array.from(select.options).map((o) => o.value);
    if (have.join("\u0000") === wanted.join("\u0000")) return;
    select.innerHTML = '<option value="">' + esc(allText) + "</option>" +
      values.map((v) => '<option value="' + esc(v) + '">' + esc(v) + "</option>").join("");
    select.value = wanted.indexOf(chosen) >= 0 ? chosen : "";
  }

  // -- rendering -------------------------------------------------------------------------

  function cellHtml(g, stale) {
    const mine = isMine(g);
    const free = bookable(g, stale);
    const classes = ["cell", stale ? "stale" : "state-" + g.state];
    if (mine) classes.push("mine");
    const word = stale ? "no fresh data" : g.state;
    const users = page.fleet.names_hidden ? "" : g.users.join(", ");
    let who = users;
    if (!who && g.reservation && g.reservation.user) who = "booked: " + g.reservation.user;
    if (!who && g.claim && g.claim.user) who = "claimed: " + g.claim.user;
    const slice = isSlice(g);
    if (slice) classes.push("slice");
    return '<div class="' + classes.join(" ") + '" data-host="' + esc(g.host) +
      '" data-gpu="' + esc(cellText(g)) + '" data-state="' + esc(stale ? DOWN : g.state) + '"' +
      (stale ? ' data-last-state="' + esc(g.state) + '"' : "") +
      (slice ? ' data-parent="' + esc(g.gpu) + '" data-profile="' + esc(g.profile || "") +
        '"' : "") +
      ' tabindex="0"' + (free ? ' role="button"' : "") + ">" +
      (slice ? '<span class="gpu"><span class="visually-hidden">MIG slice </span>' +
        esc(cellText(g)) + " · " + esc(g.profile || "?") + "</span>" :
        '<span class="gpu">GPU ' + esc(g.gpu) + " · " + esc(modelName(g)) + "</span>") +
      '<span class="word">' + esc(word) + (mine ? ' <span class="you">(yours)</span>' : "") +
      "</span>" +
      '<span class="users">' + esc(who) + "</span>" +
      '<span class="util">' + utilText(g) + "</span>" +
      '<span class="mem">' + memText(g) + "</span></div>";
  }

  function itemHtml(item) {
    // a cell's markup, or the group of a MIG-enabled GPU with the shown cells of its slices
    if (typeof item === "string") return item;
    if (!item.shown.length) return "";
    const title = "GPU " + item.gpu + " · " + item.name + " · MIG";
    return '<div class="mig" role="group" data-parent="' + esc(item.gpu) +
      '" aria-label="' + esc(title + ", " + item.slices + " slice" +
        (item.slices === 1 ? "" : "s")) + '"><h3 class="mig-head">GPU ' + esc(item.gpu) +
      ' · <span class="mig-model">' + esc(item.name) + '</span> · MIG <span class="mig-count">' +
      item.slices + " slice" + (item.slices === 1 ? "" : "s") + "</span></h3>" +
      '<div class="slices">' + item.shown.join("") + "</div></div>";
  }

  function render() {
    const f = page.fleet;
    const s = page.session;
    const fresh = freshness();
    page.stale = fresh.stale;
    banner.hidden = !fresh.why;
    banner.textContent = fresh.why;
    if (!f || !s) {
      grid.innerHTML = '<p class="empty">' + (page.problem ? "The fleet cannot be shown now." :
        "Loading the fleet…") + "</p>";
      finish(f);
      return;
    }
    const want = filters();
    const active = document.activeElement;
    const focusedCell = active && active.classList && active.classList.contains("cell") &&
      grid.contains(active) ? [active.dataset.host, active.dataset.gpu] : null;
    const clusters = new Set();
    const models = new Set();
    const free = new Map();
    const hosts = [];
    let current = null;
    page.byKey = new Map();
    for (const g of f.gpus) {
      page.byKey.set(key(g.host, cellText(g)), g);
      if (g.cluster) clusters.add(g.cluster);
      const model = modelName(g);
      models.add(model);
      const stale = gpuStale(g, fresh);
      if (!stale && g.state === FREE) free.set(model, (free.get(model) || 0) + 1);
      if (!current || current.host !== g.host) {
        current = { host: g.host, cluster: g.cluster, gpus: [], down: 0, shown: 0, items: [],
          mig: new Map() };
        hosts.push(current);
      }
      current.gpus.push(g);
      if (g.state === DOWN) current.down += 1;
      let into = current.items; // a whole GPU's cell, or the group of its MIG-enabled GPU
      if (isSlice(g)) {
        const parent = g.instance + "\u0000" + g.gpu;
        let group = current.mig.get(parent);
        if (!group) {
          group = { gpu: g.gpu, name: parentName(g), slices: 0, shown: [] };
          current.mig.set(parent, group);
          current.items.push(group);
        }
        group.slices += 1;
        into = group.shown;
      }
      if (matches(g, want, stale)) {
        into.push(cellHtml(g, stale));
        current.shown += 1;
      }
    }
    $("search").disabled = !!f.names_hidden; // there are no names to search then
    fillSelect($("filter-cluster"), Array.from(clusters).sort(), "all clusters");
    fillSelect($("filter-model"), Array.from(models).sort(), "all models");
    const grafana = s.grafana_url;
    const parts = [];
    for (const h of hosts) {
      if (!h.shown) continue;
      const down = h.down === h.gpus.length;
      parts.push('<section class="host' + (down ? " host-down" : "") + '" data-host="' +
        esc(h.host) + '" aria-label="' + esc(h.host) + '"><h2>' + esc(h.host) +
        (h.cluster ? ' <span class="cluster">' + esc(h.cluster) + "</span>" : "") +
        (down ? ' <span class="down-note">not answering</span>' : "") +
        (grafana ? ' <a class="grafana" href="' + esc(grafana) + "/d/gpuwatch-node?var-host=" +
          encodeURIComponent(h.host) + '">Grafana<span class="visually-hidden"> dashboard of ' +
          esc(h.host) + "</span></a>" : "") +
        '</h2><div class="cells">' + h.items.map(itemHtml).join("") + "</div></section>");
    }
    if (!parts.length) {
      parts.push('<p class="empty">' + (f.gpus.length ? "No GPU matches the filters." :
        "Prometheus knows no GPUs.") + "</p>");
    }
    grid.innerHTML = parts.join("");
    const counts = Array.from(free.entries()).sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1))
      .map((e) => e[1] + " x " + e[0] + " free");
    $("summary").textContent = fresh.stale ? "No GPU is known to be free now." :
      (counts.length ? counts.join(" · ") : "No GPU is free now.");
    finish(f);
    if (focusedCell) { // the keyboard's place survives the new grid
      const again = grid.querySelector('.cell[data-host="' + CSS.escape(focusedCell[0]) +
        '"][data-gpu="' + CSS.escape(focusedCell[1]) + '"]');
      if (again) again.focus({ preventScroll: true });
    }
    refreshDetail();
  }

  function finish(f) {
    page.rendered += 1;
    body.dataset.rendered = String(page.rendered);
    if (f && f.updated != null) body.dataset.updated = String(f.updated);
    statusLine();
  }
  function statusLine() {
    const f = page.fleet;
    const text = f && f.updated != null ? "updated " + when(f.updated) : "";
    $("updated").textContent = (page.paused ? "paused · " : "") + text;
  }

  // -- the detail ------------------------------------------------------------------------

  function detailHtml(g) {
    const stale = gpuStale(g, freshness());
    const hidden = page.fleet.names_hidden;
    const rows = [];
    const row = (name, value) => rows.push("<dt>" + esc(name) + "</dt><dd>" + value + "</dd>");
    const slice = isSlice(g);
    row("State", esc(stale ? "no fresh data (last seen " + g.state + ")" : g.state));
    row("Model", esc(slice ? parentName(g) : (g.model || "?")));
    if (slice) {
      row("MIG profile", esc(g.profile || "?"));
      row("MIG UUID", '<code class="uuid">' + esc(g.mig_uuid || "?") + "</code>");
    }
    row(slice ? "Slice memory" : "Memory", esc(memText(g)));
    row("Utilisation", slice && g.utilization_ratio == null ?
      "not reported per MIG slice" : esc(utilText(g)));
    row("Temperature", (g.temperature_celsius == null ? "?" :
      esc(Math.round(g.temperature_celsius) + " °C")) + (slice ? " (of GPU " + esc(g.gpu) +
      ")" : ""));
    row("Since", g.since == null ? "unknown" : esc(when(g.since) + " (" +
      ago(g.since, page.fleet.now) + ")"));
    if (g.users.length && !hidden) row("Users", esc(g.users.join(", ")));
    if (g.reservation) {
      row("Booked", esc((g.reservation.user ? g.reservation.user + " " : "") + "until " +
        when(g.reservation.until_timestamp) +
        (g.reservation.comment ? " (" + g.reservation.comment + ")" : "")));
    }
    if (g.claim) {
      row("Claimed", esc((g.claim.user ? g.claim.user + " " : "") + "until " +
        when(Date.parse(g.claim.until) / 1000)));
    }
    let procs = "";
    if (g.processes && g.processes.length) {
      procs = '<table class="procs"><caption>Processes</caption><thead><tr>' +
        '<th scope="col">PID</th><th scope="col">User</th><th scope="col">Memory</th>' +
        '<th scope="col">Command</th></tr></thead><tbody>' +
        g.processes.map((p) => "<tr><td>" + p.pid + "</td><td>" + esc(p.user || "-") +
          "</td><td>" + esc(p.memory_bytes == null ? "?" : gib(p.memory_bytes) + " GiB") +
          "</td><td>" + esc(p.command || "-") + "</td></tr>").join("") +
        "</tbody></table>";
    }
    const perUser = new Map();
    for (const p of g.processes || []) {
      if (p.user && p.memory_bytes != null) {
        perUser.set(p.user, (perUser.get(p.user) || 0) + p.memory_bytes);
      }
    }
    if (perUser.size > 1) {
      row("Memory per user", esc(Array.from(perUser.entries())
        .map((e) => e[0] + " " + gib(e[1]) + " GiB").join(", ")));
    }
    return '<p class="detail-title">' + esc(g.host) + " · " + esc(cellWords(g)) + "</p><dl>" +
      rows.join("") + "</dl>" + procs +
      (bookable(g, stale) ? '<p class="hint">Enter or click: book it</p>' : "");
  }

  function showDetail(cell) {
    const g = page.byKey.get(key(cell.dataset.host, cell.dataset.gpu));
    if (!g) return;
    page.focused = [cell.dataset.host, cell.dataset.gpu];
    detail.innerHTML = detailHtml(g);
    detail.hidden = false;
    cell.setAttribute("aria-describedby", "detail");
    place(cell);
  }
  function place(cell) {
    const box = cell.getBoundingClientRect(); // reads first, then writes
    const width = detail.offsetWidth;
    const height = detail.offsetHeight;
    const vw = document.documentElement.clientWidth;
    const vh = document.documentElement.clientHeight;
    let left = Math.min(Math.max(4, box.left), Math.max(4, vw - width - 4));
    let top = box.bottom + 6;
    if (top + height > vh - 4 && box.top - height - 6 > 4) top = box.top - height - 6;
    detail.style.left = Math.round(left) + "px";
    detail.style.top = Math.round(Math.max(4, top)) + "px";
  }
  function hideDetail() {
    detail.hidden = true;
    page.focused = null;
  }
  function refreshDetail() {
    if (detail.hidden || !page.focused) return;
    const cell = grid.querySelector('.cell[data-host="' + CSS.escape(page.focused[0]) +
      '"][data-gpu="' + CSS.escape(page.focused[1]) + '"]');
    if (!cell) {
      hideDetail();
      return;
    }
    showDetail(cell);
  }

  grid.addEventListener("mouseover", (e) => {
    const cell = e.target.closest(".cell");
    if (cell) showDetail(cell);
  });
  grid.addEventListener("mouseleave", () => {
    if (!grid.contains(document.activeElement)) hideDetail();
  });
  grid.addEventListener("mouseout", (e) => {
    const cell = e.target.closest(".cell");
    if (cell && !cell.contains(e.relatedTarget) && document.activeElement !== cell) hideDetail();
  });
  grid.addEventListener("focusin", (e) => {
    const cell = e.target.closest(".cell");
    if (cell) showDetail(cell);
  });
  grid.addEventListener("focusout", (e) => {
    if (!e.relatedTarget || !grid.contains(e.relatedTarget)) hideDetail();
  });
  grid.addEventListener("click", (e) => {
    const cell = e.target.closest(".cell");
    if (cell && cell.getAttribute("role") === "button") openBooking(cell);
  });
  grid.addEventListener("keydown", (e) => {
    const cell = e.target.closest(".cell");
    if (!cell) return;
    if ((e.key === "Enter" || e.key === " ") && cell.getAttribute("role") === "button") {
      e.preventDefault();
      openBooking(cell);
    } else if (e.key === "Escape") {
      hideDetail();
    } else if (["ArrowRight", "ArrowLeft", "ArrowDown", "ArrowUp"].indexOf(e.key) >= 0) {
      const cells = Array.from(grid.querySelectorAll(".cell"));
      const at = cells.indexOf(cell);
      const step = e.key === "ArrowRight" || e.key === "ArrowDown" ? 1 : -1;
      const next = cells[at + step];
      if (next) {
        e.preventDefault();
        next.focus();
      }
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !detail.hidden) hideDetail();
  });

  // -- booking ---------------------------------------------------------------------------

  const bookDialog = $("book-dialog");
  function openBooking(cell) {
    hideDetail();
    $("book-host").value = cell.dataset.host;
    $("book-gpus").value = cell.dataset.gpu;
    const g = page.byKey.get(key(cell.dataset.host, cell.dataset.gpu));
    $("book-title").textContent = g && isSlice(g) ? "Book MIG slice " + cellText(g) +
      " (" + modelName(g) + ")" : "Book GPUs";
    const fresh = freshness();
    const free = page.fleet.gpus.filter((x) => x.host === cell.dataset.host &&
      bookable(x, gpuStale(x, fresh))).map(cellText);
    $("book-free").textContent = "Free on " + cell.dataset.host + " now: GPU " +
      free.join(", ") + ".";
    const until = new Date(Date.now() + 2 * 3600 * 1000);
    until.setSeconds(0, 0);
    $("book-until").value = localInput(until);
    $("book-until").min = localInput(new Date());
    $("book-comment").value = "";
    $("book-error").textContent = "";
    bookDialog.showModal();
    $("book-gpus").focus();
  }
  $("book-cancel").addEventListener("click", () => bookDialog.close());
  $("book-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const until = isoFromInput($("book-until").value);
    if (!until) {
      $("book-error").textContent = "Say until when: a date and a time.";
      return;
    }
    $("book-submit").disabled = true;
    const answer = await ask(API + "/reservations", { method: "POST", body: {
      host: $("book-host").value, gpus: gpusBody($("book-gpus").value.trim()), until: until,
      comment: $("book-comment").value } });
    $("book-submit").disabled = false;
    if (!answer.ok) {
      $("book-error").textContent = "The booking was not made: " + answer.error;
      return;
    }
    bookDialog.close();
    $("bookings-error").textContent = "";
    await refresh();
  });

  function bookingRows() {
    const user = me();
    const admin = page.session && page.session.admin;
    const now = Date.now() / 1000;
    const rows = page.reservations.filter((r) => admin || (user && r.user === user));
    if (!user) {
      $("bookings-note").textContent = "Sign in to book GPUs and to see your bookings.";
    } else if (!rows.length) {
      $("bookings-note").textContent = "No bookings" + (admin ? "." : " of yours.") +
        " Click a free GPU or MIG slice to book it.";
    } else {
      $("bookings-note").textContent = admin ? "Every booking (you are an admin)." :
        "Your bookings.";
    }
    const tbody = $("bookings").tBodies[0];
    tbody.innerHTML = rows.map((r) => {
      const ended = Date.parse(r.until) / 1000 <= now;
      const gpus = Array.isArray(r.gpus) ? r.gpus.join(",") : String(r.gpus);
      const mayChange = admin || r.user === user;
      const what = r.host + " GPU " + gpus;
      return '<tr data-id="' + esc(r.id) + '" class="' + (r.user === user ? "mine" : "") +
        (ended ? " ended" : "") + '"><td data-label="Host">' + esc(r.host) +
        '</td><td data-label="GPUs">' + esc(gpus) +
        '</td><td data-label="User">' + esc(r.user || "") + '</td><td data-label="Until">' +
        esc(when(Date.parse(r.until) / 1000)) + (ended ? " (ended)" : "") +
        '</td><td data-label="Comment">' + esc(r.comment || "") +
        '</td><td class="actions">' + (mayChange ?
          '<button type="button" class="extend" data-id="' + esc(r.id) + '">Extend' +
          '<span class="visually-hidden"> ' + esc(what) + "</span></button> " +
          '<button type="button" class="release" data-id="' + esc(r.id) + '">Release' +
          '<span class="visually-hidden"> ' + esc(what) + "</span></button>" : "") +
        "</td></tr>";
    }).join("");
  }

  $("bookings").addEventListener("click", async (e) => {
    const button = e.target.closest("button");
    if (!button) return;
    const id = button.dataset.id;
    const r = page.reservations.find((x) => x.id === id);
    if (!r) return;
    if (button.classList.contains("release")) {
      button.disabled = true;
      const answer = await ask(API + "/reservations/" + encodeURIComponent(id),
        { method: "DELETE" });
      button.disabled = false;
      $("bookings-error").textContent = answer.ok ? "" : "The booking was not released: " + answer.error;
      await refresh();
    } else if (button.classList.contains("extend")) {
      page.extending = r;
      $("extend-what").textContent = r.host + " GPU " +
        (Array.isArray(r.gpus) ? r.gpus.join(",") : r.gpus) + " of " + r.user + ", now until " +
        when(Date.parse(r.until) / 1000);
      const until = new Date(Math.max(Date.parse(r.until), Date.now()) + 24 * 3600 * 1000);
      $("extend-until").value = localInput(until);
      $("extend-error").textContent = "";
      $("extend-dialog").showModal();
      $("extend-until").focus();
    }
  });
  $("extend-cancel").addEventListener("click", () => $("extend-dialog").close());
  $("extend-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const r = page.extending;
    const until = isoFromInput($("extend-until").value);
    if (!r) return;
    if (!until) {
      $("extend-error").textContent = "Say until when: a date and a time.";
      return;
    }
    $("extend-submit").disabled = true;
    const answer = await ask(API + "/reservations/" + encodeURIComponent(r.id),
      { method: "PATCH", body: { until: until } });
    $("extend-submit").disabled = false;
    if (!answer.ok) {
      $("extend-error").textContent = "The booking was not changed: " + answer.error;
      return;
    }
    $("extend-dialog").close();
    await refresh();
  });

  // -- refreshing ------------------------------------------------------------------------

  async function loadSession() {
    const answer = await ask(API + "/session");
    if (!answer.ok) {
      page.problem = answer.status === 0 ? answer.error :
        "gpuwatch serve does not answer as it should: " + answer.error;
      return false;
    }
    page.session = answer.data;
    page.sessionAt = performance.now();
    const s = page.session;
    $("whoami").textContent = s.user ? "signed in as " + s.user + (s.admin ? " (admin)" : "") :
      "not signed in" + (s.public_names ? "" : " (names are hidden)");
    return true;
  }

  async function refresh() {
    window.clearTimeout(page.timer);
    const old = page.session && performance.now() - page.sessionAt > SESSION_AGAIN_MS;
    if ((!page.session || old) && !(await loadSession()) && !page.session) {
      render();
      schedule();
      return;
    }
    const [fleet, reservations] = await Promise.all([
      ask(API + "/fleet"), page.session.user ? ask(API + "/reservations") :
        Promise.resolve(null)]);
    if (fleet.ok) {
      page.fleet = fleet.data;
      page.fetchedAt = performance.now();
      page.problem = "";
    } else if (fleet.status === 503) {
      page.problem = "Prometheus cannot be asked now, so no GPU is shown free. The service " +
        "says: " + fleet.error;
    } else if (fleet.status === 0) {
      page.problem = fleet.error + ". No GPU is shown free.";
    } else {
      page.problem = "The fleet cannot be read (" + fleet.error + "). No GPU is shown free.";
    }
    if (reservations && reservations.ok) {
      page.reservations = reservations.data.reservations || [];
    } else if (reservations) {
      $("bookings-error").textContent = "The bookings cannot be read: " + reservations.error;
    }
    render();
    bookingRows();
    schedule();
  }

  function schedule() {
    window.clearTimeout(page.timer);
    if (page.paused) return;
    const every = page.session ? page.session.refresh_seconds : 15;
    page.timer = window.setTimeout(refresh, Math.max(1, every) * 1000);
  }

  // the shown data grows old between answers (and while paused): look every second
  window.setInterval(() => {
    if (page.fleet && freshness().stale !== page.stale) render();
  }, 1000);

  pauseButton.addEventListener("click", () => {
    page.paused = !page.paused;
    pauseButton.setAttribute("aria-pressed", String(page.paused));
    pauseButton.textContent = page.paused ? "Resume" : "Pause";
    if (page.paused) {
      window.clearTimeout(page.timer);
      statusLine();
    } else {
      refresh();
    }
  });

  $("filters").addEventListener("submit", (e) => e.preventDefault());
  for (const id of ["filter-cluster", "filter-model", "filter-state", "only-free"]) {
    $(id).addEventListener("change", render);
  }
  $("search").addEventListener("input", render);

  refresh();
})();
