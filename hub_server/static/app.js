// HWF status page: a token login, then live panels fed only by /api/events.
//
// Why fetch() and not EventSource: EventSource cannot send an Authorization
// header, and the token must not travel in a URL (it would land in logs and
// history).  So the stream is read with a ReadableStream reader and the SSE
// lines are parsed here.
//
// Every string from the API (labels, errors, hostnames, user names) is
// untrusted: it only ever reaches the page through textContent / value,
// never innerHTML.
"use strict";

const TOKEN_KEY = "hwf-token"; // sessionStorage only: gone when the tab closes
const TERMINAL = new Set(["finished", "failed", "cancelled"]);
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 10000;

// ---- SSE parsing (no I/O: fed chunks of text, returns whole events) ----

class SSEParser {
  constructor() {
    this.buffer = "";
    this.event = "";
    this.data = [];
  }

  /** Feed decoded text; returns [{event, data}] for each event completed by it. */
  feed(text) {
    this.buffer += text;
    const out = [];
    let nl;
    while ((nl = this.buffer.search(/\r\n|\r|\n/)) >= 0) {
      const sep = this.buffer.startsWith("\r\n", nl) ? 2 : 1;
      const line = this.buffer.slice(0, nl);
      this.buffer = this.buffer.slice(nl + sep);
      if (line === "") {
        if (this.data.length) out.push({ event: this.event || "message", data: this.data.join("\n") });
        this.event = "";
        this.data = [];
        continue;
      }
      if (line.startsWith(":")) continue; // a comment: the server's keep-alive ping
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") this.event = value;
      else if (field === "data") this.data.push(value);
    }
    return out;
  }
}

// ---- small DOM helpers ----

const $ = (id) => document.getElementById(id);

/** An element with text (never HTML) and attributes. */
function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function fmtTime(t) {
  if (typeof t !== "number" || !t) return "";
  return new Date(t * 1000).toLocaleTimeString();
}

function pct(x) {
  return typeof x === "number" && isFinite(x) ? `${Math.round(x)}%` : "–";
}

function num(x, digits = 2) {
  return typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–";
}

function clampPct(x) {
  return typeof x === "number" && isFinite(x) ? Math.max(0, Math.min(100, x)) : 0;
}

function progressBar(value, label, testid) {
  const wrap = el("span", { class: "progress" });
  // No number yet (a command that prints no progress): an indeterminate bar, not a false 0%.
  const known = typeof value === "number" && isFinite(value);
  const bar = el("progress", { max: 100, value: known ? clampPct(value) : null, "aria-label": label, "data-testid": testid });
  wrap.append(bar, el("span", { class: "pct" }, pct(value)));
  return wrap;
}

/** Keep one <tr> per key, reusing rows so focus and edits survive updates. */
function syncRows(tbody, items, key, build, update) {
  const existing = new Map();
  for (const tr of tbody.children) existing.set(tr.dataset.key, tr);
  let prev = null;
  for (const item of items) {
    const k = String(key(item));
    let tr = existing.get(k);
    if (tr) existing.delete(k);
    else {
      tr = build(item);
      tr.dataset.key = k;
    }
    update(tr, item);
    const want = prev ? prev.nextSibling : tbody.firstChild;
    if (want !== tr) tbody.insertBefore(tr, want);
    prev = tr;
  }
  for (const tr of existing.values()) tr.remove();
}

function setCell(td, content) {
  if (typeof content === "string" || typeof content === "number") {
    if (td.childElementCount || td.textContent !== String(content)) td.textContent = String(content);
  } else {
    td.replaceChildren(content);
  }
}

// ---- state ----

const state = {
  token: null,
  whoami: null,
  snapshot: null,
  abort: null, // AbortController of the running stream
  backoff: BACKOFF_MIN_MS,
  retryTimer: null,
  connError: false, // the error box shows a lost connection (cleared by the next snapshot)
};

function showError(message) {
  state.connError = false;
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setConnection(text, kind) {
  const c = $("conn");
  c.textContent = text;
  c.className = `conn ${kind}`;
  c.dataset.state = kind;
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (resp.ok) return resp.status === 204 ? null : resp.json().catch(() => null);
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const err = await resp.json();
    if (err && (err.message || err.error)) message = `${err.error || resp.status}: ${err.message || ""}`;
  } catch (_) { /* not JSON: keep the status line */ }
  const e = new Error(message);
  e.status = resp.status;
  throw e;
}

// ---- login / logout ----

async function login(token) {
  state.token = token;
  showError("");
  setConnection("checking token…", "pending");
  let who;
  try {
    who = await api("GET", "/api/whoami");
  } catch (e) {
    state.token = null;
    setConnection("not connected", "off");
    showError(e.status === 401 || e.status === 403
      ? `Token refused (${e.message}). Check it and log in again.`
      : `Cannot reach the hub: ${e.message}`);
    if (e.status === 401 || e.status === 403) sessionStorage.removeItem(TOKEN_KEY);
    showLogin();
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  state.whoami = who;
  $("who").textContent = `${who.user} (${who.role})`;
  document.body.dataset.role = who.role;
  $("login").hidden = true;
  $("panels").hidden = false;
  $("logout").hidden = false;
  connect();
}

function logout() {
  sessionStorage.removeItem(TOKEN_KEY);
  stopStream();
  state.token = null;
  state.whoami = null;
  state.snapshot = null;
  $("who").textContent = "";
  $("updated").textContent = "";
  delete document.body.dataset.role;
  for (const id of ["sessions", "tasks", "workers", "credits"]) $(id).replaceChildren();
  setConnection("not connected", "off");
  showError("");
  showLogin();
}

function showLogin() {
  $("panels").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("token").value = "";
  $("token").focus();
}

// ---- the event stream ----

function stopStream() {
  if (state.abort) state.abort.abort();
  state.abort = null;
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
}

function scheduleReconnect(reason) {
  const delay = state.backoff;
  state.backoff = Math.min(state.backoff * 2, BACKOFF_MAX_MS);
  setConnection(`reconnecting… (${reason})`, "retry");
  const shown = state.snapshot ? ` What you see is from ${fmtTime(state.snapshot.time)}.` : "";
  showError(`No live updates from the hub (${reason}); reconnecting… in ${(delay / 1000).toFixed(1)} s.${shown}`);
  $("panels").classList.add("stale");
  state.connError = true;
  state.retryTimer = setTimeout(connect, delay);
}

async function connect() {
  stopStream();
  if (!state.token) return;
  const abort = new AbortController();
  state.abort = abort;
  setConnection("connecting…", "pending");
  let resp;
  try {
    resp = await fetch("/api/events", {
      headers: { Authorization: `Bearer ${state.token}`, Accept: "text/event-stream" },
      signal: abort.signal,
      cache: "no-store",
    });
  } catch (e) {
    if (!abort.signal.aborted) scheduleReconnect("hub unreachable");
    return;
  }
  if (resp.status === 401 || resp.status === 403) {
    logout();
    showError(`Token refused by the event stream (${resp.status}); log in again.`);
    return;
  }
  if (!resp.ok || !resp.body) {
    scheduleReconnect(`HTTP ${resp.status}`);
    return;
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  const parser = new SSEParser();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      for (const ev of parser.feed(decoder.decode(value, { stream: true }))) {
        if (ev.event === "error") { // the hub ends the stream after this (e.g. token revoked)
          let msg = ev.data;
          try { const e = JSON.parse(ev.data); msg = `${e.error}: ${e.message}`; } catch (_) { /* keep the raw text */ }
          showError(`The hub closed the event stream: ${msg}`);
          continue;
        }
        if (ev.event !== "snapshot") continue;
        let snap;
        try {
          snap = JSON.parse(ev.data);
        } catch (e) {
          showError(`Bad snapshot from the hub: ${e.message}`);
          continue;
        }
        state.backoff = BACKOFF_MIN_MS; // a snapshot arrived: the link works
        setConnection("live", "live");
        if (state.connError) showError("");
        $("panels").classList.remove("stale");
        render(snap);
      }
    }
  } catch (e) {
    if (abort.signal.aborted) return;
  }
  if (!abort.signal.aborted) scheduleReconnect("connection lost");
}

// ---- actions ----

async function act(button, method, path, body, done) {
  button.disabled = true;
  try {
    await api(method, path, body);
    showError("");
    if (done) done();
  } catch (e) {
    showError(`${button.textContent} failed: ${e.message}`);
  } finally {
    button.disabled = false;
  }
}

// ---- rendering ----

function render(snap) {
  state.snapshot = snap;
  renderSessions(snap.sessions || []);
  renderTasks(snap.tasks || []);
  renderWorkers(snap.workers || {});
  renderCredits(snap.credits);
  $("updated").textContent = `updated ${fmtTime(snap.time)}`;
}

function countsText(counts) {
  return Object.entries(counts || {})
    .filter(([, n]) => n)
    .map(([s, n]) => `${s} ${n}`)
    .join(" · ");
}

function renderSessions(sessions) {
  $("sessions-empty").hidden = sessions.length > 0;
  syncRows($("sessions"), sessions, (s) => s.session_id,
    (s) => {
      const tr = el("tr", { "data-testid": "session-row" });
      tr.dataset.session = s.session_id;
      for (let i = 0; i < 5; i++) tr.append(el("td"));
      return tr;
    },
    (tr, s) => {
      const c = tr.cells;
      setCell(c[0], el("code", { title: s.session_id }, s.session_id));
      setCell(c[1], s.user ?? "");
      setCell(c[2], fmtTime(s.created));
      setCell(c[3], progressBar(s.progress, `session ${s.session_id} progress`, "session-progress"));
      tr.dataset.progress = String(clampPct(s.progress));
      setCell(c[4], `${countsText(s.counts)} (of ${s.total ?? 0})`);
    });
}

function taskMatches(t, status, text) {
  if (status === "unfinished" && TERMINAL.has(t.status)) return false;
  if (status && status !== "unfinished" && t.status !== status) return false;
  if (!text) return true;
  const hay = [t.id, t.label, t.user, t.worker_id, t.session_id, t.status].map((x) => String(x ?? "").toLowerCase());
  return hay.some((h) => h.includes(text));
}

function taskProgress(t) {
  if (t.status === "running" || t.status === "assigned") {
    const frames = typeof t.frame_current === "number"
      ? `frame ${t.frame_current}${typeof t.frame_end === "number" ? ` / ${t.frame_end}` : ""}` : "";
    const wrap = progressBar(t.progress, `task ${t.id} progress`, "task-progress");
    if (frames) wrap.append(el("span", { class: "frames", "data-testid": "task-frame" }, frames));
    return wrap;
  }
  if (t.status === "queued" || t.status === "retrying") {
    return el("span", { class: "wait", "data-testid": "wait-reason" }, t.wait_reason || "waiting");
  }
  if (t.error && t.error !== t.status) return el("span", { class: "err", title: t.error }, t.error);
  return el("span", {}, t.finished ? `done ${fmtTime(t.finished)}` : "");
}

function renderTasks(tasks) {
  const status = $("status-filter").value;
  const text = $("text-filter").value.trim().toLowerCase();
  const shown = tasks.filter((t) => taskMatches(t, status, text));
  $("tasks-count").textContent = `(${shown.length} of ${tasks.length})`;
  $("tasks-empty").hidden = shown.length > 0;
  syncRows($("tasks"), shown, (t) => t.id,
    (t) => {
      const tr = el("tr", { "data-testid": "task-row" });
      tr.dataset.task = t.id;
      for (let i = 0; i < 8; i++) tr.append(el("td"));
      // Priority: an input kept across updates (so typing is not overwritten).
      const prio = el("input", { type: "number", step: 1, class: "prio", "data-testid": "priority-input",
        "aria-label": `priority of task ${t.id}` });
      const setBtn = el("button", { type: "button", "data-testid": "priority-button" }, "Set");
      setBtn.addEventListener("click", () => {
        const v = Number(prio.value);
        if (!Number.isInteger(v)) { showError("Priority must be a whole number"); return; }
        act(setBtn, "PATCH", `/tasks/${encodeURIComponent(t.id)}`, { priority: v }, () => { prio.dataset.dirty = ""; });
      });
      prio.addEventListener("input", () => { prio.dataset.dirty = "1"; });
      const prioBox = el("span", { class: "prio-box" });
      prioBox.append(prio, setBtn);
      tr._prio = { box: prioBox, input: prio };
      const cancel = el("button", { type: "button", class: "danger", "data-testid": "cancel-button",
        "aria-label": `cancel task ${t.id}` }, "Cancel");
      cancel.addEventListener("click", () => act(cancel, "PATCH", `/tasks/${encodeURIComponent(t.id)}`, { status: "cancelled" }));
      tr._cancel = cancel;
      return tr;
    },
    (tr, t) => {
      const c = tr.cells;
      tr.dataset.status = t.status;
      setCell(c[0], el("code", { title: `${t.id} in session ${t.session_id}` }, t.id));
      setCell(c[1], t.label ?? "");
      setCell(c[2], t.user ?? "");
      setCell(c[3], el("span", { class: `status s-${String(t.status).replace(/[^a-z]/g, "")}`, "data-testid": "task-status" }, t.status));
      if (t.status === "queued") {
        const inp = tr._prio.input;
        if (document.activeElement !== inp && !inp.dataset.dirty) inp.value = String(t.priority ?? 0);
        if (c[4].firstChild !== tr._prio.box) c[4].replaceChildren(tr._prio.box);
      } else {
        tr._prio.input.dataset.dirty = "";
        setCell(c[4], String(t.priority ?? ""));
      }
      setCell(c[5], t.worker_id ?? "");
      setCell(c[6], taskProgress(t));
      if (TERMINAL.has(t.status)) setCell(c[7], "");
      else if (c[7].firstChild !== tr._cancel) c[7].replaceChildren(tr._cancel);
    });
}

function renderWorkers(workers) {
  const list = Object.entries(workers).map(([id, w]) => ({ ...w, id: w.id ?? id }));
  list.sort((a, b) => String(a.hostname ?? a.id).localeCompare(String(b.hostname ?? b.id)));
  $("workers-empty").hidden = list.length > 0;
  const admin = state.whoami && state.whoami.role === "admin";
  syncRows($("workers"), list, (w) => w.id,
    (w) => {
      const tr = el("tr", { "data-testid": "worker-row" });
      tr.dataset.worker = w.id;
      for (let i = 0; i < 10; i++) tr.append(el("td"));
      tr.cells[9].className = "admin-only";
      if (admin) {
        const box = el("span", { class: "btns" });
        for (const [status, label] of [["enabled", "Enable"], ["disabled", "Disable"], ["drain", "Drain"]]) {
          const b = el("button", { type: "button", "data-testid": `worker-${status}-button`,
            "aria-label": `${label} worker ${w.hostname ?? w.id}` }, label);
          b.dataset.target = status;
          b.addEventListener("click", () => act(b, "PATCH", `/workers/${encodeURIComponent(w.id)}`, { status }));
          box.append(b);
        }
        tr.cells[9].append(box);
      }
      return tr;
    },
    (tr, w) => {
      const c = tr.cells;
      tr.dataset.status = w.status;
      tr.dataset.connection = w.connection;
      setCell(c[0], el("span", { title: `${w.id}${w.system ? ` · ${typeof w.system === "string" ? w.system : JSON.stringify(w.system)}` : ""}` }, w.hostname ?? w.id));
      setCell(c[1], el("span", { class: `conn-${w.connection === "online" ? "on" : "off"}` }, w.connection ?? ""));
      setCell(c[2], el("span", { class: `wstatus w-${String(w.status).replace(/[^a-z]/g, "")}`, "data-testid": "worker-status" }, w.status ?? ""));
      const la = w.load_average || {};
      setCell(c[3], `${num(la["1min"])} / ${num(la["5min"])} / ${num(la["15min"])}`);
      setCell(c[4], pct(w.cpu_percent));
      setCell(c[5], pct(w.mem_percent));
      setCell(c[6], pct(w.disk_percent));
      setCell(c[7], `${w.running ?? 0} / ${w.slots ?? "?"}`);
      const cur = Array.isArray(w.current_tasks) && w.current_tasks.length ? w.current_tasks.join(", ") : (w.current_task ?? "");
      setCell(c[8], cur ? el("code", {}, cur) : "");
      for (const b of c[9].querySelectorAll("button")) b.setAttribute("aria-pressed", String(b.dataset.target === w.status));
    });
}

function renderCredits(credits) {
  const panel = $("credits-panel");
  if (!Array.isArray(credits)) { panel.hidden = true; return; }
  panel.hidden = false;
  const rows = [...credits].sort((a, b) => (b.credits ?? 0) - (a.credits ?? 0));
  const tbody = $("credits");
  tbody.replaceChildren(...rows.map((r, i) => {
    const tr = el("tr", { "data-testid": "credit-row" });
    tr.append(el("td", {}, i + 1), el("td", {}, r.key ?? ""), el("td", { class: "n" }, r.credits ?? 0), el("td", { class: "n" }, r.slots ?? 0));
    return tr;
  }));
}

// ---- wiring ----

function init() {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = $("token").value.trim();
    if (!token) { showError("Enter a token"); return; }
    login(token);
  });
  $("logout").addEventListener("click", logout);
  const rerender = () => { if (state.snapshot) renderTasks(state.snapshot.tasks || []); };
  $("status-filter").addEventListener("change", rerender);
  $("text-filter").addEventListener("input", rerender);
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) login(saved);
  else showLogin();
}

window.HWFStatus = { SSEParser }; // for the browser tests of the parser
document.addEventListener("DOMContentLoaded", init);
