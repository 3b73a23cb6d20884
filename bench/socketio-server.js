#!/usr/bin/env node
// Socket.IO 4 peer for herald's side-by-side benchmark (bench/compare.sh).
//
// One node of a Socket.IO cluster: WebSocket transport only, the classic Redis adapter
// (@socket.io/redis-adapter) so that producers reach every node through
// @socket.io/redis-emitter, and the same HS256 JWT auth as herald:
//
//   ws://host:port/socket.io/?EIO=4&transport=websocket&token=<JWT>
//   (or the token in the CONNECT packet: 40{"token":"<JWT>"})
//
// A socket joins room `user:<sub>` and `topic:<t>` for each name in the `topics` claim, and
// does nothing else per message: what is delivered and how is Socket.IO's own work.
//
// Tuning, as a production deployment would do it (https://socket.io/docs/v4/performance-tuning,
// https://socket.io/docs/v4/memory-usage):
//   - transports ["websocket"] only, no HTTP long-polling, no client bundle served;
//   - perMessageDeflate off (herald has none), httpCompression off;
//   - maxHttpBufferSize, pingInterval (25 s, like herald's --ping-interval) and pingTimeout
//     left at their defaults;
//   - the reference to the initial HTTP request is dropped once the session is set up;
//   - ws's optional native add-on bufferutil is installed (package.json).
// A token with a `token` query parameter is checked before the WebSocket upgrade
// (allowRequest: a bad one gets HTTP 400 with the body "unauthorized" and is not
// upgraded), as herald answers 401 before its upgrade.
//
// Usage:
//   BENCH_JWT_SECRET=... node socketio-server.js --port 3001 --redis-url redis://127.0.0.1:6390 \
//       [--host 127.0.0.1] [--prefix sio-bench] [--ready-file path]
//   Without --redis-url the node runs alone (in-memory adapter).
//
// Started with `node --expose-gc`, POST /gc runs a full garbage collection and answers the
// process's memory figures (used by compare.sh around its idle-memory phase only).
//
// Prints one line `socketio-server ready pid=<pid> port=<port> ...` on stdout when it
// listens and (in cluster mode) its Redis subscription is in place; GET /healthz answers 200
// from then on. SIGTERM/SIGINT close it.
"use strict";

const http = require("node:http");
const fs = require("node:fs");
const { Server } = require("socket.io");
const jwt = require("jsonwebtoken");

function parseArgs(argv) {
  const opts = {
    port: 3000,
    host: "127.0.0.1",
    redisUrl: null,
    prefix: "sio-bench",
    readyFile: null,
    secret: process.env.BENCH_JWT_SECRET || process.env.HERALD_BENCH_SECRET || null,
  };
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i];
    const v = () => {
      if (i + 1 >= argv.length) die(`missing value for ${a}`);
      return argv[++i];
    };
    switch (a) {
      case "--port": opts.port = Number(v()); break;
      case "--host": opts.host = v(); break;
      case "--redis-url": opts.redisUrl = v(); break;
      case "--prefix": opts.prefix = v(); break;
      case "--ready-file": opts.readyFile = v(); break;
      case "--secret": opts.secret = v(); break;
      case "-h":
      case "--help":
        console.log("usage: BENCH_JWT_SECRET=... node socketio-server.js --port N [--host H] " +
          "[--redis-url redis://...] [--prefix sio-bench] [--ready-file path]");
        process.exit(0);
        break;
      default: die(`unknown argument ${a}`);
    }
  }
  if (!Number.isInteger(opts.port) || opts.port <= 0 || opts.port > 65535) die("bad --port");
  if (!opts.secret || opts.secret.length < 16) {
    die("set BENCH_JWT_SECRET (HS256 secret, at least 16 bytes)");
  }
  return opts;
}

function die(msg) {
  console.error(`socketio-server: ${msg}`);
  process.exit(2);
}

const opts = parseArgs(process.argv);

// herald's rules for user ids and topic names: 1-256 printable characters, no whitespace.
const NAME_RE = /^[\x21-\x7e\u00a0-\uffff]{1,256}$/;
const MAX_TOPICS = 64; // herald's --max-topics default

// Returns the claims of a valid token, or null.
function verifyToken(token) {
  if (typeof token !== "string" || token.length === 0 || token.length > 8192) return null;
  let claims;
  try {
    claims = jwt.verify(token, opts.secret, { algorithms: ["HS256"], clockTolerance: 5 });
  } catch {
    return null;
  }
  if (typeof claims !== "object" || claims === null) return null;
  if (typeof claims.sub !== "string" || !NAME_RE.test(claims.sub)) return null;
  if (typeof claims.exp !== "number") return null;
  let topics = [];
  if (claims.topics !== undefined) {
    if (!Array.isArray(claims.topics) || claims.topics.length > MAX_TOPICS) return null;
    for (const t of claims.topics) {
      if (typeof t !== "string" || !NAME_RE.test(t)) return null;
    }
    topics = claims.topics;
  }
  return { sub: claims.sub, topics };
}

const httpServer = http.createServer((req, res) => {
  // Socket.IO answers /socket.io/ itself; everything else lands here.
  if (req.url === "/gc" && req.method === "POST" && typeof global.gc === "function") {
    // Benchmark hook (node --expose-gc only): a full, synchronous collection, so that a
    // memory baseline does not count start-up garbage.
    global.gc();
    const m = process.memoryUsage();
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ rss: m.rss, heapUsed: m.heapUsed, heapTotal: m.heapTotal,
      external: m.external, arrayBuffers: m.arrayBuffers, sessions: io.engine.clientsCount }));
    return;
  }
  if (req.url === "/healthz") {
    res.writeHead(ready ? 200 : 503, { "content-type": "text/plain" });
    res.end(ready ? "ok\n" : "starting\n");
    return;
  }
  res.writeHead(404, { "content-type": "text/plain" });
  res.end("not found\n");
});

const io = new Server(httpServer, {
  transports: ["websocket"],
  serveClient: false,
  perMessageDeflate: false,
  httpCompression: false,
  // maxHttpBufferSize (1e6), pingInterval (25000) and pingTimeout (20000): defaults.
  allowRequest: (req, callback) => {
    // The Engine.IO handshake is the WebSocket upgrade itself (websocket-only transport).
    const token = req._query && req._query.token;
    if (token === undefined) return callback(null, true); // auth.token in the CONNECT packet
    const claims = verifyToken(token);
    if (!claims) return callback("unauthorized", false); // HTTP 400 "unauthorized", no upgrade
    req.benchClaims = claims;
    callback(null, true);
  },
});

// Keep the claims, drop the initial HTTP request (Socket.IO memory-usage advice).
io.engine.on("connection", (rawSocket) => {
  rawSocket.benchClaims = rawSocket.request.benchClaims;
  rawSocket.request = null;
});

io.use((socket, next) => {
  let claims = socket.conn.benchClaims;
  if (!claims) {
    const auth = socket.handshake.auth;
    claims = auth && verifyToken(auth.token);
  }
  socket.conn.benchClaims = undefined;
  if (!claims) return next(new Error("unauthorized")); // CONNECT_ERROR 44{"message":...}
  socket.data.sub = claims.sub;
  const rooms = ["user:" + claims.sub];
  for (const t of claims.topics) rooms.push("topic:" + t);
  socket.join(rooms);
  next();
});

io.on("connection", () => {
  // Nothing per socket: the rooms are joined in the middleware, delivery is Socket.IO's.
});

let ready = false;
let redisClients = [];

async function main() {
  if (opts.redisUrl) {
    const { createClient } = require("redis");
    const { createAdapter } = require("@socket.io/redis-adapter");
    const name = `sio-bench-${process.pid}`;
    const pubClient = createClient({ url: opts.redisUrl, name: `${name}-pub` });
    const subClient = pubClient.duplicate({ name: `${name}-sub` });
    for (const c of [pubClient, subClient]) {
      c.on("error", (err) => console.error(`socketio-server: redis: ${err.message}`));
    }
    await Promise.all([pubClient.connect(), subClient.connect()]);
    redisClients = [pubClient, subClient];
    io.adapter(createAdapter(pubClient, subClient, { key: opts.prefix }));
    // The adapter subscribes without telling when it is done: wait until Redis lists our
    // subscriber connection with its pattern subscription.
    let subscribed = false;
    for (let i = 0; i < 200 && !subscribed; i++) {
      const list = await pubClient.sendCommand(["CLIENT", "LIST", "TYPE", "pubsub"]);
      subscribed = String(list).split("\n")
        .some((l) => l.includes(` name=${name}-sub `) && / psub=[1-9]/.test(l));
      if (!subscribed) await new Promise((r) => setTimeout(r, 25));
    }
    if (!subscribed) throw new Error("the Redis adapter did not subscribe within 5 s");
  }
  // Large accept backlog, as a production node would set (herald's is 128 at this commit;
  // the kernel caps it at net.core.somaxconn).
  await new Promise((resolve, reject) => {
    httpServer.once("error", reject);
    httpServer.listen({ port: opts.port, host: opts.host, backlog: 511 }, resolve);
  });
  ready = true;
  const line = `socketio-server ready pid=${process.pid} port=${opts.port} host=${opts.host} ` +
    `redis=${opts.redisUrl ? "yes" : "no"} prefix=${opts.prefix} node=${process.version} ` +
    `socket.io=${require("socket.io/package.json").version}`;
  console.log(line);
  if (opts.readyFile) fs.writeFileSync(opts.readyFile, `${process.pid}\n`);
}

let stopping = false;
async function stop(signal) {
  if (stopping) return;
  stopping = true;
  ready = false;
  console.error(`socketio-server: ${signal}, closing (${io.engine.clientsCount} sessions)`);
  const timer = setTimeout(() => process.exit(0), 5000);
  timer.unref();
  io.close();
  for (const c of redisClients) {
    try { await c.quit(); } catch { /* already gone */ }
  }
  process.exit(0);
}
process.on("SIGTERM", () => stop("SIGTERM"));
process.on("SIGINT", () => stop("SIGINT"));

main().catch((err) => {
  console.error(`socketio-server: ${err.stack || err}`);
  process.exit(1);
});
