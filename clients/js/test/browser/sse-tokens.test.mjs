// Browser tests of the SSE transport and token lifetime (GET /sse, POST /ack, welcome
// `exp`, in-band `refresh`, close 4003).
//
// One herald node in JWT mode (tokens signed by the static server's /token) with an nginx
// in front that breaks WebSocket upgrades (it drops the Upgrade header, as some proxies
// do) and passes /sse and /ack through (deploy/nginx-local.conf.tmpl's locations).
import assert from "node:assert/strict";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { settle } from "./cases.mjs";
import {
  checkExactlyOnce,
  cleanup,
  freePort,
  httpStatus,
  inbox,
  launchBrowser,
  log,
  openDemo,
  publishSteadily,
  receivedIds,
  ROOT,
  RUN,
  screenshot,
  setApiKey,
  startProcess,
  startStandalone,
  startStatic,
  uniqueUser,
  waitFor,
} from "./harness.mjs";

const T = { timeout: 90_000 };
const SECRET = "browser-tests-secret-0123456789abcdef";
const KEY = "browser-tests-api-key-0123456789";
const t = {};

/** nginx from deploy/nginx-local.conf.tmpl in front of `node`, with WebSocket upgrades broken. */
async function startUpgradeBreakingProxy(node) {
  const port = await freePort();
  const apiPort = await freePort();
  const dir = join(RUN, `nginx-no-upgrade-${port}`);
  mkdirSync(dir, { recursive: true });
  const hostPort = node.replace("http://", "");
  let conf = readFileSync(join(ROOT, "deploy", "nginx-local.conf.tmpl"), "utf8")
    .replaceAll("__INTERNAL_LISTEN__", `127.0.0.1:${apiPort}`)
    .replaceAll("__LISTEN__", `127.0.0.1:${port}`)
    .replace(/__HERALD[123]__/g, hostPort)
    .replace("proxy_set_header Upgrade $http_upgrade;", 'proxy_set_header Upgrade "";')
    .replace("proxy_set_header Connection $connection_upgrade;", 'proxy_set_header Connection "";');
  writeFileSync(join(dir, "nginx.conf"), conf);
  const bin = ["/usr/sbin/nginx", "/usr/bin/nginx"].find((b) => {
    try {
      readFileSync(b);
      return true;
    } catch {
      return false;
    }
  });
  if (!bin) throw new Error("nginx is missing (scripts/test.sh installs it)");
  startProcess(`nginx-${port}`, bin, ["-p", `${dir}/`, "-c", join(dir, "nginx.conf")]);
  const url = `http://127.0.0.1:${port}`;
  await waitFor("nginx", async () => (await httpStatus(`${url}/readyz`)) === 200, 15_000);
  return url;
}

describe("SSE fallback and token lifetime", () => {
  before(async () => {
    setApiKey(KEY);
    // The page is served from another origin than the node and the proxy: allow it.
    const node = await startStandalone(["--jwt-secret", SECRET, "--api-key", KEY, "--allowed-origins", "*"]);
    const page = await startStatic({ jwtSecret: SECRET });
    const proxy = await startUpgradeBreakingProxy(node.url);
    Object.assign(t, { node: node.url, api: node.api, proxy, page: page.url, browser: await launchBrowser() });
    log(`herald ${node.url} (JWT), nginx without upgrades ${proxy}, page ${page.url}`);
  });
  after(cleanup);

  test("WebSocket blocked at nginx: SSE fallback, messages, reload with since, ack over POST /ack", T, async () => {
    const user = uniqueUser("sse");
    const ctx = await t.browser.newContext();
    try {
      const tokenUrl = encodeURIComponent(`${t.page}/token?ttl=3600`);
      const page = await openDemo(ctx, t.page, { node: t.proxy, user, extra: `&token_url=${tokenUrl}` });
      assert.equal((await page.evaluate(() => window.herald.state)).transport, "sse");
      const steady = publishSteadily(t.api, user, 40, 25, "sse");
      await waitFor("10 messages before the reload", async () => (await receivedIds(page)).length >= 10);
      await page.reload();
      const ids = await steady;
      await waitFor("every durable message over SSE", async () => (await receivedIds(page)).length >= ids.length, 20_000);
      await settle(t, page, user);
      checkExactlyOnce(assert, await receivedIds(page), ids, "SSE across a reload");
      await page.evaluate((id) => window.herald.ack(id), ids.at(-1));
      await waitFor("the cursor moved by POST /ack", async () => (await inbox(t.api, user)).cursor === ids.at(-1));
      await screenshot(page, "sse-fallback");
    } finally {
      await ctx.close();
    }
  });

  test("short-lived tokens: refreshed in-band before exp, the session never drops", T, async () => {
    const user = uniqueUser("refresh");
    const ctx = await t.browser.newContext();
    try {
      // 8 s tokens: the client refreshes half-way (the 30 s margin is longer than the token).
      const tokenUrl = encodeURIComponent(`${t.page}/token?ttl=8`);
      const page = await openDemo(ctx, t.page, { node: t.node, user, extra: `&token_url=${tokenUrl}` });
      assert.equal((await page.evaluate(() => window.herald.state)).transport, "websocket");
      const welcome = await page.evaluate(() => window.welcomes[0]);
      assert.equal(typeof welcome.exp, "number", "the welcome carries the token's exp");
      const ids = await publishSteadily(t.api, user, 40, 500, "refresh"); // 20 s, past two expiries
      await waitFor("every message", async () => (await receivedIds(page)).length >= ids.length);
      await settle(t, page, user);
      checkExactlyOnce(assert, await receivedIds(page), ids, "with token refreshes");
      const states = await page.evaluate(() => window.states.map((s) => s.state));
      assert.deepEqual(states.filter((s) => s !== "connecting"), ["open"], "no reconnect");
    } finally {
      await ctx.close();
    }
  });

  test("SSE with short-lived tokens: reconnects with a fresh token before exp, nothing lost", T, async () => {
    const user = uniqueUser("sse-refresh");
    const ctx = await t.browser.newContext();
    try {
      const tokenUrl = encodeURIComponent(`${t.page}/token?ttl=8`);
      const page = await openDemo(ctx, t.page, { node: t.proxy, user, extra: `&token_url=${tokenUrl}` });
      const ids = await publishSteadily(t.api, user, 40, 500, "sse-refresh");
      await waitFor("every message", async () => (await receivedIds(page)).length >= ids.length);
      await settle(t, page, user);
      checkExactlyOnce(assert, await receivedIds(page), ids, "SSE with token refreshes");
      const reasons = await page.evaluate(() => window.states.filter((s) => s.state === "reconnecting").map((s) => s.reason));
      // The first reconnect is the fallback from the blocked WebSocket to SSE; after it,
      // the stream is only ever reopened to carry a fresh token.
      assert.equal(reasons[0], "websocket_unavailable", JSON.stringify(reasons));
      assert.ok(reasons.length >= 2, `a refresh happened: ${JSON.stringify(reasons)}`);
      assert.ok(reasons.slice(1).every((r) => r === "token_refresh"), JSON.stringify(reasons));
    } finally {
      await ctx.close();
    }
  });
});
