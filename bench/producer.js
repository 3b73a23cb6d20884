#!/usr/bin/env node
// External producer for the Socket.IO peer (bench/compare.sh): publishes through
// @socket.io/redis-emitter, the way a backend service notifies a Socket.IO cluster.
//
// Every message is the event `notify` with one argument
//   {"seq": <sequence per target, from 1>, "ts": <process.hrtime.bigint() as a Number:
//    ns of CLOCK_MONOTONIC, the clock herald-bench reads>, "pad": "xxx..."}
// sent to
//   fanout:    room user:bench-<i>, one user drawn at random per message (seq per user);
//   broadcast: every socket (one seq for all);
//   topic:     room topic:t<k>, one topic drawn at random per message (seq per topic).
//
// Pacing: a timer fires every millisecond and publishes what is due by then
// (floor(elapsed * rate)), so batches stay small and the average rate is exact; the achieved
// rate, the worst lag behind schedule and the publish round trip are reported at the end.
// After --duration seconds it waits for Redis to acknowledge every PUBLISH, then writes
// --expect-file (atomically: temp file + rename):
//   fanout    {"sent": n, "per_user": {"bench-0": lastSeq, ...}}   (every user, 0 = none)
//   topic     {"sent": n, "per_topic": {"t0": lastSeq, ...}}
//   broadcast {"sent": n}
//
// Usage:
//   node producer.js --redis-url redis://127.0.0.1:6390 [--prefix sio-bench] --mode fanout \
//       --users 16000 [--first-user 0] [--topics 10] --rate 2000 --duration 20 \
//       [--payload-bytes 100] --expect-file out.json [--stats-file stats.json] [--start-file f]
//
// --payload-bytes is the number of "x" in "pad" (herald-bench's meaning too; default 100).
// --start-file makes the producer connect, then
// wait (at most 10 minutes) until that file exists before the clock starts, so a caller can
// know its pid early. Before that it publishes --warmup (2000) messages to a room nobody is
// in (warmup:<pid>), so the measured messages do not pay for JIT compilation.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { createClient } = require("redis");
const { Emitter } = require("@socket.io/redis-emitter");

function die(msg) {
  console.error(`producer: ${msg}`);
  process.exit(2);
}

function parseArgs(argv) {
  const o = {
    redisUrl: null,
    prefix: "sio-bench",
    mode: null,
    users: 0,
    firstUser: 0,
    topics: 0,
    rate: 0,
    duration: 0,
    payloadBytes: 100,
    expectFile: null,
    statsFile: null,
    startFile: null,
    event: "notify",
    warmup: 2000,
  };
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i];
    const v = () => {
      if (i + 1 >= argv.length) die(`missing value for ${a}`);
      return argv[++i];
    };
    switch (a) {
      case "--redis-url": o.redisUrl = v(); break;
      case "--prefix": o.prefix = v(); break;
      case "--mode": o.mode = v(); break;
      case "--users": o.users = Number(v()); break;
      case "--first-user": o.firstUser = Number(v()); break;
      case "--topics": o.topics = Number(v()); break;
      case "--rate": o.rate = Number(v()); break;
      case "--duration": o.duration = Number(v()); break;
      case "--payload-bytes": o.payloadBytes = Number(v()); break;
      case "--expect-file": o.expectFile = v(); break;
      case "--stats-file": o.statsFile = v(); break;
      case "--start-file": o.startFile = v(); break;
      case "--event": o.event = v(); break;
      case "--warmup": o.warmup = Number(v()); break;
      case "-h":
      case "--help":
        console.log("usage: node producer.js --redis-url URL [--prefix sio-bench] " +
          "--mode fanout|broadcast|topic [--users N] [--first-user I] [--topics K] --rate R " +
          "--duration S [--payload-bytes B] --expect-file F [--stats-file F] [--start-file F]");
        process.exit(0);
        break;
      default: die(`unknown argument ${a}`);
    }
  }
  if (!o.redisUrl) die("--redis-url is required");
  if (!["fanout", "broadcast", "topic"].includes(o.mode)) die("--mode fanout|broadcast|topic");
  if (o.mode === "fanout" && !(Number.isInteger(o.users) && o.users > 0)) die("--users N > 0");
  if (o.mode === "topic" && !(Number.isInteger(o.topics) && o.topics > 0)) die("--topics K > 0");
  if (!(o.rate > 0 && o.rate <= 1e6)) die("--rate must be in (0, 1e6]");
  if (!(o.duration > 0 && o.duration <= 3600)) die("--duration must be in (0, 3600] s");
  if (!(Number.isInteger(o.payloadBytes) && o.payloadBytes >= 0 && o.payloadBytes <= 1 << 20)) {
    die("--payload-bytes must be in [0, 1 MiB]");
  }
  if (!o.expectFile) die("--expect-file is required");
  return o;
}

const o = parseArgs(process.argv);

// Small, fast, seedable PRNG (xorshift32) so that runs are reproducible.
let rng = 0x9e3779b9 ^ (o.rate * 7919) ^ o.users;
function randBelow(n) {
  rng ^= rng << 13; rng >>>= 0;
  rng ^= rng >>> 17;
  rng ^= rng << 5; rng >>>= 0;
  return rng % n;
}

// --payload-bytes is the number of "x" in "pad", as in herald-bench's own producer.
const pad = "x".repeat(o.payloadBytes);

function writeAtomic(file, text) {
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  fs.writeFileSync(tmp, text);
  fs.renameSync(tmp, file);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const client = createClient({ url: o.redisUrl, name: `sio-bench-producer-${process.pid}` });
  client.on("error", (err) => console.error(`producer: redis: ${err.message}`));
  await client.connect();
  const emitter = new Emitter(client, { key: o.prefix });

  // Warm up (JIT, Redis connection, msgpack encoder) before the measured publishing, with
  // messages to a room no socket is in: nodes drop them after a room lookup.
  if (o.warmup > 0) {
    const warm = { seq: 0, ts: 0, pad };
    for (let i = 0; i < o.warmup; i += 100) {
      for (let j = 0; j < 100; j++) emitter.to(`warmup:${process.pid}`).emit(o.event, warm);
      await sleep(1);
    }
    await client.ping();
  }

  if (o.startFile) {
    const deadline = Date.now() + 600_000;
    while (!fs.existsSync(o.startFile)) {
      if (Date.now() > deadline) die(`${o.startFile} did not appear within 10 minutes`);
      await sleep(20);
    }
  }

  const perTarget = new Map(); // room suffix -> last seq
  let broadcastSeq = 0;
  let sent = 0;
  let maxLagMs = 0;
  let maxBatch = 0;
  const rateNs = o.rate / 1e9;
  const total = Math.floor(o.rate * o.duration);
  const userIds = [];
  if (o.mode === "fanout") {
    for (let i = 0; i < o.users; i++) userIds.push(`bench-${o.firstUser + i}`);
  }
  const topicIds = [];
  for (let k = 0; k < o.topics; k++) topicIds.push(`t${k}`);

  function publishOne() {
    let target;
    let seq;
    if (o.mode === "fanout") {
      target = userIds[randBelow(userIds.length)];
      seq = (perTarget.get(target) || 0) + 1;
      perTarget.set(target, seq);
    } else if (o.mode === "topic") {
      target = topicIds[randBelow(topicIds.length)];
      seq = (perTarget.get(target) || 0) + 1;
      perTarget.set(target, seq);
    } else {
      seq = ++broadcastSeq;
    }
    const payload = { seq, ts: Number(process.hrtime.bigint()), pad };
    if (o.mode === "fanout") emitter.to(`user:${target}`).emit(o.event, payload);
    else if (o.mode === "topic") emitter.to(`topic:${target}`).emit(o.event, payload);
    else emitter.emit(o.event, payload);
    sent++;
  }

  const start = process.hrtime.bigint();
  await new Promise((resolve) => {
    const tick = () => {
      const now = process.hrtime.bigint();
      const elapsed = Number(now - start);
      let due = Math.min(total, Math.floor(elapsed * rateNs) + 1); // first message at t=0
      const batch = due - sent;
      if (batch > maxBatch) maxBatch = batch;
      if (batch > 1) {
        // lag of the oldest message in this batch behind its scheduled time
        const lag = (elapsed - (sent / rateNs)) / 1e6;
        if (lag > maxLagMs) maxLagMs = lag;
      }
      while (sent < due) publishOne();
      if (sent >= total) return resolve();
      // sleep until the next message is due, at most 1 ms (timers fire no earlier than 1 ms)
      const nextNs = sent / rateNs - elapsed;
      setTimeout(tick, Math.max(0, Math.min(1, nextNs / 1e6 - 0.2)));
    };
    tick();
  });
  const publishedAt = process.hrtime.bigint();
  // Commands on one connection are answered in order: when PING returns, every PUBLISH has
  // been executed by Redis.
  await client.ping();
  const end = process.hrtime.bigint();
  const publishSeconds = Number(publishedAt - start) / 1e9;

  let expect;
  if (o.mode === "fanout") {
    const perUser = {};
    for (const u of userIds) perUser[u] = perTarget.get(u) || 0;
    expect = { sent, per_user: perUser };
  } else if (o.mode === "topic") {
    const perTopic = {};
    for (const t of topicIds) perTopic[t] = perTarget.get(t) || 0;
    expect = { sent, per_topic: perTopic };
  } else {
    expect = { sent };
  }
  writeAtomic(o.expectFile, JSON.stringify(expect));

  const usage = process.cpuUsage();
  const stats = {
    mode: o.mode,
    sent,
    target_rate: o.rate,
    // messages after the first, over the time from the first to the last publish
    achieved_rate: sent > 1 ? (sent - 1) / publishSeconds : sent,
    duration_s: publishSeconds,
    flush_ms: Number(end - publishedAt) / 1e6,
    max_lag_ms: maxLagMs,
    max_batch: maxBatch,
    pad_bytes: pad.length,
    producer_cpu_s: (usage.user + usage.system) / 1e6,
    pid: process.pid,
  };
  const line = JSON.stringify(stats);
  console.log(line);
  if (o.statsFile) writeAtomic(o.statsFile, line + "\n");
  await client.quit();
}

main().catch((err) => {
  console.error(`producer: ${err.stack || err}`);
  process.exit(1);
});
