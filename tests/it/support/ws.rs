//! WebSocket clients: tungstenite for ordinary sessions ([`connect`], [`Client`]), and
//! [`RawWs`], a raw-TCP client that sends exactly the bytes a test writes and never answers
//! a ping. [`client_frame`] is the suite's one masked-frame encoder and
//! [`parse_server_frame`] its one server-frame parser.

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
    open_with_authorization(url, &format!("Bearer {token}")).await
}

/// Opens a WebSocket to `url` with this `Authorization` header value.
pub async fn open_with_authorization(url: &str, authorization: &str) -> Result<Ws, WsError> {
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        authorization.parse().expect("header value"),
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

/// The masking key of every client frame sent by [`RawWs`] (any key is valid).
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The RFC 6455 sample key and the accept value a server must answer it with.
const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const SAMPLE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// One masked client frame: `opcode` with the FIN bit if `fin`, any payload length.
pub fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![opcode | if fin { 0x80 } else { 0 }];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(0x80 | 126);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    out
}

/// A frame as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFrame {
    pub opcode: u8,
    /// Whether the mask bit was set (a server must never set it); the payload is unmasked.
    pub masked: bool,
    pub payload: Vec<u8>,
}

/// A server frame by kind, as [`RawWs::next_frame`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawFrame {
    Text(String),
    Ping,
    Pong,
    Close(Option<u16>),
    Other(u8),
}

impl From<ServerFrame> for RawFrame {
    fn from(f: ServerFrame) -> Self {
        let p = f.payload;
        match f.opcode {
            0x1 => RawFrame::Text(String::from_utf8_lossy(&p).to_string()),
            0x8 => RawFrame::Close((p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]))),
            0x9 => RawFrame::Ping,
            0xA => RawFrame::Pong,
            other => RawFrame::Other(other),
        }
    }
}

/// Parses one whole frame from the front of `buf`; returns it and the bytes it used, or
/// `None` while the frame is incomplete.
fn parse_server_frame(buf: &[u8]) -> Option<(ServerFrame, usize)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let (len, mut pos) = match b1 & 0x7f {
        126 => (
            usize::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])),
            4,
        ),
        127 => {
            let b: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            (usize::try_from(u64::from_be_bytes(b)).ok()?, 10)
        }
        n => (usize::from(n), 2),
    };
    let masked = b1 & 0x80 != 0;
    let mask: Option<[u8; 4]> = if masked {
        let m = buf.get(pos..pos + 4)?.try_into().ok()?;
        pos += 4;
        Some(m)
    } else {
        None
    };
    let end = pos.checked_add(len)?;
    let mut payload = buf.get(pos..end)?.to_vec();
    if let Some(m) = mask {
        payload
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b ^= m[i % 4]);
    }
    let frame = ServerFrame {
        opcode: b0 & 0x0f,
        masked,
        payload,
    };
    Some((frame, end))
}

/// A hand-rolled WebSocket client over TCP: it sends exactly what the test writes (frames
/// from [`client_frame`], or any bytes) and never answers a ping, unlike tungstenite.
pub struct RawWs {
    stream: TcpStream,
    /// Bytes read but not yet parsed.
    buf: Vec<u8>,
}

impl RawWs {
    /// Performs the upgrade for `token`; panics unless the server answers 101 with the
    /// right Sec-WebSocket-Accept within [`WAIT`].
    pub async fn connect(node: &Herald, token: &str) -> RawWs {
        Self::connect_with(node, token, &[], WAIT).await
    }

    /// Like [`RawWs::connect`], with `extra` bytes sent in the same write as the upgrade
    /// request, and `timeout` for the whole handshake. Bytes the server sent right after
    /// its 101 response are kept for [`RawWs::read_frame`].
    pub async fn connect_with(
        node: &Herald,
        token: &str,
        extra: &[u8],
        timeout: Duration,
    ) -> RawWs {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut stream =
            tokio::time::timeout_at(deadline, TcpStream::connect(("127.0.0.1", node.port)))
                .await
                .expect("tcp connect in time")
                .expect("tcp connect");
        let mut req = format!(
            "GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: {SAMPLE_KEY}\r\n\r\n",
            node.port
        )
        .into_bytes();
        req.extend_from_slice(extra);
        stream.write_all(&req).await.expect("send upgrade");
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
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
            head.contains(SAMPLE_ACCEPT),
            "wrong Sec-WebSocket-Accept in: {head}"
        );
        RawWs {
            stream,
            buf: buf[end..].to_vec(),
        }
    }

    /// Writes `bytes` as they are (a frame, part of one, or garbage).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send bytes");
        self.stream.flush().await.expect("flush");
    }

    /// Sends one masked client frame with the FIN bit.
    pub async fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        self.send_raw(&client_frame(opcode, true, payload)).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(0x1, text.as_bytes()).await;
    }

    /// Next server frame as sent; `Ok(None)` when the connection ended, `Err(())` on
    /// timeout.
    pub async fn read_frame(&mut self, timeout: Duration) -> Result<Option<ServerFrame>, ()> {
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

    /// Next server frame by kind; `Ok(None)` when the connection ended, `Err(())` on
    /// timeout.
    pub async fn next_frame(&mut self, timeout: Duration) -> Result<Option<RawFrame>, ()> {
        Ok(self.read_frame(timeout).await?.map(RawFrame::from))
    }
}
