//! The SSE transport: the same sessions as WebSocket over `text/event-stream` (welcome,
//! live and durable messages with their id, replay from `Last-Event-ID`), acks over HTTP
//! with the user's own token, and the same slow-consumer, drain and token-expiry rules.

use std::time::Duration;

use crate::support::*;
use serde_json::json;

async fn node(redis: &RedisServer, prefix: &str, extra: &[(&str, &str)]) -> Herald {
    let mut opts = NodeOpts::cluster(redis, prefix, "a");
    for (k, v) in extra {
        opts = opts.arg(k, v);
    }
    let n = Herald::spawn(opts).await;
    n.wait_ready().await;
    n
}

async fn durable(n: &Herald, user: &str, data: serde_json::Value) -> String {
    let (status, body) = n
        .api_post(
            "/api/publish",
            &json!({"user": user, "durable": true, "data": data}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["ids"][user].as_str().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_session_gets_live_messages_and_replays_from_last_event_id() {
    let redis = RedisServer::start();
    let n = node(&redis, "sse", &[]).await;
    let t = token("u", &["news"]);
    let mut s = Sse::open(&n, &format!("/sse?token={t}"), &[]).await;
    assert_eq!(s.status, 200, "{}", s.head);
    assert!(
        s.head.contains("content-type: text/event-stream"),
        "{}",
        s.head
    );
    let retry = s.next(WAIT).await.expect("retry advice");
    assert_eq!(retry.retry, Some(3000));
    let welcome = s.next_named("welcome").await.expect("welcome");
    assert_eq!(welcome.json()["user"], "u");
    assert!(welcome.json()["exp"].is_u64());
    eventually(WAIT, "counted in presence", || async {
        (n.presence_sessions("u").await.len() == 1).then_some(())
    })
    .await;

    let first = durable(&n, "u", json!({"n": 1})).await;
    let m = s.next_named("message").await.expect("durable");
    assert_eq!(
        m.id.as_deref(),
        Some(first.as_str()),
        "the inbox id is the event id"
    );
    assert_eq!(m.json()["data"], json!({"n": 1}));
    n.publish(json!({"topic": "news", "data": "plain"})).await;
    let m = s.next_named("message").await.expect("topic");
    assert_eq!(
        (m.id.clone(), m.json()["channel"].clone()),
        (None, json!("topic:news"))
    );
    drop(s);
    eventually(WAIT, "gone from presence", || async {
        n.presence_sessions("u").await.is_empty().then_some(())
    })
    .await;

    // While away, two more; the browser reconnects with Last-Event-ID.
    let second = durable(&n, "u", json!({"n": 2})).await;
    let third = durable(&n, "u", json!({"n": 3})).await;
    let mut s = Sse::open(
        &n,
        &format!("/sse?token={t}"),
        &[&format!("Last-Event-ID: {first}")],
    )
    .await;
    s.next_named("welcome").await.expect("welcome");
    let a = s.next_named("message").await.expect("replayed");
    let b = s.next_named("message").await.expect("replayed");
    assert_eq!(
        (a.id.as_deref(), b.id.as_deref()),
        (Some(second.as_str()), Some(third.as_str()))
    );
    // The header wins over a `since` in the URL, as the browser's reconnect needs.
    let mut s = Sse::open(
        &n,
        &format!("/sse?token={t}&since={first}"),
        &[&format!("Last-Event-ID: {second}")],
    )
    .await;
    s.next_named("welcome").await.expect("welcome");
    assert_eq!(
        s.next_named("message")
            .await
            .expect("replayed")
            .id
            .as_deref(),
        Some(third.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_sse_connects_are_json_errors() {
    let redis = RedisServer::start();
    let n = node(&redis, "ssex", &[]).await;
    let s = Sse::open(&n, "/sse?token=garbage", &[]).await;
    assert_eq!(s.status, 401, "{}", s.head);
    let t = token("u", &[]);
    let s = Sse::open(&n, &format!("/sse?token={t}"), &["Last-Event-ID: nope"]).await;
    assert_eq!(s.status, 400, "{}", s.head);
    let s = Sse::open(&n, "/sse", &[&format!("Authorization: Bearer {t}")]).await;
    assert_eq!(s.status, 200, "a bearer header works too: {}", s.head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_acks_go_over_http_with_the_users_own_token_and_tell_the_other_sessions() {
    let redis = RedisServer::start();
    let n = node(&redis, "sack", &[]).await;
    let id = durable(&n, "u", json!(1)).await;
    let t = token("u", &[]);
    let mut s = Sse::open(&n, &format!("/sse?token={t}"), &[]).await;
    let session = s.next_named("welcome").await.expect("welcome").json()["session"]
        .as_str()
        .expect("session")
        .to_string();
    s.next_named("message").await.expect("replay");
    let mut ws = connect(&n, "u", &[]).await;

    let ack = |token: String, body: serde_json::Value| {
        let http = n.http.clone();
        let url = n.url("/ack");
        async move {
            let r = http
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .expect("ack");
            let status = r.status().as_u16();
            (
                status,
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    let (status, body) = ack(t.clone(), json!({"id": id, "session": session})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["moved"].clone(), body["cursor"].clone()),
        (json!(true), json!(id))
    );
    // The WebSocket session hears of it; the SSE session that read it does not.
    loop {
        let v = recv_json(&mut ws.ws, WAIT).await.expect("read frame");
        if v["type"] == "read" {
            assert_eq!(v["id"], id.as_str());
            break;
        }
    }
    let quiet = s.next(Duration::from_millis(500)).await;
    assert!(
        quiet.as_ref().is_none_or(|e| e.event != "read"),
        "{quiet:?}"
    );

    let (status, _) = ack("not-a-token".into(), json!({"id": id})).await;
    assert_eq!(status, 401);
    let (status, _) = ack(t.clone(), json!({"id": "x"})).await;
    assert_eq!(status, 400);
    let (status, _) = ack(t, json!({"nope": 1})).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sse_client_is_cut_as_a_slow_consumer() {
    let redis = RedisServer::start();
    let n = node(
        &redis,
        "sslow",
        &[("--outbox-messages", "16"), ("--tcp-send-buffer", "4096")],
    )
    .await;
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = sock
        .connect(format!("127.0.0.1:{}", n.port).parse().expect("addr"))
        .await
        .expect("connect");
    let t = token("slow", &[]);
    let mut s = Sse::open_on(stream, n.port, &format!("/sse?token={t}"), &[]).await;
    s.next_named("welcome").await.expect("welcome");
    // It never reads again; a flood fills its buffers and then its outbox.
    let pad = "x".repeat(4000);
    for _ in 0..400 {
        redis.publish("sslow:user:{slow}", pad.as_bytes());
        if n.metric("herald_sessions_closed_total{reason=\"slow_consumer\"}")
            .await
            >= 1.0
        {
            break;
        }
    }
    eventually(WAIT, "cut as a slow consumer", || async {
        (n.metric("herald_sessions_closed_total{reason=\"slow_consumer\"}")
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
    eventually(WAIT, "its presence removed", || async {
        n.presence_sessions("slow").await.is_empty().then_some(())
    })
    .await;
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_token_expiry_end_sse_streams_with_their_close_codes() {
    let redis = RedisServer::start();
    let mut n = node(&redis, "sdrain", &[("--token-grace", "0")]).await;
    let exp = now_secs() + 2;
    let short = token_with(&json!({"sub": "x", "exp": exp}), JWT_SECRET);
    let mut expiring = Sse::open(&n, &format!("/sse?token={short}"), &[]).await;
    expiring.next_named("welcome").await.expect("welcome");
    let close = expiring
        .next_named("close")
        .await
        .expect("close event at expiry");
    assert_eq!(
        close.json(),
        json!({"type": "close", "code": 4003, "reason": "token_expired"})
    );
    assert!(
        expiring.next(WAIT).await.is_none(),
        "the stream ends after the close event"
    );

    let t = token("d", &[]);
    let mut s = Sse::open(&n, &format!("/sse?token={t}"), &[]).await;
    s.next_named("welcome").await.expect("welcome");
    n.signal("TERM");
    let close = s.next_named("close").await.expect("close event on drain");
    assert_eq!(
        close.json(),
        json!({"type": "close", "code": 1012, "reason": "draining"})
    );
    let status = n.wait_exit(WAIT).await.expect("exits");
    assert!(status.success());
}
