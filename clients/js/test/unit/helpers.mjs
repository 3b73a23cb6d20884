import { HeraldClient } from "../../dist/index.js";
import {
  FakeClock,
  fakeBroadcastChannel,
  fakeEventSource,
  fakeFetch,
  fakeLocks,
  fakeWebSocket,
  flush,
  memoryStorage,
} from "./fakes.mjs";

export const URL_BASE = "http://herald.test:8080";

/** A JWT-shaped token with the given claims (unsigned: the client never checks it). */
export function jwt(claims) {
  const b = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b({ alg: "HS256", typ: "JWT" })}.${b(claims)}.sig`;
}

/** Records every event a client emits. */
export function record(client) {
  const log = { message: [], gap: [], state: [], read: [], retract: [], error: [], welcome: [] };
  for (const k of Object.keys(log)) client.on(k, (e) => log[k].push(e));
  log.states = () => log.state.map((s) => s.state);
  return log;
}

/**
 * A world of fakes shared by one or more clients (tabs of one browser): one clock, one
 * WebSocket/EventSource factory, one fetch, one storage, one BroadcastChannel hub and
 * one lock manager.
 */
export function world({ route, storage, locks = true, bc = true } = {}) {
  const clock = new FakeClock();
  const ws = fakeWebSocket();
  const es = fakeEventSource();
  const f = fakeFetch(route ?? (() => ({ status: 400, body: { error: "not_websocket" } })));
  const st = storage ?? memoryStorage();
  const bcs = fakeBroadcastChannel();
  const lk = fakeLocks();
  const env = {
    WebSocket: ws.WebSocket,
    EventSource: es.EventSource,
    fetch: f.fetch,
    BroadcastChannel: bc ? bcs.BroadcastChannel : undefined,
    locks: locks ? lk : null,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: clock.now,
    random: clock.random,
    window: null,
  };
  let tokens = 0;
  const w = {
    clock,
    sockets: ws.sockets,
    sources: es.sources,
    fetchCalls: f.calls,
    storage: st,
    locks: lk,
    env,
    tokenCalls: () => tokens,
    /** A tab: a started client sharing this world's fakes. */
    async tab(opts = {}) {
      const client = new HeraldClient({
        url: URL_BASE,
        user: "alice",
        getToken: () => {
          tokens++;
          return `tok${tokens}`;
        },
        storage: st,
        env: { ...env, ...(opts.env ?? {}) },
        ...opts,
        ...(opts.env ? { env: { ...env, ...opts.env } } : {}),
      });
      const log = record(client);
      await client.start();
      await flush();
      return { client, log };
    },
    lastSocket: () => ws.sockets[ws.sockets.length - 1],
    lastSource: () => es.sources[es.sources.length - 1],
  };
  return w;
}

export { flush };
