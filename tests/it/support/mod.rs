//! Test harness shared by every module of the `it` binary: a private redis-server per test
//! on a free loopback port ([`RedisServer`]), a Sentinel set ([`SentinelSet`]: master,
//! replica, three sentinels) or a Redis Cluster ([`RedisCluster`]: three masters, three
//! replicas), real `herald` processes ([`Herald`]), JWT
//! minting, WebSocket clients (tungstenite and raw TCP), a fault-injecting TCP proxy, nginx,
//! a Prometheus text parser, and polling helpers. Nothing here touches a Redis it did not
//! start, and nothing waits with a fixed sleep for a condition: [`eventually`] polls it
//! against a deadline.
//!
//! # Concurrency
//!
//! Every integration test is in this one binary, so libtest runs tests of different modules
//! side by side (`--test-threads`, the number of CPUs by default). Tests share nothing: each
//! starts its own redis-server on its own port with its own key prefix, its own herald
//! processes (log files named by port), its own proxy and nginx run directory. That is why
//! there is no serial group or global lock, and a new test must keep it so: own every
//! process and port it uses, bound every load loop, and wait for conditions with
//! [`eventually`] and a deadline.

mod failover;
mod nginx;
mod node;
pub mod prom;
mod proxy;
mod redis;
mod redis_cluster;
mod sentinel;
mod sse;
mod tls;
mod ws;

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

pub use self::failover::{not_ready_window, spawn_reader, wait_received, Produced, Producer};
pub use self::nginx::{nginx_bin, Nginx};
pub use self::node::{herald_bin, Herald, NodeOpts};
pub use self::proxy::Proxy;
pub use self::redis::RedisServer;
pub use self::redis_cluster::RedisCluster;
pub use self::sentinel::SentinelSet;
pub use self::sse::Sse;
pub use self::tls::TestCa;
pub use self::ws::{
    assert_silent, client_frame, close_client, connect, connect_small_rcvbuf, connect_url,
    expect_close, open, open_bearer, open_with_authorization, recv_json, recv_message,
    refused_status, refused_status_bearer, send_text, Client, Ended, RawFrame, RawWs, Ws,
};

pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdefghij";
pub const API_KEY: &str = "test-api-key-0123456789";

/// Generous deadline for conditions on a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(20);

/// A loopback port that was free a moment ago (the listener is closed again at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Where herald processes write their logs: `target/tmp/herald-test-logs`.
fn log_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("herald-test-logs");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Polls `f` every 50 ms until it returns `Some`, or panics with `what` after `timeout`.
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

// ===== tokens =====

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An HS256 JWT with `claims`, signed with `secret`.
pub fn token_with(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode jwt")
}

/// A valid token for `user` joining `topics`, good for an hour.
pub fn token(user: &str, topics: &[&str]) -> String {
    token_with(
        &serde_json::json!({"sub": user, "exp": now_secs() + 3600, "topics": topics}),
        JWT_SECRET,
    )
}
