/** Public types of the herald browser client. */

/** A notification. */
export interface HeraldMessage {
  /** `user:<uid>`, `broadcast` or `topic:<name>`. */
  channel: string;
  /** The published payload (any JSON value). */
  data: unknown;
  /** Inbox id of a durable message; absent on plain (fire-and-forget) messages. */
  id?: string;
  /** Id of the unread message this one replaces (collapse key): show it in its place. */
  replaces?: string;
}

/** Durable messages the server can no longer replay: resync from your backend. */
export interface GapEvent {
  /** `trimmed` (inbox caps) or `replay_limit` (more pending than the server replays). */
  reason: string;
}

/** The user's read cursor moved: durable messages up to `id` are read. */
export interface ReadEvent {
  id: string;
  /**
   * True when this browser's own `ack()` moved it (the server sends no `read` frame to the
   * session that acked, so the client announces it to every tab itself).
   */
  local?: boolean;
}

/** The producer withdrew a durable message: remove it from the UI. */
export interface RetractEvent {
  id: string;
}

/**
 * A server `error` frame (`malformed`, `unknown_type`, `bad_id`, `ack_failed`,
 * `refresh_failed`) or a client-side problem (`get_token_failed`, `bad_since`,
 * `ack_post_failed`, `storage_failed`).
 */
export interface ErrorEvent {
  error: string;
  reason?: string;
  message?: string;
}

export type Transport = "websocket" | "sse";

export type ConnectionState =
  | "idle"
  | "connecting"
  | "open"
  | "reconnecting"
  | "closed"
  | "unauthorized"
  | "kicked";

export interface StateEvent {
  state: ConnectionState;
  /** With `open`: the transport in use. */
  transport?: Transport;
  /** With `reconnecting`: ms until the next attempt. */
  delay?: number;
  /** The close code that caused this state, when there was one. */
  code?: number;
  /** The close reason (`draining`, `token_expired`, ...) or the client's own reason. */
  reason?: string;
  /** True in the tab that holds the connection. Other tabs mirror the leader's state. */
  leader: boolean;
}

/** The first frame of every connection. */
export interface WelcomeEvent {
  session: string;
  user: string;
  node: string;
  /** Unread durable messages (absent when the server could not read the inbox). */
  unread?: number;
  /** Token expiry in Unix seconds (JWT mode only). */
  exp?: number;
}

export interface HeraldEvents {
  message: HeraldMessage;
  gap: GapEvent;
  state: StateEvent;
  read: ReadEvent;
  retract: RetractEvent;
  error: ErrorEvent;
  welcome: WelcomeEvent;
}

export type HeraldEventName = keyof HeraldEvents;

/** Where the last processed durable id is kept. `localStorage` by default. */
export interface HeraldStorage {
  get(key: string): string | null | undefined | Promise<string | null | undefined>;
  set(key: string, value: string): void | Promise<void>;
}

/** The parts of Web Locks the client uses (`navigator.locks`). */
export interface LockManagerLike {
  request(
    name: string,
    options: { mode?: "exclusive"; signal?: AbortSignal },
    callback: (lock: unknown) => Promise<unknown>,
  ): Promise<unknown>;
}

/** Constructors and clocks the client uses; every one can be replaced (tests, SSR). */
export interface HeraldEnvironment {
  WebSocket?: typeof WebSocket;
  EventSource?: typeof EventSource;
  fetch?: typeof fetch;
  BroadcastChannel?: typeof BroadcastChannel;
  /** `null` forces the BroadcastChannel election even where Web Locks exist. */
  locks?: LockManagerLike | null;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (handle: unknown) => void;
  now?: () => number;
  random?: () => number;
  /** Where the leader listens for `pagehide` to hand over at once (default: `globalThis`). */
  window?: Pick<EventTarget, "addEventListener" | "removeEventListener"> | null;
}

export interface HeraldOptions {
  /**
   * The node or load balancer: `https://notify.example.com` (or `wss://...`). `/ws`, `/sse`
   * and `/ack` are appended. A path prefix is kept (`https://example.com/herald`).
   */
  url: string;
  /**
   * Returns a client token (a JWT; in `--dev` the user id). Called at start, after a 401 at
   * connect (once), on close 4003 `token_expired`, and `refreshMargin` before the token's
   * `exp`.
   */
  getToken: () => string | Promise<string>;
  /**
   * The user id: names the stored durable id and the tab-sharing channel. Default: the
   * token's `sub` claim, or the token itself when it is not a JWT (`--dev`).
   */
  user?: string;
  /** `--dev` only: topics to join (`?topics=a,b`). A JWT carries its own topics. */
  topics?: string[];
  /** `auto` (WebSocket, SSE fallback; default), `websocket` only, or `sse` only. */
  transport?: "auto" | Transport;
  /** Consecutive WebSocket failures before opening that switch to SSE (default 3). */
  sseAfterFailures?: number;
  /** While on SSE, how often to try WebSocket again, in ms (default 120 000, jittered). */
  wsRetryInterval?: number;
  /**
   * After a WebSocket or SSE connection fails before opening, `GET /ws?token=...` with
   * `fetch` to learn why (401, 503, or a server that answers HTTP but not the upgrade).
   * Default true. Cross-origin, this needs CORS on the node or proxy; without it the probe
   * learns nothing and only the failure count applies.
   */
  probe?: boolean;
  /** Fetch a new token this many ms before its `exp` (default 30 000). */
  refreshMargin?: number;
  /** Backoff base and cap in ms (defaults 500 and 30 000). */
  backoff?: { base?: number; cap?: number };
  /** A connection open this long resets the backoff (default 60 000 ms). */
  stableAfter?: number;
  /** Durable-id storage (default `localStorage`, else memory). */
  storage?: HeraldStorage | null;
  /** Storage key (default `herald:last-id:<url>:<user>`). */
  storageKey?: string;
  /** One connection per browser, shared by its tabs (default true). */
  shareAcrossTabs?: boolean;
  /** Web Locks / BroadcastChannel name (default `herald:<url>:<user>`). */
  channelName?: string;
  /** `withCredentials` for the EventSource (default false). */
  withCredentials?: boolean;
  /** Replacements for browser globals (tests). */
  env?: HeraldEnvironment;
}
