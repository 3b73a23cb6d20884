//! Multi-node delivery through a real redis-server: user, broadcast and topic channels,
//! from the HTTP API and from raw Redis PUBLISH.

use std::time::Duration;

use crate::support::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_message_published_on_one_node_reaches_sessions_on_every_node() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "t1", "a")).await;
    let b = Herald::spawn(NodeOpts::cluster(&redis, "t1", "b")).await;
    a.wait_ready().await;
    b.wait_ready().await;

    let mut on_a = connect(&a, "42", &[]).await;
    let mut on_b = connect(&b, "42", &[]).await;
    let mut other = connect(&b, "7", &[]).await;
    assert_eq!(on_a.welcome["user"], "42");
    assert_eq!(on_b.welcome["node"], "b");

    a.publish(json!({"user": "42", "data": {"export": "ready"}}))
        .await;
    for c in [&mut on_a, &mut on_b] {
        let m = recv_message(&mut c.ws, WAIT).await.expect("message");
        assert_eq!(
            m,
            json!({"type":"message","channel":"user:42","data":{"export":"ready"}})
        );
    }
    // Raw Redis publish, the producer contract, with a non-JSON payload.
    assert!(redis.publish("t1:user:{42}", b"plain text") >= 2);
    for c in [&mut on_a, &mut on_b] {
        let m = recv_message(&mut c.ws, WAIT).await.expect("message");
        assert_eq!(m["data"], "plain text");
    }
    assert_silent(&mut other.ws, Duration::from_millis(300)).await;
}

async fn ready_nodes(redis: &RedisServer, prefix: &str, ids: &[&str], ttl: &str) -> Vec<Herald> {
    let mut nodes = Vec::new();
    for id in ids {
        let mut o = NodeOpts::cluster(redis, prefix, id);
        o.presence_ttl = ttl.to_string();
        nodes.push(Herald::spawn(o).await);
    }
    for n in &nodes {
        n.wait_ready().await;
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_every_session_on_three_nodes() {
    let redis = RedisServer::start();
    let nodes = ready_nodes(&redis, "cl-bc", &["a", "b", "c"], "3").await;
    let mut clients = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        clients.push(connect(n, &format!("u{i}"), &[]).await);
        clients.push(connect(n, "shared", &[]).await);
    }
    let (status, body) = nodes[1]
        .api_post(
            "/api/publish",
            &json!({"broadcast": true, "data": {"maintenance": "at 5"}}),
        )
        .await;
    assert_eq!((status, body), (200, json!({"ok": true, "channels": 1})));
    for c in clients.iter_mut() {
        let m = recv_message(&mut c.ws, WAIT).await.expect("broadcast");
        assert_eq!(
            m,
            json!({"type":"message","channel":"broadcast","data":{"maintenance":"at 5"}})
        );
    }
    // Exactly once each.
    for c in clients.iter_mut() {
        assert_silent(&mut c.ws, Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_messages_reach_only_sessions_that_joined_the_topic() {
    let redis = RedisServer::start();
    let nodes = ready_nodes(&redis, "cl-topic", &["a", "b"], "3").await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut news_a = connect(a, "1", &["news"]).await;
    let mut news_b = connect(b, "2", &["sports", "news"]).await;
    let mut sports_a = connect(a, "3", &["sports"]).await;
    let mut none_b = connect(b, "1", &[]).await;

    a.publish(json!({"topic": "news", "data": "headline"}))
        .await;
    for c in [&mut news_a, &mut news_b] {
        let m = recv_message(&mut c.ws, WAIT).await.expect("topic message");
        assert_eq!(
            m,
            json!({"type":"message","channel":"topic:news","data":"headline"})
        );
    }
    b.publish(json!({"topic": "sports", "data": "score"})).await;
    for c in [&mut news_b, &mut sports_a] {
        let m = recv_message(&mut c.ws, WAIT).await.expect("topic message");
        assert_eq!(m["channel"], "topic:sports");
        assert_eq!(m["data"], "score");
    }
    // User 1's topic-less session on b got neither, and news_a got no sports.
    assert_silent(&mut none_b.ws, Duration::from_millis(300)).await;
    assert_silent(&mut news_a.ws, Duration::from_millis(100)).await;
    assert_silent(&mut sports_a.ws, Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_list_publish_reaches_each_listed_user_on_every_node() {
    let redis = RedisServer::start();
    let nodes = ready_nodes(&redis, "cl-users", &["a", "b"], "3").await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut one_a = connect(a, "1", &[]).await;
    let mut one_b = connect(b, "1", &[]).await;
    let mut two_b = connect(b, "2", &[]).await;
    let mut three_a = connect(a, "3", &[]).await;

    let (status, body) = b
        .api_post(
            "/api/publish",
            &json!({"users": ["1", "2", "nobody"], "data": [1, 2]}),
        )
        .await;
    assert_eq!((status, body), (200, json!({"ok": true, "channels": 3})));
    for (c, user) in [(&mut one_a, "1"), (&mut one_b, "1"), (&mut two_b, "2")] {
        let m = recv_message(&mut c.ws, WAIT).await.expect("message");
        assert_eq!(
            m,
            json!({"type":"message","channel":format!("user:{user}"),"data":[1,2]})
        );
    }
    assert_silent(&mut three_a.ws, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_redis_publish_to_topic_and_broadcast_channels_is_delivered() {
    let redis = RedisServer::start();
    let nodes = ready_nodes(&redis, "cl-raw", &["a", "b"], "3").await;
    let mut on_a = connect(&nodes[0], "1", &["alerts"]).await;
    let mut on_b = connect(&nodes[1], "2", &["alerts"]).await;
    let mut other = connect(&nodes[1], "3", &[]).await;

    assert_eq!(
        redis.publish("cl-raw:topic:{alerts}", br#"{"level":"high"}"#),
        2,
        "both nodes subscribe to the topic"
    );
    for c in [&mut on_a, &mut on_b] {
        let m = recv_message(&mut c.ws, WAIT).await.expect("topic message");
        assert_eq!(
            m,
            json!({"type":"message","channel":"topic:alerts","data":{"level":"high"}})
        );
    }
    assert_silent(&mut other.ws, Duration::from_millis(300)).await;

    assert_eq!(redis.publish("cl-raw:broadcast", b"hello all"), 2);
    for c in [&mut on_a, &mut on_b, &mut other] {
        let m = recv_message(&mut c.ws, WAIT).await.expect("broadcast");
        assert_eq!(
            m,
            json!({"type":"message","channel":"broadcast","data":"hello all"})
        );
    }
    // Another prefix is another cluster.
    redis.publish("other:broadcast", b"not for us");
    assert_silent(&mut on_a.ws, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_stats_of_one_node_are_visible_from_another_and_drop_at_close() {
    let redis = RedisServer::start();
    // A long TTL: anything that disappears quickly was removed, not expired.
    let nodes = ready_nodes(&redis, "cl-pres", &["a", "b"], "30").await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let first = connect(a, "42", &[]).await;
    let second = connect(a, "42", &[]).await;
    let _other = connect(a, "7", &[]).await;

    b.wait_presence_nodes("42", &["a", "a"]).await;
    let (status, body) = b.api_get("/api/presence/42").await;
    assert_eq!(status, 200);
    assert_eq!(body["user"], "42");
    assert_eq!(body["online"], true);
    let mut ids: Vec<&str> = body["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| s["session"].as_str().expect("session id"))
        .collect();
    ids.sort();
    let mut want = vec![
        first.welcome["session"].as_str().expect("welcome session"),
        second.welcome["session"].as_str().expect("welcome session"),
    ];
    want.sort();
    assert_eq!(
        ids, want,
        "presence lists the sessions the clients were told"
    );
    for s in body["sessions"].as_array().expect("sessions") {
        let at = s["connected_at"].as_u64().expect("connected_at in ms");
        assert!(at > 1_600_000_000_000 && at <= now_secs() * 1000 + 1000);
    }

    let stats = eventually(WAIT, "stats from b count a's sessions", || async {
        let s = b.stats().await;
        (s["connections"] == 3).then_some(s)
    })
    .await;
    assert_eq!(stats["users"], 2);
    assert_eq!(
        stats["nodes"],
        json!([
            {"node": "a", "connections": 3, "users": 2},
            {"node": "b", "connections": 0, "users": 0}
        ])
    );

    let closed_at = std::time::Instant::now();
    close_client(first.ws).await;
    b.wait_presence_nodes("42", &["a"]).await;
    close_client(second.ws).await;
    eventually(WAIT, "user 42 offline", || async {
        (!b.online("42").await).then_some(())
    })
    .await;
    assert!(
        closed_at.elapsed() < Duration::from_secs(10),
        "presence dropped at close, not at the 30 s TTL"
    );
    assert!(b.online("7").await);
    let stats = eventually(WAIT, "stats after the closes", || async {
        let s = b.stats().await;
        (s["connections"] == 1).then_some(s)
    })
    .await;
    assert_eq!(stats["users"], 1);
    assert_eq!(
        redis.session_fields("cl-pres:presence:{42}"),
        0,
        "no session of user 42 left in Redis"
    );
    // The key itself holds the pending offline until the grace window is over, then goes.
    eventually(WAIT, "no presence key left for user 42", || async {
        (!redis
            .keys("cl-pres")
            .contains(&"cl-pres:presence:{42}".to_string()))
        .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_api_closes_the_users_sessions_on_every_node_with_4002() {
    let redis = RedisServer::start();
    let nodes = ready_nodes(&redis, "cl-kick", &["a", "b"], "3").await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut kick_a = connect(a, "bad", &[]).await;
    let mut kick_b = connect(b, "bad", &[]).await;
    let mut keep_a = connect(a, "good", &[]).await;
    let mut keep_b = connect(b, "good", &[]).await;

    let (status, body) = a.api_post("/api/disconnect/bad", &json!({})).await;
    assert_eq!((status, body), (200, json!({"ok": true})));
    assert_eq!(expect_close(&mut kick_a.ws, WAIT).await, Ended::Close(4002));
    assert_eq!(expect_close(&mut kick_b.ws, WAIT).await, Ended::Close(4002));
    eventually(WAIT, "kicked user offline", || async {
        (!b.online("bad").await).then_some(())
    })
    .await;

    a.publish(json!({"user": "good", "data": "still connected"}))
        .await;
    for c in [&mut keep_a, &mut keep_b] {
        let m = recv_message(&mut c.ws, WAIT).await.expect("message");
        assert_eq!(m["data"], "still connected");
    }
    b.wait_presence_nodes("good", &["a", "b"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_redis_payload_is_dropped_and_counted_and_the_next_is_delivered() {
    let redis = RedisServer::start();
    let mut o = NodeOpts::cluster(&redis, "cl-over", "a");
    o = o.arg("--max-message-bytes", "1024");
    let a = Herald::spawn(o).await;
    a.wait_ready().await;
    let mut c = connect(&a, "1", &[]).await;
    assert_eq!(
        a.metric("herald_messages_dropped_total{reason=\"oversize\"}")
            .await,
        0.0
    );

    let big = format!("\"{}\"", "x".repeat(2000));
    assert_eq!(redis.publish("cl-over:user:{1}", big.as_bytes()), 1);
    eventually(WAIT, "oversize drop counted", || async {
        (a.metric("herald_messages_dropped_total{reason=\"oversize\"}")
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    // At the limit exactly is delivered; it must be the first message the client sees.
    let fits = format!("\"{}\"", "y".repeat(1022));
    assert_eq!(fits.len(), 1024);
    assert_eq!(redis.publish("cl-over:user:{1}", fits.as_bytes()), 1);
    let m = recv_message(&mut c.ws, WAIT).await.expect("message");
    assert_eq!(m["data"], "y".repeat(1022));
    assert_silent(&mut c.ws, Duration::from_millis(200)).await;
    assert_eq!(
        a.metric("herald_messages_dropped_total{reason=\"oversize\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_subscribes_to_a_user_channel_only_while_it_holds_a_session_of_that_user() {
    let redis = RedisServer::start();
    let nodes = ready_nodes(&redis, "cl-sub", &["a", "b"], "3").await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let chan = "cl-sub:user:{9}";
    let subscribers = |want: i64| {
        let redis = &redis;
        async move {
            eventually(
                WAIT,
                &format!("{want} node(s) subscribed to {chan}"),
                || async { (redis.numsub(chan) == want).then_some(()) },
            )
            .await;
        }
    };
    assert!(redis.pubsub_channels("cl-sub:user:*").is_empty());
    assert_eq!(redis.numsub(chan), 0);

    let first_a = connect(a, "9", &["t9"]).await;
    // The welcome is sent once the subscription is confirmed.
    assert_eq!(redis.numsub(chan), 1, "subscribed before the welcome");
    let second_a = connect(a, "9", &[]).await;
    let on_b = connect(b, "9", &[]).await;
    assert_eq!(redis.numsub(chan), 2, "one subscription per node");
    assert_eq!(
        redis.pubsub_channels("cl-sub:user:*"),
        vec![chan.to_string()]
    );
    assert_eq!(redis.numsub("cl-sub:topic:{t9}"), 1);

    close_client(first_a.ws).await;
    // Still one session of user 9 on a: a stays subscribed. Give a wrong unsubscribe a
    // chance to show before checking.
    eventually(WAIT, "topic t9 unsubscribed", || async {
        (redis.numsub("cl-sub:topic:{t9}") == 0).then_some(())
    })
    .await;
    assert_eq!(redis.numsub(chan), 2);
    close_client(on_b.ws).await;
    subscribers(1).await;
    close_client(second_a.ws).await;
    subscribers(0).await;
    assert!(redis.pubsub_channels("cl-sub:user:*").is_empty());
    // Static channels stay.
    assert_eq!(redis.numsub("cl-sub:broadcast"), 2);
    assert_eq!(redis.numsub("cl-sub:ctl"), 2);
}
