//! A node without Redis (in-memory broker and presence), --dev mode, and the refusal to
//! start without secrets.

use std::time::Duration;

use crate::support::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_node_delivers_and_reports_presence_and_stats_without_redis() {
    let n = Herald::spawn(NodeOpts::standalone("solo")).await;
    n.wait_ready().await;
    let (status, body) = n.readyz().await;
    assert_eq!(
        (status, body),
        (
            200,
            json!({"ready": true, "redis": true, "pubsub": true, "draining": false, "full": false})
        )
    );

    let mut u1_news = connect(&n, "u1", &["news"]).await;
    let mut u1 = connect(&n, "u1", &[]).await;
    let mut u2 = connect(&n, "u2", &[]).await;
    assert_eq!(u1_news.welcome["node"], "solo");

    n.publish(json!({"user": "u1", "data": {"n": 1}})).await;
    for c in [&mut u1_news, &mut u1] {
        let m = recv_message(&mut c.ws, WAIT).await.expect("user message");
        assert_eq!(
            m,
            json!({"type": "message", "channel": "user:u1", "data": {"n": 1}})
        );
    }
    n.publish(json!({"topic": "news", "data": "extra"})).await;
    let m = recv_message(&mut u1_news.ws, WAIT)
        .await
        .expect("topic message");
    assert_eq!(
        m,
        json!({"type": "message", "channel": "topic:news", "data": "extra"})
    );
    n.publish(json!({"broadcast": true, "data": null})).await;
    for c in [&mut u1_news, &mut u1, &mut u2] {
        let m = recv_message(&mut c.ws, WAIT).await.expect("broadcast");
        assert_eq!(
            m,
            json!({"type": "message", "channel": "broadcast", "data": null})
        );
    }
    // u2 got only the broadcast; u1 got no topic message on its topic-less session.
    assert_silent(&mut u2.ws, Duration::from_millis(200)).await;
    assert_silent(&mut u1.ws, Duration::from_millis(100)).await;

    n.wait_presence_nodes("u1", &["solo", "solo"]).await;
    let (status, body) = n.api_get("/api/presence/u1").await;
    assert_eq!(status, 200);
    assert_eq!(body["online"], true);
    assert_eq!(body["user"], "u1");
    assert_eq!(
        n.stats().await,
        json!({"connections": 3, "users": 2, "nodes": [{"node": "solo", "connections": 3, "users": 2}]})
    );

    close_client(u2.ws).await;
    eventually(WAIT, "u2 offline after closing", || async {
        (!n.online("u2").await).then_some(())
    })
    .await;
    let (status, _) = n.api_post("/api/disconnect/u1", &json!({})).await;
    assert_eq!(status, 200);
    for c in [&mut u1_news, &mut u1] {
        assert_eq!(expect_close(&mut c.ws, WAIT).await, Ended::Close(4002));
    }
    eventually(WAIT, "nobody left", || async {
        let s = n.stats().await;
        (s["connections"] == 0 && s["users"] == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_takes_the_token_as_the_user_id_needs_no_api_key_and_warns() {
    // A JWT secret in the environment does not change what --dev means (local-cluster.sh
    // exports one in both modes).
    let mut o = NodeOpts::standalone("devnode").env("HERALD_JWT_SECRET", JWT_SECRET);
    o.dev = true;
    let n = Herald::spawn(o).await;
    n.wait_ready().await;

    let mut c = connect_url(&n.ws_url("?token=alice&topics=news,misc")).await;
    assert_eq!(c.welcome["user"], "alice");

    // No Authorization header at all.
    let r = n
        .http
        .post(n.url("/api/publish"))
        .json(&json!({"topic": "misc", "data": "hi"}))
        .send()
        .await
        .expect("publish without a key");
    assert_eq!(r.status().as_u16(), 200);
    let m = recv_message(&mut c.ws, WAIT).await.expect("topic message");
    assert_eq!(
        m,
        json!({"type": "message", "channel": "topic:misc", "data": "hi"})
    );
    let r = n
        .http
        .get(n.url("/api/presence/alice"))
        .send()
        .await
        .expect("presence without a key");
    assert_eq!(r.status().as_u16(), 200);
    let body: serde_json::Value = r.json().await.expect("presence JSON");
    assert_eq!(body["online"], true);

    // Still validated: a token that is not a valid user id is refused.
    assert_eq!(refused_status(&n.ws_url("?token=a%20b")).await, 401);
    assert_eq!(refused_status(&n.ws_url("")).await, 401);

    eventually(WAIT, "a --dev warning in the log", || async {
        n.log_text()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("--dev"))
            .then_some(())
    })
    .await;
}

/// Runs the binary with `args` and every HERALD_* variable removed; returns (exit code,
/// stderr). Fails if it does not exit on its own.
async fn run_herald(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = tokio::process::Command::new(herald_bin());
    cmd.args(args)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("HERALD_") {
            cmd.env_remove(k);
        }
    }
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("herald exits on its own")
        .expect("run herald");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_dev_or_secrets_the_binary_exits_with_code_2_and_says_why() {
    let (code, err) = run_herald(&[]).await;
    assert_eq!(code, Some(2), "stderr: {err}");
    assert!(err.contains("--jwt-secret"), "stderr: {err}");
    assert!(err.contains("--dev"), "the message points at --dev: {err}");

    let (code, err) = run_herald(&["--jwt-secret", JWT_SECRET]).await;
    assert_eq!(code, Some(2), "stderr: {err}");
    assert!(err.contains("--api-key"), "stderr: {err}");

    // HS256 keys need 32 bytes (RFC 7518); 26 is refused.
    let (code, err) = run_herald(&[
        "--jwt-secret",
        "only-26-bytes-0123456789ab",
        "--api-key",
        API_KEY,
    ])
    .await;
    assert_eq!(code, Some(2), "stderr: {err}");
    assert!(
        err.contains("--jwt-secret") && err.contains("32"),
        "stderr: {err}"
    );

    let (code, err) = run_herald(&["--jwt-secret", JWT_SECRET, "--api-key", "short"]).await;
    assert_eq!(code, Some(2), "stderr: {err}");
    assert!(
        err.contains("--api-key") && err.contains("16"),
        "stderr: {err}"
    );
}
