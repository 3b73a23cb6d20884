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
