// pfmon console: one page, hash routes (#/, #/alarms, #/history, #/bank/NAME),
// live data by Server-Sent Events from /api/live. Plain JS, no libraries.
"use strict";

const S = {
  site: null, me: { user: null, csrf: null, open_read: false },
  data: { meters: {}, status: {}, alarms: [], recent: [], banks: {}, gateways: {}, maintenance: {} },
  es: null, route: "", built: "",
};

const $ = (sel, root = document) => root.querySelector(sel);
function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids) if (kid !== null && kid !== undefined) e.append(kid);
  return e;
}
const fmt = (x, d) => (x === null || x === undefined || !isFinite(x)) ? "–" : Number(x).toFixed(d);
const ago = (t) => {
  const s = Math.max(0, Date.now() / 1000 - t);
  return s < 90 ? `${s.toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago` : new Date(t * 1000).toLocaleString();
};
const when = (t) => new Date(t * 1000).toLocaleString();

function flash(text, error = false) {
  const f = $("#flash");
  f.textContent = text;
  f.className = error ? "error" : "";
}

async function api(path, opts = {}) {
  const headers = { "Accept": "application/json" };
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  if (opts.method === "POST" && S.me.csrf) headers["X-CSRF-Token"] = S.me.csrf;
  const resp = await fetch(path, {
    method: opts.method || "GET", headers, credentials: "same-origin",
    body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
  });
  let data = null;
  try { data = await resp.json(); } catch (_) { data = null; }
  return { ok: resp.ok, status: resp.status, data };
}

async function act(path, body) {
  if (!S.me.user) { flash("Log in to do that.", true); return false; }
  const r = await api(path, { method: "POST", body });
  if (!r.ok) { flash(`Refused: ${(r.data && r.data.error) || r.status}`, true); return false; }
  flash(r.data.done);
  return true;
}

// -- session ---------------------------------------------------------------------------

async function loadMe() {
  const r = await api("/api/me");
  if (r.ok) S.me = r.data;
  const logged = !!S.me.user;
  $("#login-form").hidden = logged;
  $("#whoami").hidden = !logged;
  $("#logout").hidden = !logged;
  $("#whoami").textContent = logged ? `operator: ${S.me.user}` : "";
  document.body.classList.toggle("can-act", logged);
}

async function login(ev) {
  ev.preventDefault();
  const r = await api("/api/login", { method: "POST", body: {
    user: $("#login-user").value, password: $("#login-password").value } });
  $("#login-password").value = "";
  if (!r.ok) { flash((r.data && r.data.error) || "login failed", true); return; }
  flash(`Logged in as ${r.data.user}.`);
  await loadMe();
  await start();
}

async function logout() {
  await api("/api/logout", { method: "POST", body: {} });
  S.me = { user: null, csrf: null, open_read: S.me.open_read };
  await loadMe();
  flash("Logged out.");
  S.built = "";
  render();
}

// -- live data -------------------------------------------------------------------------

function merge(frame, full) {
  const d = S.data;
  if (full) {
    Object.assign(d, frame);
    return;
  }
  if (frame.meters) Object.assign(d.meters, frame.meters);
  if (frame.status) Object.assign(d.status, frame.status);
  for (const k of ["alarms", "recent", "banks", "gateways", "maintenance"]) if (frame[k]) d[k] = frame[k];
}

function connect() {
  if (S.es) S.es.close();
  const es = new EventSource("/api/live");
  S.es = es;
  es.addEventListener("snapshot", (e) => { merge(JSON.parse(e.data), true); render(); });
  es.addEventListener("update", (e) => { const f = JSON.parse(e.data); merge(f, false); update(f); });
  es.onopen = () => { $("#link").textContent = "live"; $("#link").className = "link-state live"; };
  es.onerror = () => { $("#link").textContent = "reconnecting"; $("#link").className = "link-state"; };
}

async function start() {
  const r = await api("/api/site");
  if (!r.ok) {
    $("#view").replaceChildren(el("p", { class: "muted", text: "Log in to see this site." }));
    return;
  }
  S.site = r.data;
  $("#site-name").textContent = `${S.site.site}${S.site.description ? " – " + S.site.description : ""}`;
  const links = $("#bank-links");
  links.replaceChildren(...S.site.banks.map((b) => el("a", { href: `#/bank/${b.name}`, "data-nav": `bank-${b.name}`, text: `Bank ${b.name}` })));
  connect();
  render();
}

// -- views -----------------------------------------------------------------------------

// re-rendering a page keeps what the operator was typing (inputs with an id)
function keepInputs(view, build) {
  const kept = {};
  let focus = document.activeElement && document.activeElement.id;
  for (const i of view.querySelectorAll("input[id]")) kept[i.id] = i.value;
  build();
  for (const [id, v] of Object.entries(kept)) { const i = document.getElementById(id); if (i) i.value = v; }
  if (focus && document.getElementById(focus)) document.getElementById(focus).focus();
}

function render() {
  const route = location.hash.replace(/^#/, "") || "/";
  S.route = route;
  for (const a of document.querySelectorAll("nav a")) {
    const nav = a.getAttribute("data-nav");
    a.classList.toggle("active", (route === "/" && nav === "overview") || route === `/${nav}` ||
      route === `/bank/${nav.replace(/^bank-/, "")}`);
  }
  if (!S.site) return;
  if (route.startsWith("/bank/")) renderBank(decodeURIComponent(route.slice(6)));
  else if (route === "/alarms") renderAlarms();
  else if (route === "/history") renderHistory();
  else renderOverview();
  header();
}

function update(frame) {
  header();
  if (S.route === "/" || S.route === "") {
    const names = new Set([...Object.keys(frame.meters || {}), ...Object.keys(frame.status || {})]);
    for (const n of names) updateMeter(n);
    if (frame.alarms || frame.maintenance) for (const m of S.site.meters) updateMeter(m.name);
    if (frame.banks) for (const b of S.site.banks) updateBankBox(b.name);
  } else if (S.route.startsWith("/bank/") && frame.banks) renderBank(decodeURIComponent(S.route.slice(6)));
  else if (S.route === "/alarms" && (frame.alarms || frame.maintenance)) renderAlarms();
}

function header() {
  const n = S.data.alarms.filter((a) => !a.ack && !a.shelved && !a.maintenance).length;
  $("#alarm-count").textContent = n ? String(n) : "";
  const gw = S.site && S.data.gateways[S.site.gateway];
  const g = $("#gateway");
  g.textContent = gw ? `gateway ${S.site.gateway}: ${gw.status}` : "";
  g.className = "gateway" + (gw && gw.status === "offline" ? " offline" : "");
}

// overview: the switchboard as wired, billing points at the top, feeders below

function meterCard(m) {
  const card = el("div", { class: "meter", "data-meter": m.name },
    el("div", { class: "head" },
      el("span", {}, el("span", { class: "name", text: m.name }), " ", el("span", { class: "kind", text: m.kind })),
      el("span", { class: "state", "data-q": "state" })),
    el("div", { class: "vals" },
      ...quantity("pf", "PF", ""), ...quantity("kw", "P", "kW"),
      ...quantity("kvar", "Q", "kvar"), ...quantity("kva", "S", "kVA"),
      ...quantity("v", "U", "V"), ...quantity("a", "I", "A"),
      ...quantity("thd_i", "THD-I", "%"), ...quantity("load", "load", "")),
    el("div", { class: "maint", "data-q": "maint" }),
    el("div", { class: "alarms-inline", "data-q": "alarms" }));
  return card;
}

function quantity(key, label, unit) {
  return [el("span", { class: "u", text: label }),
    el("span", {}, el("span", { class: "v", "data-q": key, text: "–" }), unit ? el("span", { class: "u", text: ` ${unit}` }) : null)];
}

function bankBox(b) {
  return el("div", { class: "bank", "data-bank": b.name },
    el("a", { href: `#/bank/${b.name}`, text: `bank ${b.name}` }),
    el("div", { "data-q": "bank-summary", class: "muted", text: "–" }));
}

function renderOverview() {
  const view = $("#view");
  if (S.built !== "overview") {
    const byParent = {};
    for (const m of S.site.meters) (byParent[m.parent || ""] ||= []).push(m);
    const node = (m) => {
      const li = el("li", {}, el("div", { class: "row" }, meterCard(m),
        ...S.site.banks.filter((b) => b.meter === m.name).map(bankBox)));
      const kids = byParent[m.name] || [];
      if (kids.length) li.append(el("ul", {}, ...kids.map(node)));
      return li;
    };
    const roots = byParent[""] || [];
    view.replaceChildren(el("h2", { text: "Overview" }),
      el("p", { class: "muted", text: "Single-line view: billing points (utility supply) at the top, feeders below their parent; capacitor banks beside the meter they compensate. Grey = stale, red edge = alarm or offline." }),
      el("ul", { class: "tree", id: "single-line" }, ...roots.map(node)));
    S.built = "overview";
  }
  for (const m of S.site.meters) updateMeter(m.name);
  for (const b of S.site.banks) updateBankBox(b.name);
}

function updateMeter(name) {
  const card = document.querySelector(`.meter[data-meter="${CSS.escape(name)}"]`);
  if (!card) return;
  const d = S.data.meters[name];
  const [status, age] = S.data.status[name] || ["nodata", null];
  card.setAttribute("data-status", status);
  const st = $('[data-q="state"]', card);
  st.className = `state ${status}`;
  st.textContent = status === "live" ? "live" : status === "stale" ? `stale ${fmt(age, 0)} s`
    : status === "offline" ? "offline (gateway)" : "no data";
  const set = (k, text) => { $(`[data-q="${k}"]`, card).textContent = text; };
  if (d) {
    set("pf", fmt(d.pf, 3));
    $('[data-q="pf"]', card).classList.toggle("pf-low", d.pf !== null && Math.abs(d.pf) < S.site.pf_alert);
    set("kw", fmt(d.kw, 1));
    set("kvar", d.kvar !== null ? fmt(d.kvar, 1) : d.kvar_abs !== null ? `±${fmt(d.kvar_abs, 1)}` : "–");
    set("kva", fmt(d.kva, 1));
    set("v", d.v.length ? d.v.map((x) => fmt(x, 1)).join(" / ") : "–");
    set("a", d.a.length ? d.a.map((x) => fmt(x, 1)).join(" / ") : "–");
    set("thd_i", fmt(d.thd_i, 1));
    set("load", d.load);
  }
  const alarms = S.data.alarms.filter((a) => a.meter === name);
  card.classList.toggle("alarmed", alarms.some((a) => !a.ack && !a.shelved && !a.maintenance));
  $('[data-q="alarms"]', card).textContent = alarms.map((a) => `${a.code}${a.phase ? " " + a.phase : ""}${a.ack ? " (ack)" : ""}${a.shelved ? " (shelved)" : ""}`).join(", ");
  const mt = S.data.maintenance[name];
  $('[data-q="maint"]', card).textContent = mt ? `maintenance (${mt.user}): ${mt.reason}` : "";
}

function updateBankBox(name) {
  const box = document.querySelector(`.bank[data-bank="${CSS.escape(name)}"]`);
  const b = S.data.banks[name];
  if (!box || !b) return;
  const n = b.steps.filter((s) => s.in).length;
  $('[data-q="bank-summary"]', box).textContent =
    `${n} of ${b.steps.length} steps in, ${fmt(b.kvar_in, 1)} kvar · target PF ${b.target_pf} · ${b.mode}${b.online === false ? " · DEVICE OFFLINE" : ""}`;
}

// bank page

function renderBank(name) {
  const b = S.data.banks[name];
  const view = $("#view");
  S.built = `bank:${name}`;
  if (!b) { view.replaceChildren(el("p", { class: "muted", text: `No data for bank ${name} yet.` })); return; }
  const canAct = !!S.me.user;
  const manual = b.mode === "manual";
  const rows = b.steps.map((s) => el("tr", { "data-step": s.step, "data-in": String(!!s.in) },
    el("td", { class: "num", text: s.step }), el("td", { class: "num", text: fmt(s.kvar, 1) }),
    el("td", { class: "in", text: s.in === null || s.in === undefined ? "?" : s.in ? "in" : "out" }),
    el("td", { class: "num", text: s.operations }),
    el("td", { class: "num", text: `${fmt(s.wear_pct, 2)} %` }),
    el("td", { class: "lock", text: s.lockout_s ? `discharging, ${fmt(s.lockout_s, 0)} s left` : "" }),
    el("td", {},
      el("button", { class: "step-in", type: "button", disabled: !canAct || !manual || !!s.in,
        onclick: () => act(`/api/banks/${name}/step`, { step: s.step, on: true }), text: "in" }),
      " ",
      el("button", { class: "step-out", type: "button", disabled: !canAct || !manual || !s.in,
        onclick: () => act(`/api/banks/${name}/step`, { step: s.step, on: false }), text: "out" }))));
  const reason = el("input", { id: "maint-reason", placeholder: "reason (for maintenance)" });
  keepInputs(view, () => view.replaceChildren(
    el("h2", { text: `Bank ${b.name}` }),
    el("p", {}, `Compensates meter `, el("b", { text: b.meter }), ` · device ${b.device} · target PF ${b.target_pf} · `,
      `${fmt(b.kvar_in, 1)} kvar in · reconnection delay ${b.reconnect_delay_s} s · min interval ${b.min_interval_s} s · `,
      "mode: ", el("b", { id: "bank-mode", text: b.mode }),
      b.online === false ? el("b", { class: "pf-low", text: " · device offline" }) : null),
    el("div", { class: "form-line" },
      el("button", { id: "mode-manual", type: "button", disabled: !canAct || manual,
        onclick: () => act(`/api/banks/${name}/mode`, { mode: "manual" }), text: "Manual mode" }),
      el("button", { id: "mode-auto", type: "button", disabled: !canAct || b.mode === "auto",
        onclick: () => act(`/api/banks/${name}/mode`, { mode: "auto" }), text: "Back to automatic" }),
      reason,
      el("button", { id: "maint-on", type: "button", disabled: !canAct || b.mode === "maintenance",
        onclick: () => act("/api/maintenance", { bank: name, on: true, reason: reason.value }), text: "Maintenance (hold)" }),
      canAct ? null : el("span", { class: "muted", text: "Log in to switch." })),
    el("table", { id: "steps" },
      el("tr", {}, ...["step", "kvar", "state", "operations", "wear", "lockout", "manual"].map((h) => el("th", { text: h }))),
      ...rows),
    el("h2", { text: "Controller decisions" }),
    el("table", { id: "decisions" },
      el("tr", {}, ...["when", "coil", "to", "origin", "reason"].map((h) => el("th", { text: h }))),
      ...b.commands.map((c) => el("tr", {}, el("td", { text: when(c.ts) }), el("td", { class: "num", text: c.address }),
        el("td", { text: c.value ? "in" : "out" }), el("td", { text: c.origin + (c.dry_run ? " (dry run)" : "") }),
        el("td", { text: c.reason })))),
    el("h2", { text: "Bank events" }),
    el("table", { id: "bank-events" },
      el("tr", {}, ...["when", "code", "message"].map((h) => el("th", { text: h }))),
      ...b.events.map((e) => el("tr", { class: e.severity, "data-code": e.code }, el("td", { text: when(e.ts) }),
        el("td", { text: e.code }), el("td", { text: e.message }))))));
}

// alarms

function renderAlarms() {
  const view = $("#view");
  S.built = "alarms";
  const canAct = !!S.me.user;
  const active = S.data.alarms.map((a) => {
    const why = el("input", { class: "shelve-reason", id: `why-${a.id}`, placeholder: "reason" });
    const mins = el("input", { class: "shelve-minutes", id: `min-${a.id}`, type: "number", min: "1", value: "60", size: "4" });
    const ev = Object.entries(a.evidence || {}).map(([k, v]) => `${k}=${v}`).join(", ");
    return el("tr", { class: `alarm ${a.severity}`, "data-alarm": a.id },
      el("td", { text: a.severity }), el("td", { text: a.meter }), el("td", { text: a.code + (a.phase ? ` ${a.phase}` : "") }),
      el("td", { text: ago(a.since) }), el("td", { text: a.message }), el("td", { class: "muted", text: ev }),
      el("td", { class: "ack-state", text: a.ack ? `acknowledged by ${a.ack.user}` : a.shelved ? `shelved by ${a.shelved.user} until ${when(a.shelved.until)}: ${a.shelved.reason}` : a.maintenance ? "meter in maintenance" : "" }),
      el("td", {},
        el("button", { class: "ack", type: "button", disabled: !canAct || !!a.ack,
          onclick: () => act("/api/alarms/ack", { meter: a.meter, code: a.code, phase: a.phase }), text: "Acknowledge" }),
        " ", mins, "min ", why,
        el("button", { class: "shelve", type: "button", disabled: !canAct,
          onclick: () => act("/api/alarms/shelve", { meter: a.meter, code: a.code, phase: a.phase, minutes: Number(mins.value), reason: why.value }), text: "Shelve" })));
  });
  const maintRows = S.site.meters.map((m) => {
    const mt = S.data.maintenance[m.name];
    const why = el("input", { id: `maint-${m.name}`, placeholder: "reason" });
    return el("tr", { "data-maint": m.name }, el("td", { text: m.name }),
      el("td", { text: mt ? `in maintenance since ${when(mt.since)} (${mt.user}): ${mt.reason}` : "in service" }),
      el("td", {}, why, el("button", { type: "button", disabled: !canAct,
        onclick: () => act("/api/maintenance", { meter: m.name, on: !mt, reason: why.value }),
        text: mt ? "End maintenance" : "Start maintenance" })));
  });
  keepInputs(view, () => view.replaceChildren(
    el("h2", { text: `Active alarms (${S.data.alarms.length})` }),
    el("table", { id: "active-alarms" },
      el("tr", {}, ...["severity", "meter", "alarm", "since", "message", "evidence", "state", ""].map((h) => el("th", { text: h }))),
      ...active),
    el("h2", { text: "Maintenance (alarms of the meter suppressed)" }),
    el("table", { id: "maintenance" }, ...maintRows),
    el("h2", { text: "Recent events" }),
    el("table", { id: "recent" },
      el("tr", {}, ...["when", "meter", "code", "state", "message"].map((h) => el("th", { text: h }))),
      ...S.data.recent.map((e) => el("tr", { class: e.severity }, el("td", { text: when(e.ts) }), el("td", { text: e.meter }),
        el("td", { text: e.code }), el("td", { text: e.state }), el("td", { text: e.message }))))));
}

// history

function chart(title, t, ys, digits) {
  const W = 640, H = 130, L = 50, B = 18;
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("class", "chart"); svg.setAttribute("width", W); svg.setAttribute("height", H);
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const text = (x, y, s) => { const e = document.createElementNS(svgNS, "text"); e.setAttribute("x", x); e.setAttribute("y", y); e.textContent = s; svg.append(e); };
  const pts = t.map((x, i) => [x, ys[i]]).filter((p) => p[1] !== null && isFinite(p[1]));
  text(4, 12, title);
  if (pts.length < 1) { text(L, H / 2, "no data in the archive for this span"); return svg; }
  const t0 = pts[0][0], t1 = Math.max(pts[pts.length - 1][0], t0 + 1);
  let lo = Math.min(...pts.map((p) => p[1])), hi = Math.max(...pts.map((p) => p[1]));
  if (hi - lo < 1e-9) { hi += 1; lo -= 1; }
  const X = (x) => L + (W - L - 8) * (x - t0) / (t1 - t0), Y = (y) => 16 + (H - B - 20) * (hi - y) / (hi - lo);
  const line = document.createElementNS(svgNS, "polyline");
  line.setAttribute("points", pts.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" "));
  svg.append(line);
  text(4, 24, fmt(hi, digits)); text(4, H - B, fmt(lo, digits));
  text(L, H - 4, new Date(t0 * 1000).toLocaleString()); text(W - 150, H - 4, new Date(t1 * 1000).toLocaleString());
  return svg;
}

function renderHistory() {
  const view = $("#view");
  if (S.built === "history") return;
  S.built = "history";
  const meter = el("select", { id: "hist-meter" }, ...S.site.meters.map((m) => el("option", { value: m.name, text: m.name })));
  const span = el("select", { id: "hist-span" }, ...["hour", "day", "week"].map((s) => el("option", { value: s, text: `last ${s}` })));
  const charts = el("div", { id: "charts" });
  const load = async () => {
    const r = await api(`/api/history?meter=${encodeURIComponent(meter.value)}&span=${span.value}`);
    if (!r.ok) { charts.replaceChildren(el("p", { class: "muted", text: (r.data && r.data.error) || "no history" })); return; }
    const h = r.data;
    charts.replaceChildren(el("p", { class: "muted", text: `${h.t.length} point(s) from ${h.table}${h.note ? ": " + h.note : ""}` }),
      chart("PF", h.t, h.pf, 3), chart("P kW", h.t, h.kw, 1), chart("Q kvar", h.t, h.kvar, 1));
  };
  meter.addEventListener("change", load); span.addEventListener("change", load);
  const iso = (d) => new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
  const now = new Date();
  const from = el("input", { id: "rep-from", type: "datetime-local", value: iso(new Date(now - 86400000)) });
  const to = el("input", { id: "rep-to", type: "datetime-local", value: iso(now) });
  const format = el("select", { id: "rep-format" }, ...["md", "html", "csv", "json"].map((f) => el("option", { value: f, text: f })));
  const link = el("a", { id: "report-link", text: "Download the report" });
  const setLink = () => {
    const q = new URLSearchParams({ from: new Date(from.value).toISOString(), to: new Date(to.value).toISOString(), format: format.value });
    link.setAttribute("href", `/api/report?${q}`);
  };
  for (const i of [from, to, format]) i.addEventListener("change", setLink);
  setLink();
  view.replaceChildren(el("h2", { text: "History" }),
    el("div", { class: "form-line" }, "meter ", meter, " span ", span), charts,
    el("h2", { text: "Report (pfmon report)" }),
    el("div", { class: "form-line" }, "from ", from, " to ", to, " format ", format, link));
  load();
}

// -- start -----------------------------------------------------------------------------

window.addEventListener("hashchange", () => { S.built = ""; render(); });
document.addEventListener("DOMContentLoaded", async () => {
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", logout);
  await loadMe();
  await start();
});
