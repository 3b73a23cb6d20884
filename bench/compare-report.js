#!/usr/bin/env node
// Builds the herald vs Socket.IO vs Sockudo (vs the floor, bench/floor) table from a
// bench/compare.sh output directory. Columns appear for the systems the directory has
// results for. Ratio columns: herald against each peer and the floor, herald with the HTTP
// producer against Sockudo (both published over HTTP), and herald against the best peer of
// each row (the lowest value among socket.io and sockudo, or the highest where higher is
// better: handshakes per second, delivery rate), naming that peer.
//
//   node bench/compare-report.js <out dir> ["<fanout rates>"] ["<broadcast rates>"]
//
// Reads <phase>-<system>.json (herald-bench's JSON) and <phase>-<system>.meta.json (what
// compare.sh measured itself). A phase whose bench JSON says "noisy": true is flagged in the
// table and kept out of every ratio and target check. Prints Markdown.
"use strict";

const fs = require("node:fs");
const path = require("node:path");

const dir = process.argv[2];
if (!dir) {
  console.error("usage: compare-report.js <out dir> [fanout rates] [broadcast rates]");
  process.exit(2);
}
const fanoutRates = (process.argv[3] || "2000 5000").split(/\s+/).filter(Boolean);
const broadcastRates = (process.argv[4] || "1 5").split(/\s+/).filter(Boolean);
// Fixed order (values are indexed by it); only systems with results get a column.
const SYSTEMS = ["herald", "socketio", "floor", "sockudo", "herald-http"];
const NAMES = {
  herald: "herald", socketio: "socket.io", floor: "floor", sockudo: "sockudo",
  "herald-http": "herald (HTTP producer)",
};
// Peers (other products), by index in SYSTEMS; the floor is not a peer.
const PEERS = [1, 3];
// [numerator, denominator] of each pairwise ratio column.
const PAIRS = [[0, 1], [0, 2], [0, 3], [4, 3]];
const PAIR_NAMES = { 4: "herald-http" };
const present = SYSTEMS.map((s, i) => i === 0 || fs.readdirSync(dir).some((f) => f.endsWith(`-${s}.meta.json`)));

function readJson(file) {
  try {
    return JSON.parse(fs.readFileSync(path.join(dir, file), "utf8"));
  } catch {
    return null;
  }
}

// First value found for any of `keys`, searching the object breadth-first (the bench may
// nest its result, e.g. under "result").
function find(obj, keys) {
  if (!obj || typeof obj !== "object") return undefined;
  const queue = [obj];
  while (queue.length) {
    const o = queue.shift();
    for (const k of keys) {
      if (o[k] !== undefined && o[k] !== null) return o[k];
    }
    for (const v of Object.values(o)) {
      if (v && typeof v === "object" && !Array.isArray(v)) queue.push(v);
    }
  }
  return undefined;
}

// Sums a numeric key over the parts of a multi-process phase, or reads it once.
function total(bench, keys) {
  if (bench && Array.isArray(bench.parts)) {
    let s = 0;
    let any = false;
    for (const p of bench.parts) {
      const v = find(p, keys);
      if (typeof v === "number") { s += v; any = true; }
    }
    return any ? s : undefined;
  }
  const v = find(bench, keys);
  return typeof v === "number" ? v : undefined;
}

function phase(name, sys) {
  const bench = readJson(`${name}-${sys}.json`);
  const meta = readJson(`${name}-${sys}.meta.json`);
  const noisy = !!(bench && (bench.noisy === true || find(bench, ["noisy"]) === true));
  return { bench, meta, noisy, missing: !bench };
}

function latency(bench, q) {
  if (!bench) return undefined;
  const parts = Array.isArray(bench.parts) ? bench.parts : [bench];
  // Across processes: worst of the parts (p50 is the mean of the parts' p50s).
  const vals = parts
    .map((p) => find(p, ["latency_ms"]))
    .map((l) => (l && typeof l[q] === "number" ? l[q] : undefined))
    .filter((v) => v !== undefined);
  if (!vals.length) return undefined;
  if (q === "p50") return vals.reduce((a, b) => a + b, 0) / vals.length;
  return Math.max(...vals);
}

function serverCpu(meta) {
  if (!meta || !Array.isArray(meta.servers)) return undefined;
  return meta.servers.reduce((a, s) => a + (s.cpu_s || 0), 0);
}

// Server CPU seconds per 100k delivered messages: the bench's number, else compare.sh's own
// /proc measurement over the whole phase (connect and drain included).
function cpuPer100k(ph) {
  if (!ph.bench) return undefined;
  let v;
  if (!Array.isArray(ph.bench.parts)) v = find(ph.bench, ["cpu_per_100k_delivered_server"]);
  if (typeof v === "number") return { v, src: "bench" };
  if (Array.isArray(ph.bench.parts)) {
    // Every part measured the same servers over (nearly) the same window: mean of their
    // server CPU over the deliveries of all parts.
    const cpus = ph.bench.parts.map((p) => find(p, ["servers_s"])).filter((x) => typeof x === "number");
    const delivered = total(ph.bench, ["delivered"]);
    if (cpus.length && delivered > 0) {
      return { v: (cpus.reduce((a, b) => a + b, 0) / cpus.length / delivered) * 1e5, src: "parts" };
    }
  }
  const delivered = total(ph.bench, ["delivered"]);
  const cpu = serverCpu(ph.meta);
  if (delivered > 0 && cpu !== undefined) return { v: (cpu / delivered) * 1e5, src: "proc" };
  return undefined;
}

const fmt = (v, d = 2) => {
  if (v === undefined || v === null || Number.isNaN(v)) return "n/a";
  if (typeof v !== "number") return String(v);
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString("en-US");
  return v.toFixed(d);
};
const ratio = (h, s, hp, sp) => {
  if (hp.noisy || sp.noisy) return "n/a (noisy)";
  if (typeof h !== "number" || typeof s !== "number") return "n/a";
  if (s === 0) return h === 0 ? "=" : "∞";
  return (h / s).toFixed(h / s < 0.1 ? 3 : 2);
};

const rows = [];
const checks = [];
const shownPairs = PAIRS.filter(([a, b]) => present[a] && present[b]);
const shownPeers = PEERS.filter((i) => present[i]);
// herald / the best peer of the row, "ratio (peer)"; noisy or missing peers are left out.
function bestPeer(vals, ph, higherBetter) {
  if (!shownPeers.length) return undefined;
  const cands = shownPeers.filter((i) => !ph[i].noisy && !ph[i].missing && typeof vals[i] === "number");
  if (!cands.length) return "n/a";
  const best = cands.reduce((a, b) => ((higherBetter ? vals[b] > vals[a] : vals[b] < vals[a]) ? b : a));
  return `${ratio(vals[0], vals[best], ph[0], ph[best])} (${NAMES[SYSTEMS[best]]})`;
}
function row(label, name, getter, digits = 2, higherBetter = false) {
  const ph = SYSTEMS.map((s) => phase(name, s));
  const vals = ph.map((p) => (p.bench || p.meta ? getter(p) : undefined));
  const cells = vals.map((v, i) => {
    const p = ph[i];
    if (p.meta && p.meta.skipped) return `skipped (${p.meta.skipped})`;
    // herald-http has message phases only (it is herald with another producer).
    if (p.missing) return SYSTEMS[i] === "herald-http" && !/^(fanout|broadcast)/.test(name) ? "—" : "missing";
    return fmt(v, digits) + (p.noisy ? " ⚠ noisy" : "");
  });
  const shown = cells.filter((_, i) => present[i]);
  const ratios = shownPairs.map(([a, b]) => ratio(vals[a], vals[b], ph[a], ph[b]));
  if (shownPeers.length) ratios.push(bestPeer(vals, ph, higherBetter));
  rows.push([label, ...shown, ...ratios]);
  return { vals, ph };
}

// 1. RSS per idle session: (mean RSS over the hold - baseline) / sessions; for Socket.IO also
// with the end figure taken right after a full GC (herald has no GC: same number).
function rssPerSession(p, afterGc) {
  if (!p.meta || !Array.isArray(p.meta.servers)) return undefined;
  const connected = total(p.bench, ["connected"]) ?? p.meta.sessions;
  let delta = 0;
  for (const s of p.meta.servers) {
    const end = afterGc && typeof s.rss_after_gc_kib === "number" ? s.rss_after_gc_kib : s.rss_after_kib;
    delta += end - s.rss_before_kib;
  }
  return connected > 0 ? delta / connected : undefined;
}
const rss = row("RSS per idle session (KiB; mean over the hold)", "idle", (p) => rssPerSession(p, false));
const rssGc = row("RSS per idle session (KiB; socket.io right after a full GC)", "idle",
  (p) => rssPerSession(p, true));

// 2. handshakes per second
row("handshakes per second", "connect", (p) => {
  const v = total(p.bench, [
    "sessions_per_s", "handshakes_per_sec", "handshakes_per_second", "handshake_rate", "sessions_per_sec",
    "connect_rate", "per_sec", "rate",
  ]);
  if (typeof v === "number") return v;
  const connected = total(p.bench, ["connected"]);
  const secs = find(p.bench, ["connect_seconds", "connect_s", "elapsed_s"]);
  return connected && secs ? connected / secs : undefined;
}, 0, true);

row("connect: handshake latency p99 (ms)", "connect", (p) => {
  const h = find(p.bench, ["handshake_ms"]);
  return h && typeof h.p99 === "number" ? h.p99 : undefined;
});

// 3. fanout
const fanout = {};
for (const r of fanoutRates) {
  const name = `fanout-${r}`;
  const t = `fanout ${Number(r).toLocaleString("en-US")} msg/s`;
  fanout[r] = {
    p50: row(`${t}: latency p50 (ms)`, name, (p) => latency(p.bench, "p50")),
    p99: row(`${t}: latency p99 (ms)`, name, (p) => latency(p.bench, "p99")),
    max: row(`${t}: latency max (ms)`, name, (p) => latency(p.bench, "max")),
    cpu: row(`${t}: server CPU s / 100k delivered`, name, (p) => cpuPer100k(p)?.v, 3),
    lost: row(`${t}: lost`, name, (p) => total(p.bench, ["lost"]), 0),
    delivered: row(`${t}: delivered / expected`, name, (p) => {
      const d = total(p.bench, ["delivered"]);
      const e = total(p.bench, ["expected"]);
      return d !== undefined && e ? `${d} / ${e}` : undefined;
    }),
  };
}

// 4. broadcast
const broadcast = {};
for (const r of broadcastRates) {
  const name = `broadcast-${r}`;
  const t = `broadcast ${r}/s`;
  broadcast[r] = {
    rate: row(`${t}: delivery rate (%)`, name, (p) => {
      const d = total(p.bench, ["delivered"]);
      const e = total(p.bench, ["expected"]);
      return d !== undefined && e ? (100 * d) / e : undefined;
    }, 3, true),
    p50: row(`${t}: latency p50 (ms)`, name, (p) => latency(p.bench, "p50")),
    p99: row(`${t}: latency p99 (ms)`, name, (p) => latency(p.bench, "p99")),
    cpu: row(`${t}: server CPU s / 100k delivered`, name, (p) => cpuPer100k(p)?.v, 3),
    lost: row(`${t}: lost`, name, (p) => total(p.bench, ["lost"]), 0),
  };
}

const out = [];
{
  const cols = SYSTEMS.filter((_, i) => present[i]).map((s) => NAMES[s]);
  const ratioCols = shownPairs.map(([a, b]) => `${PAIR_NAMES[a] || NAMES[SYSTEMS[a]]}/${NAMES[SYSTEMS[b]]}`);
  if (shownPeers.length) ratioCols.push("herald/best peer");
  out.push(`| metric | ${[...cols, ...ratioCols].join(" | ")} |`);
  out.push(`|---|${[...cols, ...ratioCols].map(() => "---:").join("|")}|`);
}
for (const r of rows) out.push(`| ${r.join(" | ")} |`);

// Targets (herald vs the peer). A noisy or missing phase leaves its target undecided.
function check(label, ok, detail) {
  checks.push(`- ${ok === undefined ? "UNDECIDED" : ok ? "met" : "MISSED"}: ${label}${detail ? ` (${detail})` : ""}`);
}
// herald and the peer (socket.io) both measured and quiet; the floor has its own checks.
const clean = (x) => x.ph.slice(0, 2).every((p) => !p.noisy && !p.missing);
const cleanFloor = (x) => [x.ph[0], x.ph[2]].every((p) => !p.noisy && !p.missing);
const heraldClean = (x) => !x.ph[0].noisy && !x.ph[0].missing;
for (const [r, what] of [[rss, "mean over the hold"], [rssGc, "peer after a full GC"]]) {
  const [h, s] = r.vals;
  const label = `RSS per idle session ≤ 1/4 of the peer's (${what})`;
  if (clean(r) && h !== undefined && s) {
    const q = h / s;
    check(label, q <= 0.25,
      `${fmt(h)} vs ${fmt(s)} KiB = ${q.toFixed(3)}; ` +
      (q <= 0.25 ? `margin ${fmt(s / 4 - h)} KiB` : `${fmt(h - s / 4)} KiB over (${(q / 0.25).toFixed(2)}x the target)`));
  } else check(label, undefined, "phase noisy or missing");
}
if (fanout["5000"]) {
  const f = fanout["5000"];
  const [hc, sc] = f.cpu.vals;
  const [hp99] = f.p99.vals;
  if (clean(f.cpu) && hc !== undefined && sc) {
    const q = hc / sc;
    check("fanout 5,000 msg/s: server CPU per 100k ≤ 1/5 of the peer's", q <= 0.2,
      `${fmt(hc, 3)} vs ${fmt(sc, 3)} s = ${q.toFixed(3)}` + (q <= 0.2 ? "" : `, ${(q / 0.2).toFixed(2)}x the target`));
  } else check("fanout 5,000 msg/s: server CPU per 100k ≤ 1/5 of the peer's", undefined, "noisy or missing");
  if (heraldClean(f.p99) && hp99 !== undefined) {
    check("fanout 5,000 msg/s: herald p99 < 5 ms", hp99 < 5,
      `${fmt(hp99)} ms` + (hp99 < 5 ? "" : `, ${fmt(hp99 - 5)} ms over`));
  } else check("fanout 5,000 msg/s: herald p99 < 5 ms", undefined, "noisy or missing");
}
if (broadcast["1"]) {
  const b = broadcast["1"];
  const [hp99] = b.p99.vals;
  const [hc, sc] = b.cpu.vals;
  const [hr] = b.rate.vals;
  if (heraldClean(b.p99) && hp99 !== undefined) {
    check("broadcast 1/s to all sessions: herald p99 < 100 ms", hp99 < 100,
      `${fmt(hp99)} ms, delivery ${fmt(hr, 3)} %` + (hp99 < 100 ? "" : `, ${fmt(hp99 - 100)} ms over`));
  } else check("broadcast 1/s: herald p99 < 100 ms", undefined, "noisy or missing");
  if (clean(b.cpu) && hc !== undefined && sc) {
    check("broadcast 1/s: herald CPU per 100k deliveries below the peer's", hc < sc,
      `${fmt(hc, 3)} vs ${fmt(sc, 3)} s` + (hc < sc ? "" : `, ${((hc / sc - 1) * 100).toFixed(0)} % above`));
  } else check("broadcast 1/s: CPU per 100k below the peer's", undefined, "noisy or missing");
}
{
  const lostRows = [...Object.values(fanout).map((f) => f.lost), ...Object.values(broadcast).map((b) => b.lost)];
  const hl = lostRows.map((x) => x.vals[0]);
  const sl = lostRows.map((x) => x.vals[1]);
  const known = lostRows.filter((x) => heraldClean(x)).map((x) => x.vals[0]).filter((v) => typeof v === "number");
  if (known.length === hl.length && known.length > 0) {
    const sum = known.reduce((a, b) => a + b, 0);
    check("zero lost messages (herald, every fanout/broadcast phase)", sum === 0,
      `herald lost ${hl.join(", ")}; socket.io lost ${sl.map((v) => fmt(v, 0)).join(", ")}` +
      (present[3] ? `; sockudo lost ${lostRows.map((x) => fmt(x.vals[3], 0)).join(", ")}` : ""));
  } else check("zero lost messages", undefined, "some phases missing");
}

// Distance to the floor (issue 14's goals): memory ≤ 1.25x, fanout CPU ≤ 1.2x, p99 ≤ 2x.
if (present[2]) {
  const vs = (label, x, limit, digits = 2) => {
    const h = x.vals[0];
    const f = x.vals[2];
    if (cleanFloor(x) && typeof h === "number" && typeof f === "number" && f > 0) {
      check(`${label} ≤ ${limit}x the floor's`, h / f <= limit, `${fmt(h, digits)} vs ${fmt(f, digits)} = ${(h / f).toFixed(2)}x`);
    } else check(`${label} ≤ ${limit}x the floor's`, undefined, "noisy or missing");
  };
  vs("RSS per idle session", rss, 1.25);
  for (const [r, f] of Object.entries(fanout)) {
    vs(`fanout ${r} msg/s: server CPU per 100k`, f.cpu, 1.2, 3);
    vs(`fanout ${r} msg/s: p99`, f.p99, 2);
  }
  for (const [r, b] of Object.entries(broadcast)) vs(`broadcast ${r}/s: p99`, b.p99, 2);
}

out.push("");
out.push("lost = expected - delivered by the end of the drain (DRAIN s after the producer stopped;");
out.push("BROADCAST_DRAIN for broadcasts): a message still queued then counts as lost.");
out.push("");
out.push("Targets for herald:");
out.push(...checks);

// Producer pacing of the Socket.IO phases, and where CPU numbers came from.
const notes = [];
for (const f of fs.readdirSync(dir).filter((f) => f.endsWith("-socketio.meta.json")).sort()) {
  const m = readJson(f);
  if (m && m.producer) {
    notes.push(`- ${m.phase}: producer.js sent ${m.producer.sent} at ${fmt(m.producer.achieved_rate, 1)} msg/s ` +
      `(target ${m.producer.target_rate}, worst lag ${fmt(m.producer.max_lag_ms, 1)} ms), ` +
      `producer CPU ${fmt(m.producer.producer_cpu_s)} s`);
  }
}
for (const f of fs.readdirSync(dir).filter((f) => f.endsWith(".meta.json")).sort()) {
  const m = readJson(f);
  if (m && m.attempts > 1) notes.push(`- ${m.phase}/${m.system}: ${m.attempts} attempts (earlier ones noisy)`);
  const b = readJson(f.replace(".meta.json", ".json"));
  if (m && b && /^(fanout|broadcast)/.test(m.phase)) {
    const c = cpuPer100k({ bench: b, meta: m });
    if (c && c.src === "proc") notes.push(`- ${m.phase}/${m.system}: CPU per 100k from /proc over the whole phase (bench gave none)`);
  }
}
if (notes.length) {
  out.push("");
  out.push("Notes:");
  out.push(...notes);
}
console.log(out.join("\n"));
