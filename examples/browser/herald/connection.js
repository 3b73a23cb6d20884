/**
 * One connection to herald, held by the leader tab: transports (WebSocket, SSE fallback),
 * reconnect rules per close code, token refresh and acks. It knows nothing about tabs or
 * storage; the client (client.ts) feeds it the last durable id and receives its frames.
 */
import { backoffDelay } from "./backoff.js";
import { isInboxId, maxId } from "./ids.js";
import { readClaims } from "./jwt.js";
/** Reasons the client gives in `state` events of its own making. */
export const CLIENT_REASONS = {
    websocketUnavailable: "websocket_unavailable",
    tokenRefresh: "token_refresh",
    refreshFailed: "refresh_failed",
    connectFailed: "connect_failed",
    unauthorized: "unauthorized",
};
/** Close codes (docs/protocol.md "Close codes", plus 4003 token_expired). */
export const CLOSE = {
    normal: 1000,
    abnormal: 1006,
    serviceRestart: 1012,
    idleTimeout: 4000,
    slowConsumer: 4001,
    kicked: 4002,
    tokenExpired: 4003,
    tooManySessions: 4004,
};
const PROBE_TIMEOUT_MS = 5000;
const TOKEN_RETRY_MS = 5000;
/** A 4003 this soon after opening means the new token did not help: back off. */
const QUICK_EXPIRY_MS = 5000;
/** 1012 (draining / resync): reconnect after a random 0-5 s delay. */
const RESTART_JITTER_MS = 5000;
/** 4001 slow consumer: start the backoff at 1 s. */
const SLOW_CONSUMER_FLOOR_MS = 1000;
/** 4004 too many sessions of this user on the node: other tabs or devices hold the slots. */
const TOO_MANY_SESSIONS_FLOOR_MS = 10000;
/** POST /ack answered 429 without a usable Retry-After. */
const ACK_RETRY_MS = 1000;
export class Connection {
    constructor(cfg, globals, clock, hooks) {
        this.cfg = cfg;
        this.globals = globals;
        this.clock = clock;
        this.hooks = hooks;
        this.attempt = 0;
        this.wsEverOpened = false;
        this.wsFailures = 0;
        this.sseFailures = 0;
        this.authRetried = false;
        this.active = null;
        this.trial = null;
        this.running = false;
        this.refreshPending = false;
        this.refreshUnsupported = false;
        /** Bumped by every connect, stop and restart: async continuations of an older one bail out. */
        this.epoch = 0;
        this.mode = cfg.transport === "sse" ? "sse" : "websocket";
        if (cfg.initialToken !== undefined)
            this.setToken(cfg.initialToken);
    }
    /** Current transport mode (the one the next connect uses). */
    get transport() {
        return this.mode;
    }
    start() {
        if (this.running)
            return;
        this.running = true;
        void this.connect();
    }
    /** Closes the connection (code 1000) and stops reconnecting. */
    stop() {
        this.running = false;
        this.epoch++;
        this.teardown();
        this.hooks.state({ state: "closed" });
    }
    /**
     * Acknowledges durable messages up to `id`: a WebSocket `ack` frame, or `POST /ack` on
     * SSE. Before the connection is open the ack waits (the latest id only) and goes out
     * after the next welcome.
     */
    async ack(id) {
        if (!isInboxId(id))
            throw new TypeError(`ack: not an inbox id: ${JSON.stringify(id)}`);
        const link = this.active;
        if (!link || !link.welcomed) {
            this.pendingAck = maxId(this.pendingAck, id);
            return;
        }
        if (link.kind === "websocket" && link.ws) {
            try {
                link.ws.send(JSON.stringify({ type: "ack", id }));
            }
            catch {
                // The socket is closing: the ack goes out after the next welcome.
                this.pendingAck = maxId(this.pendingAck, id);
                return;
            }
            this.hooks.acked(id);
            return;
        }
        await this.postAck(id);
    }
    // ---------- connecting ----------
    setToken(token) {
        this.token = token;
        const exp = readClaims(token).exp;
        this.tokenExpMs = exp === undefined ? undefined : exp * 1000;
    }
    state(change) {
        this.hooks.state(change);
    }
    async connect() {
        if (!this.running)
            return;
        this.clear("reconnectTimer");
        this.closeLink(this.active);
        this.active = null;
        const epoch = ++this.epoch;
        this.state({ state: "connecting" });
        const expiring = this.tokenExpMs !== undefined && this.tokenExpMs - this.clock.now() < 5000;
        if (this.token === undefined || expiring) {
            let token;
            try {
                token = await this.cfg.getToken();
            }
            catch (e) {
                if (epoch !== this.epoch)
                    return;
                this.hooks.error({ error: "get_token_failed", message: String(e) });
                this.scheduleReconnect(this.nextBackoff(), { reason: CLIENT_REASONS.connectFailed });
                return;
            }
            if (epoch !== this.epoch)
                return;
            this.setToken(token);
        }
        if (this.mode === "websocket")
            this.openWs(false);
        else
            this.openSse();
    }
    query() {
        const q = new URLSearchParams();
        q.set("token", this.token ?? "");
        const since = this.hooks.since();
        if (since !== undefined)
            q.set("since", since);
        if (this.cfg.topics && this.cfg.topics.length > 0)
            q.set("topics", this.cfg.topics.join(","));
        return q.toString();
    }
    openWs(trial) {
        const WS = this.globals.WebSocket;
        if (!WS) {
            // No WebSocket at all: only SSE can work.
            if (!trial) {
                this.mode = "sse";
                this.openSse();
            }
            return;
        }
        const link = { kind: "websocket", opened: false, welcomed: false, openedAt: 0 };
        let ws;
        try {
            ws = new WS(`${this.cfg.wsBase}/ws?${this.query()}`);
        }
        catch (e) {
            // A malformed URL: nothing to retry.
            this.hooks.error({ error: "connect_failed", message: String(e) });
            this.running = false;
            this.state({ state: "closed", reason: CLIENT_REASONS.connectFailed });
            return;
        }
        link.ws = ws;
        if (trial)
            this.trial = link;
        else
            this.active = link;
        ws.onopen = () => {
            link.opened = true;
            link.openedAt = this.clock.now();
        };
        ws.onmessage = (ev) => {
            if (link !== this.active && link !== this.trial)
                return;
            if (typeof ev.data !== "string")
                return;
            this.onText(link, ev.data);
        };
        ws.onerror = () => {
            /* a close event follows */
        };
        ws.onclose = (ev) => {
            if (link === this.trial) {
                this.trial = null;
                this.detach(link);
                this.scheduleWsRetry();
                return;
            }
            if (link !== this.active)
                return;
            this.active = null;
            this.detach(link);
            this.linkEnded(link, ev.code, ev.reason);
        };
    }
    openSse() {
        const ES = this.globals.EventSource;
        if (!ES) {
            this.mode = "websocket";
            if (this.globals.WebSocket)
                this.openWs(false);
            return;
        }
        const link = { kind: "sse", opened: false, welcomed: false, openedAt: 0 };
        const es = new ES(`${this.cfg.httpBase}/sse?${this.query()}`, {
            withCredentials: this.cfg.withCredentials,
        });
        link.es = es;
        this.active = link;
        es.onopen = () => {
            link.opened = true;
            link.openedAt = this.clock.now();
        };
        const onFrame = (ev) => {
            if (link !== this.active)
                return;
            const data = ev.data;
            if (typeof data === "string")
                this.onText(link, data);
        };
        for (const name of ["welcome", "message", "gap", "read", "retract", "refreshed"]) {
            es.addEventListener(name, onFrame);
        }
        // `event: error` from the server and the EventSource's own connection error share
        // one name: only the server's carries data.
        es.addEventListener("error", (ev) => {
            if (link !== this.active)
                return;
            const data = ev.data;
            if (typeof data === "string") {
                this.onText(link, data);
                return;
            }
            // The EventSource would reconnect by itself: stop it, the rules here decide.
            this.active = null;
            this.detach(link);
            this.linkEnded(link, CLOSE.abnormal, "sse_error");
        });
        es.addEventListener("close", (ev) => {
            if (link !== this.active)
                return;
            let code = CLOSE.abnormal;
            let reason = "";
            try {
                const f = JSON.parse(ev.data);
                if (typeof f.code === "number")
                    code = f.code;
                if (typeof f.reason === "string")
                    reason = f.reason;
            }
            catch {
                /* a close without a readable body is an abnormal end */
            }
            this.active = null;
            this.detach(link);
            // The server spoke: this is a close, not a failure to connect.
            if (!link.opened) {
                link.opened = true;
                link.openedAt = this.clock.now();
            }
            this.linkEnded(link, code, reason);
        });
    }
    /** Detaches every handler and closes the transport; its later events are ignored. */
    detach(link, code = CLOSE.normal) {
        if (!link)
            return;
        if (link.ws) {
            const ws = link.ws;
            ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
            try {
                if (ws.readyState === 0 || ws.readyState === 1)
                    ws.close(code);
            }
            catch {
                /* already closing */
            }
        }
        if (link.es) {
            link.es.onopen = null;
            link.es.close();
        }
    }
    closeLink(link) {
        if (!link)
            return;
        this.clear("refreshTimer");
        this.clear("stableTimer");
        this.detach(link);
    }
    teardown() {
        for (const t of ["reconnectTimer", "refreshTimer", "stableTimer", "wsRetryTimer", "ackRetryTimer"]) {
            this.clear(t);
        }
        this.closeLink(this.active);
        this.active = null;
        this.detach(this.trial);
        this.trial = null;
        this.refreshPending = false;
    }
    clear(name) {
        if (this[name] !== undefined) {
            this.clock.clearTimeout(this[name]);
            this[name] = undefined;
        }
    }
    // ---------- frames ----------
    onText(link, text) {
        let frame;
        try {
            frame = JSON.parse(text);
        }
        catch {
            return;
        }
        if (typeof frame !== "object" || frame === null || typeof frame.type !== "string") {
            return;
        }
        this.onFrame(link, frame);
    }
    onFrame(link, f) {
        if (link === this.trial) {
            if (f.type !== "welcome")
                return;
            this.adopt(link);
        }
        switch (f.type) {
            case "welcome":
                this.onWelcome(link, f);
                return;
            case "refreshed":
                this.refreshPending = false;
                if (typeof f.exp === "number")
                    this.tokenExpMs = f.exp * 1000;
                this.scheduleRefresh();
                return;
            case "pong":
                return;
            case "error":
                if (f.error === "refresh_failed") {
                    this.refreshPending = false;
                    this.hooks.error({ error: "refresh_failed", reason: typeof f.reason === "string" ? f.reason : undefined });
                    // The refused token must not be reused: connect again with a fresh one.
                    this.token = undefined;
                    this.tokenExpMs = undefined;
                    this.restart(CLIENT_REASONS.refreshFailed);
                    return;
                }
                if (f.error === "unknown_type" && this.refreshPending) {
                    // A server from before in-band refresh: it does not end sessions at `exp`
                    // either, so the new token is simply kept for the next connect.
                    this.refreshPending = false;
                    this.refreshUnsupported = true;
                    return;
                }
                this.hooks.frame(f);
                return;
            default:
                this.hooks.frame(f);
        }
    }
    onWelcome(link, f) {
        link.welcomed = true;
        if (!link.opened)
            link.opened = true;
        link.openedAt = this.clock.now();
        this.authRetried = false;
        if (link.kind === "websocket") {
            this.wsEverOpened = true;
            this.wsFailures = 0;
        }
        else {
            this.sseFailures = 0;
        }
        if (typeof f.exp === "number")
            this.tokenExpMs = f.exp * 1000;
        this.scheduleRefresh();
        this.clear("stableTimer");
        this.stableTimer = this.clock.setTimeout(() => {
            this.stableTimer = undefined;
            this.attempt = 0;
        }, this.cfg.stableAfter);
        this.state({ state: "open", transport: link.kind });
        this.hooks.frame(f);
        if (this.pendingAck !== undefined) {
            const id = this.pendingAck;
            this.pendingAck = undefined;
            void this.ack(id).catch(() => undefined);
        }
        if (link.kind === "sse")
            this.scheduleWsRetry();
    }
    // ---------- ends and reconnects ----------
    linkEnded(link, code, reason) {
        this.clear("refreshTimer");
        this.clear("stableTimer");
        this.clear("wsRetryTimer");
        this.detach(this.trial);
        this.trial = null;
        this.refreshPending = false;
        if (!this.running)
            return;
        if (!link.opened) {
            void this.connectFailed(link.kind);
            return;
        }
        const lasted = this.clock.now() - link.openedAt;
        if (lasted >= this.cfg.stableAfter)
            this.attempt = 0;
        const why = { code, reason: reason || undefined };
        switch (code) {
            case CLOSE.kicked:
                this.terminate("kicked", why);
                return;
            case CLOSE.tokenExpired:
                this.token = undefined;
                this.tokenExpMs = undefined;
                this.scheduleReconnect(lasted < QUICK_EXPIRY_MS ? this.nextBackoff() : 0, why);
                return;
            case CLOSE.serviceRestart:
                this.scheduleReconnect(Math.floor(this.clock.random() * RESTART_JITTER_MS), why);
                return;
            case CLOSE.slowConsumer:
                this.scheduleReconnect(SLOW_CONSUMER_FLOOR_MS + this.nextBackoff(), why);
                return;
            case CLOSE.tooManySessions:
                this.scheduleReconnect(TOO_MANY_SESSIONS_FLOOR_MS + this.nextBackoff(), why);
                return;
            default:
                this.scheduleReconnect(this.nextBackoff(), why);
        }
    }
    /** The transport failed before it opened: find out why, then decide. */
    async connectFailed(kind) {
        const epoch = this.epoch;
        const verdict = this.cfg.probe ? await this.probe() : "unknown";
        if (epoch !== this.epoch || !this.running)
            return;
        switch (verdict) {
            case "unauthorized":
                if (this.authRetried) {
                    this.terminate("unauthorized", { code: 401, reason: CLIENT_REASONS.unauthorized });
                    return;
                }
                this.authRetried = true;
                this.token = undefined;
                this.tokenExpMs = undefined;
                this.scheduleReconnect(0, { code: 401, reason: CLIENT_REASONS.unauthorized });
                return;
            case "bad_since":
                this.hooks.badSince();
                this.hooks.error({ error: "bad_since", message: "the server refused the stored durable id; it was forgotten" });
                this.scheduleReconnect(this.nextBackoff(), { code: 400, reason: "bad_since" });
                return;
            case "unavailable":
                this.scheduleReconnect(this.nextBackoff(), { code: 503, reason: CLIENT_REASONS.connectFailed });
                return;
            default:
                break;
        }
        // Only failures the node did not explain count towards a change of transport.
        if (kind === "websocket")
            this.wsFailures++;
        else
            this.sseFailures++;
        const auto = this.cfg.transport === "auto";
        if (auto &&
            kind === "websocket" &&
            ((verdict === "reachable" && !this.wsEverOpened) || this.wsFailures >= this.cfg.sseAfterFailures)) {
            this.mode = "sse";
            this.sseFailures = 0;
            this.scheduleReconnect(0, { reason: CLIENT_REASONS.websocketUnavailable });
            return;
        }
        if (auto && kind === "sse" && this.sseFailures >= this.cfg.sseAfterFailures) {
            this.mode = "websocket";
            this.wsFailures = 0;
        }
        this.scheduleReconnect(this.nextBackoff(), { reason: CLIENT_REASONS.connectFailed });
    }
    /**
     * `GET /ws?token=...` as a plain request: the node checks the token before the upgrade,
     * so 401 means a refused token, 400 `not_websocket` a node that answers HTTP (the upgrade
     * itself failed on the way), 503 a draining or full node.
     */
    async probe() {
        const f = this.globals.fetch;
        if (!f)
            return "unknown";
        const ctrl = typeof AbortController === "function" ? new AbortController() : undefined;
        const timer = this.clock.setTimeout(() => ctrl?.abort(), PROBE_TIMEOUT_MS);
        try {
            const res = await f(`${this.cfg.httpBase}/ws?${this.query()}`, {
                cache: "no-store",
                signal: ctrl?.signal,
            });
            if (res.status === 401)
                return "unauthorized";
            if (res.status === 400) {
                let body;
                try {
                    body = await res.json();
                }
                catch {
                    body = undefined;
                }
                const err = body?.error;
                return err === "bad_since" ? "bad_since" : "reachable";
            }
            if (res.status >= 500)
                return "unavailable";
            // 0 is an opaque answer: nothing learnt.
            return res.status === 0 ? "unknown" : "reachable";
        }
        catch {
            return "unknown";
        }
        finally {
            this.clock.clearTimeout(timer);
        }
    }
    nextBackoff() {
        return backoffDelay(this.attempt++, this.cfg.backoff, () => this.clock.random());
    }
    scheduleReconnect(delay, why) {
        if (!this.running)
            return;
        this.clear("reconnectTimer");
        this.state({ state: "reconnecting", delay, ...why });
        this.reconnectTimer = this.clock.setTimeout(() => {
            this.reconnectTimer = undefined;
            void this.connect();
        }, delay);
    }
    /** Ends for good (kicked, unauthorized): no reconnect until `start()` again. */
    terminate(state, why) {
        this.running = false;
        this.epoch++;
        this.teardown();
        this.state({ state, ...why });
    }
    /** Drops the current connection and connects again at once (fresh token if unset). */
    restart(reason) {
        if (!this.running)
            return;
        this.closeLink(this.active);
        this.active = null;
        this.scheduleReconnect(0, { reason });
    }
    // ---------- token refresh ----------
    scheduleRefresh() {
        this.clear("refreshTimer");
        if (this.tokenExpMs === undefined)
            return;
        const left = this.tokenExpMs - this.clock.now();
        let delay = left - this.cfg.refreshMargin;
        // A token that lives shorter than the margin: refresh half-way, never in a tight loop.
        if (delay < 1000)
            delay = Math.max(1000, left / 2);
        this.refreshTimer = this.clock.setTimeout(() => {
            this.refreshTimer = undefined;
            void this.refresh();
        }, delay);
    }
    async refresh() {
        const link = this.active;
        if (!link || !link.welcomed)
            return;
        const epoch = this.epoch;
        let token;
        try {
            token = await this.cfg.getToken();
        }
        catch (e) {
            if (epoch !== this.epoch)
                return;
            this.hooks.error({ error: "get_token_failed", message: String(e) });
            this.refreshTimer = this.clock.setTimeout(() => {
                this.refreshTimer = undefined;
                void this.refresh();
            }, TOKEN_RETRY_MS);
            return;
        }
        if (epoch !== this.epoch || link !== this.active)
            return;
        if (link.kind === "websocket" && link.ws) {
            this.token = token;
            if (this.refreshUnsupported) {
                this.setToken(token);
                return;
            }
            this.refreshPending = true;
            try {
                link.ws.send(JSON.stringify({ type: "refresh", token }));
            }
            catch {
                // Closing already: the reconnect uses the new token.
                this.refreshPending = false;
                this.setToken(token);
            }
            return;
        }
        // SSE has no upstream channel: reconnect with the new token (and `since`).
        this.setToken(token);
        this.restart(CLIENT_REASONS.tokenRefresh);
    }
    // ---------- SSE → WebSocket ----------
    scheduleWsRetry() {
        this.clear("wsRetryTimer");
        if (this.cfg.transport !== "auto" || !this.running || this.active?.kind !== "sse")
            return;
        if (!this.globals.WebSocket)
            return;
        const delay = Math.floor(this.cfg.wsRetryInterval * (0.5 + this.clock.random()));
        this.wsRetryTimer = this.clock.setTimeout(() => {
            this.wsRetryTimer = undefined;
            if (this.active?.kind === "sse" && this.active.welcomed && !this.trial)
                this.openWs(true);
        }, delay);
    }
    /** A trial WebSocket got its welcome while on SSE: it becomes the connection. */
    adopt(link) {
        this.trial = null;
        this.closeLink(this.active);
        this.clear("wsRetryTimer");
        this.active = link;
        this.mode = "websocket";
    }
    // ---------- acks over SSE ----------
    async postAck(id) {
        const f = this.globals.fetch;
        if (!f)
            throw new Error("ack over SSE needs fetch");
        if (this.ackRetryTimer !== undefined) {
            // The node asked to wait: this id goes with the retry.
            this.pendingAck = maxId(this.pendingAck, id);
            return;
        }
        let res;
        try {
            res = await f(`${this.cfg.httpBase}/ack`, {
                method: "POST",
                headers: { Authorization: `Bearer ${this.token ?? ""}`, "Content-Type": "application/json" },
                body: JSON.stringify({ id }),
            });
        }
        catch (e) {
            this.pendingAck = maxId(this.pendingAck, id);
            this.hooks.error({ error: "ack_post_failed", message: String(e) });
            return;
        }
        if (res.status === 429) {
            // Over the node's rate for this user: acks are cumulative, so only the newest id is
            // kept and sent once the node asks for it (Retry-After), not after every message.
            this.pendingAck = maxId(this.pendingAck, id);
            this.scheduleAckRetry(res.headers?.get?.("retry-after"));
            return;
        }
        if (!res.ok) {
            this.pendingAck = maxId(this.pendingAck, id);
            this.hooks.error({ error: "ack_post_failed", message: `POST /ack answered ${res.status}` });
            return;
        }
        this.hooks.acked(id);
    }
    scheduleAckRetry(retryAfter) {
        if (this.ackRetryTimer !== undefined)
            return;
        const secs = Number(retryAfter);
        const delay = Number.isFinite(secs) && secs > 0 ? secs * 1000 : ACK_RETRY_MS;
        const epoch = this.epoch;
        this.ackRetryTimer = this.clock.setTimeout(() => {
            this.ackRetryTimer = undefined;
            const id = this.pendingAck;
            if (epoch !== this.epoch || id === undefined)
                return;
            const link = this.active;
            if (!link || !link.welcomed || link.kind !== "sse")
                return;
            this.pendingAck = undefined;
            void this.postAck(id).catch(() => undefined);
        }, delay);
    }
}
