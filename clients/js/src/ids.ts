/**
 * Inbox ids are Redis stream ids: `<ms>-<seq>` (or `<ms>`, read as `<ms>-0`), growing in
 * publish order. They are compared numerically, never as strings ("9-0" < "10-0").
 */

const ID_RE = /^(\d{1,20})(?:-(\d{1,20}))?$/;

/** True if `id` has the shape of an inbox id. */
export function isInboxId(id: unknown): id is string {
  return typeof id === "string" && ID_RE.test(id);
}

function parts(id: string): [bigint, bigint] {
  const m = ID_RE.exec(id);
  if (!m) throw new TypeError(`not an inbox id: ${JSON.stringify(id)}`);
  return [BigInt(m[1]), BigInt(m[2] ?? "0")];
}

/** Negative, zero or positive as `a` is before, equal to or after `b`. */
export function compareIds(a: string, b: string): number {
  const [am, as] = parts(a);
  const [bm, bs] = parts(b);
  if (am !== bm) return am < bm ? -1 : 1;
  if (as !== bs) return as < bs ? -1 : 1;
  return 0;
}

/** The later of two ids, either of which may be missing. */
export function maxId(a: string | undefined, b: string | undefined): string | undefined {
  if (a === undefined || !isInboxId(a)) return b !== undefined && isInboxId(b) ? b : undefined;
  if (b === undefined || !isInboxId(b)) return a;
  return compareIds(a, b) >= 0 ? a : b;
}
