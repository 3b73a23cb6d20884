//! The WebSocket wire as a raw TCP client sees it: frames sent in the same packet as the
//! upgrade request, fragmented messages, the closing handshake, and RFC 6455 violations
//! that herald's own frame reader must refuse with 1002.

use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A masked client frame.
fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mask = [0xA1, 0xB2, 0xC3, 0xD4];
    let mut f = vec![opcode | if fin { 0x80 } else { 0 }];
    let len = payload.len();
    if len < 126 {
        f.push(0x80 | len as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Sends the upgrade request followed at once by `extra` bytes (in the same write), and
/// reads the 101 response head. Returns the socket and whatever followed the head.
async fn raw_open(node: &Herald, user: &str, extra: &[u8]) -> (TcpStream, Vec<u8>) {
    let addr = node
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    let mut req = format!(
        "GET /ws?token={} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        token(user, &[])
    )
    .into_bytes();
    req.extend_from_slice(extra);
    s.write_all(&req).await.expect("write upgrade");
    let mut buf = Vec::new();
    let head_end = tokio::time::timeout(WAIT, async {
        loop {
            let mut chunk = [0u8; 1024];
            let n = s.read(&mut chunk).await.expect("read head");
            assert!(n > 0, "connection closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return i + 4;
            }
        }
    })
    .await
    .expect("101 response");
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (s, buf[head_end..].to_vec())
}

/// Reads one server frame: (opcode, payload). `None` on EOF or timeout.
async fn read_frame(s: &mut TcpStream, pending: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    tokio::time::timeout(WAIT, async {
        loop {
            if pending.len() >= 2 {
                assert_eq!(pending[1] & 0x80, 0, "server frames are never masked");
                let (len, head) = match pending[1] & 0x7F {
                    126 if pending.len() >= 4 => {
                        (u16::from_be_bytes([pending[2], pending[3]]) as usize, 4)
                    }
                    127 if pending.len() >= 10 => (
                        u64::from_be_bytes(pending[2..10].try_into().unwrap_or_default()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    l => (l as usize, 2),
                };
                if len != usize::MAX && pending.len() >= head + len {
                    let op = pending[0] & 0x0F;
                    let payload = pending[head..head + len].to_vec();
                    pending.drain(..head + len);
                    return Some((op, payload));
                }
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .ok()
    .flatten()
}

async fn read_json(s: &mut TcpStream, pending: &mut Vec<u8>) -> Value {
    let (op, p) = read_frame(s, pending).await.expect("a frame");
    assert_eq!(op, 0x1, "text frame expected, got opcode {op}");
    serde_json::from_slice(&p).expect("json text frame")
}

async fn expect_close_code(s: &mut TcpStream, pending: &mut Vec<u8>) -> u16 {
    loop {
        match read_frame(s, pending).await {
            Some((0x8, p)) => {
                assert!(p.len() >= 2, "close frame without a code");
                return u16::from_be_bytes([p[0], p[1]]);
            }
            Some(_) => continue,
            None => panic!("connection ended without a close frame"),
        }
    }
}

async fn expect_eof(s: &mut TcpStream, pending: &mut Vec<u8>) {
    assert_eq!(read_frame(s, pending).await, None, "connection should end");
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_in_the_upgrade_packet_and_fragmented_messages_are_read() {
    let redis = RedisServer::start();
    let n = Herald::spawn(NodeOpts::cluster(&redis, "wire-frag", "n1")).await;
    n.wait_ready().await;

    // A ping sent in the same write as the upgrade request, split into three fragments with
    // a WebSocket ping between them.
    let mut early = frame(0x1, false, br#"{"type""#);
    early.extend(frame(0x9, true, b"hey"));
    early.extend(frame(0x0, false, br#":"pi"#));
    early.extend(frame(0x0, true, br#"ng"}"#));
    let (mut s, mut pending) = raw_open(&n, "w1", &early).await;
    assert_eq!(read_json(&mut s, &mut pending).await["type"], "welcome");
    // The control frame is answered first (it completed first), then the message.
    assert_eq!(
        read_frame(&mut s, &mut pending).await,
        Some((0xA, b"hey".to_vec()))
    );
    assert_eq!(
        read_json(&mut s, &mut pending).await,
        json!({"type": "pong"})
    );

    // A frame trickled in one byte per write still arrives whole.
    for b in frame(0x1, true, br#"{"type":"ping"}"#) {
        s.write_all(&[b]).await.expect("write byte");
        s.flush().await.expect("flush");
    }
    assert_eq!(
        read_json(&mut s, &mut pending).await,
        json!({"type": "pong"})
    );

    // Deliveries still flow, and the closing handshake is answered with the same code.
    n.publish(json!({"user": "w1", "data": {"n": 1}})).await;
    let m = read_json(&mut s, &mut pending).await;
    assert_eq!(
        (m["type"].as_str(), m["data"]["n"].as_i64()),
        (Some("message"), Some(1))
    );
    let mut close = 4321u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"bye");
    s.write_all(&frame(0x8, true, &close)).await.expect("close");
    assert_eq!(expect_close_code(&mut s, &mut pending).await, 4321);
    expect_eof(&mut s, &mut pending).await;
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
    let mut rsv = frame(0x1, true, b"x");
    rsv[0] |= 0x20;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked frame", unmasked),
        ("reserved bit", rsv),
        ("reserved opcode", frame(0x5, true, b"")),
        ("fragmented ping", frame(0x9, false, b"")),
        ("oversized ping", frame(0x9, true, &[0u8; 126])),
        ("continuation without start", frame(0x0, true, b"x")),
        ("close with one byte", frame(0x8, true, b"x")),
        ("invalid close code echo", {
            let mut c = 1005u16.to_be_bytes().to_vec();
            c.extend_from_slice(b"no");
            frame(0x8, true, &c)
        }),
    ];
    for (i, (what, bytes)) in cases.into_iter().enumerate() {
        let (mut s, mut pending) = raw_open(&n, &format!("r{i}"), &[]).await;
        assert_eq!(
            read_json(&mut s, &mut pending).await["type"],
            "welcome",
            "{what}"
        );
        s.write_all(&bytes).await.expect("write bad frame");
        assert_eq!(
            expect_close_code(&mut s, &mut pending).await,
            1002,
            "{what}"
        );
        expect_eof(&mut s, &mut pending).await;
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
