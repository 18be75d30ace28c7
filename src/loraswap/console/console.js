// loraswap operator console: plain ES2020, no dependencies. All server text goes through
// textContent (see el()); nothing from the server is ever parsed as HTML.
(() => {
  "use strict";

  const KEY_STORAGE = "loraswap.key";
  const TRAFFIC_EVERY_MS = 5000;
  const $ = (selector, root = document) => root.querySelector(selector);

  // ---------------------------------------------------------------- helpers

  /** Build an element: el("td", {className: "x", dataset: {role: "y"}}, "text", child, ...). */
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (name === "dataset") Object.assign(node.dataset, value);
      else if (name in node) node[name] = value;
      else node.setAttribute(name, value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const isScalar = (v) => v === null || ["string", "number", "boolean"].includes(typeof v);
  const dash = (v) => (v === null || v === undefined || v === "" ? "—" : v);
  const seconds = (v) => (typeof v === "number" ? `${v.toFixed(v < 10 ? 2 : 1)} s` : "—");
  const percent = (v) => (typeof v === "number" ? `${Math.round(v * 1000) / 10}%` : "—");
  const count = (v) => (typeof v === "number" ? v.toLocaleString() : dash(v));

  function bytes(n) {
    if (typeof n !== "number") return "—";
    const units = ["B", "KB", "MB", "GB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }

  /** Unix seconds -> "2025-11-27 00:13:20" in local time. */
  function localTime(ts) {
    if (typeof ts !== "number") return "—";
    const d = new Date(ts * 1000);
    const p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
      `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }

  function showScalar(v) {
    if (v === null || v === undefined) return "—";
    if (typeof v === "boolean") return v ? "yes" : "no";
    return isScalar(v) ? String(v) : JSON.stringify(v);
  }

  function table(headers, rows, className = "") {
    return el("div", { className: "table-wrap" },
      el("table", { className },
        el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, rows)));
  }

  const badge = (text, kind, title) => el("span", { className: `badge badge-${kind}`, title }, text);
  const empty = (text) => el("p", { className: "empty" }, text);

  // ---------------------------------------------------------------- API + status

  const getKey = () => sessionStorage.getItem(KEY_STORAGE) || "";

  class ApiError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  /** Message from the OpenAI error shape, or something readable. */
  function errorMessage(body, response) {
    const err = body && body.error;
    if (err && typeof err === "object" && err.message) return String(err.message);
    if (typeof err === "string") return err;
    if (body && typeof body.detail === "string") return body.detail;
    return `HTTP ${response.status} ${response.statusText}`.trim();
  }

  function headers(extra = {}) {
    const h = { Accept: "application/json", ...extra };
    const key = getKey();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  async function api(method, path, body) {
    const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await fetch(path, init);
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
    if (!response.ok) throw new ApiError(errorMessage(data, response), response.status);
    return data;
  }

  function setStatus(message, kind = "ok") {
    const node = $("#status");
    node.textContent = message;
    node.className = `status status-${kind}`;
  }

  const listOf = (doc) => (doc && Array.isArray(doc.data) ? doc.data : []);

  /** An inline error for a section; a 401/403 gets a hint about keys. */
  function sectionError(err, what) {
    const hint = err.status === 401 || err.status === 403
      ? `Enter an admin key above to see ${what}.` : "";
    return el("div", { className: "error-box" },
      el("strong", {}, err.message), hint ? el("p", {}, hint) : null);
  }

  // ---------------------------------------------------------------- server (/info)

  /** A nested object rendered as a table: name | value, or name | sub-keys... when rows are objects. */
  function objectTable(obj) {
    const entries = Object.entries(obj);
    const rowsAreObjects = entries.length && entries.every(([, v]) => v && typeof v === "object" && !Array.isArray(v));
    if (!rowsAreObjects) {
      return table(["field", "value"], entries.map(([k, v]) =>
        el("tr", {}, el("th", { scope: "row" }, k), el("td", {}, showScalar(v)))), "kv");
    }
    const cols = [...new Set(entries.flatMap(([, v]) => Object.keys(v)))];
    return table(["name", ...cols], entries.map(([k, v]) =>
      el("tr", {}, el("th", { scope: "row" }, k), cols.map((c) => el("td", {}, showScalar(v[c]))))), "kv");
  }

  function renderInfo(info) {
    const root = $("#server");
    if (!info || typeof info !== "object") { root.replaceChildren(empty("no server info")); return; }
    const scalars = Object.entries(info).filter(([, v]) => isScalar(v));
    const nested = Object.entries(info).filter(([, v]) => !isScalar(v));
    const order = ["base_model", "engine", "choices"];
    nested.sort(([a], [b]) => (order.indexOf(a) + 1 || 99) - (order.indexOf(b) + 1 || 99));
    const parts = [];
    if (scalars.length) {
      parts.push(table(["field", "value"], scalars.map(([k, v]) =>
        el("tr", {}, el("th", { scope: "row" }, k), el("td", {}, showScalar(v)))), "kv"));
    }
    for (const [k, v] of nested) {
      const body = Array.isArray(v)
        ? el("pre", { className: "json" }, JSON.stringify(v, null, 2))
        : objectTable(v);
      parts.push(el("details", { open: order.includes(k), dataset: { key: k } },
        el("summary", {}, k), body));
    }
    root.replaceChildren(...(parts.length ? parts : [empty("no server info")]));
  }

  async function loadInfo() {
    try { renderInfo(await api("GET", "/info")); } catch (err) {
      $("#server").replaceChildren(sectionError(err, "server info"));
      throw err;
    }
  }

  // ---------------------------------------------------------------- adapters

  const RESIDENCY = { engine: "in engine memory", disk: "on disk" };
  const STATUS_KIND = { pinned: "pinned", loaded: "engine", registered: "disk", broken: "broken" };

  function versionRows(adapter) {
    const alias = adapter.alias || {};
    return (adapter.versions || []).map((v) => {
      const roles = [];
      if (v.version === alias.version) roles.push(badge("alias", "alias"));
      if (v.version === alias.canary_version) roles.push(badge(`canary ${percent(alias.canary_weight)}`, "canary"));
      if (v.version === alias.shadow_version) roles.push(badge(`shadow ${percent(alias.shadow_rate)}`, "shadow"));
      const cell = (label, ...content) => el("td", { dataset: { label } }, ...content);
      return el("tr", { dataset: { version: v.version } },
        el("th", { scope: "row" }, v.version, " ", roles),
        cell("status", badge(v.status || "?", STATUS_KIND[v.status] || "plain"), " ",
          v.residency ? badge(RESIDENCY[v.residency] || v.residency, v.residency === "engine" ? "engine" : "disk") : null),
        cell("rank / alpha", `r${dash(v.rank)} / α${dash(v.alpha)}`),
        cell("targets", (v.target_modules || []).join(", ") || "—"),
        cell("size", bytes(v.size_bytes)),
        cell("requests / errors", `${count(v.requests)} / ${count(v.errors)}`),
        cell("last used", localTime(v.last_used)),
        el("td", { className: "wrap", title: v.source || "", dataset: { label: v.error ? "error" : "source" } },
          v.error ? el("span", { className: "err-text" }, v.error) : dash(v.source)));
    });
  }

  function aliasSummary(alias, previous) {
    const items = [el("span", {}, "alias → ", el("strong", {}, dash(alias.version)))];
    items.push(el("span", {}, "canary: ", alias.canary_version
      ? `${alias.canary_version} @ ${percent(alias.canary_weight)}` : "none"));
    items.push(el("span", {}, "shadow: ", alias.shadow_version
      ? `${alias.shadow_version} @ ${percent(alias.shadow_rate)}` : "none"));
    if (previous) items.push(el("span", { className: "muted" }, `previous: ${dash(previous.version)}`));
    return el("div", { className: "alias-line" }, items);
  }

  function versionSelect(role, versions, selected, allowNone, label) {
    const options = allowNone ? [el("option", { value: "" }, "(none)")] : [];
    for (const v of versions) options.push(el("option", { value: v.version, selected: v.version === selected }, v.version));
    const select = el("select", { "aria-label": label, dataset: { role } }, options);
    select.value = selected || (allowNone ? "" : (versions[0] ? versions[0].version : ""));
    return select;
  }

  function numberInput(role, value, label) {
    return el("input", { type: "number", min: "0", max: "1", step: "0.05", value: String(value ?? 0), title: label, "aria-label": label, dataset: { role } });
  }

  const actionButton = (action, text, extra = "") => el("button", { type: "button", className: `small ${extra}`, dataset: { action } }, text);

  function adapterControls(adapter) {
    const alias = adapter.alias || {};
    const versions = adapter.versions || [];
    const row = (label, ...children) => el("div", { className: "control-row" }, el("span", { className: "control-label" }, label), ...children);
    return el("div", { className: "controls" },
      row("Alias", versionSelect("alias-version", versions, alias.version, false, "alias version"), actionButton("set-alias", "Point alias")),
      row("Canary", versionSelect("canary-version", versions, alias.canary_version, true, "canary version"),
        el("span", { className: "inline" }, "weight"), numberInput("canary-weight", alias.canary_weight, "canary weight (0-1)"),
        actionButton("set-canary", "Set canary")),
      row("Shadow", versionSelect("shadow-version", versions, alias.shadow_version, true, "shadow version"),
        el("span", { className: "inline" }, "rate"), numberInput("shadow-rate", alias.shadow_rate, "shadow rate (0-1)"),
        actionButton("set-shadow", "Set shadow")),
      el("div", { className: "control-row buttons" },
        actionButton("promote", "Promote", "primary"), actionButton("rollback", "Rollback"),
        actionButton("pin", "Pin", adapter.pinned ? "current" : ""), actionButton("unpin", "Unpin", adapter.pinned ? "" : "current")));
  }

  function adapterCard(adapter) {
    const alias = adapter.alias || {};
    return el("article", { className: "card adapter", dataset: { adapter: adapter.name } },
      el("header", { className: "card-head" },
        el("h3", {}, adapter.name),
        adapter.pinned ? badge("pinned", "pinned") : null,
        el("span", { className: "muted" }, `${(adapter.versions || []).length} version(s)`)),
      aliasSummary(alias, adapter.previous_alias),
      table(["version", "status", "rank/alpha", "targets", "size", "req/err", "last used", "source / error"], versionRows(adapter), "versions"),
      adapterControls(adapter));
  }

  function renderModelsFallback(root, err, models) {
    const list = models.length
      ? el("ul", { className: "model-list" }, models.map((m) => el("li", { dataset: { modelId: m.id } },
        el("code", {}, m.id), m.parent ? el("span", { className: "muted" }, ` (on ${m.parent})`) : null)))
      : empty("no models visible with this key");
    root.replaceChildren(sectionError(err, "and manage adapters"),
      el("h3", {}, "Models visible with your key"), list);
  }

  /** The adapters as last rendered: the alias the PUT bodies start from. */
  let adaptersByName = new Map();

  async function loadAdapters() {
    const root = $("#adapters");
    try {
      const adapters = listOf(await api("GET", "/admin/adapters"));
      adaptersByName = new Map(adapters.map((a) => [a.name, a]));
      root.replaceChildren(...(adapters.length ? adapters.map(adapterCard)
        : [empty("no adapters registered yet — use the form below")]));
    } catch (err) {
      let models = [];
      try { models = listOf(await api("GET", "/v1/models")); } catch (_) { /* keep empty */ }
      renderModelsFallback(root, err, models);
      throw err;
    }
  }

  /** The PUT alias body for the button pressed, from the card's current inputs. */
  function aliasBody(action, card, alias) {
    const field = (role) => $(`[data-role=${role}]`, card);
    const rate = (role) => Math.min(1, Math.max(0, parseFloat(field(role).value) || 0));
    const keep = {
      version: alias.version, canary_version: alias.canary_version ?? null, canary_weight: alias.canary_weight ?? 0,
      shadow_version: alias.shadow_version ?? null, shadow_rate: alias.shadow_rate ?? 0,
    };
    if (action === "set-alias") return { version: field("alias-version").value };
    if (action === "set-canary") {
      const v = field("canary-version").value || null;
      return { ...keep, canary_version: v, canary_weight: v ? rate("canary-weight") : 0 };
    }
    const v = field("shadow-version").value || null;
    return { ...keep, shadow_version: v, shadow_rate: v ? rate("shadow-rate") : 0 };
  }

  async function onAdapterAction(event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const card = button.closest("[data-adapter]");
    const name = card.dataset.adapter;
    const action = button.dataset.action;
    const base = `/admin/adapters/${encodeURIComponent(name)}`;
    const alias = (adaptersByName.get(name) || {}).alias || {};
    const request = action.startsWith("set-")
      ? ["PUT", `${base}/alias`, aliasBody(action, card, alias)]
      : ["POST", `${base}/${action}`, {}];
    button.disabled = true;
    setStatus(`${action} ${name}…`, "busy");
    try {
      const result = await api(...request);
      setStatus(`${action} ${name}: ok${summarise(result)}`, "ok");
    } catch (err) {
      setStatus(err.message, "error");
    } finally {
      button.disabled = false;
      await reloadQuietly(["adapters", "audit"]);
    }
  }

  /** A short hint at what the server answered (e.g. the alias it now has). */
  function summarise(result) {
    const alias = result && (result.alias || (result.version && result));
    if (alias && alias.version) return ` — alias → ${alias.version}`;
    return "";
  }

  async function onRegister(event) {
    event.preventDefault();
    const body = { name: $("#reg-name").value.trim(), source: $("#reg-source").value.trim() };
    const version = $("#reg-version").value.trim();
    if (version) body.version = version;
    if (!body.name || !body.source) { setStatus("name and source are required", "error"); return; }
    setStatus(`registering ${body.name}…`, "busy");
    try {
      await api("POST", "/admin/adapters", body);
      setStatus(`registered ${body.name}${version ? "@" + version : ""}: ok`, "ok");
      $("#register-form").reset();
    } catch (err) {
      setStatus(err.message, "error");
    }
    await reloadQuietly(["adapters", "audit", "models"]);
  }

  // ---------------------------------------------------------------- traffic

  /** Set after a 401/403 so the 5 s poll stops until a new key or a manual refresh. */
  let trafficDenied = false;

  async function loadTraffic() {
    const root = $("#traffic");
    try {
      const rows = listOf(await api("GET", "/admin/traffic"));
      trafficDenied = false;
      $("#traffic-updated").textContent = `updated ${localTime(Date.now() / 1000).slice(11)}`;
      if (!rows.length) { root.replaceChildren(empty("no traffic yet")); return; }
      root.replaceChildren(table(
        ["model", "adapter", "version", "requests", "unfinished", "prompt tok", "gen tok", "p50", "mean", "TTFT p50"],
        rows.map((r) => el("tr", { dataset: { trafficModel: r.model } },
          el("th", { scope: "row" }, dash(r.model)), el("td", {}, dash(r.adapter)), el("td", {}, dash(r.version)),
          el("td", { className: "num" }, count(r.requests)),
          el("td", { className: r.unfinished ? "num err-text" : "num" }, count(r.unfinished)),
          el("td", { className: "num" }, count(r.prompt_tokens)), el("td", { className: "num" }, count(r.generation_tokens)),
          el("td", { className: "num" }, seconds(r.latency_p50_s)), el("td", { className: "num" }, seconds(r.latency_mean_s)),
          el("td", { className: "num" }, seconds(r.ttft_p50_s)))), "traffic"));
    } catch (err) {
      trafficDenied = err.status === 401 || err.status === 403;
      root.replaceChildren(sectionError(err, "traffic"));
      throw err;
    }
  }

  // ---------------------------------------------------------------- comparisons

  function sampleView(s) {
    const side = (label, text, tokens, latency) => el("div", { className: "side" },
      el("div", { className: "side-head" }, label, el("span", { className: "muted" }, ` ${count(tokens)} tok · ${seconds(latency)}`)),
      el("pre", { className: "text" }, text ?? ""));
    return el("div", { className: "sample", dataset: { sample: s.id } },
      el("div", { className: "sample-meta muted" }, `#${dash(s.id)} · ${localTime(s.created)} · ${dash(s.route)}`),
      el("details", { className: "prompt" }, el("summary", {}, "prompt: ", String(s.prompt ?? "").slice(0, 80)),
        el("pre", { className: "text" }, s.prompt ?? "")),
      el("div", { className: "side-by-side" },
        side("primary", s.primary_text, s.primary_tokens, s.primary_latency_s),
        side("shadow", s.shadow_text, s.shadow_tokens, s.shadow_latency_s)));
  }

  function comparisonBlock(c) {
    const stat = (label, value) => el("div", { className: "stat" }, el("span", { className: "stat-label" }, label), el("span", { className: "stat-value" }, value));
    const samples = (c.samples || []).filter((s) => s.primary_text !== s.shadow_text);
    return el("article", { className: "card comparison", dataset: { comparison: c.adapter, primary: c.primary_version, shadow: c.shadow_version } },
      el("header", { className: "card-head" }, el("h3", {}, `${c.adapter}: ${c.primary_version} vs ${c.shadow_version}`)),
      el("div", { className: "stats" },
        stat("pairs", count(c.count)),
        stat("identical", `${count(c.identical)} (${percent(c.identical_share)})`),
        stat("mean tokens", `${dash(c.mean_primary_tokens)} | ${dash(c.mean_shadow_tokens)}`),
        stat("latency p50", `${seconds(c.primary_latency_p50_s)} | ${seconds(c.shadow_latency_p50_s)}`)),
      samples.length ? el("div", { className: "samples" }, samples.map(sampleView))
        : empty((c.samples || []).length ? "all sampled outputs are identical" : "no samples kept"));
  }

  async function loadComparisons() {
    const root = $("#comparisons");
    try {
      const rows = listOf(await api("GET", "/admin/comparisons"));
      root.replaceChildren(...(rows.length ? rows.map(comparisonBlock)
        : [empty("no comparisons yet — set a shadow version on an alias")]));
    } catch (err) {
      root.replaceChildren(sectionError(err, "shadow comparisons"));
      throw err;
    }
  }

  // ---------------------------------------------------------------- audit

  function detailCell(detail) {
    if (detail === null || detail === undefined) return el("td", {}, "—");
    const text = isScalar(detail) ? String(detail) : JSON.stringify(detail);
    if (text.length <= 80) return el("td", {}, el("code", {}, text));
    return el("td", {}, el("details", {}, el("summary", {}, el("code", {}, text.slice(0, 60) + "…")),
      el("pre", { className: "json" }, JSON.stringify(detail, null, 2))));
  }

  async function loadAudit() {
    const root = $("#audit");
    try {
      const rows = listOf(await api("GET", "/admin/audit?limit=50"));
      if (!rows.length) { root.replaceChildren(empty("no admin actions recorded yet")); return; }
      root.replaceChildren(table(["time", "actor", "key", "action", "adapter", "detail"],
        rows.map((r) => el("tr", { dataset: { id: r.id } },
          el("td", { className: "nowrap" }, localTime(r.at)), el("td", {}, dash(r.actor)), el("td", {}, dash(r.key_id)),
          el("td", {}, badge(dash(r.action), "plain")), el("td", {}, dash(r.adapter)), detailCell(r.detail))), "audit"));
    } catch (err) {
      root.replaceChildren(sectionError(err, "the audit log"));
      throw err;
    }
  }

  // ---------------------------------------------------------------- playground

  async function loadModels() {
    const root = $("#pg-models");
    const checked = new Set([...root.querySelectorAll("input:checked")].map((i) => i.value));
    try {
      const models = listOf(await api("GET", "/v1/models"));
      models.sort((a, b) => Number(Boolean(a.parent)) - Number(Boolean(b.parent)));
      if (!checked.size && models.length) checked.add(models[0].id);
      root.replaceChildren(...(models.length ? models.map((m) => el("label", { className: "chip" },
        el("input", { type: "checkbox", value: m.id, checked: checked.has(m.id) }), " ", m.id))
        : [el("span", { className: "muted" }, "no models")]));
    } catch (err) {
      root.replaceChildren(el("span", { className: "err-text" }, `${err.message} — enter a key to list models`));
      throw err;
    }
  }

  let streamAbort = null;

  function makeColumn(model) {
    const column = el("div", { className: "pg-column", dataset: { model } },
      el("div", { className: "pg-head" }, el("strong", {}, model)),
      el("div", { className: "pg-state muted" }, "waiting…"),
      el("pre", { className: "pg-output" }));
    $("#pg-columns").append(column);
    return column;
  }

  function columnFor(model) {
    const found = [...document.querySelectorAll("#pg-columns .pg-column")].find((c) => c.dataset.model === model);
    return found || makeColumn(model);
  }

  function setColumnState(column, text, kind) {
    const state = $(".pg-state", column);
    state.textContent = text;
    state.className = `pg-state state-${kind}`;
    column.dataset.state = kind;
  }

  /** Apply one parsed SSE event to its column. */
  function handleEvent(eventName, data) {
    const model = data.requested_model ?? data.model;
    if (model === undefined) {
      if (data.error) setStatus(errorMessage(data, {}), "error");
      return;
    }
    const column = columnFor(model);
    if (eventName === "error" || data.error) {
      setColumnState(column, `error: ${errorMessage(data, { status: "", statusText: "" })}`, "error");
    } else if (data.done) {
      const usage = data.usage || {};
      const tokens = usage.completion_tokens ?? usage.generation_tokens ?? usage.output_tokens;
      const reason = data.finish_reason ? ` · ${data.finish_reason}` : "";
      setColumnState(column, `done · ${tokens ?? "?"} tokens${reason}`, "done");
    } else {
      if (typeof data.text === "string") $(".pg-output", column).textContent += data.text;
      const served = data.model && data.model !== model ? ` (${data.model})` : "";
      setColumnState(column, `streaming…${served}`, "streaming");
    }
  }

  /** Parse one "event: x\ndata: y" block; returns true at [DONE]. */
  function handleBlock(block) {
    let eventName = "message";
    const data = [];
    for (const line of block.split(/\r?\n/)) {
      if (line.startsWith("event:")) eventName = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (!data.length) return false;
    const payload = data.join("\n");
    if (payload.trim() === "[DONE]") return true;
    try { handleEvent(eventName, JSON.parse(payload)); } catch (err) { console.warn("bad SSE event", payload, err); }
    return false;
  }

  async function readStream(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      const blocks = buffer.split(/\r?\n\r?\n/);
      buffer = done ? "" : blocks.pop();
      for (const block of blocks) if (handleBlock(block)) { reader.cancel().catch(() => {}); return; }
      if (done) return;
    }
  }

  function finishColumns(text, kind) {
    for (const column of document.querySelectorAll("#pg-columns .pg-column")) {
      if (column.dataset.state === "streaming" || column.dataset.state === "waiting") setColumnState(column, text, kind);
    }
  }

  async function runPlayground(event) {
    event.preventDefault();
    const models = [...document.querySelectorAll("#pg-models input:checked")].map((i) => i.value);
    const prompt = $("#pg-prompt").value;
    if (!models.length) { setStatus("choose at least one model", "error"); return; }
    if (!prompt.trim()) { setStatus("write a prompt first", "error"); return; }
    const body = {
      model: models, messages: [{ role: "user", content: prompt }],
      max_tokens: parseInt($("#pg-max-tokens").value, 10) || 32,
      temperature: parseFloat($("#pg-temperature").value) || 0,
    };
    $("#pg-columns").replaceChildren();
    for (const m of models) setColumnState(makeColumn(m), "waiting…", "waiting");
    streamAbort = new AbortController();
    $("#pg-run").disabled = true;
    $("#pg-stop").disabled = false;
    setStatus(`streaming ${models.length} model(s)…`, "busy");
    try {
      const response = await fetch("/generate_stream", {
        method: "POST", body: JSON.stringify(body), signal: streamAbort.signal,
        headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      });
      if (!response.ok) {
        let data = null;
        try { data = await response.json(); } catch (_) { /* not JSON */ }
        throw new ApiError(errorMessage(data, response), response.status);
      }
      await readStream(response);
      finishColumns("ended", "done");
      setStatus("ok", "ok");
    } catch (err) {
      const aborted = err.name === "AbortError";
      finishColumns(aborted ? "stopped" : "error", aborted ? "done" : "error");
      setStatus(aborted ? "stopped" : err.message, aborted ? "ok" : "error");
    } finally {
      streamAbort = null;
      $("#pg-run").disabled = false;
      $("#pg-stop").disabled = true;
    }
  }

  // ---------------------------------------------------------------- wiring

  const LOADERS = {
    server: loadInfo, adapters: loadAdapters, traffic: loadTraffic,
    comparisons: loadComparisons, audit: loadAudit, models: loadModels,
  };

  /** A section's loads run one after another, so the last one asked for renders last: the
   * page's first load (maybe without a key) cannot overwrite the one a new key started. */
  const queued = {};
  function load(name) {
    const next = (queued[name] || Promise.resolve()).catch(() => {}).then(() => LOADERS[name]());
    queued[name] = next;
    return next;
  }

  /** Reload sections without touching #status (used after an action reported its own result). */
  async function reloadQuietly(names) {
    await Promise.allSettled(names.map(load));
  }

  /** Reload sections and report the first failure (or "ok") in #status. */
  async function reload(names) {
    const results = await Promise.allSettled(names.map(load));
    const failed = results.find((r) => r.status === "rejected");
    if (failed) setStatus(failed.reason.message, "error");
    else setStatus("ok", "ok");
  }

  function startTrafficTimer() {
    setInterval(() => {
      if (document.visibilityState === "visible" && !trafficDenied) load("traffic").catch(() => {});
    }, TRAFFIC_EVERY_MS);
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible" && !trafficDenied) load("traffic").catch(() => {});
    });
  }

  function init() {
    $("#api-key").value = getKey();
    $("#key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("#api-key").value.trim();
      if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
      reload(Object.keys(LOADERS));
    });
    document.addEventListener("click", (event) => {
      const refresh = event.target.closest("[data-refresh]");
      if (refresh) reload([refresh.dataset.refresh]);
    });
    $("#adapters").addEventListener("click", onAdapterAction);
    $("#register-form").addEventListener("submit", onRegister);
    $("#pg-form").addEventListener("submit", runPlayground);
    $("#pg-stop").addEventListener("click", () => { if (streamAbort) streamAbort.abort(); });
    reload(Object.keys(LOADERS));
    startTrafficTimer();
  }

  init();
})();
