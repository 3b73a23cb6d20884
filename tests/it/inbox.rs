//! Durable inbox: durable publishes (API and the `herald_notify` Redis Function), replay on
//! reconnect without gap or duplicate, gap frames, acknowledgements, replay limits, and the
//! same behaviour standalone.

use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::{json, Value};

fn connect_since(node: &Herald, user: &str, since: &str) -> String {
    node.ws_url(&format!("?token={}&since={since}", token(user, &[])))
}

/// Reads frames until `n` messages arrived; returns (messages, gap reasons seen before them).
async fn read_messages(ws: &mut Ws, n: usize) -> (Vec<Value>, Vec<String>) {
    let mut msgs = Vec::new();
    let mut gaps = Vec::new();
    while msgs.len() < n {
        let v = recv_json(ws, WAIT)
            .await
            .unwrap_or_else(|| panic!("only {} of {n} messages", msgs.len()));
        match v["type"].as_str() {
            Some("message") => msgs.push(v),
            Some("gap") => gaps.push(v["reason"].as_str().unwrap_or_default().to_string()),
            _ => {}
        }
    }
    (msgs, gaps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_messages_carry_ids_and_replay_after_since_without_gap_or_duplicate() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "ib", "a")).await;
    let b = Herald::spawn(NodeOpts::cluster(&redis, "ib", "b")).await;
    a.wait_ready().await;
    b.wait_ready().await;

    let mut c = connect(&a, "42", &[]).await;
    let id1 = b.publish_durable("42", json!({"n": 1})).await;
    let m = recv_message(&mut c.ws, WAIT).await.expect("live durable");
    assert_eq!(m["id"], id1.as_str());
    assert_eq!(m["data"], json!({"n": 1}));
    drop(c);

    // While the user is away, two more arrive; a plain publish is not stored.
    let id2 = b.publish_durable("42", json!({"n": 2})).await;
    b.publish(json!({"user": "42", "data": "fire and forget"}))
        .await;
    let id3 = b.publish_durable("42", json!({"n": 3})).await;

    let mut c = connect_url(&connect_since(&b, "42", &id1)).await;
    let (msgs, gaps) = read_messages(&mut c.ws, 2).await;
    assert!(gaps.is_empty(), "no gap expected: {gaps:?}");
    assert_eq!(msgs[0]["id"], id2.as_str());
    assert_eq!(msgs[1]["id"], id3.as_str());
    let id4 = a.publish_durable("42", json!({"n": 4})).await;
    let m = recv_message(&mut c.ws, WAIT)
        .await
        .expect("live after replay");
    assert_eq!(m["id"], id4.as_str());
    assert_silent(&mut c.ws, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_during_a_stream_of_durable_messages_loses_and_duplicates_nothing() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "hs", "a")).await;
    a.wait_ready().await;
    let mut c = connect(&a, "u", &[]).await;
    let first = a.publish_durable("u", json!(0)).await;
    assert_eq!(
        recv_message(&mut c.ws, WAIT).await.expect("first")["id"],
        first.as_str()
    );
    drop(c);

    // A producer keeps publishing through Redis itself while the client reconnects.
    let url = redis.url();
    let producer = std::thread::spawn(move || {
        let client = redis::Client::open(url).expect("client");
        let mut conn = client.get_connection().expect("conn");
        for i in 1..=300 {
            let _: String = redis::cmd("FCALL")
                .arg("herald_notify")
                .arg(1)
                .arg("hs:inbox:{u}")
                .arg(i.to_string())
                .query(&mut conn)
                .expect("fcall");
            if i % 30 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut c = connect_url(&connect_since(&a, "u", &first)).await;
    producer.join().expect("producer");
    let (msgs, gaps) = read_messages(&mut c.ws, 300).await;
    assert!(gaps.is_empty());
    let data: Vec<i64> = msgs
        .iter()
        .map(|m| m["data"].as_i64().expect("number"))
        .collect();
    assert_eq!(
        data,
        (1..=300).collect::<Vec<_>>(),
        "in order, none missing, none twice"
    );
    assert_silent(&mut c.ws, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_older_than_the_inbox_retains_gets_a_gap_frame_first() {
    // Small stream nodes make the approximate MAXLEN trimming bite at small sizes.
    let redis = RedisServer::start_with(&["--stream-node-max-entries", "4"]);
    let a = Herald::spawn(NodeOpts::cluster(&redis, "gp", "a").arg("--inbox-max-len", "5")).await;
    a.wait_ready().await;
    let first = a.publish_durable("u", json!(0)).await;
    for i in 1..40 {
        a.publish_durable("u", json!(i)).await;
    }
    let mut c = connect_url(&connect_since(&a, "u", &first)).await;
    let v = recv_json(&mut c.ws, WAIT).await.expect("frame");
    assert_eq!(v, json!({"type":"gap","reason":"trimmed"}));
    let (msgs, _) = read_messages(&mut c.ws, 1).await;
    assert!(
        msgs[0]["data"].as_i64().expect("n") > 1,
        "oldest entries were trimmed"
    );
    let (_, status) = (0, a.api_get("/api/inbox/u?limit=1000").await);
    let entries = status.1["entries"].as_array().expect("entries").len();
    assert!(entries < 20, "inbox is capped, holds {entries}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_move_the_cursor_and_the_next_login_replays_only_unacknowledged() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "ak", "a")).await;
    a.wait_ready().await;
    let ids: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(a.publish_durable("u", json!(i)).await);
        }
        v
    };
    // No cursor yet: a plain login replays everything pending.
    let mut c = connect(&a, "u", &[]).await;
    let (msgs, _) = read_messages(&mut c.ws, 4).await;
    assert_eq!(msgs[3]["id"], ids[3].as_str());
    send_text(&mut c.ws, &json!({"type":"ack","id": ids[1]}).to_string()).await;
    send_text(&mut c.ws, r#"{"type":"ack","id":"not-an-id"}"#).await;
    let err = recv_json(&mut c.ws, WAIT).await.expect("error frame");
    assert_eq!(err, json!({"type":"error","error":"bad_id"}));
    eventually(WAIT, "cursor stored", || async {
        let (_, body) = a.api_get("/api/inbox/u").await;
        (body["cursor"] == ids[1].as_str()).then_some(body)
    })
    .await;
    drop(c);

    let mut c = connect(&a, "u", &[]).await;
    let (msgs, _) = read_messages(&mut c.ws, 2).await;
    assert_eq!(msgs[0]["id"], ids[2].as_str());
    assert_eq!(msgs[1]["id"], ids[3].as_str());
    assert_silent(&mut c.ws, Duration::from_millis(300)).await;

    // HTTP: unacknowledged entries, then an ack through the API.
    let (status, body) = a.api_get("/api/inbox/u").await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = body["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(listed, vec![ids[2].as_str(), ids[3].as_str()]);
    let (status, body) = a.api_post("/api/inbox/u/ack", &json!({"id": ids[3]})).await;
    assert_eq!((status, body["moved"].clone()), (200, json!(true)));
    let (status, body) = a.api_post("/api/inbox/u/ack", &json!({"id": ids[0]})).await;
    assert_eq!(
        (status, body["moved"].clone()),
        (200, json!(false)),
        "cursor never moves back"
    );
    let (_, body) = a.api_get("/api/inbox/u").await;
    assert!(body["entries"].as_array().expect("entries").is_empty());
    let (status, _) = a.api_post("/api/inbox/u/ack", &json!({"id": "x"})).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_is_capped_per_connection_with_a_trailing_gap() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "rl", "a").arg("--replay-limit", "3")).await;
    a.wait_ready().await;
    for i in 0..5 {
        a.publish_durable("u", json!(i)).await;
    }
    let mut c = connect(&a, "u", &[]).await;
    let (msgs, _) = read_messages(&mut c.ws, 3).await;
    assert_eq!(
        msgs.iter().map(|m| m["data"].clone()).collect::<Vec<_>>(),
        vec![json!(0), json!(1), json!(2)]
    );
    let v = recv_json(&mut c.ws, WAIT).await.expect("gap");
    assert_eq!(v, json!({"type":"gap","reason":"replay_limit"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_function_is_reloaded_after_a_redis_restart_and_durable_rejects_topics() {
    let mut redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "fr", "a")).await;
    a.wait_ready().await;
    let (status, _) = a
        .api_post(
            "/api/publish",
            &json!({"topic": "t", "durable": true, "data": 1}),
        )
        .await;
    assert_eq!(status, 400);
    redis.restart();
    a.wait_ready().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let r: redis::RedisResult<String> =
            redis.cmd(&["FCALL", "herald_notify", "1", "fr:inbox:{u}", "x"]);
        if r.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "function never reloaded: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ttl: i64 = redis.cmd(&["PTTL", "fr:inbox:{u}"]).expect("pttl");
    assert!(ttl > 0, "the inbox key has an expiry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_node_keeps_an_inbox_in_memory() {
    let a = Herald::spawn(NodeOpts::standalone("solo")).await;
    a.wait_ready().await;
    let id1 = a.publish_durable("u", json!("one")).await;
    let id2 = a.publish_durable("u", json!("two")).await;
    let mut c = connect_url(&connect_since(&a, "u", &id1)).await;
    let (msgs, _) = read_messages(&mut c.ws, 1).await;
    assert_eq!(msgs[0]["id"], id2.as_str());
    let id3 = a.publish_durable("u", json!("three")).await;
    assert_eq!(
        recv_message(&mut c.ws, WAIT).await.expect("live")["id"],
        id3.as_str()
    );
}
