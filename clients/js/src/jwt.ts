/**
 * Best-effort reading of a JWT's claims without checking it (the server checks it). Used
 * only to learn `sub` (the user, for storage and tab-sharing names) and `exp` (to fetch a
 * fresh token before connecting with an expired one). An opaque token (such as the user id
 * in `--dev`) yields nothing.
 */

export interface TokenClaims {
  sub?: string;
  /** Unix seconds. */
  exp?: number;
}

function b64urlDecode(s: string): string {
  const b64 = s.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((s.length + 3) % 4);
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new TextDecoder().decode(bytes);
}

export function readClaims(token: string): TokenClaims {
  const parts = token.split(".");
  if (parts.length !== 3) return {};
  try {
    const payload: unknown = JSON.parse(b64urlDecode(parts[1]));
    if (typeof payload !== "object" || payload === null) return {};
    const p = payload as Record<string, unknown>;
    const out: TokenClaims = {};
    if (typeof p.sub === "string") out.sub = p.sub;
    if (typeof p.exp === "number" && Number.isFinite(p.exp)) out.exp = p.exp;
    return out;
  } catch {
    return {};
  }
}
