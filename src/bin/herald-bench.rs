//! `herald-bench`: the load generator for herald nodes.
//!
//! Each scenario is a subcommand. They share the building blocks below: [`ClientArgs`] (where
//! to connect, how many sessions, how to authenticate, which source addresses to spread over),
//! a [`Dialer`] that opens one authenticated session, [`open_sessions`] that opens many with
//! bounded concurrency and collects connect statistics, [`ProcSample`] that reads a node's RSS
//! and CPU time from /proc, and a JSON-serialisable [`Report`] printed as one table.
//!
//! Scenarios:
//! - `idle`: opens N authenticated sessions, holds them idle (pings answered), and reports each
//!   node's RSS growth per session and its CPU use at rest.
//!
//! Adding one (connect, fanout, broadcast, topic, churn, slow, ...) means a new [`Command`]
//! variant with its own args struct that flattens [`ClientArgs`], and a function that returns
//! a [`Report`] with its own `scenario` section.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde::Serialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{client_async_with_config, WebSocketStream};

/// One bench process keeps at most this many sessions: the open-file hard limit is 20,000
/// and the process needs some descriptors of its own. Run several processes for more.
const MAX_SESSIONS_PER_PROCESS: usize = 18_000;

/// Linux reports utime/stime in /proc/<pid>/stat in USER_HZ ticks, fixed at 100 by the ABI.
const USER_HZ: f64 = 100.0;

#[derive(Debug, Parser)]
#[command(
    name = "herald-bench",
    version,
    about = "Load generator and benchmarks for herald nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open N authenticated sessions, hold them idle, and report node RSS per session and
    /// node CPU at rest.
    Idle(IdleArgs),
}

/// Options every scenario that opens sessions shares.
#[derive(Debug, Clone, Args)]
struct ClientArgs {
    /// Node WebSocket base URL (ws://host:port); repeat or comma-separate for several nodes.
    /// Sessions are spread round-robin. "/ws" is appended unless the URL has a path.
    #[arg(long = "target", required = true, value_delimiter = ',', num_args = 1..)]
    targets: Vec<String>,

    /// Sessions to open (at most 18,000 per bench process).
    #[arg(long, default_value_t = 1000)]
    sessions: usize,

    /// HS256 secret to mint client JWTs with (sub = "bench-<i>", exp = now + 1 h).
    #[arg(
        long,
        env = "HERALD_BENCH_SECRET",
        hide_env_values = true,
        conflicts_with = "dev"
    )]
    secret: Option<String>,

    /// The node runs with --dev: the token is the user id itself.
    #[arg(long)]
    dev: bool,

    /// Source addresses to bind client sockets to, spread round-robin: a range
    /// (127.0.0.2-127.0.0.20), a list (a,b,c) or one address. Each source address has its
    /// own ~28k ephemeral ports per destination.
    #[arg(long)]
    source_ips: Option<String>,

    /// Most handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,

    /// Seconds one session may take from TCP connect to its welcome frame.
    #[arg(long, default_value_t = 30.0)]
    connect_timeout: f64,

    /// Read buffer of each client connection, in bytes (small keeps the bench process small).
    #[arg(long, default_value_t = 4096)]
    client_read_buffer: usize,

    /// First user index: user ids are bench-<first-user + i>. Lets several bench processes
    /// against the same nodes use distinct users.
    #[arg(long, default_value_t = 0)]
    first_user: usize,
}

/// Options for reading node processes and writing results.
#[derive(Debug, Clone, Args)]
struct ProbeArgs {
    /// Node PIDs to read RSS (/proc/<pid>/status VmRSS) and CPU time (/proc/<pid>/stat)
    /// from. When as many PIDs as targets are given they pair up by position; otherwise the
    /// connected sessions are attributed evenly.
    #[arg(long = "pids", value_delimiter = ',', num_args = 1..)]
    pids: Vec<u32>,

    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,

    /// Write a small JSON file here once all sessions are settled (connected or failed), so
    /// a script driving several bench processes knows when to take its own samples.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
struct IdleArgs {
    #[command(flatten)]
    client: ClientArgs,

    #[command(flatten)]
    probe: ProbeArgs,

    /// Seconds to hold the sessions after all are connected (node CPU is measured over it;
    /// longer than the node's ping interval so a ping round is included).
    #[arg(long, default_value_t = 30.0)]
    hold: f64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald-bench: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Idle(args) => idle(args).await,
        }
    });
    // Dropping thousands of held sessions is quick; do not wait for their tasks.
    runtime.shutdown_background();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

// ===== Process limits =====

/// Raises the soft open-file limit to the hard one and refuses session counts that cannot fit.
fn prepare_fd_limit(sessions: usize) -> anyhow::Result<u64> {
    if sessions > MAX_SESSIONS_PER_PROCESS {
        bail!(
            "{sessions} sessions is more than one bench process can hold ({MAX_SESSIONS_PER_PROCESS}; \
             the open-file hard limit is 20,000). Run several bench processes, each with \
             --sessions <= {MAX_SESSIONS_PER_PROCESS} and its own --first-user \
             (scripts/bench-idle.sh does this when SESSIONS is larger)"
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
}

/// Makes the token of session `i`.
enum Tokens {
    Jwt { key: EncodingKey, exp: u64 },
    Dev,
}

impl Tokens {
    fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        match (&args.secret, args.dev) {
            (Some(secret), false) => Ok(Tokens::Jwt {
                key: EncodingKey::from_secret(secret.as_bytes()),
                exp: unix_secs() + 3600,
            }),
            (None, true) => Ok(Tokens::Dev),
            _ => bail!("give --secret <jwt secret> (or HERALD_BENCH_SECRET), or --dev"),
        }
    }

    fn token(&self, user: &str) -> anyhow::Result<String> {
        match self {
            Tokens::Jwt { key, exp } => {
                let claims = Claims {
                    sub: user,
                    exp: *exp,
                };
                encode(&Header::default(), &claims, key).context("cannot sign a JWT")
            }
            Tokens::Dev => Ok(user.to_string()),
        }
    }
}

// ===== Dialing =====

/// A node to connect to: its socket address and the WebSocket URL without query.
#[derive(Debug, Clone)]
struct Target {
    label: String,
    addr: SocketAddr,
    ws_url: String,
}

async fn resolve_target(raw: &str) -> anyhow::Result<Target> {
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
    let path = match uri.path() {
        "" | "/" => "/ws",
        p => p,
    };
    Ok(Target {
        label: raw.to_string(),
        addr,
        ws_url: format!("ws://{authority}{path}"),
    })
}

/// Parses "a-b" (an IPv4 range), "a,b,c" or one address.
fn parse_source_ips(spec: &str) -> anyhow::Result<Vec<IpAddr>> {
    let spec = spec.trim();
    if let Some((from, to)) = spec.split_once('-') {
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
        return Ok((a..=b)
            .map(|v| IpAddr::V4(std::net::Ipv4Addr::from(v)))
            .collect());
    }
    spec.split(',')
        .map(|s| {
            s.trim()
                .parse::<IpAddr>()
                .with_context(|| format!("bad source IP {s:?}"))
        })
        .collect()
}

/// Opens authenticated sessions: TCP from a chosen source address, then the WebSocket
/// handshake, then the welcome frame.
struct Dialer {
    targets: Vec<Target>,
    source_ips: Vec<IpAddr>,
    tokens: Tokens,
    first_user: usize,
    ws_config: WebSocketConfig,
    timeout: Duration,
}

/// A session that received its welcome.
struct Session {
    ws: WebSocketStream<TcpStream>,
    target: usize,
}

impl Dialer {
    async fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let mut targets = Vec::new();
        for raw in &args.targets {
            targets.push(resolve_target(raw).await?);
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
            targets,
            source_ips,
            tokens: Tokens::new(args)?,
            first_user: args.first_user,
            ws_config: WebSocketConfig::default()
                .read_buffer_size(args.client_read_buffer.max(256))
                .write_buffer_size(0),
            timeout: Duration::from_secs_f64(args.connect_timeout),
        })
    }

    fn target_of(&self, i: usize) -> usize {
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

    /// Opens session `i` and waits for its welcome frame. Errors are short, groupable texts.
    async fn open(&self, i: usize) -> Result<Session, String> {
        match tokio::time::timeout(self.timeout, self.open_inner(i)).await {
            Ok(r) => r,
            Err(_) => Err(format!("timeout after {:?}", self.timeout)),
        }
    }

    async fn open_inner(&self, i: usize) -> Result<Session, String> {
        let t = self.target_of(i);
        let target = &self.targets[t];
        let socket = if target.addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| format!("socket: {e}"))?;
        if let Some(ip) = self.source_of(i) {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| format!("bind {ip}: {e}"))?;
        }
        let stream = socket
            .connect(target.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let user = format!("bench-{}", self.first_user + i);
        let token = self.tokens.token(&user).map_err(|e| format!("{e:#}"))?;
        let url = format!("{}?token={}", target.ws_url, token);
        let (mut ws, _response) = client_async_with_config(url, stream, Some(self.ws_config))
            .await
            .map_err(|e| match e {
                WsError::Http(resp) => format!("handshake: HTTP {}", resp.status()),
                other => format!("handshake: {other}"),
            })?;
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let v: serde_json::Value = serde_json::from_str(text.as_str())
                    .map_err(|_| "welcome: not JSON".to_string())?;
                if v["type"] != "welcome" {
                    return Err(format!("welcome: first frame has type {}", v["type"]));
                }
            }
            Some(Ok(Message::Close(f))) => {
                return Err(format!(
                    "welcome: closed with {}",
                    f.map(|f| u16::from(f.code)).unwrap_or(1005)
                ))
            }
            Some(Ok(other)) => return Err(format!("welcome: unexpected {other:?} frame")),
            Some(Err(e)) => return Err(format!("welcome: {e}")),
            None => return Err("welcome: connection ended".into()),
        }
        Ok(Session { ws, target: t })
    }
}

// ===== Opening many sessions =====

/// What opening the sessions of a scenario gave.
#[derive(Debug, Clone, Serialize)]
struct ConnectStats {
    requested: usize,
    connected: usize,
    failed: usize,
    duration_s: f64,
    sessions_per_s: f64,
    /// Time from TCP connect to welcome frame, over the connected sessions, in ms.
    handshake_ms: Percentiles,
    /// Failures grouped by cause.
    errors: BTreeMap<String, usize>,
    /// Connected sessions per target, in --target order.
    per_target: Vec<usize>,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of_micros(mut v: Vec<u32>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_unstable();
        let at = |q: f64| {
            let idx = ((v.len() - 1) as f64 * q).round() as usize;
            f64::from(v[idx.min(v.len() - 1)]) / 1000.0
        };
        Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// Sessions held by [`open_sessions`]: each runs in its own task that keeps reading (so
/// pings are answered) until the connection ends.
struct Held {
    /// Held sessions whose connection has ended since they connected.
    ended: Arc<AtomicUsize>,
}

/// Opens `count` sessions with at most `concurrency` handshakes in flight. Each connected
/// session is handed to `hold`, which runs in the session's own task after the handshake
/// permit is released.
async fn open_sessions<F, Fut>(
    dialer: Arc<Dialer>,
    count: usize,
    concurrency: usize,
    hold: F,
) -> (ConnectStats, Held)
where
    F: Fn(Session) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let hold = Arc::new(hold);
    let ended = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Result<(usize, u32), String>>();
    for i in 0..count {
        let dialer = dialer.clone();
        let permits = permits.clone();
        let hold = hold.clone();
        let ended = ended.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let permit = match permits.acquire_owned().await {
                Ok(p) => p,
                Err(_) => return,
            };
            let t0 = Instant::now();
            let opened = dialer.open(i).await;
            drop(permit);
            match opened {
                Ok(session) => {
                    let micros = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                    let _ = done.send(Ok((session.target, micros)));
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
    let mut latencies = Vec::with_capacity(count);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut settled = 0usize;
    let mut progress = tokio::time::interval(Duration::from_secs(2));
    progress.tick().await;
    while settled < count {
        tokio::select! {
            r = done_rx.recv() => match r {
                Some(Ok((t, micros))) => {
                    per_target[t] += 1;
                    latencies.push(micros);
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
                    latencies.len(),
                    settled - latencies.len(),
                    count - settled,
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    let duration = started.elapsed().as_secs_f64();
    let connected = latencies.len();
    let stats = ConnectStats {
        requested: count,
        connected,
        failed: count - connected,
        duration_s: round3(duration),
        sessions_per_s: round3(connected as f64 / duration.max(1e-9)),
        handshake_ms: Percentiles::of_micros(latencies),
        errors,
        per_target,
    };
    (stats, Held { ended })
}

/// Reads a held session until it ends; tungstenite answers the node's pings while reading.
async fn read_until_closed(mut session: Session) {
    while let Some(frame) = session.ws.next().await {
        if frame.is_err() {
            break;
        }
    }
}

// ===== /proc sampling =====

/// One reading of a process.
#[derive(Debug, Clone, Copy, Serialize)]
struct ProcSample {
    rss_kib: u64,
    rss_anon_kib: u64,
    /// utime + stime, in seconds.
    cpu_s: f64,
}

impl ProcSample {
    fn read(pid: &str) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("/proc/{pid}/status has no {name}"))?;
            line[name.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("bad {name} line {line:?}"))
        };
        let rss_kib = field("VmRSS:")?;
        let rss_anon_kib = field("RssAnon:").unwrap_or(0);
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
        // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .with_context(|| format!("bad /proc/{pid}/stat"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
        let tick = |n: usize| -> anyhow::Result<u64> {
            fields
                .get(n - 3)
                .with_context(|| format!("/proc/{pid}/stat has no field {n}"))?
                .parse()
                .with_context(|| format!("bad field {n} in /proc/{pid}/stat"))
        };
        let cpu_s = (tick(14)? + tick(15)?) as f64 / USER_HZ;
        Ok(ProcSample {
            rss_kib,
            rss_anon_kib,
            cpu_s,
        })
    }
}

fn sample_all(pids: &[u32]) -> anyhow::Result<Vec<ProcSample>> {
    pids.iter()
        .map(|p| ProcSample::read(&p.to_string()))
        .collect()
}

// ===== Reports =====

/// The machine a run happened on.
#[derive(Debug, Clone, Serialize)]
struct Machine {
    nproc: usize,
    cpu_model: String,
    kernel: String,
}

impl Machine {
    fn detect() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model,
            kernel,
        }
    }
}

/// Memory and CPU of one node over an idle run.
#[derive(Debug, Clone, Serialize)]
struct NodeIdle {
    pid: u32,
    /// The target paired with this PID, when PIDs and targets pair up.
    target: Option<String>,
    /// Sessions attributed to this node.
    sessions: usize,
    rss_before_kib: u64,
    /// Right after the last session connected.
    rss_connected_kib: u64,
    /// At the end of the hold.
    rss_after_kib: u64,
    rss_delta_kib: i64,
    kib_per_session: f64,
    rss_anon_delta_kib: i64,
    cpu_s_connect: f64,
    cpu_s_hold: f64,
    /// CPU during the hold, in percent of one core.
    cpu_pct_hold: f64,
}

#[derive(Debug, Clone, Serialize)]
struct IdleResult {
    hold_s: f64,
    /// Held sessions whose connection ended during the hold.
    ended_during_hold: usize,
    nodes: Vec<NodeIdle>,
    /// RSS of this bench process at the end of the hold.
    bench_rss_kib: Option<u64>,
}

/// One run of one scenario, as written to --json.
#[derive(Debug, Clone, Serialize)]
struct Report<S: Serialize> {
    scenario: &'static str,
    unix_time: u64,
    utc: String,
    machine: Machine,
    targets: Vec<String>,
    source_ips: usize,
    concurrency: usize,
    connect: ConnectStats,
    result: S,
}

impl<S: Serialize> Report<S> {
    fn write_json(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self).context("cannot serialise the report")?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

fn print_connect(c: &ConnectStats) {
    println!("sessions requested      {:>12}", c.requested);
    println!("sessions connected      {:>12}", c.connected);
    println!("sessions failed         {:>12}", c.failed);
    println!("connect duration (s)    {:>12.2}", c.duration_s);
    println!("connect rate (sess/s)   {:>12.0}", c.sessions_per_s);
    println!(
        "handshake ms p50/p99/max {:>11}",
        format!(
            "{:.1}/{:.1}/{:.1}",
            c.handshake_ms.p50, c.handshake_ms.p99, c.handshake_ms.max
        )
    );
    for (e, n) in &c.errors {
        println!("  failure x{n}: {e}");
    }
}

fn print_idle(r: &Report<IdleResult>) {
    println!();
    println!("== herald-bench idle ({}) ==", r.utc);
    println!(
        "machine: {} cores, {}, Linux {}",
        r.machine.nproc, r.machine.cpu_model, r.machine.kernel
    );
    print_connect(&r.connect);
    println!("hold (s)                {:>12.1}", r.result.hold_s);
    println!("ended during hold       {:>12}", r.result.ended_during_hold);
    if let Some(b) = r.result.bench_rss_kib {
        println!("bench process RSS (KiB) {b:>12}");
    }
    if r.result.nodes.is_empty() {
        println!("(no --pids given: node memory not measured)");
        return;
    }
    println!();
    println!(
        "{:>8} {:>9} {:>12} {:>12} {:>12} {:>12} {:>11} {:>10} {:>8}",
        "pid",
        "sessions",
        "rss_before",
        "rss_after",
        "delta_KiB",
        "KiB/session",
        "anon/sess",
        "cpu_hold_s",
        "cpu_%"
    );
    for n in &r.result.nodes {
        let anon = if n.sessions > 0 {
            n.rss_anon_delta_kib as f64 / n.sessions as f64
        } else {
            0.0
        };
        println!(
            "{:>8} {:>9} {:>12} {:>12} {:>12} {:>12.2} {:>11.2} {:>10.2} {:>8.2}",
            n.pid,
            n.sessions,
            n.rss_before_kib,
            n.rss_after_kib,
            n.rss_delta_kib,
            n.kib_per_session,
            anon,
            n.cpu_s_hold,
            n.cpu_pct_hold
        );
    }
}

// ===== Scenario: idle =====

async fn idle(args: IdleArgs) -> anyhow::Result<()> {
    let c = &args.client;
    if !(args.hold.is_finite() && args.hold >= 0.0) {
        bail!("--hold must be a non-negative number of seconds");
    }
    let fd_limit = prepare_fd_limit(c.sessions)?;
    let dialer = Arc::new(Dialer::new(c).await?);
    if !args.probe.pids.is_empty()
        && args.probe.pids.len() != dialer.targets.len()
        && dialer.targets.len() > 1
    {
        eprintln!(
            "herald-bench: {} PIDs for {} targets: sessions are attributed evenly to the PIDs",
            args.probe.pids.len(),
            dialer.targets.len()
        );
    }
    eprintln!(
        "herald-bench idle: {} sessions to {} target(s) from {} source address(es), {} in flight, open-file limit {}",
        c.sessions,
        dialer.targets.len(),
        dialer.source_ips.len().max(1),
        c.concurrency,
        fd_limit
    );

    let before = sample_all(&args.probe.pids)?;
    let (connect, held) =
        open_sessions(dialer.clone(), c.sessions, c.concurrency, read_until_closed).await;
    let connected_sample = sample_all(&args.probe.pids)?;
    if let Some(path) = &args.probe.ready_file {
        let ready = serde_json::json!({
            "connected": connect.connected,
            "failed": connect.failed,
            "unix_time": unix_secs(),
        });
        std::fs::write(path, ready.to_string())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!(
        "herald-bench: {} connected, {} failed in {:.1} s; holding {:.0} s",
        connect.connected, connect.failed, connect.duration_s, args.hold
    );

    let ended_at_start = held.ended.load(Ordering::Relaxed);
    let hold_started = Instant::now();
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs_f64(args.hold)) => {}
        _ = tokio::signal::ctrl_c() => eprintln!("herald-bench: interrupted; reporting what was measured"),
    }
    let hold_s = hold_started.elapsed().as_secs_f64();
    let after = sample_all(&args.probe.pids)?;
    let ended_during_hold = held.ended.load(Ordering::Relaxed) - ended_at_start;

    let pair_up = args.probe.pids.len() == dialer.targets.len();
    let nodes = args
        .probe
        .pids
        .iter()
        .enumerate()
        .map(|(k, &pid)| {
            let sessions = if pair_up {
                connect.per_target[k]
            } else {
                connect.connected / args.probe.pids.len()
            };
            let (b, m, a) = (before[k], connected_sample[k], after[k]);
            let delta = a.rss_kib as i64 - b.rss_kib as i64;
            let cpu_hold = a.cpu_s - m.cpu_s;
            NodeIdle {
                pid,
                target: pair_up.then(|| dialer.targets[k].label.clone()),
                sessions,
                rss_before_kib: b.rss_kib,
                rss_connected_kib: m.rss_kib,
                rss_after_kib: a.rss_kib,
                rss_delta_kib: delta,
                kib_per_session: if sessions > 0 {
                    round3(delta as f64 / sessions as f64)
                } else {
                    0.0
                },
                rss_anon_delta_kib: a.rss_anon_kib as i64 - b.rss_anon_kib as i64,
                cpu_s_connect: round3(m.cpu_s - b.cpu_s),
                cpu_s_hold: round3(cpu_hold),
                cpu_pct_hold: round3(100.0 * cpu_hold / hold_s.max(1e-9)),
            }
        })
        .collect();

    let report = Report {
        scenario: "idle",
        unix_time: unix_secs(),
        utc: utc_string(unix_secs()),
        machine: Machine::detect(),
        targets: dialer.targets.iter().map(|t| t.label.clone()).collect(),
        source_ips: dialer.source_ips.len(),
        concurrency: c.concurrency,
        connect,
        result: IdleResult {
            hold_s: round3(hold_s),
            ended_during_hold,
            nodes,
            bench_rss_kib: ProcSample::read("self").ok().map(|s| s.rss_kib),
        },
    };
    print_idle(&report);
    if let Some(path) = &args.probe.json {
        report.write_json(path)?;
        eprintln!("herald-bench: wrote {}", path.display());
    }
    if report.connect.connected == 0 {
        bail!("no session connected");
    }
    Ok(())
}

// ===== Small helpers =====

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// "YYYY-MM-DDTHH:MM:SSZ" for a Unix time (civil-from-days, proleptic Gregorian).
fn utc_string(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
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
    }

    #[test]
    fn utc_strings_are_civil_dates() {
        assert_eq!(utc_string(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_string(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_string(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn percentiles_of_an_empty_run_are_zero() {
        assert_eq!(Percentiles::of_micros(Vec::new()).max, 0.0);
        let p = Percentiles::of_micros((1..=100).map(|v| v * 1000).collect());
        assert_eq!(p.p50, 51.0);
        assert_eq!(p.max, 100.0);
    }

    #[test]
    fn proc_self_can_be_sampled() {
        let s = ProcSample::read("self").unwrap(); // safe: test
        assert!(s.rss_kib > 0);
    }

    #[test]
    fn too_many_sessions_are_refused_with_advice() {
        let e = prepare_fd_limit(MAX_SESSIONS_PER_PROCESS + 1).unwrap_err(); // safe: test
        assert!(e.to_string().contains("several bench processes"));
    }
}
