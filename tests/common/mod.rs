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

pub const JWT_SECRET: &str = "test-jwt-secret-0123456789";
pub const API_KEY: &str = "test-api-key-0123456789";

/// Generous deadline for conditions on a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn free_port() -> u16 {
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
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
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
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra `--name value` config arguments.
    pub fn start_with(extra: &[&str]) -> Self {
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

    pub fn url(&self) -> String {
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
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut self.conn()?)
    }

    pub fn publish(&self, channel: &str, payload: &[u8]) -> i64 {
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query(&mut self.conn().expect("redis connection")) // safe: test harness
            .expect("publish") // safe: test harness
    }

    /// Every key under `prefix:`, found with SCAN.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
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
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
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
pub struct NodeOpts {
    pub redis_url: Option<String>,
    pub prefix: String,
    pub node_id: String,
    pub presence_ttl: String,
    pub dev: bool,
    pub extra: Vec<String>,
}

impl NodeOpts {
    pub fn cluster(redis: &RedisServer, prefix: &str, node_id: &str) -> Self {
        NodeOpts {
            redis_url: Some(redis.url()),
            prefix: prefix.to_string(),
            node_id: node_id.to_string(),
            presence_ttl: "3".into(),
            dev: false,
            extra: Vec::new(),
        }
    }

    pub fn standalone(node_id: &str) -> Self {
        NodeOpts {
            redis_url: None,
            prefix: "herald".into(),
            node_id: node_id.to_string(),
            presence_ttl: "3".into(),
            dev: false,
            extra: Vec::new(),
        }
    }

    pub fn arg(mut self, name: &str, value: &str) -> Self {
        self.extra.push(name.to_string());
        self.extra.push(value.to_string());
        self
    }

    pub fn flag(mut self, name: &str) -> Self {
        self.extra.push(name.to_string());
        self
    }
}

/// One running `herald` binary.
pub struct Herald {
    pub port: u16,
    pub node_id: String,
    pub log: PathBuf,
    child: Option<Child>,
    pub http: reqwest::Client,
}

pub fn herald_bin() -> &'static str {
    env!("CARGO_BIN_EXE_herald")
}

impl Herald {
    /// Spawns a node and waits for /healthz (not for readiness: tests decide that).
    pub async fn spawn(opts: NodeOpts) -> Herald {
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

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://127.0.0.1:{}/ws{}", self.port, query)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn signal(&self, sig: &str) {
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
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit; returns its exit status or None after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
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

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn ready(&self) -> bool {
        matches!(self.http.get(self.url("/readyz")).send().await, Ok(r) if r.status() == 200)
    }

    pub async fn wait_ready(&self) {
        eventually(WAIT, &format!("{} ready", self.node_id), || async {
            self.ready().await.then_some(())
        })
        .await
    }

    pub async fn wait_not_ready(&self) {
        eventually(WAIT, &format!("{} not ready", self.node_id), || async {
            (!self.ready().await).then_some(())
        })
        .await
    }

    /// GET with the API key; returns (status, JSON body or Null).
    pub async fn api_get(&self, path: &str) -> (u16, Value) {
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
    pub async fn api_post(&self, path: &str, body: &Value) -> (u16, Value) {
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

    pub async fn publish(&self, body: Value) {
        let (status, resp) = self.api_post("/api/publish", &body).await;
        assert_eq!(status, 200, "publish failed: {resp}");
    }

    /// Sessions of `user` as reported by this node.
    pub async fn presence_sessions(&self, user: &str) -> Vec<Value> {
        let (status, body) = self.api_get(&format!("/api/presence/{user}")).await;
        assert_eq!(status, 200, "presence: {body}");
        body["sessions"].as_array().cloned().unwrap_or_default()
    }

    pub async fn stats(&self) -> Value {
        let (status, body) = self.api_get("/api/stats").await;
        assert_eq!(status, 200, "stats: {body}");
        body
    }

    /// The value of a Prometheus sample whose line starts with `prefix` (summed).
    pub async fn metric(&self, prefix: &str) -> f64 {
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

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn token_with(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode jwt") // safe: test harness
}

/// A valid token for `user` joining `topics`, good for an hour.
pub fn token(user: &str, topics: &[&str]) -> String {
    token_with(
        serde_json::json!({"sub": user, "exp": now_secs() + 3600, "topics": topics}),
        JWT_SECRET,
    )
}

// ===== WebSocket client =====

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

/// Opens a WebSocket with `?token=` and reads the welcome.
pub async fn connect(node: &Herald, user: &str, topics: &[&str]) -> Client {
    connect_url(&node.ws_url(&format!("?token={}", token(user, topics)))).await
}

pub async fn connect_url(url: &str) -> Client {
    let mut ws = open(url).await.expect("websocket connect"); // safe: test harness
    let welcome = recv_json(&mut ws, WAIT).await.expect("welcome frame"); // safe: test harness
    assert_eq!(
        welcome["type"], "welcome",
        "first frame must be welcome: {welcome}"
    );
    Client { ws, welcome }
}

/// Opens a WebSocket without reading anything; the error carries the HTTP status.
pub async fn open(url: &str) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
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
pub async fn refused_status(url: &str) -> u16 {
    match open(url).await {
        Ok(_) => panic!("upgrade to {url} should have been refused"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error for {url}: {e}"),
    }
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
        .expect("send"); // safe: test harness
}
