// Fakes for the unit tests: a clock, WebSocket, EventSource, fetch, BroadcastChannel, Web
// Locks and storage. No network, no real timers: a test advances the clock itself.

/** Lets every pending promise continuation run (setImmediate comes after microtasks). */
export function flush(rounds = 3) {
  let p = Promise.resolve();
  for (let i = 0; i < rounds; i++) p = p.then(() => new Promise((r) => setImmediate(r)));
  return p;
}

export class FakeClock {
  constructor(start = 1_700_000_000_000) {
    this.t = start;
    this.timers = new Map();
    this.seq = 0;
    this.rand = 0.5;
  }
  now = () => this.t;
  random = () => this.rand;
  setTimeout = (fn, ms) => {
    const id = ++this.seq;
    this.timers.set(id, { at: this.t + Math.max(0, ms), fn, id });
    return id;
  };
  clearTimeout = (id) => {
    this.timers.delete(id);
  };
  /** Delays of the pending timers, soonest first. */
  pending() {
    return [...this.timers.values()].map((t) => t.at - this.t).sort((a, b) => a - b);
  }
  /** Moves time forward by `ms`, running due timers in order and settling promises. */
  async advance(ms) {
    const end = this.t + ms;
    await flush();
    for (;;) {
      const due = [...this.timers.values()].filter((t) => t.at <= end).sort((a, b) => a.at - b.at || a.id - b.id);
      if (due.length === 0) break;
      const next = due[0];
      this.timers.delete(next.id);
      this.t = next.at;
      next.fn();
      await flush();
    }
    this.t = end;
    await flush();
  }
}

/** A WebSocket class whose instances the test drives. `sockets` lists every one made. */
export function fakeWebSocket() {
  const sockets = [];
  class FakeWebSocket {
    static CONNECTING = 0;
    static OPEN = 1;
    static CLOSING = 2;
    static CLOSED = 3;
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.closedWith = undefined;
      this.onopen = this.onmessage = this.onerror = this.onclose = null;
      sockets.push(this);
    }
    get query() {
      return new URL(this.url).searchParams;
    }
    send(text) {
      if (this.readyState !== 1) throw new Error("InvalidStateError: not open");
      this.sent.push(JSON.parse(text));
    }
    close(code = 1000) {
      this.closedWith = code;
      this.readyState = 3;
    }
    // ---- test side ----
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }
    receive(frame) {
      this.onmessage?.({ data: typeof frame === "string" ? frame : JSON.stringify(frame) });
    }
    welcome(extra = {}) {
      this.open();
      this.receive({ type: "welcome", session: "s1", user: "alice", node: "n1", unread: 0, ...extra });
    }
    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason, wasClean: true });
    }
    /** The connection fails before opening (refused upgrade, proxy, network). */
    fail() {
      this.readyState = 3;
      this.onerror?.({});
      this.onclose?.({ code: 1006, reason: "", wasClean: false });
    }
  }
  return { WebSocket: FakeWebSocket, sockets };
}

/** An EventSource class whose instances the test drives. */
export function fakeEventSource() {
  const sources = [];
  class FakeEventSource {
    constructor(url, init) {
      this.url = url;
      this.init = init;
      this.readyState = 0;
      this.closed = false;
      this.listeners = new Map();
      this.onopen = null;
      sources.push(this);
    }
    get query() {
      return new URL(this.url).searchParams;
    }
    addEventListener(type, fn) {
      if (!this.listeners.has(type)) this.listeners.set(type, []);
      this.listeners.get(type).push(fn);
    }
    removeEventListener() {}
    close() {
      this.closed = true;
      this.readyState = 2;
    }
    // ---- test side ----
    dispatch(type, ev) {
      for (const fn of this.listeners.get(type) ?? []) fn(ev);
    }
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }
    /** A server event: `event: <frame.type>`, `data: <JSON>`. */
    event(frame, id) {
      this.dispatch(frame.type, { type: frame.type, data: JSON.stringify(frame), lastEventId: id ?? "" });
    }
    welcome(extra = {}) {
      this.open();
      this.event({ type: "welcome", session: "s1", user: "alice", node: "n1", ...extra });
    }
    /** The EventSource's own connection error (no data). */
    fail() {
      this.dispatch("error", { type: "error" });
    }
  }
  return { EventSource: FakeEventSource, sources };
}

/** fetch answering from `route(url, init)` → {status, body} or a thrown error. */
export function fakeFetch(route) {
  const calls = [];
  const fn = async (url, init = {}) => {
    calls.push({ url: String(url), init });
    const r = await route(String(url), init);
    return {
      status: r.status,
      ok: r.status >= 200 && r.status < 300,
      headers: { get: (name) => r.headers?.[name.toLowerCase()] ?? null },
      json: async () => r.body,
    };
  };
  return { fetch: fn, calls };
}

/** BroadcastChannel instances sharing one in-memory hub (delivery is asynchronous). */
export function fakeBroadcastChannel() {
  const hub = new Map();
  class FakeBroadcastChannel {
    constructor(name) {
      this.name = name;
      this.onmessage = null;
      this.closed = false;
      if (!hub.has(name)) hub.set(name, new Set());
      hub.get(name).add(this);
    }
    postMessage(msg) {
      if (this.closed) throw new Error("InvalidStateError: closed");
      const copy = structuredClone(msg);
      for (const other of hub.get(this.name)) {
        if (other === this) continue;
        setImmediate(() => {
          if (!other.closed) other.onmessage?.({ data: copy });
        });
      }
    }
    close() {
      this.closed = true;
      hub.get(this.name)?.delete(this);
    }
  }
  return { BroadcastChannel: FakeBroadcastChannel };
}

/** Web Locks: one exclusive holder per name, FIFO waiters, abortable while waiting. */
export function fakeLocks() {
  const queues = new Map();
  const held = new Map();
  function pump(name) {
    if (held.get(name)) return;
    const q = queues.get(name) ?? [];
    const next = q.shift();
    if (!next) return;
    held.set(name, true);
    Promise.resolve()
      .then(() => next.cb({ name }))
      .then(
        (v) => {
          held.set(name, false);
          next.resolve(v);
          pump(name);
        },
        (e) => {
          held.set(name, false);
          next.reject(e);
          pump(name);
        },
      );
  }
  return {
    held,
    request(name, opts, cb) {
      return new Promise((resolve, reject) => {
        const entry = { cb, resolve, reject };
        if (!queues.has(name)) queues.set(name, []);
        queues.get(name).push(entry);
        opts?.signal?.addEventListener("abort", () => {
          const q = queues.get(name);
          const i = q.indexOf(entry);
          if (i >= 0) {
            q.splice(i, 1);
            reject(new Error("AbortError"));
          }
        });
        pump(name);
      });
    },
  };
}

export function memoryStorage(initial = {}) {
  const m = new Map(Object.entries(initial));
  return {
    map: m,
    get: (k) => m.get(k) ?? null,
    set: (k, v) => void m.set(k, v),
  };
}

/** A page's `window` for pagehide/pageshow. */
export function fakeWindow() {
  return new EventTarget();
}
