//! The producer HTTP API: authentication, input validation, size limits, error bodies, and
//! the operational endpoints.

use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

async fn node(redis: &RedisServer, prefix: &str, extra: &[(&str, &str)]) -> Herald {
    let mut o = NodeOpts::cluster(redis, prefix, "n1");
    for (k, v) in extra {
        o = o.arg(k, v);
    }
    let h = Herald::spawn(o).await;
    h.wait_ready().await;
    h
}

/// Sends a request with an optional raw Authorization header; returns (status, JSON body).
async fn call(
    n: &Herald,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut req = match method {
        "GET" => n.http.get(n.url(path)),
        "POST" => n.http.post(n.url(path)),
        other => panic!("method {other}"),
    };
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_needs_the_bearer_api_key() {
    let redis = RedisServer::start();
    let n = node(&redis, "api-auth", &[]).await;
    let mut c = connect(&n, "1", &[]).await;
    let publish = r#"{"user":"1","data":"secret"}"#;
    let routes = [
        ("POST", "/api/publish", Some(publish)),
        ("GET", "/api/presence/1", None),
        ("GET", "/api/stats", None),
        ("POST", "/api/disconnect/1", None),
    ];
    let wrong = [
        None,
        Some("Bearer wrong-key-0123456789".to_string()),
        Some(API_KEY.to_string()),
        Some(format!("Basic {API_KEY}")),
        Some(format!("Bearer {API_KEY}x")),
        Some(format!("Bearer {}", &API_KEY[..API_KEY.len() - 1])),
        Some("Bearer ".to_string()),
    ];
    for (method, path, body) in routes {
        for auth in &wrong {
            let (status, resp) = call(&n, method, path, auth.as_deref(), body).await;
            assert_eq!(status, 401, "{method} {path} with {auth:?}: {resp}");
            assert_eq!(resp["error"], "unauthorized");
            assert!(resp["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }
    // None of that published or kicked anything.
    assert_silent(&mut c.ws, Duration::from_millis(300)).await;
    assert!(n.online("1").await);

    let bearer = format!("Bearer {API_KEY}");
    let (status, resp) = call(&n, "POST", "/api/publish", Some(&bearer), Some(publish)).await;
    assert_eq!((status, resp), (200, json!({"ok": true, "channels": 1})));
    let m = recv_message(&mut c.ws, WAIT).await.expect("message");
    assert_eq!(m["data"], "secret");
    for (method, path) in [("GET", "/api/presence/1"), ("GET", "/api/stats")] {
        let (status, resp) = call(&n, method, path, Some(&bearer), None).await;
        assert_eq!(status, 200, "{method} {path}: {resp}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_publish_bodies_get_400_with_a_json_error_and_deliver_nothing() {
    let redis = RedisServer::start();
    let n = node(&redis, "api-bad", &[]).await;
    let mut c = connect(&n, "1", &["t"]).await;
    let long_user = "u".repeat(257);
    let bodies = [
        ("malformed JSON", "{\"user\": \"1\", \"data\": ".to_string()),
        ("not an object", "[1,2,3]".to_string()),
        ("no target", r#"{"data":1}"#.to_string()),
        (
            "user and topic",
            r#"{"user":"1","topic":"t","data":1}"#.to_string(),
        ),
        (
            "users and broadcast",
            r#"{"users":["1"],"broadcast":true,"data":1}"#.to_string(),
        ),
        (
            "user with a space",
            r#"{"user":"a b","data":1}"#.to_string(),
        ),
        ("empty user", r#"{"user":"","data":1}"#.to_string()),
        (
            "user too long",
            format!(r#"{{"user":"{long_user}","data":1}}"#),
        ),
        ("user not a string", r#"{"user":1,"data":1}"#.to_string()),
        ("empty users list", r#"{"users":[],"data":1}"#.to_string()),
        (
            "a bad id in users",
            r#"{"users":["1","x\ny"],"data":1}"#.to_string(),
        ),
        (
            "topic with a tab",
            r#"{"topic":"a\tb","data":1}"#.to_string(),
        ),
        (
            "broadcast false",
            r#"{"broadcast":false,"data":1}"#.to_string(),
        ),
        ("missing data", r#"{"user":"1"}"#.to_string()),
        (
            "unknown field",
            r#"{"user":"1","data":1,"priority":9}"#.to_string(),
        ),
    ];
    let bearer = format!("Bearer {API_KEY}");
    for (what, body) in &bodies {
        let (status, resp) = call(&n, "POST", "/api/publish", Some(&bearer), Some(body)).await;
        assert_eq!(status, 400, "{what}: {resp}");
        assert_eq!(resp["error"], "bad_request", "{what}: {resp}");
        assert!(
            resp["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what} has a message: {resp}"
        );
    }
    assert_silent(&mut c.ws, Duration::from_millis(300)).await;

    // Bad user ids in paths too.
    for path in [
        "/api/presence/a%20b",
        "/api/presence/%FF",
        "/api/disconnect/a%0Ab",
    ] {
        let method = if path.contains("disconnect") {
            "POST"
        } else {
            "GET"
        };
        let (status, resp) = call(&n, method, path, Some(&bearer), None).await;
        assert_eq!(status, 400, "{path}: {resp}");
        assert_eq!(resp["error"], "bad_request");
    }
    assert!(n.online("1").await);
}

/// Writes `request` (headers only) on a fresh connection and returns the response head.
async fn raw_request_head(n: &Herald, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", n.port))
        .await
        .expect("tcp connect");
    s.write_all(request.as_bytes()).await.expect("send head");
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 1024];
        let got = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read response");
        assert!(got > 0, "closed without a response: {buf:?}");
        buf.extend_from_slice(&chunk[..got]);
    }
    String::from_utf8_lossy(&buf).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_larger_than_max_message_bytes_is_refused_with_413() {
    let redis = RedisServer::start();
    let n = node(&redis, "api-413", &[("--max-message-bytes", "1024")]).await;
    let mut c = connect(&n, "1", &[]).await;

    // "data" is measured as its JSON text: a string of 1023 characters is 1025 bytes.
    let (status, resp) = n
        .api_post(
            "/api/publish",
            &json!({"user": "1", "data": "x".repeat(1023)}),
        )
        .await;
    assert_eq!(status, 413, "{resp}");
    assert_eq!(resp["error"], "too_large");
    // A body far beyond the limit is refused from its Content-Length alone: the answer
    // comes before a single body byte is sent. (Sending the body too races the server's
    // early close against the client's write.)
    let head = raw_request_head(
        &n,
        &format!(
            "POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            3 << 20
        ),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert_silent(&mut c.ws, Duration::from_millis(300)).await;

    let (status, resp) = n
        .api_post(
            "/api/publish",
            &json!({"user": "1", "data": "y".repeat(1022)}),
        )
        .await;
    assert_eq!(status, 200, "exactly at the limit: {resp}");
    let m = recv_message(&mut c.ws, WAIT).await.expect("message");
    assert_eq!(m["data"], "y".repeat(1022));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_get_a_404_json_error() {
    let redis = RedisServer::start();
    let n = node(&redis, "api-404", &[]).await;
    let bearer = format!("Bearer {API_KEY}");
    for (method, path, auth) in [
        ("GET", "/nope", None),
        ("GET", "/api/unknown", Some(bearer.as_str())),
        ("POST", "/api/publish/extra", Some(bearer.as_str())),
        ("GET", "/api/presence", Some(bearer.as_str())),
    ] {
        let (status, resp) = call(&n, method, path, auth, None).await;
        assert_eq!(status, 404, "{method} {path}: {resp}");
        assert_eq!(resp["error"], "not_found", "{method} {path}: {resp}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_of_an_unknown_user_is_offline_and_ids_are_percent_decoded() {
    let redis = RedisServer::start();
    let n = node(&redis, "api-pres", &[]).await;
    let (status, body) = n.api_get("/api/presence/ghost").await;
    assert_eq!(
        (status, body),
        (
            200,
            json!({"user": "ghost", "online": false, "sessions": []})
        )
    );

    let c = connect(&n, "mail:a@b.example", &[]).await;
    let (status, body) = n.api_get("/api/presence/mail%3Aa%40b.example").await;
    assert_eq!(status, 200);
    assert_eq!(body["user"], "mail:a@b.example");
    assert_eq!(body["online"], true);
    assert_eq!(
        body["sessions"][0]["session"], c.welcome["session"],
        "{body}"
    );
    assert_eq!(body["sessions"][0]["node"], "n1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_endpoints_report_the_node() {
    let redis = RedisServer::start();
    let n = node(&redis, "api-ops", &[]).await;
    let r = n.http.get(n.url("/healthz")).send().await.expect("healthz");
    assert_eq!(r.status().as_u16(), 200);
    let (status, body) = n.readyz().await;
    assert_eq!(
        (status, body),
        (
            200,
            json!({"ready": true, "redis": true, "pubsub": true, "draining": false, "full": false})
        )
    );

    let mut c = connect(&n, "1", &[]).await;
    n.publish(json!({"user": "1", "data": 1})).await;
    recv_message(&mut c.ws, WAIT).await.expect("message");
    eventually(WAIT, "metrics reflect the session and message", || async {
        let ok = n.metric("herald_ready").await == 1.0
            && n.metric("herald_pubsub_connected").await == 1.0
            && n.metric("herald_connections").await == 1.0
            && n.metric("herald_sessions_opened_total").await == 1.0
            && n.metric("herald_messages_out_total").await >= 1.0
            && n.metric("herald_api_requests_total").await >= 1.0;
        ok.then_some(())
    })
    .await;
    let text = n
        .http
        .get(n.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        prom::has(&text, "herald_messages_in_total{source=\"redis\"}"),
        "{text}"
    );
}
