//! `catchup` (herald only, one node with a Redis of its own): how long a node takes to catch
//! its live sessions up on the durable messages stored while its subscription was down.
//!
//! N sessions (one user each) connect; each gets one durable message live (so the node
//! knows the last durable id it sent each of them). Then the node's subscription is cut on
//! that Redis: `ACL SETUSER default -subscribe -psubscribe -ssubscribe` so it cannot
//! subscribe again, and `CLIENT KILL TYPE pubsub` to drop the subscription it has; its
//! command connections (presence, inbox reads) keep working, as after any pub/sub
//! reconnect. While it is cut, K durable messages per user are stored with
//! `FCALL herald_notify` (none can reach a session live). Then the cut heals (`+subscribe`
//! again); the node reconnects on its own backoff, resubscribes, parks every session and
//! catches each up from its inbox. Measured: for every session, the time from the heal (and
//! from the node's `/readyz` turning 200) until it had all K messages; the total; messages
//! missing, duplicated or out of order; node and Redis CPU from the heal to the last session
//! caught up; and the node's own catch-up metrics.
//!
//! This changes the ACL of the Redis it is given: point it only at a private redis-server
//! (scripts/bench-catchup.sh starts one).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::dial::{open_sessions, prepare_fd_limit, write_ready_file, ClientArgs, Dialer, Session};
use crate::hist::{new_hist, Lat};
use crate::probe::{
    redis_client, redis_conn, rss_map, scrape_counter, warn_if_noisy, Meter, ProbeArgs,
};
use crate::recv::{collect, SessionOutcome, Tally};
use crate::report::{row, Report};
use crate::util::{check_secs, mono_ns, round3};
use crate::wire::{classify, payload, Incoming, Protocol};

#[derive(Debug, Clone, Args)]
pub(crate) struct CatchupArgs {
    /// --sessions live sessions, user bench-<first-user + i> each (use fresh users: an
    /// inbox left by an earlier run against the same Redis would be replayed).
    #[command(flatten)]
    pub(crate) client: ClientArgs,

    /// --pids: the node's PID; --redis-pid: its redis-server's.
    #[command(flatten)]
    pub(crate) probe: ProbeArgs,

    /// The node's Redis, private to this run: its ACL is changed to cut the subscription.
    #[arg(long, required = true)]
    pub(crate) redis_url: String,

    #[arg(long, default_value = "herald")]
    pub(crate) prefix: String,

    /// Durable messages stored per user while the subscription is cut.
    #[arg(long, default_value_t = 3)]
    pub(crate) messages_per_user: u64,

    /// FCALLs in flight while storing them.
    #[arg(long, default_value_t = 64)]
    pub(crate) store_concurrency: usize,

    #[arg(long, default_value_t = 100)]
    pub(crate) payload_bytes: usize,

    /// The cut lasts at least this many seconds (longer if storing takes longer).
    #[arg(long, default_value_t = 2.0)]
    pub(crate) cut: f64,

    /// Seconds to wait, after the heal, for every session to be caught up.
    #[arg(long, default_value_t = 120.0)]
    pub(crate) timeout: f64,

    /// Seconds to keep reading after the last session was caught up, so late duplicates
    /// are counted.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) settle: f64,
}

/// What the catch-up measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CatchupResult {
    pub(crate) messages_per_user: u64,
    /// Sessions that had their warm-up message (the node knew their last durable id).
    pub(crate) warmed_up: usize,
    /// FCALLs during the cut: made, failed, seconds taken.
    pub(crate) stored: u64,
    pub(crate) store_errors: u64,
    pub(crate) store_s: f64,
    pub(crate) cut_s: f64,
    /// From the cut until the node's /readyz said 503 (it noticed).
    pub(crate) cut_noticed_ms: Option<f64>,
    /// Bench payloads that reached a session while the subscription was cut (must be 0).
    pub(crate) delivered_during_cut: u64,
    /// From the heal until /readyz said 200 again (reconnect backoff + resubscription).
    pub(crate) ready_after_heal_ms: Option<f64>,
    /// Sessions that had every missed message before the timeout.
    pub(crate) caught_up: usize,
    pub(crate) not_caught_up: usize,
    /// Per session: heal → all K messages received.
    pub(crate) from_heal_ms: Lat,
    /// Per session: /readyz 200 again → all K messages received.
    pub(crate) from_ready_ms: Lat,
    /// Heal → the last session caught up (all of them, when `not_caught_up` is 0).
    pub(crate) total_from_heal_ms: Option<f64>,
    pub(crate) total_from_ready_ms: Option<f64>,
    /// Missed messages each session should have had, in all, and what is missing,
    /// duplicated or out of order after the settle time (missing and duplicated must be 0).
    pub(crate) expected_catch_up_messages: u64,
    pub(crate) missing: u64,
    pub(crate) duplicated: u64,
    pub(crate) out_of_order: u64,
    pub(crate) gaps: u64,
    /// Sessions that ended before the run did, by how (1012: the node gave up catching up).
    pub(crate) ended_early: BTreeMap<String, usize>,
    /// Node CPU seconds from the heal to the last session caught up, and per 10k sessions.
    pub(crate) node_cpu_s: f64,
    pub(crate) redis_cpu_s: f64,
    pub(crate) node_cpu_s_per_10k_sessions: Option<f64>,
    pub(crate) redis_cpu_s_per_10k_sessions: Option<f64>,
    /// The node's own account (GET /metrics): catch-up passes, the seconds they took, the
    /// sessions caught up and the messages sent, over this run.
    pub(crate) node_passes: Option<f64>,
    pub(crate) node_pass_seconds: Option<f64>,
    pub(crate) node_sessions_caught_up: Option<f64>,
    pub(crate) node_messages_caught_up: Option<f64>,
}

/// Shared by every receiving session.
struct Shared {
    /// A session reports once it has every sequence number up to this one.
    target: AtomicU64,
    /// Bench payloads received, in all.
    received: AtomicU64,
    /// (session index, CLOCK_MONOTONIC ns, target reached).
    done: mpsc::UnboundedSender<(usize, u64, u64)>,
    out: mpsc::UnboundedSender<SessionOutcome>,
    stop: CancellationToken,
}

/// Reads one session until `stop`; reports when it has every payload up to the target.
async fn receive(mut session: Session, sh: Arc<Shared>) {
    let mut o = SessionOutcome {
        index: session.index,
        ..SessionOutcome::default()
    };
    let mut reported = 0u64;
    let stopped = sh.stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let frame = tokio::select! {
            biased;
            _ = &mut stopped => break,
            f = session.ws.next() => f,
        };
        match frame {
            Some(Ok(Message::Text(text))) => match classify(Protocol::Herald, text.as_str()) {
                Incoming::Data { seq, .. } => {
                    o.seq.observe(seq);
                    sh.received.fetch_add(1, Ordering::Relaxed);
                    let target = sh.target.load(Ordering::Acquire);
                    if target > reported && o.seq.max_seen >= target && o.seq.lost(target, &[]) == 0
                    {
                        reported = target;
                        let _ = sh.done.send((session.index, mono_ns(), target));
                    }
                }
                Incoming::Gap => o.gaps += 1,
                Incoming::Foreign => o.foreign += 1,
                Incoming::Ping | Incoming::Other => {}
            },
            Some(Ok(Message::Close(f))) => {
                o.ended = Some(format!(
                    "close {}",
                    f.map(|f| u16::from(f.code)).unwrap_or(1005)
                ));
                break;
            }
            Some(Err(e)) => {
                o.ended = Some(format!(
                    "error: {}",
                    e.to_string().chars().take(60).collect::<String>()
                ));
                break;
            }
            None => {
                o.ended = Some("eof".into());
                break;
            }
            Some(Ok(_)) => {}
        }
    }
    let _ = sh.out.send(o);
}

/// Stores `seq` for every user with FCALL, `concurrency` calls in flight. Returns the calls
/// that failed.
async fn store_all(
    conn: &redis::aio::MultiplexedConnection,
    prefix: &str,
    users: &[String],
    seq: u64,
    pad: &str,
    concurrency: usize,
) -> u64 {
    let failed = futures_util::stream::iter(users.iter())
        .map(|u| {
            let mut conn = conn.clone();
            let inbox = format!("{prefix}:inbox:{{{u}}}");
            let body = payload(seq, mono_ns(), pad);
            async move {
                redis::cmd("FCALL")
                    .arg("herald_notify")
                    .arg(1)
                    .arg(inbox)
                    .arg(body)
                    .query_async::<String>(&mut conn)
                    .await
                    .is_err()
            }
        })
        .buffer_unordered(concurrency.max(1))
        .filter(|failed| std::future::ready(*failed))
        .count()
        .await;
    failed as u64
}

/// Cuts (`allow == false`) or heals the subscription of every client of this Redis that
/// logs in as `default`.
async fn set_subscribe(
    conn: &mut redis::aio::MultiplexedConnection,
    allow: bool,
) -> anyhow::Result<()> {
    let sign = if allow { '+' } else { '-' };
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg(format!("{sign}subscribe"))
        .arg(format!("{sign}psubscribe"))
        .arg(format!("{sign}ssubscribe"))
        .query_async::<()>(conn)
        .await
        .context("ACL SETUSER default failed")?;
    if !allow {
        let _killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(conn)
            .await
            .context("CLIENT KILL TYPE pubsub failed")?;
    }
    Ok(())
}

/// Polls the node's /readyz every 10 ms until it answers `want` (true: 200), for at most
/// `limit`. Returns when it did.
async fn wait_ready(
    http: &reqwest::Client,
    dialer: &Dialer,
    want: bool,
    limit: Duration,
) -> Option<Instant> {
    let target = dialer.targets.first()?;
    let url = crate::node_http::url(target.addr, "/readyz").ok()?;
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let req = http.get(url.clone());
        if let Ok((status, _)) = crate::node_http::exchange(req).await {
            if (status == 200) == want {
                return Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// The node's catch-up metrics: passes, seconds, sessions, messages.
async fn node_metrics(http: &reqwest::Client, dialer: &Dialer) -> Option<[f64; 4]> {
    let target = dialer.targets.first()?;
    let url = format!("http://{}/metrics", target.authority);
    let mut v = [0.0; 4];
    for (slot, name) in v.iter_mut().zip([
        "herald_catch_up_seconds_count",
        "herald_catch_up_seconds_sum",
        "herald_catch_up_sessions_total",
        "herald_messages_caught_up_total",
    ]) {
        *slot = scrape_counter(http, &url, name).await.ok()?;
    }
    Some(v)
}

/// Microseconds from one CLOCK_MONOTONIC reading (ns) to a later one.
fn micros(from_ns: u64, to_ns: u64) -> u64 {
    to_ns.saturating_sub(from_ns) / 1000
}

pub(crate) async fn run(args: CatchupArgs) -> anyhow::Result<u8> {
    let c = &args.client;
    if c.protocol != Protocol::Herald {
        bail!("catchup measures herald's inbox: use --protocol herald");
    }
    if c.targets.len() != 1 {
        bail!("catchup measures one node: give one --target");
    }
    if args.messages_per_user == 0 || c.sessions == 0 {
        bail!("--messages-per-user and --sessions must be at least 1");
    }
    check_secs(args.cut, "--cut", true)?;
    check_secs(args.timeout, "--timeout", false)?;
    check_secs(args.settle, "--settle", true)?;
    prepare_fd_limit(c.sessions + 1)?;
    let dialer = Arc::new(Dialer::new(c).await?);
    let http = crate::node_http::client()?;
    let client = redis_client(&args.redis_url)?;
    let mut conn = redis_conn(&client).await?;
    let pad = "x".repeat(args.payload_bytes);
    // The function must be there (a node loads it with its first heartbeat).
    let probe_inbox = format!("{}:inbox:{{bench-catchup-probe}}", args.prefix);
    redis::cmd("FCALL")
        .arg("herald_notify")
        .arg(1)
        .arg(&probe_inbox)
        .arg(payload(0, mono_ns(), &pad))
        .query_async::<String>(&mut conn)
        .await
        .context("FCALL herald_notify failed: is a herald node running against this Redis with this --prefix?")?;
    let _: Result<i64, _> = redis::cmd("DEL")
        .arg(&probe_inbox)
        .query_async(&mut conn)
        .await;
    let metrics_before = node_metrics(&http, &dialer).await;

    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel();
    let sh = Arc::new(Shared {
        target: AtomicU64::new(1),
        received: AtomicU64::new(0),
        done: done_tx,
        out: out_tx,
        stop: CancellationToken::new(),
    });
    let (connect, _held) = {
        let d = dialer.clone();
        let sh = sh.clone();
        open_sessions(
            dialer.clone(),
            c.sessions,
            c.concurrency,
            move |i| d.spec(i),
            move |s| receive(s, sh.clone()),
        )
        .await
    };
    write_ready_file(args.probe.ready_file.as_deref(), &connect)?;
    let n = connect.connected;
    if n == 0 {
        bail!("no session connected: {:?}", connect.errors);
    }
    let users: Vec<String> = connect
        .connected_indexes
        .iter()
        .map(|&i| dialer.user(i))
        .collect();
    eprintln!("herald-bench catchup: {n} sessions connected; one durable message each, live");

    // Warm-up: message 1 reaches every session live.
    let warm_errors = store_all(&conn, &args.prefix, &users, 1, &pad, args.store_concurrency).await;
    let mut warmed_up = 0usize;
    let warm_deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while warmed_up < n - warm_errors as usize {
        match tokio::time::timeout_at(warm_deadline, done_rx.recv()).await {
            Ok(Some((_, _, 1))) => warmed_up += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    eprintln!("herald-bench catchup: {warmed_up} of {n} had it; cutting the subscription");

    // The cut.
    let k = args.messages_per_user;
    sh.target.store(1 + k, Ordering::Release);
    let received_before_cut = sh.received.load(Ordering::Relaxed);
    let cut_at = Instant::now();
    set_subscribe(&mut conn, false).await?;
    let noticed = wait_ready(&http, &dialer, false, Duration::from_secs(10)).await;
    let store_started = Instant::now();
    let mut store_errors = 0u64;
    for seq in 2..=1 + k {
        store_errors += store_all(
            &conn,
            &args.prefix,
            &users,
            seq,
            &pad,
            args.store_concurrency,
        )
        .await;
    }
    let store_s = store_started.elapsed().as_secs_f64();
    let cut_for = Duration::from_secs_f64(args.cut);
    if cut_at.elapsed() < cut_for {
        tokio::time::sleep(cut_for - cut_at.elapsed()).await;
    }
    let delivered_during_cut = sh.received.load(Ordering::Relaxed) - received_before_cut;
    eprintln!(
        "herald-bench catchup: {} messages stored in {store_s:.1} s during the cut ({store_errors} failed); healing",
        users.len() as u64 * k
    );

    // The heal, and the catch-up.
    let meter = Meter::start(&args.probe);
    let heal_mono = mono_ns();
    let heal_at = Instant::now();
    let healed = set_subscribe(&mut conn, true).await;
    if let Err(e) = healed {
        bail!("cannot heal the cut ({e:#}): the Redis at --redis-url still refuses SUBSCRIBE");
    }
    let ready_task = {
        let http = http.clone();
        let dialer = dialer.clone();
        let limit = Duration::from_secs_f64(args.timeout);
        tokio::spawn(async move { wait_ready(&http, &dialer, true, limit).await })
    };
    let mut done_at: Vec<u64> = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(args.timeout);
    let mut progress = tokio::time::interval(Duration::from_secs(2));
    progress.tick().await;
    while done_at.len() < n {
        tokio::select! {
            r = tokio::time::timeout_at(deadline, done_rx.recv()) => match r {
                Ok(Some((_, at, t))) if t == 1 + k => done_at.push(at),
                Ok(Some(_)) => {}
                _ => break,
            },
            _ = progress.tick() => eprintln!(
                "herald-bench catchup: {} of {n} sessions caught up ({:.0} s)",
                done_at.len(),
                heal_at.elapsed().as_secs_f64()
            ),
        }
    }
    let cpu = meter.finish();
    let ready_at = ready_task.await.ok().flatten();
    let ready_mono = ready_at.map(|r| heal_mono + r.duration_since(heal_at).as_nanos() as u64);
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let rss = rss_map(&args.probe.pids);
    let metrics_after = node_metrics(&http, &dialer).await;

    sh.stop.cancel();
    let outcomes = collect(&mut out_rx, n, Duration::from_secs(10)).await;
    let mut tally = Tally::default();
    for o in outcomes.values() {
        tally.add(o, 1 + k, &[]);
    }

    let mut from_heal = new_hist();
    let mut from_ready = new_hist();
    for &at in &done_at {
        from_heal.saturating_record(micros(heal_mono, at).max(1));
        if let Some(r) = ready_mono {
            from_ready.saturating_record(micros(r, at).max(1));
        }
    }
    let last = done_at.iter().copied().max();
    let ms = |micros: u64| round3(micros as f64 / 1000.0);
    let per10k = |s: f64| round3(s * 10_000.0 / n as f64);
    let delta = |i: usize| match (&metrics_before, &metrics_after) {
        (Some(b), Some(a)) => Some(round3(a[i] - b[i])),
        _ => None,
    };
    let result = CatchupResult {
        messages_per_user: k,
        warmed_up,
        stored: users.len() as u64 * k,
        store_errors,
        store_s: round3(store_s),
        cut_s: round3(heal_at.duration_since(cut_at).as_secs_f64()),
        cut_noticed_ms: noticed.map(|t| round3(t.duration_since(cut_at).as_secs_f64() * 1000.0)),
        delivered_during_cut,
        ready_after_heal_ms: ready_at
            .map(|t| round3(t.duration_since(heal_at).as_secs_f64() * 1000.0)),
        caught_up: done_at.len(),
        not_caught_up: n - done_at.len(),
        from_heal_ms: Lat::of(&from_heal),
        from_ready_ms: Lat::of(&from_ready),
        total_from_heal_ms: last.map(|l| ms(micros(heal_mono, l))),
        total_from_ready_ms: match (last, ready_mono) {
            (Some(l), Some(r)) => Some(ms(micros(r, l))),
            _ => None,
        },
        expected_catch_up_messages: n as u64 * k,
        missing: tally.lost,
        duplicated: tally.duplicated,
        out_of_order: tally.out_of_order,
        gaps: tally.gaps,
        ended_early: tally.ended_early.clone(),
        node_cpu_s: cpu.servers_s,
        redis_cpu_s: cpu.redis_s,
        node_cpu_s_per_10k_sessions: (!args.probe.pids.is_empty()).then(|| per10k(cpu.servers_s)),
        redis_cpu_s_per_10k_sessions: args.probe.redis_pid.map(|_| per10k(cpu.redis_s)),
        node_passes: delta(0),
        node_pass_seconds: delta(1),
        node_sessions_caught_up: delta(2),
        node_messages_caught_up: delta(3),
    };
    let mut report = Report::new("catchup", &dialer, c.concurrency, connect, result);
    report.set_tally(&tally, heal_at.elapsed().as_secs_f64());
    report.latency_ms = report.result.from_heal_ms.clone();
    report.rss_kib = rss;
    report.set_cpu(cpu);
    warn_if_noisy(&report.cpu);
    print(&report);
    report.write_json(args.probe.json.as_deref())?;
    let r = &report.result;
    Ok(
        if r.not_caught_up == 0
            && r.missing == 0
            && r.duplicated == 0
            && r.delivered_during_cut == 0
        {
            0
        } else {
            eprintln!(
                "herald-bench catchup: FAILED: not every session got exactly its missed messages"
            );
            1
        },
    )
}

fn print(r: &Report<CatchupResult>) {
    r.print_head();
    let res = &r.result;
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
    row(
        "warmed up (last durable id known)",
        format!("{} of {}", res.warmed_up, r.connected),
    );
    row(
        "stored during the cut",
        format!(
            "{} ({} per user, {} failed, {:.1} s)",
            res.stored, res.messages_per_user, res.store_errors, res.store_s
        ),
    );
    row("cut lasted (s)", format!("{:.1}", res.cut_s));
    row("cut noticed by /readyz (ms)", opt(res.cut_noticed_ms));
    row("delivered during the cut", res.delivered_during_cut);
    row("heal -> /readyz 200 (ms)", opt(res.ready_after_heal_ms));
    row(
        "sessions caught up",
        format!(
            "{} of {} ({} not)",
            res.caught_up, r.connected, res.not_caught_up
        ),
    );
    row(
        "per session from heal ms p50/p99/max",
        res.from_heal_ms.short(),
    );
    row(
        "per session from ready ms p50/p99/max",
        res.from_ready_ms.short(),
    );
    row(
        "all caught up, ms from heal / ready",
        format!(
            "{} / {}",
            opt(res.total_from_heal_ms),
            opt(res.total_from_ready_ms)
        ),
    );
    row(
        "missing / duplicated / out of order",
        format!(
            "{} / {} / {} (of {})",
            res.missing, res.duplicated, res.out_of_order, res.expected_catch_up_messages
        ),
    );
    row("gap frames", res.gaps);
    for (how, count) in &res.ended_early {
        row("  ended early", format!("x{count}: {how}"));
    }
    row(
        "node / redis cpu s (per 10k sessions)",
        format!(
            "{:.2} / {:.2} ({} / {})",
            res.node_cpu_s,
            res.redis_cpu_s,
            opt2(res.node_cpu_s_per_10k_sessions),
            opt2(res.redis_cpu_s_per_10k_sessions)
        ),
    );
    row(
        "node metrics: passes, pass s",
        format!("{}, {}", opt2(res.node_passes), opt2(res.node_pass_seconds)),
    );
    row(
        "node metrics: sessions, messages",
        format!(
            "{}, {}",
            opt2(res.node_sessions_caught_up),
            opt2(res.node_messages_caught_up)
        ),
    );
    r.print_cpu();
}

fn opt2(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into())
}
