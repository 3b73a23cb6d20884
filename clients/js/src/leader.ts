/**
 * Which tab holds the connection. Web Locks when the browser has them (the lock is
 * released by the browser when its tab closes or crashes, so the next waiting tab takes
 * over at once); otherwise an election over BroadcastChannel with heartbeats.
 */

import type { Clock } from "./connection.js";
import type { LockManagerLike } from "./types.js";

export interface Leadership {
  /** Joins the election: `onLead` runs when this tab becomes the leader. */
  start(): void;
  /** Leaves it; a leader gives the connection up so another tab can take it. */
  stop(): void;
  /** Election messages from the shared channel (BroadcastChannel election only). */
  receive?(msg: ElectionMessage): void;
}

export type ElectionMessage =
  | { t: "hb"; from: string }
  | { t: "claim"; from: string }
  | { t: "resign"; from: string };

export interface LeadershipCallbacks {
  lead(): void;
  /** Only the BroadcastChannel election ever takes leadership back (two leaders met). */
  lose(): void;
}

export class WebLocksLeadership implements Leadership {
  private ctrl: AbortController | null = null;
  private release: (() => void) | null = null;

  constructor(
    private readonly locks: LockManagerLike,
    private readonly name: string,
    private readonly cb: LeadershipCallbacks,
  ) {}

  start(): void {
    if (this.ctrl) return;
    const ctrl = new AbortController();
    this.ctrl = ctrl;
    this.locks
      .request(this.name, { mode: "exclusive", signal: ctrl.signal }, () => {
        if (ctrl.signal.aborted) return Promise.resolve();
        return new Promise<void>((resolve) => {
          this.release = resolve;
          this.cb.lead();
        });
      })
      .catch(() => {
        /* aborted while waiting */
      });
  }

  stop(): void {
    this.ctrl?.abort();
    this.ctrl = null;
    const release = this.release;
    this.release = null;
    release?.();
  }
}

/** Heartbeat period of the BroadcastChannel election, ms. */
export const HEARTBEAT_MS = 1_000;
/** No heartbeat for this long: the leader is gone. */
export const LEADER_DEAD_MS = 4_000;
/** A candidate waits this long for a leader or a better candidate. */
export const CLAIM_WAIT_MS = 400;

/**
 * Election over BroadcastChannel, for browsers without Web Locks. The leader sends a
 * heartbeat every second; a tab that hears none for 4 s (or hears the leader resign)
 * claims leadership and takes it after 400 ms unless a leader answers or a candidate with
 * a smaller tab id claims too. Two leaders that meet keep the smaller id.
 */
export class BroadcastLeadership implements Leadership {
  private role: "idle" | "follower" | "candidate" | "leader" = "idle";
  private lastSeen = 0;
  private tick: unknown;
  private claimTimer: unknown;

  constructor(
    private readonly id: string,
    private readonly post: (msg: ElectionMessage) => void,
    private readonly clock: Clock,
    private readonly cb: LeadershipCallbacks,
  ) {}

  get isLeader(): boolean {
    return this.role === "leader";
  }

  start(): void {
    if (this.role !== "idle") return;
    this.role = "follower";
    this.lastSeen = this.clock.now();
    this.claim();
    this.loop();
  }

  stop(): void {
    if (this.role === "leader") this.post({ t: "resign", from: this.id });
    this.role = "idle";
    this.clock.clearTimeout(this.tick);
    this.clock.clearTimeout(this.claimTimer);
  }

  receive(msg: ElectionMessage): void {
    if (this.role === "idle" || msg.from === this.id) return;
    switch (msg.t) {
      case "hb":
        if (this.role === "leader") {
          if (msg.from < this.id) this.stepDown();
          else this.post({ t: "hb", from: this.id });
          return;
        }
        this.lastSeen = this.clock.now();
        if (this.role === "candidate") this.cancelClaim();
        return;
      case "claim":
        if (this.role === "leader") this.post({ t: "hb", from: this.id });
        else if (this.role === "candidate" && msg.from < this.id) {
          this.cancelClaim();
          this.lastSeen = this.clock.now();
        }
        return;
      case "resign":
        if (this.role === "follower") this.claim();
        return;
    }
  }

  private loop(): void {
    this.tick = this.clock.setTimeout(() => {
      if (this.role === "idle") return;
      if (this.role === "leader") this.post({ t: "hb", from: this.id });
      else if (this.role === "follower" && this.clock.now() - this.lastSeen > LEADER_DEAD_MS) this.claim();
      this.loop();
    }, HEARTBEAT_MS);
  }

  private claim(): void {
    this.role = "candidate";
    this.post({ t: "claim", from: this.id });
    this.clock.clearTimeout(this.claimTimer);
    this.claimTimer = this.clock.setTimeout(() => {
      if (this.role !== "candidate") return;
      this.role = "leader";
      this.post({ t: "hb", from: this.id });
      this.cb.lead();
    }, CLAIM_WAIT_MS);
  }

  private cancelClaim(): void {
    this.clock.clearTimeout(this.claimTimer);
    this.role = "follower";
  }

  private stepDown(): void {
    this.role = "follower";
    this.lastSeen = this.clock.now();
    this.cb.lose();
  }
}
