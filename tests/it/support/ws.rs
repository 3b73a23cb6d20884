//! WebSocket clients: tungstenite for ordinary sessions ([`connect`], [`Client`]), and
//! [`RawWs`], a raw-TCP client that never answers a ping.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::node::Herald;
use super::{token, WAIT};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A connected client that has read its welcome frame.
pub struct Client {
    pub ws: Ws,
    pub welcome: Value,
}

/// What a client saw when it stopped receiving.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    Close(u16),
    /// The TCP connection ended without a close frame.
    Dropped,
}

/// The client configuration of every tungstenite session opened here.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(16 << 20))
}

/// Opens a WebSocket with `?token=` and reads the welcome.
pub async fn connect(node: &Herald, user: &str, topics: &[&str]) -> Client {
    connect_url(&node.ws_url(&format!("?token={}", token(user, topics)))).await
}

/// Opens a WebSocket to `url` and reads the welcome.
pub async fn connect_url(url: &str) -> Client {
    let mut ws = open(url).await.expect("websocket connect");
    let welcome = ws_welcome(&mut ws).await;
    Client { ws, welcome }
}

/// Reads the first frame, which must be the welcome.
async fn ws_welcome(ws: &mut Ws) -> Value {
    let welcome = recv_json(ws, WAIT).await.expect("welcome frame");
    assert_eq!(
        welcome["type"], "welcome",
        "first frame must be welcome: {welcome}"
    );
    welcome
}

/// Opens a WebSocket without reading anything; the error carries the HTTP status.
pub async fn open(url: &str) -> Result<Ws, WsError> {
    let req = url.into_client_request()?;
    let (ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true),
    )
    .await
    .map_err(|_| WsError::ConnectionClosed)??;
    Ok(ws)
}

/// Opens a WebSocket to `url` sending `Authorization: Bearer <token>`.
pub async fn open_bearer(url: &str, token: &str) -> Result<Ws, WsError> {
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header value"),
    );
    let (ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async_with_config(req, None, true),
    )
    .await
    .map_err(|_| WsError::ConnectionClosed)??;
    Ok(ws)
}

/// HTTP status of a refused upgrade (panics if the upgrade succeeded).
pub async fn refused_status(url: &str) -> u16 {
    refused(url, "", open(url).await)
}

/// HTTP status of an upgrade to `url` with `Authorization: Bearer <token>` (panics if the
/// upgrade succeeded).
pub async fn refused_status_bearer(url: &str, token: &str) -> u16 {
    refused(url, " with a bearer header", open_bearer(url, token).await)
}

fn refused(url: &str, how: &str, opened: Result<Ws, WsError>) -> u16 {
    match opened {
        Ok(_) => panic!("upgrade to {url}{how} should have been refused"),
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error for {url}: {e}"),
    }
}

/// Connects `user` over a socket whose receive buffer is tiny and fixed (no autotuning),
/// so a client that stops reading backs up the server after a few hundred KB, not 30 MB.
pub async fn connect_small_rcvbuf(node: &Herald, user: &str) -> Client {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", node.port).parse().expect("addr");
    let stream = tokio::time::timeout(WAIT, sock.connect(addr))
        .await
        .expect("connect in time")
        .expect("tcp connect");
    let url = node.ws_url(&format!("?token={}", token(user, &[])));
    let (mut ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async_with_config(
            url,
            MaybeTlsStream::Plain(stream),
            Some(ws_config()),
        ),
    )
    .await
    .expect("handshake in time")
    .expect("websocket handshake");
    let welcome = ws_welcome(&mut ws).await;
    Client { ws, welcome }
}

/// Next text frame as JSON, skipping pings; None on timeout or close.
pub async fn recv_json(ws: &mut Ws, timeout: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .ok()??
            .ok()?;
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).ok(),
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

/// Next `message` frame (skipping pongs and others).
pub async fn recv_message(ws: &mut Ws, timeout: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let v = recv_json(ws, left).await?;
        if v["type"] == "message" {
            return Some(v);
        }
    }
}

/// Reads until the server closes; returns the close code (or Dropped).
pub async fn expect_close(ws: &mut Ws, timeout: Duration) -> Ended {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("no close within {timeout:?}"),
            Ok(None) | Ok(Some(Err(_))) => return Ended::Dropped,
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Ended::Close(frame.map(|f| u16::from(f.code)).unwrap_or(1005));
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Asserts that no message frame arrives within `window`.
pub async fn assert_silent(ws: &mut Ws, window: Duration) {
    if let Some(v) = recv_message(ws, window).await {
        panic!("expected no message, got {v}");
    }
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_string()))
        .await
        .expect("send");
}

/// Closes from the client side and waits (bounded) for the server's answer.
pub async fn close_client(mut ws: Ws) {
    let _ = ws.close(None).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, ws.next()).await {}
}

// ===== raw WebSocket over TCP =====

/// A hand-rolled WebSocket client: it sends exactly what the test writes and never answers
/// a ping, unlike tungstenite.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// A frame read by [`RawWs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawFrame {
    Text(String),
    Ping,
    Pong,
    Close(Option<u16>),
    Other(u8),
}

impl RawWs {
    /// Performs the upgrade by hand; panics unless the server answers 101.
    pub async fn connect(node: &Herald, token: &str) -> RawWs {
        let mut stream = TcpStream::connect(("127.0.0.1", node.port))
            .await
            .expect("tcp connect");
        let req = format!(
            "GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            node.port
        );
        stream
            .write_all(req.as_bytes())
            .await
            .expect("send upgrade");
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .expect("upgrade response in time")
                .expect("read upgrade response");
            assert!(n > 0, "connection closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "expected 101 Switching Protocols, got: {head}"
        );
        assert!(
            head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "wrong Sec-WebSocket-Accept in: {head}"
        );
        RawWs {
            stream,
            buf: buf[end..].to_vec(),
        }
    }

    /// Sends one masked client frame.
    pub async fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        let mut out = vec![0x80 | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= u16::MAX as usize {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&out).await.expect("send frame");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(0x1, text.as_bytes()).await;
    }

    /// Next frame; `Ok(None)` when the connection ended, `Err(())` on timeout.
    pub async fn next_frame(&mut self, timeout: Duration) -> Result<Option<RawFrame>, ()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(Some(frame));
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Parses one unmasked server frame from the front of `buf`.
fn parse_server_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let (len, mut pos) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => {
            let b: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if buf[1] & 0x80 != 0 {
        pos += 4; // a server must not mask, but skip a mask key if one is there
    }
    let payload = buf.get(pos..pos + len)?;
    let frame = match opcode {
        0x1 => RawFrame::Text(String::from_utf8_lossy(payload).to_string()),
        0x8 => RawFrame::Close(
            (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
        ),
        0x9 => RawFrame::Ping,
        0xA => RawFrame::Pong,
        other => RawFrame::Other(other),
    };
    Some((frame, pos + len))
}
