// Browser test cases, run against a standalone node (standalone.test.mjs) and through nginx
// in front of three nodes (cluster.test.mjs). `t` is { page: static page URL, node: the
// URL the page connects to, api: where the test publishes, browser }.

import assert from "node:assert/strict";
import {
  checkExactlyOnce,
  inbox,
  openDemo,
  presence,
  publish,
  publishSteadily,
  received,
  receivedIds,
  screenshot,
  uniqueUser,
  waitFor,
  waitOpen,
} from "./harness.mjs";

/**
 * Publishes a plain marker to `user` and waits until the page shows it: one session
 * delivers in order, so whatever was on its way before (a late duplicate) has arrived.
 */
export async function settle(t, page, user) {
  const text = `marker ${Math.random()}`;
  await publish(t.api, { user, data: { text } });
  await waitFor("the marker", async () => (await received(page)).some((m) => m.data?.text === text));
}

/** User, topic and broadcast messages arrive over WebSocket; other topics do not. */
export async function routing(t, label) {
  const user = uniqueUser("route");
  const ctx = await t.browser.newContext();
  try {
    const page = await openDemo(ctx, t.page, { node: t.node, user, topics: "a,b" });
    const st = await page.evaluate(() => window.herald.state);
    assert.equal(st.transport, "websocket");
    await publish(t.api, { user, data: { text: "for the user" } });
    await publish(t.api, { topic: "a", data: { text: "topic a" } });
    await publish(t.api, { topic: "b", data: { text: "topic b" } });
    await publish(t.api, { topic: "c-not-joined", data: { text: "topic c" } });
    await publish(t.api, { broadcast: true, data: { text: `broadcast for ${user}` } });
    await publish(t.api, { user, data: { text: "last" } });
    const got = await waitFor("the last message", async () => {
      const r = await received(page);
      return r.some((m) => m.data?.text === "last") && r;
    });
    const mine = got.filter((m) => m.channel !== "broadcast" || m.data?.text === `broadcast for ${user}`);
    assert.deepEqual(
      mine.map((m) => `${m.channel} ${m.data.text}`),
      [
        `user:${user} for the user`,
        "topic:a topic a",
        "topic:b topic b",
        `broadcast broadcast for ${user}`,
        `user:${user} last`,
      ],
    );
    await screenshot(page, `${label}-routing`);
  } finally {
    await ctx.close();
  }
}

/** Durable messages survive a reload (since): none missing, none twice; also across a closed tab. */
export async function reload(t, label) {
  const user = uniqueUser("reload");
  const ctx = await t.browser.newContext();
  try {
    let page = await openDemo(ctx, t.page, { node: t.node, user });
    const first = [];
    for (let i = 0; i < 3; i++) {
      first.push((await publish(t.api, { user, durable: true, data: { text: `before #${i}` } })).ids[user]);
    }
    await waitFor("3 durable messages", async () => (await receivedIds(page)).length >= 3);

    // Reload while messages keep coming (one every 25 ms), once 10 of them arrived.
    const steady = publishSteadily(t.api, user, 60, 25, "during reload");
    await waitFor("10 messages before the reload", async () => (await receivedIds(page)).length >= 13);
    await page.reload();
    await waitOpen(page);
    const during = await steady;
    const all = [...first, ...during];
    await waitFor("every durable message after the reload", async () => (await receivedIds(page)).length >= all.length);
    await settle(t, page, user);
    checkExactlyOnce(assert, await receivedIds(page), all, "across a reload");

    // Tab closed, messages published meanwhile, a new tab: exactly the missed ones.
    await page.close();
    const offline = [];
    for (let i = 0; i < 3; i++) {
      offline.push((await publish(t.api, { user, durable: true, data: { text: `while away #${i}` } })).ids[user]);
    }
    page = await openDemo(ctx, t.page, { node: t.node, user });
    await waitFor("the 3 missed messages", async () => (await receivedIds(page)).length >= 3);
    await settle(t, page, user);
    checkExactlyOnce(assert, await receivedIds(page), offline, "in a new tab");
    await screenshot(page, `${label}-reload`);
  } finally {
    await ctx.close();
  }
}

/** Two tabs of one browser: one socket (one session in presence), both show every message. */
export async function twoTabs(t, label, extra = "") {
  const user = uniqueUser("tabs");
  const ctx = await t.browser.newContext();
  try {
    const a = await openDemo(ctx, t.page, { node: t.node, user, extra });
    const b = await openDemo(ctx, t.page, { node: t.node, user, extra });
    assert.equal(await a.evaluate(() => window.herald.isLeader), true);
    assert.equal(await b.evaluate(() => window.herald.isLeader), false);
    const p = await waitFor("one session in presence", async () => {
      const r = await presence(t.api, user);
      return r.sessions.length === 1 && r;
    });
    assert.equal(p.sessions.length, 1);
    const ids = [];
    for (let i = 0; i < 4; i++) {
      const r = await publish(t.api, { user, durable: i % 2 === 0, data: { text: `to both #${i}` } });
      if (r.ids) ids.push(r.ids[user]);
    }
    for (const page of [a, b]) {
      await waitFor("4 messages in each tab", async () => (await received(page)).length >= 4);
    }
    for (const page of [a, b]) {
      const r = await received(page);
      assert.deepEqual(
        r.map((m) => m.data.text),
        [0, 1, 2, 3].map((i) => `to both #${i}`),
      );
    }
    // An ack from the tab without the socket reaches the server through the leader.
    await b.evaluate((id) => window.herald.ack(id), ids.at(-1));
    await waitFor("the read cursor at the acked id", async () => {
      return (await inbox(t.api, user)).cursor === ids.at(-1);
    });
    assert.equal((await presence(t.api, user)).sessions.length, 1);
    await screenshot(a, `${label}-two-tabs-a`);
    await screenshot(b, `${label}-two-tabs-b`);
  } finally {
    await ctx.close();
  }
}

/**
 * Closing the leader tab hands the connection over without losing a durable message
 * published during the handover (steady publishing through POST /api/publish).
 */
export async function handover(t, label, extra = "") {
  const user = uniqueUser("handover");
  const ctx = await t.browser.newContext();
  try {
    const a = await openDemo(ctx, t.page, { node: t.node, user, extra });
    const b = await openDemo(ctx, t.page, { node: t.node, user, extra });
    assert.equal(await a.evaluate(() => window.herald.isLeader), true);
    const steady = publishSteadily(t.api, user, 100, 25, "handover");
    await waitFor("20 messages before the handover", async () => (await receivedIds(b)).length >= 20);
    await a.close();
    await waitFor("tab b to hold the connection", () => b.evaluate(() => window.herald.isLeader), 10_000);
    const ids = await steady;
    await waitFor("every durable message in tab b", async () => (await receivedIds(b)).length >= ids.length, 20_000);
    await settle(t, b, user);
    checkExactlyOnce(assert, await receivedIds(b), ids, "after the handover");
    await waitFor("one session in presence", async () => (await presence(t.api, user)).sessions.length === 1, 10_000);
    await screenshot(b, `${label}-handover`);
  } finally {
    await ctx.close();
  }
}

/**
 * The node holding the session goes away under nginx (`signal` SIGTERM: drain, 1012; or
 * SIGKILL: 1006) while durable messages keep coming: the page reconnects through nginx to
 * another node and resumes with since; none missing, none twice.
 */
export async function nodeLoss(t, label, signal) {
  const user = uniqueUser(signal === "SIGKILL" ? "kill9" : "drain");
  const ctx = await t.browser.newContext();
  try {
    const page = await openDemo(ctx, t.page, { node: t.node, user });
    const p = await waitFor("the session in presence", async () => {
      const r = await presence(t.api, user);
      return r.sessions.length === 1 && r;
    });
    const holder = t.nodes.find((n) => n.id === p.sessions[0].node);
    assert.ok(holder, `session on ${p.sessions[0].node}`);
    const steady = publishSteadily(t.api, user, 120, 25, signal);
    await waitFor("20 messages before the node goes", async () => (await receivedIds(page)).length >= 20);
    process.kill(holder.pid(), signal);
    const ids = await steady;
    await waitFor("every durable message", async () => (await receivedIds(page)).length >= ids.length, 30_000);
    await settle(t, page, user);
    checkExactlyOnce(assert, await receivedIds(page), ids, `after ${signal} of ${holder.id}`);
    const states = await page.evaluate(() => window.states);
    const closes = states.filter((s) => s.state === "reconnecting").map((s) => s.code);
    if (signal === "SIGTERM") assert.ok(closes.includes(1012), `1012 seen (${JSON.stringify(closes)})`);
    assert.equal((await page.evaluate(() => window.herald.state)).state, "open");
    const now = await presence(t.api, user);
    assert.ok(now.sessions.some((s) => s.node !== holder.id), "reconnected to another node");
    await screenshot(page, `${label}-${signal.toLowerCase()}`);
  } finally {
    await ctx.close();
  }
}
