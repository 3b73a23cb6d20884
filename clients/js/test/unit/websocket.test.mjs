// One tab (no sharing): connecting over WebSocket, frames, dedupe, acks, close codes,
// backoff, 401 handling and token refresh.
import { test } from "node:test";
import assert from "node:assert/strict";
import { flush, jwt, world, URL_BASE } from "./helpers.mjs";

const solo = { shareAcrossTabs: false };

test("connects to /ws with the token, topics and the stored since; messages carry channel, data, id, replaces", async () => {
  const w = world();
  w.storage.set("herald:last-id:herald.test:8080:alice", "1700000000000-3");
  const { client, log } = await w.tab({ ...solo, topics: ["news", "ops"] });
  const ws = w.lastSocket();
  assert.equal(w.sockets.length, 1);
  assert.equal(new URL(ws.url).origin, "ws://herald.test:8080");
  assert.equal(new URL(ws.url).pathname, "/ws");
  assert.equal(ws.query.get("token"), "tok1");
  assert.equal(ws.query.get("since"), "1700000000000-3");
  assert.equal(ws.query.get("topics"), "news,ops");
  assert.deepEqual(log.states(), ["connecting", "connecting"]);

  ws.welcome({ unread: 2 });
  assert.deepEqual(log.state.at(-1), { state: "open", transport: "websocket", leader: true });
  assert.equal(log.welcome[0].unread, 2);
  assert.equal(client.state.state, "open");
  assert.ok(client.isLeader);

  ws.receive({ type: "message", channel: "broadcast", data: "maintenance at 22:00" });
  ws.receive({ type: "message", channel: "user:alice", id: "1700000000000-4", data: { text: "x" }, extra: 1 });
  ws.receive({ type: "message", channel: "user:alice", id: "1700000000001-0", replaces: "1700000000000-4", data: { text: "y" } });
  assert.deepEqual(log.message, [
    { channel: "broadcast", data: "maintenance at 22:00" },
    { channel: "user:alice", id: "1700000000000-4", data: { text: "x" } },
    { channel: "user:alice", id: "1700000000001-0", replaces: "1700000000000-4", data: { text: "y" } },
  ]);
  assert.equal(client.lastId, "1700000000001-0");
  assert.equal(w.storage.get("herald:last-id:herald.test:8080:alice"), "1700000000001-0");
  client.stop();
});

test("durable messages at or before the last processed id are dropped (numeric order)", async () => {
  const w = world();
  const { client, log } = await w.tab(solo);
  const ws = w.lastSocket();
  ws.welcome();
  for (const id of ["10-0", "9-5", "10-0", "10-1", "100-0", "99-9"]) {
    ws.receive({ type: "message", channel: "user:alice", id, data: id });
  }
  assert.deepEqual(log.message.map((m) => m.id), ["10-0", "10-1", "100-0"]);
  // Plain messages have no id and are never dropped.
  ws.receive({ type: "message", channel: "topic:a", data: 1 });
  ws.receive({ type: "message", channel: "topic:a", data: 1 });
  assert.equal(log.message.length, 5);
  client.stop();
});

test("gap, read, retract and server error frames become events; the session stays open", async () => {
  const w = world();
  const { client, log } = await w.tab(solo);
  const ws = w.lastSocket();
  ws.welcome();
  ws.receive({ type: "gap", reason: "trimmed" });
  ws.receive({ type: "read", id: "5-0" });
  ws.receive({ type: "retract", id: "4-0" });
  ws.receive({ type: "error", error: "ack_failed" });
  ws.receive({ type: "pong" });
  ws.receive("not json");
  assert.deepEqual(log.gap, [{ reason: "trimmed" }]);
  assert.deepEqual(log.read, [{ id: "5-0" }]);
  assert.deepEqual(log.retract, [{ id: "4-0" }]);
  assert.deepEqual(log.error, [{ error: "ack_failed" }]);
  assert.equal(w.sockets.length, 1);
  client.stop();
});

test("ack sends an ack frame; an ack before the welcome waits for it; bad ids throw", async () => {
  const w = world();
  const { client, log } = await w.tab(solo);
  const ws = w.lastSocket();
  await client.ack("7-0");
  await client.ack("6-0");
  assert.deepEqual(ws.sent, []);
  ws.welcome();
  await flush();
  assert.deepEqual(ws.sent, [{ type: "ack", id: "7-0" }]);
  await client.ack("8-1");
  assert.deepEqual(ws.sent.at(-1), { type: "ack", id: "8-1" });
  assert.deepEqual(log.read, [
    { id: "7-0", local: true },
    { id: "8-1", local: true },
  ]);
  await assert.rejects(client.ack("nope"), TypeError);
  client.stop();
});

test("1012 (draining/resync): quick jittered reconnect (0-5 s) with since", async () => {
  const w = world();
  const { client, log } = await w.tab(solo);
  w.lastSocket().welcome();
  w.lastSocket().receive({ type: "message", channel: "user:alice", id: "50-0", data: 1 });
  w.clock.rand = 0.9;
  w.lastSocket().serverClose(1012, "resync");
  const r = log.state.at(-1);
  assert.equal(r.state, "reconnecting");
  assert.equal(r.code, 1012);
  assert.equal(r.reason, "resync");
  assert.equal(r.delay, 4500);
  await w.clock.advance(4499);
  assert.equal(w.sockets.length, 1);
  await w.clock.advance(1);
  assert.equal(w.sockets.length, 2);
  assert.equal(w.lastSocket().query.get("since"), "50-0");
  client.stop();
});

test("4001 slow consumer: backoff starting at 1 s", async () => {
  const w = world();
  const { client, log } = await w.tab(solo);
  w.clock.rand = 0;
  w.lastSocket().welcome();
  w.lastSocket().serverClose(4001, "slow_consumer");
  assert.equal(log.state.at(-1).delay, 1000);
  client.stop();
});

test("4002 kicked: no reconnect, state kicked", async () => {
  const w = world();
  const { client, log } = await w.tab(solo);
  w.lastSocket().welcome();
  w.lastSocket().serverClose(4002, "kicked");
  assert.deepEqual(log.state.at(-1), { state: "kicked", code: 4002, reason: "kicked", leader: true });
  await w.clock.advance(600_000);
  assert.equal(w.sockets.length, 1);
  assert.equal(client.state.state, "kicked");
  client.stop();
});

test("start() after kicked starts over", async () => {
  const w = world();
  const { client, log } = await w.tab(solo);
  w.lastSocket().welcome();
  w.lastSocket().serverClose(4002, "kicked");
  assert.equal(client.state.state, "kicked");
  await client.start();
  await flush();
  assert.equal(w.sockets.length, 2);
  w.lastSocket().welcome();
  assert.equal(log.states().at(-1), "open");
  client.stop();
});

test("an ack while the socket is closing waits for the next welcome", async () => {
  const w = world();
  const { client } = await w.tab(solo);
  const ws = w.lastSocket();
  ws.welcome();
  ws.readyState = 2; // closing: send throws
  await client.ack("4-0");
  ws.serverClose(1006);
  await w.clock.advance(1000);
  w.lastSocket().welcome();
  await flush();
  assert.deepEqual(w.lastSocket().sent, [{ type: "ack", id: "4-0" }]);
  client.stop();
});

test("4003 token_expired: a fresh token from getToken, reconnect at once", async () => {
  const w = world();
  const { client, log } = await w.tab(solo);
  w.lastSocket().welcome();
  await w.clock.advance(3_600_000);
  assert.equal(w.tokenCalls(), 1);
  w.lastSocket().serverClose(4003, "token_expired");
  assert.equal(log.state.at(-1).delay, 0);
  await w.clock.advance(0);
  assert.equal(w.tokenCalls(), 2);
  assert.equal(w.sockets.length, 2);
  assert.equal(w.lastSocket().query.get("token"), "tok2");
  client.stop();
});

test("4003 right after connecting (the new token did not help): backoff, not a tight loop", async () => {
  const w = world();
  const { client, log } = await w.tab(solo);
  w.clock.rand = 0.5;
  w.lastSocket().welcome();
  w.lastSocket().serverClose(4003, "token_expired");
  assert.equal(log.state.at(-1).delay, 250);
  client.stop();
});

test("4000 / 1006 / network: exponential backoff with full jitter, capped; reset after a minute open", async () => {
  const w = world();
  const { client, log } = await w.tab(solo);
  w.clock.rand = 0.5;
  w.lastSocket().welcome();
  const delays = [];
  for (let i = 0; i < 8; i++) {
    w.lastSocket().serverClose(i % 2 ? 1006 : 4000);
    delays.push(log.state.at(-1).delay);
    await w.clock.advance(delays.at(-1));
    w.lastSocket().welcome();
  }
  assert.deepEqual(delays, [250, 500, 1000, 2000, 4000, 8000, 15000, 15000]);
  // A connection that lasted a minute resets the attempt counter.
  await w.clock.advance(60_000);
  w.lastSocket().serverClose(1006);
  assert.equal(log.state.at(-1).delay, 250);
  client.stop();
});

test("401 at connect: getToken once more, then unauthorized (no further attempts)", async () => {
  const w = world({ route: (url) => (url.includes("/ws?") ? { status: 401, body: { error: "unauthorized" } } : { status: 404 }) });
  const { client, log } = await w.tab(solo);
  w.lastSocket().fail();
  await flush();
  assert.equal(w.fetchCalls.length, 1, "a probe learns the status");
  assert.match(w.fetchCalls[0].url, /^http:\/\/herald\.test:8080\/ws\?token=tok1/);
  await w.clock.advance(0);
  assert.equal(w.tokenCalls(), 2);
  assert.equal(w.sockets.length, 2);
  assert.equal(w.lastSocket().query.get("token"), "tok2");
  w.lastSocket().fail();
  await flush();
  assert.deepEqual(log.state.at(-1), { state: "unauthorized", code: 401, reason: "unauthorized", leader: true });
  await w.clock.advance(600_000);
  assert.equal(w.sockets.length, 2);
  assert.equal(w.sources.length, 0);
  client.stop();
});

test("401 after a success is a new chance: the retry budget resets at every welcome", async () => {
  const w = world({ route: () => ({ status: 401 }) });
  const { client, log } = await w.tab(solo);
  w.lastSocket().fail();
  await w.clock.advance(0);
  w.lastSocket().welcome();
  w.lastSocket().serverClose(1006);
  await w.clock.advance(30_000);
  w.lastSocket().fail();
  await w.clock.advance(0);
  assert.notEqual(client.state.state, "unauthorized");
  assert.equal(w.sockets.length, 4);
  assert.ok(log.states().includes("reconnecting"));
  client.stop();
});

test("503 at connect: backoff, no switch to SSE", async () => {
  const w = world({ route: () => ({ status: 503, body: { error: "draining" } }) });
  const { client } = await w.tab(solo);
  w.lastSocket().fail();
  await w.clock.advance(100_000);
  assert.equal(w.sources.length, 0);
  assert.ok(w.sockets.length >= 2);
  client.stop();
});

test("bad_since: the stored id is forgotten and the next connect has no since", async () => {
  const w = world({ route: () => ({ status: 400, body: { error: "bad_since" } }) });
  w.storage.set("herald:last-id:herald.test:8080:alice", "99999999999999999999-0");
  const { client, log } = await w.tab(solo);
  assert.equal(w.lastSocket().query.get("since"), "99999999999999999999-0");
  w.lastSocket().fail();
  await w.clock.advance(1000);
  assert.equal(log.error[0].error, "bad_since");
  assert.equal(w.lastSocket().query.get("since"), null);
  assert.equal(w.storage.get("herald:last-id:herald.test:8080:alice"), "");
  client.stop();
});

test("token refresh: refreshMargin before exp, getToken and a refresh frame; refreshed reschedules", async () => {
  const w = world();
  const now = () => Math.floor(w.clock.now() / 1000);
  let n = 0;
  const { client, log } = await w.tab({
    ...solo,
    getToken: () => jwt({ sub: "alice", exp: now() + 300, n: ++n }),
  });
  const ws = w.lastSocket();
  ws.welcome({ exp: now() + 300 });
  await w.clock.advance(269_000);
  assert.equal(ws.sent.length, 0);
  await w.clock.advance(1_000);
  assert.equal(n, 2);
  assert.equal(ws.sent.at(-1).type, "refresh");
  assert.equal(ws.sent.at(-1).token.split(".").length, 3);
  ws.receive({ type: "refreshed", exp: now() + 300 });
  await w.clock.advance(270_000);
  assert.equal(n, 3);
  assert.equal(ws.sent.filter((f) => f.type === "refresh").length, 2);
  assert.equal(w.sockets.length, 1);
  assert.equal(log.error.length, 0);
  client.stop();
});

test("refresh_failed: reconnect with a fresh token", async () => {
  const w = world();
  const { client, log } = await w.tab(solo);
  const ws = w.lastSocket();
  ws.welcome({ exp: Math.floor(w.clock.now() / 1000) + 60 });
  await w.clock.advance(30_000);
  assert.equal(ws.sent.at(-1).type, "refresh");
  assert.equal(w.tokenCalls(), 2);
  ws.receive({ type: "error", error: "refresh_failed", reason: "sub_mismatch" });
  assert.deepEqual(log.error.at(-1), { error: "refresh_failed", reason: "sub_mismatch" });
  assert.equal(ws.closedWith, 1000);
  await w.clock.advance(0);
  assert.equal(w.tokenCalls(), 3);
  assert.equal(w.sockets.length, 2);
  assert.equal(w.lastSocket().query.get("token"), "tok3");
  client.stop();
});

test("a server without in-band refresh (unknown_type) keeps the session and the new token", async () => {
  const w = world();
  const { client, log } = await w.tab(solo);
  const ws = w.lastSocket();
  ws.welcome({ exp: Math.floor(w.clock.now() / 1000) + 60 });
  await w.clock.advance(30_000);
  ws.receive({ type: "error", error: "unknown_type" });
  assert.equal(log.error.length, 0);
  assert.equal(w.sockets.length, 1);
  ws.serverClose(1006);
  await w.clock.advance(1_000);
  assert.equal(w.lastSocket().query.get("token"), "tok2");
  client.stop();
});

test("stop(): closes with 1000, state closed, no reconnect", async () => {
  const w = world();
  const { client, log } = await w.tab(solo);
  const ws = w.lastSocket();
  ws.welcome();
  client.stop();
  assert.equal(ws.closedWith, 1000);
  assert.equal(log.states().at(-1), "closed");
  await w.clock.advance(600_000);
  assert.equal(w.sockets.length, 1);
});

test("the user defaults to the token's sub (JWT) or the token itself (--dev)", async () => {
  const w = world();
  const { client } = await w.tab({ ...solo, user: undefined, getToken: () => jwt({ sub: "u42", exp: 2e9 }) });
  w.lastSocket().welcome();
  w.lastSocket().receive({ type: "message", channel: "user:u42", id: "1-0", data: 0 });
  assert.equal(w.storage.get("herald:last-id:herald.test:8080:u42"), "1-0");
  client.stop();
  const { client: c2 } = await w.tab({ ...solo, user: undefined, getToken: () => "bob" });
  w.lastSocket().welcome();
  w.lastSocket().receive({ type: "message", channel: "user:bob", id: "2-0", data: 0 });
  assert.equal(w.storage.get("herald:last-id:herald.test:8080:bob"), "2-0");
  c2.stop();
});

test("url: https maps to wss, a path prefix is kept", async () => {
  const w = world();
  const { client } = await w.tab({ ...solo, url: "https://example.com/herald/" });
  assert.match(w.lastSocket().url, /^wss:\/\/example\.com\/herald\/ws\?/);
  client.stop();
  void URL_BASE;
});

test("an async storage works", async () => {
  const m = new Map([["k", "5-0"]]);
  const storage = { get: async (k) => m.get(k), set: async (k, v) => void m.set(k, v) };
  const w = world({ storage });
  const { client } = await w.tab({ ...solo, storageKey: "k" });
  assert.equal(w.lastSocket().query.get("since"), "5-0");
  w.lastSocket().welcome();
  w.lastSocket().receive({ type: "message", channel: "user:alice", id: "6-0", data: 0 });
  await flush();
  assert.equal(m.get("k"), "6-0");
  client.stop();
});
