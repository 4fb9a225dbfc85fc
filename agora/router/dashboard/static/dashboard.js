// Agora gateway dashboard: reads /dashboard/events (server-sent events, one snapshot per tick) and
// draws it. No framework, no CDN. Every value from the server goes into the page as text, never as
// markup: model names, tenants and audited prompts cannot inject anything.
"use strict";

const $ = (id) => document.getElementById(id);
let source = null;
let retryTimer = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const fmt = {
  int: (v) => (v === null || v === undefined ? "-" : Math.round(v).toLocaleString("en-US")),
  pct: (v) => (v === null || v === undefined ? "-" : (v * 100).toFixed(1) + "%"),
  ms: (v) => (v === null || v === undefined ? "-" : v < 10 ? v.toFixed(2) : v.toFixed(0)),
  time: (t) => new Date(t * 1000).toLocaleTimeString("en-GB"),
  dur: (s) => {
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    return h ? `${h}h ${m}m` : m ? (s % 60 ? `${m}m ${s % 60}s` : `${m}m`) : `${s}s`;
  },
};

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text;
  s.className = "status " + (kind || "");
}

function cell(field, value, cls) {
  return el("td", { "data-field": field, class: cls || "num" }, value);
}

function fillTable(id, rows, makeRow) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows.map(makeRow));
}

function fillCounts(name, counts) {
  const dl = document.querySelector(`dl[data-semantic="${name}"]`);
  const entries = Object.entries(counts || {}).sort((a, b) => b[1] - a[1]);
  dl.replaceChildren(...entries.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-key": k }, fmt.int(v))]));
  if (!entries.length) dl.replaceChildren(el("dt", { class: "muted" }, "none yet"));
}

function candidate(c) {
  const parts = Object.entries(c.scores).map(([k, v]) => `${k.replace(/-scorer$/, "")} ${v.toFixed(2)}`);
  return el("span", { class: "cand" }, el("b", {}, c.endpoint), ` ${c.total.toFixed(3)}`,
    parts.length ? ` (${parts.join(", ")})` : "");
}

function state(ep) {
  if (ep.ejected) return el("span", { class: "pill bad" }, `ejected ${ep.ejected_for_s}s`);
  if (!ep.healthy) return el("span", { class: "pill bad" }, "unhealthy");
  return el("span", { class: "pill ok" }, "healthy");
}

// -- charts: a few lines over time on a canvas --------------------------------------------------

const COLORS = ["#2563eb", "#d64545", "#d69e2e", "#7c3aed", "#1f9d55", "#0891b2"];

function chart(canvas, start, step, lines) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(w * ratio)) { canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio); }
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, w, h);
  const left = 44, right = 8, top = 18, bottom = 18;
  const n = Math.max(...lines.map((l) => l.values.length), 2);
  let max = 0;
  for (const l of lines) for (const v of l.values) if (v !== null && v > max) max = v;
  max = niceMax(max);
  g.font = "11px system-ui, sans-serif";
  g.strokeStyle = "#e2e5ea"; g.fillStyle = "#6b7382"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + ((h - top - bottom) * i) / 4;
    g.beginPath(); g.moveTo(left, y); g.lineTo(w - right, y); g.stroke();
    g.fillText(shortNum(max * (1 - i / 4)), 2, y + 4);
  }
  const span = n * step;
  g.fillText(`-${fmt.dur(span)}`, left, h - 4);
  g.fillText("now", w - right - 22, h - 4);
  const x = (i) => left + ((w - left - right) * i) / (n - 1);
  const y = (v) => top + (h - top - bottom) * (1 - v / max);
  let lx = left;
  lines.forEach((l, k) => {
    g.strokeStyle = COLORS[k % COLORS.length]; g.lineWidth = 1.5;
    g.beginPath();
    let drawing = false;
    l.values.forEach((v, i) => {
      if (v === null) { drawing = false; return; }
      if (!drawing) { g.moveTo(x(i), y(v)); drawing = true; } else g.lineTo(x(i), y(v));
    });
    g.stroke();
    g.fillStyle = COLORS[k % COLORS.length];
    l.values.forEach((v, i) => {  // a point with no neighbour would not show as a line
      const alone = v !== null && (i === 0 || l.values[i - 1] === null) && (i === l.values.length - 1 || l.values[i + 1] === null);
      if (alone) { g.beginPath(); g.arc(x(i), y(v), 2.5, 0, 2 * Math.PI); g.fill(); }
    });
    g.fillStyle = COLORS[k % COLORS.length];
    g.fillRect(lx, 5, 10, 3);
    g.fillStyle = "#1d2330";
    g.fillText(l.name, lx + 13, 11);
    lx += g.measureText(l.name).width + 28;
  });
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function shortNum(v) {
  if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (v >= 1e3) return (v / 1e3).toFixed(1) + "k";
  if (Number.isInteger(v)) return String(v);
  return v >= 10 ? v.toFixed(1) : v.toFixed(v >= 1 ? 1 : 2);
}

// -- one snapshot -> the page ------------------------------------------------------------------

function render(s) {
  const gw = s.gateway;
  $("gateway-info").textContent = `v${gw.version} · profile ${gw.profile} · up ${fmt.dur(gw.uptime_s)}` +
    ` · ${gw.keys ? "API keys" : "no keys"}${gw.fairness ? " · fair queue" : ""}${gw.store ? " · store " + gw.store : ""}`;
  $("updated").textContent = "updated " + fmt.time(s.time);
  $("logout").hidden = !gw.keys;
  const t = s.totals;
  $("total-requests").textContent = fmt.int(t.requests);
  $("total-rejected").textContent = fmt.int(t.rejected);
  $("total-errors").textContent = fmt.int(t.errors);
  $("total-retries").textContent = fmt.int(t.retries);
  $("total-prefix").textContent = fmt.pct(t.prefix_hit_ratio);
  const last10 = s.series.requests.slice(-11, -1);
  $("rate-requests").textContent = (last10.reduce((a, b) => a + b, 0) / 10).toFixed(1);
  const lm = s.latency.last_minute;
  $("ttft-summary").textContent = `${fmt.ms(lm.ttft.p50)} / ${fmt.ms(lm.ttft.p95)}`;
  $("itl-summary").textContent = `${fmt.ms(lm.itl.p50)} / ${fmt.ms(lm.itl.p95)}`;

  fillTable("endpoints", s.endpoints, (ep) => el("tr", { "data-endpoint": ep.name },
    el("td", { "data-field": "name", title: ep.url }, ep.name),
    el("td", { "data-field": "models" }, ep.models.join(", ")),
    el("td", { "data-field": "state" }, state(ep)),
    cell("in_flight", ep.in_flight), cell("running", ep.has_metrics ? ep.running : "-"),
    cell("waiting", ep.has_metrics ? ep.waiting : "-"), cell("kv_usage", ep.has_metrics ? fmt.pct(ep.kv_usage) : "-"),
    cell("prefix_hit_ratio", fmt.pct(ep.prefix_hit_ratio)), cell("requests", fmt.int(ep.requests)),
    cell("errors", fmt.int(ep.errors))));

  const sr = s.series;
  chart($("chart-traffic"), sr.start, sr.step_s, [
    { name: "requests", values: sr.requests }, { name: "errors", values: sr.errors },
    { name: "rejected", values: sr.rejected }, { name: "retries", values: sr.retries }]);
  const lt = s.latency;
  chart($("chart-latency"), lt.start, lt.step_s, [
    { name: "TTFT p50", values: lt.ttft_p50 }, { name: "TTFT p95", values: lt.ttft_p95 },
    { name: "TTFT p99", values: lt.ttft_p99 }, { name: "ITL p50", values: lt.itl_p50 },
    { name: "ITL p95", values: lt.itl_p95 }]);

  fillTable("routing", s.routing.slice(0, 10), (r) => el("tr", { "data-request": r.request_id },
    el("td", {}, fmt.time(r.time)), el("td", {}, r.request_id.slice(0, 14)), el("td", {}, r.model || "-"),
    el("td", { "data-field": "endpoint" }, r.endpoint), cell("attempt", r.attempt + 1),
    el("td", {}, ...r.candidates.map(candidate))));

  const sem = s.semantic;
  $("semantic-off").hidden = sem.enabled;
  for (const name of ["decisions", "blocked", "cache", "pii"]) fillCounts(name, sem[name]);
  fillTable("semantic", sem.recent.slice(0, 10), (e) => el("tr", {},
    el("td", {}, fmt.time(e.time)), el("td", {}, e.request_id.slice(0, 14)), el("td", {}, e.decision),
    el("td", {}, e.model || "-"), el("td", {}, e.blocked ? el("span", { class: "pill bad" }, e.blocked) : "-"),
    el("td", {}, e.pii.join(", ") || "-"), cell("jailbreak", e.jailbreak === null ? "-" : e.jailbreak.toFixed(2)),
    cell("injection", e.injection === null ? "-" : e.injection.toFixed(2)),
    el("td", {}, e.flags.length ? el("span", { class: "pill warn" }, e.flags.join(" ")) : "-"),
    el("td", {}, e.cache || "-")));

  fillTable("tenants", s.tenants, (r) => el("tr", { "data-tenant": r.tenant },
    el("td", { "data-field": "tenant" }, r.tenant), cell("requests", fmt.int(r.requests)),
    cell("tokens_in", fmt.int(r.tokens_in)), cell("tokens_out", fmt.int(r.tokens_out)),
    cell("budget_left", r.budget_tokens === null ? "no budget" : `${fmt.int(r.budget_left)} of ${fmt.int(r.budget_tokens)}`),
    cell("throttled", fmt.int(r.throttled)), cell("blocked", fmt.int(r.blocked)), cell("errors", fmt.int(r.errors)),
    cell("weight", r.weight === null ? "-" : r.weight)));

  const au = s.audit;
  $("audit-note").textContent = au.enabled ? (au.content ? "prompts are kept (audit.include_content)" :
    "latest records; no prompt text is kept") : "the audit is off";
  fillTable("audit", au.recent.slice(0, 15), (r) => el("tr", { "data-request": r.request_id },
    el("td", {}, fmt.time(r.time)), el("td", {}, r.tenant || "-"), el("td", {}, r.key_id || "-"), el("td", {}, r.api),
    el("td", {}, r.model_served || r.model_requested || "-"), el("td", {}, r.endpoint || "-"),
    cell("status", r.status), cell("tokens", `${fmt.int(r.tokens_in)} / ${fmt.int(r.tokens_out)}`),
    cell("ttft", fmt.ms(r.ttft_ms)), cell("latency", fmt.ms(r.latency_ms)), el("td", {}, r.reason || "")));
}

// -- connection, login ---------------------------------------------------------------------------

function showLogin(message) {
  if (source) { source.close(); source = null; }
  $("panels").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  if (message) $("login-message").textContent = message;
  setStatus("log in", "down");
  $("login-key").focus();
}

async function start() {
  clearTimeout(retryTimer);
  let resp;
  try {
    resp = await fetch("/dashboard/snapshot", { credentials: "same-origin", cache: "no-store" });
  } catch (e) {
    setStatus("gateway unreachable", "down");
    retryTimer = setTimeout(start, 3000);
    return;
  }
  if (resp.status === 401 || resp.status === 403) {
    const body = await resp.json().catch(() => ({}));
    showLogin((body.error && body.error.message) || "The dashboard needs an admin key.");
    return;
  }
  if (!resp.ok) {
    setStatus(`error ${resp.status}`, "down");
    retryTimer = setTimeout(start, 3000);
    return;
  }
  $("login").hidden = true;
  $("panels").hidden = false;
  render(await resp.json());
  connect();
}

function connect() {
  if (source) source.close();
  source = new EventSource("/dashboard/events");
  source.addEventListener("snapshot", (e) => {
    setStatus("live", "live");
    render(JSON.parse(e.data));
  });
  source.addEventListener("ended", (e) => {
    const why = JSON.parse(e.data);
    source.close();
    source = null;
    if (why.relogin) { showLogin("The dashboard session has ended: log in again."); return; }
    setStatus(why.reason, "down");  // e.g. the gateway is restarting: try again shortly
    retryTimer = setTimeout(start, 3000);
  });
  source.onerror = () => {
    setStatus("reconnecting", "down");
    if (source && source.readyState === EventSource.CLOSED) {  // refused (e.g. a revoked key): ask again
      source = null;
      retryTimer = setTimeout(start, 2000);
    }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = $("login-key").value.trim();
    $("login-error").textContent = "";
    const resp = await fetch("/dashboard/login", { method: "POST", credentials: "same-origin",
      headers: { Authorization: "Bearer " + key } }).catch(() => null);
    $("login-key").value = "";
    if (!resp || resp.status !== 204) {
      const body = resp ? await resp.json().catch(() => ({})) : {};
      $("login-error").textContent = (body.error && body.error.message) || "the gateway did not answer";
      return;
    }
    $("logout").hidden = false;
    start();
  });
  $("logout").addEventListener("click", async () => {
    await fetch("/dashboard/logout", { method: "POST", credentials: "same-origin" }).catch(() => null);
    showLogin("Logged out.");
  });
  start();
});
