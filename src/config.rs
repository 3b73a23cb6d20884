//! Command-line and environment configuration, and the checks that refuse an unsafe start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

/// Every setting of a herald node. Each flag has an environment-variable twin so the same
/// binary runs from a shell, a systemd unit or a container without wrapper scripts.
#[derive(Debug, Clone, Parser)]
#[command(name = "herald", version, about = "WebSocket notification server")]
pub struct Config {
    /// Address the HTTP/WebSocket server listens on.
    #[arg(long, env = "HERALD_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Redis URL (redis://host:port/db). Without it (or --redis-sentinel) the node runs
    /// standalone with an in-memory broker and presence.
    #[arg(long, env = "HERALD_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Redis Sentinel addresses, comma-separated: `host:port`, or a URL
    /// (`redis://:password@host:port`, `rediss://` for TLS) when the sentinels need a
    /// password. Every Redis connection goes to the master they name (--redis-master-name)
    /// and follows failovers.
    #[arg(
        long,
        env = "HERALD_REDIS_SENTINEL",
        value_delimiter = ',',
        conflicts_with = "redis_url",
        requires = "redis_master_name"
    )]
    pub redis_sentinel: Vec<String>,

    /// The master's name in the sentinels' configuration (`sentinel monitor <name> ...`).
    #[arg(long, env = "HERALD_REDIS_MASTER_NAME", requires = "redis_sentinel")]
    pub redis_master_name: Option<String>,

    /// Password of the Redis master and replicas found through the sentinels (their
    /// `requirepass`; the sentinels' own password goes in their URLs).
    #[arg(
        long,
        env = "HERALD_REDIS_MASTER_PASSWORD",
        hide_env_values = true,
        requires = "redis_sentinel"
    )]
    pub redis_master_password: Option<String>,

    /// Redis Cluster seed nodes, comma-separated: `host:port`, or a URL
    /// (`redis://:password@host:port`, `rediss://` for TLS) when the nodes need a password.
    /// The node learns the rest of the cluster from them and follows failovers, MOVED/ASK
    /// redirections and resharding. User and topic channels become sharded channels
    /// (SSUBSCRIBE/SPUBLISH; docs/redis.md).
    #[arg(
        long,
        env = "HERALD_REDIS_CLUSTER",
        value_delimiter = ',',
        conflicts_with_all = ["redis_url", "redis_sentinel"]
    )]
    pub redis_cluster: Vec<String>,

    /// HMAC secret (HS256/384/512, at least 32 bytes) that verifies client JWTs. A secret,
    /// or a public key, is required unless --dev.
    #[arg(long, env = "HERALD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// File holding the JWT secret (trailing newline ignored), instead of --jwt-secret, so
    /// the secret stays off the command line.
    #[arg(long, env = "HERALD_JWT_SECRET_FILE", conflicts_with = "jwt_secret")]
    pub jwt_secret_file: Option<PathBuf>,

    /// The previous JWT secret, still accepted while clients' tokens roll over to the new
    /// one (rotation without dropping sessions).
    #[arg(long, env = "HERALD_JWT_SECRET_PREVIOUS", hide_env_values = true)]
    pub jwt_secret_previous: Option<String>,

    /// File holding the previous JWT secret.
    #[arg(
        long,
        env = "HERALD_JWT_SECRET_PREVIOUS_FILE",
        conflicts_with = "jwt_secret_previous"
    )]
    pub jwt_secret_previous_file: Option<PathBuf>,

    /// PEM public key (RSA, EC P-256/P-384 or Ed25519) that verifies JWTs an identity
    /// provider signs (RS*, PS*, ES*, EdDSA). May be given several times (key rotation);
    /// the env twin takes a comma-separated list.
    #[arg(long, env = "HERALD_JWT_PUBLIC_KEY_FILE", value_delimiter = ',')]
    pub jwt_public_key_file: Vec<PathBuf>,

    /// Tokens must carry this `aud` (otherwise `aud` is not checked).
    #[arg(long, env = "HERALD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Tokens must carry this `iss`.
    #[arg(long, env = "HERALD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Tokens whose `exp` lies further ahead than this are refused (a leaked token must not
    /// be good for years).
    #[arg(long, env = "HERALD_JWT_MAX_LIFETIME", default_value = "30d", value_parser = parse_duration)]
    pub jwt_max_lifetime: Duration,

    /// A session ends (close 4003) this long after its token's `exp` unless the client sent
    /// a fresh token in-band (`{"type":"refresh"}`).
    #[arg(long, env = "HERALD_TOKEN_GRACE", default_value = "10", value_parser = parse_duration)]
    pub token_grace: Duration,

    /// Bearer key for the HTTP API with the `admin` scope (every route). An API key of some
    /// scope is required unless --dev.
    #[arg(long, env = "HERALD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// File holding the admin API key, instead of --api-key.
    #[arg(long, env = "HERALD_API_KEY_FILE", conflicts_with = "api_key")]
    pub api_key_file: Option<PathBuf>,

    /// API key with the `publish` scope: `POST /api/publish` only, for producers. May be
    /// given several times (rotation); the env twin takes a comma-separated list.
    #[arg(
        long,
        env = "HERALD_PUBLISH_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub publish_api_key: Vec<String>,

    /// File of scoped API keys, one per line: `<scope> <key>` with scope `admin`, `read`
    /// (presence, stats, inbox listing) or `publish`; `#` starts a comment. Several keys of
    /// one scope may be listed (rotation).
    #[arg(long, env = "HERALD_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// The keys read from --api-keys-file by [`Config::load_secret_files`]
    /// ([`Config::scoped_api_keys`] adds the others).
    #[arg(skip)]
    pub file_api_keys: Vec<(ApiScope, String)>,

    /// Presence time-to-live. Sessions and the node itself expire this long after the last
    /// heartbeat; heartbeats run every third of it. Bare numbers are seconds; "500ms",
    /// "2s" and "1m" are accepted too.
    #[arg(long, env = "HERALD_PRESENCE_TTL", default_value = "30", value_parser = parse_duration)]
    pub presence_ttl: Duration,

    /// Prefix in front of every Redis key and channel name.
    #[arg(long, env = "HERALD_PREFIX", default_value = "herald", value_parser = parse_prefix)]
    pub prefix: String,

    /// Identity of this node in presence and stats. Defaults to a fresh UUID per process,
    /// so a restarted node never inherits a dead node's keys.
    #[arg(long, env = "HERALD_NODE_ID", value_parser = parse_node_id)]
    pub node_id: Option<String>,

    /// Listen backlog: connections the kernel queues before they are accepted. The usual
    /// default (128) overflows when thousands of clients reconnect at once (after a drain),
    /// and each overflow costs the client a one-second SYN retry.
    #[arg(long, env = "HERALD_LISTEN_BACKLOG", default_value_t = 4096)]
    pub listen_backlog: u32,

    /// Maximum concurrent WebSocket sessions on this node; further upgrades get HTTP 503.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Maximum connections that have not yet had a request answered (a client still
    /// sending its request head or body, before any authentication). Over it the node
    /// answers a bare 503 and closes, so a flood of unfinished requests is bounded in
    /// memory (at most --max-header-bytes each) however many descriptors it has.
    #[arg(long, env = "HERALD_MAX_PENDING_CONNECTIONS", default_value_t = 4096)]
    pub max_pending_connections: usize,

    /// Largest request head (request line and headers) a client may send, in bytes; a
    /// longer one is answered 431 and the connection closed. At least 8192 (hyper's floor
    /// for its read buffer).
    #[arg(long, env = "HERALD_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,

    /// An HTTP request body (POST /api/publish, POST /ack, ...) must arrive within this
    /// time once its headers did; otherwise 408 `body_timeout` and the connection closes.
    #[arg(long, env = "HERALD_BODY_TIMEOUT", default_value = "10", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// Serve `/metrics` on this address instead of --listen (which then answers 404 for
    /// it), so the scraper's port can be firewalled apart from the clients'.
    #[arg(long, env = "HERALD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// What to do when the open-file limit (raised at start from the soft to the hard
    /// limit) cannot hold --max-connections + --max-pending-connections + a reserve for
    /// Redis and listeners: `clamp` lowers the caps to fit and logs a warning; `refuse`
    /// exits with an error.
    #[arg(long, env = "HERALD_FD_LIMIT_POLICY", value_enum, default_value_t = FdLimitPolicy::Clamp)]
    pub fd_limit_policy: FdLimitPolicy,

    /// Maximum sessions (WebSocket and SSE) of one user on this node. Further connects of
    /// that user get 429 `too_many_sessions` (or, when they race past the check, close
    /// 4004), so one token cannot take the node's --max-connections from everyone else,
    /// and the Redis work of one user's presence stays bounded.
    #[arg(long, env = "HERALD_MAX_SESSIONS_PER_USER", default_value_t = 64)]
    pub max_sessions_per_user: usize,

    /// Frames per second one session may send (acks, pings, refreshes, anything), averaged;
    /// beyond it the node stops reading that session until its rate is back within bounds
    /// (nothing is dropped: the client's writes back up). The same rate bounds `POST /ack`
    /// per user on this node (429 beyond it). What one client can make Redis do is bounded
    /// by it.
    #[arg(long, env = "HERALD_CLIENT_FRAME_RATE", default_value_t = 20)]
    pub client_frame_rate: u32,

    /// Frames a session may send in a burst above --client-frame-rate.
    #[arg(long, env = "HERALD_CLIENT_FRAME_BURST", default_value_t = 40)]
    pub client_frame_burst: u32,

    /// Largest payload delivered to clients and largest frame accepted from them, in bytes.
    #[arg(long, env = "HERALD_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Development mode: a token is the user id itself and the API needs no key.
    #[arg(long, env = "HERALD_DEV", default_value_t = false)]
    pub dev: bool,

    /// Browser origins (`https://app.example.com`) whose pages may open /ws and /sse and
    /// call /ack (CORS); a browser request from any other origin is refused with 403, which
    /// also stops other sites from opening sessions with a user's cookies-borne token.
    /// `*` allows every origin. Unset: no origin checks and no CORS headers (the page and
    /// herald share an origin behind one proxy). --dev defaults to `*`.
    #[arg(long, env = "HERALD_ALLOWED_ORIGINS", value_delimiter = ',', value_parser = parse_origin)]
    pub allowed_origins: Vec<String>,

    /// What SSE clients are told to wait before reconnecting (the stream's `retry:`).
    #[arg(long, env = "HERALD_SSE_RETRY", default_value = "3", value_parser = parse_duration)]
    pub sse_retry: Duration,

    /// Interval between server WebSocket pings (and SSE keep-alive comments).
    #[arg(long, env = "HERALD_PING_INTERVAL", default_value = "25", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// A session that has sent nothing (no frame, no pong) for this long is closed (4000).
    #[arg(long, env = "HERALD_IDLE_TIMEOUT", default_value = "60", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Outbound queue capacity per session, in messages. A full queue disconnects the
    /// session as a slow consumer (4001).
    #[arg(long, env = "HERALD_OUTBOX_MESSAGES", default_value_t = 256)]
    pub outbox_messages: usize,

    /// Outbound queue capacity per session, in payload bytes (queued and unflushed).
    #[arg(long, env = "HERALD_OUTBOX_BYTES", default_value_t = 1024 * 1024)]
    pub outbox_bytes: usize,

    /// A write that cannot reach the client's socket within this time marks it a slow consumer.
    #[arg(long, env = "HERALD_WRITE_TIMEOUT", default_value = "10", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// Upper bound for a clean stop: sessions are closed in batches, then the process exits.
    #[arg(long, env = "HERALD_DRAIN_GRACE", default_value = "30", value_parser = parse_duration)]
    pub drain_grace: Duration,

    /// Sessions closed per drain batch.
    #[arg(long, env = "HERALD_DRAIN_BATCH", default_value_t = 500)]
    pub drain_batch: usize,

    /// Pause between drain batches, so clients do not all reconnect in the same instant.
    #[arg(long, env = "HERALD_DRAIN_INTERVAL", default_value = "100ms", value_parser = parse_duration)]
    pub drain_interval: Duration,

    /// Bytes read from a client socket per read call. The buffer is per worker thread, not
    /// per connection (an idle session holds no read buffer), so this only bounds how much
    /// one read takes in.
    #[arg(long, env = "HERALD_WS_READ_BUFFER", default_value_t = 4096)]
    pub ws_read_buffer: usize,

    /// Kernel send buffer per client socket (SO_SNDBUF), in bytes. Unset: the kernel
    /// autotunes it (up to net.ipv4.tcp_wmem, 4 MiB by default), which a client that does
    /// not read can fill before its outbox does. Setting it bounds kernel memory per
    /// connection and makes slow consumers visible sooner.
    #[arg(long, env = "HERALD_TCP_SEND_BUFFER")]
    pub tcp_send_buffer: Option<usize>,

    /// Durable inbox: entries kept per user.
    #[arg(long, env = "HERALD_INBOX_MAX_LEN", default_value_t = 1000)]
    pub inbox_max_len: u64,

    /// Durable inbox: how long entries (and an idle inbox) are kept.
    #[arg(long, env = "HERALD_INBOX_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub inbox_retention: Duration,

    /// How long an idempotency key of a durable publish answers with its first id (and
    /// stores nothing new).
    #[arg(long, env = "HERALD_IDEMPOTENCY_WINDOW", default_value = "10m", value_parser = parse_duration)]
    pub idempotency_window: Duration,

    /// Most durable messages replayed to one connection; beyond it the client gets a
    /// `gap` frame and should resync through the API.
    #[arg(long, env = "HERALD_REPLAY_LIMIT", default_value_t = 500)]
    pub replay_limit: usize,

    /// A user without sessions for this long gets an `offline` event; a reconnect within
    /// it (a page reload) produces no events at all.
    #[arg(long, env = "HERALD_OFFLINE_GRACE", default_value = "5", value_parser = parse_duration)]
    pub offline_grace: Duration,

    /// Approximate cap of the `<prefix>:events` stream.
    #[arg(long, env = "HERALD_EVENTS_MAX_LEN", default_value_t = 100_000)]
    pub events_max_len: u64,

    /// The events stream expires this long after its last event.
    #[arg(long, env = "HERALD_EVENTS_RETENTION", default_value = "1d", value_parser = parse_duration)]
    pub events_retention: Duration,

    /// Maximum topics one connection may join.
    #[arg(long, env = "HERALD_MAX_TOPICS", default_value_t = 64)]
    pub max_topics: usize,

    /// Redis deadpool size (multiplexed connections used for commands).
    #[arg(long, env = "HERALD_REDIS_POOL", default_value_t = 8)]
    pub redis_pool: usize,

    /// Tokio worker threads. Default: one per CPU. On a machine shared by several nodes
    /// (or with a node per core), 1 avoids cross-thread wake-ups, which dominate the CPU
    /// cost of each delivered message at moderate rates.
    #[arg(long, env = "HERALD_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Log format: "text" or "json".
    #[arg(long, env = "HERALD_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// Why a configuration is refused; printed to the operator before exiting.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "no --jwt-secret (HERALD_JWT_SECRET) or --jwt-public-key-file given: set one, or pass --dev for local development"
    )]
    MissingJwtSecret,
    #[error("no --api-key (HERALD_API_KEY) given: set one, or pass --dev for local development")]
    MissingApiKey,
    #[error("{0} must be at least 32 bytes (RFC 7518: an HMAC key as long as its hash)")]
    WeakJwtSecret(&'static str),
    #[error("{0} must be at least 16 bytes")]
    WeakApiKey(&'static str),
    #[error("{0}")]
    BadKeysFile(String),
    #[error("cannot read {0}: {1}")]
    SecretFile(String, String),
    #[error("--presence-ttl must be at least 1s")]
    TtlTooShort,
    #[error("--idle-timeout must be longer than --ping-interval")]
    IdleBelowPing,
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error("--max-header-bytes must be at least 8192 (got {0})")]
    HeaderLimitTooSmall(usize),
    #[error("--metrics-listen must differ from --listen")]
    MetricsOnMainListener,
}

impl Config {
    /// Checks combinations that clap cannot express. Called before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, secret) in [
            ("--jwt-secret", &self.jwt_secret),
            ("--jwt-secret-previous", &self.jwt_secret_previous),
        ] {
            if secret.as_ref().is_some_and(|s| s.len() < 32) {
                return Err(ConfigError::WeakJwtSecret(name));
            }
        }
        if !self.dev {
            if self.jwt_secret.is_none() && self.jwt_public_key_file.is_empty() {
                return Err(ConfigError::MissingJwtSecret);
            }
            if self.scoped_api_keys().is_empty() {
                return Err(ConfigError::MissingApiKey);
            }
        }
        let weak = |k: &String| k.len() < 16;
        if self.api_key.iter().any(weak) {
            return Err(ConfigError::WeakApiKey("--api-key"));
        }
        if self.publish_api_key.iter().any(weak) {
            return Err(ConfigError::WeakApiKey("--publish-api-key"));
        }
        if self.file_api_keys.iter().map(|(_, k)| k).any(weak) {
            return Err(ConfigError::WeakApiKey("every key of --api-keys-file"));
        }
        if self.presence_ttl < Duration::from_secs(1) {
            return Err(ConfigError::TtlTooShort);
        }
        if self.idle_timeout <= self.ping_interval {
            return Err(ConfigError::IdleBelowPing);
        }
        if self.idempotency_window < Duration::from_secs(1) {
            return Err(ConfigError::Zero("--idempotency-window"));
        }
        if self.max_header_bytes < 8192 {
            return Err(ConfigError::HeaderLimitTooSmall(self.max_header_bytes));
        }
        if self.metrics_listen == Some(self.listen) {
            return Err(ConfigError::MetricsOnMainListener);
        }
        if self.body_timeout.is_zero() {
            return Err(ConfigError::Zero("--body-timeout"));
        }
        for (name, v) in [
            ("--max-connections", self.max_connections),
            ("--max-pending-connections", self.max_pending_connections),
            ("--max-sessions-per-user", self.max_sessions_per_user),
            ("--client-frame-rate", self.client_frame_rate as usize),
            ("--client-frame-burst", self.client_frame_burst as usize),
            ("--max-message-bytes", self.max_message_bytes),
            ("--outbox-messages", self.outbox_messages),
            ("--outbox-bytes", self.outbox_bytes),
            ("--drain-batch", self.drain_batch),
            ("--ws-read-buffer", self.ws_read_buffer),
            ("--redis-pool", self.redis_pool),
            ("--replay-limit", self.replay_limit),
            ("--inbox-max-len", self.inbox_max_len as usize),
            ("--worker-threads", self.worker_threads.unwrap_or(1)),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        Ok(())
    }

    /// Replaces every `--*-file` secret with the file's content (without a trailing
    /// newline), so the rest of the node sees only values. Called before [`validate`].
    pub fn load_secret_files(&mut self) -> Result<(), ConfigError> {
        fn read(path: &Path) -> Result<String, ConfigError> {
            std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                .map_err(|e| ConfigError::SecretFile(path.display().to_string(), e.to_string()))
        }
        if let Some(p) = self.jwt_secret_file.take() {
            self.jwt_secret = Some(read(&p)?);
        }
        if let Some(p) = self.jwt_secret_previous_file.take() {
            self.jwt_secret_previous = Some(read(&p)?);
        }
        if let Some(p) = self.api_key_file.take() {
            self.api_key = Some(read(&p)?);
        }
        if let Some(p) = self.api_keys_file.take() {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| ConfigError::SecretFile(p.display().to_string(), e.to_string()))?;
            self.file_api_keys = parse_keys_file(&text)
                .map_err(|e| ConfigError::BadKeysFile(format!("{}: {e}", p.display())))?;
        }
        Ok(())
    }

    /// Every API key with its scope: --api-key (admin), --publish-api-key and the keys of
    /// --api-keys-file.
    pub(crate) fn scoped_api_keys(&self) -> Vec<(ApiScope, String)> {
        let mut keys: Vec<(ApiScope, String)> = self
            .api_key
            .iter()
            .map(|k| (ApiScope::Admin, k.clone()))
            .collect();
        keys.extend(
            self.publish_api_key
                .iter()
                .map(|k| (ApiScope::Publish, k.clone())),
        );
        keys.extend(self.file_api_keys.iter().cloned());
        keys
    }

    /// Each session's outbox bounds.
    pub(crate) fn outbox_limits(&self) -> crate::transport::OutboxLimits {
        crate::transport::OutboxLimits {
            messages: self.outbox_messages,
            bytes: self.outbox_bytes,
        }
    }

    /// Whether the node runs on Redis (a URL, or sentinels), rather than standalone.
    pub(crate) fn uses_redis(&self) -> bool {
        self.redis_url.is_some()
            || !self.redis_sentinel.is_empty()
            || !self.redis_cluster.is_empty()
    }

    /// The liveness limits the sweeper applies to every session.
    pub(crate) fn liveness(&self) -> crate::transport::LivenessSettings {
        crate::transport::LivenessSettings {
            ping_interval: self.ping_interval,
            idle_timeout: self.idle_timeout,
            write_timeout: self.write_timeout,
            token_grace: self.token_grace,
        }
    }

    /// How often presence is refreshed: a third of the TTL, so two heartbeats may be lost
    /// before anything expires.
    pub(crate) fn heartbeat_interval(&self) -> Duration {
        self.presence_ttl / 3
    }
}

/// Parses "30" (seconds), "1.5", "500ms", "2s", "1m", "2h" or "7d".
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('d') {
        (n, 86_400.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (use e.g. 30, 1.5, 500ms, 2s, 1m)"))?;
    if !v.is_finite() || v < 0.0 || v * scale > 86_400.0 * 365.0 {
        return Err(format!("duration out of range: {s:?}"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// What to do when the open-file limit is too small for the connection caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FdLimitPolicy {
    /// Lower --max-connections (and, if need be, --max-pending-connections) to fit, with a
    /// warning in the log.
    Clamp,
    /// Refuse to start.
    Refuse,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ApiScope {
    /// `POST /api/publish` only: what a producer needs.
    Publish,
    /// Reads: presence, stats and inbox listings (no acknowledging, retracting or
    /// disconnecting).
    Read,
    /// Every route.
    Admin,
}

impl ApiScope {
    /// Whether a key of this scope may use a route that needs `need`. Admin may do
    /// everything; publish and read keys only their own routes.
    pub(crate) fn allows(self, need: ApiScope) -> bool {
        self == ApiScope::Admin || self == need
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            ApiScope::Publish => "publish",
            ApiScope::Read => "read",
            ApiScope::Admin => "admin",
        }
    }
}

/// Parses an --api-keys-file: `<scope> <key>` per line, blank lines and `#` comments
/// skipped. The error names the line (never the key).
fn parse_keys_file(text: &str) -> Result<Vec<(ApiScope, String)>, String> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(scope), Some(key), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("line {}: expected `<scope> <key>`", i + 1));
        };
        let scope = match scope {
            "admin" => ApiScope::Admin,
            "read" => ApiScope::Read,
            "publish" => ApiScope::Publish,
            other => {
                return Err(format!(
                    "line {}: unknown scope {other:?} (admin, read or publish)",
                    i + 1
                ))
            }
        };
        keys.push((scope, key.to_string()));
    }
    Ok(keys)
}

/// An origin as browsers send it: `http(s)://host[:port]`, no path; or `*`.
fn parse_origin(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s == "*" {
        return Ok(s.to_string());
    }
    let bad = || format!("not an origin (scheme://host[:port]): {s:?}");
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(bad)?;
    let authority: http::uri::Authority = rest.parse().map_err(|_| bad())?;
    if authority.as_str() != rest || rest.contains('@') || authority.host().is_empty() {
        return Err(bad());
    }
    Ok(s.to_string())
}

fn parse_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(is_name_byte) {
        return Err("prefix must be 1-64 characters of [A-Za-z0-9_.-]".into());
    }
    Ok(s.to_string())
}

fn parse_node_id(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(is_name_byte) {
        return Err("node id must be 1-64 characters of [A-Za-z0-9_.-]".into());
    }
    Ok(s.to_string())
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(args: &[&str]) -> Config {
        let mut v = vec!["herald"];
        v.extend_from_slice(args);
        Config::parse_from(v)
    }

    #[test]
    fn durations_parse_in_every_accepted_form() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("NaN").is_err());
    }

    const SECRET32: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn sentinel_flags_need_each_other_and_exclude_a_redis_url() {
        let c = base(&[
            "--redis-sentinel",
            "127.0.0.1:26379,127.0.0.1:26380",
            "--redis-master-name",
            "m",
        ]);
        assert_eq!(c.redis_sentinel, vec!["127.0.0.1:26379", "127.0.0.1:26380"]);
        assert!(c.uses_redis());
        assert!(!base(&[]).uses_redis());
        assert!(Config::try_parse_from(["herald", "--redis-sentinel", "h:1"]).is_err());
        assert!(Config::try_parse_from(["herald", "--redis-master-name", "m"]).is_err());
        assert!(Config::try_parse_from([
            "herald",
            "--redis-sentinel",
            "h:1",
            "--redis-master-name",
            "m",
            "--redis-url",
            "redis://h:6379"
        ])
        .is_err());
    }

    #[test]
    fn production_mode_refuses_to_start_without_secrets() {
        assert_eq!(base(&[]).validate(), Err(ConfigError::MissingJwtSecret));
        let c = base(&["--jwt-secret", SECRET32]);
        assert_eq!(c.validate(), Err(ConfigError::MissingApiKey));
        let c = base(&[
            "--jwt-secret",
            "0123456789abcdef",
            "--api-key",
            "0123456789abcdef",
        ]);
        assert_eq!(
            c.validate(),
            Err(ConfigError::WeakJwtSecret("--jwt-secret"))
        );
        let c = base(&["--jwt-secret", SECRET32, "--api-key", "0123456789abcdef"]);
        assert_eq!(c.validate(), Ok(()));
        let c = base(&[
            "--jwt-secret",
            SECRET32,
            "--jwt-secret-previous",
            "short",
            "--api-key",
            "0123456789abcdef",
        ]);
        assert_eq!(
            c.validate(),
            Err(ConfigError::WeakJwtSecret("--jwt-secret-previous"))
        );
        let c = base(&[
            "--jwt-public-key-file",
            "/k.pem",
            "--api-key",
            "0123456789abcdef",
        ]);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(base(&["--dev"]).validate(), Ok(()));
    }

    #[test]
    fn secrets_are_read_from_files() {
        let dir = std::env::temp_dir().join(format!("herald-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("jwt");
        std::fs::write(&file, format!("{SECRET32}\n")).unwrap();
        let mut c = base(&[
            "--jwt-secret-file",
            file.to_str().unwrap(),
            "--api-key",
            "0123456789abcdef",
        ]);
        c.load_secret_files().unwrap();
        assert_eq!(c.jwt_secret.as_deref(), Some(SECRET32));
        assert_eq!(c.validate(), Ok(()));
        let mut missing = base(&["--api-key-file", "/nonexistent/herald-key"]);
        assert!(matches!(
            missing.load_secret_files(),
            Err(ConfigError::SecretFile(_, _))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn heartbeat_is_a_third_of_the_ttl() {
        let c = base(&["--dev", "--presence-ttl", "3"]);
        assert_eq!(c.heartbeat_interval(), Duration::from_secs(1));
        assert_eq!(
            base(&["--dev"]).heartbeat_interval(),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn origins_must_be_scheme_host_and_port() {
        for good in [
            "*",
            "https://app.example.com",
            "http://127.0.0.1:8080",
            "http://localhost",
        ] {
            assert_eq!(parse_origin(good).as_deref(), Ok(good), "{good}");
        }
        for bad in [
            "app.example.com",
            "https://",
            "https://a/b",
            "ftp://a",
            "https://u@a",
            "https://a b",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_prefix_and_node_id_are_rejected() {
        assert!(Config::try_parse_from(["herald", "--prefix", "a b"]).is_err());
        assert!(Config::try_parse_from(["herald", "--node-id", "x|y"]).is_err());
        assert!(Config::try_parse_from(["herald", "--node-id", "n-1.a_b"]).is_ok());
    }
}
