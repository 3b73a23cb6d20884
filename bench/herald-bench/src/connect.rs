//! `connect`: N sessions with at most --concurrency handshakes in flight; handshakes/s,
//! connect latency (TCP connect to welcome) and the CPU the handshakes cost.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use crate::dial::{open_sessions, prepare_fd_limit, write_ready_file, ClientArgs, Dialer};
use crate::probe::{rss_map, warn_if_noisy, Meter, ProbeArgs};
use crate::recv::{receive, RecvShared};
use crate::report::{row, Report};
use crate::util::{check_secs, round3};

#[derive(Debug, Clone, Args)]
pub(crate) struct ConnectArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,

    #[command(flatten)]
    pub(crate) probe: ProbeArgs,

    /// Seconds to keep the sessions open after the last one connected (then all close).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) hold: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ConnectResult {
    handshakes_per_s: f64,
    /// Server CPU seconds per 1,000 handshakes.
    server_cpu_per_1k_handshakes: Option<f64>,
}

pub(crate) async fn run(args: ConnectArgs) -> anyhow::Result<u8> {
    let c = &args.client;
    check_secs(args.hold, "--hold", true)?;
    prepare_fd_limit(c.sessions)?;
    let dialer = Arc::new(Dialer::new(c).await?);
    eprintln!(
        "herald-bench connect: {} sessions to {} target(s), {} handshakes in flight",
        c.sessions,
        dialer.targets.len(),
        c.concurrency
    );
    let (shared, _rx) = RecvShared::new(c.protocol);
    let d = dialer.clone();
    let sh = shared.clone();
    let meter = Meter::start(&args.probe);
    let (connect, _held) = open_sessions(
        dialer.clone(),
        c.sessions,
        c.concurrency,
        move |i| d.spec(i),
        move |s| receive(s, sh.clone()),
    )
    .await;
    let cpu = meter.finish();
    let rss = rss_map(&args.probe.pids);
    write_ready_file(args.probe.ready_file.as_deref(), &connect)?;
    if args.hold > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    }
    shared.stop.cancel();

    let per_1k =
        (connect.connected > 0).then(|| round3(cpu.servers_s * 1000.0 / connect.connected as f64));
    let result = ConnectResult {
        handshakes_per_s: connect.sessions_per_s,
        server_cpu_per_1k_handshakes: per_1k,
    };
    let mut report = Report::new("connect", &dialer, c.concurrency, connect, result);
    report.latency_ms = report.connect.handshake_ms.clone();
    report.rss_kib = rss;
    report.set_cpu(cpu);
    warn_if_noisy(&report.cpu);
    report.print_head();
    row(
        "connect duration (s)",
        format!("{:.2}", report.connect.duration_s),
    );
    row(
        "handshakes/s",
        format!("{:.0}", report.result.handshakes_per_s),
    );
    let l = &report.latency_ms;
    row(
        "connect ms p50/p90/p99/p99.9/max",
        format!(
            "{:.2}/{:.2}/{:.2}/{:.2}/{:.2}",
            l.p50, l.p90, l.p99, l.p999, l.max
        ),
    );
    if let Some(v) = report.result.server_cpu_per_1k_handshakes {
        row("server cpu s / 1k handshakes", format!("{v:.3}"));
    }
    report.print_cpu();
    report.write_json(args.probe.json.as_deref())?;
    if report.connected == 0 {
        anyhow::bail!("no session connected");
    }
    Ok(0)
}
