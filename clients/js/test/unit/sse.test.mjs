// The SSE fallback: when to switch, the stream's events and close codes, acks over
// POST /ack, token refresh by reconnecting, and going back to WebSocket.
import { test } from "node:test";
import assert from "node:assert/strict";
import { flush, jwt, world } from "./helpers.mjs";

const solo = { shareAcrossTabs: false };
const reachable = () => ({ status: 400, body: { error: "not_websocket" } });

test("first connect fails before open and the node answers HTTP: switch to SSE at once", async () => {
  const w = world({ route: reachable });
  w.storage.set("herald:last-id:herald.test:8080:alice", "40-0");
  const { client, log } = await w.tab({ ...solo, topics: ["a"] });
  w.lastSocket().fail();
  await flush();
  assert.deepEqual(log.state.at(-1), { state: "reconnecting", delay: 0, reason: "websocket_unavailable", leader: true });
  await w.clock.advance(0);
  assert.equal(w.sources.length, 1);
  const es = w.lastSource();
  const u = new URL(es.url);
  assert.equal(u.origin + u.pathname, "http://herald.test:8080/sse");
  assert.equal(u.searchParams.get("token"), "tok1");
  assert.equal(u.searchParams.get("since"), "40-0");
  assert.equal(u.searchParams.get("topics"), "a");
  es.welcome();
  assert.deepEqual(log.state.at(-1), { state: "open", transport: "sse", leader: true });
  es.event({ type: "message", channel: "user:alice", id: "41-0", data: { a: 1 } }, "41-0");
  es.event({ type: "message", channel: "user:alice", id: "41-0", data: { a: 1 } }, "41-0");
  es.event({ type: "gap", reason: "replay_limit" });
  es.event({ type: "read", id: "41-0" });
  es.event({ type: "retract", id: "41-0" });
  // `event: error` from the server carries data: an error event, not a broken stream.
  es.event({ type: "error", error: "ack_failed" });
  assert.deepEqual(log.message, [{ channel: "user:alice", id: "41-0", data: { a: 1 } }]);
  assert.deepEqual(log.gap, [{ reason: "replay_limit" }]);
  assert.deepEqual(log.read, [{ id: "41-0" }]);
  assert.deepEqual(log.retract, [{ id: "41-0" }]);
  assert.deepEqual(log.error, [{ error: "ack_failed" }]);
  assert.equal(es.closed, false);
  assert.equal(w.storage.get("herald:last-id:herald.test:8080:alice"), "41-0");
  client.stop();
  assert.equal(es.closed, true);
});

test("probe learns nothing (no CORS, network error): SSE after sseAfterFailures consecutive failures", async () => {
  const w = world({
    route: () => {
      throw new TypeError("Failed to fetch");
    },
  });
  const { client } = await w.tab({ ...solo, sseAfterFailures: 3 });
  for (let i = 0; i < 2; i++) {
    w.lastSocket().fail();
    await w.clock.advance(30_000);
  }
  assert.equal(w.sockets.length, 3);
  assert.equal(w.sources.length, 0);
  w.lastSocket().fail();
  await w.clock.advance(0);
  assert.equal(w.sources.length, 1);
  client.stop();
});

test("a WebSocket that worked once needs sseAfterFailures failures, even if the node answers HTTP", async () => {
  const w = world({ route: reachable });
  const { client } = await w.tab({ ...solo, sseAfterFailures: 2 });
  w.lastSocket().welcome();
  w.lastSocket().serverClose(1006);
  await w.clock.advance(30_000);
  w.lastSocket().fail();
  await w.clock.advance(30_000);
  assert.equal(w.sources.length, 0);
  w.lastSocket().fail();
  await w.clock.advance(0);
  assert.equal(w.sources.length, 1);
  client.stop();
});

test("401 and 503 answers do not count towards the switch to SSE", async () => {
  const answers = [503, 503, 0];
  const w = world({
    route: () => {
      const a = answers.shift();
      if (a === 0 || a === undefined) throw new TypeError("Failed to fetch");
      return { status: a, body: { error: "draining" } };
    },
  });
  const { client } = await w.tab({ ...solo, sseAfterFailures: 2 });
  for (let i = 0; i < 3; i++) {
    w.lastSocket().fail();
    await w.clock.advance(30_000);
  }
  assert.equal(w.sources.length, 0, "two 503s and one unexplained failure: still WebSocket");
  w.lastSocket().fail();
  await w.clock.advance(0);
  assert.equal(w.sources.length, 1, "the second unexplained failure switches");
  client.stop();
});

test("transport: 'websocket' never falls back", async () => {
  const w = world({ route: reachable });
  const { client } = await w.tab({ ...solo, transport: "websocket" });
  for (let i = 0; i < 6; i++) {
    w.lastSocket().fail();
    await w.clock.advance(30_000);
  }
  assert.equal(w.sources.length, 0);
  client.stop();
});

test("SSE close events act as WebSocket closes: 1012 jitter, 4003 new token, 4002 kicked", async () => {
  const w = world();
  const { client, log } = await w.tab({ ...solo, transport: "sse" });
  let es = w.lastSource();
  es.welcome();
  es.event({ type: "message", channel: "user:alice", id: "7-0", data: 0 });
  w.clock.rand = 0.2;
  es.event({ type: "close", code: 1012, reason: "draining" });
  assert.equal(es.closed, true, "the EventSource is closed: the client decides when to reconnect");
  assert.deepEqual(log.state.at(-1), { state: "reconnecting", delay: 1000, code: 1012, reason: "draining", leader: true });
  await w.clock.advance(1000);
  es = w.lastSource();
  assert.equal(w.sources.length, 2);
  assert.equal(es.query.get("since"), "7-0");
  es.welcome();
  await w.clock.advance(60_000);
  es.event({ type: "close", code: 4003, reason: "token_expired" });
  await w.clock.advance(0);
  assert.equal(w.tokenCalls(), 2);
  es = w.lastSource();
  assert.equal(es.query.get("token"), "tok2");
  es.welcome();
  es.event({ type: "close", code: 4002, reason: "kicked" });
  assert.equal(client.state.state, "kicked");
  await w.clock.advance(600_000);
  assert.equal(w.sources.length, 3);
  assert.equal(w.sockets.length, 0);
  client.stop();
});

test("a broken SSE stream (EventSource error without data) reconnects with backoff", async () => {
  const w = world();
  const { client, log } = await w.tab({ ...solo, transport: "sse" });
  const es = w.lastSource();
  es.welcome();
  w.clock.rand = 0.5;
  es.fail();
  assert.equal(es.closed, true);
  assert.deepEqual(log.state.at(-1), { state: "reconnecting", delay: 250, code: 1006, reason: "sse_error", leader: true });
  client.stop();
});

test("ack over SSE: POST /ack with the user's token", async () => {
  const w = world({ route: (url) => (url.endsWith("/ack") ? { status: 200, body: { ok: true, moved: true, cursor: "9-0" } } : reachable()) });
  const { client, log } = await w.tab({ ...solo, transport: "sse" });
  w.lastSource().welcome();
  await client.ack("9-0");
  const call = w.fetchCalls.at(-1);
  assert.equal(call.url, "http://herald.test:8080/ack");
  assert.equal(call.init.method, "POST");
  assert.equal(call.init.headers.Authorization, "Bearer tok1");
  assert.deepEqual(JSON.parse(call.init.body), { id: "9-0" });
  assert.deepEqual(log.read, [{ id: "9-0", local: true }]);
  client.stop();
});

test("a refused POST /ack is reported and retried after the next welcome", async () => {
  let status = 401;
  const w = world({ route: (url) => (url.endsWith("/ack") ? { status } : reachable()) });
  const { client, log } = await w.tab({ ...solo, transport: "sse" });
  w.lastSource().welcome();
  await client.ack("9-0");
  assert.equal(log.error.at(-1).error, "ack_post_failed");
  status = 200;
  w.lastSource().fail();
  await w.clock.advance(1000);
  w.lastSource().welcome();
  await flush();
  assert.equal(w.fetchCalls.filter((c) => c.url.endsWith("/ack")).length, 2);
  assert.deepEqual(log.read, [{ id: "9-0", local: true }]);
  client.stop();
});

test("a 429 on POST /ack keeps only the newest id and sends it after Retry-After", async () => {
  let status = 429;
  const w = world({
    route: (url) =>
      url.endsWith("/ack")
        ? status === 429
          ? { status, headers: { "retry-after": "2" } }
          : { status, body: { ok: true, moved: true, cursor: "12-0" } }
        : reachable(),
  });
  const { client, log } = await w.tab({ ...solo, transport: "sse" });
  w.lastSource().welcome();
  await client.ack("10-0");
  await client.ack("12-0");
  await client.ack("11-0");
  const acks = () => w.fetchCalls.filter((c) => c.url.endsWith("/ack"));
  assert.equal(acks().length, 1, "after a 429, acks wait for the retry");
  assert.equal(log.error.filter((e) => e.error === "ack_post_failed").length, 0, "a 429 is not an error");
  status = 200;
  await w.clock.advance(1_999);
  assert.equal(acks().length, 1, "nothing before Retry-After");
  await w.clock.advance(1);
  await flush();
  assert.equal(acks().length, 2, "one retry for all three");
  assert.deepEqual(JSON.parse(acks().at(-1).init.body), { id: "12-0" }, "the newest id");
  assert.deepEqual(log.read, [{ id: "12-0", local: true }]);
  client.stop();
});

test("token refresh over SSE: reconnect with the new token (and since) before exp", async () => {
  const w = world();
  const now = () => Math.floor(w.clock.now() / 1000);
  let n = 0;
  const { client } = await w.tab({ ...solo, transport: "sse", getToken: () => jwt({ sub: "alice", exp: now() + 120, n: ++n }) });
  const es = w.lastSource();
  es.welcome({ exp: now() + 120 });
  es.event({ type: "message", channel: "user:alice", id: "3-0", data: 0 });
  await w.clock.advance(89_000);
  assert.equal(w.sources.length, 1);
  await w.clock.advance(1_000);
  assert.equal(es.closed, true);
  assert.equal(w.sources.length, 2);
  assert.equal(n, 2);
  assert.equal(w.lastSource().query.get("since"), "3-0");
  assert.equal(JSON.parse(Buffer.from(w.lastSource().query.get("token").split(".")[1], "base64url")).n, 2);
  client.stop();
});

test("on SSE, WebSocket is tried again later; its welcome switches over and closes the stream", async () => {
  const w = world({ route: reachable });
  const { client, log } = await w.tab({ ...solo, wsRetryInterval: 60_000 });
  w.lastSocket().fail();
  await w.clock.advance(0);
  const es = w.lastSource();
  es.welcome();
  es.event({ type: "message", channel: "user:alice", id: "5-0", data: 0 });
  w.clock.rand = 0.5;
  await w.clock.advance(59_999);
  assert.equal(w.sockets.length, 1);
  await w.clock.advance(1);
  assert.equal(w.sockets.length, 2);
  const trial = w.lastSocket();
  assert.equal(trial.query.get("since"), "5-0");
  // A failed trial leaves SSE alone and is tried again later.
  trial.fail();
  await w.clock.advance(60_000);
  assert.equal(es.closed, false);
  assert.equal(w.sockets.length, 3);
  const ws = w.lastSocket();
  ws.welcome();
  assert.equal(es.closed, true);
  assert.deepEqual(log.state.at(-1), { state: "open", transport: "websocket", leader: true });
  ws.receive({ type: "message", channel: "user:alice", id: "5-0", data: 0 });
  ws.receive({ type: "message", channel: "user:alice", id: "6-0", data: 0 });
  assert.deepEqual(log.message.map((m) => m.id), ["5-0", "6-0"]);
  client.stop();
});

test("SSE failing to open sseAfterFailures times: back to WebSocket", async () => {
  const w = world({
    route: () => {
      throw new TypeError("Failed to fetch");
    },
  });
  const { client } = await w.tab({ ...solo, sseAfterFailures: 2 });
  w.lastSocket().fail();
  await w.clock.advance(30_000);
  w.lastSocket().fail();
  await w.clock.advance(0);
  assert.equal(w.sources.length, 1);
  w.lastSource().fail();
  await w.clock.advance(30_000);
  w.lastSource().fail();
  await w.clock.advance(30_000);
  assert.equal(w.sources.length, 2);
  assert.equal(w.sockets.length, 3);
  client.stop();
});

test("401 on SSE connect: the probe tells, one fresh token, then unauthorized", async () => {
  const w = world({ route: () => ({ status: 401 }) });
  const { client } = await w.tab({ ...solo, transport: "sse" });
  w.lastSource().fail();
  await w.clock.advance(0);
  assert.equal(w.tokenCalls(), 2);
  w.lastSource().fail();
  await w.clock.advance(0);
  assert.equal(client.state.state, "unauthorized");
  client.stop();
});
