//! Test harness: a private redis-server per test on a free loopback port, real `herald`
//! processes, JWT minting, a WebSocket client and polling helpers. Nothing here touches a
//! Redis it did not start.
#![allow(dead_code)]

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub(crate) const JWT_SECRET: &str = "test-jwt-secret-0123456789";
pub(crate) const API_KEY: &str = "test-api-key-0123456789";

/// Generous deadline for conditions on a loaded 2-core machine.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port") // safe: test harness
}

fn log_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("herald-test-logs");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub(crate) async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ===== Redis =====

/// A redis-server owned by one test, on its own port, persisting nothing.
pub(crate) struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
}

impl RedisServer {
    pub(crate) fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra `--name value` config arguments.
    pub(crate) fn start_with(extra: &[&str]) -> Self {
        let mut r = RedisServer {
            port: free_port(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see README)"); // safe: test harness
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while self.ping().is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn conn(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        client.get_connection_with_timeout(Duration::from_secs(2))
    }

    fn ping(&self) -> redis::RedisResult<String> {
        redis::cmd("PING").query(&mut self.conn()?)
    }

    /// Runs one command against this server.
    pub(crate) fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut self.conn()?)
    }

    pub(crate) fn publish(&self, channel: &str, payload: &[u8]) -> i64 {
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query(&mut self.conn().expect("redis connection")) // safe: test harness
            .expect("publish") // safe: test harness
    }

    /// Every key under `prefix:`, found with SCAN.
    pub(crate) fn keys(&self, prefix: &str) -> Vec<String> {
        let mut conn = self.conn().expect("redis connection"); // safe: test harness
        let mut cursor = 0u64;
        let mut out = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:*"))
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)
                .expect("scan"); // safe: test harness
            out.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort();
        out
    }

    /// Stops the server (SIGKILL: Redis loses everything, like a crash without persistence).
    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub(crate) fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ===== herald processes =====

/// Options for one herald process.
#[derive(Clone)]
pub(crate) struct NodeOpts {
    pub redis_url: Option<String>,
    pub prefix: String,
    pub node_id: String,
    pub presence_ttl: String,
    pub dev: bool,
    pub extra: Vec<String>,
}

impl NodeOpts {
    pub(crate) fn cluster(redis: &RedisServer, prefix: &str, node_id: &str) -> Self {
        NodeOpts {
            redis_url: Some(redis.url()),
            prefix: prefix.to_string(),
            node_id: node_id.to_string(),
            presence_ttl: "3".into(),
            dev: false,
            extra: Vec::new(),
        }
    }

    pub(crate) fn standalone(node_id: &str) -> Self {
        NodeOpts {
            redis_url: None,
            prefix: "herald".into(),
            node_id: node_id.to_string(),
            presence_ttl: "3".into(),
            dev: false,
            extra: Vec::new(),
        }
    }

    pub(crate) fn arg(mut self, name: &str, value: &str) -> Self {
        self.extra.push(name.to_string());
        self.extra.push(value.to_string());
        self
    }

    pub(crate) fn flag(mut self, name: &str) -> Self {
        self.extra.push(name.to_string());
        self
    }
}

/// One running `herald` binary.
pub(crate) struct Herald {
    pub port: u16,
    pub node_id: String,
    pub log: PathBuf,
    child: Option<Child>,
    pub http: reqwest::Client,
}

pub(crate) fn herald_bin() -> &'static str {
    env!("CARGO_BIN_EXE_herald")
}

impl Herald {
    /// Spawns a node and waits for /healthz (not for readiness: tests decide that).
    pub(crate) async fn spawn(opts: NodeOpts) -> Herald {
        let port = free_port();
        let log = log_dir().join(format!("{}-{}.log", opts.node_id, port));
        let logfile = std::fs::File::create(&log).expect("log file"); // safe: test harness
        let mut cmd = Command::new(herald_bin());
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--node-id", &opts.node_id])
            .args(["--prefix", &opts.prefix])
            .args(["--presence-ttl", &opts.presence_ttl])
            .args(&opts.extra)
            .env("HERALD_LOG", "herald=debug,info")
            .env_remove("HERALD_REDIS_URL")
            .env_remove("HERALD_JWT_SECRET")
            .env_remove("HERALD_API_KEY")
            .stdout(Stdio::null())
            .stderr(logfile);
        if let Some(url) = &opts.redis_url {
            cmd.args(["--redis-url", url]);
        }
        if opts.dev {
            cmd.arg("--dev");
        } else {
            cmd.args(["--jwt-secret", JWT_SECRET, "--api-key", API_KEY]);
        }
        let child = cmd.spawn().expect("spawn herald"); // safe: test harness
        let h = Herald {
            port,
            node_id: opts.node_id.clone(),
            log,
            child: Some(child),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("http client"), // safe: test harness
        };
        let url = h.url("/healthz");
        let client = h.http.clone();
        eventually(WAIT, "herald /healthz", || {
            let client = client.clone();
            let url = url.clone();
            async move {
                client
                    .get(&url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            }
        })
        .await;
        h
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub(crate) fn ws_url(&self, query: &str) -> String {
        format!("ws://127.0.0.1:{}/ws{}", self.port, query)
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub(crate) fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let ok = Command::new("kill")
                .args([&format!("-{sig}"), &pid.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "kill -{sig} {pid} failed");
        }
    }

    /// SIGKILL, like a crash.
    pub(crate) fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit; returns its exit status or None after `timeout`.
    pub(crate) async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Some(status);
                }
            } else {
                return None;
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) async fn ready(&self) -> bool {
        matches!(self.http.get(self.url("/readyz")).send().await, Ok(r) if r.status() == 200)
    }

    pub(crate) async fn wait_ready(&self) {
        eventually(WAIT, &format!("{} ready", self.node_id), || async {
            self.ready().await.then_some(())
        })
        .await;
    }

    pub(crate) async fn wait_not_ready(&self) {
        eventually(WAIT, &format!("{} not ready", self.node_id), || async {
            (!self.ready().await).then_some(())
        })
        .await;
    }

    /// GET with the API key; returns (status, JSON body or Null).
    pub(crate) async fn api_get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("api get"); // safe: test harness
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POST JSON with the API key; returns (status, JSON body or Null).
    pub(crate) async fn api_post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(API_KEY)
            .json(body)
            .send()
            .await
            .expect("api post"); // safe: test harness
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub(crate) async fn publish(&self, body: Value) {
        let (status, resp) = self.api_post("/api/publish", &body).await;
        assert_eq!(status, 200, "publish failed: {resp}");
    }

    /// Sessions of `user` as reported by this node.
    pub(crate) async fn presence_sessions(&self, user: &str) -> Vec<Value> {
        let (status, body) = self.api_get(&format!("/api/presence/{user}")).await;
        assert_eq!(status, 200, "presence: {body}");
        body["sessions"].as_array().cloned().unwrap_or_default()
    }

    pub(crate) async fn stats(&self) -> Value {
        let (status, body) = self.api_get("/api/stats").await;
        assert_eq!(status, 200, "stats: {body}");
        body
    }

    /// The value of a Prometheus sample whose line starts with `prefix` (summed).
    pub(crate) async fn metric(&self, prefix: &str) -> f64 {
        let text = match self.http.get(self.url("/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A stopped process ignores SIGKILL until continued on some kernels' views; make
            // sure it can die.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ===== tokens =====

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn token_with(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode jwt") // safe: test harness
}

/// A valid token for `user` joining `topics`, good for an hour.
pub(crate) fn token(user: &str, topics: &[&str]) -> String {
    token_with(
        serde_json::json!({"sub": user, "exp": now_secs() + 3600, "topics": topics}),
        JWT_SECRET,
    )
}

// ===== WebSocket client =====

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A connected client that has read its welcome frame.
pub(crate) struct Client {
    pub ws: Ws,
    pub welcome: Value,
}

/// What a client saw when it stopped receiving.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    Close(u16),
    /// The TCP connection ended without a close frame.
    Dropped,
}

/// Opens a WebSocket with `?token=` and reads the welcome.
pub(crate) async fn connect(node: &Herald, user: &str, topics: &[&str]) -> Client {
    connect_url(&node.ws_url(&format!("?token={}", token(user, topics)))).await
}

pub(crate) async fn connect_url(url: &str) -> Client {
    let mut ws = open(url).await.expect("websocket connect"); // safe: test harness
    let welcome = recv_json(&mut ws, WAIT).await.expect("welcome frame"); // safe: test harness
    assert_eq!(
        welcome["type"], "welcome",
        "first frame must be welcome: {welcome}"
    );
    Client { ws, welcome }
}

/// Opens a WebSocket without reading anything; the error carries the HTTP status.
pub(crate) async fn open(url: &str) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let req = url.into_client_request()?;
    let cfg = WebSocketConfig::default().max_message_size(Some(16 << 20));
    let (ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async_with_config(req, Some(cfg), true),
    )
    .await
    .map_err(|_| tokio_tungstenite::tungstenite::Error::ConnectionClosed)??;
    Ok(ws)
}

/// HTTP status of a refused upgrade (panics if the upgrade succeeded).
pub(crate) async fn refused_status(url: &str) -> u16 {
    match open(url).await {
        Ok(_) => panic!("upgrade to {url} should have been refused"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error for {url}: {e}"),
    }
}

/// Next text frame as JSON, skipping pings; None on timeout or close.
pub(crate) async fn recv_json(ws: &mut Ws, timeout: Duration) -> Option<Value> {
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
pub(crate) async fn recv_message(ws: &mut Ws, timeout: Duration) -> Option<Value> {
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
pub(crate) async fn expect_close(ws: &mut Ws, timeout: Duration) -> Ended {
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
pub(crate) async fn assert_silent(ws: &mut Ws, window: Duration) {
    if let Some(v) = recv_message(ws, window).await {
        panic!("expected no message, got {v}");
    }
}

pub(crate) async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_string()))
        .await
        .expect("send"); // safe: test harness
}

// ===== more helpers (integration suite) =====

impl RedisServer {
    /// Publishes `payload` on `channel` `n` times over one pipelined connection; returns the
    /// summed receiver counts.
    pub(crate) fn publish_many(&self, channel: &str, payload: &[u8], n: usize) -> i64 {
        let mut conn = self.conn().expect("redis connection");
        let mut pipe = redis::pipe();
        for _ in 0..n {
            pipe.cmd("PUBLISH").arg(channel).arg(payload);
        }
        let counts: Vec<i64> = pipe.query(&mut conn).expect("pipelined publish");
        counts.iter().sum()
    }

    /// `PUBSUB CHANNELS <pattern>`, sorted.
    pub(crate) fn pubsub_channels(&self, pattern: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .cmd(&["PUBSUB", "CHANNELS", pattern])
            .expect("pubsub channels");
        v.sort();
        v
    }

    /// `PUBSUB NUMSUB <channel>`: how many connections (nodes) subscribe to `channel`.
    pub(crate) fn numsub(&self, channel: &str) -> i64 {
        let (_, n): (String, i64) = self
            .cmd(&["PUBSUB", "NUMSUB", channel])
            .expect("pubsub numsub");
        n
    }
}

impl Herald {
    /// GET /readyz: (status, body).
    pub(crate) async fn readyz(&self) -> (u16, Value) {
        let r = self
            .http
            .get(self.url("/readyz"))
            .send()
            .await
            .expect("readyz");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Whether this node reports `user` online.
    pub(crate) async fn online(&self, user: &str) -> bool {
        let (status, body) = self.api_get(&format!("/api/presence/{user}")).await;
        assert_eq!(status, 200, "presence: {body}");
        body["online"]
            .as_bool()
            .expect("presence body has a boolean \"online\"")
    }

    /// Node ids listed by this node's /api/stats.
    pub(crate) async fn stats_nodes(&self) -> Vec<String> {
        let stats = self.stats().await;
        let mut ids: Vec<String> = stats["nodes"]
            .as_array()
            .expect("stats.nodes is an array")
            .iter()
            .map(|n| n["node"].as_str().expect("node id").to_string())
            .collect();
        ids.sort();
        ids
    }

    /// Polls until `user`'s sessions as seen by this node are exactly on `nodes` (sorted
    /// node ids, one entry per session).
    pub(crate) async fn wait_presence_nodes(&self, user: &str, nodes: &[&str]) {
        let want: Vec<String> = nodes.iter().map(|s| s.to_string()).collect();
        eventually(
            WAIT,
            &format!("presence of {user} on {nodes:?}, via {}", self.node_id),
            || async {
                let mut got: Vec<String> = self
                    .presence_sessions(user)
                    .await
                    .iter()
                    .map(|s| s["node"].as_str().unwrap_or_default().to_string())
                    .collect();
                got.sort();
                (got == want).then_some(())
            },
        )
        .await;
    }
}

/// Connects with an explicit token in the query string.
pub(crate) async fn connect_token(node: &Herald, token: &str) -> Client {
    connect_url(&node.ws_url(&format!("?token={token}"))).await
}

/// Opens a WebSocket to `url` sending `Authorization: Bearer <token>`.
pub(crate) async fn open_bearer(
    url: &str,
    token: &str,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
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
    .map_err(|_| tokio_tungstenite::tungstenite::Error::ConnectionClosed)??;
    Ok(ws)
}

/// HTTP status of an upgrade refused for a request built from `url` and an optional bearer.
pub(crate) async fn refused_status_bearer(url: &str, token: &str) -> u16 {
    match open_bearer(url, token).await {
        Ok(_) => panic!("upgrade to {url} with a bearer header should have been refused"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error for {url}: {e}"),
    }
}

/// Connects `user` over a socket whose receive buffer is tiny and fixed (no autotuning),
/// so a client that stops reading backs up the server after a few hundred KB, not 30 MB.
pub(crate) async fn connect_small_rcvbuf(node: &Herald, user: &str) -> Client {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", node.port).parse().expect("addr");
    let stream = tokio::time::timeout(WAIT, sock.connect(addr))
        .await
        .expect("connect in time")
        .expect("tcp connect");
    let url = node.ws_url(&format!("?token={}", token(user, &[])));
    let cfg = WebSocketConfig::default().max_message_size(Some(16 << 20));
    let (mut ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async_with_config(url, MaybeTlsStream::Plain(stream), Some(cfg)),
    )
    .await
    .expect("handshake in time")
    .expect("websocket handshake");
    let welcome = recv_json(&mut ws, WAIT).await.expect("welcome frame");
    assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
    Client { ws, welcome }
}

/// Closes from the client side and waits (bounded) for the server's answer.
pub(crate) async fn close_client(mut ws: Ws) {
    let _ = ws.close(None).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, ws.next()).await {}
}

// ===== raw WebSocket over TCP (a client that never answers pings) =====

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A hand-rolled WebSocket client: it sends exactly what the test writes and never answers
/// a ping, unlike tungstenite.
pub(crate) struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// A frame read by [`RawWs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RawFrame {
    Text(String),
    Ping,
    Pong,
    Close(Option<u16>),
    Other(u8),
}

impl RawWs {
    /// Performs the upgrade by hand; panics unless the server answers 101.
    pub(crate) async fn connect(node: &Herald, token: &str) -> RawWs {
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
    pub(crate) async fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
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

    pub(crate) async fn send_text(&mut self, text: &str) {
        self.send_frame(0x1, text.as_bytes()).await;
    }

    /// Next frame; `Ok(None)` when the connection ended, `Err(())` on timeout.
    pub(crate) async fn next_frame(&mut self, timeout: Duration) -> Result<Option<RawFrame>, ()> {
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
