//! `flood`: a pre-authentication flood. N connections each send M KiB of a request head
//! that never ends, are held open, then closed; the node's RSS is read before, at its peak,
//! while held, right after the close and after a settle time, so what a flood costs and
//! whether that memory is given back are both visible.
//!
//! Bounded in count (`--connections`, at most [`MAX_CONNECTIONS`]) and in time (connect and
//! send deadlines, `--hold`, `--settle`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::dial::parse_source_ips;
use crate::probe::{Machine, ProcSample};
use crate::report::row;
use crate::util::{check_secs, require_loopback, round3, unix_secs, utc_string};

/// One bench process holds at most this many connections (the open-file hard limit on the
/// machines this runs on is 20,000).
const MAX_CONNECTIONS: usize = 15_000;
/// A connect, or the whole send of one connection's head, must finish within this time.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the node's RSS is read for the peak.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Args)]
pub(crate) struct FloodArgs {
    /// The node: `host:port`, `http://host:port` or `ws://host:port` (loopback only).
    #[arg(long)]
    target: String,

    /// Connections to open.
    #[arg(long, default_value_t = 4000)]
    connections: usize,

    /// KiB of request head each connection sends (one long header line; the head is never
    /// finished, so nothing is authenticated).
    #[arg(long, default_value_t = 256)]
    header_kib: usize,

    /// Connects (and sends) in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,

    /// Seconds to hold every connection open once all have sent their head (the node's
    /// header timeout is 10 s; a node that keeps them waits, one that refused them closed
    /// them already).
    #[arg(long, default_value_t = 5.0)]
    hold: f64,

    /// Seconds to wait after closing every connection before the last RSS reading.
    #[arg(long, default_value_t = 30.0)]
    settle: f64,

    /// Source addresses to spread connections over, e.g. 127.0.0.2-127.0.0.20.
    #[arg(long)]
    source_ips: Option<String>,

    /// PID of the node, for its RSS (/proc/<pid>/status).
    #[arg(long)]
    pid: u32,

    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// How one connection ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Outcome {
    /// The connect failed or timed out.
    ConnectFailed,
    /// The node answered with this HTTP status (and closed, or was closed by us later).
    Status(u16),
    /// Closed by the node without an answer.
    ClosedSilently,
    /// Reset, or a read/write failed, before any answer.
    Reset,
    /// Still open, unanswered, when the hold ended.
    Held,
}

impl Outcome {
    fn label(self) -> String {
        match self {
            Outcome::ConnectFailed => "connect_failed".into(),
            Outcome::Status(s) => format!("http_{s}"),
            Outcome::ClosedSilently => "closed_silently".into(),
            Outcome::Reset => "reset".into(),
            Outcome::Held => "held_unanswered".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct FloodResult {
    target: String,
    connections: usize,
    header_kib: usize,
    concurrency: usize,
    hold_s: f64,
    settle_s: f64,
    /// Seconds from the first connect to the last head sent (or given up on).
    send_s: f64,
    /// KiB the bench managed to write, over all connections.
    sent_kib: u64,
    outcomes: BTreeMap<String, usize>,
    pid: u32,
    rss_before_kib: u64,
    /// Highest RSS read every 100 ms from the first connect to the close.
    rss_peak_kib: u64,
    /// At the end of the hold, every connection still open on the bench's side.
    rss_held_kib: u64,
    /// One second after every connection was closed.
    rss_after_close_kib: u64,
    /// `--settle` seconds after the close.
    rss_after_settle_kib: u64,
    /// The kernel's own high-water mark of the node's RSS (VmHWM) at the end.
    vm_hwm_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
struct FloodReport {
    scenario: &'static str,
    unix_time: u64,
    utc: String,
    machine: Machine,
    result: FloodResult,
}

pub(crate) async fn run(args: FloodArgs) -> anyhow::Result<u8> {
    if args.connections == 0 || args.connections > MAX_CONNECTIONS {
        bail!("--connections must be 1..={MAX_CONNECTIONS}");
    }
    if args.header_kib == 0 || args.header_kib > 4096 {
        bail!("--header-kib must be 1..=4096");
    }
    check_secs(args.hold, "--hold", true)?;
    check_secs(args.settle, "--settle", true)?;
    if args.hold > 600.0 || args.settle > 600.0 {
        bail!("--hold and --settle are at most 600 s");
    }
    let addr = parse_target(&args.target)?;
    let sources: Vec<IpAddr> = match &args.source_ips {
        Some(spec) => parse_source_ips(spec)?,
        None => Vec::new(),
    };
    let soft = rlimit::increase_nofile_limit(u64::MAX).context("cannot raise RLIMIT_NOFILE")?;
    if soft < args.connections as u64 + 64 {
        bail!(
            "open-file limit is {soft}, but {} connections need about {}",
            args.connections,
            args.connections + 64
        );
    }
    let pid = args.pid.to_string();
    let before = ProcSample::read(&pid)?.rss_kib;
    eprintln!(
        "herald-bench flood: {} connections x {} KiB of unfinished head to {addr}, node pid {}, RSS {before} KiB",
        args.connections, args.header_kib, args.pid
    );

    let peak = Arc::new(AtomicU64::new(before));
    let sampling = CancellationToken::new();
    let sampler = {
        let (peak, stop, pid) = (peak.clone(), sampling.clone(), pid.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(s) = ProcSample::read(&pid) {
                    peak.fetch_max(s.rss_kib, Ordering::Relaxed);
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        })
    };

    let release = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let sent_all = Arc::new(AtomicUsize::new(0));
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let outcomes = Arc::new(Mutex::new(BTreeMap::<Outcome, usize>::new()));
    let head = Arc::new(flood_head(addr, args.header_kib * 1024));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
        let conn = Conn {
            addr,
            source,
            head: head.clone(),
            gate: gate.clone(),
            release: release.clone(),
            sent_all: sent_all.clone(),
            sent_bytes: sent_bytes.clone(),
            outcomes: outcomes.clone(),
        };
        tasks.push(tokio::spawn(conn.run()));
    }
    // Every connection has sent its head or given up (each is bounded by its timeouts).
    let give_up = started + CONNECT_TIMEOUT + SEND_TIMEOUT + Duration::from_secs(5);
    while sent_all.load(Ordering::Relaxed) < args.connections && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let send_s = started.elapsed().as_secs_f64();
    eprintln!(
        "herald-bench flood: heads sent in {send_s:.1} s; holding {:.0} s",
        args.hold
    );
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let held = ProcSample::read(&pid)?.rss_kib;
    release.cancel();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    sampling.cancel();
    let _ = sampler.await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_close = ProcSample::read(&pid)?.rss_kib;
    eprintln!(
        "herald-bench flood: all closed; RSS {after_close} KiB; settling {:.0} s",
        args.settle
    );
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let after_settle = ProcSample::read(&pid)?.rss_kib;
    let hwm = read_status_kib(&pid, "VmHWM:").unwrap_or(0);

    let outcomes = outcomes
        .lock()
        .map(|m| m.iter().map(|(k, v)| (k.label(), *v)).collect())
        .unwrap_or_default();
    let report = FloodReport {
        scenario: "flood",
        unix_time: unix_secs(),
        utc: utc_string(unix_secs()),
        machine: Machine::detect(),
        result: FloodResult {
            target: addr.to_string(),
            connections: args.connections,
            header_kib: args.header_kib,
            concurrency: args.concurrency,
            hold_s: args.hold,
            settle_s: args.settle,
            send_s: round3(send_s),
            sent_kib: sent_bytes.load(Ordering::Relaxed) / 1024,
            outcomes,
            pid: args.pid,
            rss_before_kib: before,
            rss_peak_kib: peak.load(Ordering::Relaxed).max(held),
            rss_held_kib: held,
            rss_after_close_kib: after_close,
            rss_after_settle_kib: after_settle,
            vm_hwm_kib: hwm,
        },
    };
    print(&report.result);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(0)
}

/// One flooding connection.
struct Conn {
    addr: SocketAddr,
    source: Option<IpAddr>,
    head: Arc<Vec<u8>>,
    gate: Arc<Semaphore>,
    release: CancellationToken,
    sent_all: Arc<AtomicUsize>,
    sent_bytes: Arc<AtomicU64>,
    outcomes: Arc<Mutex<BTreeMap<Outcome, usize>>>,
}

impl Conn {
    async fn run(self) {
        let outcome = self.flood().await;
        if let Ok(mut m) = self.outcomes.lock() {
            *m.entry(outcome).or_default() += 1;
        }
    }

    async fn flood(&self) -> Outcome {
        let permit = self.gate.acquire().await;
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await {
            Ok(Ok(s)) => s,
            _ => {
                self.sent_all.fetch_add(1, Ordering::Relaxed);
                return Outcome::ConnectFailed;
            }
        };
        let (mut rd, mut wr) = stream.into_split();
        // Send in 4 KiB writes so a node that answers early is seen answering.
        let send = async {
            for chunk in self.head.chunks(4096) {
                if wr.write_all(chunk).await.is_err() {
                    return false;
                }
                self.sent_bytes
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            true
        };
        let mut first = [0u8; 16];
        let mut got = 0;
        let early = tokio::select! {
            r = tokio::time::timeout(SEND_TIMEOUT, send) => { let _ = r; None }
            r = rd.read(&mut first) => Some(r),
        };
        self.sent_all.fetch_add(1, Ordering::Relaxed);
        drop(permit);
        let read = match early {
            Some(r) => r,
            None => tokio::select! {
                r = rd.read(&mut first) => r,
                _ = self.release.cancelled() => return Outcome::Held,
            },
        };
        match read {
            Ok(0) => return Outcome::ClosedSilently,
            Ok(n) => got += n,
            Err(_) => return Outcome::Reset,
        }
        // Enough for "HTTP/1.1 431".
        while got < 12 {
            match rd.read(&mut first[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        let status = std::str::from_utf8(&first[..got])
            .ok()
            .and_then(|s| s.get(9..12))
            .and_then(|s| s.parse().ok());
        // Hold the socket (answered or not) until released, like a flood would.
        self.release.cancelled().await;
        match status {
            Some(s) => Outcome::Status(s),
            None => Outcome::Reset,
        }
    }

    async fn connect(&self) -> std::io::Result<tokio::net::TcpStream> {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = self.source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.connect(self.addr).await
    }
}

/// A request line and the start of one header of `bytes` bytes in all, never terminated.
fn flood_head(addr: SocketAddr, bytes: usize) -> Vec<u8> {
    let mut head = format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\nX-Flood: ").into_bytes();
    head.resize(bytes.max(head.len()), b'a');
    head
}

fn parse_target(raw: &str) -> anyhow::Result<SocketAddr> {
    let rest = raw
        .strip_prefix("http://")
        .or_else(|| raw.strip_prefix("ws://"))
        .unwrap_or(raw);
    let authority = rest.split('/').next().unwrap_or(rest);
    let addr: SocketAddr = authority
        .parse()
        .with_context(|| format!("--target {raw:?}: expected host:port with an IP address"))?;
    require_loopback(addr.ip(), "--target")?;
    Ok(addr)
}

fn read_status_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn print(r: &FloodResult) {
    println!("== herald-bench flood ==");
    row("target", &r.target);
    row("connections", r.connections);
    row("head KiB per connection", r.header_kib);
    row("heads sent in (s)", format!("{:.1}", r.send_s));
    row("KiB sent in all", r.sent_kib);
    for (what, n) in &r.outcomes {
        row(&format!("outcome {what}"), n);
    }
    println!();
    row("node pid", r.pid);
    row("rss before (KiB)", r.rss_before_kib);
    row("rss peak (KiB)", r.rss_peak_kib);
    row(&format!("rss held {:.0} s (KiB)", r.hold_s), r.rss_held_kib);
    row("rss 1 s after close (KiB)", r.rss_after_close_kib);
    row(
        &format!("rss {:.0} s after close (KiB)", r.settle_s),
        r.rss_after_settle_kib,
    );
    row("VmHWM (KiB)", r.vm_hwm_kib);
    row(
        "peak - before (MiB)",
        format!(
            "{:.1}",
            (r.rss_peak_kib as f64 - r.rss_before_kib as f64) / 1024.0
        ),
    );
    row(
        "after settle - before (MiB)",
        format!(
            "{:.1}",
            (r.rss_after_settle_kib as f64 - r.rss_before_kib as f64) / 1024.0
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_loopback_addresses() {
        assert!(parse_target("127.0.0.1:8080").is_ok());
        assert!(parse_target("ws://127.0.0.1:8080/ws").is_ok());
        assert!(parse_target("http://10.0.0.1:80").is_err());
        assert!(parse_target("localhost:80").is_err());
    }

    #[test]
    fn the_head_is_never_finished() {
        let h = flood_head("127.0.0.1:1".parse().unwrap(), 8192);
        assert_eq!(h.len(), 8192);
        assert!(!h.windows(4).any(|w| w == b"\r\n\r\n"));
    }
}
