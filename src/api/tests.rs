//! In-process tests of the HTTP routes: a standalone node (memory engines) and warp's test
//! client, so validation and status codes are checked without a socket or a process; what
//! only the wire shows (chunked bodies, Content-Length limits, 405 headers) through the
//! real listener on a loopback port. What needs Redis, other processes or signals is in the
//! integration suite (tests/it).

use std::sync::Arc;

use clap::Parser;
use http::StatusCode;
use serde_json::{json, Value};

use self::socket::{chunked, TestServer, API_KEY};
use super::{allowed_methods, decode_segment, ROUTES};
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

// ===== Routes, methods, bodies and paths over a real socket (and the contract) =====

/// A standalone node serving the real routes through the real listener on a loopback port,
/// and a raw HTTP/1.1 client: for what warp's test client cannot show (chunked bodies,
/// Content-Length limits, headers as hyper writes them).
mod socket {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::Arc;

    use clap::Parser;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;

    use crate::config::Config;
    use crate::node::Node;

    pub(crate) const API_KEY: &str = "unit-test-api-key-0123456789";

    /// A standalone node (memory engines) serving the real routes through the real listener.
    pub(crate) struct TestServer {
        pub(crate) addr: SocketAddr,
        stop: CancellationToken,
        _node: Arc<Node>,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    /// One answer: status, headers (lower-case names) and the decoded body.
    #[derive(Debug)]
    pub(crate) struct Answer {
        pub(crate) status: u16,
        pub(crate) headers: HashMap<String, String>,
        pub(crate) body: String,
    }

    impl Answer {
        pub(crate) fn json(&self) -> serde_json::Value {
            serde_json::from_str(&self.body).unwrap()
        }

        /// The `error` code of a JSON error body.
        pub(crate) fn error_code(&self) -> String {
            self.json()["error"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        }
    }

    impl TestServer {
        pub(crate) async fn start() -> TestServer {
            let config = Config::try_parse_from([
                "herald",
                "--listen",
                "127.0.0.1:0",
                "--api-key",
                API_KEY,
                "--jwt-secret",
                "unit-test-jwt-secret-0123456789",
                "--node-id",
                "unit",
            ])
            .unwrap();
            let node = Node::start(config).unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = CancellationToken::new();
            tokio::spawn(crate::serve(node.clone(), listener, stop.clone()));
            TestServer {
                addr,
                stop,
                _node: node,
            }
        }

        /// Sends `head` (request line and headers, without the blank line; `Host` and
        /// `Connection: close` are added) and `body` as they are, and reads the answer.
        pub(crate) async fn raw(&self, head: &str, body: &[u8]) -> Answer {
            let mut s = TcpStream::connect(self.addr).await.unwrap();
            let mut req = format!("{head}\r\nHost: test\r\nConnection: close\r\n\r\n").into_bytes();
            req.extend_from_slice(body);
            // The server may answer (and close) before reading everything, as on a 413.
            let _ = s.write_all(&req).await;
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            parse_answer(&out)
        }

        /// A request with the API key and, when given, a JSON body with a Content-Length.
        pub(crate) async fn call(&self, method: &str, path: &str, body: Option<&str>) -> Answer {
            let mut head = format!("{method} {path} HTTP/1.1\r\nAuthorization: Bearer {API_KEY}");
            if let Some(b) = body {
                head.push_str(&format!(
                    "\r\nContent-Type: application/json\r\nContent-Length: {}",
                    b.len()
                ));
            }
            self.raw(&head, body.unwrap_or("").as_bytes()).await
        }
    }

    fn parse_answer(raw: &[u8]) -> Answer {
        let text = String::from_utf8_lossy(raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let body = if headers
            .get("transfer-encoding")
            .is_some_and(|v| v == "chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    fn dechunk(mut s: &str) -> String {
        let mut out = String::new();
        while let Some((size, rest)) = s.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&rest[..n]);
            s = &rest[n + 2..];
        }
        out
    }

    /// A chunked encoding of `body` in pieces of `piece` bytes.
    pub(crate) fn chunked(body: &[u8], piece: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for c in body.chunks(piece) {
            out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }
}

#[test]
fn route_templates_match_whole_non_empty_segments() {
    assert_eq!(allowed_methods("/api/publish"), ["POST"]);
    assert_eq!(allowed_methods("/api/presence/a%2Fb"), ["GET"]);
    assert_eq!(allowed_methods("/api/inbox/u/ack"), ["POST"]);
    assert_eq!(allowed_methods("/api/inbox/u/1-0"), ["DELETE"]);
    for unknown in [
        "/",
        "/api",
        "/api/publish/",
        "/api/presence/",
        "/api/presence/a/b",
        "/api/inbox//ack",
        "/nope",
    ] {
        assert!(allowed_methods(unknown).is_empty(), "{unknown}");
    }
}

/// docs/openapi.yaml documents exactly the routes the node serves (except `/ws`, which
/// docs/protocol.md describes), with the same methods.
#[test]
fn the_openapi_document_lists_every_route() {
    let spec = include_str!("../../docs/openapi.yaml");
    let mut documented = Vec::new();
    let mut in_paths = false;
    let mut path = "";
    for line in spec.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            in_paths = line == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            path = &line[2..2 + p.len() + 1];
        } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')) {
            if ["get", "post", "put", "patch", "delete"].contains(&m) {
                documented.push((path.to_string(), m.to_ascii_uppercase()));
            }
        }
    }
    let mut served: Vec<(String, String)> = ROUTES
        .iter()
        .filter(|(p, _)| *p != "/ws")
        .map(|(p, m)| (p.to_string(), m.to_string()))
        .collect();
    documented.sort();
    served.sort();
    assert_eq!(documented, served);
}

#[tokio::test]
async fn a_known_path_with_another_method_is_405_with_allow() {
    let srv = TestServer::start().await;
    for (path, method, allow) in [
        ("/api/publish", "GET", "POST"),
        ("/api/publish", "TRACE", "POST"),
        ("/api/presence/42", "POST", "GET"),
        ("/api/stats", "DELETE", "GET"),
        ("/api/disconnect/42", "GET", "POST"),
        ("/api/inbox/42", "PUT", "GET"),
        ("/api/inbox/42/ack", "GET", "POST"),
        // Found by schemathesis: `ack` was also read as an entry id here.
        ("/api/inbox/42/ack", "DELETE", "POST"),
        ("/api/inbox/42/1-0", "PATCH", "DELETE"),
        ("/healthz", "OPTIONS", "GET"),
        ("/readyz", "POST", "GET"),
        ("/metrics", "DELETE", "GET"),
        ("/ws", "POST", "GET"),
    ] {
        // Without the API key too: the method is judged before authentication.
        let res = srv.raw(&format!("{method} {path} HTTP/1.1"), b"").await;
        assert_eq!(res.status, 405, "{method} {path}: {res:?}");
        assert_eq!(res.headers.get("allow").map(String::as_str), Some(allow));
        assert_eq!(res.error_code(), "method_not_allowed");
    }
    let res = srv.call("GET", "/api/nope", None).await;
    assert_eq!((res.status, res.error_code().as_str()), (404, "not_found"));
    // The right method without the key is still a 401, and says how to authenticate.
    let res = srv.raw("GET /api/stats HTTP/1.1", b"").await;
    assert_eq!(
        (res.status, res.error_code().as_str()),
        (401, "unauthorized")
    );
    assert_eq!(
        res.headers.get("www-authenticate").map(String::as_str),
        Some("Bearer")
    );
}

#[tokio::test]
async fn bodies_may_be_chunked_and_are_limited_either_way() {
    let srv = TestServer::start().await;
    let auth = format!("Authorization: Bearer {API_KEY}");
    // Chunked bodies used to be refused with 411 Length Required.
    let publish = br#"{"user":"42","data":{"text":"hi"}}"#;
    let res = srv
        .raw(
            &format!("POST /api/publish HTTP/1.1\r\n{auth}\r\nTransfer-Encoding: chunked"),
            &chunked(publish, 7),
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.json()["channels"], 1);

    let big = format!(r#"{{"id":"1-0","pad":"{}"}}"#, "x".repeat(5000));
    let res = srv
        .raw(
            &format!("POST /api/inbox/42/ack HTTP/1.1\r\n{auth}\r\nTransfer-Encoding: chunked"),
            &chunked(big.as_bytes(), 1000),
        )
        .await;
    assert_eq!((res.status, res.error_code().as_str()), (413, "too_large"));
    let res = srv.call("POST", "/api/inbox/42/ack", Some(&big)).await;
    assert_eq!((res.status, res.error_code().as_str()), (413, "too_large"));
    // Exactly at the limit is fine.
    let at_limit = format!(r#"{{"id":"1-0","pad":"{}"}}"#, "x".repeat(4096 - 21));
    assert_eq!(at_limit.len(), 4096);
    let res = srv.call("POST", "/api/inbox/42/ack", Some(&at_limit)).await;
    assert_eq!(res.status, 200, "{res:?}");
}

#[test]
fn path_segments_are_strictly_percent_decoded() {
    assert_eq!(decode_segment("a%2Fb").as_deref(), Some("a/b"));
    assert_eq!(decode_segment("%C3%BC").as_deref(), Some("ü"));
    assert_eq!(decode_segment("50%25").as_deref(), Some("50%"));
    assert_eq!(decode_segment("plain").as_deref(), Some("plain"));
    for bad in ["a%2", "a%", "%zz", "%C3", "%FF", "a%G1"] {
        assert_eq!(decode_segment(bad), None, "{bad}");
    }
}

#[tokio::test]
async fn path_user_ids_are_decoded_and_checked() {
    let srv = TestServer::start().await;
    let res = srv.call("GET", "/api/presence/%41b", None).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.json()["user"], "Ab");
    for bad in ["a%2", "a%20b", "%0A", "%FF"] {
        let res = srv.call("GET", &format!("/api/presence/{bad}"), None).await;
        assert_eq!(
            (res.status, res.error_code().as_str()),
            (400, "bad_request"),
            "{bad}"
        );
        assert_eq!(
            res.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
    }
    let long = "x".repeat(257);
    let res = srv
        .call("GET", &format!("/api/presence/{long}"), None)
        .await;
    assert_eq!(res.status, 400);
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
