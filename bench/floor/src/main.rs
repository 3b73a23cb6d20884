//! `herald-floor`: the floor of `bench/compare.sh`, the smallest server that does herald's
//! observable job, so every figure in the comparison shows herald's distance to what the
//! hardware and the kernel allow.
//!
//! What it does, as herald does it: `GET /ws?token=<HS256 JWT>` upgrades to a WebSocket and
//! sends a `welcome` frame once the session's channels are subscribed; a message published
//! on `<prefix>:user:{<sub>}`, `<prefix>:topic:{<t>}` (for each of the token's `topics`) or
//! `<prefix>:broadcast` reaches the session as
//! `{"type":"message","channel":"user:42","data":<payload>}` (with `"id"` for a durable
//! `\0<id>\0` envelope). `GET /readyz` answers 200. One Redis pub/sub connection for the
//! whole process, one channel subscription per user (not a pattern), one frame per message
//! shared by every recipient and written with non-blocking vectored writes.
//!
//! What it leaves out on purpose (this is the floor, not a product): presence, pings and
//! idle timeouts, payload validation, acks and the inbox, metrics, draining, any limit but
//! a per-session backlog cap. It runs on one thread.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, IoSlice};
use std::rc::Rc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::LocalSet;

#[derive(Debug, Parser)]
#[command(name = "herald-floor", about = "The floor server of bench/compare.sh")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    #[arg(long)]
    redis_url: String,
    #[arg(long, default_value = "herald")]
    prefix: String,
    #[arg(long, env = "HERALD_FLOOR_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// A session whose unsent frames exceed this many bytes is closed (herald's outbox
    /// rule, simplified), so a reader that stopped cannot grow the process.
    #[arg(long, default_value_t = 1 << 20)]
    max_backlog_bytes: usize,
}

/// Request heads above this size are refused (herald allows more; the bench sends ~400 B).
const MAX_HEAD: usize = 8 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames one vectored write hands to the kernel at most.
const IOV_MAX: usize = 64;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    LocalSet::new().block_on(&rt, run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let client = redis::Client::open(args.redis_url.as_str())?;
    let (sink, mut messages) = client.get_async_pubsub().await?.split();
    let broadcast = format!("{}:broadcast", args.prefix);
    sink.clone().subscribe(&broadcast).await?;
    let hub = Rc::new(Hub {
        prefix: format!("{}:", args.prefix),
        broadcast,
        key: jsonwebtoken::DecodingKey::from_secret(args.jwt_secret.as_bytes()),
        max_backlog: args.max_backlog_bytes,
        sink,
        channels: RefCell::new(HashMap::new()),
        all: RefCell::new(HashMap::new()),
        next_id: Cell::new(0),
    });

    let listener = TcpListener::bind(&args.listen).await?;
    eprintln!("herald-floor listening on {}", listener.local_addr()?);
    let accept_hub = hub.clone();
    tokio::task::spawn_local(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::task::spawn_local(serve(accept_hub.clone(), stream));
                }
                // Out of descriptors, typically: pause instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });

    while let Some(msg) = messages.next().await {
        hub.deliver(msg.get_channel_name(), msg.get_payload_bytes());
    }
    anyhow::bail!("the Redis pub/sub connection ended")
}

/// Every live session, by id and by the channels it listens on.
struct Hub {
    /// `<prefix>:`, stripped from Redis channel names to make the frame's `channel`.
    prefix: String,
    broadcast: String,
    key: jsonwebtoken::DecodingKey,
    max_backlog: usize,
    sink: redis::aio::PubSubSink,
    channels: RefCell<HashMap<String, Vec<Rc<Conn>>>>,
    all: RefCell<HashMap<u64, Rc<Conn>>>,
    next_id: Cell<u64>,
}

impl Hub {
    /// One frame for the message, written to every recipient.
    fn deliver(&self, channel: &str, payload: &[u8]) {
        let Some(name) = channel.strip_prefix(&self.prefix) else {
            return;
        };
        // Redis channels carry the user id or topic as a hash tag (`user:{42}`); clients see
        // herald's plain name (`user:42`). Names never contain braces, so dropping them is
        // exact.
        let plain: String = name.chars().filter(|c| !matches!(c, '{' | '}')).collect();
        let frame = message_frame(&plain, payload);
        if channel == self.broadcast {
            for conn in self.all.borrow().values() {
                conn.send(&frame, self.max_backlog);
            }
        } else if let Some(conns) = self.channels.borrow().get(channel) {
            for conn in conns {
                conn.send(&frame, self.max_backlog);
            }
        }
    }

    /// Subscribes the channels no session listens on yet, then adds `conn` to them and
    /// sends its welcome without yielding, so no message frame can precede the welcome.
    async fn join(
        &self,
        conn: &Rc<Conn>,
        channels: &[String],
        welcome: Bytes,
    ) -> redis::RedisResult<()> {
        for ch in channels {
            let known = self.channels.borrow().contains_key(ch);
            if !known {
                self.sink.clone().subscribe(ch).await?;
            }
        }
        self.all.borrow_mut().insert(conn.id, conn.clone());
        let mut map = self.channels.borrow_mut();
        for ch in channels {
            map.entry(ch.clone()).or_default().push(conn.clone());
        }
        conn.send(&welcome, self.max_backlog);
        Ok(())
    }

    async fn leave(&self, conn: &Rc<Conn>, channels: &[String]) {
        self.all.borrow_mut().remove(&conn.id);
        for ch in channels {
            let last = {
                let mut map = self.channels.borrow_mut();
                match map.get_mut(ch) {
                    Some(list) => {
                        list.retain(|c| c.id != conn.id);
                        let empty = list.is_empty();
                        if empty {
                            map.remove(ch);
                        }
                        empty
                    }
                    None => false,
                }
            };
            // A joiner that finds the channel gone subscribes it again; its SUBSCRIBE is
            // queued on the one pub/sub connection after this UNSUBSCRIBE.
            if last {
                let _ = self.sink.clone().unsubscribe(ch).await;
            }
        }
    }
}

/// One WebSocket session after the handshake.
struct Conn {
    id: u64,
    stream: TcpStream,
    /// Frames not yet (fully) written; the first one from `offset`.
    backlog: RefCell<VecDeque<Bytes>>,
    offset: Cell<usize>,
    backlog_bytes: Cell<usize>,
    wake: Notify,
    dead: Cell<bool>,
}

impl Conn {
    /// Writes `frame` now if nothing is queued and the socket takes it; queues the rest.
    fn send(&self, frame: &Bytes, max_backlog: usize) {
        if self.dead.get() {
            return;
        }
        let mut backlog = self.backlog.borrow_mut();
        let mut written = 0;
        if backlog.is_empty() {
            match self.stream.try_write(frame) {
                Ok(n) if n == frame.len() => return,
                Ok(n) => written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.kill();
                    return;
                }
            }
            self.offset.set(written);
        }
        let queued = self.backlog_bytes.get() + frame.len() - written;
        if queued > max_backlog {
            self.kill();
            return;
        }
        self.backlog_bytes.set(queued);
        backlog.push_back(frame.clone());
        self.wake.notify_one();
    }

    fn kill(&self) {
        self.dead.set(true);
        self.wake.notify_one();
    }

    /// Writes as much of the backlog as the socket takes, in one vectored write per round.
    fn flush(&self) -> io::Result<()> {
        let mut backlog = self.backlog.borrow_mut();
        while !backlog.is_empty() {
            let off = self.offset.get();
            let slices: Vec<IoSlice<'_>> = backlog
                .iter()
                .take(IOV_MAX)
                .enumerate()
                .map(|(i, f)| IoSlice::new(if i == 0 { &f[off..] } else { &f[..] }))
                .collect();
            let mut n = self.stream.try_write_vectored(&slices)?;
            self.backlog_bytes
                .set(self.backlog_bytes.get().saturating_sub(n));
            while n > 0 {
                let Some(front) = backlog.front() else { break };
                let left = front.len() - self.offset.get();
                if n >= left {
                    n -= left;
                    backlog.pop_front();
                    self.offset.set(0);
                } else {
                    self.offset.set(self.offset.get() + n);
                    n = 0;
                }
            }
        }
        Ok(())
    }
}

/// One accepted connection: the request head, then `/readyz`, a refusal or a session.
async fn serve(hub: Rc<Hub>, mut stream: TcpStream) {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => head,
        _ => return,
    };
    let Some(req) = Request::parse(&head) else {
        let _ = stream
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await;
        return;
    };
    if req.path == "/readyz" {
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
            .await;
        return;
    }
    let claims = match (
        req.path.as_str(),
        req.token.as_deref(),
        req.ws_key.as_deref(),
    ) {
        ("/ws", Some(token), Some(_)) => match verify(&hub.key, token) {
            Some(claims) => claims,
            None => {
                let _ = stream.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                return;
            }
        },
        _ => {
            let _ = stream
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
            return;
        }
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(
        req.ws_key.unwrap_or_default().as_bytes(),
    );
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-accept: {accept}\r\n\r\n"
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }

    let mut channels = vec![format!("{}user:{{{}}}", hub.prefix, claims.sub)];
    let mut topics: Vec<String> = claims.topics.unwrap_or_default();
    topics.sort();
    topics.dedup();
    channels.extend(
        topics
            .iter()
            .map(|t| format!("{}topic:{{{}}}", hub.prefix, t)),
    );

    let id = hub.next_id.get() + 1;
    hub.next_id.set(id);
    let conn = Rc::new(Conn {
        id,
        stream,
        backlog: RefCell::new(VecDeque::new()),
        offset: Cell::new(0),
        backlog_bytes: Cell::new(0),
        wake: Notify::new(),
        dead: Cell::new(false),
    });
    let welcome = format!(
        r#"{{"type":"welcome","session":"floor-{id}","user":{},"node":"floor"}}"#,
        json_string(&claims.sub)
    );
    if hub
        .join(&conn, &channels, text_frame(welcome.as_bytes()))
        .await
        .is_ok()
    {
        session(&conn).await;
    }
    hub.leave(&conn, &channels).await;
}

/// The session loop: flushes the backlog when the socket is writable, reads (and discards)
/// client frames, answers a close frame and ends.
async fn session(conn: &Conn) {
    let mut buf = [0u8; 512];
    let mut closing = false;
    loop {
        if conn.dead.get() {
            return;
        }
        let pending = !conn.backlog.borrow().is_empty();
        tokio::select! {
            r = conn.stream.readable(), if !closing => {
                if r.is_err() {
                    return;
                }
                match conn.stream.try_read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if has_close_frame(&buf[..n]) {
                            // Close frame with code 1000; the client closes the TCP side.
                            conn.send(&Bytes::from_static(&[0x88, 0x02, 0x03, 0xe8]), usize::MAX);
                            closing = true;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
            r = conn.stream.writable(), if pending => {
                if r.is_err() {
                    return;
                }
                match conn.flush() {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
                if closing && conn.backlog.borrow().is_empty() {
                    return;
                }
            }
            _ = conn.wake.notified() => {}
            // A closing session whose peer never closes its side is dropped after a while.
            _ = tokio::time::sleep(Duration::from_secs(5)), if closing => return,
        }
    }
}

/// Whether the first client frame in `data` is a close frame (opcode 8). Clients send
/// nothing else the floor acts on; later frames in the same read are not examined.
fn has_close_frame(data: &[u8]) -> bool {
    data.first().is_some_and(|b| b & 0x0f == 0x8)
}

async fn read_head(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(head);
        }
        if head.len() > MAX_HEAD {
            return Err(io::ErrorKind::InvalidData.into());
        }
    }
}

struct Request {
    path: String,
    token: Option<String>,
    ws_key: Option<String>,
}

impl Request {
    fn parse(head: &[u8]) -> Option<Request> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if !req.parse(head).ok()?.is_complete() || req.method != Some("GET") {
            return None;
        }
        let target = req.path?;
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        // JWTs are URL-safe: the bench does not percent-encode them.
        let token = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(str::to_owned);
        let ws_key = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(|v| v.trim().to_owned());
        Some(Request {
            path: path.to_owned(),
            token,
            ws_key,
        })
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    topics: Option<Vec<String>>,
}

fn verify(key: &jsonwebtoken::DecodingKey, token: &str) -> Option<Claims> {
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.required_spec_claims = HashSet::from(["sub".to_owned()]);
    jsonwebtoken::decode::<Claims>(token, key, &validation)
        .ok()
        .map(|d| d.claims)
}

/// `{"type":"message","channel":"<name>"[,"id":"<id>"],"data":<payload>}` as one
/// unmasked text frame. A durable envelope `\0<id>\0<payload>` gives the `id`.
fn message_frame(name: &str, payload: &[u8]) -> Bytes {
    let (id, data) = match payload.strip_prefix(b"\0") {
        Some(rest) => match rest.iter().position(|&b| b == 0) {
            Some(end) => (Some(&rest[..end]), &rest[end + 1..]),
            None => (None, payload),
        },
        None => (None, payload),
    };
    let mut body = Vec::with_capacity(data.len() + name.len() + 64);
    body.extend_from_slice(br#"{"type":"message","channel":""#);
    body.extend_from_slice(name.as_bytes());
    body.push(b'"');
    if let Some(id) = id {
        body.extend_from_slice(br#","id":""#);
        body.extend_from_slice(id);
        body.push(b'"');
    }
    body.extend_from_slice(br#","data":"#);
    body.extend_from_slice(data);
    body.push(b'}');
    text_frame(&body)
}

/// An unmasked, unfragmented text frame (RFC 6455 5.2).
fn text_frame(payload: &[u8]) -> Bytes {
    let mut f = BytesMut::with_capacity(payload.len() + 10);
    f.put_u8(0x81);
    match payload.len() {
        n if n < 126 => f.put_u8(n as u8),
        n if n <= 0xffff => {
            f.put_u8(126);
            f.put_u16(n as u16);
        }
        n => {
            f.put_u8(127);
            f.put_u64(n as u64);
        }
    }
    f.put_slice(payload);
    f.freeze()
}

/// A JSON string literal for `s` (user ids are printable, but quote what must be).
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_the_right_length_encoding() {
        assert_eq!(&text_frame(b"hi")[..], &[0x81, 2, b'h', b'i']);
        let mid = text_frame(&[b'x'; 200]);
        assert_eq!(&mid[..4], &[0x81, 126, 0, 200]);
        let big = text_frame(&vec![b'x'; 70_000]);
        assert_eq!(big[1], 127);
        assert_eq!(big.len(), 70_000 + 10);
    }

    #[test]
    fn message_frames_match_heralds() {
        let f = message_frame("user:42", br#"{"a":1}"#);
        assert_eq!(
            &f[2..],
            br#"{"type":"message","channel":"user:42","data":{"a":1}}"#
        );
        let d = message_frame("user:42", b"\x001-0\x00{\"a\":1}");
        assert_eq!(
            &d[2..],
            br#"{"type":"message","channel":"user:42","id":"1-0","data":{"a":1}}"#
        );
    }

    #[test]
    fn request_heads_give_path_token_and_key() {
        let head =
            b"GET /ws?x=1&token=abc.def HTTP/1.1\r\nHost: a\r\nSec-WebSocket-Key: k==\r\n\r\n";
        let r = Request::parse(head).unwrap();
        assert_eq!(r.path, "/ws");
        assert_eq!(r.token.as_deref(), Some("abc.def"));
        assert_eq!(r.ws_key.as_deref(), Some("k=="));
        assert!(Request::parse(b"POST /ws HTTP/1.1\r\n\r\n").is_none());
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\u{1}"), r#""a\"b\\c\u0001""#);
    }
}
