// Browser tests through nginx in front of three `herald --dev` nodes sharing one Redis:
// the topology of scripts/local-cluster.sh (which this file starts and stops).
import { after, before, describe, test } from "node:test";
import * as cases from "./cases.mjs";
import { cleanup, launchBrowser, log, setApiKey, startCluster, startStatic } from "./harness.mjs";

const T = { timeout: 90_000 };
const t = {};

describe("3 nodes behind nginx", () => {
  before(async () => {
    const cluster = await startCluster({ dev: true });
    setApiKey(cluster.apiKey);
    const page = await startStatic();
    Object.assign(t, {
      node: cluster.url,
      api: cluster.api,
      nodes: cluster.nodes,
      page: page.url,
      browser: await launchBrowser(),
    });
    log(`nginx ${cluster.url}, page ${page.url}`);
  });
  after(cleanup);

  test("user, topic and broadcast messages over WebSocket", T, () => cases.routing(t, "cluster"));
  test("durable messages survive a reload and a closed tab (since): none missing, none twice", T, () =>
    cases.reload(t, "cluster"));
  test("two tabs share one socket (one session cluster-wide) and both show every message", T, () =>
    cases.twoTabs(t, "cluster"));
  test("closing the leader tab hands over without losing a durable message", T, () => cases.handover(t, "cluster"));
  // These two take a node away: they run last (drain first, then kill -9 of another).
  test("the session's node drains (SIGTERM, 1012): reconnect elsewhere, no durable message lost", T, () =>
    cases.nodeLoss(t, "cluster", "SIGTERM"));
  test("the session's node is killed (kill -9): reconnect elsewhere, no durable message lost", T, () =>
    cases.nodeLoss(t, "cluster", "SIGKILL"));
});
