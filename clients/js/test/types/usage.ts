// Compiled with `tsc --noEmit` by `npm test`: the published types accept what docs/client.md
// shows and reject misuse (each @ts-expect-error must be an error).
import { HeraldClient, connect, type HeraldMessage, type StateEvent } from "../../dist/index.js";

const herald = new HeraldClient({
  url: "https://notify.example.com",
  getToken: async () => "jwt",
  storage: { get: (k) => sessionStorage.getItem(k), set: (k, v) => sessionStorage.setItem(k, v) },
  backoff: { base: 250 },
});
const off = herald.on("message", (m: HeraldMessage) => {
  const id: string | undefined = m.id;
  void id;
  void m.replaces;
  void m.channel;
});
off();
herald.on("state", (s: StateEvent) => {
  if (s.state === "reconnecting") void (s.delay ?? 0);
});
herald.on("gap", (g) => void g.reason);
herald.on("read", (r) => void r.local);
herald.on("retract", (r) => void r.id);
herald.on("error", (e) => void e.error);
herald.on("welcome", (w) => void w.unread);
void herald.start();
void herald.ack("1732530000000-0");
herald.stop();
const c2 = connect({ url: "/herald", getToken: () => "alice", transport: "sse" });
void c2.state.state;

// @ts-expect-error unknown event
herald.on("nope", () => {});
// @ts-expect-error getToken is required
new HeraldClient({ url: "x" });
// @ts-expect-error transport is a closed set
connect({ url: "x", getToken: () => "t", transport: "long-polling" });
