//! The durable inbox beyond replay: live sessions caught up after their node's subscription
//! broke (a partition, a Redis restart), validated acks and stored entries, idempotent
//! publishes, per-message expiry, collapse keys, retraction, and read state across devices.

use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

async fn durable(node: &Herald, body: Value) -> (u16, Value) {
    node.api_post("/api/publish", &body).await
}

/// A durable publish for `user` through the API; returns its id.
async fn notify(node: &Herald, user: &str, data: Value) -> String {
    let (status, body) = durable(node, json!({"user": user, "durable": true, "data": data})).await;
    assert_eq!(status, 200, "durable publish: {body}");
    body["ids"][user].as_str().expect("id").to_string()
}

/// `FCALL herald_notify` straight on Redis, as a producer in another language would.
fn fcall_notify(redis: &RedisServer, inbox: &str, payload: &str, options: &[&str]) -> String {
    let mut args = vec!["FCALL", "herald_notify", "1", inbox, payload];
    args.extend_from_slice(options);
    redis.cmd(&args).expect("herald_notify")
}

/// Reads frames until `n` messages arrived; returns them (other frames are skipped).
async fn messages(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        let v = recv_json(ws, WAIT)
            .await
            .unwrap_or_else(|| panic!("only {} of {n} messages: {got:?}", got.len()));
        if v["type"] == "message" {
            got.push(v);
        }
    }
    got
}

/// The next frame of type `kind`, skipping messages and pongs.
async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let v = recv_json(ws, WAIT)
            .await
            .unwrap_or_else(|| panic!("no {kind} frame"));
        if v["type"] == kind {
            return v;
        }
    }
}

fn data_of(msgs: &[Value]) -> Vec<Value> {
    msgs.iter().map(|m| m["data"].clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_session_gets_what_was_stored_while_its_node_was_cut_from_redis() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr()).await;
    let mut opts = NodeOpts::cluster(&redis, "cu", "a");
    opts.redis_url = Some(proxy.url());
    let a = Herald::spawn(opts).await;
    a.wait_ready().await;
    let mut c = connect(&a, "u", &[]).await;

    let first = fcall_notify(&redis, "cu:inbox:{u}", "1", &[]);
    assert_eq!(messages(&mut c.ws, 1).await[0]["id"], first.as_str());

    // The node loses Redis; the user stays connected; a producer stores three durable
    // notifications directly on Redis meanwhile.
    proxy.cut();
    a.wait_not_ready().await;
    let missed: Vec<String> = (2..=4)
        .map(|i| fcall_notify(&redis, "cu:inbox:{u}", &i.to_string(), &[]))
        .collect();
    proxy.heal();
    a.wait_ready().await;

    let got = messages(&mut c.ws, 3).await;
    let ids: Vec<&str> = got.iter().map(|m| m["id"].as_str().unwrap_or("")).collect();
    assert_eq!(ids, missed.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(data_of(&got), vec![json!(2), json!(3), json!(4)]);

    // Live delivery goes on after the catch-up, and nothing comes twice.
    let fifth = fcall_notify(&redis, "cu:inbox:{u}", "5", &[]);
    assert_eq!(messages(&mut c.ws, 1).await[0]["id"], fifth.as_str());
    assert_silent(&mut c.ws, Duration::from_millis(500)).await;
    assert!(a.metric("herald_catch_up_sessions_total").await >= 1.0);
    assert!(a.metric("herald_messages_caught_up_total").await >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_restart_live_sessions_get_what_was_stored_before_their_node_resubscribed() {
    let mut redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr()).await;
    let mut opts = NodeOpts::cluster(&redis, "rr", "a");
    opts.redis_url = Some(proxy.url());
    let a = Herald::spawn(opts).await;
    let b = Herald::spawn(NodeOpts::cluster(&redis, "rr", "b")).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let mut c = connect(&a, "u", &[]).await;
    let mut other = connect(&b, "v", &[]).await;

    // Redis restarts empty while node a cannot reach it yet; node b comes back first and
    // stores durable notifications for a's user before a has resubscribed.
    proxy.cut();
    redis.restart();
    b.wait_ready().await;
    let mut ids = Vec::new();
    for i in 1..=3 {
        ids.push(
            eventually(WAIT, "durable publish after the restart", || async {
                let (status, body) =
                    durable(&b, json!({"user": "u", "durable": true, "data": i})).await;
                (status == 200).then(|| body["ids"]["u"].as_str().unwrap_or("").to_string())
            })
            .await,
        );
    }
    proxy.heal();
    a.wait_ready().await;
    let got = messages(&mut c.ws, 3).await;
    assert_eq!(data_of(&got), vec![json!(1), json!(2), json!(3)]);
    let got_ids: Vec<&str> = got.iter().map(|m| m["id"].as_str().unwrap_or("")).collect();
    assert_eq!(got_ids, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert_silent(&mut c.ws, Duration::from_millis(500)).await;
    // The session on the node that never lost its subscription is unaffected.
    assert_silent(&mut other.ws, Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_move_the_cursor_at_most_to_the_newest_entry() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "av", "a")).await;
    a.wait_ready().await;
    let first = notify(&a, "u", json!(1)).await;

    // A client acks an id far in the future: the cursor stops at the newest entry.
    let mut c = connect(&a, "u", &[]).await;
    messages(&mut c.ws, 1).await;
    send_text(&mut c.ws, r#"{"type":"ack","id":"9999999999999-0"}"#).await;
    eventually(WAIT, "cursor clamped", || async {
        let (_, body) = a.api_get("/api/inbox/u").await;
        (body["cursor"] == first.as_str()).then_some(())
    })
    .await;
    drop(c);

    // So a notification published afterwards is still unread everywhere.
    let later = notify(&a, "u", json!(2)).await;
    let (_, body) = a.api_get("/api/inbox/u").await;
    assert_eq!(body["entries"][0]["id"], later.as_str());
    assert_eq!(body["unread"], 1);
    let mut c = connect(&a, "u", &[]).await;
    assert_eq!(c.welcome["unread"], 1);
    assert_eq!(messages(&mut c.ws, 1).await[0]["id"], later.as_str());

    // The API clamps the same way and says where the cursor is.
    let (status, body) = a
        .api_post(
            "/api/inbox/u/ack",
            &json!({"id": "18446744073709551615-18446744073709551615"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["cursor"], later.as_str());
    assert_eq!(body["moved"], true);
    // An ack on an empty inbox moves nothing.
    let (status, body) = a
        .api_post("/api/inbox/nobody/ack", &json!({"id": "5-0"}))
        .await;
    assert_eq!((status, body["moved"].clone()), (200, json!(false)));
    assert_eq!(
        redis
            .cmd::<Option<String>>(&["GET", "av:cursor:{nobody}"])
            .unwrap(),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_envelope_with_a_future_id_is_dropped_and_hides_nothing() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "fe", "a")).await;
    a.wait_ready().await;
    let mut c = connect(&a, "u", &[]).await;
    redis.publish("fe:user:{u}", b"\x009999999999999-0\x00forged");
    let real = notify(&a, "u", json!("real")).await;
    let got = messages(&mut c.ws, 1).await;
    assert_eq!(
        got[0]["id"],
        real.as_str(),
        "the forgery did not hide the real one"
    );
    eventually(WAIT, "bad envelope counted", || async {
        (a.metric("herald_messages_dropped_total{reason=\"bad_envelope\"}")
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_notify_refuses_what_no_node_would_deliver() {
    let redis = RedisServer::start();
    let a =
        Herald::spawn(NodeOpts::cluster(&redis, "nv", "a").arg("--max-message-bytes", "100")).await;
    a.wait_ready().await;
    let refused = |key: &str, payload: &str, opts: &[&str]| {
        let mut args = vec!["FCALL", "herald_notify", "1", key, payload];
        args.extend_from_slice(opts);
        let err = redis
            .cmd::<String>(&args)
            .expect_err(&format!("{key} {payload:.20} {opts:?} must be refused"));
        err.to_string()
    };
    let big = "x".repeat(101);
    assert!(refused("nv:inbox:{u}", &big, &[]).contains("the limit is 100"));
    for key in [
        "other:inbox:{u}",
        "nv:inbox:",
        "nv:inbox:{a b}",
        "nv:inbox:{tab\there}",
        "nv:inbox:{nbsp\u{a0}x}",
        "nv:inbox:{line\u{2028}sep}",
        "nv:inbox:{rtl\u{202e}x}",
        "nv:inbox:{zw\u{200b}x}",
        "nv:inbox:{bom\u{feff}x}",
        "nv:user:{u}",
        "nv:inbox:u",
        "nv:inbox:{}",
        "nv:inbox:{a{b}",
        "nv:inbox:{a}b}",
    ] {
        assert!(
            refused(key, "1", &[]).contains("key must be nv:inbox:{<user>}"),
            "{key}"
        );
    }
    assert!(refused("nv:inbox:{u}", "1", &["ttl", "0"]).contains("ttl"));
    assert!(refused("nv:inbox:{u}", "1", &["idem", "a b"]).contains("idem"));
    assert!(refused("nv:inbox:{u}", "1", &["nope", "1"]).contains("unknown option"));
    assert!(refused("nv:inbox:{u}", "1", &["idem"]).contains("needs a value"));
    // Nothing was stored by any refusal.
    assert!(
        redis.keys("nv").iter().all(|k| !k.contains(":inbox:")),
        "{:?}",
        redis.keys("nv")
    );
    // What is valid is stored: 100 bytes, and user ids with any printable characters.
    fcall_notify(&redis, "nv:inbox:{u}", &"y".repeat(100), &[]);
    fcall_notify(&redis, "nv:inbox:{ünï:cödé@x}", "1", &[]);
    let (_, body) = a
        .api_get("/api/inbox/%C3%BCn%C3%AF%3Ac%C3%B6d%C3%A9%40x")
        .await;
    assert_eq!(body["entries"].as_array().map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_makes_a_retried_durable_publish_store_nothing_new() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "ik", "a")).await;
    a.wait_ready().await;
    let body =
        json!({"users": ["u", "v"], "durable": true, "idempotency_key": "export-42", "data": 1});
    let (s1, r1) = durable(&a, body.clone()).await;
    let (s2, r2) = durable(&a, body).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(r1["ids"], r2["ids"], "the retry answers with the first ids");
    for user in ["u", "v"] {
        let (_, inbox) = a.api_get(&format!("/api/inbox/{user}")).await;
        assert_eq!(
            inbox["entries"].as_array().map(Vec::len),
            Some(1),
            "{user}: {inbox}"
        );
    }
    // Through Redis directly, the same.
    let x = fcall_notify(&redis, "ik:inbox:{w}", "a", &["idem", "k"]);
    let y = fcall_notify(&redis, "ik:inbox:{w}", "b", &["idem", "k"]);
    assert_eq!(x, y);
    let z = fcall_notify(&redis, "ik:inbox:{w}", "c", &["idem", "other"]);
    assert_ne!(x, z);
    // A plain publish takes no idempotency key, and a bad key is refused.
    let (status, _) = durable(&a, json!({"user": "u", "idempotency_key": "k", "data": 1})).await;
    assert_eq!(status, 400);
    let (status, _) = durable(
        &a,
        json!({"user": "u", "durable": true, "idempotency_key": "", "data": 1}),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_collapsed_and_retracted_entries_are_not_replayed_and_live_sessions_are_told() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "ops", "a")).await;
    a.wait_ready().await;
    let mut c = connect(&a, "u", &[]).await;

    let (status, body) = durable(
        &a,
        json!({"user": "u", "durable": true, "expires_in": 1, "data": "meeting starts now"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    messages(&mut c.ws, 1).await;

    let keep = notify(&a, "u", json!("keep")).await;
    let (_, b1) = durable(
        &a,
        json!({"user": "u", "durable": true, "collapse_key": "comments", "data": "1 new comment"}),
    )
    .await;
    let (_, b2) = durable(
        &a,
        json!({"user": "u", "durable": true, "collapse_key": "comments", "data": "2 new comments"}),
    )
    .await;
    let (c1, c2) = (b1["ids"]["u"].clone(), b2["ids"]["u"].clone());
    let got = messages(&mut c.ws, 3).await;
    assert_eq!(got[2]["id"], c2);
    assert_eq!(
        got[2]["replaces"], c1,
        "the live session learns what it replaces"
    );

    let gone = notify(&a, "u", json!("withdrawn")).await;
    messages(&mut c.ws, 1).await;
    let (status, _) = a.api_delete(&format!("/api/inbox/u/{gone}")).await;
    assert_eq!(status, 200);
    assert_eq!(next_of(&mut c.ws, "retract").await["id"], gone.as_str());
    let (status, body) = a.api_delete(&format!("/api/inbox/u/{gone}")).await;
    assert_eq!((status, body["error"].clone()), (404, json!("not_found")));
    let (status, _) = a.api_delete("/api/inbox/u/not-an-id").await;
    assert_eq!(status, 400);

    // Once the expiry has passed, a new session replays only what still stands.
    let want = vec![keep.clone(), c2.as_str().unwrap_or("").to_string()];
    eventually(WAIT, "only live entries listed", || async {
        let (_, body) = a.api_get("/api/inbox/u").await;
        let ids: Vec<String> = body["entries"]
            .as_array()
            .map(|e| {
                e.iter()
                    .map(|x| x["id"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default();
        (ids == want && body["unread"] == 2).then_some(())
    })
    .await;
    let mut fresh = connect(&a, "u", &[]).await;
    assert_eq!(fresh.welcome["unread"], 2);
    let replayed = messages(&mut fresh.ws, 2).await;
    assert_eq!(
        data_of(&replayed),
        vec![json!("keep"), json!("2 new comments")]
    );
    assert_silent(&mut fresh.ws, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_on_one_device_tells_the_users_other_sessions_on_every_node() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "rd", "a")).await;
    let b = Herald::spawn(NodeOpts::cluster(&redis, "rd", "b")).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let ids = [
        notify(&a, "u", json!(1)).await,
        notify(&a, "u", json!(2)).await,
        notify(&a, "u", json!(3)).await,
    ];
    let mut laptop = connect(&a, "u", &[]).await;
    let mut phone = connect(&b, "u", &[]).await;
    assert_eq!(laptop.welcome["unread"], 3);
    assert_eq!(phone.welcome["unread"], 3);
    messages(&mut laptop.ws, 3).await;
    messages(&mut phone.ws, 3).await;

    send_text(
        &mut laptop.ws,
        &json!({"type": "ack", "id": ids[1]}).to_string(),
    )
    .await;
    let read = next_of(&mut phone.ws, "read").await;
    assert_eq!(read["id"], ids[1].as_str());
    // The laptop that read it is not told.
    assert!(
        recv_json(&mut laptop.ws, Duration::from_millis(500))
            .await
            .is_none(),
        "the reader gets no read frame"
    );
    let fresh = connect(&b, "u", &[]).await;
    assert_eq!(fresh.welcome["unread"], 1);

    // An API ack tells every session.
    let (status, _) = a.api_post("/api/inbox/u/ack", &json!({"id": ids[2]})).await;
    assert_eq!(status, 200);
    assert_eq!(next_of(&mut laptop.ws, "read").await["id"], ids[2].as_str());
    assert_eq!(next_of(&mut phone.ws, "read").await["id"], ids[2].as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_node_has_the_same_inbox_operations() {
    let a = Herald::spawn(NodeOpts::standalone("solo")).await;
    let mut laptop = connect(&a, "u", &[]).await;
    let mut phone = connect(&a, "u", &[]).await;
    let body = json!({"user": "u", "durable": true, "idempotency_key": "k", "collapse_key": "c", "data": 1});
    let (_, r1) = durable(&a, body.clone()).await;
    let (_, r2) = durable(&a, body).await;
    assert_eq!(r1["ids"], r2["ids"]);
    let (_, r3) = durable(
        &a,
        json!({"user": "u", "durable": true, "collapse_key": "c", "data": 2}),
    )
    .await;
    let got = messages(&mut laptop.ws, 2).await;
    assert_eq!(got[1]["replaces"], r1["ids"]["u"]);
    messages(&mut phone.ws, 2).await;
    let id = r3["ids"]["u"].as_str().unwrap_or("").to_string();
    send_text(
        &mut laptop.ws,
        &json!({"type": "ack", "id": "9999999999999-0"}).to_string(),
    )
    .await;
    assert_eq!(next_of(&mut phone.ws, "read").await["id"], id.as_str());
    let (status, _) = a.api_delete(&format!("/api/inbox/u/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(next_of(&mut phone.ws, "retract").await["id"], id.as_str());
    let (_, inbox) = a.api_get("/api/inbox/u").await;
    assert_eq!(inbox["cursor"], id.as_str());
    assert_eq!(inbox["unread"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_other_inbox_settings_on_one_redis_are_reported() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "cf", "a")).await;
    a.wait_ready().await;
    assert_eq!(a.metric("herald_function_conflicts_total").await, 0.0);
    let b = Herald::spawn(NodeOpts::cluster(&redis, "cf", "b").arg("--inbox-max-len", "7")).await;
    b.wait_ready().await;
    eventually(WAIT, "b reports the library a loaded", || async {
        (b.metric("herald_function_conflicts_total").await >= 1.0).then_some(())
    })
    .await;
    let config: Vec<redis::Value> = redis.cmd(&["FCALL", "herald_config", "0"]).unwrap();
    assert_eq!(
        config[2],
        redis::Value::Int(7),
        "the last loader's settings are in force"
    );
}
