// Ferrule's dashboard: polls the controller's /api/v1/overview (and /api/v1/traces) and draws
// the topology, golden metrics, endpoints, proxies and recent traces. Plain DOM and SVG, no
// library; every value from the API goes in through textContent or an attribute, never HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 2000;
const TRACES_POLL_MS = 5000;

function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const pct = (v) => (v === null || v === undefined ? "–" : (v * 100).toFixed(2) + "%");
const ms = (v) => (v === null || v === undefined ? "–" : v.toFixed(1) + "ms");
const rps = (v) => (v === null || v === undefined ? "–" : v.toFixed(1));
function health(rate) {
  if (rate === null || rate === undefined) return "";
  return rate >= 0.99 ? "ok" : rate >= 0.95 ? "warn" : "bad";
}
function ago(unixSeconds) {
  const s = Math.max(0, Math.round(Date.now() / 1000 - unixSeconds));
  return s < 90 ? s + "s ago" : s < 5400 ? Math.round(s / 60) + "m ago" : Math.round(s / 3600) + "h ago";
}
function until(unixSeconds) {
  const s = Math.round(unixSeconds - Date.now() / 1000);
  if (s <= 0) return "expired";
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h > 0 ? `${h}h ${m}m` : `${m}m`;
}

function fillBody(table, rows) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows);
}

// ---- topology ------------------------------------------------------------------------------

function drawTopology(overview) {
  const svg = document.getElementById("topology");
  const names = new Set();
  for (const s of overview.services) names.add(s.service);
  for (const e of overview.edges) { names.add(e.caller); names.add(e.callee); }
  for (const p of overview.proxies) if (p.service) names.add(p.service);

  // Layers: a node sits one column right of its furthest caller (cycles stop at |nodes|).
  const depth = new Map([...names].map((n) => [n, 0]));
  for (let i = 0; i < names.size; i++) {
    let changed = false;
    for (const e of overview.edges) {
      if (e.caller !== e.callee && depth.get(e.callee) < depth.get(e.caller) + 1 && depth.get(e.caller) + 1 < names.size) {
        depth.set(e.callee, depth.get(e.caller) + 1);
        changed = true;
      }
    }
    if (!changed) break;
  }
  const columns = [];
  for (const n of [...names].sort()) {
    const d = depth.get(n);
    (columns[d] = columns[d] || []).push(n);
  }
  const W = 150, H = 40, COL = 260, ROW = 90, PAD = 30;
  const pos = new Map();
  const rowsMax = Math.max(1, ...columns.map((c) => (c ? c.length : 0)));
  columns.forEach((col, d) => (col || []).forEach((n, i) => {
    const offset = ((rowsMax - col.length) * ROW) / 2;
    pos.set(n, { x: PAD + d * COL, y: PAD + offset + i * ROW });
  }));
  const width = PAD * 2 + Math.max(0, columns.length - 1) * COL + W;
  const height = PAD * 2 + (rowsMax - 1) * ROW + H;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("height", String(Math.min(480, Math.max(160, height))));

  const defs = el("svg:defs", {},
    el("svg:marker", { id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "8", markerHeight: "8", orient: "auto-start-reverse" },
      el("svg:path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#6b7379" })));
  const edges = overview.edges.filter((e) => e.caller !== e.callee && pos.has(e.caller) && pos.has(e.callee)).map((e) => {
    const a = pos.get(e.caller), b = pos.get(e.callee);
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
    const label = `${pct(e.success_rate)} · ${rps(e.rps)} rps`;
    return el("svg:g", {
      class: "edge " + health(e.success_rate),
      "data-caller": e.caller, "data-callee": e.callee,
      "data-rps": e.rps, "data-success-rate": e.success_rate ?? "",
    },
      el("svg:line", { x1, y1, x2, y2, "marker-end": "url(#arrow)" }),
      el("svg:text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6 }, label),
      el("svg:title", {}, `${e.caller} → ${e.callee}: ${label}, p99 ${ms(e.p99_ms)}`));
  });
  const services = new Map(overview.services.map((s) => [s.service, s]));
  const nodes = [...pos.entries()].map(([name, p]) => {
    const s = services.get(name);
    return el("svg:g", { class: "node", "data-service": name, transform: `translate(${p.x},${p.y})` },
      el("svg:rect", { width: W, height: H, rx: 6 }),
      el("svg:text", { x: W / 2, y: H / 2 }, name),
      el("svg:title", {}, s ? `${name}: ${pct(s.success_rate)}, ${rps(s.rps)} rps, p99 ${ms(s.p99_ms)}` : name));
  });
  svg.replaceChildren(defs, ...edges, ...nodes);
}

// ---- services, endpoints, proxies -------------------------------------------------------------

function spark(points, value, max) {
  const w = 120, h = 24;
  const svg = el("svg:svg", { class: "spark", width: w, height: h, viewBox: `0 0 ${w} ${h}` });
  const vals = points.map(value).filter((v) => v !== null && v !== undefined);
  if (points.length < 2 || vals.length === 0) return svg;
  const t0 = points[0].t, t1 = points[points.length - 1].t;
  const top = max ?? Math.max(...vals, 1e-9);
  const coords = points
    .filter((p) => value(p) !== null && value(p) !== undefined)
    .map((p) => `${((p.t - t0) / Math.max(1, t1 - t0)) * w},${h - 2 - (value(p) / top) * (h - 4)}`);
  svg.append(el("svg:polyline", { points: coords.join(" ") }));
  return svg;
}

function drawServices(overview) {
  fillBody(document.getElementById("services"), overview.services.map((s) => el("tr", { "data-service": s.service },
    el("td", {}, s.service),
    el("td", { class: "num" }, s.proxies),
    el("td", { class: "num " + health(s.success_rate) }, pct(s.success_rate)),
    el("td", { class: "num" }, rps(s.rps)),
    el("td", { class: "num" }, ms(s.p50_ms)),
    el("td", { class: "num" }, ms(s.p95_ms)),
    el("td", { class: "num" }, ms(s.p99_ms)),
    el("td", {}, spark(s.history, (p) => p.rps)),
    el("td", {}, spark(s.history, (p) => p.success_rate, 1)))));
}

function drawEndpoints(overview) {
  fillBody(document.getElementById("endpoints"), overview.endpoints.map((e) => el("tr", {},
    el("td", { title: e.proxy_id }, e.caller),
    el("td", {}, e.target_service),
    el("td", {}, e.endpoint),
    el("td", { class: e.breaker === "open" ? "bad" : e.breaker === "half_open" ? "warn" : "ok", "data-breaker": e.breaker ?? "" }, e.breaker ?? "–"),
    el("td", { class: "num" }, ms(e.ewma_ms)))));
}

function drawProxies(overview) {
  const current = overview.config_version;
  fillBody(document.getElementById("proxies"), overview.proxies.map((p) => {
    let config = current === 0 ? "no config applied" : p.acked_version > 0 ? `v${p.acked_version}` : "not acked";
    let cls = p.acked_version === current ? "ok" : "warn";
    if (p.nacked_version > 0 && p.nacked_version >= p.acked_version) {
      config += ` (refused v${p.nacked_version}: ${p.nack_reason})`;
      cls = "bad";
    }
    // The certificate the proxy reported wins over the expiry read from its metrics.
    const c = p.certificate;
    let cert = p.certificate_expiry ? until(p.certificate_expiry) : p.scrape_error ? "unreadable" : "no identity";
    let certCls = p.scrape_error ? "bad" : "";
    if (c) cert = c.identity ? until(c.not_after) : "no certificate yet";
    if (c && c.problem) certCls = c.problem === "expires_soon" ? "warn" : "bad";
    const certTitle = c && c.problem ? `${c.problem_text}: ${c.fix}` : (c && c.identity) || "";
    const anchor = c && c.anchor_fingerprint ? c.anchor_fingerprint.slice(0, 16) : "–";
    return el("tr", { "data-proxy": p.proxy_id, title: p.scrape_error || `seen ${ago(p.last_seen)}` },
      el("td", {}, p.proxy_id),
      el("td", {}, p.service),
      el("td", {}, p.mode),
      el("td", { class: cls }, config),
      el("td", { class: c && c.problem === "unknown_anchor" ? "bad" : "", title: c ? c.anchor_fingerprint : "" }, anchor),
      el("td", { class: certCls, title: certTitle, "data-problem": (c && c.problem) || "" }, cert));
  }));
}

// ---- traces -------------------------------------------------------------------------------

async function showTrace(id) {
  const box = document.getElementById("waterfall");
  const rsp = await fetch(`/api/v1/traces/${id}`);
  const trace = await rsp.json();
  if (!rsp.ok) { box.replaceChildren(el("p", { class: "bad" }, trace.error || rsp.statusText)); return; }
  const spans = trace.spans || [];
  const start = Math.min(...spans.map((s) => s.start_unix_nano));
  const end = Math.max(...spans.map((s) => s.end_unix_nano));
  const total = Math.max(1, end - start);
  const byParent = new Map();
  const ids = new Set(spans.map((s) => s.span_id));
  for (const s of spans) {
    const parent = ids.has(s.parent_span_id) ? s.parent_span_id : null;
    (byParent.get(parent) || byParent.set(parent, []).get(parent)).push(s);
  }
  const rows = [];
  const walk = (parent, depth) => {
    for (const s of (byParent.get(parent) || []).sort((a, b) => a.start_unix_nano - b.start_unix_nano)) {
      const bar = el("span", { class: s.status === "error" ? "error" : "" });
      bar.style.left = ((s.start_unix_nano - start) / total) * 100 + "%";
      bar.style.width = ((s.end_unix_nano - s.start_unix_nano) / total) * 100 + "%";
      const name = el("td", {}, `${s.kind} ${s.name}`);
      name.style.paddingLeft = depth * 1.2 + "em";
      rows.push(el("tr", {},
        el("td", {}, s.service), name,
        el("td", { class: "num" }, "+" + ((s.start_unix_nano - start) / 1e6).toFixed(1) + "ms"),
        el("td", { class: "num" }, ((s.end_unix_nano - s.start_unix_nano) / 1e6).toFixed(1) + "ms"),
        el("td", {}, el("div", { class: "bar" }, bar))));
      walk(s.span_id, depth + 1);
    }
  };
  walk(null, 0);
  box.replaceChildren(el("h2", {}, `trace ${id}`), el("table", {},
    el("thead", {}, el("tr", {}, ...["service", "span", "start", "duration", ""].map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows)));
}

async function pollTraces() {
  const note = document.getElementById("traces-note");
  try {
    const rsp = await fetch("/api/v1/traces");
    const body = await rsp.json();
    if (!rsp.ok) {
      note.textContent = body.error || rsp.statusText;
      fillBody(document.getElementById("traces"), []);
      return;
    }
    note.textContent = body.traces.length ? "click a trace for its waterfall" : "no traces yet: send a request through the gateway";
    fillBody(document.getElementById("traces"), body.traces.map((t) => {
      const row = el("tr", { "data-trace": t.trace_id },
        el("td", {}, t.trace_id.slice(0, 16) + "…"),
        el("td", {}, `${t.root_service}: ${t.root_name}`),
        el("td", {}, t.services.join(", ")),
        el("td", { class: "num" }, t.spans),
        el("td", { class: "num " + (t.errors ? "bad" : "") }, t.errors),
        el("td", { class: "num" }, (t.duration_nano / 1e6).toFixed(1) + "ms"),
        el("td", {}, ago(t.start_unix_nano / 1e9)));
      row.addEventListener("click", () => showTrace(t.trace_id));
      return row;
    }));
  } catch (e) {
    note.textContent = "traces: " + e;
  }
}

// ---- polling ------------------------------------------------------------------------------

async function poll() {
  const status = document.getElementById("status");
  try {
    const rsp = await fetch("/api/v1/overview");
    const overview = await rsp.json();
    if (!rsp.ok) throw new Error(overview.error || rsp.statusText);
    document.getElementById("config-version").textContent = `config v${overview.config_version}`;
    drawTopology(overview);
    drawServices(overview);
    drawEndpoints(overview);
    drawProxies(overview);
    const unreadable = overview.proxies.filter((p) => p.scrape_error).length;
    status.textContent = (overview.window_seconds > 0
      ? `rates over the last ${overview.window_seconds.toFixed(1)}s`
      : "first look: rates from the next refresh on")
      + ` · ${overview.proxies.length} proxies` + (unreadable ? ` (${unreadable} unreadable)` : "")
      + ` · updated ${new Date(overview.generated_at).toLocaleTimeString()}`;
    document.body.dataset.updated = String(overview.generated_at);
  } catch (e) {
    status.textContent = "cannot read the controller: " + e.message;
  }
}

function start() {
  poll();
  pollTraces();
  setInterval(poll, POLL_MS);
  setInterval(pollTraces, TRACES_POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
