// The H2T dashboard: one page, plain JavaScript, served by the API under /ui/ and talking to its /v1 REST
// API with the user's API key (kept in this tab's sessionStorage, or localStorage when asked to remember).
// Views are chosen by the URL's hash (#/runs, #/runs/<id>, #/compare?..., #/models/<id>, #/datasets/<id>) so
// every view can be bookmarked. Live views follow the run's server-sent events through fetch (EventSource
// cannot send the key header). User data is only ever set as text, never parsed as HTML.
"use strict";

const KEY_STORE = "h2t-api-key";
const ACTIVE = new Set(["queued", "running", "cancelling"]);
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelling", "cancelled"];
const GROUPS = ["many", "medium", "few"];
const viewRoot = document.getElementById("view");
const notice = document.getElementById("notice");
let leaving = [];  // what the current view stops when another one opens (timers, streams)

// ---------- small helpers ----------

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const pct = (v, digits = 2) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(digits)}`);
const short = (id) => (id ? id.slice(0, 8) : "");
const runTitle = (run) => run.name || `run ${short(run.id)}`;
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

function duration(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  const hours = Math.floor(seconds / 3600), minutes = Math.floor((seconds % 3600) / 60), secs = seconds % 60;
  if (hours) return `${hours}h${String(minutes).padStart(2, "0")}m`;
  return minutes ? `${minutes}m${String(secs).padStart(2, "0")}s` : `${secs}s`;
}

function statusBadge(status) {
  return h("span", { class: `status status-${status}`, "data-status": status }, status);
}

function say(text, isError = false) {
  notice.textContent = text || "";
  notice.className = isError ? "error" : "";
}

class Stale extends Error {}  // thrown into a view whose route was left while it awaited

let routeToken = 0;

// What a view draws and starts with: once another route has begun, `show` throws Stale and nothing more is
// started, so a slow view never draws over the one the user moved to.
function viewContext(token) {
  const stale = () => token !== routeToken;
  return {
    stale,
    show(...nodes) {
      if (stale()) throw new Stale();
      viewRoot.replaceChildren(...nodes);
    },
    every(ms, fn) {
      if (stale()) return;
      const timer = setInterval(fn, ms);
      leaving.push(() => clearInterval(timer));
    },
    signal() {
      const controller = new AbortController();
      if (stale()) controller.abort(); else leaving.push(() => controller.abort());
      return controller.signal;
    },
  };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// A message for the next view: shown after the route change that would otherwise clear it.
let flashed = null;
function flash(text) { flashed = text; }

// ---------- the API ----------

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

const apiKey = () => sessionStorage.getItem(KEY_STORE) || localStorage.getItem(KEY_STORE);
let connectionLost = false;

async function api(path, { method = "GET", json, body, signal, raw = false } = {}) {
  const headers = { "X-API-Key": apiKey() || "" };
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal, cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    connectionLost = true;
    say("The server cannot be reached; retrying…", true);
    throw new ApiError(0, "the server cannot be reached");
  }
  if (connectionLost) {
    connectionLost = false;
    say("");
  }
  if (response.status === 401) {
    signOut("The server refused this API key: enter a valid one.");
    throw new ApiError(401, "unauthorised");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not problem+json */ }
    throw new ApiError(response.status, detail);
  }
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

// Reads a streamed answer chunk by chunk until it ends or the view is left.
async function follow(path, onText, signal) {
  const response = await api(path, { raw: true, signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onText(decoder.decode(value, { stream: true }));
  }
}

// Server-sent events over fetch: handlers[kind](data) per `event: kind` / `data: json` block.
function events(path, handlers, signal) {
  let buffer = "";
  return follow(path, (text) => {
    buffer += text;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) kind = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length && handlers[kind]) handlers[kind](JSON.parse(data.join("\n")));
    }
  }, signal);
}

function quietly(promise) {  // a stream ended by leaving the view is not an error, nor one already said
  return promise.catch((error) => {
    if (error.name === "AbortError" || error instanceof Stale) return;
    if (error instanceof ApiError && (error.status === 401 || error.status === 0)) return;
    say(error.message, true);
  });
}

// Keeps a stream open while `more()` holds: reopened after a dropped connection (a server restart, a proxy's
// idle timeout) with a growing pause; a 401 or 404 ends it.
async function persist(ctx, open, more) {
  for (let attempt = 0; !ctx.stale(); attempt++) {
    try {
      await open();
      attempt = 0;
    } catch (error) {
      if (error.name === "AbortError" || error instanceof Stale) return;
      if (error instanceof ApiError && (error.status === 401 || error.status === 404)) return;
    }
    if (!more() || ctx.stale()) return;
    await sleep(Math.min(8000, 1000 * 2 ** Math.min(attempt, 3)));
  }
}

// ---------- sign in ----------

function signOut(message) {
  sessionStorage.removeItem(KEY_STORE);
  localStorage.removeItem(KEY_STORE);
  renderLogin(message);
}

function renderLogin(message) {
  for (const stop of leaving) stop();
  leaving = [];
  routeToken++;  // a view still loading must not draw over the sign-in form
  document.title = "Sign in · H2T";
  document.getElementById("sign-out").hidden = true;
  say(message || "", Boolean(message));
  const input = h("input", { id: "api-key", type: "password", autocomplete: "current-password", required: true });
  const remember = h("input", { id: "remember", type: "checkbox" });
  const form = h("form", {
    onsubmit: async (event) => {
      event.preventDefault();
      (remember.checked ? localStorage : sessionStorage).setItem(KEY_STORE, input.value.trim());
      try {
        await api("/v1/runs?limit=1");
      } catch (error) {
        if (!(error instanceof ApiError && error.status === 401)) say(error.message, true);
        return;
      }
      say("");
      route();
    },
  },
  h("label", { for: "api-key" }, "API key", input),
  h("label", { class: "inline" }, h("span", {}, remember, " remember on this browser")),
  h("button", { class: "primary", type: "submit" }, "Sign in"));
  viewRoot.replaceChildren(h("section", { class: "login panel" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Enter one of the server's API keys (H2T_API_KEYS). It is kept in this tab only, " +
      "unless you ask this browser to remember it."),
    form));
  input.focus();
}

// ---------- runs ----------

function runsQuery(params) {
  const query = new URLSearchParams();
  for (const key of ["status", "method", "dataset_id", "name", "search", "tag", "stage1_from", "sort"]) {
    if (params.get(key)) query.set(key, params.get(key));
  }
  query.set("limit", "100");
  return query;
}

function etaCell(run) {
  const p = run.progress;
  if (!p || run.status !== "running") return h("td", {}, run.status === "queued" ? "waiting" : "");
  const done = ((p.epoch - 1) + p.step / Math.max(1, p.steps)) / Math.max(1, p.epochs);
  const bar = h("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
    "aria-valuenow": Math.round(100 * done), "aria-label": `stage ${p.stage} progress` }, h("div"));
  bar.firstChild.style.width = `${(100 * done).toFixed(1)}%`;
  return h("td", {}, bar, h("span", { class: "muted" }, `run ETA ${duration(p.run_eta_s)}`));
}

async function cancelRun(run, force = false) {
  const what = force ? "End this run now, as cancelled, without waiting for its worker?" : `Cancel ${runTitle(run)}?`;
  if (!window.confirm(what)) return false;
  await api(`/v1/runs/${run.id}/cancel${force ? "?force=true" : ""}`, { method: "POST" });
  say(force ? `${runTitle(run)} ended as cancelled.` : `Cancel sent to ${runTitle(run)}: it stops between two steps.`);
  return true;
}

async function viewRuns(_, params, ctx) {
  document.title = "Runs · H2T";
  const datasets = (await api("/v1/datasets?limit=500")).data;
  const datasetName = Object.fromEntries(datasets.map((d) => [d.id, d.name]));
  const selected = new Set();
  const field = (name, control) => h("label", {}, name, control);
  const select = (name, options, value) => h("select", { name },
    options.map(([v, text]) => h("option", { value: v, selected: v === (value || "") }, text)));
  const filters = h("form", { class: "filters", "aria-label": "Filter runs", onsubmit: (event) => {
    event.preventDefault();
    const query = new URLSearchParams();
    for (const [key, value] of new FormData(event.target)) if (value) query.set(key, value);
    location.hash = `#/runs${query.toString() ? `?${query}` : ""}`;
  } },
  field("Status", select("status", [["", "any"], ...STATUSES.map((s) => [s, s])], params.get("status"))),
  field("Method", select("method", [["", "any"], ["h2t", "h2t"], ["crt", "crt"]], params.get("method"))),
  field("Dataset", select("dataset_id", [["", "any"], ...datasets.map((d) => [d.id, d.name])], params.get("dataset_id"))),
  field("Tag", h("input", { name: "tag", value: params.get("tag") || "", size: 12 })),
  field("Name contains", h("input", { name: "search", value: params.get("search") || "", size: 14 })),
  h("button", { type: "submit" }, "Filter"),
  h("a", { href: "#/runs" }, "clear"));

  const compare = h("button", { type: "button", class: "primary", disabled: true, onclick: () => {
    location.hash = `#/compare?ids=${[...selected].join(",")}`;
  } }, "Compare selected");
  const body = h("tbody");
  const count = h("span", { class: "muted" });
  const table = h("table", { "aria-label": "Runs" }, h("thead", {}, h("tr", {},
    ["", "Name", "Status", "Stage", "Epoch", "Progress", "Top-1 %", "Few %", "ECE %", "Tags", "Dataset", "Created", ""]
      .map((title, i) => h("th", { class: i >= 6 && i <= 8 ? "num" : null, scope: "col" }, title)))), body);
  ctx.show(h("h1", {}, "Runs"), filters, h("div", { class: "actions" }, compare, count),
    h("div", { class: "scroll" }, table));
  const filtered = [...runsQuery(params).keys()].some((key) => key !== "limit");

  let shown = "";
  async function refresh() {
    let answer;
    try {
      answer = await api(`/v1/runs?${runsQuery(params)}`);
    } catch (error) {  // a filter the API refuses: say why where the rows would be, and keep the form
      if (!(error instanceof ApiError) || error.status < 400 || error.status === 401) throw error;
      shown = "";
      body.replaceChildren(h("tr", {}, h("td", { colspan: 13, class: "empty", role: "alert" },
        `These filters were refused: ${error.message}`)));
      return;
    }
    const signature = JSON.stringify(answer);
    if (signature === shown) return;
    shown = signature;
    const focused = document.activeElement && document.activeElement.dataset.key;
    count.textContent = `${answer.count} run(s)`;
    body.replaceChildren(...(answer.data.length ? answer.data.map((run) => {
      const last = run.latest_metrics;
      const box = h("input", { type: "checkbox", "aria-label": `select ${runTitle(run)}`, "data-key": `sel-${run.id}`,
        checked: selected.has(run.id), onchange: (event) => {
          event.target.checked ? selected.add(run.id) : selected.delete(run.id);
          compare.disabled = selected.size === 0;
        } });
      const cancel = ACTIVE.has(run.status) && run.status !== "cancelling"
        ? h("button", { type: "button", class: "danger", "data-key": `cancel-${run.id}`,
          onclick: () => cancelRun(run).then(refresh).catch((e) => say(e.message, true)) }, "Cancel") : "";
      const name = runTitle(run);
      return h("tr", { "data-run": run.id },
        h("td", {}, box),
        h("td", {}, h("a", { href: `#/runs/${run.id}`, "data-key": `open-${run.id}`, class: "name", title: name }, name)),
        h("td", {}, statusBadge(run.status)),
        h("td", {}, run.stage ? (run.stage === 1 ? "1 backbone" : `2 ${run.config.stage2.method}`) : ""),
        h("td", {}, run.stage ? `${run.epoch}/${run.total_epochs}` : ""),
        etaCell(run),
        h("td", { class: "num" }, last ? pct(last.top1) : ""),
        h("td", { class: "num" }, last ? pct(last.few) : ""),
        h("td", { class: "num" }, last ? pct(last.ece) : ""),
        h("td", {}, run.tags.map((t) => h("span", { class: "tag" }, t))),
        h("td", {}, datasetName[run.dataset_id] || short(run.dataset_id)),
        h("td", {}, when(run.created_at)),
        h("td", {}, cancel));
    }) : [h("tr", {}, h("td", { colspan: 13, class: "empty" }, filtered ? "No runs match these filters."
      : "No runs here yet. Submit one with `h2t runs submit CONFIG.yaml` or POST /v1/runs."))]));
    if (focused) {  // the 2 s refresh keeps the keyboard's place; a Cancel button gone leaves it on its run
      const again = body.querySelector(`[data-key="${CSS.escape(focused)}"]`)
        || body.querySelector(`[data-key="${CSS.escape(focused.replace(/^cancel-/, "open-"))}"]`);
      if (again) again.focus();
    }
  }
  await refresh();
  ctx.every(2000, () => quietly(refresh()));
}

function metricSeries(rows, pick, names) {
  // x: epochs over both stages (stage 2 after stage 1's last epoch), so one chart shows the whole run
  const stage1 = rows.filter((r) => r.stage === 1).reduce((n, r) => Math.max(n, r.epoch), 0);
  const x = (r) => (r.stage === 1 ? r.epoch : stage1 + r.epoch);
  return names.map(([name, key]) => ({ name, color: Charts.COLORS[name] || undefined,
    points: rows.map((r) => [x(r), pick(r, key)]) }));
}

function runCharts(rows, empty) {
  const stage1 = rows.filter((r) => r.stage === 1).reduce((n, r) => Math.max(n, r.epoch), 0);
  const markers = stage1 && rows.some((r) => r.stage === 2) ? [{ x: stage1 + 0.5, label: "stage 2" }] : [];
  const value = (r, key) => r[key];
  const common = { xLabel: "epoch (stage 1, then stage 2)", markers, integerX: true, empty };
  return [
    Charts.line({ key: "loss", title: "Training loss", series: metricSeries(rows, value, [["loss", "loss"]]), ...common }),
    Charts.line({ key: "lr", title: "Learning rate", series: metricSeries(rows, value, [["lr", "lr"]]), ...common }),
    Charts.line({ key: "accuracy", title: "Accuracy on the evaluation split", yFormat: Charts.percent, yMin: 0,
      series: metricSeries(rows, value, [["overall", "top1"], ["many", "many"], ["medium", "medium"], ["few", "few"]]),
      ...common }),
    Charts.line({ key: "ece", title: "Expected calibration error", yFormat: Charts.percent, yMin: 0,
      series: metricSeries(rows, value, [["overall", "ece"], ["many", "ece_many"], ["medium", "ece_medium"],
        ["few", "ece_few"]]), ...common }),
  ];
}

function progressText(run, p) {
  if (!p || run.status !== "running") return "";
  return `stage ${p.stage}, epoch ${p.epoch}/${p.epochs}, step ${p.step}/${p.steps} · ` +
    `${Math.round(p.images_per_second)} images/s · stage ETA ${duration(p.stage_eta_s)} · run ETA ${duration(p.run_eta_s)}`;
}

async function viewRun([id], _, ctx) {
  let run = await api(`/v1/runs/${id}`);
  const rows = (await api(`/v1/runs/${id}/metrics`)).data;
  const dataset = await api(`/v1/datasets/${run.dataset_id}`).catch(() => null);
  document.title = `${runTitle(run)} · H2T`;
  const title = h("h1");
  const facts = h("dl", { class: "facts" });
  const actions = h("div", { class: "actions" });
  const progress = h("p", { id: "progress", "aria-live": "polite" });
  const charts = h("div", { class: "grid", id: "charts" });
  const log = h("pre", { id: "log", tabindex: 0, "aria-label": "run log" });
  const lastTable = h("div");
  ctx.show(title, h("div", { class: "panel" }, facts, h("p"), actions, progress),
    h("h2", {}, "Curves"), charts, h("h2", {}, "Last epoch per group"), lastTable,
    h("h2", {}, "Config"), h("pre", { tabindex: 0 }, JSON.stringify(run.config, null, 2)),
    h("h2", {}, "Log"), log);

  function drawHeader() {
    title.replaceChildren(runTitle(run), " ", statusBadge(run.status));
    const link = (href, text) => h("a", { href }, text);
    const entries = [
      ["id", run.id], ["dataset", link(`#/datasets/${run.dataset_id}`, dataset ? dataset.name : short(run.dataset_id))],
      ["stage 2", `${run.config.stage2.method}, rho ${run.config.stage2.rho}, seed ${run.config.seed}`],
      ["stage 1", run.stage1_from ? h("span", {}, "reused from ", link(`#/runs/${run.stage1_from}`, short(run.stage1_from)))
        : `trained here, ${run.config.stage1.epochs} epochs`],
      ["tags", run.tags.length ? run.tags.map((t) => h("span", { class: "tag" }, t)) : "–"],
      ["created", when(run.created_at)], ["finished", when(run.finished_at)],
      ["worker", `${run.worker || "–"} (attempt ${run.attempts})`],
      ["model", run.model_id ? link(`#/models/${run.model_id}`, "open the model") : "–"],
    ];
    if (run.error) entries.push(["error", run.error]);
    facts.replaceChildren(...entries.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    const buttons = [h("a", { href: `#/compare?stage1_from=${run.stage1_from || run.id}` },
      "Compare the runs on this stage 1")];
    if (run.status === "queued" || run.status === "running") {
      buttons.unshift(h("button", { type: "button", class: "danger", onclick: () =>
        cancelRun(run).then(reload).catch((e) => say(e.message, true)) }, "Cancel"));
    }
    if (run.status === "running" || run.status === "cancelling") {
      buttons.unshift(h("button", { type: "button", class: "danger", onclick: () =>
        cancelRun(run, true).then(reload).catch((e) => say(e.message, true)) }, "Force cancel"));
    }
    if (!ACTIVE.has(run.status)) {
      buttons.push(h("button", { type: "button", class: "danger", onclick: async () => {
        if (!window.confirm(`Delete ${runTitle(run)} with its metrics, model and files?`)) return;
        try {
          await api(`/v1/runs/${run.id}`, { method: "DELETE" });
          flash(`Deleted ${runTitle(run)}.`);
          location.hash = "#/runs";
        } catch (e) { say(e.message, true); }
      } }, "Delete"));
    }
    actions.replaceChildren(...buttons);
    progress.textContent = progressText(run, run.progress);
  }

  function drawMetrics() {
    charts.replaceChildren(...runCharts(rows, ACTIVE.has(run.status) ? "no epoch finished yet" : "no epoch recorded"));
    const last = rows[rows.length - 1];
    lastTable.replaceChildren(last ? groupTable([["overall", last.top1, last.ece], ["many", last.many, last.ece_many],
      ["medium", last.medium, last.ece_medium], ["few", last.few, last.ece_few]],
    `stage ${last.stage}, epoch ${last.epoch}/${last.epochs}`) : h("p", { class: "muted" }, "No epoch finished yet."));
  }

  async function reload() {
    run = await api(`/v1/runs/${id}`);
    drawHeader();
  }

  let pending = null;
  const redraw = () => {  // at most a few redraws a second, however fast the epochs land
    if (pending) return;
    pending = setTimeout(() => { pending = null; drawMetrics(); }, 250);
  };
  leaving.push(() => clearTimeout(pending));
  drawHeader();
  drawMetrics();
  const signal = ctx.signal();
  const active = () => ACTIVE.has(run.status);
  persist(ctx, () => events(`/v1/runs/${id}/events`, {
    epoch: (row) => {
      const at = rows.findIndex((r) => r.stage === row.stage && r.epoch === row.epoch);
      if (at >= 0) rows[at] = row; else rows.push(row);
      rows.sort((a, b) => a.stage - b.stage || a.epoch - b.epoch);
      redraw();
    },
    progress: (p) => { run.progress = p; progress.textContent = progressText(run, p); },
    status: (s) => {
      const changed = s.status !== run.status;
      Object.assign(run, s);
      drawHeader();
      if (changed && !ACTIVE.has(s.status)) quietly(reload());
    },
  }, signal), active);
  const following = active();
  persist(ctx, () => {
    log.textContent = "";  // a reopened stream starts from the first line again
    return follow(`/v1/runs/${id}/logs${following ? "?follow=true" : ""}`, (text) => {
      const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.append(text);
      if (atBottom) log.scrollTop = log.scrollHeight;
    }, signal);
  }, () => following && active());
}

function groupTable(rows, caption) {
  return h("table", { class: "groups" }, h("caption", { class: "muted" }, caption || ""),
    h("thead", {}, h("tr", {}, ["group", "accuracy %", "ECE %"].map((t, i) => h("th", { class: i ? "num" : null }, t)))),
    h("tbody", {}, rows.map(([name, acc, ece]) => h("tr", {}, h("td", {}, h("span", { class: `swatch ${name}` }), name),
      h("td", { class: "num" }, pct(acc)), h("td", { class: "num" }, pct(ece))))));
}

// ---------- comparison ----------

function runId(text) {  // ids from the address bar go into API paths: only an id's characters
  if (!/^[\w-]{1,36}$/.test(text)) throw new ApiError(400, `${JSON.stringify(text.slice(0, 40))} is not a run id`);
  return text;
}

async function comparedRuns(params) {
  let runs;
  if (params.get("stage1_from")) {
    const root = runId(params.get("stage1_from"));
    const children = (await api(`/v1/runs?stage1_from=${encodeURIComponent(root)}&limit=200`)).data;
    runs = [await api(`/v1/runs/${root}`), ...children];
  } else {
    const ids = (params.get("ids") || "").split(",").filter(Boolean);
    runs = await Promise.all(ids.map((id) => api(`/v1/runs/${runId(id)}`)));
  }
  return runs.sort((a, b) => a.config.stage2.rho - b.config.stage2.rho || a.config.seed - b.config.seed);
}

async function viewCompare(_, params, ctx) {
  document.title = "Comparison · H2T";
  let runs = await comparedRuns(params);
  let shown = JSON.stringify(runs);
  drawComparison(runs, ctx);
  ctx.every(5000, () => quietly((async () => {  // while any run trains, redraw when one changed
    if (!runs.some((r) => ACTIVE.has(r.status))) return;
    runs = await comparedRuns(params);
    const now = JSON.stringify(runs);
    if (now !== shown) { shown = now; drawComparison(runs, ctx); }
  })()));
}

function drawComparison(runs, ctx) {
  if (!runs.length) {
    ctx.show(h("h1", {}, "Comparison"), h("p", { class: "empty" }, "No runs to compare: tick runs in the ",
      h("a", { href: "#/runs" }, "runs table"), " and press Compare selected, or open a run and follow ",
      "“Compare the runs on this stage 1”."));
    return;
  }
  const finished = runs.filter((r) => r.latest_metrics && r.latest_metrics.stage === 2);
  const label = (r) => `${runTitle(r)} (ρ ${r.config.stage2.rho})`;
  const table = h("table", { "aria-label": "Compared runs" },
    h("thead", {}, h("tr", {}, ["Run", "Status", "Method", "ρ", "Seed", "Top-1 %", "Many %", "Medium %", "Few %",
      "ECE %", "Few ECE %"].map((t, i) => h("th", { class: i >= 5 ? "num" : null }, t)))),
    h("tbody", {}, runs.map((r) => {
      const m = r.latest_metrics && r.latest_metrics.stage === 2 ? r.latest_metrics : null;
      return h("tr", {}, h("td", {}, h("a", { href: `#/runs/${r.id}`, class: "name", title: runTitle(r) }, runTitle(r))),
        h("td", {}, statusBadge(r.status)),
        h("td", {}, r.config.stage2.method), h("td", { class: "num" }, r.config.stage2.rho),
        h("td", { class: "num" }, r.config.seed),
        ...["top1", "many", "medium", "few", "ece", "ece_few"].map((k) => h("td", { class: "num" }, m ? pct(m[k]) : "")));
    })));
  const byRho = new Map();
  for (const r of finished) {
    const rho = r.config.stage2.rho;
    if (!byRho.has(rho)) byRho.set(rho, []);
    byRho.get(rho).push(r.latest_metrics);
  }
  const rhos = [...byRho.keys()].sort((a, b) => a - b);
  const mean = (rho, key) => {
    const values = byRho.get(rho).map((m) => m[key]).filter((v) => v !== null && v !== undefined);
    return values.length ? values.reduce((a, b) => a + b, 0) / values.length : null;
  };
  const rhoSeries = (names) => names.map(([name, key]) => ({ name, color: Charts.COLORS[name],
    points: rhos.map((rho) => [rho, mean(rho, key)]) }));
  const charts = finished.length ? [
    Charts.bars({ key: "groups", title: "Accuracy per group, last epoch of stage 2",
      categories: ["overall", ...GROUPS],
      series: finished.map((r) => ({ name: label(r), values: ["top1", ...GROUPS].map((k) => r.latest_metrics[k]) })) }),
    Charts.line({ key: "rho-accuracy", title: "Accuracy against the fusion ratio ρ (mean over seeds)",
      xLabel: "ρ (0: DR, no fusion)", xFormat: (v) => `${v}`, yFormat: Charts.percent, xMin: 0,
      series: rhoSeries([["overall", "top1"], ["many", "many"], ["medium", "medium"], ["few", "few"]]) }),
    Charts.line({ key: "rho-ece", title: "Calibration error against ρ (mean over seeds)", xLabel: "ρ",
      xFormat: (v) => `${v}`, yFormat: Charts.percent, yMin: 0, xMin: 0,
      series: rhoSeries([["overall", "ece"], ["many", "ece_many"], ["medium", "ece_medium"], ["few", "ece_few"]]) }),
  ] : [h("p", { class: "empty" }, "None of these runs has finished a stage-2 epoch yet.")];
  const datasets = new Set(runs.map((r) => r.dataset_id)).size;
  const stage1s = new Set(runs.map((r) => r.stage1_from || r.id)).size;
  const mixed = datasets > 1 || stage1s > 1 ? h("p", { class: "warning", role: "note" },
    `These runs are on ${datasets} dataset(s) and ${stage1s} stage-1 run(s): the means over seeds mix them.`) : "";
  ctx.show(h("h1", {}, `Comparing ${runs.length} run(s)`),
    h("p", { class: "muted" }, "Figures are each run's last stage-2 epoch on the evaluation split; nothing is " +
      "chosen by its test accuracy."), mixed, h("div", { class: "scroll" }, table), h("h2", {}, "Charts"),
    h("div", { class: "grid" }, charts));
}

// ---------- models ----------

async function viewModels(_, __, ctx) {
  document.title = "Models · H2T";
  const models = (await api("/v1/models?limit=200")).data;
  const registered = (await api("/v1/registry?limit=200")).data;
  const registry = registered.length ? [h("h2", {}, "Registry"), h("table", { "aria-label": "Registry" },
    h("thead", {}, h("tr", {}, ["Name", "Latest", "Versions", "Aliases", "Last alias move"].map((t) => h("th", {}, t)))),
    h("tbody", {}, registered.map((r) => h("tr", {},
      h("td", {}, h("a", { href: `#/models/${encodeURIComponent(r.name)}` }, r.name)),
      h("td", {}, r.latest_version || "–"),
      h("td", {}, r.versions.map((v) => h("a", { href: `#/models/${v.model_id}`, class: "tag" }, `v${v.version}`))),
      h("td", {}, r.aliases.map((a) => h("span", { class: "tag" }, `${a.alias} → v${a.version}`))),
      h("td", {}, r.alias_history.length ? `${r.alias_history[0].alias} → ${r.alias_history[0].version ?? "removed"}, ` +
        `${when(r.alias_history[0].at)} by ${r.alias_history[0].by}` : "–")))))] : [];
  const runs = Object.fromEntries((await api("/v1/runs?status=succeeded&limit=500")).data.map((r) => [r.id, r]));
  ctx.show(h("h1", {}, "Models"), h("table", { "aria-label": "Models" },
    h("thead", {}, h("tr", {}, ["Model", "Run", "Classes", "Top-1 %", "Few %", "ECE %", "Created"]
      .map((t, i) => h("th", { class: i >= 2 && i <= 5 ? "num" : null }, t)))),
    h("tbody", {}, models.length ? models.map((m) => h("tr", {},
      h("td", {}, h("a", { href: `#/models/${m.id}` }, short(m.id))),
      h("td", {}, h("span", { class: "name", title: m.run_id || "imported" }, runs[m.run_id] ? runTitle(runs[m.run_id])
        : m.run_id ? short(m.run_id) : `imported (${(m.origin && m.origin.folder || "").split("/").pop()})`)),
      h("td", { class: "num" }, m.num_classes), h("td", { class: "num" }, pct(m.calibration.overall.accuracy)),
      h("td", { class: "num" }, pct(m.calibration.few.accuracy)), h("td", { class: "num" }, pct(m.calibration.overall.ece)),
      h("td", {}, when(m.created_at)))) : [h("tr", {}, h("td", { colspan: 7, class: "empty" },
      "No models yet: a run that succeeds exports one."))])), ...registry);
}

async function download(model) {
  const response = await api(`/v1/models/${model.id}/onnx`, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  const a = h("a", { href: url, download: `h2t-${model.id}.onnx` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function viewModel([ref], _, ctx) {
  // a model's id, a registered name, name@version or name@alias; what it names now is shown and predicted with
  const model = await api(`/v1/models/${encodeURIComponent(decodeURIComponent(ref))}`);
  const id = model.id;
  const calibration = await api(`/v1/models/${id}/calibration`);
  const run = model.run_id ? await api(`/v1/runs/${model.run_id}`).catch(() => null) : null;
  const imported = model.origin && model.origin.folder ? model.origin.folder.split("/").pop() : null;
  const title = run ? `Model of ${runTitle(run)}` : imported ? `Model imported from ${imported}` : `Model ${short(model.id)}`;
  document.title = `${title} · H2T`;
  const input = model.input;
  const facts = [
    ["model id", model.id],
    model.run_id ? ["run", h("a", { href: `#/runs/${model.run_id}` }, run ? runTitle(run) : short(model.run_id))]
      : ["origin", `imported from ${model.origin && model.origin.kind} folder ${model.origin && model.origin.folder}`],
    model.dataset_id ? ["dataset", h("a", { href: `#/datasets/${model.dataset_id}` }, short(model.dataset_id))]
      : ["dataset", (model.origin && model.origin.dataset) || "–"],
    ["classes", `${model.num_classes} (${GROUPS.map((g) => `${model.groups.filter((x) => x === g).length} ${g}`).join(", ")})`],
    ["input", Object.entries(input).map(([k, v]) => `${k}: ${JSON.stringify(v)}`).join(" · ")],
    ["ONNX sha256", model.onnx_sha256], ["size", `${(model.size_bytes / 1024).toFixed(0)} KiB`],
    ["parity", `max |p_onnx − p_torch| ${model.parity.max_abs_diff.toExponential(2)} on ${model.parity.images} images`],
  ];
  const diagrams = ["overall", ...GROUPS].map((name) => {
    const g = calibration.groups[name];
    return Charts.reliability({ key: `reliability-${name}`, bins: g.bins, color: Charts.COLORS[name],
      title: `${name}: n ${g.n}, accuracy ${pct(g.accuracy)} %, ECE ${pct(g.ece)} %` });
  });
  const results = h("div", { id: "predictions" });
  const topK = h("select", { id: "top-k" }, [1, 3, 5, 10].map((k) => h("option", { value: k, selected: k === 3 }, k)));
  let last = [];  // the images shown, predicted again when the number of classes changes
  const files = h("input", { id: "images", type: "file", accept: "image/*", multiple: true, onchange: () => {
    const chosen = [...files.files];
    files.value = "";  // so choosing the same file again predicts it again
    predict(chosen);
  } });
  topK.addEventListener("change", () => predict(last));
  const drop = h("div", { class: "drop", id: "drop-zone" },
    h("p", {}, "Drop images here, or "), h("label", { for: "images", class: "inline" }, "choose image files", files),
    h("p", {}, h("label", { for: "top-k", class: "inline" }, "classes per image ", topK)));
  for (const kind of ["dragenter", "dragover"]) {
    drop.addEventListener(kind, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    predict([...e.dataTransfer.files].filter((f) => f.type.startsWith("image/") || !f.type));
  });

  async function predict(images) {
    if (!images.length) return;
    last = images;
    const form = new FormData();
    for (const image of images) form.append("images", image, image.name);
    form.append("top_k", topK.value);
    results.replaceChildren(h("p", { class: "muted" }, `predicting ${images.length} image(s)…`));
    try {
      const answer = await api(`/v1/models/${id}/predict`, { method: "POST", body: form });
      results.replaceChildren(h("table", { "aria-label": "Predictions" },
        h("thead", {}, h("tr", {}, ["Image", "Predicted", "p", "Group", "Group accuracy %", "Group ECE %", "Top classes"]
          .map((t) => h("th", {}, t)))),
        h("tbody", {}, answer.predictions.map((p) => {
          const thumbnail = h("img", { src: URL.createObjectURL(images[p.index]), alt: images[p.index].name,
            width: 40, height: 40 });
          const best = p.predicted;
          return h("tr", {}, h("td", {}, thumbnail, " ", images[p.index].name), h("td", {}, best.label),
            h("td", { class: "num" }, best.probability.toFixed(3)),
            h("td", {}, h("span", { class: `swatch ${best.group}` }), best.group),
            h("td", { class: "num" }, pct(best.group_calibration.accuracy)),
            h("td", { class: "num" }, pct(best.group_calibration.ece)),
            h("td", {}, p.top_k.map((c) => `${c.label} ${c.probability.toFixed(2)}`).join(", ")));
        }))));
    } catch (error) {
      results.replaceChildren(h("p", { class: "error", role: "alert" }, `Prediction failed: ${error.message}`));
    }
  }

  ctx.show(h("h1", {}, title),
    h("div", { class: "panel" }, h("dl", { class: "facts" }, facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
      h("p"), h("div", { class: "actions" }, h("button", { type: "button", class: "primary", onclick: () =>
        download(model).catch((e) => say(e.message, true)) }, "Download ONNX"))),
    h("h2", {}, "Predict"), drop, results,
    h("h2", {}, "Reliability on the test split, per group"),
    h("p", { class: "muted" }, "Bars: accuracy of the images whose top probability falls in each bin; the dashed " +
      "diagonal is perfect calibration, the dark line marks the gap to the bin's mean confidence."),
    h("div", { class: "grid2" }, diagrams));
}

// ---------- datasets ----------

function groupSizes(d) {
  return GROUPS.map((g) => `${d.groups.filter((x) => x === g).length} ${g}`).join(", ");
}

async function viewDatasets(_, __, ctx) {
  document.title = "Datasets · H2T";
  const datasets = (await api("/v1/datasets?limit=500")).data;
  const sum = (xs) => xs.reduce((a, b) => a + b, 0);
  ctx.show(h("h1", {}, "Datasets"), h("table", { "aria-label": "Datasets" },
    h("thead", {}, h("tr", {}, ["Name", "Kind", "Status", "Classes", "Train images", "Test images", "Groups", "Created"]
      .map((t, i) => h("th", { class: i >= 3 && i <= 5 ? "num" : null }, t)))),
    h("tbody", {}, datasets.length ? datasets.map((d) => h("tr", {},
      h("td", {}, h("a", { href: `#/datasets/${d.id}`, class: "name", title: d.name }, d.name)), h("td", {}, d.kind),
      h("td", {}, statusBadge(d.status)),
      h("td", { class: "num" }, d.num_classes), h("td", { class: "num" }, sum(d.train_counts)),
      h("td", { class: "num" }, sum(d.test_counts)), h("td", {}, d.groups.length ? groupSizes(d) : ""),
      h("td", {}, when(d.created_at)))) : [h("tr", {}, h("td", { colspan: 8, class: "empty" },
      "No datasets yet: `h2t datasets create` or POST /v1/datasets."))])));
}

function single(figure) {  // a chart alone on its row keeps a readable size
  figure.classList.add("single");
  return figure;
}

async function viewDataset([id], _, ctx) {
  const d = await api(`/v1/datasets/${id}`);
  document.title = `${d.name} · H2T`;
  const definition = d.group_definition.slices
    ? `index slices ${d.group_definition.slices.map(([a, b]) => `[${a}, ${b})`).join(", ")}`
    : `training counts: many > ${d.group_definition.many_threshold}, few < ${d.group_definition.few_threshold}`;
  const sum = (xs) => xs.reduce((a, b) => a + b, 0);
  const members = (g) => d.groups.map((x, i) => (x === g ? i : -1)).filter((i) => i >= 0);
  const ratio = d.train_counts.length ? Math.max(...d.train_counts) / Math.max(1, Math.min(...d.train_counts)) : 0;
  const classes = h("details", {}, h("summary", {}, `The ${d.num_classes} classes`),
    h("table", { "aria-label": "Classes" }, h("thead", {}, h("tr", {}, ["index", "class", "group", "train images",
      "test images"].map((t, i) => h("th", { class: i >= 3 || i === 0 ? "num" : null }, t)))),
    h("tbody", {}, d.class_names.map((name, i) => h("tr", {}, h("td", { class: "num" }, i), h("td", {}, name),
      h("td", {}, h("span", { class: `swatch ${d.groups[i]}` }), d.groups[i]),
      h("td", { class: "num" }, d.train_counts[i]), h("td", { class: "num" }, d.test_counts[i]))))));
  ctx.show(h("h1", {}, d.name, " ", statusBadge(d.status)),
    h("div", { class: "panel" }, h("dl", { class: "facts" }, [
      ["id", d.id], ["kind", d.kind], ["spec", JSON.stringify(d.spec)], ["image size", `${d.image_size} px`],
      ["classes", d.num_classes], ["imbalance", ratio ? `largest / smallest class: ${ratio.toFixed(1)}` : "–"],
      ["groups", definition], ["unreadable files", d.unreadable_count], ...(d.error ? [["error", d.error]] : []),
    ].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]))),
    d.status === "ready" ? h("div", {},
      single(Charts.classCounts({ key: "class-counts", title: "Training images per class, coloured by group",
        counts: d.train_counts, groups: d.groups, names: d.class_names })),
      h("h2", {}, "Groups"),
      h("table", {}, h("thead", {}, h("tr", {}, ["group", "classes", "train images", "test images"]
        .map((t, i) => h("th", { class: i ? "num" : null }, t)))),
      h("tbody", {}, GROUPS.map((g) => h("tr", {}, h("td", {}, h("span", { class: `swatch ${g}` }), g),
        h("td", { class: "num" }, members(g).length), h("td", { class: "num" }, sum(members(g).map((i) => d.train_counts[i]))),
        h("td", { class: "num" }, sum(members(g).map((i) => d.test_counts[i]))))))), classes) : "");
  if (d.status === "scanning") ctx.every(2000, () => route());
}

// ---------- routing ----------

const ROUTES = [
  [/^#\/runs\/?$/, viewRuns, "runs"],
  [/^#\/runs\/([\w-]+)$/, viewRun, "runs"],
  [/^#\/compare$/, viewCompare, "runs"],
  [/^#\/models\/?$/, viewModels, "models"],
  [/^#\/models\/([\w.@%-]+)$/, viewModel, "models"],
  [/^#\/datasets\/?$/, viewDatasets, "datasets"],
  [/^#\/datasets\/([\w-]+)$/, viewDataset, "datasets"],
];

async function route() {
  for (const stop of leaving) stop();
  leaving = [];
  const token = ++routeToken;
  if (!apiKey()) return renderLogin();
  document.getElementById("sign-out").hidden = false;
  const [path, query] = (location.hash || "#/runs").split("?");
  const params = new URLSearchParams(query || "");
  const found = ROUTES.find(([pattern]) => pattern.test(path));
  if (!found) { location.hash = "#/runs"; return; }
  const [pattern, render, section] = found;
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === section) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const ctx = viewContext(token);
  try {
    await render(pattern.exec(path).slice(1), params, ctx);
  } catch (error) {
    if (error instanceof Stale || ctx.stale()) return;  // the user has moved on
    if (error instanceof ApiError && (error.status === 401 || error.status === 0)) return;  // already said
    document.title = "Error · H2T";
    ctx.show(h("h1", {}, "Something went wrong"), h("p", { role: "alert" }, error.message),
      h("p", {}, h("a", { href: "#/runs" }, "Back to the runs")));
  }
}

let lastPath = null;
window.addEventListener("hashchange", () => {
  const path = location.hash.split("?")[0];
  if (path !== lastPath || flashed) say(flashed || "");
  flashed = null;
  lastPath = path;
  route().then(() => viewRoot.focus({ preventScroll: true }));
});
document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
route();
