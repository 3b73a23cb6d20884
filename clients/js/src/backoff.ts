/**
 * Reconnect delays, as docs/protocol.md "Reconnect advice" asks: exponential backoff with
 * full jitter, `random(0, min(cap, base * 2^attempt))`.
 */

export interface BackoffOptions {
  /** First step, in ms (default 500). */
  base: number;
  /** Largest delay, in ms (default 30 000). */
  cap: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = { base: 500, cap: 30_000 };

/** Full-jitter delay for the given attempt (0 for the first retry). */
export function backoffDelay(attempt: number, opts: BackoffOptions, random: () => number): number {
  const ceiling = Math.min(opts.cap, opts.base * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}
