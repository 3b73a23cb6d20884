// herald demo page: connects with the built client (./herald/, a copy of clients/js/dist
// made by `npm run build`) and shows every notification as a toast.
//
// Query parameters (all optional): node=<herald URL>, user=<id> (connects at once),
// topics=a,b (--dev only), transport=auto|websocket|sse, token_url=<URL answering a JWT>,
// election=broadcast (tab election without Web Locks).
// Without node=, a page served by a herald node uses that node (its own origin), any other
// page http://127.0.0.1:8080 (the README's `cargo run --release -- --dev`).

import { HeraldClient } from "./herald/index.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const tokenUrl = params.get("token_url");

/** ?node=, else this page's own origin when it is a herald node (GET /healthz → "ok"), else :8080. */
async function defaultNode() {
  if (params.get("node")) return params.get("node");
  if (location.protocol.startsWith("http")) {
    try {
      const res = await fetch("/healthz", { cache: "no-store" });
      if (res.ok && (await res.text()).trim() === "ok") return location.origin;
    } catch {
      /* not served by herald */
    }
  }
  return "http://127.0.0.1:8080";
}

$("node").value = await defaultNode();
$("user").value = params.get("user") ?? "";
$("topics").value = params.get("topics") ?? "";

/** Everything received by this tab, kept across reloads of the tab (sessionStorage). */
const LOG_KEY = "herald-demo:log";
const received = JSON.parse(sessionStorage.getItem(LOG_KEY) ?? "[]");
window.received = received;
for (const m of received) appendLog(m);

let client = null;
window.herald = null;

function appendLog(m) {
  const li = document.createElement("li");
  if (m.id) li.dataset.id = m.id;
  const text = typeof m.data === "object" && m.data && "text" in m.data ? m.data.text : JSON.stringify(m.data);
  li.textContent = `${m.channel}: ${text} `;
  if (m.id) {
    const c = document.createElement("code");
    c.textContent = m.id;
    li.append(c);
  }
  $("log").prepend(li);
}

function toast(title, sub, kind = "") {
  const el = document.createElement("div");
  el.className = `toast ${kind}`;
  el.textContent = title;
  const s = document.createElement("small");
  s.textContent = sub;
  el.append(s);
  $("toasts").prepend(el);
  while ($("toasts").children.length > 5) $("toasts").lastChild.remove();
  setTimeout(() => el.remove(), 6000);
}

function showState(s) {
  let text = s.state;
  if (s.transport) text += ` (${s.transport})`;
  if (s.state === "reconnecting") text += ` in ${(s.delay / 1000).toFixed(1)} s`;
  if (s.code) text += `, code ${s.code}`;
  if (s.reason) text += ` ${s.reason}`;
  text += s.leader ? " · this tab holds the connection" : " · shared from another tab";
  $("status").textContent = text;
  $("status").dataset.state = s.state;
}

function connect(node, user, topics) {
  if (client) client.stop();
  const url = new URL(node, location.href);
  $("curl").textContent =
    `curl -s -XPOST ${url.origin}/api/publish -d '${JSON.stringify({ user, data: { text: "your export is ready" } })}'`;
  client = new HeraldClient({
    url: url.href,
    user,
    // --dev: the token is the user id. A real app asks its backend for a JWT here, as
    // ?token_url= does (GET <token_url>&user=<id> answers a JWT as text).
    getToken: tokenUrl
      ? async () => (await fetch(`${tokenUrl}${tokenUrl.includes("?") ? "&" : "?"}user=${encodeURIComponent(user)}`)).text()
      : () => user,
    topics: topics.length ? topics : undefined,
    transport: params.get("transport") ?? "auto",
    // ?election=broadcast: elect the tab over BroadcastChannel, as where Web Locks are missing.
    env: params.get("election") === "broadcast" ? { locks: null } : undefined,
  });
  window.herald = client;
  window.states = [];
  window.welcomes = [];
  client.on("welcome", (w) => window.welcomes.push(w));
  client.on("state", (s) => {
    window.states.push(s);
    showState(s);
  });
  client.on("message", (m) => {
    received.push(m);
    sessionStorage.setItem(LOG_KEY, JSON.stringify(received));
    appendLog(m);
    const text = typeof m.data === "object" && m.data && "text" in m.data ? m.data.text : JSON.stringify(m.data);
    toast(text, m.id ? `${m.channel} · ${m.id}` : m.channel);
  });
  client.on("gap", (g) => toast("Some notifications are no longer available", g.reason, "gap"));
  client.on("retract", (r) => document.querySelector(`li[data-id="${r.id}"]`)?.remove());
  client.on("error", (e) => console.warn("herald:", e));
  client.start();
}

$("connect").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const user = $("user").value.trim();
  if (!user) return;
  const topics = $("topics").value.split(",").map((t) => t.trim()).filter(Boolean);
  const q = new URLSearchParams(location.search);
  q.set("node", $("node").value.trim());
  q.set("user", user);
  if (topics.length) q.set("topics", topics.join(","));
  else q.delete("topics");
  history.replaceState(null, "", `?${q}`);
  connect($("node").value.trim(), user, topics);
});

$("ack").addEventListener("click", () => {
  if (client?.lastId) client.ack(client.lastId);
});

if ($("user").value) $("connect").requestSubmit();
