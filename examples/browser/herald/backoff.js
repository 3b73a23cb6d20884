/**
 * Reconnect delays, as docs/protocol.md "Reconnect advice" asks: exponential backoff with
 * full jitter, `random(0, min(cap, base * 2^attempt))`.
 */
export const DEFAULT_BACKOFF = { base: 500, cap: 30000 };
/** Full-jitter delay for the given attempt (0 for the first retry). */
export function backoffDelay(attempt, opts, random) {
    const ceiling = Math.min(opts.cap, opts.base * 2 ** Math.min(attempt, 30));
    return Math.floor(random() * ceiling);
}
