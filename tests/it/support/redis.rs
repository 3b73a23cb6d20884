//! A redis-server owned by one test.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, WAIT};

/// A redis-server owned by one test, on its own port, persisting nothing. Killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    /// The default user's password, when the server requires one.
    password: Option<String>,
    /// TLS only (no plain port): the harness then checks it is up with a TCP connect and
    /// cannot run commands on it.
    tls: bool,
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
            password: None,
            tls: false,
        };
        r.spawn();
        r
    }

    /// Starts a server whose default user needs `password` (the harness's own commands
    /// authenticate with it).
    pub fn start_with_password(password: &str) -> Self {
        Self::start_with_password_and(password, &[])
    }

    /// The same, with extra `--name value` config arguments.
    pub fn start_with_password_and(password: &str, extra: &[&str]) -> Self {
        let mut args = vec!["--requirepass".to_string(), password.to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut r = RedisServer {
            port: free_port(),
            child: None,
            extra: args,
            password: Some(password.into()),
            tls: false,
        };
        r.spawn();
        r
    }

    /// Starts a server that speaks TLS only, with `cert`/`key` (PEM files).
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Self {
        Self::start_tls_with(cert, key, &[])
    }

    /// The same, with extra `--name value` config arguments.
    pub fn start_tls_with(cert: &std::path::Path, key: &std::path::Path, extra: &[&str]) -> Self {
        let port = free_port();
        let mut args: Vec<String> = vec![
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            cert.display().to_string(),
            "--tls-key-file".into(),
            key.display().to_string(),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut r = RedisServer {
            port,
            child: None,
            extra: args,
            password: None,
            tls: true,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let plain_port = if self.tls { 0 } else { self.port };
        let child = Command::new(bin)
            .args(["--port", &plain_port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see README)");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while !self.up() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URL a node (or the harness) connects with: `rediss://` for a TLS server, with
    /// the password when there is one.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        match &self.password {
            Some(pw) => format!("{scheme}://:{pw}@127.0.0.1:{}/", self.port),
            None => format!("{scheme}://127.0.0.1:{}/", self.port),
        }
    }

    /// The same server for another user (an ACL user the test created).
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("redis://{user}:{password}@127.0.0.1:{}/", self.port)
    }

    fn up(&self) -> bool {
        if self.tls {
            std::net::TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1)).is_ok()
        } else {
            self.ping().is_ok()
        }
    }

    /// The loopback address it listens on (for a proxy in front of it).
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn conn(&self) -> redis::RedisResult<redis::Connection> {
        assert!(
            !self.tls,
            "the harness runs no commands on a TLS-only server"
        );
        let client = redis::Client::open(self.url())?;
        client.get_connection_with_timeout(Duration::from_secs(2))
    }

    /// Runs one command as another user.
    pub fn cmd_as<T: redis::FromRedisValue>(
        &self,
        user: &str,
        password: &str,
        args: &[&str],
    ) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.url_as(user, password))?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut conn)
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
    /// How many sessions a user's presence hash holds (its fields but the state field `=`).
    pub fn session_fields(&self, key: &str) -> usize {
        let fields: Vec<String> = self.cmd(&["HKEYS", key]).expect("HKEYS");
        fields.iter().filter(|f| f.as_str() != "=").count()
    }

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
