//! In-process tests of the HTTP routes: a standalone node (memory engines) and warp's test
//! client, so validation and status codes are checked without a socket or a process. What
//! needs Redis, real sockets or signals is in the integration suite (tests/it).

use std::sync::Arc;

use clap::Parser;
use http::StatusCode;
use serde_json::{json, Value};

use crate::config::Config;
use crate::node::Node;

const KEY: &str = "in-process-api-key-0123456789";

fn node(extra: &[&str]) -> Arc<Node> {
    let mut args = vec![
        "herald",
        "--jwt-secret",
        "in-process-jwt-secret-0123456789",
        "--api-key",
        KEY,
        "--max-message-bytes",
        "64",
        "--inbox-retention",
        "1h",
    ];
    args.extend_from_slice(extra);
    Node::start(Config::parse_from(args)).unwrap()
}

async fn call(node: &Arc<Node>, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = warp::test::request()
        .method(method)
        .path(path)
        .header("authorization", format!("Bearer {KEY}"));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.reply(&super::routes(node.clone())).await;
    let status = res.status().as_u16();
    (
        status,
        serde_json::from_slice(res.body()).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn every_malformed_publish_is_a_400_with_a_reason() {
    let n = node(&[]);
    for body in [
        json!({"data": 1}),
        json!({"user": "u", "topic": "t", "data": 1}),
        json!({"user": "u"}),
        json!({"users": [], "data": 1}),
        json!({"user": "a b", "data": 1}),
        json!({"topic": "x\u{7}", "data": 1}),
        json!({"broadcast": false, "data": 1}),
        json!({"user": "u", "data": 1, "extra": true}),
        json!({"topic": "t", "durable": true, "data": 1}),
        json!({"user": "u", "idempotency_key": "k", "data": 1}),
        json!({"user": "u", "durable": true, "collapse_key": "", "data": 1}),
        json!({"user": "u", "durable": true, "expires_in": 0, "data": 1}),
        json!({"user": "u", "durable": true, "expires_in": 7200, "data": 1}),
    ] {
        let (status, res) = call(&n, "POST", "/api/publish", Some(body.clone())).await;
        assert_eq!(status, 400, "{body} → {res}");
        assert_eq!(res["error"], "bad_request", "{body}");
        assert!(
            res["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{res}"
        );
    }
    let (status, res) = call(
        &n,
        "POST",
        "/api/publish",
        Some(json!({"user": "u", "data": "x".repeat(100)})),
    )
    .await;
    assert_eq!((status, res["error"].clone()), (413, json!("too_large")));
}

#[tokio::test]
async fn valid_publishes_are_accepted_and_durable_ones_return_ids() {
    let n = node(&[]);
    let (status, res) = call(
        &n,
        "POST",
        "/api/publish",
        Some(json!({"broadcast": true, "data": null})),
    )
    .await;
    assert_eq!((status, res["channels"].clone()), (200, json!(1)));
    let (status, res) = call(
        &n,
        "POST",
        "/api/publish",
        Some(json!({"users": ["a", "b"], "durable": true, "idempotency_key": "k", "expires_in": 60, "data": {"x": 1}})),
    )
    .await;
    assert_eq!(status, 200, "{res}");
    let first = res["ids"].clone();
    assert!(first["a"].is_string() && first["b"].is_string(), "{res}");
    let (_, again) = call(
        &n,
        "POST",
        "/api/publish",
        Some(
            json!({"users": ["a", "b"], "durable": true, "idempotency_key": "k", "data": {"x": 2}}),
        ),
    )
    .await;
    assert_eq!(again["ids"], first, "the retry answers with the first ids");
    let (status, inbox) = call(&n, "GET", "/api/inbox/a", None).await;
    assert_eq!(status, 200);
    assert_eq!(inbox["unread"], 1);
    assert_eq!(inbox["entries"][0]["data"], json!({"x": 1}));
}

#[tokio::test]
async fn the_api_needs_its_key_and_unknown_routes_are_json_404s() {
    let n = node(&[]);
    let res = warp::test::request()
        .method("GET")
        .path("/api/stats")
        .reply(&super::routes(n.clone()))
        .await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = warp::test::request()
        .method("GET")
        .path("/api/stats")
        .header("authorization", "Bearer wrong-key-0123456789")
        .reply(&super::routes(n.clone()))
        .await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let (status, res) = call(&n, "GET", "/api/nothing", None).await;
    assert_eq!((status, res["error"].clone()), (404, json!("not_found")));
    let (status, _) = call(&n, "GET", "/healthz", None).await;
    assert_eq!(status, 200);
    let (status, ready) = call(&n, "GET", "/readyz", None).await;
    assert_eq!((status, ready["ready"].clone()), (200, json!(true)));
}

#[tokio::test]
async fn inbox_routes_check_users_and_ids() {
    let n = node(&[]);
    let (status, _) = call(&n, "GET", "/api/inbox/a%20b", None).await;
    assert_eq!(status, 400);
    let (status, _) = call(&n, "POST", "/api/inbox/u/ack", Some(json!({"id": "nope"}))).await;
    assert_eq!(status, 400);
    let (status, res) = call(&n, "DELETE", "/api/inbox/u/1-0", None).await;
    assert_eq!((status, res["error"].clone()), (404, json!("not_found")));
    let (status, _) = call(&n, "DELETE", "/api/inbox/u/x-y", None).await;
    assert_eq!(status, 400);
    let (_, res) = call(
        &n,
        "POST",
        "/api/publish",
        Some(json!({"user": "u", "durable": true, "data": 1})),
    )
    .await;
    let id = res["ids"]["u"].as_str().unwrap().to_string();
    let (status, _) = call(&n, "DELETE", &format!("/api/inbox/u/{id}"), None).await;
    assert_eq!(status, 200);
    let (_, inbox) = call(&n, "GET", "/api/inbox/u", None).await;
    assert_eq!(inbox["unread"], 0);
}

#[tokio::test]
async fn an_inbox_limit_outside_1_to_1000_is_a_400() {
    let n = node(&[]);
    // Found by schemathesis: these were clamped or replaced by the default (a 200).
    for q in ["limit=0", "limit=-1", "limit=abc", "limit=1001", "limit="] {
        let (status, res) = call(&n, "GET", &format!("/api/inbox/u?{q}"), None).await;
        assert_eq!(
            (status, res["error"].clone()),
            (400, json!("bad_request")),
            "{q}"
        );
    }
    for q in ["", "?limit=1", "?limit=1000", "?other=1"] {
        let (status, _) = call(&n, "GET", &format!("/api/inbox/u{q}"), None).await;
        assert_eq!(status, 200, "{q}");
    }
}
