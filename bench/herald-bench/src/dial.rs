//! Opening sessions: client options, tokens, targets, source addresses, one authenticated
//! session ([`Dialer`]) and many with bounded concurrency ([`open_sessions`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde::Serialize;
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::client_async_with_config;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::hist::{new_hist, Lat};
use crate::pusher::PusherArgs;
use crate::sse::SseConn;
use crate::util::{require_loopback, round3, unix_secs};
use crate::wire::{handshake, session_url, Protocol, PusherHello, Ws};

/// One bench process keeps at most this many sessions: the open-file hard limit is 20,000
/// and the process needs some descriptors of its own. Run several processes for more.
pub(crate) const MAX_SESSIONS_PER_PROCESS: usize = 18_000;

/// Options every scenario that opens sessions shares.
#[derive(Debug, Clone, Args)]
pub(crate) struct ClientArgs {
    /// Node WebSocket base URL (ws://host:port); repeat or comma-separate for several nodes.
    /// Sessions are spread round-robin. "/ws" (herald) or "/socket.io/" (socketio) is
    /// appended unless the URL has a path. Only loopback addresses are accepted.
    #[arg(long = "target", required = true, value_delimiter = ',', num_args = 1..)]
    pub(crate) targets: Vec<String>,

    /// Sessions to open (at most 18,000 per bench process).
    #[arg(long, default_value_t = 1000)]
    pub(crate) sessions: usize,

    /// Wire protocol: herald, or Engine.IO v4 / Socket.IO v5 over WebSocket.
    #[arg(long, value_enum, default_value_t = Protocol::Herald)]
    pub(crate) protocol: Protocol,

    /// HS256 secret to mint client JWTs with (sub = "bench-<i>", exp = now + 1 h, topics).
    #[arg(long, env = "HERALD_BENCH_SECRET", hide_env_values = true)]
    pub(crate) secret: Option<String>,

    /// The node runs with --dev: the token is the user id itself (topics via ?topics=).
    /// Wins over --secret / HERALD_BENCH_SECRET.
    #[arg(long)]
    pub(crate) dev: bool,

    /// Source addresses to bind client sockets to, spread round-robin: a range
    /// (127.0.0.2-127.0.0.20), a list (a,b,c) or one address. Each source address has its
    /// own ~28k ephemeral ports per destination.
    #[arg(long)]
    pub(crate) source_ips: Option<String>,

    /// Most handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    pub(crate) concurrency: usize,

    /// Seconds one session may take from TCP connect to its welcome frame.
    #[arg(long, default_value_t = 30.0)]
    pub(crate) connect_timeout: f64,

    /// Read buffer of each client connection, in bytes (small keeps the bench process small).
    #[arg(long, default_value_t = 4096)]
    pub(crate) client_read_buffer: usize,

    /// First user index: user ids are bench-<first-user + i>. Lets several bench processes
    /// against the same nodes use distinct users (process 2 of 2 x 8,000: --first-user 8000).
    #[arg(long, default_value_t = 0)]
    pub(crate) first_user: usize,

    #[command(flatten)]
    pub(crate) pusher: PusherArgs,
}

/// Raises the soft open-file limit to the hard one and refuses session counts that cannot fit.
pub(crate) fn prepare_fd_limit(sessions: usize) -> anyhow::Result<u64> {
    if sessions > MAX_SESSIONS_PER_PROCESS {
        bail!(
            "{sessions} sessions is more than one bench process can hold ({MAX_SESSIONS_PER_PROCESS}; \
             the open-file hard limit is 20,000). Run several bench processes, each with \
             --sessions <= {MAX_SESSIONS_PER_PROCESS} and its own --first-user \
             (e.g. process 2 of 2 x 8,000 uses --first-user 8000; scripts/bench-idle.sh does \
             this when SESSIONS is larger)"
        );
    }
    let soft = rlimit::increase_nofile_limit(u64::MAX).context("cannot raise RLIMIT_NOFILE")?;
    let needed = sessions as u64 + 64;
    if soft < needed {
        bail!("open-file limit is {soft}, but {sessions} sessions need about {needed}");
    }
    Ok(soft)
}

// ===== Tokens =====

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    topics: &'a [String],
}

/// Makes the token of a session.
pub(crate) enum Tokens {
    Jwt {
        key: EncodingKey,
        exp: u64,
    },
    Dev,
    /// Pusher: the URL carries the app key; the session signs its private channel with the
    /// app secret instead of presenting a token.
    Pusher {
        key: String,
        secret: String,
    },
}

impl Tokens {
    pub(crate) fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        if args.protocol == Protocol::Pusher {
            return Ok(Tokens::Pusher {
                key: args.pusher.pusher_key.clone(),
                secret: args.pusher.secret()?.to_string(),
            });
        }
        match (&args.secret, args.dev) {
            (_, true) => Ok(Tokens::Dev),
            (Some(secret), false) => Ok(Tokens::Jwt {
                key: EncodingKey::from_secret(secret.as_bytes()),
                exp: unix_secs() + 3600,
            }),
            (None, false) => bail!("give --secret <jwt secret> (or HERALD_BENCH_SECRET), or --dev"),
        }
    }

    pub(crate) fn token(&self, user: &str, topics: &[String]) -> anyhow::Result<String> {
        match self {
            Tokens::Jwt { key, exp } => {
                let claims = Claims {
                    sub: user,
                    exp: *exp,
                    topics,
                };
                encode(&Header::default(), &claims, key).context("cannot sign a JWT")
            }
            Tokens::Dev => Ok(user.to_string()),
            Tokens::Pusher { key, .. } => Ok(key.clone()),
        }
    }

    pub(crate) fn is_dev(&self) -> bool {
        matches!(self, Tokens::Dev)
    }
}

// ===== Targets and source addresses =====

/// A node to connect to.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) label: String,
    pub(crate) addr: SocketAddr,
    /// ws://authority/path, without query.
    pub(crate) ws_url: String,
    /// host:port, for HTTP requests to the same node.
    pub(crate) authority: String,
}

pub(crate) async fn resolve_target(raw: &str, protocol: Protocol) -> anyhow::Result<Target> {
    let uri: http::Uri = raw
        .parse()
        .with_context(|| format!("invalid target URL {raw:?}"))?;
    match uri.scheme_str() {
        Some("ws") | Some("http") => {}
        Some(other) => bail!("target {raw:?}: scheme {other:?} is not supported (use ws://)"),
        None => bail!("target {raw:?} needs a scheme: ws://host:port"),
    }
    let Some(authority) = uri.authority() else {
        bail!("target {raw:?} has no host");
    };
    let host = authority.host();
    let port = uri.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to no address"))?;
    require_loopback(addr.ip(), &format!("target {raw:?}"))?;
    let path = match uri.path() {
        "" | "/" => protocol.default_path(),
        p => p,
    };
    Ok(Target {
        label: raw.to_string(),
        addr,
        ws_url: format!("ws://{authority}{path}"),
        authority: authority.to_string(),
    })
}

/// Parses "a-b" (an IPv4 range), "a,b,c" or one address.
pub(crate) fn parse_source_ips(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    let spec = spec.trim();
    let ips: Vec<IpAddr> = if let Some((from, to)) = spec.split_once('-') {
        let from: std::net::Ipv4Addr = from
            .trim()
            .parse()
            .with_context(|| format!("bad range start in {spec:?}"))?;
        let to: std::net::Ipv4Addr = to
            .trim()
            .parse()
            .with_context(|| format!("bad range end in {spec:?}"))?;
        let (a, b) = (u32::from(from), u32::from(to));
        if b < a || b - a > 65_535 {
            bail!("source IP range {spec:?} is empty or larger than 65,536 addresses");
        }
        (a..=b)
            .map(|v| IpAddr::V4(std::net::Ipv4Addr::from(v)))
            .collect()
    } else {
        spec.split(',')
            .map(|s| {
                s.trim()
                    .parse::<IpAddr>()
                    .with_context(|| format!("bad source IP {s:?}"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    for ip in &ips {
        require_loopback(*ip, "a source address")?;
    }
    Ok(ips)
}

// ===== One session =====

/// Who session `index` is and how it connects.
#[derive(Debug, Clone)]
pub(crate) struct DialSpec {
    /// Picks the target and source address (round-robin).
    pub(crate) index: usize,
    pub(crate) user: String,
    pub(crate) topics: Vec<String>,
    /// herald `since=<inbox id>`.
    pub(crate) since: Option<String>,
    /// SO_RCVBUF set before connecting (a consumer that never reads).
    pub(crate) rcvbuf: Option<u32>,
}

/// Opens authenticated sessions: TCP from a chosen source address, the WebSocket handshake,
/// then the protocol's welcome.
pub(crate) struct Dialer {
    pub(crate) protocol: Protocol,
    pub(crate) targets: Vec<Target>,
    pub(crate) source_ips: Vec<IpAddr>,
    tokens: Tokens,
    pub(crate) first_user: usize,
    ws_config: WebSocketConfig,
    /// Read buffer of an SSE session (the WebSocket one is in `ws_config`).
    read_buffer: usize,
    timeout: Duration,
}

/// A session that completed its handshake.
pub(crate) struct Session {
    pub(crate) ws: Ws,
    pub(crate) target: usize,
    pub(crate) index: usize,
}

impl Dialer {
    pub(crate) async fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let mut targets = Vec::new();
        for raw in &args.targets {
            targets.push(resolve_target(raw, args.protocol).await?);
        }
        let source_ips = match &args.source_ips {
            Some(spec) => parse_source_ips(spec)?,
            None => Vec::new(),
        };
        if let Some(bad) = source_ips
            .iter()
            .find(|ip| targets.iter().any(|t| t.addr.is_ipv4() != ip.is_ipv4()))
        {
            bail!("source IP {bad} is not of the same family as every target");
        }
        if !(args.connect_timeout.is_finite() && args.connect_timeout > 0.0) {
            bail!("--connect-timeout must be a positive number of seconds");
        }
        Ok(Dialer {
            protocol: args.protocol,
            targets,
            source_ips,
            tokens: Tokens::new(args)?,
            first_user: args.first_user,
            ws_config: WebSocketConfig::default()
                .read_buffer_size(args.client_read_buffer.max(256))
                .write_buffer_size(0),
            read_buffer: args.client_read_buffer.max(256),
            timeout: Duration::from_secs_f64(args.connect_timeout),
        })
    }

    /// The user of session `i` of this process.
    pub(crate) fn user(&self, i: usize) -> String {
        format!("bench-{}", self.first_user + i)
    }

    /// The plain spec of session `i`: user bench-<first-user + i>, no topics.
    pub(crate) fn spec(&self, i: usize) -> DialSpec {
        DialSpec {
            index: i,
            user: self.user(i),
            topics: Vec::new(),
            since: None,
            rcvbuf: None,
        }
    }

    pub(crate) fn target_of(&self, i: usize) -> usize {
        i % self.targets.len()
    }

    /// Every target sees every source address: the source index advances once per round of
    /// targets.
    fn source_of(&self, i: usize) -> Option<IpAddr> {
        if self.source_ips.is_empty() {
            return None;
        }
        let round = i / self.targets.len();
        Some(self.source_ips[round % self.source_ips.len()])
    }

    /// Opens one session and completes its handshake. Errors are short, groupable texts.
    pub(crate) async fn open(&self, spec: &DialSpec) -> Result<Session, String> {
        match tokio::time::timeout(self.timeout, self.open_inner(spec)).await {
            Ok(r) => r,
            Err(_) => Err(format!("timeout after {:?}", self.timeout)),
        }
    }

    /// TCP from the spec's source address to its target; returns the stream and the
    /// target's index.
    async fn connect_tcp(&self, spec: &DialSpec) -> Result<(tokio::net::TcpStream, usize), String> {
        let t = self.target_of(spec.index);
        let target = &self.targets[t];
        let socket = if target.addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| format!("socket: {e}"))?;
        if let Some(size) = spec.rcvbuf {
            socket
                .set_recv_buffer_size(size)
                .map_err(|e| format!("SO_RCVBUF: {e}"))?;
        }
        if let Some(ip) = self.source_of(spec.index) {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| format!("bind {ip}: {e}"))?;
        }
        let stream = socket
            .connect(target.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok((stream, t))
    }

    async fn open_inner(&self, spec: &DialSpec) -> Result<Session, String> {
        let (stream, t) = self.connect_tcp(spec).await?;
        let target = &self.targets[t];
        let token = self
            .tokens
            .token(&spec.user, &spec.topics)
            .map_err(|e| format!("{e:#}"))?;
        let dev_topics =
            (self.tokens.is_dev() && !spec.topics.is_empty()).then(|| spec.topics.join(","));
        let url = session_url(
            self.protocol,
            &target.ws_url,
            &token,
            spec.since.as_deref(),
            dev_topics.as_deref(),
        );
        let (mut ws, _response) = client_async_with_config(url, stream, Some(self.ws_config))
            .await
            .map_err(|e| match e {
                WsError::Http(resp) => format!("handshake: HTTP {}", resp.status()),
                other => format!("handshake: {other}"),
            })?;
        let hello = match &self.tokens {
            Tokens::Pusher { key, secret } => Some(PusherHello {
                user: &spec.user,
                key,
                secret,
            }),
            _ => None,
        };
        handshake(&mut ws, self.protocol, hello).await?;
        Ok(Session {
            ws,
            target: t,
            index: spec.index,
        })
    }

    /// Opens one herald SSE session (`GET /sse?token=...[&since=...]` on the target's
    /// host, whatever path its URL has) and reads up to its welcome event.
    pub(crate) async fn open_sse(&self, spec: &DialSpec) -> Result<SseSession, String> {
        let opened = async {
            if self.protocol != Protocol::Herald {
                return Err("SSE is herald's transport: use --protocol herald".to_string());
            }
            let (stream, t) = self.connect_tcp(spec).await?;
            let token = self
                .tokens
                .token(&spec.user, &spec.topics)
                .map_err(|e| format!("{e:#}"))?;
            let mut path = format!("/sse?token={token}");
            if let Some(s) = &spec.since {
                path.push_str("&since=");
                path.push_str(s);
            }
            if self.tokens.is_dev() && !spec.topics.is_empty() {
                path.push_str("&topics=");
                path.push_str(&spec.topics.join(","));
            }
            let mut conn =
                SseConn::start(stream, &self.targets[t].authority, &path, self.read_buffer).await?;
            conn.welcome().await?;
            Ok(SseSession { conn, target: t })
        };
        match tokio::time::timeout(self.timeout, opened).await {
            Ok(r) => r,
            Err(_) => Err(format!("timeout after {:?}", self.timeout)),
        }
    }
}

/// An SSE session past its welcome event.
pub(crate) struct SseSession {
    pub(crate) conn: SseConn,
    pub(crate) target: usize,
}

/// A session [`open_sessions_with`] can count: which target it went to.
pub(crate) trait Opened: Send + 'static {
    fn target(&self) -> usize;
}

impl Opened for Session {
    fn target(&self) -> usize {
        self.target
    }
}

impl Opened for SseSession {
    fn target(&self) -> usize {
        self.target
    }
}

// ===== Opening many sessions =====

/// What opening the sessions of a scenario gave.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ConnectStats {
    pub(crate) requested: usize,
    pub(crate) connected: usize,
    pub(crate) failed: usize,
    pub(crate) duration_s: f64,
    pub(crate) sessions_per_s: f64,
    /// Time from TCP connect to the welcome (herald) or the Socket.IO CONNECT answer, over
    /// the connected sessions, in ms.
    pub(crate) handshake_ms: Lat,
    /// Failures grouped by cause.
    pub(crate) errors: BTreeMap<String, usize>,
    /// Connected sessions per target, in --target order.
    pub(crate) per_target: Vec<usize>,
    /// Session indexes that connected, ascending.
    #[serde(skip)]
    pub(crate) connected_indexes: Vec<usize>,
}

/// Sessions held by [`open_sessions`]: each runs in its own task until its `hold` future
/// ends.
pub(crate) struct Held {
    /// Held sessions whose `hold` future has ended since they connected.
    pub(crate) ended: Arc<AtomicUsize>,
}

/// Opens `count` WebSocket sessions (specs from `spec(i)`) with at most `concurrency`
/// handshakes in flight. Each connected session is handed to `hold`, which runs in the
/// session's own task after the handshake permit is released.
pub(crate) async fn open_sessions<S, F, Fut>(
    dialer: Arc<Dialer>,
    count: usize,
    concurrency: usize,
    spec: S,
    hold: F,
) -> (ConnectStats, Held)
where
    S: Fn(usize) -> DialSpec,
    F: Fn(Session) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    open_sessions_with(
        dialer,
        count,
        concurrency,
        spec,
        |d: Arc<Dialer>, s: DialSpec| async move { d.open(&s).await },
        hold,
    )
    .await
}

/// [`open_sessions`] for any transport: `open` opens one session of it.
pub(crate) async fn open_sessions_with<T, S, O, OFut, F, Fut>(
    dialer: Arc<Dialer>,
    count: usize,
    concurrency: usize,
    spec: S,
    open: O,
    hold: F,
) -> (ConnectStats, Held)
where
    T: Opened,
    S: Fn(usize) -> DialSpec,
    O: Fn(Arc<Dialer>, DialSpec) -> OFut + Send + Sync + 'static,
    OFut: std::future::Future<Output = Result<T, String>> + Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let hold = Arc::new(hold);
    let open = Arc::new(open);
    let ended = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Result<(usize, usize, u64), String>>();
    for i in 0..count {
        let dialer = dialer.clone();
        let permits = permits.clone();
        let hold = hold.clone();
        let open = open.clone();
        let ended = ended.clone();
        let done = done_tx.clone();
        let spec = spec(i);
        tokio::spawn(async move {
            let permit = match permits.acquire_owned().await {
                Ok(p) => p,
                Err(_) => return,
            };
            let t0 = Instant::now();
            let opened = open(dialer, spec).await;
            drop(permit);
            match opened {
                Ok(session) => {
                    let micros = t0.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
                    let _ = done.send(Ok((i, session.target(), micros)));
                    drop(done);
                    hold(session).await;
                    ended.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    let _ = done.send(Err(e));
                }
            }
        });
    }
    drop(done_tx);

    let mut per_target = vec![0usize; dialer.targets.len()];
    let mut hist = new_hist();
    let mut indexes = Vec::with_capacity(count);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut settled = 0usize;
    let mut progress = tokio::time::interval(Duration::from_secs(2));
    progress.tick().await;
    while settled < count {
        tokio::select! {
            r = done_rx.recv() => match r {
                Some(Ok((i, t, micros))) => {
                    per_target[t] += 1;
                    hist.saturating_record(micros.max(1));
                    indexes.push(i);
                    settled += 1;
                }
                Some(Err(e)) => {
                    *errors.entry(e).or_default() += 1;
                    settled += 1;
                }
                None => break,
            },
            _ = progress.tick() => {
                eprintln!(
                    "herald-bench: {} connected, {} failed, {} pending ({:.0} s)",
                    indexes.len(),
                    settled - indexes.len(),
                    count - settled,
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    let duration = started.elapsed().as_secs_f64();
    let connected = indexes.len();
    indexes.sort_unstable();
    let stats = ConnectStats {
        requested: count,
        connected,
        failed: count - connected,
        duration_s: round3(duration),
        sessions_per_s: round3(connected as f64 / duration.max(1e-9)),
        handshake_ms: Lat::of(&hist),
        errors,
        per_target,
        connected_indexes: indexes,
    };
    (stats, Held { ended })
}

/// Writes the --ready-file: all sessions are settled (connected or failed).
pub(crate) fn write_ready_file(
    path: Option<&std::path::Path>,
    connect: &ConnectStats,
) -> anyhow::Result<()> {
    if let Some(path) = path {
        let ready = serde_json::json!({
            "connected": connect.connected,
            "failed": connect.failed,
            "unix_time": unix_secs(),
            "mono_ns": crate::util::mono_ns(),
        });
        // Written to a temporary name and renamed, so a reader never sees half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, ready.to_string())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename to {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ranges_and_lists_parse() {
        let v = parse_source_ips("127.0.0.2-127.0.0.4").unwrap(); // safe: test
        assert_eq!(v.len(), 3);
        assert_eq!(v[2], "127.0.0.4".parse::<IpAddr>().unwrap()); // safe: test
        assert_eq!(parse_source_ips("127.0.0.9, 127.0.0.7").unwrap().len(), 2); // safe: test
        assert!(parse_source_ips("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_source_ips("nope").is_err());
        assert!(parse_source_ips("192.168.1.1").is_err());
    }

    #[test]
    fn too_many_sessions_are_refused_with_advice() {
        let e = prepare_fd_limit(MAX_SESSIONS_PER_PROCESS + 1).unwrap_err(); // safe: test
        assert!(e.to_string().contains("several bench processes"));
        assert!(e.to_string().contains("--first-user"));
    }

    #[tokio::test]
    async fn targets_must_be_loopback() {
        assert!(resolve_target("ws://127.0.0.1:9", Protocol::Herald)
            .await
            .is_ok());
        assert!(resolve_target("ws://10.1.2.3:9", Protocol::Herald)
            .await
            .is_err());
        let t = resolve_target("ws://127.0.0.1:9", Protocol::Socketio)
            .await
            .unwrap(); // safe: test
        assert_eq!(t.ws_url, "ws://127.0.0.1:9/socket.io/");
    }
}
