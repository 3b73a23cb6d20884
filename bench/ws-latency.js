#!/usr/bin/env node
// A second, independent client for herald's delivery latency (bench/ping-tail.sh): Node.js
// with the `ws` library, which answers WebSocket pings by itself (autoPong), the way browsers
// and most client libraries do. It shares no code with herald-bench.
//
// Three roles:
//
//   client    opens --sessions herald sessions (user bench-<first-user + i>, HS256 JWT with
//             BENCH_JWT_SECRET), spread round-robin over --target URLs and over --source-ips,
//             --concurrency handshakes in flight; a session counts once its welcome frame
//             arrived. Then it writes --ready-file and records, for every message frame, the
//             latency now - ts (both process.hrtime.bigint(): CLOCK_MONOTONIC, shared by all
//             processes of the machine), by the payload's "phase". It counts the pings it
//             receives per 10 ms. When --stop-file appears (or after --max-seconds) it writes
//             --out: per phase count, p50/p90/p99/p99.9/max in ms; pings received and the
//             most in any 100 ms window, in total and per phase; sessions closed early.
//
//   producer  publishes on Redis (PUBLISH <prefix>:user:{bench-<u>}, u drawn at random among
//             --users) the payload {"seq","ts","phase","pad"} at each --phases entry's rate
//             for its duration ("2000:20,5000:20"), with --gap seconds between phases. A timer
//             fires every millisecond and publishes what is due (floor(elapsed * rate)); the
//             node-redis client pipelines what is sent in one turn. Writes --out: per phase the
//             messages sent, the achieved rate and the worst lag behind schedule.
//
//   report    merges the clients of each configuration (ping-tail.sh's files) and prints
//             the side-by-side table.
//
// Every loop is bounded: the client gives up connecting after --connect-timeout s and stops
// after --max-seconds; the producer stops after its phases.
//
// Usage:
//   node ws-latency.js client --target ws://127.0.0.1:P1/ws --target ws://127.0.0.1:P2/ws \
//       --sessions 8000 --first-user 0 --source-ips 127.0.0.2-127.0.0.9 --ready-file r \
//       --stop-file s --out client.json [--concurrency 100] [--max-seconds 600]
//   node ws-latency.js producer --redis-url redis://127.0.0.1:P --prefix hbench --users 16000 \
//       --phases 2000:20,5000:20 [--gap 2] [--payload-bytes 100] --out producer.json
//   node ws-latency.js report --dir OUT_DIR --configs pings,no-pings --clients 2
"use strict";

const fs = require("node:fs");
const crypto = require("node:crypto");

function die(msg) {
  console.error(`ws-latency: ${msg}`);
  process.exit(2);
}

function parseArgs(argv) {
  const o = { target: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith("--")) die(`unexpected argument ${a}`);
    const key = a.slice(2).replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    const v = argv[++i];
    if (v === undefined) die(`${a} needs a value`);
    if (Array.isArray(o[key])) o[key].push(v);
    else o[key] = v;
  }
  return o;
}

function num(o, key, dflt) {
  const v = o[key] === undefined ? dflt : Number(o[key]);
  if (v === undefined || !Number.isFinite(v) || v < 0) die(`--${key} must be a number >= 0`);
  return v;
}

// 127.0.0.2-127.0.0.9 -> ["127.0.0.2", ..., "127.0.0.9"]; anything outside 127/8 is refused.
function sourceIps(spec) {
  if (!spec) return [undefined];
  const m = /^127\.0\.0\.(\d+)-127\.0\.0\.(\d+)$/.exec(spec);
  if (!m) die("--source-ips must look like 127.0.0.2-127.0.0.9");
  const out = [];
  for (let i = Number(m[1]); i <= Number(m[2]) && i < 255; i++) out.push(`127.0.0.${i}`);
  if (!out.length) die("--source-ips is empty");
  return out;
}

// A minimal HS256 JWT (sub, exp): what herald's --jwt-secret accepts.
function jwt(secret, sub) {
  const b64 = (x) => Buffer.from(JSON.stringify(x)).toString("base64url");
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64({ sub, exp: Math.floor(Date.now() / 1000) + 3600 });
  const sig = crypto.createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

function percentiles(values) {
  if (!values.length) return { count: 0 };
  const a = Float64Array.from(values).sort();
  const q = (p) => a[Math.min(a.length - 1, Math.ceil(p * a.length) - 1)];
  const r = (x) => Math.round(x * 1000) / 1000;
  return {
    count: a.length,
    p50_ms: r(q(0.5)),
    p90_ms: r(q(0.9)),
    p99_ms: r(q(0.99)),
    p999_ms: r(q(0.999)),
    max_ms: r(a[a.length - 1]),
  };
}

function writeJson(file, value) {
  const tmp = `${file}.tmp`;
  fs.writeFileSync(tmp, JSON.stringify(value, null, 2) + "\n");
  fs.renameSync(tmp, file);
}

// ------------------------------------------------------------------------------- client
async function client(o) {
  const WebSocket = require("ws");
  const secret = process.env.BENCH_JWT_SECRET || die("BENCH_JWT_SECRET is not set");
  if (!o.target.length) die("--target is required");
  for (const t of o.target) {
    if (!/^ws:\/\/127\.\d+\.\d+\.\d+:\d+\//.test(t)) die(`--target ${t} is not ws://127.x.x.x:port/path`);
  }
  const sessions = num(o, "sessions");
  const firstUser = num(o, "firstUser", 0);
  const concurrency = Math.max(1, num(o, "concurrency", 100));
  const connectTimeout = num(o, "connectTimeout", 120) * 1000;
  const maxSeconds = num(o, "maxSeconds", 600);
  const ips = sourceIps(o.sourceIps);
  if (!o.readyFile || !o.stopFile || !o.out) die("--ready-file, --stop-file and --out are required");

  const started = process.hrtime.bigint();
  const latencies = new Map(); // phase -> [ms]
  const pingBuckets = new Map(); // 10 ms bucket index -> pings
  const phaseWindows = new Map(); // phase -> [first ns, last ns] of its deliveries
  let pings = 0;
  let foreign = 0;
  let open = 0;
  let closedEarly = 0;
  const closeCodes = {};
  let stopping = false;
  const all = [];

  function onMessage(data) {
    const now = process.hrtime.bigint();
    let m;
    try {
      m = JSON.parse(data);
    } catch {
      foreign++;
      return;
    }
    if (m.type !== "message" || !m.data || typeof m.data.ts !== "number") {
      if (m.type !== "welcome") foreign++;
      return;
    }
    const phase = String(m.data.phase);
    const ms = Number(now - BigInt(m.data.ts)) / 1e6;
    let list = latencies.get(phase);
    if (!list) latencies.set(phase, (list = []));
    list.push(ms);
    const w = phaseWindows.get(phase);
    if (!w) phaseWindows.set(phase, [now, now]);
    else w[1] = now;
  }

  function onPing() {
    pings++;
    const b = Number((process.hrtime.bigint() - started) / 10000000n);
    pingBuckets.set(b, (pingBuckets.get(b) || 0) + 1);
  }

  function openOne(i) {
    return new Promise((resolve) => {
      const user = `bench-${firstUser + i}`;
      const target = o.target[i % o.target.length];
      const url = `${target}?token=${jwt(secret, user)}`;
      const ws = new WebSocket(url, {
        perMessageDeflate: false,
        localAddress: ips[i % ips.length],
        handshakeTimeout: 30000,
      });
      let welcomed = false;
      const timer = setTimeout(() => {
        if (!welcomed) {
          ws.terminate();
          resolve(false);
        }
      }, 30000);
      ws.on("message", (data) => {
        if (!welcomed) {
          welcomed = true;
          clearTimeout(timer);
          open++;
          resolve(true);
        }
        onMessage(data);
      });
      ws.on("ping", onPing);
      ws.on("close", (code) => {
        clearTimeout(timer);
        if (welcomed) {
          open--;
          if (!stopping) {
            closedEarly++;
            closeCodes[code] = (closeCodes[code] || 0) + 1;
          }
        }
        resolve(false);
      });
      ws.on("error", () => {});
      all.push(ws);
    });
  }

  let next = 0;
  let failed = 0;
  const deadline = Date.now() + connectTimeout;
  async function worker() {
    while (next < sessions && Date.now() < deadline) {
      const i = next++;
      if (!(await openOne(i))) failed++;
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, sessions) }, worker));
  const connectS = Number(process.hrtime.bigint() - started) / 1e9;
  console.error(`ws-latency client: ${open} open, ${failed} failed in ${connectS.toFixed(1)} s`);
  writeJson(o.readyFile, { open, failed, connect_s: connectS });

  const connectedAt = process.hrtime.bigint();
  await new Promise((resolve) => {
    const t0 = Date.now();
    const iv = setInterval(() => {
      if (fs.existsSync(o.stopFile) || Date.now() - t0 > maxSeconds * 1000) {
        clearInterval(iv);
        resolve();
      }
    }, 100);
  });
  stopping = true;

  // The most pings in any 100 ms window (ten 10 ms buckets), over [from, to) in ns since
  // start; and the pings in that span.
  function pingStats(fromNs, toNs) {
    const b0 = Number(fromNs / 10000000n);
    const b1 = Number(toNs / 10000000n);
    let total = 0;
    let most = 0;
    let win = 0;
    for (let b = b0; b <= b1; b++) {
      const v = pingBuckets.get(b) || 0;
      total += v;
      win += v;
      if (b - 10 >= b0) win -= pingBuckets.get(b - 10) || 0;
      most = Math.max(most, win);
    }
    return { pings: total, max_pings_per_100ms: most };
  }
  const phases = {};
  for (const [phase, list] of latencies) {
    const [a, b] = phaseWindows.get(phase);
    phases[phase] = {
      ...percentiles(list),
      ...pingStats(a - started, b - started),
      window_s: Math.round(Number(b - a) / 1e7) / 100,
      // Every latency (µs resolution), so the report can merge client processes exactly.
      raw_ms: list.map((x) => Math.round(x * 1000) / 1000),
    };
  }
  const result = {
    sessions,
    open_at_connect: open + closedEarly,
    failed,
    connect_s: connectS,
    closed_early: closedEarly,
    close_codes: closeCodes,
    foreign,
    after_connect: pingStats(connectedAt - started, process.hrtime.bigint() - started),
    phases,
  };
  writeJson(o.out, result);
  for (const ws of all) ws.terminate();
  process.exit(0);
}

// ----------------------------------------------------------------------------- producer
async function producer(o) {
  const { createClient } = require("redis");
  const url = o.redisUrl || die("--redis-url is required");
  if (!/^redis:\/\/127\.\d+\.\d+\.\d+:\d+$/.test(url)) die("--redis-url must be redis://127.x.x.x:port");
  if (/:6379$/.test(url)) die("refusing the shared redis-server on 6379");
  const prefix = o.prefix || "hbench";
  const users = num(o, "users");
  if (users < 1) die("--users must be at least 1");
  const gap = num(o, "gap", 2);
  const pad = "x".repeat(num(o, "payloadBytes", 100));
  const phases = String(o.phases || die("--phases is required"))
    .split(",")
    .map((p) => {
      const [rate, secs] = p.split(":").map(Number);
      if (!(rate > 0 && rate <= 50000 && secs > 0 && secs <= 300)) die(`bad phase ${p}`);
      return { rate, secs };
    });
  if (!o.out) die("--out is required");

  const redis = createClient({ url });
  redis.on("error", (e) => console.error(`producer: redis: ${e.message}`));
  await redis.connect();
  const report = {};
  for (const [k, ph] of phases.entries()) {
    if (k > 0) await new Promise((r) => setTimeout(r, gap * 1000));
    const name = String(ph.rate);
    const seq = new Map();
    let sent = 0;
    let worstLagMs = 0;
    let failed = 0;
    const pending = [];
    const total = Math.floor(ph.rate * ph.secs);
    const t0 = process.hrtime.bigint();
    await new Promise((resolve) => {
      const iv = setInterval(() => {
        const elapsedS = Number(process.hrtime.bigint() - t0) / 1e9;
        const due = Math.min(total, Math.floor(elapsedS * ph.rate));
        if (due - sent > 1) worstLagMs = Math.max(worstLagMs, ((due - sent - 1) / ph.rate) * 1000);
        while (sent < due) {
          const u = `bench-${Math.floor(Math.random() * users)}`;
          const s = (seq.get(u) || 0) + 1;
          seq.set(u, s);
          const payload = JSON.stringify({
            seq: s,
            ts: Number(process.hrtime.bigint()),
            phase: name,
            pad,
          });
          pending.push(redis.publish(`${prefix}:user:{${u}}`, payload).catch(() => failed++));
          sent++;
        }
        if (pending.length > 10000) pending.splice(0, pending.length - 10000);
        if (sent >= total) {
          clearInterval(iv);
          resolve();
        }
      }, 1);
    });
    await Promise.all(pending);
    const secs = Number(process.hrtime.bigint() - t0) / 1e9;
    report[name] = {
      sent,
      failed,
      seconds: Math.round(secs * 100) / 100,
      achieved_rate: Math.round(sent / secs),
      worst_lag_ms: Math.round(worstLagMs * 10) / 10,
    };
    console.error(`ws-latency producer: phase ${name}: ${sent} sent in ${secs.toFixed(1)} s`);
  }
  await redis.quit();
  writeJson(o.out, report);
}

// ------------------------------------------------------------------------------- report
// Merges the client files of each configuration (<dir>/<config>-client-<i>.json) and the
// producer's, prints the side-by-side table and writes <dir>/summary.json.
function report(o) {
  const dir = o.dir || die("--dir is required");
  const configs = String(o.configs || "pings,no-pings").split(",");
  const clients = num(o, "clients", 2);
  const summary = { sessions: num(o, "sessions", 0), configs: {} };
  const rates = new Set();
  for (const c of configs) {
    const merged = new Map();
    const cs = { clients: [], phases: {} };
    for (let i = 0; i < clients; i++) {
      const f = `${dir}/${c}-client-${i}.json`;
      if (!fs.existsSync(f)) die(`missing ${f}`);
      const r = JSON.parse(fs.readFileSync(f, "utf8"));
      cs.clients.push({
        open: r.open_at_connect,
        failed: r.failed,
        connect_s: r.connect_s,
        closed_early: r.closed_early,
        close_codes: r.close_codes,
        foreign: r.foreign,
      });
      for (const [phase, v] of Object.entries(r.phases)) {
        rates.add(phase);
        const m = merged.get(phase) || { raw: [], pings: 0, most: 0 };
        for (const x of v.raw_ms) m.raw.push(x);
        m.pings += v.pings;
        m.most = Math.max(m.most, v.max_pings_per_100ms);
        merged.set(phase, m);
      }
    }
    let produced = {};
    const pf = `${dir}/${c}-producer.json`;
    if (fs.existsSync(pf)) produced = JSON.parse(fs.readFileSync(pf, "utf8"));
    for (const [phase, m] of merged) {
      const sent = produced[phase] ? produced[phase].sent : null;
      cs.phases[phase] = {
        ...percentiles(m.raw),
        sent,
        lost: sent === null ? null : sent - m.raw.length,
        producer: produced[phase] || null,
        pings_seen: m.pings,
        max_pings_per_100ms_one_client: m.most,
      };
    }
    summary.configs[c] = cs;
  }
  const fmt = (x) => (x === undefined || x === null ? "-" : String(x));
  const rows = [];
  rows.push(
    `| msg/s | config | delivered/sent | p50 ms | p99 ms | p99.9 ms | max ms | pings seen | most pings in 100 ms (one client) |`,
  );
  rows.push(`|---|---|---|---|---|---|---|---|---|`);
  for (const rate of [...rates].sort((a, b) => Number(a) - Number(b))) {
    for (const c of configs) {
      const v = summary.configs[c].phases[rate];
      if (!v) continue;
      rows.push(
        `| ${rate} | ${c} | ${v.count}/${fmt(v.sent)} | ${v.p50_ms} | ${v.p99_ms} | ${v.p999_ms} | ${v.max_ms} | ${v.pings_seen} | ${v.max_pings_per_100ms_one_client} |`,
      );
    }
    const a = summary.configs.pings && summary.configs.pings.phases[rate];
    const b = summary.configs["no-pings"] && summary.configs["no-pings"].phases[rate];
    if (a && b && b.p99_ms > 0) {
      const ratio = Math.round((a.p99_ms / b.p99_ms) * 100) / 100;
      summary[`p99_ratio_${rate}`] = ratio;
      rows.push(`| ${rate} | p99 pings / no-pings | | | **${ratio}x** | | | | |`);
    }
  }
  const table = rows.join("\n");
  console.log(table);
  fs.writeFileSync(`${dir}/table.md`, table + "\n");
  writeJson(`${dir}/summary.json`, summary);
}

const [role, ...rest] = process.argv.slice(2);
const opts = parseArgs(rest);
if (role === "client") client(opts).catch((e) => die(e.stack || String(e)));
else if (role === "producer") producer(opts).catch((e) => die(e.stack || String(e)));
else if (role === "report") report(opts);
else die("usage: ws-latency.js client|producer --help is in the file header");
