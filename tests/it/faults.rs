//! Fault injection against real processes and a real redis-server: frozen nodes, pub/sub
//! buffer overflow, silent subscription loss, partitions, Redis outages. Each test name says
//! what it proves.

use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::json;

/// Presence TTL used here: short, so expiry is observable, long enough for a loaded machine.
const TTL: Duration = Duration::from_secs(3);
/// Scheduling slack on a loaded 2-core machine, on top of the documented bound.
const SLACK: Duration = Duration::from_secs(4);

fn heartbeat() -> Duration {
    TTL / 3
}

async fn online_count(node: &Herald, user: &str) -> usize {
    node.presence_sessions(user).await.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_node_sessions_expire_then_return_once_after_sigcont() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "fz", "a")).await;
    let b = Herald::spawn(NodeOpts::cluster(&redis, "fz", "b")).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let mut client = connect(&a, "frozen-user", &[]).await;
    eventually(WAIT, "session visible from b", || async {
        (online_count(&b, "frozen-user").await == 1).then_some(())
    })
    .await;

    a.signal("STOP");
    let stopped = Instant::now();
    eventually(
        TTL + heartbeat() + SLACK,
        "frozen node's session expires",
        || async { (online_count(&b, "frozen-user").await == 0).then_some(()) },
    )
    .await;
    let stats = b.stats().await;
    assert!(
        stats["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .all(|n| n["node"] != "a"),
        "frozen node still listed after {:?}: {stats}",
        stopped.elapsed()
    );
    // Stay frozen well past the TTL, so every record of the node has expired.
    tokio::time::sleep(TTL).await;

    a.signal("CONT");
    eventually(
        heartbeat() + SLACK,
        "resumed node re-asserts its session",
        || async { (online_count(&b, "frozen-user").await >= 1).then_some(()) },
    )
    .await;
    a.wait_ready().await;
    eventually(WAIT, "the node noticed it was away", || async {
        (a.metric("herald_presence_reasserts_total").await >= 1.0).then_some(())
    })
    .await;
    // Exactly one entry: re-assertion rewrote the same member, it did not add another.
    assert_eq!(online_count(&b, "frozen-user").await, 1);
    b.publish(json!({"user": "frozen-user", "data": "after resume"}))
        .await;
    let m = recv_message(&mut client.ws, WAIT)
        .await
        .expect("message after resume");
    assert_eq!(m["data"], "after resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_output_buffer_overflow_is_detected_and_resubscribed() {
    let redis = RedisServer::start_with(&["--client-output-buffer-limit", "pubsub 256kb 128kb 1"]);
    let a = Herald::spawn(NodeOpts::cluster(&redis, "ob", "a")).await;
    a.wait_ready().await;
    let mut client = connect(&a, "reader", &[]).await;
    // The flood goes to another user's channel, so the reader is not a slow consumer itself.
    let _flooded = connect(&a, "flooded", &[]).await;
    let reconnects_before = a.metric("herald_pubsub_reconnects_total").await;

    // Freeze the node so it cannot read its subscription, then overflow it.
    a.signal("STOP");
    let chunk = vec![b'x'; 60 * 1024];
    let deadline = Instant::now() + WAIT;
    loop {
        for _ in 0..50 {
            redis.publish("ob:user:{flooded}", &chunk);
        }
        let subscribers: i64 = redis
            .cmd(&["PUBSUB", "NUMSUB", "ob:user:{flooded}"])
            .map(|v: Vec<redis::Value>| match v.get(1) {
                Some(redis::Value::Int(n)) => *n,
                _ => -1,
            })
            .expect("numsub");
        if subscribers == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Redis never cut the frozen subscriber"
        );
    }
    a.signal("CONT");

    eventually(WAIT, "node reconnects its subscription", || async {
        (a.metric("herald_pubsub_reconnects_total").await > reconnects_before).then_some(())
    })
    .await;
    a.wait_ready().await;
    assert!(
        a.log_text().contains("pub/sub connection lost"),
        "the loss must be logged"
    );
    // Drain whatever part of the flood reached the client, then check live delivery.
    a.publish(json!({"user": "reader", "data": "fresh"})).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let m = recv_message(&mut client.ws, WAIT)
            .await
            .expect("delivery after overflow");
        if m["data"] == "fresh" {
            break;
        }
        assert!(Instant::now() < deadline, "fresh message never arrived");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_pubsub_loss_is_caught_by_the_canary() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr()).await;
    let mut opts = NodeOpts::cluster(&redis, "sl", "a");
    opts.redis_url = Some(proxy.url());
    let a = Herald::spawn(opts).await;
    a.wait_ready().await;
    let mut client = connect(&a, "u", &[]).await;

    // Publishes keep succeeding (the command connections work) but nothing is delivered.
    proxy.blackhole_pubsub();
    a.wait_not_ready().await;
    assert!(a.metric("herald_pubsub_canary_timeouts_total").await >= 1.0);
    let (status, _) = a
        .api_post("/api/publish", &json!({"user": "u", "data": "lost"}))
        .await;
    assert_eq!(
        status, 200,
        "publishing must keep working during a silent loss"
    );

    proxy.heal();
    a.wait_ready().await;
    // The canary round trip is exported once the subscription works again.
    eventually(WAIT, "canary round-trip metric", || async {
        (a.metric("herald_pubsub_canary_rtt_seconds_count").await >= 1.0).then_some(())
    })
    .await;
    a.publish(json!({"user": "u", "data": "after heal"})).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let m = recv_message(&mut client.ws, WAIT)
            .await
            .expect("delivery after heal");
        if m["data"] == "after heal" {
            break;
        }
        assert!(Instant::now() < deadline);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_node_keeps_sockets_and_reasserts_after_heal() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr()).await;
    let mut opts = NodeOpts::cluster(&redis, "pt", "a");
    opts.redis_url = Some(proxy.url());
    let a = Herald::spawn(opts).await;
    let b = Herald::spawn(NodeOpts::cluster(&redis, "pt", "b")).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let mut on_a = connect(&a, "cut-user", &[]).await;
    let mut on_b = connect(&b, "ok-user", &[]).await;
    eventually(WAIT, "session on a visible", || async {
        (online_count(&b, "cut-user").await == 1).then_some(())
    })
    .await;

    proxy.cut();
    a.wait_not_ready().await;
    eventually(
        TTL + heartbeat() + SLACK,
        "cut node's session expires cluster-wide",
        || async { (online_count(&b, "cut-user").await == 0).then_some(()) },
    )
    .await;
    // The rest of the cluster keeps working.
    b.publish(json!({"user": "ok-user", "data": "still fine"}))
        .await;
    assert_eq!(
        recv_message(&mut on_b.ws, WAIT).await.expect("b delivers")["data"],
        "still fine"
    );
    // a keeps its socket open while cut: the same connection gets messages after healing.
    proxy.heal();
    a.wait_ready().await;
    eventually(
        heartbeat() + SLACK,
        "healed node re-asserts presence",
        || async { (online_count(&b, "cut-user").await == 1).then_some(()) },
    )
    .await;
    b.publish(json!({"user": "cut-user", "data": "healed"}))
        .await;
    let m = recv_message(&mut on_a.ws, WAIT)
        .await
        .expect("same socket after heal");
    assert_eq!(m["data"], "healed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_started_before_redis_waits_then_survives_repeated_restarts() {
    let mut redis = RedisServer::start();
    redis.stop();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "rs", "a")).await;
    // Up but not ready while Redis does not exist.
    assert!(!a.ready().await, "must not be ready without Redis");
    let (status, _) = a
        .api_post("/api/publish", &json!({"user": "u", "data": 1}))
        .await;
    assert_eq!(status, 503, "publishing without Redis must fail clearly");

    redis.restart();
    a.wait_ready().await;
    let mut client = connect(&a, "u", &[]).await;
    for round in 0..3 {
        redis.restart();
        eventually(WAIT, "presence rewritten after restart", || async {
            (!redis.keys("rs:presence").is_empty()).then_some(())
        })
        .await;
        a.wait_ready().await;
        let text = format!("round {round}");
        a.publish(json!({"user": "u", "data": text})).await;
        let m = recv_message(&mut client.ws, WAIT)
            .await
            .expect("delivery after restart");
        assert_eq!(m["data"], text.as_str());
    }
}
