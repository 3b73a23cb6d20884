/**
 * The herald browser client: one connection per browser, shared by its tabs.
 *
 * Every tab runs a HeraldClient. One of them (the leader, elected with Web Locks or over
 * BroadcastChannel) holds the Connection; it forwards every frame, state change and ack
 * over a BroadcastChannel, and the other tabs hand it their acks. Each tab drops durable
 * messages whose id is not after the last one it processed, so a takeover (which resumes
 * with `since`) never shows one twice.
 */

import { DEFAULT_BACKOFF } from "./backoff.js";
import { Connection, type Clock, type ConnectionStateChange, type ServerFrame } from "./connection.js";
import { compareIds, isInboxId, maxId } from "./ids.js";
import { readClaims } from "./jwt.js";
import {
  BroadcastLeadership,
  WebLocksLeadership,
  type ElectionMessage,
  type Leadership,
} from "./leader.js";
import type {
  ErrorEvent,
  HeraldEnvironment,
  HeraldEventName,
  HeraldEvents,
  HeraldMessage,
  HeraldOptions,
  HeraldStorage,
  LockManagerLike,
  StateEvent,
  WelcomeEvent,
} from "./types.js";

type Handler<K extends HeraldEventName> = (event: HeraldEvents[K]) => void;

/** Messages between the tabs of one browser (one BroadcastChannel per url and user). */
type BusMessage =
  | { t: "frame"; frame: ServerFrame }
  | { t: "state"; state: StateEvent }
  | { t: "error"; error: ErrorEvent }
  | { t: "acked"; id: string }
  | { t: "ack"; id: string }
  | { t: "hello" }
  | { t: "snapshot"; state: StateEvent; lastId?: string }
  | ElectionMessage;

const TERMINAL = new Set(["kicked", "unauthorized"]);

function memoryStorage(): HeraldStorage {
  const m = new Map<string, string>();
  return { get: (k) => m.get(k) ?? null, set: (k, v) => void m.set(k, v) };
}

function defaultStorage(): HeraldStorage {
  try {
    const ls = (globalThis as { localStorage?: Storage }).localStorage;
    if (ls) {
      return {
        get: (k) => {
          try {
            return ls.getItem(k);
          } catch {
            return null;
          }
        },
        set: (k, v) => {
          try {
            ls.setItem(k, v);
          } catch {
            /* quota or privacy mode: the in-memory id still works for this page */
          }
        },
      };
    }
  } catch {
    /* localStorage access can throw (sandboxed frames) */
  }
  return memoryStorage();
}

function report(e: unknown): void {
  const g = globalThis as { reportError?: (e: unknown) => void };
  if (typeof g.reportError === "function") g.reportError(e);
  else console.error(e);
}

function bases(url: string): { httpBase: string; wsBase: string; key: string } {
  const loc = (globalThis as { location?: { href: string } }).location;
  const u = loc ? new URL(url, loc.href) : new URL(url);
  let path = u.pathname.replace(/\/+$/, "");
  const httpProto = u.protocol === "wss:" || u.protocol === "https:" ? "https:" : "http:";
  const wsProto = httpProto === "https:" ? "wss:" : "ws:";
  if (path === "/") path = "";
  return {
    httpBase: `${httpProto}//${u.host}${path}`,
    wsBase: `${wsProto}//${u.host}${path}`,
    key: `${u.host}${path}`,
  };
}

export class HeraldClient {
  private readonly handlers = new Map<HeraldEventName, Set<Handler<HeraldEventName>>>();
  private readonly env: Required<Pick<HeraldEnvironment, "now" | "random">> & HeraldEnvironment;
  private readonly clock: Clock;
  private readonly storage: HeraldStorage;
  private readonly tabId: string;
  private currentState: StateEvent = { state: "idle", leader: false };
  private last: string | undefined;
  private leader = false;
  private started = false;
  private halted = false;
  /** Bumped by start and stop: async steps of an older start give up. */
  private run = 0;
  private conn: Connection | null = null;
  private bus: BroadcastChannel | null = null;
  private leadership: Leadership | null = null;
  private storageKey = "";
  private initialToken: string | undefined;
  private pendingAck: string | undefined;
  private readonly onPageHide = (ev: Event) => {
    // A tab going into the back/forward cache keeps running nothing: hand over now.
    void ev;
    if (this.started) {
      this.stop();
      this.resumeOnShow = true;
    }
  };
  private readonly onPageShow = (ev: Event) => {
    if ((ev as { persisted?: boolean }).persisted && this.resumeOnShow) {
      this.resumeOnShow = false;
      void this.start();
    }
  };
  private resumeOnShow = false;

  constructor(private readonly options: HeraldOptions) {
    if (!options || typeof options.url !== "string") throw new TypeError("herald: options.url is required");
    if (typeof options.getToken !== "function") throw new TypeError("herald: options.getToken is required");
    const g = globalThis as Record<string, unknown>;
    const e = options.env ?? {};
    const nav = g.navigator as { locks?: LockManagerLike } | undefined;
    this.env = {
      WebSocket: e.WebSocket ?? (g.WebSocket as typeof WebSocket | undefined),
      EventSource: e.EventSource ?? (g.EventSource as typeof EventSource | undefined),
      fetch: e.fetch ?? (typeof g.fetch === "function" ? (g.fetch as typeof fetch).bind(globalThis) : undefined),
      BroadcastChannel: e.BroadcastChannel ?? (g.BroadcastChannel as typeof BroadcastChannel | undefined),
      locks: e.locks !== undefined ? e.locks : nav?.locks && typeof nav.locks.request === "function" ? nav.locks : null,
      setTimeout: e.setTimeout ?? ((fn, ms) => setTimeout(fn, ms)),
      clearTimeout: e.clearTimeout ?? ((h) => clearTimeout(h as ReturnType<typeof setTimeout>)),
      now: e.now ?? (() => Date.now()),
      random: e.random ?? Math.random,
      window:
        e.window !== undefined
          ? e.window
          : typeof (g as { addEventListener?: unknown }).addEventListener === "function"
            ? (globalThis as unknown as EventTarget)
            : null,
    };
    const env = this.env;
    this.clock = {
      setTimeout: (fn, ms) => env.setTimeout!(fn, ms),
      clearTimeout: (h) => {
        if (h !== undefined) env.clearTimeout!(h);
      },
      now: () => env.now(),
      random: () => env.random(),
    };
    this.storage = options.storage ?? defaultStorage();
    // Not from env.random (a test's fixed random would give every tab the same id).
    const c = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto;
    this.tabId = c?.randomUUID?.() ?? `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
  }

  // ---------- events ----------

  /** Subscribes to an event; returns a function that unsubscribes. */
  on<K extends HeraldEventName>(type: K, handler: Handler<K>): () => void {
    let set = this.handlers.get(type);
    if (!set) {
      set = new Set();
      this.handlers.set(type, set);
    }
    set.add(handler as Handler<HeraldEventName>);
    return () => this.off(type, handler);
  }

  off<K extends HeraldEventName>(type: K, handler: Handler<K>): void {
    this.handlers.get(type)?.delete(handler as Handler<HeraldEventName>);
  }

  private emit<K extends HeraldEventName>(type: K, event: HeraldEvents[K]): void {
    const set = this.handlers.get(type);
    if (!set) return;
    for (const h of [...set]) {
      try {
        h(event);
      } catch (e) {
        report(e);
      }
    }
  }

  // ---------- public state ----------

  /** The connection state as this tab knows it (other tabs mirror the leader's). */
  get state(): StateEvent {
    return { ...this.currentState };
  }

  /** The last durable message id this tab processed. */
  get lastId(): string | undefined {
    return this.last;
  }

  /** True in the tab that holds the connection. */
  get isLeader(): boolean {
    return this.leader;
  }

  // ---------- lifecycle ----------

  /**
   * Starts: learns the user (option `user`, else from a first token), reads the stored
   * durable id, then joins the tab election; the elected tab connects. After `kicked` or
   * `unauthorized` (which stop every tab), calling it again starts over.
   */
  async start(): Promise<void> {
    if (this.started && !this.halted) return;
    // After `kicked` or `unauthorized`, start() begins anew.
    if (this.started) this.stop();
    this.started = true;
    this.halted = false;
    const run = ++this.run;
    const { key } = bases(this.options.url);
    let user = this.options.user;
    if (user === undefined) {
      let token: string;
      try {
        token = await this.options.getToken();
      } catch (e) {
        if (run !== this.run) return;
        this.emitError({ error: "get_token_failed", message: String(e) });
        this.started = false;
        this.setState({ state: "closed", reason: "get_token_failed", leader: false });
        return;
      }
      if (run !== this.run) return;
      this.initialToken = token;
      user = readClaims(token).sub ?? token;
    }
    this.storageKey = this.options.storageKey ?? `herald:last-id:${key}:${user}`;
    await this.loadStoredId();
    if (run !== this.run) return;

    this.setState({ state: "connecting", leader: false });
    const win = this.env.window;
    win?.addEventListener("pagehide", this.onPageHide);
    win?.addEventListener("pageshow", this.onPageShow);

    const BC = this.env.BroadcastChannel;
    if (this.options.shareAcrossTabs === false || !BC) {
      void this.becomeLeader();
      return;
    }
    const name = this.options.channelName ?? `herald:${key}:${user}`;
    const bus = new BC(name);
    this.bus = bus;
    bus.onmessage = (ev: MessageEvent) => this.onBus(ev.data as BusMessage);
    const cb = { lead: () => void this.becomeLeader(), lose: () => this.loseLeadership() };
    this.leadership = this.env.locks
      ? new WebLocksLeadership(this.env.locks, name, cb)
      : new BroadcastLeadership(this.tabId, (m) => this.post(m), this.clock, cb);
    this.post({ t: "hello" });
    this.leadership.start();
  }

  /**
   * Stops this tab's client. A leader closes the connection (code 1000) and hands over to
   * another tab, which connects; the other tabs are not stopped.
   */
  stop(): void {
    if (!this.started) return;
    this.started = false;
    this.run++;
    const conn = this.conn;
    this.conn = null;
    this.leader = false;
    // Leave the election first, so the tab taking over is not told "closed".
    this.leadership?.stop();
    this.leadership = null;
    conn?.stop();
    this.bus?.close();
    this.bus = null;
    this.env.window?.removeEventListener("pagehide", this.onPageHide);
    this.setState({ state: "closed", leader: false });
  }

  /**
   * Acknowledges durable messages up to `id` (moves the user's read cursor). The leader
   * sends it (WebSocket frame or `POST /ack` on SSE); other tabs forward it to the leader.
   * Every tab then gets a `read` event with `local: true`.
   */
  async ack(id: string): Promise<void> {
    if (!isInboxId(id)) throw new TypeError(`herald: ack: not an inbox id: ${JSON.stringify(id)}`);
    if (this.leader && this.conn) {
      await this.conn.ack(id);
      return;
    }
    this.pendingAck = maxId(this.pendingAck, id);
    this.post({ t: "ack", id });
  }

  // ---------- leader side ----------

  private async becomeLeader(): Promise<void> {
    if (!this.started || this.halted || this.leader) return;
    const run = this.run;
    this.leader = true;
    // The previous leader stored its last id before it could die; it may be newer than
    // what reached this tab.
    await this.loadStoredId();
    if (run !== this.run || !this.leader) return;
    const { httpBase, wsBase } = bases(this.options.url);
    const o = this.options;
    const conn = new Connection(
      {
        httpBase,
        wsBase,
        getToken: o.getToken,
        initialToken: this.initialToken,
        topics: o.topics,
        transport: o.transport ?? "auto",
        sseAfterFailures: o.sseAfterFailures ?? 3,
        wsRetryInterval: o.wsRetryInterval ?? 120_000,
        probe: o.probe ?? true,
        refreshMargin: o.refreshMargin ?? 30_000,
        backoff: { base: o.backoff?.base ?? DEFAULT_BACKOFF.base, cap: o.backoff?.cap ?? DEFAULT_BACKOFF.cap },
        stableAfter: o.stableAfter ?? 60_000,
        withCredentials: o.withCredentials ?? false,
      },
      { WebSocket: this.env.WebSocket, EventSource: this.env.EventSource, fetch: this.env.fetch },
      this.clock,
      {
        frame: (f) => this.leaderFrame(f, conn),
        state: (s) => this.leaderState(s, conn),
        error: (e) => {
          if (this.conn !== conn) return;
          this.post({ t: "error", error: e });
          this.emitError(e);
        },
        since: () => this.last,
        badSince: () => {
          this.last = undefined;
          void this.store("");
        },
        acked: (id) => {
          if (this.conn !== conn) return;
          this.post({ t: "acked", id });
          this.emit("read", { id, local: true });
        },
      },
    );
    this.initialToken = undefined;
    this.conn = conn;
    conn.start();
    if (this.pendingAck !== undefined) {
      const id = this.pendingAck;
      this.pendingAck = undefined;
      void conn.ack(id).catch(() => undefined);
    }
  }

  private loseLeadership(): void {
    const conn = this.conn;
    this.conn = null;
    this.leader = false;
    conn?.stop();
  }

  private leaderFrame(f: ServerFrame, conn: Connection): void {
    if (this.conn !== conn) return;
    if (f.type === "message" && isInboxId(f.id)) {
      if (this.last !== undefined && compareIds(f.id, this.last) <= 0) return;
      // Other tabs first, then storage, then this tab's handlers: once stored, the id is
      // skipped by the next `since`, so every tab must have it by then.
      this.post({ t: "frame", frame: f });
      this.last = f.id;
      void this.store(f.id);
      this.dispatch(f);
      return;
    }
    this.post({ t: "frame", frame: f });
    this.dispatch(f);
  }

  private leaderState(s: ConnectionStateChange, conn: Connection): void {
    if (this.conn !== conn) return;
    const ev: StateEvent = { ...s, leader: true };
    if (!this.started && s.state === "closed") return;
    this.post({ t: "state", state: ev });
    this.setState(ev);
    if (TERMINAL.has(s.state)) this.halted = true;
    if (s.state === "open" && this.pendingAck !== undefined) {
      const id = this.pendingAck;
      this.pendingAck = undefined;
      void conn.ack(id).catch(() => undefined);
    }
  }

  // ---------- follower side ----------

  private onBus(msg: BusMessage): void {
    if (!msg || typeof msg !== "object") return;
    switch (msg.t) {
      case "hb":
      case "claim":
      case "resign":
        this.leadership?.receive?.(msg);
        return;
      case "hello":
        if (this.leader) this.post({ t: "snapshot", state: this.currentState, lastId: this.last });
        return;
      case "ack":
        if (this.leader && this.conn) void this.conn.ack(msg.id).catch(() => undefined);
        else if (this.leader) this.pendingAck = maxId(this.pendingAck, msg.id);
        return;
      case "acked":
        if (this.pendingAck !== undefined && compareIds(msg.id, this.pendingAck) >= 0) this.pendingAck = undefined;
        this.emit("read", { id: msg.id, local: true });
        return;
      default:
        break;
    }
    if (this.leader) return;
    switch (msg.t) {
      case "frame":
        this.followerFrame(msg.frame);
        return;
      case "state":
        this.followerState(msg.state);
        return;
      case "snapshot":
        this.last = maxId(this.last, msg.lastId);
        if (msg.state.state !== this.currentState.state || msg.state.transport !== this.currentState.transport) {
          this.followerState(msg.state);
        }
        return;
      case "error":
        this.emitError(msg.error);
        return;
    }
  }

  private followerFrame(f: ServerFrame): void {
    if (f.type === "message" && isInboxId(f.id)) {
      if (this.last !== undefined && compareIds(f.id, this.last) <= 0) return;
      this.last = f.id;
    }
    this.dispatch(f);
  }

  private followerState(s: StateEvent): void {
    this.setState({ ...s, leader: false });
    if (TERMINAL.has(s.state)) {
      // Kicked or refused: this tab must not take over and connect again.
      this.halted = true;
      this.leadership?.stop();
      this.leadership = null;
    }
    if (s.state === "open" && this.pendingAck !== undefined) {
      // A new leader may not have heard the ack: send it again (acks never move back).
      this.post({ t: "ack", id: this.pendingAck });
    }
  }

  // ---------- shared ----------

  private dispatch(f: ServerFrame): void {
    switch (f.type) {
      case "message": {
        const msg: HeraldMessage = { channel: String(f.channel ?? ""), data: f.data };
        if (isInboxId(f.id)) msg.id = f.id;
        if (typeof f.replaces === "string") msg.replaces = f.replaces;
        this.emit("message", msg);
        return;
      }
      case "gap":
        this.emit("gap", { reason: String(f.reason ?? "") });
        return;
      case "read":
        if (typeof f.id === "string") this.emit("read", { id: f.id });
        return;
      case "retract":
        if (typeof f.id === "string") this.emit("retract", { id: f.id });
        return;
      case "error": {
        const e: ErrorEvent = { error: String(f.error ?? "error") };
        if (typeof f.reason === "string") e.reason = f.reason;
        if (typeof f.message === "string") e.message = f.message;
        this.emit("error", e);
        return;
      }
      case "welcome": {
        const w: WelcomeEvent = {
          session: String(f.session ?? ""),
          user: String(f.user ?? ""),
          node: String(f.node ?? ""),
        };
        if (typeof f.unread === "number") w.unread = f.unread;
        if (typeof f.exp === "number") w.exp = f.exp;
        this.emit("welcome", w);
        return;
      }
      default:
        return;
    }
  }

  private setState(s: StateEvent): void {
    this.currentState = s;
    this.emit("state", { ...s });
  }

  private emitError(e: ErrorEvent): void {
    this.emit("error", { ...e });
  }

  private post(msg: BusMessage): void {
    try {
      this.bus?.postMessage(msg);
    } catch (e) {
      report(e);
    }
  }

  private async loadStoredId(): Promise<void> {
    try {
      const v = await this.storage.get(this.storageKey);
      if (typeof v === "string" && isInboxId(v)) this.last = maxId(this.last, v);
    } catch (e) {
      this.emitError({ error: "storage_failed", message: String(e) });
    }
  }

  private async store(id: string): Promise<void> {
    try {
      await this.storage.set(this.storageKey, id);
    } catch (e) {
      this.emitError({ error: "storage_failed", message: String(e) });
    }
  }
}
