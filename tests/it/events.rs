//! Online/offline events: one `online` when a user's first session appears anywhere, one
//! `offline` (with a reason) when the last is gone, grace for reloads, and crash-correct
//! `expired` events produced exactly once by whichever live node notices.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;
use serde_json::json;

/// Every event in `<prefix>:events`, as (type, user, reason) in stream order.
fn events(redis: &RedisServer, prefix: &str) -> Vec<(String, String, String)> {
    let raw: Vec<(String, Vec<(String, String)>)> = redis
        .cmd(&["XRANGE", &format!("{prefix}:events"), "-", "+"])
        .unwrap_or_default();
    raw.into_iter()
        .map(|(_, fields)| {
            let f: HashMap<String, String> = fields.into_iter().collect();
            (
                f.get("type").cloned().unwrap_or_default(),
                f.get("user").cloned().unwrap_or_default(),
                f.get("reason").cloned().unwrap_or_default(),
            )
        })
        .collect()
}

fn count(evs: &[(String, String, String)], kind: &str, user: &str) -> usize {
    evs.iter()
        .filter(|(k, u, _)| k == kind && u == user)
        .count()
}

async fn wait_for_event(
    redis: &RedisServer,
    prefix: &str,
    kind: &str,
    user: &str,
    timeout: Duration,
) -> String {
    eventually(timeout, &format!("{kind} event for {user}"), || async {
        events(redis, prefix)
            .into_iter()
            .find(|(k, u, _)| k == kind && u == user)
            .map(|(_, _, reason)| reason)
    })
    .await
}

fn node(redis: &RedisServer, prefix: &str, id: &str) -> NodeOpts {
    NodeOpts::cluster(redis, prefix, id).arg("--offline-grace", "1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_session_emits_online_and_last_close_emits_offline_closed_once() {
    let redis = RedisServer::start();
    let a = Herald::spawn(node(&redis, "ev", "a")).await;
    let b = Herald::spawn(node(&redis, "ev", "b")).await;
    a.wait_ready().await;
    b.wait_ready().await;

    // Events are also published on the channel of the same name.
    let url = redis.url();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let client = redis::Client::open(url).expect("client");
        let mut conn = client.get_connection().expect("conn");
        let mut ps = conn.as_pubsub();
        ps.subscribe("ev:events").expect("subscribe");
        while let Ok(msg) = ps.get_message() {
            if tx
                .send(msg.get_payload::<String>().unwrap_or_default())
                .is_err()
            {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let c1 = connect(&a, "alice", &[]).await;
    let c2 = connect(&b, "alice", &[]).await;
    assert_eq!(
        wait_for_event(&redis, "ev", "online", "alice", WAIT).await,
        ""
    );
    let published: serde_json::Value =
        serde_json::from_str(&rx.recv_timeout(WAIT).expect("published event")).expect("json");
    assert_eq!(published["type"], "online");
    assert_eq!(published["user"], "alice");
    assert!(published["id"].as_str().is_some_and(|id| id.contains('-')));

    drop(c1);
    // One session is still open on b: no offline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(&events(&redis, "ev"), "offline", "alice"), 0);
    drop(c2);
    assert_eq!(
        wait_for_event(&redis, "ev", "offline", "alice", WAIT).await,
        "closed"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let evs = events(&redis, "ev");
    assert_eq!(count(&evs, "online", "alice"), 1, "{evs:?}");
    assert_eq!(count(&evs, "offline", "alice"), 1, "{evs:?}");
    assert_eq!(b.stats().await["users"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_within_the_grace_window_produces_no_events() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "rg", "a").arg("--offline-grace", "4")).await;
    a.wait_ready().await;
    let c = connect(&a, "bob", &[]).await;
    wait_for_event(&redis, "rg", "online", "bob", WAIT).await;
    drop(c);
    // A page reload: the same user is back well within the 4 s grace.
    eventually(WAIT, "old session closed", || async {
        (a.presence_sessions("bob").await.is_empty()).then_some(())
    })
    .await;
    let _c = connect(&a, "bob", &[]).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let evs = events(&redis, "rg");
    assert_eq!(evs.len(), 1, "only the first online: {evs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_users_get_exactly_one_offline_expired_and_shared_users_none() {
    let redis = RedisServer::start();
    let mut a = Herald::spawn(node(&redis, "kx", "a")).await;
    let b = Herald::spawn(node(&redis, "kx", "b")).await;
    let c = Herald::spawn(node(&redis, "kx", "c")).await;
    for n in [&a, &b, &c] {
        n.wait_ready().await;
    }
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(connect(&a, &format!("only-a-{i}"), &[]).await);
    }
    clients.push(connect(&a, "shared", &[]).await);
    let _shared_on_b = connect(&b, "shared", &[]).await;
    for i in 0..5 {
        wait_for_event(&redis, "kx", "online", &format!("only-a-{i}"), WAIT).await;
    }

    a.kill9();
    drop(clients);
    // TTL 3 s + grace 1 s + reaper cadence, with slack for a loaded machine.
    for i in 0..5 {
        let reason = wait_for_event(
            &redis,
            "kx",
            "offline",
            &format!("only-a-{i}"),
            Duration::from_secs(15),
        )
        .await;
        assert_eq!(reason, "expired");
    }
    // b and c both run the reaper; give them time to (wrongly) emit twice.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let evs = events(&redis, "kx");
    for i in 0..5 {
        assert_eq!(count(&evs, "offline", &format!("only-a-{i}")), 1, "{evs:?}");
    }
    assert_eq!(count(&evs, "offline", "shared"), 0, "{evs:?}");
    assert_eq!(count(&evs, "online", "shared"), 1, "{evs:?}");
    assert!(
        b.metric("herald_offline_events_reaped_total").await
            + c.metric("herald_offline_events_reaped_total").await
            >= 5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kicked_and_drained_users_get_their_offline_reason() {
    let redis = RedisServer::start();
    let a = Herald::spawn(node(&redis, "kd", "a")).await;
    let b = Herald::spawn(node(&redis, "kd", "b")).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let mut kicked = connect(&a, "kicked-user", &[]).await;
    let _drained = connect(&b, "drained-user", &[]).await;
    let (status, _) = a.api_post("/api/disconnect/kicked-user", &json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(expect_close(&mut kicked.ws, WAIT).await, Ended::Close(4002));
    assert_eq!(
        wait_for_event(&redis, "kd", "offline", "kicked-user", WAIT).await,
        "kicked"
    );

    b.signal("TERM");
    assert_eq!(
        wait_for_event(&redis, "kd", "offline", "drained-user", WAIT).await,
        "drained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_readable_with_consumer_groups() {
    let redis = RedisServer::start();
    let a = Herald::spawn(node(&redis, "cg", "a")).await;
    a.wait_ready().await;
    let _c = connect(&a, "carol", &[]).await;
    wait_for_event(&redis, "cg", "online", "carol", WAIT).await;
    let _: String = redis
        .cmd(&["XGROUP", "CREATE", "cg:events", "workers", "0"])
        .expect("group");
    let read: redis::Value = redis
        .cmd(&[
            "XREADGROUP",
            "GROUP",
            "workers",
            "w1",
            "COUNT",
            "10",
            "STREAMS",
            "cg:events",
            ">",
        ])
        .expect("xreadgroup");
    let text = format!("{read:?}");
    assert!(text.contains("carol") && text.contains("online"), "{text}");
    let ttl: i64 = redis.cmd(&["PTTL", "cg:events"]).expect("pttl");
    assert!(ttl > 0, "the events stream expires");
}
