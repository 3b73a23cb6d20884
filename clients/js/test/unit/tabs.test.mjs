// One connection per browser: leader election (Web Locks, BroadcastChannel fallback),
// sharing frames, state, acks and the durable id, and takeover without loss.
import { test } from "node:test";
import assert from "node:assert/strict";
import { flush, world } from "./helpers.mjs";
import { CLAIM_WAIT_MS, LEADER_DEAD_MS } from "../../dist/leader.js";

const KEY = "herald:last-id:herald.test:8080:alice";

test("Web Locks: two tabs, one socket; both tabs get every message and the state", async () => {
  const w = world();
  const a = await w.tab();
  const b = await w.tab();
  assert.equal(w.sockets.length, 1);
  assert.ok(a.client.isLeader);
  assert.ok(!b.client.isLeader);
  w.lastSocket().welcome();
  await flush();
  assert.deepEqual(b.client.state, { state: "open", transport: "websocket", leader: false });
  w.lastSocket().receive({ type: "message", channel: "broadcast", data: "hi" });
  w.lastSocket().receive({ type: "message", channel: "user:alice", id: "1-0", data: 1 });
  w.lastSocket().receive({ type: "gap", reason: "trimmed" });
  w.lastSocket().receive({ type: "read", id: "1-0" });
  w.lastSocket().receive({ type: "retract", id: "1-0" });
  await flush();
  for (const t of [a, b]) {
    assert.deepEqual(t.log.message, [
      { channel: "broadcast", data: "hi" },
      { channel: "user:alice", id: "1-0", data: 1 },
    ]);
    assert.deepEqual(t.log.gap, [{ reason: "trimmed" }]);
    assert.deepEqual(t.log.read, [{ id: "1-0" }]);
    assert.deepEqual(t.log.retract, [{ id: "1-0" }]);
  }
  assert.equal(b.client.lastId, "1-0");
  a.client.stop();
  b.client.stop();
});

test("a tab that opens later learns the current state from the leader", async () => {
  const w = world();
  const a = await w.tab();
  w.lastSocket().welcome();
  const b = await w.tab();
  await flush();
  assert.deepEqual(b.client.state, { state: "open", transport: "websocket", leader: false });
  a.client.stop();
  b.client.stop();
});

test("a follower's ack goes to the leader's socket; every tab gets a local read", async () => {
  const w = world();
  const a = await w.tab();
  const b = await w.tab();
  const ws = w.lastSocket();
  ws.welcome();
  await flush();
  await b.client.ack("3-0");
  await flush();
  assert.deepEqual(ws.sent, [{ type: "ack", id: "3-0" }]);
  assert.deepEqual(a.log.read, [{ id: "3-0", local: true }]);
  assert.deepEqual(b.log.read, [{ id: "3-0", local: true }]);
  a.client.stop();
  b.client.stop();
});

test("leader closes: the next tab takes over with since = the last durable id; no loss, no duplicate", async () => {
  const w = world();
  const a = await w.tab();
  const b = await w.tab();
  const c = await w.tab();
  const ws1 = w.lastSocket();
  ws1.welcome();
  for (let i = 1; i <= 5; i++) ws1.receive({ type: "message", channel: "user:alice", id: `${i}-0`, data: i });
  await flush();
  a.client.stop();
  await flush();
  assert.equal(ws1.closedWith, 1000);
  assert.equal(w.sockets.length, 2);
  assert.ok(b.client.isLeader);
  const ws2 = w.lastSocket();
  assert.equal(ws2.query.get("since"), "5-0");
  // The server replays after since; a message the old leader already forwarded is dropped.
  ws2.welcome();
  for (let i = 4; i <= 7; i++) ws2.receive({ type: "message", channel: "user:alice", id: `${i}-0`, data: i });
  await flush();
  for (const t of [b, c]) {
    assert.deepEqual(
      t.log.message.map((m) => m.id),
      ["1-0", "2-0", "3-0", "4-0", "5-0", "6-0", "7-0"],
    );
  }
  assert.equal(w.storage.get(KEY), "7-0");
  b.client.stop();
  c.client.stop();
});

test("takeover when the old leader forwarded a message but died before storing it", async () => {
  const w = world();
  const a = await w.tab();
  const b = await w.tab();
  w.lastSocket().welcome();
  w.lastSocket().receive({ type: "message", channel: "user:alice", id: "1-0", data: 1 });
  await flush();
  // Storage lags behind (the old leader died between forwarding and storing).
  w.storage.set(KEY, "0-5");
  a.client.stop();
  await flush();
  assert.equal(w.lastSocket().query.get("since"), "1-0", "the new leader resumes from what it saw itself");
  b.client.stop();
});

test("takeover when storage is ahead of what reached the new leader", async () => {
  const w = world();
  const a = await w.tab();
  const b = await w.tab();
  w.lastSocket().welcome();
  await flush();
  w.storage.set(KEY, "9-0");
  a.client.stop();
  await flush();
  assert.equal(w.lastSocket().query.get("since"), "9-0");
  b.client.stop();
});

test("kicked reaches every tab, and no tab takes over to reconnect", async () => {
  const w = world();
  const a = await w.tab();
  const b = await w.tab();
  w.lastSocket().welcome();
  w.lastSocket().serverClose(4002, "kicked");
  await flush();
  assert.equal(b.client.state.state, "kicked");
  a.client.stop();
  await w.clock.advance(600_000);
  assert.equal(w.sockets.length, 1);
  b.client.stop();
});

test("shareAcrossTabs: false gives each tab its own socket", async () => {
  const w = world();
  const a = await w.tab({ shareAcrossTabs: false });
  const b = await w.tab({ shareAcrossTabs: false });
  assert.equal(w.sockets.length, 2);
  a.client.stop();
  b.client.stop();
});

test("pagehide hands over at once; pageshow from the back/forward cache rejoins", async () => {
  const w = world();
  const win = new EventTarget();
  const a = await w.tab({ env: { window: win } });
  const b = await w.tab();
  w.lastSocket().welcome();
  await flush();
  win.dispatchEvent(Object.assign(new Event("pagehide"), { persisted: true }));
  await flush();
  assert.ok(b.client.isLeader);
  assert.equal(w.sockets.length, 2);
  const ev = Object.assign(new Event("pageshow"), { persisted: true });
  win.dispatchEvent(ev);
  await flush();
  assert.equal(a.client.state.leader, false);
  assert.ok(!a.client.isLeader);
  a.client.stop();
  b.client.stop();
});

test("without Web Locks: BroadcastChannel election, one leader, takeover on resign and on silence", async () => {
  const w = world({ locks: false });
  const a = await w.tab();
  await w.clock.advance(CLAIM_WAIT_MS);
  assert.ok(a.client.isLeader);
  assert.equal(w.sockets.length, 1);
  const b = await w.tab();
  const c = await w.tab();
  await w.clock.advance(5 * CLAIM_WAIT_MS);
  assert.ok(!b.client.isLeader && !c.client.isLeader);
  assert.equal(w.sockets.length, 1);
  w.lastSocket().welcome();
  w.lastSocket().receive({ type: "message", channel: "user:alice", id: "1-0", data: 1 });
  await flush();
  assert.equal(b.log.message.length, 1);

  // The leader resigns (tab closed): exactly one of the others takes over.
  a.client.stop();
  await w.clock.advance(CLAIM_WAIT_MS + 100);
  assert.equal([b, c].filter((t) => t.client.isLeader).length, 1);
  assert.equal(w.sockets.length, 2);
  assert.equal(w.lastSocket().query.get("since"), "1-0");

  // A leader that goes silent (crashed without resigning) is replaced after LEADER_DEAD_MS.
  const leader = b.client.isLeader ? b : c;
  const other = leader === b ? c : b;
  leader.client.bus.close(); // crash: no more heartbeats, no resign
  leader.client.leadership.stop = () => {};
  leader.client.leadership.role = "idle";
  await w.clock.advance(LEADER_DEAD_MS + 2000);
  assert.ok(other.client.isLeader);
  assert.equal(w.sockets.length, 3);
  other.client.stop();
});

test("BroadcastChannel election: two simultaneous candidates end with one leader", async () => {
  const w = world({ locks: false });
  const [a, b] = await Promise.all([w.tab(), w.tab()]);
  await w.clock.advance(CLAIM_WAIT_MS * 3);
  assert.equal([a, b].filter((t) => t.client.isLeader).length, 1);
  assert.equal(w.sockets.length, 1);
  a.client.stop();
  b.client.stop();
});
