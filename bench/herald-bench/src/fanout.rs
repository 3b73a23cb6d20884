//! `fanout`, `broadcast`, `topic` and `slow`: sessions receive paced messages; the report
//! has end-to-end latency, loss, duplicates, reordering and CPU per 100k deliveries.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde::Serialize;

use crate::dial::{open_sessions, prepare_fd_limit, write_ready_file, ClientArgs, Dialer};
use crate::hist::Lat;
use crate::node_http;
use crate::probe::{
    redis_client, redis_conn, rss_map, scrape_counter, warn_if_noisy, Meter, ProbeArgs,
};
use crate::producer::{
    produced_from_external, read_expect_file, run_http, run_pusher_api, run_redis, Kind, Pick,
    Plan, Produced, ProducerArgs, ProducerKind, Targets,
};
use crate::recv::{collect, hold_unread, receive, RecvShared, Tally};
use crate::report::{row, Report};
use crate::util::check_secs;

#[derive(Debug, Clone, Args)]
pub(crate) struct FanoutArgs {
    #[command(flatten)]
    pub(crate) client: ClientArgs,

    #[command(flatten)]
    pub(crate) probe: ProbeArgs,

    #[command(flatten)]
    pub(crate) producer: ProducerArgs,

    /// Seconds between the last connect and the start of a redis/http producer, so that
    /// handshake work stays out of the measured phase. With an external producer the
    /// measured phase starts when the ready file is written.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) hold: f64,

    /// The server's ping interval in seconds (herald's and Socket.IO's default is 25; 0: do
    /// not care). Sessions are pinged for the first time one interval after they connect;
    /// a phase that starts at once and publishes for less than that is over before any
    /// ping, so it cannot see what pings do to delivery latency. With this set, the start
    /// of the measured phase (the producer, or the ready file an external producer waits
    /// for) is delayed to at least `interval + 1 - duration` seconds after the last connect,
    /// so the first ping round falls inside it.
    #[arg(long, default_value_t = 25.0)]
    pub(crate) cover_pings: f64,

    /// Wait (up to 10 minutes) for this file to exist after writing --ready-file, before
    /// the measured phase starts: lets a script start the phase of several bench processes
    /// at once, when every one of them has connected (scripts/bench-scale.sh's broadcast).
    #[arg(long)]
    pub(crate) start_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct TopicArgs {
    #[command(flatten)]
    pub(crate) base: FanoutArgs,

    /// Topics: session i joins t<(first-user + i) % K> through its JWT `topics` claim
    /// (?topics= with --dev).
    #[arg(long, default_value_t = 10)]
    pub(crate) topics: usize,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct SlowArgs {
    #[command(flatten)]
    pub(crate) base: FanoutArgs,

    /// Share of the sessions that never read (spread evenly over the session indexes).
    #[arg(long, default_value_t = 0.1)]
    pub(crate) slow_share: f64,

    /// Messages per second flooding the slow sessions' users (in turn), besides --rate to
    /// the healthy ones.
    #[arg(long, default_value_t = 2000.0)]
    pub(crate) slow_rate: f64,

    /// Bytes of padding in each flood message.
    #[arg(long, default_value_t = 32_768)]
    pub(crate) slow_payload_bytes: usize,

    /// SO_RCVBUF of the slow sessions' sockets (the kernel doubles it and enforces a minimum).
    #[arg(long, default_value_t = 4096)]
    pub(crate) slow_rcvbuf: u32,

    /// Seconds to read the slow sessions at the end, to see how the node closed them.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) slow_probe: f64,

    /// Node /metrics URLs (http://127.0.0.1:<port>/metrics), repeatable: the delta of
    /// herald_slow_consumer_disconnects_total over the run is reported.
    #[arg(long = "metrics-url", value_delimiter = ',', num_args = 1..)]
    pub(crate) metrics_urls: Vec<String>,
}

#[derive(Debug, Clone)]
pub(crate) enum Mode {
    Fanout,
    Broadcast,
    Topic(usize),
    Slow(SlowOpts),
}

#[derive(Debug, Clone)]
pub(crate) struct SlowOpts {
    share: f64,
    rate: f64,
    payload_bytes: usize,
    rcvbuf: u32,
    probe: f64,
    metrics_urls: Vec<String>,
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Mode::Fanout => "fanout",
            Mode::Broadcast => "broadcast",
            Mode::Topic(_) => "topic",
            Mode::Slow(_) => "slow",
        }
    }
}

/// What happened to the slow sessions.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct SlowResult {
    pub(crate) slow_sessions: usize,
    /// How the slow sessions ended, as seen by reading them for --slow-probe s at the end:
    /// "close 4001", "eof", "reset", or "no close seen" (the node may have closed it, but
    /// the bytes queued before its FIN were not drained within the probe).
    pub(crate) slow_endings: BTreeMap<String, usize>,
    /// Delta of herald_slow_consumer_disconnects_total over the run, summed over
    /// --metrics-url (None when not given or unreadable).
    pub(crate) node_slow_consumer_disconnects: Option<f64>,
    pub(crate) flood: Produced,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct FanoutResult {
    pub(crate) mode: &'static str,
    pub(crate) producer: ProducerKind,
    pub(crate) rate: f64,
    pub(crate) duration_s: f64,
    /// Seconds between the last connect and the start of the measured phase.
    pub(crate) hold_s: f64,
    pub(crate) payload_bytes: usize,
    pub(crate) topics: Option<usize>,
    pub(crate) produced: Produced,
    /// Over the measured (healthy) sessions.
    pub(crate) tally: Tally,
    pub(crate) slow: Option<SlowResult>,
}

pub(crate) async fn run_topic(args: TopicArgs) -> anyhow::Result<u8> {
    if args.topics == 0 {
        bail!("--topics must be at least 1");
    }
    run(Mode::Topic(args.topics), args.base).await
}

pub(crate) async fn run_slow(args: SlowArgs) -> anyhow::Result<u8> {
    if !(args.slow_share > 0.0 && args.slow_share < 1.0) {
        bail!("--slow-share must be between 0 and 1 (exclusive)");
    }
    if !(args.slow_rate.is_finite() && args.slow_rate > 0.0) {
        bail!("--slow-rate must be positive");
    }
    if args.slow_payload_bytes > 60_000 {
        bail!("--slow-payload-bytes above 60,000 exceeds herald's default 64 KiB message limit");
    }
    if args.base.producer.producer == ProducerKind::External {
        bail!("slow needs a producer of its own (--producer redis or http): it floods the slow sessions' users");
    }
    check_secs(args.slow_probe, "--slow-probe", true)?;
    let opts = SlowOpts {
        share: args.slow_share,
        rate: args.slow_rate,
        payload_bytes: args.slow_payload_bytes,
        rcvbuf: args.slow_rcvbuf,
        probe: args.slow_probe,
        metrics_urls: args.metrics_urls,
    };
    run(Mode::Slow(opts), args.base).await
}

/// Polls for `path` every 10 ms until it exists or `limit` passed.
async fn wait_for_file(path: &std::path::Path, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear within {limit:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Session `i` is slow when the running count of `share * (i + 1)` steps up at it: spreads
/// `share` of the sessions evenly.
fn is_slow(i: usize, share: f64) -> bool {
    ((i + 1) as f64 * share).floor() > (i as f64 * share).floor()
}

async fn metrics_sum(http: &reqwest::Client, urls: &[String]) -> Option<f64> {
    if urls.is_empty() {
        return None;
    }
    let mut sum = 0.0;
    for u in urls {
        match scrape_counter(http, u, "herald_slow_consumer_disconnects_total").await {
            Ok(v) => sum += v,
            Err(e) => {
                eprintln!("herald-bench: cannot read {u}: {e:#}");
                return None;
            }
        }
    }
    Some(sum)
}

pub(crate) async fn run(mode: Mode, args: FanoutArgs) -> anyhow::Result<u8> {
    let c = &args.client;
    let p = &args.producer;
    p.check()?;
    if p.producer == ProducerKind::PusherApi {
        c.pusher.secret()?;
    }
    check_secs(args.hold, "--hold", true)?;
    check_secs(args.cover_pings, "--cover-pings", true)?;
    if args.cover_pings > 600.0 {
        bail!("--cover-pings above 600 s would hold the sessions for too long");
    }
    // When the measured phase starts, counted from the last connect: late enough that the
    // first ping round (one interval after the connects) falls inside it.
    let hold = if args.cover_pings > 0.0 {
        args.hold.max(args.cover_pings + 1.0 - p.duration)
    } else {
        args.hold
    };
    prepare_fd_limit(c.sessions)?;
    let dialer = Arc::new(Dialer::new(c).await?);
    // For --producer http and the slow scenario's /metrics reads.
    let http = node_http::client()?;
    let redis = match (&p.producer, &p.redis_url) {
        (ProducerKind::Redis, Some(url)) => Some(redis_client(url)?),
        _ => None,
    };
    let slow_opts = match &mode {
        Mode::Slow(o) => Some(o.clone()),
        _ => None,
    };
    // Decided per round of targets (sessions i..i+targets go to distinct targets), so every
    // node gets its share of slow sessions.
    let rounds = dialer.targets.len().max(1);
    let slow: Vec<bool> = (0..c.sessions)
        .map(|i| {
            slow_opts
                .as_ref()
                .is_some_and(|o| is_slow(i / rounds, o.share))
        })
        .collect();
    let topic_of = |i: usize| match mode {
        Mode::Topic(k) => (c.first_user + i) % k,
        _ => 0,
    };
    eprintln!(
        "herald-bench {}: {} sessions to {} target(s), producer {:?} at {} msg/s for {} s",
        mode.name(),
        c.sessions,
        dialer.targets.len(),
        p.producer,
        p.rate,
        p.duration
    );

    // Sessions.
    let (shared, mut rx) = RecvShared::new(c.protocol);
    let probe_wait = Duration::from_secs_f64(slow_opts.as_ref().map(|o| o.probe).unwrap_or(0.0));
    let (connect, _held) = {
        let d = dialer.clone();
        let sh = shared.clone();
        let slow_spec = slow.clone();
        let slow_hold = slow.clone();
        let mode_spec = mode.clone();
        let rcvbuf = slow_opts.as_ref().map(|o| o.rcvbuf);
        let first = c.first_user;
        open_sessions(
            dialer.clone(),
            c.sessions,
            c.concurrency,
            move |i| {
                let mut s = d.spec(i);
                if let Mode::Topic(k) = mode_spec {
                    s.topics = vec![format!("t{}", (first + i) % k)];
                }
                if slow_spec[i] {
                    s.rcvbuf = rcvbuf;
                }
                s
            },
            move |s| {
                let sh = sh.clone();
                let unread = slow_hold[s.index];
                async move {
                    if unread {
                        hold_unread(s, sh, probe_wait).await;
                    } else {
                        receive(s, sh).await;
                    }
                }
            },
        )
        .await
    };
    eprintln!(
        "herald-bench: {} connected, {} failed in {:.1} s",
        connect.connected, connect.failed, connect.duration_s
    );
    if p.producer == ProducerKind::External && hold > 0.0 && args.cover_pings > 0.0 {
        // The external producer starts when the ready file appears.
        eprintln!("herald-bench: holding {hold:.1} s so the phase covers a ping round");
        tokio::time::sleep(Duration::from_secs_f64(hold)).await;
    }
    write_ready_file(args.probe.ready_file.as_deref(), &connect)?;
    if let Some(path) = &args.start_file {
        wait_for_file(path, Duration::from_secs(600)).await?;
    }
    if connect.connected == 0 {
        bail!("no session connected: {:?}", connect.errors);
    }
    let healthy: Vec<usize> = connect
        .connected_indexes
        .iter()
        .copied()
        .filter(|&i| !slow[i])
        .collect();
    let slow_connected: Vec<usize> = connect
        .connected_indexes
        .iter()
        .copied()
        .filter(|&i| slow[i])
        .collect();

    // What the producer addresses.
    let (targets, pick) = match mode {
        Mode::Fanout | Mode::Slow(_) => (
            Targets {
                kind: Kind::User,
                names: (0..c.sessions).map(|i| dialer.user(i)).collect(),
            },
            Pick::Random(healthy.clone()),
        ),
        Mode::Topic(k) => {
            let mut live: Vec<usize> = healthy.iter().map(|&i| topic_of(i)).collect();
            live.sort_unstable();
            live.dedup();
            (
                Targets {
                    kind: Kind::Topic,
                    names: (0..k).map(|t| format!("t{t}")).collect(),
                },
                Pick::Random(live),
            )
        }
        Mode::Broadcast => (
            Targets {
                kind: Kind::Broadcast,
                names: vec!["broadcast".into()],
            },
            Pick::Cycle(vec![0]),
        ),
    };
    let plan = Plan {
        rate: p.rate,
        duration: p.duration,
        pad: "x".repeat(p.payload_bytes),
        pick,
        targets: targets.clone(),
        max_batch: p.max_batch,
    };
    let flood_plan = slow_opts.as_ref().map(|o| Plan {
        rate: o.rate,
        duration: p.duration,
        pad: "x".repeat(o.payload_bytes),
        pick: Pick::Cycle(slow_connected.clone()),
        targets: targets.clone(),
        max_batch: p.max_batch,
    });

    if p.producer != ProducerKind::External && hold > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(hold)).await;
    }
    let metrics_before = match &slow_opts {
        Some(o) => metrics_sum(&http, &o.metrics_urls).await,
        None => None,
    };

    // The measured phase: production plus the drain.
    let meter = Meter::start(&args.probe);
    let started = Instant::now();
    let (produced, flood) = match p.producer {
        ProducerKind::Redis => {
            let client = redis.as_ref().ok_or_else(|| anyhow::anyhow!("no Redis"))?;
            let conn = redis_conn(client).await?;
            let main = run_redis(plan, p.prefix.clone(), conn);
            match flood_plan {
                Some(fp) => {
                    let conn2 = redis_conn(client).await?;
                    let (a, b) = tokio::join!(main, run_redis(fp, p.prefix.clone(), conn2));
                    (a, Some(b))
                }
                None => (main.await, None),
            }
        }
        ProducerKind::Http => {
            let key = p.api_key.as_deref();
            let main = run_http(plan, &http, &dialer.targets, key, p.http_connections);
            match flood_plan {
                Some(fp) => {
                    let (a, b) = tokio::join!(
                        main,
                        run_http(fp, &http, &dialer.targets, key, p.http_connections)
                    );
                    (a?, Some(b?))
                }
                None => (main.await?, None),
            }
        }
        ProducerKind::PusherApi => {
            if flood_plan.is_some() {
                bail!("slow has no --producer pusher-api");
            }
            let produced =
                run_pusher_api(plan, &http, &dialer.targets, &c.pusher, p.http_connections).await?;
            (produced, None)
        }
        ProducerKind::External => {
            tokio::time::sleep(Duration::from_secs_f64(p.duration)).await;
            let path = p
                .expect_file
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("--expect-file is required"))?;
            let e = read_expect_file(path, p.expect_timeout).await?;
            let elapsed = started.elapsed().as_secs_f64();
            (produced_from_external(&e, &targets, elapsed), None)
        }
    };
    eprintln!(
        "herald-bench: producer sent {} of {} in {:.1} s ({} failed); draining {} s",
        produced.sent, produced.planned, produced.elapsed_s, produced.failed, p.drain
    );
    tokio::time::sleep(Duration::from_secs_f64(p.drain)).await;
    let cpu = meter.finish();
    let rss = rss_map(&args.probe.pids);
    let metrics_after = match &slow_opts {
        Some(o) => metrics_sum(&http, &o.metrics_urls).await,
        None => None,
    };

    // Stop the sessions and add up what they saw.
    shared.stop.cancel();
    let outcomes = collect(
        &mut rx,
        connect.connected,
        Duration::from_secs(10) + probe_wait,
    )
    .await;
    let mut tally = Tally::default();
    let mut slow_endings: BTreeMap<String, usize> = BTreeMap::new();
    let empty = Vec::new();
    for &i in &connect.connected_indexes {
        let Some(o) = outcomes.get(&i) else {
            *tally.ended_early.entry("no report".into()).or_default() += 1;
            continue;
        };
        if slow[i] {
            let e = o.ended.clone().unwrap_or_else(|| "no close seen".into());
            *slow_endings.entry(e).or_default() += 1;
            continue;
        }
        let key = match targets.kind {
            Kind::User => i,
            Kind::Topic => topic_of(i),
            Kind::Broadcast => 0,
        };
        let expected = produced.last_seq.get(key).copied().unwrap_or(0);
        let forgiven = produced.failed_seqs.get(&key).unwrap_or(&empty);
        tally.add(o, expected, forgiven);
    }
    let latency = Lat::of(&shared.latency.merged(false));

    let slow_result = slow_opts.as_ref().map(|_| SlowResult {
        slow_sessions: slow_connected.len(),
        slow_endings,
        node_slow_consumer_disconnects: match (metrics_before, metrics_after) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        flood: flood.clone().unwrap_or_default(),
    });
    let active_s = produced.elapsed_s;
    let result = FanoutResult {
        mode: mode.name(),
        producer: p.producer,
        rate: p.rate,
        duration_s: p.duration,
        hold_s: if p.producer == ProducerKind::External && args.cover_pings == 0.0 {
            0.0
        } else {
            hold
        },
        payload_bytes: p.payload_bytes,
        topics: match mode {
            Mode::Topic(k) => Some(k),
            _ => None,
        },
        produced,
        tally: tally.clone(),
        slow: slow_result,
    };
    let mut report = Report::new(mode.name(), &dialer, c.concurrency, connect, result);
    report.set_tally(&tally, active_s);
    report.latency_ms = latency;
    report.rss_kib = rss;
    report.set_cpu(cpu);
    warn_if_noisy(&report.cpu);
    print(&report);
    report.write_json(args.probe.json.as_deref())?;
    Ok(0)
}

fn print(r: &Report<FanoutResult>) {
    r.print_head();
    let res = &r.result;
    let pr = &res.produced;
    row(
        "producer",
        format!(
            "{:?}, {} msg/s for {} s, {} B pad{}",
            res.producer,
            res.rate,
            res.duration_s,
            res.payload_bytes,
            res.topics
                .map(|k| format!(", {k} topics"))
                .unwrap_or_default()
        ),
    );
    row(
        "published / planned / failed",
        format!("{} / {} / {}", pr.sent, pr.planned, pr.failed),
    );
    row(
        "producer rate achieved, max lag",
        format!("{:.0}/s, {:.1} ms", pr.achieved_rate, pr.max_lag_ms),
    );
    for (e, n) in &pr.errors {
        row("  publish failure", format!("x{n}: {e}"));
    }
    r.print_delivery();
    let t = &res.tally;
    if t.beyond_expected + t.invalid + t.foreign + t.gaps > 0 {
        row(
            "beyond expected / invalid / foreign",
            format!("{} / {} / {}", t.beyond_expected, t.invalid, t.foreign),
        );
        if t.foreign > 0 {
            println!(
                "  (foreign: not bench payloads of this run, e.g. durable entries of an earlier run replayed to a reused user id)"
            );
        }
    }
    row("sessions with loss", t.sessions_with_loss);
    for (how, n) in &t.ended_early {
        row("  measured session ended early", format!("x{n}: {how}"));
    }
    if let Some(s) = &res.slow {
        row("slow sessions", s.slow_sessions);
        for (how, n) in &s.slow_endings {
            row("  slow session ended", format!("x{n}: {how}"));
        }
        match s.node_slow_consumer_disconnects {
            Some(v) => row("node slow-consumer disconnects", format!("{v:.0}")),
            None => row("node slow-consumer disconnects", "(no --metrics-url)"),
        }
        row(
            "flood published / planned / failed",
            format!(
                "{} / {} / {}",
                s.flood.sent, s.flood.planned, s.flood.failed
            ),
        );
    }
    r.print_cpu();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_sessions_are_spread_evenly() {
        let n = (0..1000).filter(|&i| is_slow(i, 0.1)).count();
        assert_eq!(n, 100);
        let n = (0..10).filter(|&i| is_slow(i, 0.25)).count();
        assert_eq!(n, 2);
        assert!(!is_slow(0, 0.1) && is_slow(9, 0.1));
    }
}
