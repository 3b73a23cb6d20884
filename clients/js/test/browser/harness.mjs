// Browser-test harness: a real herald (standalone node, or the 3-node cluster of
// scripts/local-cluster.sh behind nginx), a static server for examples/browser/, and
// Debian's Chromium driven by playwright-core (never a downloaded browser).
//
// Every process started here is recorded by PID and stopped by `cleanup()` (SIGTERM, then
// SIGKILL after a grace), also when the test process exits early.

import { spawn, spawnSync } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import net from "node:net";
import { dirname, extname, join, normalize, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const PKG = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const ROOT = resolve(PKG, "..", "..");
export const EXAMPLE = join(ROOT, "examples", "browser");
export const HERALD_BIN = process.env.HERALD_BIN ?? join(process.env.CARGO_TARGET_DIR ?? join(ROOT, "target"), "debug", "herald");
export const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
export const SHOTS = process.env.SCREENSHOT_DIR ?? join(ROOT, "target", "browser-tests", "screenshots");
export const RUN = process.env.BROWSER_RUN_DIR ?? join(ROOT, "target", "browser-tests");

const cleanups = [];
const children = new Set();
/** Synchronous last resorts, run if the test process exits before cleanup(). */
const exitHooks = new Set();

function killAll() {
  for (const c of children) {
    try {
      process.kill(c.pid, "SIGKILL");
    } catch {
      /* gone */
    }
  }
  for (const h of exitHooks) h();
}
process.on("exit", killAll);
for (const sig of ["SIGINT", "SIGTERM"]) {
  process.on(sig, () => {
    killAll();
    process.exit(130);
  });
}

export function log(...a) {
  console.log(`[browser-tests ${new Date().toISOString().slice(11, 23)}]`, ...a);
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` until it returns a truthy value or the deadline passes. */
export async function waitFor(what, fn, timeoutMs = 15_000, everyMs = 50) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${String(last)})`);
    await sleep(everyMs);
  }
}

export async function freePort() {
  return new Promise((res, rej) => {
    const s = net.createServer();
    s.unref();
    s.on("error", rej);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

/** Starts a child process; it is stopped by cleanup() (SIGTERM, then SIGKILL). */
export function startProcess(name, cmd, args, opts = {}) {
  mkdirSync(RUN, { recursive: true });
  const out = join(RUN, `${name}.log`);
  writeFileSync(out, "");
  const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], ...opts });
  children.add(child);
  child.stdout.on("data", (d) => writeFileSync(out, d, { flag: "a" }));
  child.stderr.on("data", (d) => writeFileSync(out, d, { flag: "a" }));
  child.on("exit", () => children.delete(child));
  log(`started ${name} (pid ${child.pid}), log ${out}`);
  const stop = async (graceMs = 10_000) => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once("exit", r));
    child.kill("SIGTERM");
    const t = setTimeout(() => child.kill("SIGKILL"), graceMs);
    await exited;
    clearTimeout(t);
  };
  cleanups.push(stop);
  return { child, pid: child.pid, log: out, stop };
}

export function onCleanup(fn) {
  cleanups.push(fn);
}

export async function cleanup() {
  while (cleanups.length) {
    const fn = cleanups.pop();
    try {
      await fn();
    } catch (e) {
      log("cleanup step failed:", e);
    }
  }
}

export async function httpStatus(url) {
  try {
    return (await fetch(url)).status;
  } catch {
    return 0;
  }
}

/** A standalone `herald --dev` on a free loopback port. */
export async function startStandalone(extraArgs = []) {
  if (!existsSync(HERALD_BIN)) throw new Error(`no herald binary at ${HERALD_BIN}: cargo build -p herald`);
  const port = await freePort();
  const p = startProcess(`herald-${port}`, HERALD_BIN, ["--listen", `127.0.0.1:${port}`, ...extraArgs], {
    env: { ...process.env, HERALD_LOG: process.env.HERALD_LOG ?? "info" },
  });
  const url = `http://127.0.0.1:${port}`;
  await waitFor("herald /readyz", async () => (await httpStatus(`${url}/readyz`)) === 200, 20_000);
  return { url, api: url, proc: p };
}

/**
 * The 3-node cluster of scripts/local-cluster.sh (redis-server, three nodes, nginx) on
 * free ports, in --dev unless `dev: false`. Stopped with `local-cluster.sh stop`, which
 * stops every process of it by the PIDs it recorded.
 */
export async function startCluster({ dev = true, nodeArgs = "" } = {}) {
  // local-cluster takes PORT_BASE (nginx), the next three ports for the nodes and the one
  // after for nginx's internal server (the producer API).
  let base;
  for (let i = 0; i < 20; i++) {
    const p = 20000 + Math.floor(Math.random() * 20000);
    const ports = [p, p + 1, p + 2, p + 3, p + 4];
    const busy = await Promise.all(ports.map((x) => httpStatus(`http://127.0.0.1:${x}/`)));
    if (busy.every((s) => s === 0)) {
      base = p;
      break;
    }
  }
  const redisPort = await freePort();
  const runDir = join(RUN, `cluster-${base}`);
  const env = {
    ...process.env,
    PORT_BASE: String(base),
    REDIS_PORT: String(redisPort),
    RUN_DIR: runDir,
    HERALD_BIN,
    DEV: dev ? "1" : "0",
    NODE_ARGS: nodeArgs,
    STOP_WAIT: "10",
    // local-cluster.sh exports an API key, which the nodes require even in --dev.
    HERALD_API_KEY: process.env.HERALD_API_KEY ?? "browser-tests-api-key-0123456789",
    HERALD_JWT_SECRET: process.env.HERALD_JWT_SECRET ?? "browser-tests-secret-0123456789abcdef",
  };
  const script = join(ROOT, "scripts", "local-cluster.sh");
  log(`starting the cluster: nginx :${base}, nodes :${base + 1}-${base + 3}, redis :${redisPort}`);
  const r = spawnSync("bash", [script, "start"], { env, encoding: "utf8", timeout: 120_000 });
  if (r.status !== 0) throw new Error(`local-cluster.sh start failed:\n${r.stdout}\n${r.stderr}`);
  const stop = () => spawnSync("bash", [script, "stop"], { env, encoding: "utf8", timeout: 60_000 });
  exitHooks.add(stop);
  cleanups.push(async () => {
    exitHooks.delete(stop);
    const s = stop();
    log(`cluster stopped (${s.status}): ${s.stderr.trim().split("\n").slice(-1)[0] ?? ""}`);
  });
  const url = `http://127.0.0.1:${base}`;
  const nodes = [1, 2, 3].map((i) => ({
    id: `herald${i}`,
    url: `http://127.0.0.1:${base + i}`,
    pid: () => Number(readFileSync(join(runDir, "pids", `herald${i}.pid`), "utf8").trim()),
  }));
  // The producer API is only on nginx's internal server (the public one answers 404).
  const api = `http://127.0.0.1:${base + 4}`;
  return { url, api, nodes, runDir, env, apiKey: env.HERALD_API_KEY };
}

const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".css": "text/css",
  ".png": "image/png",
};

/**
 * A static file server for examples/browser/ on a free port (another origin than herald,
 * as with any static server). `/token?user=&ttl=` signs a JWT with `jwtSecret` (for the
 * tests of JWT mode).
 */
export async function startStatic({ jwtSecret } = {}) {
  const server = createServer((req, res) => {
    const u = new URL(req.url, "http://x");
    if (u.pathname === "/token" && jwtSecret) {
      const ttl = Number(u.searchParams.get("ttl") ?? "3600");
      const claims = { sub: u.searchParams.get("user"), exp: Math.floor(Date.now() / 1000) + ttl };
      res.writeHead(200, { "content-type": "text/plain", "cache-control": "no-store" });
      res.end(signJwt(claims, jwtSecret));
      return;
    }
    let path = normalize(decodeURIComponent(u.pathname)).replace(/^(\.\.[/\\])+/, "");
    if (path.endsWith("/")) path += "index.html";
    const file = join(EXAMPLE, path);
    if (!file.startsWith(EXAMPLE) || !existsSync(file) || !statSync(file).isFile()) {
      res.writeHead(404).end("not found");
      return;
    }
    res.writeHead(200, { "content-type": TYPES[extname(file)] ?? "application/octet-stream", "cache-control": "no-store" });
    res.end(readFileSync(file));
  });
  const port = await freePort();
  await new Promise((r) => server.listen(port, "127.0.0.1", r));
  cleanups.push(() => new Promise((r) => server.close(r)));
  server.closeAllConnections && cleanups.push(async () => server.closeAllConnections());
  return { url: `http://127.0.0.1:${port}` };
}

export function signJwt(claims, secret) {
  const b = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const head = `${b({ alg: "HS256", typ: "JWT" })}.${b(claims)}`;
  return `${head}.${createHmac("sha256", secret).update(head).digest("base64url")}`;
}

/** Debian's Chromium, headless, without the background traffic this closed network refuses. */
export async function launchBrowser() {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: apt-get install -y chromium (run.sh does)`);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-quic",
      "--no-first-run",
      "--disable-component-update",
      "--disable-sync",
    ],
    timeout: 60_000,
  });
  cleanups.push(() => browser.close());
  return browser;
}

export function uniqueUser(prefix) {
  return `${prefix}-${randomBytes(4).toString("hex")}`;
}

/** Bearer key for /api/* (none in --dev). */
let apiKey = "";
export function setApiKey(key) {
  apiKey = key;
}

export async function api(base, path, body, method = body === undefined ? "GET" : "POST") {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (apiKey) headers.authorization = `Bearer ${apiKey}`;
  const res = await fetch(`${base}${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
  return JSON.parse(text);
}

export const publish = (base, body) => api(base, "/api/publish", body);
export const presence = (base, user) => api(base, `/api/presence/${encodeURIComponent(user)}`);
export const inbox = (base, user) => api(base, `/api/inbox/${encodeURIComponent(user)}`);

/**
 * Publishes `count` durable messages to `user`, one every `everyMs`, and returns their
 * ids in order. Each publish is awaited, so the rate is steady and never piles up; a
 * failed publish (a node killed under nginx answers 502) is retried with the same
 * idempotency key, so it is stored once.
 */
export async function publishSteadily(base, user, count, everyMs, tag) {
  const ids = [];
  for (let i = 0; i < count; i++) {
    const started = Date.now();
    const key = `${tag}-${user}-${i}`.replace(/[^A-Za-z0-9-]/g, "-");
    const body = { user, durable: true, idempotency_key: key, data: { text: `${tag} #${i}`, i } };
    for (let attempt = 1; ; attempt++) {
      try {
        ids.push((await publish(base, body)).ids[user]);
        break;
      } catch (e) {
        // Only a lost node (502/503, connection errors) is worth a retry.
        if (attempt >= 20 || / 4\d\d /.test(String(e.message))) throw e;
        await sleep(100);
      }
    }
    const left = everyMs - (Date.now() - started);
    if (left > 0) await sleep(left);
  }
  return ids;
}

/** Opens the demo page for `user` and waits until its client is open. */
export async function openDemo(context, pageUrl, { node, user, topics, transport, extra = "" }) {
  const page = await context.newPage();
  const q = new URLSearchParams({ node, user });
  if (topics) q.set("topics", topics);
  if (transport) q.set("transport", transport);
  page.on("pageerror", (e) => log(`page error (${user}):`, e.message));
  await page.goto(`${pageUrl}/index.html?${q}${extra}`);
  await waitOpen(page);
  return page;
}

export async function waitOpen(page, timeoutMs = 15_000) {
  await page.waitForFunction(() => window.herald && window.herald.state.state === "open", null, {
    timeout: timeoutMs,
    polling: 50,
  });
}

/** Ids of the durable messages the page received, in order of arrival. */
export const receivedIds = (page) => page.evaluate(() => window.received.filter((m) => m.id).map((m) => m.id));
export const received = (page) => page.evaluate(() => window.received);

export async function screenshot(page, name) {
  mkdirSync(SHOTS, { recursive: true });
  const file = join(SHOTS, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  log(`screenshot ${file}`);
  return file;
}

/** Asserts `got` holds every id of `want` exactly once (and nothing else durable for this user). */
export function checkExactlyOnce(assert, got, want, what) {
  const seen = new Map();
  for (const id of got) seen.set(id, (seen.get(id) ?? 0) + 1);
  const dups = [...seen].filter(([, n]) => n > 1).map(([id]) => id);
  const missing = want.filter((id) => !seen.has(id));
  assert.deepEqual(dups, [], `${what}: duplicates`);
  assert.deepEqual(missing, [], `${what}: missing`);
  assert.equal(got.length, want.length, `${what}: unexpected extra ids`);
}
