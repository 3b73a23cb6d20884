//! `idle`: N sessions held idle (WebSocket pings answered, or SSE streams read, keep-alive
//! comments counted); node RSS per session and CPU at rest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::dial::{
    open_sessions, open_sessions_with, prepare_fd_limit, write_ready_file, ClientArgs, Dialer,
    SseSession,
};
use crate::probe::{sample_all, warn_if_noisy, Meter, ProbeArgs, ProcSample};
use crate::recv::{receive, RecvShared};
use crate::report::{row, Report};
use crate::sse::SseItem;
use crate::util::{check_secs, round3};

#[derive(Debug, Clone, Args)]
pub(crate) struct IdleArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,

    #[command(flatten)]
    pub(crate) probe: ProbeArgs,

    /// Seconds to hold the sessions after all are connected (node CPU is measured over it;
    /// longer than the node's ping interval so a ping round is included).
    #[arg(long, default_value_t = 30.0)]
    pub(crate) hold: f64,

    /// How sessions connect: WebSocket (GET /ws) or server-sent events (GET /sse on the
    /// target's host and port, whatever path its URL has; herald only).
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub(crate) transport: Transport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Transport {
    Ws,
    Sse,
}

/// Counters of the held SSE streams.
#[derive(Default)]
struct SseCounters {
    keep_alives: AtomicU64,
    events: AtomicU64,
}

/// Holds one SSE stream until `stop`, reading it (the node's writes must not back up) and
/// counting its keep-alive comments and events.
async fn hold_sse(
    mut s: SseSession,
    stop: tokio_util::sync::CancellationToken,
    counters: Arc<SseCounters>,
) {
    loop {
        let item = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            item = s.conn.next() => item,
        };
        match item {
            Ok(Some(SseItem::Comment(_))) => {
                counters.keep_alives.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(SseItem::Event { .. })) => {
                counters.events.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) | Err(_) => return,
        }
    }
}

/// Memory and CPU of one node over an idle run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct NodeIdle {
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
pub(crate) struct IdleResult {
    transport: Transport,
    hold_s: f64,
    /// SSE only: `:keep-alive` comments received during the hold (the node's pings), and
    /// events (anything else it sent).
    keep_alives_during_hold: Option<u64>,
    events_during_hold: Option<u64>,
    /// Held sessions whose connection ended during the hold.
    ended_during_hold: usize,
    nodes: Vec<NodeIdle>,
    /// RSS of this bench process at the end of the hold.
    bench_rss_kib: Option<u64>,
}

pub(crate) async fn run(args: IdleArgs) -> anyhow::Result<u8> {
    let c = &args.client;
    check_secs(args.hold, "--hold", true)?;
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
        "herald-bench idle: {} {} sessions to {} target(s) from {} source address(es), {} in flight, open-file limit {}",
        c.sessions,
        match args.transport {
            Transport::Ws => "WebSocket",
            Transport::Sse => "SSE",
        },
        dialer.targets.len(),
        dialer.source_ips.len().max(1),
        c.concurrency,
        fd_limit
    );

    let before = sample_all(&args.probe.pids)?;
    let (shared, _rx) = RecvShared::new(c.protocol);
    let counters = Arc::new(SseCounters::default());
    let d = dialer.clone();
    let (connect, held) = match args.transport {
        Transport::Ws => {
            let sh = shared.clone();
            open_sessions(
                dialer.clone(),
                c.sessions,
                c.concurrency,
                move |i| d.spec(i),
                move |s| receive(s, sh.clone()),
            )
            .await
        }
        Transport::Sse => {
            let stop = shared.stop.clone();
            let counters = counters.clone();
            open_sessions_with(
                dialer.clone(),
                c.sessions,
                c.concurrency,
                move |i| d.spec(i),
                |d: Arc<Dialer>, spec| async move { d.open_sse(&spec).await },
                move |s| hold_sse(s, stop.clone(), counters.clone()),
            )
            .await
        }
    };
    let connected_sample = sample_all(&args.probe.pids)?;
    write_ready_file(args.probe.ready_file.as_deref(), &connect)?;
    eprintln!(
        "herald-bench: {} connected, {} failed in {:.1} s; holding {:.0} s",
        connect.connected, connect.failed, connect.duration_s, args.hold
    );

    let ended_at_start = held.ended.load(Ordering::Relaxed);
    let keep_alives_at_start = counters.keep_alives.load(Ordering::Relaxed);
    let events_at_start = counters.events.load(Ordering::Relaxed);
    let meter = Meter::start(&args.probe);
    let hold_started = Instant::now();
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs_f64(args.hold)) => {}
        _ = tokio::signal::ctrl_c() => eprintln!("herald-bench: interrupted; reporting what was measured"),
    }
    let hold_s = hold_started.elapsed().as_secs_f64();
    let cpu = meter.finish();
    let after = sample_all(&args.probe.pids)?;
    let ended_during_hold = held.ended.load(Ordering::Relaxed) - ended_at_start;
    let sse = args.transport == Transport::Sse;
    let keep_alives =
        sse.then(|| counters.keep_alives.load(Ordering::Relaxed) - keep_alives_at_start);
    let events = sse.then(|| counters.events.load(Ordering::Relaxed) - events_at_start);

    let pair_up = args.probe.pids.len() == dialer.targets.len();
    let nodes: Vec<NodeIdle> = args
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

    let rss_kib = nodes
        .iter()
        .map(|n| (format!("server:{}", n.pid), n.rss_after_kib))
        .collect();
    let mut report = Report::new(
        "idle",
        &dialer,
        c.concurrency,
        connect,
        IdleResult {
            transport: args.transport,
            hold_s: round3(hold_s),
            keep_alives_during_hold: keep_alives,
            events_during_hold: events,
            ended_during_hold,
            nodes,
            bench_rss_kib: ProcSample::read("self").ok().map(|s| s.rss_kib),
        },
    );
    report.latency_ms = report.connect.handshake_ms.clone();
    report.rss_kib = rss_kib;
    report.set_cpu(cpu);
    warn_if_noisy(&report.cpu);
    print(&report);
    report.write_json(args.probe.json.as_deref())?;
    shared.stop.cancel();
    if report.connected == 0 {
        anyhow::bail!("no session connected");
    }
    Ok(0)
}

fn print(r: &Report<IdleResult>) {
    r.print_head();
    row(
        "transport",
        match r.result.transport {
            Transport::Ws => "WebSocket",
            Transport::Sse => "SSE",
        },
    );
    row("hold (s)", format!("{:.1}", r.result.hold_s));
    row("ended during hold", r.result.ended_during_hold);
    if let Some(k) = r.result.keep_alives_during_hold {
        row("SSE keep-alives during hold", k);
    }
    if let Some(e) = r.result.events_during_hold {
        row("SSE events during hold", e);
    }
    if let Some(b) = r.result.bench_rss_kib {
        row("bench process RSS (KiB)", b);
    }
    if r.result.nodes.is_empty() {
        println!("(no --pids given: node memory not measured)");
    } else {
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
        println!();
    }
    r.print_cpu();
}
