/**
 * Which tab holds the connection. Web Locks when the browser has them (the lock is
 * released by the browser when its tab closes or crashes, so the next waiting tab takes
 * over at once); otherwise an election over BroadcastChannel with heartbeats.
 */
export class WebLocksLeadership {
    constructor(locks, name, cb) {
        this.locks = locks;
        this.name = name;
        this.cb = cb;
        this.ctrl = null;
        this.release = null;
    }
    start() {
        if (this.ctrl)
            return;
        const ctrl = new AbortController();
        this.ctrl = ctrl;
        this.locks
            .request(this.name, { mode: "exclusive", signal: ctrl.signal }, () => {
            if (ctrl.signal.aborted)
                return Promise.resolve();
            return new Promise((resolve) => {
                this.release = resolve;
                this.cb.lead();
            });
        })
            .catch(() => {
            /* aborted while waiting */
        });
    }
    stop() {
        this.ctrl?.abort();
        this.ctrl = null;
        const release = this.release;
        this.release = null;
        release?.();
    }
}
/** Heartbeat period of the BroadcastChannel election, ms. */
export const HEARTBEAT_MS = 1000;
/** No heartbeat for this long: the leader is gone. */
export const LEADER_DEAD_MS = 4000;
/** A candidate waits this long for a leader or a better candidate. */
export const CLAIM_WAIT_MS = 400;
/**
 * Election over BroadcastChannel, for browsers without Web Locks. The leader sends a
 * heartbeat every second; a tab that hears none for 4 s (or hears the leader resign)
 * claims leadership and takes it after 400 ms unless a leader answers or a candidate with
 * a smaller tab id claims too. Two leaders that meet keep the smaller id.
 */
export class BroadcastLeadership {
    constructor(id, post, clock, cb) {
        this.id = id;
        this.post = post;
        this.clock = clock;
        this.cb = cb;
        this.role = "idle";
        this.lastSeen = 0;
    }
    get isLeader() {
        return this.role === "leader";
    }
    start() {
        if (this.role !== "idle")
            return;
        this.role = "follower";
        this.lastSeen = this.clock.now();
        this.claim();
        this.loop();
    }
    stop() {
        if (this.role === "leader")
            this.post({ t: "resign", from: this.id });
        this.role = "idle";
        this.clock.clearTimeout(this.tick);
        this.clock.clearTimeout(this.claimTimer);
    }
    receive(msg) {
        if (this.role === "idle" || msg.from === this.id)
            return;
        switch (msg.t) {
            case "hb":
                if (this.role === "leader") {
                    if (msg.from < this.id)
                        this.stepDown();
                    else
                        this.post({ t: "hb", from: this.id });
                    return;
                }
                this.lastSeen = this.clock.now();
                if (this.role === "candidate")
                    this.cancelClaim();
                return;
            case "claim":
                if (this.role === "leader")
                    this.post({ t: "hb", from: this.id });
                else if (this.role === "candidate" && msg.from < this.id) {
                    this.cancelClaim();
                    this.lastSeen = this.clock.now();
                }
                return;
            case "resign":
                if (this.role === "follower")
                    this.claim();
                return;
        }
    }
    loop() {
        this.tick = this.clock.setTimeout(() => {
            if (this.role === "idle")
                return;
            if (this.role === "leader")
                this.post({ t: "hb", from: this.id });
            else if (this.role === "follower" && this.clock.now() - this.lastSeen > LEADER_DEAD_MS)
                this.claim();
            this.loop();
        }, HEARTBEAT_MS);
    }
    claim() {
        this.role = "candidate";
        this.post({ t: "claim", from: this.id });
        this.clock.clearTimeout(this.claimTimer);
        this.claimTimer = this.clock.setTimeout(() => {
            if (this.role !== "candidate")
                return;
            this.role = "leader";
            this.post({ t: "hb", from: this.id });
            this.cb.lead();
        }, CLAIM_WAIT_MS);
    }
    cancelClaim() {
        this.clock.clearTimeout(this.claimTimer);
        this.role = "follower";
    }
    stepDown() {
        this.role = "follower";
        this.lastSeen = this.clock.now();
        this.cb.lose();
    }
}
