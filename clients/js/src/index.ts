/**
 * herald browser client. See docs/client.md.
 *
 *     import { HeraldClient } from "@herald/client";
 *     const herald = new HeraldClient({ url: "https://notify.example.com", getToken });
 *     herald.on("message", (m) => showToast(m.data));
 *     herald.start();
 */

export { HeraldClient } from "./client.js";
export { compareIds, isInboxId } from "./ids.js";
export { backoffDelay } from "./backoff.js";
export type {
  ConnectionState,
  ErrorEvent,
  GapEvent,
  HeraldEnvironment,
  HeraldEventName,
  HeraldEvents,
  HeraldMessage,
  HeraldOptions,
  HeraldStorage,
  LockManagerLike,
  ReadEvent,
  RetractEvent,
  StateEvent,
  Transport,
  WelcomeEvent,
} from "./types.js";

import { HeraldClient } from "./client.js";
import type { HeraldOptions } from "./types.js";

/** `new HeraldClient(options)`, started. Register handlers right away (same task). */
export function connect(options: HeraldOptions): HeraldClient {
  const client = new HeraldClient(options);
  void client.start();
  return client;
}
