//! What one WebSocket client sees: authentication at the upgrade, the client frames herald
//! understands, the close codes for misbehaving clients (oversize, binary, slow, idle), and
//! the connection limit.

use std::time::{Duration, Instant};

use crate::support::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

async fn node(
    redis: &RedisServer,
    prefix: &str,
    opts: impl FnOnce(NodeOpts) -> NodeOpts,
) -> Herald {
    let h = Herald::spawn(opts(NodeOpts::cluster(redis, prefix, "n1"))).await;
    h.wait_ready().await;
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_401_before_the_upgrade() {
    let redis = RedisServer::start();
    let n = node(&redis, "cl-auth", |o| o).await;
    let now = now_secs();
    let expired = token_with(&json!({"sub": "42", "exp": now - 3600}), JWT_SECRET);
    let wrong_secret = token_with(
        &json!({"sub": "42", "exp": now + 3600}),
        "some-other-secret-0123456789",
    );
    let no_exp = token_with(&json!({"sub": "42"}), JWT_SECRET);
    let no_sub = token_with(&json!({"exp": now + 3600}), JWT_SECRET);
    let bad_sub = token_with(&json!({"sub": "a b", "exp": now + 3600}), JWT_SECRET);

    assert_eq!(refused_status(&n.ws_url("")).await, 401, "no token at all");
    assert_eq!(
        refused_status(&n.ws_url("?token=")).await,
        401,
        "empty token"
    );
    for (what, t) in [
        ("garbage", "not-a-jwt".to_string()),
        ("expired", expired.clone()),
        ("wrong secret", wrong_secret.clone()),
        ("no exp", no_exp.clone()),
        ("no sub", no_sub),
        ("invalid sub", bad_sub),
    ] {
        assert_eq!(
            refused_status(&n.ws_url(&format!("?token={t}"))).await,
            401,
            "{what} token in the query"
        );
    }
    for (what, t) in [
        ("garbage", "not-a-jwt".to_string()),
        ("expired", expired),
        ("wrong secret", wrong_secret),
        ("no exp", no_exp),
    ] {
        assert_eq!(
            refused_status_bearer(&n.ws_url(""), &t).await,
            401,
            "{what} token in the Authorization header"
        );
    }
    // Nothing was registered for any of them.
    assert!(!n.online("42").await);
    assert!(
        n.metric("herald_upgrades_rejected_total").await >= 12.0,
        "refused upgrades are counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_bearer_header_opens_a_session() {
    let redis = RedisServer::start();
    let n = node(&redis, "cl-bearer", |o| o).await;
    let mut ws = open_bearer(&n.ws_url(""), &token("bearer-user", &[]))
        .await
        .expect("upgrade with a valid bearer token");
    let welcome = recv_json(&mut ws, WAIT).await.expect("welcome");
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["user"], "bearer-user");
    assert_eq!(welcome["node"], "n1");
    assert!(
        welcome["session"].as_str().is_some_and(|s| !s.is_empty()),
        "welcome carries a session id: {welcome}"
    );
    n.publish(json!({"user": "bearer-user", "data": 1})).await;
    let m = recv_message(&mut ws, WAIT).await.expect("message");
    assert_eq!(m["data"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_upgrade_get_with_a_valid_token_is_400_and_without_a_token_401() {
    let redis = RedisServer::start();
    let n = node(&redis, "cl-plain", |o| o).await;
    let r = n
        .http
        .get(
            n.ws_url(&format!("?token={}", token("1", &[])))
                .replace("ws://", "http://"),
        )
        .send()
        .await
        .expect("plain GET /ws");
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = r.json().await.expect("JSON error body");
    assert_eq!(body["error"], "not_websocket");

    let r = n
        .http
        .get(n.url("/ws"))
        .send()
        .await
        .expect("plain GET /ws without token");
    assert_eq!(r.status().as_u16(), 401, "authentication is checked first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_gets_pong_and_heart_beat_gets_no_reply() {
    let redis = RedisServer::start();
    let n = node(&redis, "cl-ping", |o| o).await;
    let mut c = connect(&n, "1", &[]).await;
    send_text(&mut c.ws, r#"{"type":"ping"}"#).await;
    assert_eq!(
        recv_json(&mut c.ws, WAIT).await.expect("pong"),
        json!({"type": "pong"})
    );
    // Frames are answered in order: if HEART-BEAT got any reply it would come before the pong.
    send_text(&mut c.ws, "HEART-BEAT").await;
    send_text(&mut c.ws, r#"{"type":"ping"}"#).await;
    assert_eq!(
        recv_json(&mut c.ws, WAIT).await.expect("next frame"),
        json!({"type": "pong"}),
        "HEART-BEAT must not be answered"
    );
    eventually(WAIT, "heartbeat frame counted", || async {
        (n.metric("herald_client_frames_total{kind=\"heartbeat\"}")
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_text_gets_an_error_frame_and_the_session_stays_open() {
    let redis = RedisServer::start();
    let n = node(&redis, "cl-garbage", |o| o).await;
    let mut c = connect(&n, "1", &[]).await;
    send_text(&mut c.ws, "this is not json").await;
    assert_eq!(
        recv_json(&mut c.ws, WAIT).await.expect("error frame"),
        json!({"type": "error", "error": "malformed"})
    );
    send_text(&mut c.ws, r#"{"type":"subscribe","topic":"x"}"#).await;
    assert_eq!(
        recv_json(&mut c.ws, WAIT).await.expect("error frame"),
        json!({"type": "error", "error": "unknown_type"})
    );
    send_text(&mut c.ws, r#"{"type":"ping"}"#).await;
    assert_eq!(
        recv_json(&mut c.ws, WAIT).await.expect("pong"),
        json!({"type": "pong"})
    );
    n.publish(json!({"user": "1", "data": "still here"})).await;
    let m = recv_message(&mut c.ws, WAIT).await.expect("message");
    assert_eq!(m["data"], "still here");
    assert!(n.online("1").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_frame_larger_than_max_message_bytes_is_closed_with_1009() {
    let redis = RedisServer::start();
    let n = node(&redis, "cl-big", |o| o.arg("--max-message-bytes", "1024")).await;
    // At the limit is fine.
    let mut ok = connect(&n, "1", &[]).await;
    send_text(&mut ok.ws, &"x".repeat(1024)).await;
    assert_eq!(
        recv_json(&mut ok.ws, WAIT).await.expect("error frame"),
        json!({"type": "error", "error": "malformed"}),
        "a 1024-byte frame is read and answered"
    );
    // One byte over the limit is not.
    let mut big = connect(&n, "2", &[]).await;
    send_text(&mut big.ws, &"x".repeat(1025)).await;
    assert_eq!(expect_close(&mut big.ws, WAIT).await, Ended::Close(1009));
    eventually(WAIT, "presence of user 2 removed", || async {
        (!n.online("2").await).then_some(())
    })
    .await;
    assert!(n.online("1").await, "the other session is unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_frame_is_closed_with_1003() {
    let redis = RedisServer::start();
    let n = node(&redis, "cl-bin", |o| o).await;
    let mut c = connect(&n, "1", &[]).await;
    c.ws.send(Message::Binary(vec![1u8, 2, 3].into()))
        .await
        .expect("send binary");
    assert_eq!(expect_close(&mut c.ws, WAIT).await, Ended::Close(1003));
    eventually(WAIT, "presence of user 1 removed", || async {
        (!n.online("1").await).then_some(())
    })
    .await;
}

/// Floods `channel` until `metric` reaches 1 (or the deadline passes).
async fn flood_until_slow(redis: &RedisServer, n: &Herald, channel: &str) {
    let payload = format!("\"{}\"", "s".repeat(4000));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if n.metric("herald_slow_consumer_disconnects_total").await >= 1.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no slow-consumer disconnect after flooding for 60 s"
        );
        if redis.publish_many(channel, payload.as_bytes(), 100) == 0 {
            // Nobody subscribes any more: the session is gone; let the metric catch up.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Checks the end of a slow consumer: one disconnect counted, presence gone, and if the
/// close frame made it through the backed-up socket, it says 4001.
async fn assert_slow_consumer_ended(n: &Herald, mut slow: Client) {
    eventually(WAIT, "slow user's presence removed", || async {
        (!n.online("slow").await).then_some(())
    })
    .await;
    assert_eq!(
        n.metric("herald_slow_consumer_disconnects_total").await,
        1.0,
        "exactly one slow consumer was disconnected, and counted once"
    );
    assert_eq!(
        n.metric("herald_sessions_closed_total{reason=\"slow_consumer\"}")
            .await,
        1.0
    );
    // Reading now drains megabytes of queued frames; the close frame may have been cut.
    match expect_close(&mut slow.ws, Duration::from_secs(60)).await {
        Ended::Close(code) => assert_eq!(code, 4001, "close code of a slow consumer"),
        Ended::Dropped => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_disconnected_when_its_outbox_fills() {
    let redis = RedisServer::start();
    let n = node(&redis, "cl-slow", |o| {
        o.arg("--outbox-messages", "16")
            .arg("--outbox-bytes", "65536")
            .arg("--write-timeout", "60")
    })
    .await;
    let slow = connect_small_rcvbuf(&n, "slow").await;
    let mut fast = connect(&n, "fast", &[]).await;

    flood_until_slow(&redis, &n, "cl-slow:user:{slow}").await;
    n.publish(json!({"user": "fast", "data": "after the flood"}))
        .await;
    let m = recv_message(&mut fast.ws, WAIT).await.expect("message");
    assert_eq!(m["data"], "after the flood");
    assert_slow_consumer_ended(&n, slow).await;
    assert!(n.online("fast").await, "the reading client stays connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_socket_stays_blocked_past_write_timeout_is_disconnected() {
    let redis = RedisServer::start();
    // A huge outbox never fills: only the write timeout can catch this client.
    let n = node(&redis, "cl-wto", |o| {
        o.arg("--outbox-messages", "1000000")
            .arg("--outbox-bytes", "1000000000")
            .arg("--write-timeout", "1s")
    })
    .await;
    let slow = connect_small_rcvbuf(&n, "slow").await;
    let mut fast = connect(&n, "fast", &[]).await;

    flood_until_slow(&redis, &n, "cl-wto:user:{slow}").await;
    n.publish(json!({"user": "fast", "data": "after the flood"}))
        .await;
    let m = recv_message(&mut fast.ws, WAIT).await.expect("message");
    assert_eq!(m["data"], "after the flood");
    assert_slow_consumer_ended(&n, slow).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_metrics_show_a_slow_consumer_backing_up_and_draining() {
    let redis = RedisServer::start();
    // Neither limit nor the write timeout cuts this client: only the metrics show it.
    let n = node(&redis, "cl-obx", |o| {
        o.arg("--outbox-messages", "1000000")
            .arg("--outbox-bytes", "1000000000")
            .arg("--write-timeout", "120")
            .arg("--idle-timeout", "300")
    })
    .await;
    let mut slow = connect_small_rcvbuf(&n, "slow").await;
    // The sweeper publishes the backlog gauge once per rotation (at most a second), from
    // the start: zero while nothing is queued.
    eventually(WAIT, "herald_outbox_backlog_sessions exported", || async {
        prom::has(&n.metrics_text().await, "herald_outbox_backlog_sessions").then_some(())
    })
    .await;
    assert_eq!(n.metric("herald_outbox_backlog_sessions").await, 0.0);
    assert_eq!(n.metric("herald_outbox_wait_seconds_count").await, 0.0);

    // Flood the unread session until the sweeper sees its backlog (bounded: 40 MB at most).
    let payload = format!("\"{}\"", "q".repeat(4000));
    let mut published = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = n.metrics_text().await;
        if prom::sum(&text, "herald_outbox_backlog_sessions") >= 1.0
            && prom::sum(&text, "herald_outbox_queued_bytes_count") >= 1.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline && published < 10_000,
            "no backlog seen after {published} messages"
        );
        assert_eq!(
            redis.publish_many("cl-obx:user:{slow}", payload.as_bytes(), 50),
            50
        );
        published += 50;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sampled = n.metric("herald_outbox_queued_bytes_sum").await;
    assert!(sampled >= 4000.0, "queued bytes sampled: {sampled}");

    // The client reads everything: the frames that waited are recorded, the backlog goes.
    for i in 0..published {
        let m = recv_message(&mut slow.ws, Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("message {i} of {published}"));
        assert_eq!(m["data"].as_str().map(str::len), Some(4000));
    }
    let waited = eventually(
        WAIT,
        "frame waits recorded and the backlog gone",
        || async {
            let text = n.metrics_text().await;
            let count = prom::sum(&text, "herald_outbox_wait_seconds_count");
            (count >= 1.0 && prom::sum(&text, "herald_outbox_backlog_sessions") == 0.0)
                .then(|| (count, prom::sum(&text, "herald_outbox_wait_seconds_sum")))
        },
    )
    .await;
    assert!(
        waited.0 <= published as f64,
        "at most one wait per queued frame: {waited:?} for {published}"
    );
    assert!(waited.1 > 0.0, "queued frames waited: {waited:?}");
    assert_eq!(
        n.metric("herald_slow_consumer_disconnects_total").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_answers_pings_is_closed_after_idle_timeout() {
    let redis = RedisServer::start();
    let n = node(&redis, "cl-idle", |o| {
        o.arg("--ping-interval", "500ms")
            .arg("--idle-timeout", "1.5s")
    })
    .await;
    let mut raw = RawWs::connect(&n, &token("idle", &[])).await;
    let started = Instant::now();
    let mut pings = 0;
    let mut close = None;
    loop {
        match raw.next_frame(WAIT).await {
            Err(()) => panic!("idle session still open after {WAIT:?}"),
            Ok(None) => break,
            Ok(Some(RawFrame::Ping)) => pings += 1,
            Ok(Some(RawFrame::Close(code))) => close = Some(code),
            Ok(Some(RawFrame::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).expect("JSON text frame");
                assert_eq!(v["type"], "welcome", "unexpected text frame {t}");
            }
            Ok(Some(other)) => panic!("unexpected frame {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert!(pings >= 1, "the server pinged before giving up");
    assert_eq!(close, Some(Some(4000)), "close frame with code 4000");
    assert!(
        elapsed >= Duration::from_millis(1200),
        "closed after {elapsed:?}, before the idle timeout"
    );
    eventually(WAIT, "idle user's presence removed", || async {
        (!n.online("idle").await).then_some(())
    })
    .await;
    assert_eq!(
        n.metric("herald_sessions_closed_total{reason=\"idle_timeout\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heart_beat_text_keeps_a_session_that_never_answers_pings_alive() {
    let redis = RedisServer::start();
    let n = node(&redis, "cl-hb", |o| {
        o.arg("--ping-interval", "500ms")
            .arg("--idle-timeout", "1.5s")
    })
    .await;
    let mut raw = RawWs::connect(&n, &token("hb", &[])).await;
    match raw.next_frame(WAIT).await {
        Ok(Some(RawFrame::Text(t))) => assert!(t.contains("welcome"), "first frame: {t}"),
        other => panic!("expected the welcome, got {other:?}"),
    }
    // Three idle timeouts of HEART-BEAT every 300 ms, pings unanswered.
    let until = Instant::now() + Duration::from_millis(4500);
    let mut pings = 0;
    while Instant::now() < until {
        raw.send_text("HEART-BEAT").await;
        loop {
            match raw.next_frame(Duration::from_millis(300)).await {
                Err(()) => break,
                Ok(Some(RawFrame::Ping)) => pings += 1,
                Ok(other) => panic!("a session sending HEART-BEAT got {other:?}"),
            }
        }
    }
    assert!(pings >= 3, "the server kept pinging ({pings} pings)");
    assert!(n.online("hb").await, "still online after 3 idle timeouts");
    // Once the heartbeats stop, the idle timeout applies.
    let close = loop {
        match raw.next_frame(WAIT).await {
            Err(()) => panic!("not closed within {WAIT:?} after the heartbeats stopped"),
            Ok(None) => break None,
            Ok(Some(RawFrame::Close(code))) => break code,
            Ok(Some(RawFrame::Ping)) => {}
            Ok(Some(other)) => panic!("unexpected frame {other:?}"),
        }
    };
    assert_eq!(close, Some(4000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_beyond_max_connections_get_503_until_a_slot_frees() {
    let redis = RedisServer::start();
    let n = node(&redis, "cl-max", |o| o.arg("--max-connections", "2")).await;
    let first = connect(&n, "1", &[]).await;
    let _second = connect(&n, "2", &[]).await;
    let third_url = n.ws_url(&format!("?token={}", token("3", &[])));
    assert_eq!(refused_status(&third_url).await, 503);
    assert!(!n.online("3").await);

    close_client(first.ws).await;
    let mut third = eventually(WAIT, "a freed slot accepts a new upgrade", || async {
        open(&third_url).await.ok()
    })
    .await;
    let welcome = recv_json(&mut third, WAIT).await.expect("welcome");
    assert_eq!(welcome["user"], "3");
    assert_eq!(refused_status(&third_url).await, 503, "full again");
}
