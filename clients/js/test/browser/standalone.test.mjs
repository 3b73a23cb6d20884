// Browser tests against one standalone `herald --dev` node (in-memory engine). The page is
// served from another origin by a static server, as any deployment of the demo would be.
import { after, before, describe, test } from "node:test";
import * as cases from "./cases.mjs";
import { cleanup, launchBrowser, log, SHOTS, startStandalone, startStatic } from "./harness.mjs";

const T = { timeout: 60_000 };
const t = {};

describe("standalone node", () => {
  before(async () => {
    log(`screenshots go to ${SHOTS}`);
    const node = await startStandalone(["--dev"]);
    const page = await startStatic();
    Object.assign(t, { node: node.url, api: node.api, page: page.url, browser: await launchBrowser() });
    log(`herald ${node.url}, page ${page.url}`);
  });
  after(cleanup);

  test("user, topic and broadcast messages over WebSocket", T, () => cases.routing(t, "standalone"));
  test("durable messages survive a reload and a closed tab (since): none missing, none twice", T, () =>
    cases.reload(t, "standalone"));
  test("two tabs share one socket (one session) and both show every message", T, () => cases.twoTabs(t, "standalone"));
  test("closing the leader tab hands over without losing a durable message", T, () => cases.handover(t, "standalone"));
  test("without Web Locks (BroadcastChannel election): one socket for two tabs", T, () =>
    cases.twoTabs(t, "standalone-bc", "&election=broadcast"));
  test("without Web Locks (BroadcastChannel election): handover loses nothing", T, () =>
    cases.handover(t, "standalone-bc", "&election=broadcast"));
});
