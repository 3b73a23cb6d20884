//! Hostile and careless clients (issue 13): strict WebSocket handshakes, the per-user
//! session cap and the "full" signal, client-frame and acknowledgement rate limits, API key
//! scopes. Every test runs the real binary; counts and times are bounded.

use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` as raw bytes and returns the response head (status line and headers),
/// read until the blank line or until the server closes, with the connection.
async fn raw_exchange(port: u16, request: &str) -> (String, TcpStream) {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 2048];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!(
                "no response head in time; got {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    (String::from_utf8_lossy(&buf).to_lowercase(), stream)
}

async fn raw_head(port: u16, request: &str) -> String {
    raw_exchange(port, request).await.0
}

fn upgrade_request(port: u16, token: &str, headers: &str) -> String {
    format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\n{headers}\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_repeated_websocket_keys_and_wrong_versions_are_refused() {
    let n = Herald::spawn(NodeOpts::standalone("hs")).await;
    n.wait_ready().await;
    let t = token("hs-user", &[]);
    let good_key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let v13 = "Sec-WebSocket-Version: 13\r\n";

    // The well-formed handshake is accepted: the refusals below are about the one header.
    let (head, _session) = raw_exchange(
        n.port,
        &upgrade_request(n.port, &t, &format!("{v13}{good_key}")),
    )
    .await;
    assert!(head.starts_with("http/1.1 101"), "{head}");

    let cases: &[(&str, String, &str)] = &[
        ("no key", v13.to_string(), "400"),
        (
            "key not base64",
            format!("{v13}Sec-WebSocket-Key: not a key at all!!!!!!\r\n"),
            "400",
        ),
        // Valid base64, but of 15 bytes: not a 16-byte nonce.
        (
            "short nonce",
            format!("{v13}Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA\r\n"),
            "400",
        ),
        (
            "two keys",
            format!("{v13}{good_key}Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n"),
            "400",
        ),
        ("no version", good_key.to_string(), "400"),
        (
            "version 8",
            format!("Sec-WebSocket-Version: 8\r\n{good_key}"),
            "426",
        ),
        (
            "two versions",
            format!("{v13}Sec-WebSocket-Version: 8\r\n{good_key}"),
            "426",
        ),
    ];
    for (what, headers, status) in cases {
        let head = raw_head(n.port, &upgrade_request(n.port, &t, headers)).await;
        assert!(
            head.starts_with(&format!("http/1.1 {status}")),
            "{what}: expected {status}, got {head}"
        );
        // RFC 6455 4.2.2: a refused handshake names the version the server speaks.
        assert!(
            head.contains("sec-websocket-version: 13"),
            "{what}: no Sec-WebSocket-Version in {head}"
        );
    }
    assert!(
        n.metric(r#"herald_upgrades_rejected_total{reason="bad_key"}"#)
            .await
            >= 4.0,
        "key refusals are counted"
    );
    assert!(
        n.metric(r#"herald_upgrades_rejected_total{reason="bad_version"}"#)
            .await
            >= 3.0
    );
    assert_eq!(
        n.metric("herald_connections").await,
        1.0,
        "only the good one became a session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_take_more_than_its_share_of_a_node() {
    let n = Herald::spawn(
        NodeOpts::standalone("cap")
            .arg("--max-sessions-per-user", "3")
            .arg("--max-connections", "6"),
    )
    .await;
    n.wait_ready().await;

    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(connect(&n, "greedy", &[]).await);
    }
    let url = n.ws_url(&format!("?token={}", token("greedy", &[])));
    assert_eq!(refused_status(&url).await, 429, "a fourth WebSocket");
    let sse = Sse::open(&n, &format!("/sse?token={}", token("greedy", &[])), &[]).await;
    assert_eq!(sse.status, 429, "a fourth session over SSE: {}", sse.head);
    assert!(sse.head.contains("retry-after: 10"), "{}", sse.head);

    // Everyone else is unaffected.
    let other = connect(&n, "someone-else", &[]).await;
    assert_eq!(other.welcome["user"], "someone-else");

    // A slot given back can be used again.
    close_client(mine.pop().expect("a session").ws).await;
    eventually(WAIT, "greedy's third slot is free again", || {
        let url = url.clone();
        async move { open(&url).await.ok() }
    })
    .await;
    assert!(
        n.metric(r#"herald_upgrades_rejected_total{reason="too_many_sessions"}"#)
            .await
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_of_one_user_settle_exactly_at_the_cap() {
    let redis = RedisServer::start();
    let n = Herald::spawn(
        NodeOpts::cluster(&redis, "cap-race", "n1").arg("--max-sessions-per-user", "3"),
    )
    .await;
    n.wait_ready().await;
    let url = n.ws_url(&format!("?token={}", token("racer", &[])));
    // Twelve connects at once: some pass the API's check together; registration settles
    // the rest (429 before the upgrade, or close 4004 after it).
    let attempts = futures_util::future::join_all((0..12).map(|_| {
        let url = url.clone();
        async move {
            match open(&url).await {
                Ok(mut ws) => match recv_json(&mut ws, WAIT).await {
                    Some(f) if f["type"] == "welcome" => Some(ws),
                    _ => None,
                },
                Err(_) => None,
            }
        }
    }))
    .await;
    let live: Vec<Ws> = attempts.into_iter().flatten().collect();
    assert_eq!(live.len(), 3, "exactly the cap is welcomed");
    let sessions = eventually(WAIT, "presence lists exactly 3 sessions", || {
        let n = &n;
        async move {
            let s = n.presence_sessions("racer").await;
            (s.len() == 3).then_some(s)
        }
    })
    .await;
    assert_eq!(sessions.len(), 3);
    assert_eq!(n.metric("herald_connections").await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_says_so_on_readyz_and_recovers() {
    let n = Herald::spawn(NodeOpts::standalone("full").arg("--max-connections", "2")).await;
    n.wait_ready().await;
    let (status, body) = n.readyz().await;
    assert_eq!((status, body["full"].as_bool()), (200, Some(false)));
    let a = connect(&n, "a", &[]).await;
    let _b = connect(&n, "b", &[]).await;
    let (status, body) = n.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["full"], true);
    assert_eq!(body["ready"], false);
    assert_eq!(
        refused_status(&n.ws_url(&format!("?token={}", token("c", &[])))).await,
        503
    );
    close_client(a.ws).await;
    eventually(WAIT, "/readyz 200 once a slot is free", || async {
        let (status, body) = n.readyz().await;
        (status == 200 && body["full"] == false).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_frames_is_paced_and_loses_nothing() {
    const PINGS: usize = 30;
    let n = Herald::spawn(
        NodeOpts::standalone("rate")
            .arg("--client-frame-rate", "10")
            .arg("--client-frame-burst", "5"),
    )
    .await;
    n.wait_ready().await;
    let mut c = connect(&n, "flooder", &[]).await;
    let started = std::time::Instant::now();
    for _ in 0..PINGS {
        send_text(&mut c.ws, r#"{"type":"ping"}"#).await;
    }
    let mut pongs = 0;
    while pongs < PINGS {
        let f = recv_json(&mut c.ws, WAIT)
            .await
            .expect("every ping is answered");
        if f["type"] == "pong" {
            pongs += 1;
        }
    }
    // 30 frames at 10/s with a burst of 5 cannot be answered in less than 2.5 s; a loaded
    // machine only makes it slower, so this lower bound cannot fail by accident.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2400),
        "answered in {took:?}: not paced"
    );
    assert!(n.metric("herald_client_frames_throttled_total").await >= 1.0);
    // The session is still fine: a message reaches it.
    n.publish(serde_json::json!({"user": "flooder", "data": "still here"}))
        .await;
    let m = recv_message(&mut c.ws, WAIT).await.expect("a message");
    assert_eq!(m["data"], "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_reach_redis_no_faster_than_the_frame_rate() {
    const ACKS: u64 = 60;
    let redis = RedisServer::start();
    let n = Herald::spawn(
        NodeOpts::cluster(&redis, "ackrate", "n1")
            .arg("--client-frame-rate", "20")
            .arg("--client-frame-burst", "10"),
    )
    .await;
    n.wait_ready().await;
    n.publish(serde_json::json!({"user": "acker", "durable": true, "data": 1}))
        .await;
    let mut c = connect(&n, "acker", &[]).await;
    let id = recv_message(&mut c.ws, WAIT).await.expect("replayed")["id"]
        .as_str()
        .expect("an inbox id")
        .to_string();
    let started = std::time::Instant::now();
    for _ in 0..ACKS {
        send_text(&mut c.ws, &format!(r#"{{"type":"ack","id":"{id}"}}"#)).await;
    }
    // Whatever the machine's load, the node cannot have handled more than the burst plus
    // the rate times the time that passed (read after the metric, so it over-counts).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let handled = n.metric(r#"herald_client_frames_total{kind="ack"}"#).await;
    let bound = 10.0 + 20.0 * started.elapsed().as_secs_f64() + 1.0;
    assert!(
        handled <= bound,
        "{handled} acks handled, at most {bound} allowed"
    );
    // And every one of them is handled in the end.
    eventually(Duration::from_secs(30), "all acks handled", || async {
        (n.metric(r#"herald_client_frames_total{kind="ack"}"#).await >= ACKS as f64).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_acks_above_the_rate_get_429_with_retry_after() {
    let redis = RedisServer::start();
    let n = Herald::spawn(
        NodeOpts::cluster(&redis, "sseack", "n1")
            .arg("--client-frame-rate", "1")
            .arg("--client-frame-burst", "3"),
    )
    .await;
    n.wait_ready().await;
    n.publish(serde_json::json!({"user": "reader", "durable": true, "data": 1}))
        .await;
    let t = token("reader", &[]);
    let (_, page) = n.api_get("/api/inbox/reader").await;
    let id = page["entries"][0]["id"]
        .as_str()
        .expect("an entry")
        .to_string();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..8 {
        let r = n
            .http
            .post(n.url("/ack"))
            .bearer_auth(&t)
            .json(&serde_json::json!({ "id": id }))
            .send()
            .await
            .expect("POST /ack");
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            retry_after = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let body: serde_json::Value = r.json().await.expect("JSON error");
            assert_eq!(body["error"], "too_many_requests");
        }
    }
    assert_eq!(
        &statuses[..3],
        &[200, 200, 200],
        "the burst passes: {statuses:?}"
    );
    assert!(statuses.contains(&429), "{statuses:?}");
    let wait = retry_after.expect("Retry-After on 429");
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    // Another user is not affected by this one's bucket.
    let r = n
        .http
        .post(n.url("/ack"))
        .bearer_auth(token("someone-else", &[]))
        .json(&serde_json::json!({ "id": id }))
        .send()
        .await
        .expect("POST /ack");
    assert_eq!(r.status(), 200);
    assert!(n.metric("herald_acks_throttled_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_scoped() {
    const PUBLISH: &str = "publish-key-0123456789";
    const READ: &str = "read-key-from-file-0123456789";
    let dir = tempdir();
    let file = dir.join("keys");
    std::fs::write(&file, format!("# producers and dashboards\nread {READ}\n"))
        .expect("write keys");
    let n = Herald::spawn(
        NodeOpts::standalone("scopes")
            .arg("--publish-api-key", PUBLISH)
            .arg("--api-keys-file", file.to_str().expect("utf-8 path")),
    )
    .await;
    n.wait_ready().await;
    let call = |method: Method, path: &str, key: &str| {
        let req = n.http.request(method, n.url(path)).bearer_auth(key);
        async move {
            let r = req
                .header("content-type", "application/json")
                .body(r#"{"user":"u1","data":1}"#)
                .send()
                .await
                .expect("request");
            let status = r.status().as_u16();
            (
                status,
                r.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    use reqwest::Method;
    let routes: &[(Method, &str, [u16; 4])] = &[
        // (method, path, [admin, publish, read, unknown key])
        (Method::POST, "/api/publish", [200, 200, 403, 401]),
        (Method::GET, "/api/presence/u1", [200, 403, 200, 401]),
        (Method::GET, "/api/stats", [200, 403, 200, 401]),
        (Method::GET, "/api/inbox/u1", [200, 403, 200, 401]),
        (Method::POST, "/api/disconnect/u1", [200, 403, 403, 401]),
        (Method::DELETE, "/api/inbox/u1/1-0", [404, 403, 403, 401]),
    ];
    for (method, path, want) in routes {
        for (key, want) in [API_KEY, PUBLISH, READ, "unknown-key-0123456789"]
            .iter()
            .zip(want)
        {
            let (status, body) = call(method.clone(), path, key).await;
            assert_eq!(status, *want, "{method} {path} with {key}: {body}");
            if status == 403 {
                assert_eq!(body["error"], "forbidden");
            }
        }
    }
    assert!(
        n.metric(r#"herald_api_forbidden_total{scope="publish"}"#)
            .await
            >= 4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_named_twice_in_users_gets_one_copy() {
    let n = Herald::spawn(NodeOpts::standalone("dedupe")).await;
    n.wait_ready().await;
    let mut c = connect(&n, "twice", &[]).await;
    let (status, body) = n
        .api_post(
            "/api/publish",
            &serde_json::json!({"users": ["twice", "other", "twice"], "data": "once"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["channels"], 2);
    let m = recv_message(&mut c.ws, WAIT).await.expect("the message");
    assert_eq!(m["data"], "once");
    assert_silent(&mut c.ws, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_api_key_files_and_short_keys_are_refused_at_start() {
    let dir = tempdir();
    let file = dir.join("keys");
    for (content, expect) in [
        ("writer some-key-0123456789\n", "unknown scope"),
        ("publish\n", "expected `<scope> <key>`"),
        ("publish short\n", "at least 16 bytes"),
    ] {
        std::fs::write(&file, content).expect("write keys");
        let out = std::process::Command::new(herald_bin())
            .args(["--listen", "127.0.0.1:0", "--jwt-secret", JWT_SECRET])
            .args(["--api-keys-file", file.to_str().expect("path")])
            .output()
            .expect("run herald");
        assert!(!out.status.success(), "{content:?} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{content:?}: {err}");
        assert!(
            !err.contains("some-key-0123456789"),
            "a key must never be printed: {err}"
        );
    }
}

/// A fresh directory under the target dir for one test's files.
fn tempdir() -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "hostile-{}-{}",
        std::process::id(),
        uuid_like()
    ));
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

fn uuid_like() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
