//! A redis-server owned by one test.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, WAIT};

/// A redis-server owned by one test, on its own port, persisting nothing. Killed on drop.
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
            .expect("redis-server must be installed (see README)");
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

    /// The loopback address it listens on (for a proxy in front of it).
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
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
            .query(&mut self.conn().expect("redis connection"))
            .expect("publish")
    }

    /// Publishes `payload` on `channel` `n` times over one pipelined connection; returns the
    /// summed receiver counts.
    pub fn publish_many(&self, channel: &str, payload: &[u8], n: usize) -> i64 {
        let mut conn = self.conn().expect("redis connection");
        let mut pipe = redis::pipe();
        for _ in 0..n {
            pipe.cmd("PUBLISH").arg(channel).arg(payload);
        }
        let counts: Vec<i64> = pipe.query(&mut conn).expect("pipelined publish");
        counts.iter().sum()
    }

    /// Every key under `prefix:`, found with SCAN.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let mut conn = self.conn().expect("redis connection");
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
                .expect("scan");
            out.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort();
        out
    }

    /// `PUBSUB CHANNELS <pattern>`, sorted.
    pub fn pubsub_channels(&self, pattern: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .cmd(&["PUBSUB", "CHANNELS", pattern])
            .expect("pubsub channels");
        v.sort();
        v
    }

    /// `PUBSUB NUMSUB <channel>`: how many connections (nodes) subscribe to `channel`.
    pub fn numsub(&self, channel: &str) -> i64 {
        let (_, n): (String, i64) = self
            .cmd(&["PUBSUB", "NUMSUB", channel])
            .expect("pubsub numsub");
        n
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
