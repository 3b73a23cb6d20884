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
import { HeraldClient } from "./client.js";
/** `new HeraldClient(options)`, started. Register handlers right away (same task). */
export function connect(options) {
    const client = new HeraldClient(options);
    void client.start();
    return client;
}
