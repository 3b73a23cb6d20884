//! The WebSocket wire as a raw TCP client sees it: frames sent in the same packet as the
//! upgrade request, fragmented messages, the closing handshake, and RFC 6455 violations
//! that herald's own frame reader must refuse with 1002.

use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

/// Upgrades with the request followed at once by `extra` bytes (in the same write).
async fn raw_open(node: &Herald, user: &str, extra: &[u8]) -> RawWs {
    RawWs::connect_with(node, &token(user, &[]), extra, WAIT).await
}

/// Reads one server frame: (opcode, payload). `None` on EOF or timeout.
async fn read_frame(s: &mut RawWs) -> Option<(u8, Vec<u8>)> {
    let f = s.read_frame(WAIT).await.ok().flatten()?;
    assert!(!f.masked, "server frames are never masked");
    Some((f.opcode, f.payload))
}

async fn read_json(s: &mut RawWs) -> Value {
    let (op, p) = read_frame(s).await.expect("a frame");
    assert_eq!(op, 0x1, "text frame expected, got opcode {op}");
    serde_json::from_slice(&p).expect("json text frame")
}

async fn expect_close_code(s: &mut RawWs) -> u16 {
    loop {
        match read_frame(s).await {
            Some((0x8, p)) => {
                assert!(p.len() >= 2, "close frame without a code");
                return u16::from_be_bytes([p[0], p[1]]);
            }
            Some(_) => continue,
            None => panic!("connection ended without a close frame"),
        }
    }
}

async fn expect_eof(s: &mut RawWs) {
    assert_eq!(read_frame(s).await, None, "connection should end");
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_in_the_upgrade_packet_and_fragmented_messages_are_read() {
    let redis = RedisServer::start();
    let n = Herald::spawn(NodeOpts::cluster(&redis, "wire-frag", "n1")).await;
    n.wait_ready().await;

    // A ping sent in the same write as the upgrade request, split into three fragments with
    // a WebSocket ping between them.
    let mut early = client_frame(0x1, false, br#"{"type""#);
    early.extend(client_frame(0x9, true, b"hey"));
    early.extend(client_frame(0x0, false, br#":"pi"#));
    early.extend(client_frame(0x0, true, br#"ng"}"#));
    let mut s = raw_open(&n, "w1", &early).await;
    assert_eq!(read_json(&mut s).await["type"], "welcome");
    // The control frame is answered first (it completed first), then the message.
    assert_eq!(read_frame(&mut s).await, Some((0xA, b"hey".to_vec())));
    assert_eq!(read_json(&mut s).await, json!({"type": "pong"}));

    // A frame trickled in one byte per write still arrives whole.
    for b in client_frame(0x1, true, br#"{"type":"ping"}"#) {
        s.send_raw(&[b]).await;
    }
    assert_eq!(read_json(&mut s).await, json!({"type": "pong"}));

    // Deliveries still flow, and the closing handshake is answered with the same code.
    n.publish(json!({"user": "w1", "data": {"n": 1}})).await;
    let m = read_json(&mut s).await;
    assert_eq!(
        (m["type"].as_str(), m["data"]["n"].as_i64()),
        (Some("message"), Some(1))
    );
    let mut close = 4321u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"bye");
    s.send_raw(&client_frame(0x8, true, &close)).await;
    assert_eq!(expect_close_code(&mut s).await, 4321);
    expect_eof(&mut s).await;
    eventually(WAIT, "client close counted", || async {
        (n.metric("herald_sessions_closed_total{reason=\"client_closed\"}")
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc_violations_close_with_1002_and_the_node_stays_ready() {
    let redis = RedisServer::start();
    let n = Herald::spawn(NodeOpts::cluster(&redis, "wire-rfc", "n1")).await;
    n.wait_ready().await;

    let unmasked = vec![0x81, 0x02, b'h', b'i'];
    let mut rsv = client_frame(0x1, true, b"x");
    rsv[0] |= 0x20;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked frame", unmasked),
        ("reserved bit", rsv),
        ("reserved opcode", client_frame(0x5, true, b"")),
        ("fragmented ping", client_frame(0x9, false, b"")),
        ("oversized ping", client_frame(0x9, true, &[0u8; 126])),
        ("continuation without start", client_frame(0x0, true, b"x")),
        ("close with one byte", client_frame(0x8, true, b"x")),
        ("invalid close code echo", {
            let mut c = 1005u16.to_be_bytes().to_vec();
            c.extend_from_slice(b"no");
            client_frame(0x8, true, &c)
        }),
    ];
    for (i, (what, bytes)) in cases.into_iter().enumerate() {
        let mut s = raw_open(&n, &format!("r{i}"), &[]).await;
        assert_eq!(read_json(&mut s).await["type"], "welcome", "{what}");
        s.send_raw(&bytes).await;
        assert_eq!(expect_close_code(&mut s).await, 1002, "{what}");
        expect_eof(&mut s).await;
    }
    eventually(WAIT, "protocol errors counted", || async {
        (n.metric("herald_sessions_closed_total{reason=\"protocol_error\"}")
            .await
            >= 7.0)
            .then_some(())
    })
    .await;
    assert!(n.ready().await);
    assert!(!n.log_text().contains("panicked"), "node log shows a panic");
}
