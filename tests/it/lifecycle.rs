//! Node and Redis lifecycles with real processes: a crashed node's state expires, a drained
//! node cleans up after itself, a frozen node comes back, and a node survives Redis losing
//! everything.

use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::json;

async fn spawn_ready(opts: NodeOpts) -> Herald {
    let h = Herald::spawn(opts).await;
    h.wait_ready().await;
    h
}

fn opts(redis: &RedisServer, prefix: &str, id: &str, ttl: &str) -> NodeOpts {
    let mut o = NodeOpts::cluster(redis, prefix, id);
    o.presence_ttl = ttl.to_string();
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_sessions_and_record_expire_within_ttl_plus_one_heartbeat() {
    let redis = RedisServer::start();
    let p = "lc-kill";
    let mut a = spawn_ready(opts(&redis, p, "a", "3")).await;
    let b = spawn_ready(opts(&redis, p, "b", "3")).await;
    let _g1 = connect(&a, "gone1", &[]).await;
    let _g2 = connect(&a, "gone2", &["t"]).await;
    let _shared_a = connect(&a, "shared", &[]).await;
    let _shared_b = connect(&b, "shared", &[]).await;
    let _stay = connect(&b, "stay", &[]).await;

    b.wait_presence_nodes("gone1", &["a"]).await;
    b.wait_presence_nodes("gone2", &["a"]).await;
    b.wait_presence_nodes("shared", &["a", "b"]).await;
    assert_eq!(b.stats_nodes().await, vec!["a", "b"]);
    let keys = redis.keys(p);
    for k in ["lc-kill:presence:{gone1}", "lc-kill:presence:{gone2}"] {
        assert!(
            keys.contains(&k.to_string()),
            "{k} exists before the kill: {keys:?}"
        );
    }
    let lease_of_a = |keys: &[String]| keys.iter().any(|k| k.starts_with("lc-kill:lease:{a~"));
    assert!(lease_of_a(&keys), "node a holds a lease: {keys:?}");

    a.kill9();
    let killed = Instant::now();
    eventually(WAIT, "the dead node's state expired", || async {
        let keys = redis.keys(p);
        let gone = !b.online("gone1").await
            && !b.online("gone2").await
            && b.stats_nodes().await == vec!["b".to_string()]
            && !lease_of_a(&keys)
            && redis.session_fields("lc-kill:presence:{gone1}") == 0
            && redis.session_fields("lc-kill:presence:{gone2}") == 0;
        gone.then_some(())
    })
    .await;
    let took = killed.elapsed();
    // TTL 3 s + one heartbeat (1 s), plus slack for polling on a loaded machine.
    assert!(
        took <= Duration::from_secs(6),
        "the dead node's state took {took:?} to expire"
    );
    b.wait_presence_nodes("shared", &["b"]).await;
    let stats = b.stats().await;
    assert_eq!(
        stats,
        json!({"connections": 2, "users": 2, "nodes": [{"node": "b", "connections": 2, "users": 2}]})
    );
    assert!(b.online("stay").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_refuses_upgrades_closes_with_1012_cleans_up_and_exits_0() {
    let redis = RedisServer::start();
    let p = "lc-drain";
    // A 30 s TTL: what disappears during the drain was removed, not expired.
    let mut a = spawn_ready(
        opts(&redis, p, "a", "30")
            .arg("--drain-batch", "1")
            .arg("--drain-interval", "1s")
            .arg("--drain-grace", "15s"),
    )
    .await;
    let b = spawn_ready(opts(&redis, p, "b", "30")).await;
    let users: Vec<String> = (0..5).map(|i| format!("d{i}")).collect();
    let mut clients = Vec::new();
    for u in &users {
        clients.push(connect(&a, u, &[]).await);
    }
    let mut stay = connect(&b, "stay", &[]).await;
    for u in &users {
        b.wait_presence_nodes(u, &["a"]).await;
    }
    assert_eq!(b.stats_nodes().await, vec!["a", "b"]);

    a.signal("TERM");
    let termed = Instant::now();
    a.wait_not_ready().await;
    let (status, body) = a.readyz().await;
    assert_eq!(status, 503);
    assert_eq!(body["draining"], true, "readyz says why: {body}");
    assert_eq!(body["ready"], false);
    assert_eq!(
        refused_status(&a.ws_url(&format!("?token={}", token("late", &[])))).await,
        503,
        "new upgrades are refused while draining"
    );

    for (c, u) in clients.iter_mut().zip(&users) {
        assert_eq!(
            expect_close(&mut c.ws, WAIT).await,
            Ended::Close(1012),
            "close code for {u}"
        );
    }
    for u in &users {
        eventually(WAIT, &format!("{u} offline"), || async {
            (!b.online(u).await).then_some(())
        })
        .await;
    }
    eventually(WAIT, "node a gone from stats and keys", || async {
        let keys = redis.keys(p);
        let clean = b.stats_nodes().await == vec!["b".to_string()]
            && !keys.iter().any(|k| {
                k.starts_with("lc-drain:lease:{a~") || k.starts_with("lc-drain:presence:{d")
            });
        clean.then_some(())
    })
    .await;
    let cleaned = termed.elapsed();
    // The last heartbeat was at most 10 s before SIGTERM, so expiry could not come before 20 s.
    assert!(
        cleaned < Duration::from_secs(15),
        "cleanup took {cleaned:?}: that is expiry, not a drain"
    );
    assert!(
        !b.online("late").await,
        "the refused upgrade left no presence"
    );

    let status = a
        .wait_exit(Duration::from_secs(25))
        .await
        .expect("drained node exits");
    let exited = termed.elapsed();
    assert_eq!(status.code(), Some(0), "exit status after a drain");
    assert!(
        exited < Duration::from_secs(15),
        "exited after {exited:?}, beyond --drain-grace 15s"
    );

    // The other node never noticed.
    assert!(b.online("stay").await);
    b.publish(json!({"user": "stay", "data": "fine"})).await;
    let m = recv_message(&mut stay.ws, WAIT).await.expect("message");
    assert_eq!(m["data"], "fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_restart_the_node_recovers_rewrites_presence_at_once_and_delivers() {
    let mut redis = RedisServer::start();
    let p = "lc-redis";
    // TTL 30 s: the next regular heartbeat is up to 10 s away.
    let a = spawn_ready(opts(&redis, p, "a", "30")).await;
    let mut c = connect(&a, "r1", &["news"]).await;
    a.wait_presence_nodes("r1", &["a"]).await;

    redis.stop();
    a.wait_not_ready().await;
    let (status, body) = a.readyz().await;
    assert_eq!(status, 503);
    assert_eq!(body["draining"], false, "{body}");
    // SIGKILLed without persistence: it comes back empty.
    redis.restart();
    a.wait_ready().await;
    let ready_at = Instant::now();

    eventually(
        Duration::from_secs(5),
        "presence rewritten right after reconnecting",
        || async {
            let keys = redis.keys(p);
            let ok = a.online("r1").await
                && keys.contains(&"lc-redis:presence:{r1}".to_string())
                && keys.iter().any(|k| k.starts_with("lc-redis:lease:{a~"))
                && a.stats_nodes().await == vec!["a".to_string()];
            ok.then_some(())
        },
    )
    .await;
    assert!(ready_at.elapsed() < Duration::from_secs(5));
    let stats = a.stats().await;
    assert_eq!(stats["connections"], 1);
    assert_eq!(stats["users"], 1);

    a.publish(json!({"user": "r1", "data": "after restart"}))
        .await;
    let m = recv_message(&mut c.ws, WAIT).await.expect("user message");
    assert_eq!(m["data"], "after restart");
    assert_eq!(
        redis.publish("lc-redis:topic:{news}", b"topic after restart"),
        1,
        "the topic is subscribed again"
    );
    let m = recv_message(&mut c.ws, WAIT).await.expect("topic message");
    assert_eq!(m["data"], "topic after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_expires_and_reappears_with_its_sessions_after_sigcont() {
    let redis = RedisServer::start();
    let p = "lc-stop";
    let a = spawn_ready(opts(&redis, p, "a", "2")).await;
    let b = spawn_ready(opts(&redis, p, "b", "2")).await;
    let mut frozen = connect(&a, "f", &[]).await;
    b.wait_presence_nodes("f", &["a"]).await;

    a.signal("STOP");
    eventually(WAIT, "the stopped node's presence expired", || async {
        (!b.online("f").await && b.stats_nodes().await == vec!["b".to_string()]).then_some(())
    })
    .await;

    a.signal("CONT");
    a.wait_ready().await;
    b.wait_presence_nodes("f", &["a"]).await;
    eventually(WAIT, "node a back in stats", || async {
        (b.stats_nodes().await == vec!["a".to_string(), "b".to_string()]).then_some(())
    })
    .await;
    b.publish(json!({"user": "f", "data": "welcome back"}))
        .await;
    let m = recv_message(&mut frozen.ws, WAIT).await.expect("message");
    assert_eq!(m["data"], "welcome back");
}
