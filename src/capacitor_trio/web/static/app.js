// capacitor-trio dashboard: plain JavaScript, no build step. Every page reads the JSON API and
// writes through it (same origin), with the session's CSRF token in X-CSRF-Token.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const PAGE = document.body.dataset.page;
const REFRESH_MS = 2000;

class ApiFailure extends Error {
  constructor(code, message, status) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

function toLogin() {
  const here = location.pathname + location.search;
  location.assign("/login?next=" + encodeURIComponent(here));
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (CSRF) headers["X-CSRF-Token"] = CSRF;
  const init = { method, headers, credentials: "same-origin" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  let envelope;
  try {
    envelope = await resp.json();
  } catch (e) {
    throw new ApiFailure("INTERNAL", `${method} ${path}: HTTP ${resp.status}`, resp.status);
  }
  if (envelope.ok) return envelope.data;
  const err = envelope.error || { code: "INTERNAL", message: `HTTP ${resp.status}` };
  if (resp.status === 403 && err.code === "FORBIDDEN") {
    toLogin(); // a write (or the settings) without a live session: the login instead
  }
  throw new ApiFailure(err.code, err.message, resp.status);
}

function say(message, isError) {
  const box = document.getElementById("status");
  box.textContent = message;
  box.className = "status " + (isError ? "bad" : "good");
}

// Run a write from a button; report its outcome in the status line.
async function act(label, fn) {
  try {
    const result = await fn();
    say(label + ": done");
    return result;
  } catch (e) {
    say(label + ": " + e.message, true);
    return undefined;
  }
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function age(seconds) {
  if (seconds == null) return "—";
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
  return `${Math.floor(seconds / 86400)} d ${Math.floor((seconds % 86400) / 3600)} h`;
}

function when(iso) {
  if (!iso) return "never";
  const d = new Date(iso);
  return d.toLocaleString();
}

function sinceIso(iso) {
  return iso ? Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000)) : null;
}

function nodePath(node, suffix) {
  return `/api/nodes/${encodeURIComponent(node.aeTitle)}${suffix || ""}?role=${encodeURIComponent(node.role)}`;
}

// ---- Dashboard ---------------------------------------------------------------------------------

const STATES = ["new", "prepared", "failed", "rejected", "expired"];
// Set by a card's Edit… link (this tab, this origin only): the edit page pauses the node as it
// opens only then. Another site's page can send the browser to the edit page (directly or
// through the login's next) with the session cookie, but cannot set this.
const EDIT_INTENT = "capacitor-trio.edit";

function nodeCard(node) {
  const key = node.aeTitle + "|" + node.role;
  const id = "node-" + key.replace(/[^A-Za-z0-9_-]/g, "_");
  const card = el("article", { class: "card", id, "data-node": key, "aria-labelledby": id + "-h" });
  const fields = el("dl", { class: "facts" });
  const fact = (name, label) => {
    fields.append(el("dt", { text: label }), el("dd", { "data-fact": name }));
  };
  fact("status", "Status");
  fact("reachable", "Reachable");
  fact("paused", "Paused");
  fact("inWindow", "In window");
  fact("queue", "Queue");
  fact("oldest", "Oldest waiting");
  fact("rate", "Send rate");
  fact("lastDelivery", "Last delivery");
  fact("lastError", "Last error");
  const buttons = el("div", { class: "buttons" });
  const button = (name, label, handler) => {
    const b = el("button", { type: "button", "data-action": name, text: label });
    b.addEventListener("click", () => handler(card.nodeData, b));
    buttons.append(b);
  };
  button("pause", "Pause", (n) => act(`Pause ${n.aeTitle}`, () => api("POST", nodePath(n, "/pause"))).then(refreshDashboard));
  button("resume", "Resume", (n) => act(`Resume ${n.aeTitle}`, () => api("POST", nodePath(n, "/resume"))).then(refreshDashboard));
  button("restart", "Restart", (n) => act(`Restart ${n.aeTitle}`, () => api("POST", nodePath(n, "/resume"))).then(refreshDashboard));
  button("echo", "C-ECHO", async (n) => {
    const r = await act(`C-ECHO ${n.aeTitle}`, () => api("POST", nodePath(n, "/echo")));
    if (r) {
      card.reachable = r.success ? `yes (${Math.round(r.latencyMs)} ms)` : `no: ${r.error || "failed"}`;
      setFact(card, "reachable", card.reachable);
      say(`C-ECHO ${n.aeTitle}: ` + card.reachable, !r.success);
    }
  });
  button("override-on", "Send outside schedule", (n) =>
    act(`Override ${n.aeTitle}`, () => api("POST", nodePath(n, "/override-schedule"))).then(refreshDashboard));
  button("override-off", "Back to schedule", (n) =>
    act(`Override off ${n.aeTitle}`, () => api("DELETE", nodePath(n, "/override-schedule"))).then(refreshDashboard));
  const edit = el("a", {
    class: "button-link", "data-action": "edit", text: "Edit…",
    href: `/nodes/${encodeURIComponent(node.aeTitle)}/edit?role=${encodeURIComponent(node.role)}`,
  });
  edit.addEventListener("click", () => sessionStorage.setItem(EDIT_INTENT, key));
  buttons.append(edit);
  card.append(el("h3", { id: id + "-h", text: `${node.aeTitle} ` }, el("small", { text: `${node.role} · ${node.hostName}:${node.port}` })), fields, buttons);
  card.reachable = "not checked (C-ECHO)";
  return card;
}

function setFact(card, name, text, cls) {
  const dd = card.querySelector(`[data-fact="${name}"]`);
  if (dd.textContent !== text) dd.textContent = text;
  dd.className = cls || "";
}

function showButton(card, name, shown) {
  const b = card.querySelector(`[data-action="${name}"]`);
  b.hidden = !shown;
}

function updateCard(card, node) {
  card.nodeData = node;
  const actor = node.status !== "none";
  setFact(card, "status", actor ? `${node.status} · ${node.activity}` : "no queue (not a Storage node)", node.status === "failed" ? "bad" : "");
  let reachable = card.reachable;
  if (node.lastDeliveredAt && sinceIso(node.lastDeliveredAt) < 300) reachable = "yes (delivered recently)";
  else if (node.lastError && !card.reachable.startsWith("yes")) reachable = "in doubt (see last error)";
  setFact(card, "reachable", reachable);
  setFact(card, "paused", node.paused ? "yes" : "no", node.paused ? "warn" : "");
  setFact(card, "inWindow", node.inWindow ? "yes" : node.scheduleOverride ? "no (overridden: sending)" : "no", node.inWindow ? "" : "warn");
  const q = node.queue;
  setFact(card, "queue", STATES.map((s) => `${s} ${q[s]}`).join(" · ") + ` · sending ${q.checkedOut}`);
  setFact(card, "oldest", age(node.oldestWaitingSeconds));
  setFact(card, "rate", `${node.sendRate.toFixed(1)} /s (last minute)`);
  setFact(card, "lastDelivery", when(node.lastDeliveredAt));
  setFact(card, "lastError", node.lastError || "none", node.lastError ? "bad" : "");
  showButton(card, "pause", actor && !node.paused);
  showButton(card, "resume", actor && node.paused && node.status !== "failed");
  showButton(card, "restart", node.status === "failed");
  showButton(card, "echo", true);
  showButton(card, "override-on", actor && !node.scheduleOverride);
  showButton(card, "override-off", actor && node.scheduleOverride);
}

async function refreshDashboard() {
  try {
    const [nodes, service, processing] = await Promise.all([
      api("GET", "/api/nodes"), api("GET", "/api/service/status"), api("GET", "/api/service/processing-status"),
    ]);
    const running = Object.entries(service).filter(([, v]) => v).map(([k]) => k);
    document.getElementById("service-state").textContent = processing.allPaused ? "all paused" : `running (${running.join(", ")})`;
    document.getElementById("checked-out").textContent = processing.checkedOutItems;
    document.getElementById("idle-state").textContent = processing.idle ? "idle" : "busy";
    const box = document.getElementById("nodes");
    const seen = new Set();
    for (const node of nodes) {
      const key = node.aeTitle + "|" + node.role;
      seen.add(key);
      let card = [...box.children].find((c) => c.dataset.node === key);
      if (!card) {
        card = nodeCard(node);
        box.append(card);
      }
      updateCard(card, node);
    }
    for (const card of [...box.children]) if (!seen.has(card.dataset.node)) card.remove();
    document.getElementById("refreshed-at").textContent = "last " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("refreshed-at").textContent = "waiting for the service… (" + e.message + ")";
  }
}

function initDashboard() {
  document.getElementById("pause-all").addEventListener("click", () =>
    act("Pause all", () => api("POST", "/api/service/pause")).then(refreshDashboard));
  document.getElementById("resume-all").addEventListener("click", () =>
    act("Resume all", () => api("POST", "/api/service/resume")).then(refreshDashboard));
  refreshDashboard();
  setInterval(refreshDashboard, REFRESH_MS);
}

// ---- Queue ----------------------------------------------------------------------------------------

let queueSkip = 0;
let queueTotal = 0;

function queueQuery() {
  const form = document.getElementById("queue-filter");
  const params = new URLSearchParams();
  for (const name of ["state", "dest", "source", "modality", "search", "order"]) {
    const v = form.elements[name].value.trim();
    if (v) params.set(name, v);
  }
  params.set("limit", form.elements.limit.value);
  params.set("skip", String(queueSkip));
  return params;
}

function itemActions(item) {
  const box = el("div", { class: "buttons compact" });
  const add = (action, label, danger) => {
    const b = el("button", { type: "button", text: label, "data-item-action": action, "aria-label": `${label} item ${item.id}` });
    if (danger) b.className = "danger";
    b.addEventListener("click", () => itemAction(item.id, action).then(refreshQueue));
    box.append(b);
  };
  if (item.state === "failed" || item.state === "rejected") add("retry", "Retry");
  if (item.state !== "failed") add("fail", "Fail");
  if (item.state !== "rejected") add("reject", "Reject");
  add("delete", "Delete…", true);
  return box;
}

async function itemAction(id, action) {
  if (action === "delete") {
    if (!confirm(`Delete item ${id} and its stored file? This cannot be undone.`)) return undefined;
    return act(`Delete item ${id}`, () => api("DELETE", `/api/queue/items/${id}`));
  }
  return act(`${action} item ${id}`, () => api("POST", `/api/queue/items/${id}/${action}`));
}

function patient(item) {
  const name = item.patientName ? item.patientName.replace(/\^/g, " ").trim() : "";
  return name ? `${name} (${item.patientId || "no ID"})` : item.patientId || "—";
}

async function refreshQueue() {
  const params = queueQuery();
  let page;
  try {
    page = await api("GET", "/api/queue/items?" + params);
  } catch (e) {
    say("Queue: " + e.message, true);
    return;
  }
  queueTotal = page.total;
  const body = document.getElementById("items");
  body.replaceChildren(...page.items.map((item) => el("tr", { "data-item": String(item.id) },
    el("td", {}, el("a", { href: `/queue/${item.id}`, text: String(item.id), "aria-label": `Item ${item.id} details` })),
    el("td", { text: item.state + (item.checkedOut ? " (sending)" : "") }),
    el("td", { text: item.destinationAeTitle }),
    el("td", { text: item.sourceAeTitle }),
    el("td", { text: item.modality || "" }),
    el("td", { class: "patient", text: patient(item) }),
    el("td", { text: item.accessionNumber || "" }),
    el("td", { text: age(sinceIso(item.createdAt)) }),
    el("td", { text: String(item.attemptCount) }),
    el("td", { class: "err", text: item.lastError || "" }),
    el("td", {}, itemActions(item)),
  )));
  const last = Math.min(page.skip + page.items.length, page.total);
  document.getElementById("queue-summary").textContent =
    page.total ? `${page.total} items; showing ${page.skip + 1}–${last}` : "No items match.";
  document.getElementById("page-info").textContent = `page ${Math.floor(page.skip / page.limit) + 1} of ${Math.max(1, Math.ceil(page.total / page.limit))}`;
  document.getElementById("prev-page").disabled = page.skip === 0;
  document.getElementById("next-page").disabled = last >= page.total;
}

function bulkFilter() {
  const form = document.getElementById("queue-filter");
  const body = {};
  for (const [field, name] of [["destination", "dest"], ["source", "source"], ["modality", "modality"]]) {
    const v = form.elements[name].value.trim();
    if (v) body[field] = v;
  }
  return body;
}

function initQueue() {
  const form = document.getElementById("queue-filter");
  const params = new URLSearchParams(location.search);
  for (const name of ["state", "dest", "source", "modality", "search", "order"]) {
    if (params.get(name)) form.elements[name].value = params.get(name);
  }
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    queueSkip = 0;
    refreshQueue();
  });
  document.getElementById("prev-page").addEventListener("click", () => {
    queueSkip = Math.max(0, queueSkip - Number(form.elements.limit.value));
    refreshQueue();
  });
  document.getElementById("next-page").addEventListener("click", () => {
    if (queueSkip + Number(form.elements.limit.value) < queueTotal) queueSkip += Number(form.elements.limit.value);
    refreshQueue();
  });
  for (const which of ["failed", "rejected"]) {
    document.getElementById(`retry-${which}`).addEventListener("click", async () => {
      const r = await act(`Retry all ${which}`, () => api("POST", `/api/queue/actions/retry-${which}`, bulkFilter()));
      if (r) say(`Retry all ${which}: ${r.count} items back to new`);
      refreshQueue();
    });
  }
  refreshQueue();
}

// ---- Item detail ------------------------------------------------------------------------------------

function tagValue(elem) {
  if (elem.vr === "SQ") return `${(elem.Value || []).length} item(s)`;
  if (!elem.Value) return "";
  return elem.Value.map((v) => (v && typeof v === "object" ? v.Alphabetic || JSON.stringify(v) : String(v))).join("\\");
}

async function loadItem() {
  const id = document.getElementById("item").dataset.itemId;
  let item;
  try {
    item = await api("GET", `/api/queue/items/${id}`);
  } catch (e) {
    say(`Item ${id}: ${e.message}`, true);
    return undefined;
  }
  const shown = [
    ["State", item.state + (item.checkedOut ? " (being sent)" : "")], ["Destination", `${item.destinationAeTitle} (${item.destinationRole})`],
    ["Source", item.sourceAeTitle], ["Patient", patient(item)], ["Accession", item.accessionNumber],
    ["Modality", item.modality], ["Study UID", item.studyInstanceUid], ["Series UID", item.seriesInstanceUid],
    ["SOP Instance UID", item.sopInstanceUid], ["SOP Class UID", item.sopClassUid], ["Transfer syntax", item.transferSyntaxUid],
    ["Size", `${item.sizeBytes} bytes`], ["Attempts", String(item.attemptCount)], ["Next attempt", when(item.nextAttemptAt)],
    ["Last error", item.lastError || "none"], ["Received", when(item.createdAt)], ["Updated", when(item.updatedAt)],
  ];
  document.getElementById("item-fields").replaceChildren(...shown.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v || "" })]));
  const tags = item.tags || {};
  document.getElementById("tags").replaceChildren(...Object.entries(tags).map(([tag, elem]) =>
    el("tr", {}, el("td", { text: `(${tag.slice(0, 4)},${tag.slice(4)})` }), el("td", { text: elem.vr }), el("td", { text: tagValue(elem) }))));
  const notes = [];
  if (!item.tags) notes.push("The stored file cannot be read.");
  if (item.tagsTruncated) notes.push("Cut short by: " + item.tagsLimits.join(", ") + ".");
  if (document.body.dataset.mayWrite !== "yes") notes.push("Names, the patient's other details and private tags are shown after logging in.");
  document.getElementById("tags-note").textContent = notes.join(" ");
  return item;
}

function initItem() {
  const id = document.getElementById("item").dataset.itemId;
  let item;
  loadItem().then((i) => { item = i; });
  for (const b of document.querySelectorAll("[data-item-action]")) {
    b.addEventListener("click", async () => {
      const r = await itemAction(id, b.dataset.itemAction);
      if (r && b.dataset.itemAction === "delete") location.assign("/queue");
      else item = await loadItem();
    });
  }
  document.getElementById("move-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!item) return;
    const target = document.getElementById("move-target").value;
    const scope = document.getElementById("move-scope").value;
    const body = { targetState: target };
    if (scope === "item") await act(`Move item ${id}`, () => api("POST", `/api/queue/items/${id}/move`, body));
    else {
      const uid = scope === "study" ? item.studyInstanceUid : item.seriesInstanceUid;
      const r = await act(`Move ${scope}`, () => api("POST", `/api/queue/${scope === "study" ? "studies" : "series"}/${encodeURIComponent(uid)}/move`, body));
      if (r) say(`Moved ${r.count} items of the ${scope} to ${target}`);
    }
    item = await loadItem();
  });
  document.getElementById("delete-study").addEventListener("click", async () => {
    if (!item || !confirm(`Delete every item of study ${item.studyInstanceUid} (all destinations) and their stored files?`)) return;
    const r = await act("Delete study", () => api("DELETE", `/api/queue/studies/${encodeURIComponent(item.studyInstanceUid)}`));
    if (r) location.assign("/queue");
  });
}

// ---- Logs -------------------------------------------------------------------------------------------

async function refreshLogs() {
  const form = document.getElementById("log-filter");
  const params = new URLSearchParams({ lines: form.elements.lines.value });
  if (form.elements.level.value) params.set("level", form.elements.level.value);
  let entries;
  try {
    entries = await api("GET", "/api/logs/recent?" + params);
  } catch (e) {
    say("Logs: " + e.message, true);
    return;
  }
  const body = document.getElementById("log-lines");
  body.replaceChildren(...entries.map((e) => el("tr", { class: "lvl-" + e.level.toLowerCase() },
    el("td", { text: e.timestamp }), el("td", { text: e.level }), el("td", { text: e.logger }), el("td", { text: e.message }))));
  if (document.getElementById("l-follow").checked && body.lastElementChild) body.lastElementChild.scrollIntoView({ block: "nearest" });
}

function initLogs() {
  const form = document.getElementById("log-filter");
  form.addEventListener("change", refreshLogs);
  form.addEventListener("submit", (ev) => { ev.preventDefault(); refreshLogs(); });
  refreshLogs();
  setInterval(() => { if (document.getElementById("l-follow").checked) refreshLogs(); }, REFRESH_MS);
}

// ---- Settings ---------------------------------------------------------------------------------------

async function initSettings() {
  let s;
  try {
    s = await api("GET", "/api/config");
  } catch (e) {
    say("Settings: " + e.message, true);
    return;
  }
  document.getElementById("config").replaceChildren(...Object.entries(s.config).map(([k, v]) =>
    el("tr", {}, el("th", { scope: "row", text: k }), el("td", { text: typeof v === "string" ? v : JSON.stringify(v) }))));
  document.getElementById("nodes-yml").textContent = s.nodesYml == null ? "(no nodes.yml)" : s.nodesYml;
  const box = document.getElementById("filter-files");
  if (!s.filterFiles.length) {
    box.append(el("p", { class: "hint", text: "No filter files (routings.yml, mutations.yml, sortings.yml, lua.yml) in the data directory." }));
  }
  for (const f of s.filterFiles) {
    box.append(el("h3", { text: f.name }), el("pre", { tabindex: 0, text: f.text == null ? "(cannot be read)" : f.text }));
  }
}

// ---- Node edit ----------------------------------------------------------------------------------------

const NULLABLE_INTS = ["processDelay", "batchSize", "minimumLineSpeed", "stallThreshold"];

function fillNodeForm(form, node) {
  const f = form.elements;
  f.hostName.value = node.hostName;
  f.port.value = node.port;
  f.priority.value = node.priority;
  for (const n of NULLABLE_INTS) f[n].value = node[n] == null ? "" : node[n];
  f.transferSyntax.value = node.transferSyntax || "";
  f.aliases.value = node.aliases.join(", ");
  f.processSchedule.value = node.processSchedule.join("\n");
  f.sopClassPriorities.value = (node.sopClassPriorities || []).join("\n");
  f.impersonate.checked = node.impersonate;
}

function nodeFormBody(form) {
  const f = form.elements;
  const lines = (v) => v.split("\n").map((s) => s.trim()).filter(Boolean);
  const whole = (v) => (/^-?\d+$/.test(v.trim()) ? Number(v.trim()) : v.trim());
  const body = {
    role: form.dataset.role,
    hostName: f.hostName.value.trim(),
    port: whole(f.port.value),
    priority: whole(f.priority.value),
    impersonate: f.impersonate.checked,
    transferSyntax: f.transferSyntax.value.trim() || null,
    aliases: f.aliases.value.split(",").map((s) => s.trim()).filter(Boolean),
    processSchedule: lines(f.processSchedule.value),
    sopClassPriorities: lines(f.sopClassPriorities.value).length ? lines(f.sopClassPriorities.value) : null,
  };
  for (const n of NULLABLE_INTS) body[n] = f[n].value.trim() === "" ? null : whole(f[n].value);
  return body;
}

// Which field an error message is about: the API names a field by its JSON name ("port: wrong
// type") or by its nodes.yml key ("request body: Port = 0: must be ...").
function fieldOf(form, message) {
  for (const div of form.querySelectorAll(".field")) {
    const name = div.dataset.field;
    const key = div.dataset.key;
    if (message.startsWith(name + ":") || message.includes(`: ${key} =`) || message.includes(`: ${key}:`)) return div;
  }
  return null;
}

function showFieldError(form, message) {
  for (const span of form.querySelectorAll(".field .error")) span.textContent = "";
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  const top = document.getElementById("form-error");
  top.textContent = "";
  if (!message) return;
  const div = fieldOf(form, message);
  if (div) {
    div.querySelector(".error").textContent = message;
    const input = div.querySelector("input, textarea");
    input.setAttribute("aria-invalid", "true");
    input.focus();
  } else {
    top.textContent = message;
  }
}

async function initNodeEdit() {
  const form = document.getElementById("node-form");
  const path = `/api/nodes/${encodeURIComponent(form.dataset.ae)}`;
  const query = `?role=${encodeURIComponent(form.dataset.role)}`;
  const note = document.getElementById("edit-pause-note");
  let node;
  try {
    node = await api("GET", path + query);
  } catch (e) {
    showFieldError(form, e.message);
    return;
  }
  fillNodeForm(form, node);
  // as Capacitor's inline edit does: the node is paused before it is edited
  const pauseFirst = async () => {
    node = await api("POST", path + "/pause" + query);
    note.textContent = `${node.aeTitle} has been paused for editing; resume it when done.`;
  };
  const running = () => node.status !== "none" && !node.paused;
  const intended = sessionStorage.getItem(EDIT_INTENT) === `${form.dataset.ae}|${form.dataset.role}`;
  sessionStorage.removeItem(EDIT_INTENT);
  if (running() && intended) {
    try {
      await pauseFirst();
    } catch (e) {
      note.textContent = `Could not pause ${form.dataset.ae}: ${e.message}`;
    }
  } else if (running()) {
    // not opened from its card (typed, a link from elsewhere): not paused until the operator saves
    note.textContent = `${node.aeTitle} is not paused yet (this page was not opened from its card); saving pauses it first.`;
  } else if (node.paused) {
    note.textContent = `${node.aeTitle} is paused.`;
  }
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showFieldError(form, "");
    try {
      if (running()) await pauseFirst();
      node = await api("PUT", path + query, nodeFormBody(form));
      fillNodeForm(form, node);
      say(`Saved ${node.aeTitle} to nodes.yml`);
    } catch (e) {
      showFieldError(form, e.message);
      say(`Not saved: ${e.message}`, true);
    }
  });
  document.getElementById("resume-after-edit").addEventListener("click", () =>
    act(`Resume ${form.dataset.ae}`, () => api("POST", path + "/resume" + query)).then((n) => {
      if (n) note.textContent = `${n.aeTitle} resumed.`;
    }));
}

// ---- Login / logout ------------------------------------------------------------------------------------

// Where to go after logging in: a page of this site only. The target is resolved by the URL parser
// location.assign uses (which drops tabs and newlines and reads "\\" as "/": "/\t/evil" is
// "//evil", another site) and kept only when it stays on this origin.
function safeNext(next) {
  if (!next || !next.startsWith("/")) return "/";
  let url;
  try {
    url = new URL(next, location.origin);
  } catch (e) {
    return "/";
  }
  return url.origin === location.origin ? url.pathname + url.search + url.hash : "/";
}

function initLogin() {
  const form = document.getElementById("login-form");
  if (!form) return;
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const error = document.getElementById("login-error");
    error.textContent = "";
    try {
      const resp = await fetch("/api/auth/login", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ password: form.elements.password.value }),
      });
      const envelope = await resp.json();
      if (!envelope.ok) throw new Error(envelope.error.message);
      location.assign(safeNext(form.dataset.next));
    } catch (e) {
      error.textContent = e.message;
      form.elements.password.select();
    }
  });
}

function initLogout() {
  const button = document.getElementById("logout");
  if (!button) return;
  button.addEventListener("click", async () => {
    await fetch("/api/auth/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": CSRF } });
    location.assign("/");
  });
}

const PAGES = {
  dashboard: initDashboard, queue: initQueue, item: initItem, logs: initLogs,
  settings: initSettings, "node-edit": initNodeEdit, login: initLogin,
};

initLogout();
if (PAGES[PAGE]) PAGES[PAGE]();
