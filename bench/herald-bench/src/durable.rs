//! `durable` (herald only): (a) what a durable publish costs next to a plain one — M
//! `PUBLISH <prefix>:user:{<u>}` against M `FCALL herald_notify 1 <prefix>:inbox:{<u>}` with the
//! same payloads and pacing, per-call latency and Redis CPU per 10k; with `--idempotency`,
//! also M calls with `idem <new key>` and M retries of those calls (same key, same payload),
//! which must return the first id and store and deliver nothing; (b) how long replaying N
//! pending durable messages takes on connect, over R fresh users.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures_util::StreamExt;
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::dial::{open_sessions, prepare_fd_limit, write_ready_file, ClientArgs, Dialer};
use crate::hist::{new_hist, Lat};
use crate::probe::{redis_client, redis_conn, rss_map, warn_if_noisy, Meter, PhaseCpu, ProbeArgs};
use crate::recv::{collect, receive, RecvShared, Tally};
use crate::report::{row, Report};
use crate::util::{check_secs, mono_ns, round3, unix_secs};
use crate::wire::{classify, payload, Incoming, Protocol};

#[derive(Debug, Clone, Args)]
pub(crate) struct DurableArgs {
    /// --sessions live sessions (users bench-<first-user + i>) receive the messages of
    /// part (a), round-robin; 0 publishes to users without sessions.
    #[command(flatten)]
    pub(crate) client: ClientArgs,

    #[command(flatten)]
    pub(crate) probe: ProbeArgs,

    /// Redis the nodes use (the herald_notify function must be loaded: start a node first).
    #[arg(long, required = true)]
    pub(crate) redis_url: String,

    #[arg(long, default_value = "herald")]
    pub(crate) prefix: String,

    /// Messages per method in part (a).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) messages: u64,

    /// Calls per second in part (a); 0 sends back to back (one call in flight).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) rate: f64,

    #[arg(long, default_value_t = 100)]
    pub(crate) payload_bytes: usize,

    /// Replays measured in part (b), each with a fresh user.
    #[arg(long, default_value_t = 20)]
    pub(crate) replays: usize,

    /// Pending durable messages per replay.
    #[arg(long, default_value_t = 100)]
    pub(crate) replay_messages: u64,

    /// Reconnect without `since` (replay after the read cursor) instead of with
    /// `since=<id before the first>`.
    #[arg(long)]
    pub(crate) replay_from_cursor: bool,

    /// Seconds to wait for deliveries after each publishing phase.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) drain: f64,

    /// Seconds between the last connect and part (a).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) hold: f64,

    /// Part (a) also measures idempotent durable publishes: --messages calls of
    /// `FCALL herald_notify ... idem <key>` with a new key each ("idem_new"), then the same
    /// calls again with the same keys and payloads ("idem_repeat", a producer retrying after
    /// a timeout), each of which must return the id of the first call and deliver nothing.
    #[arg(long)]
    pub(crate) idempotency: bool,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct MethodCost {
    pub(crate) method: &'static str,
    pub(crate) calls: u64,
    pub(crate) errors: u64,
    /// idem_repeat only: replies that were not the id the first call with that key got.
    pub(crate) wrong_ids: u64,
    pub(crate) seconds: f64,
    pub(crate) calls_per_s: f64,
    /// Round trip of one call, producer side.
    pub(crate) call_ms: Lat,
    /// Publish to receipt by a session.
    pub(crate) end_to_end_ms: Lat,
    pub(crate) redis_cpu_s: f64,
    pub(crate) redis_cpu_s_per_10k: Option<f64>,
    pub(crate) server_cpu_s: f64,
    pub(crate) server_cpu_s_per_10k: Option<f64>,
    pub(crate) cpu: PhaseCpu,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReplayResult {
    pub(crate) replays: usize,
    pub(crate) completed: usize,
    pub(crate) messages_each: u64,
    pub(crate) from_cursor: bool,
    /// Connect start to the welcome frame.
    pub(crate) welcome_ms: Lat,
    /// Connect start to the last replayed message.
    pub(crate) replay_ms: Lat,
    /// Replays whose ids or count did not match what was published.
    pub(crate) mismatches: usize,
    pub(crate) errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct DurableResult {
    pub(crate) publish: MethodCost,
    pub(crate) fcall: MethodCost,
    /// With --idempotency: FCALL with a new idempotency key each.
    pub(crate) idem_new: Option<MethodCost>,
    /// With --idempotency: the same calls retried (same key and payload).
    pub(crate) idem_repeat: Option<MethodCost>,
    /// FCALL cost over PUBLISH cost.
    pub(crate) redis_cpu_ratio: Option<f64>,
    pub(crate) call_p50_ratio: Option<f64>,
    /// Redis CPU per call of idem_new and idem_repeat over plain FCALL.
    pub(crate) idem_new_redis_cpu_ratio: Option<f64>,
    pub(crate) idem_repeat_redis_cpu_ratio: Option<f64>,
    pub(crate) tally: Tally,
    pub(crate) replay: ReplayResult,
}

/// Longest a publishing phase or the replay series may run, whatever the counts.
const PHASE_LIMIT: Duration = Duration::from_secs(600);

/// The stream id just before `id` ("<ms>-<seq>"), for `since=`.
fn id_before(id: &str) -> anyhow::Result<String> {
    let (ms, seq) = id
        .split_once('-')
        .with_context(|| format!("not a stream id: {id:?}"))?;
    let ms: u64 = ms.parse().with_context(|| format!("bad id {id:?}"))?;
    let seq: u64 = seq.parse().with_context(|| format!("bad id {id:?}"))?;
    Ok(if seq > 0 {
        format!("{ms}-{}", seq - 1)
    } else if ms > 0 {
        format!("{}-{}", ms - 1, u64::MAX)
    } else {
        "0-0".into()
    })
}

async fn fcall(
    conn: &mut redis::aio::MultiplexedConnection,
    inbox: &str,
    body: &str,
) -> redis::RedisResult<String> {
    fcall_idem(conn, inbox, body, None).await
}

/// `FCALL herald_notify 1 <inbox> <body> [idem <key>]` (docs/redis.md).
async fn fcall_idem(
    conn: &mut redis::aio::MultiplexedConnection,
    inbox: &str,
    body: &str,
    idem: Option<&str>,
) -> redis::RedisResult<String> {
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("herald_notify").arg(1).arg(inbox).arg(body);
    if let Some(key) = idem {
        cmd.arg("idem").arg(key);
    }
    cmd.query_async(conn).await
}

/// One call of part (a).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Publish,
    Fcall,
    IdemNew,
    IdemRepeat,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Publish => "publish",
            Method::Fcall => "fcall",
            Method::IdemNew => "idem_new",
            Method::IdemRepeat => "idem_repeat",
        }
    }
}

/// What an idempotent call sent and got, so that its retry can send the same and check the
/// reply: user index, payload, key and the id of the first call.
struct IdemCall {
    user: usize,
    body: String,
    key: String,
    id: String,
}

/// Part (a) for one method. `idem` collects the idempotent calls of [`Method::IdemNew`]
/// and is what [`Method::IdemRepeat`] retries.
#[allow(clippy::too_many_arguments)]
async fn phase(
    method: Method,
    args: &DurableArgs,
    conn: &mut redis::aio::MultiplexedConnection,
    users: &[String],
    last_seq: &mut [u64],
    shared: &RecvShared,
    pad: &str,
    idem: &mut Vec<IdemCall>,
) -> MethodCost {
    let meter = Meter::start(&args.probe);
    let mut calls = new_hist();
    let mut errors = 0u64;
    let mut wrong_ids = 0u64;
    let started = Instant::now();
    let mut calls_made = 0u64;
    // Keys unique to this run: a rerun against the same Redis within the idempotency
    // window must not find the previous run's keys.
    let run_id = format!("{}-{}", std::process::id(), unix_secs());
    let total = if method == Method::IdemRepeat {
        idem.len() as u64
    } else {
        args.messages
    };
    for m in 0..total {
        if started.elapsed() > PHASE_LIMIT {
            let name = method.name();
            eprintln!("herald-bench: {name} phase stopped after {PHASE_LIMIT:?} ({m} calls)");
            break;
        }
        calls_made += 1;
        if args.rate > 0.0 {
            let due = started + Duration::from_secs_f64(m as f64 / args.rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let ok = match method {
            Method::IdemRepeat => {
                let call = &idem[m as usize];
                let inbox = format!("{}:inbox:{{{}}}", args.prefix, users[call.user]);
                let t0 = Instant::now();
                let r = fcall_idem(conn, &inbox, &call.body, Some(&call.key)).await;
                calls.saturating_record((t0.elapsed().as_micros() as u64).max(1));
                match r {
                    Ok(id) => {
                        if id != call.id {
                            wrong_ids += 1;
                        }
                        true
                    }
                    Err(_) => false,
                }
            }
            _ => {
                let k = (m % users.len() as u64) as usize;
                last_seq[k] += 1;
                let body = payload(last_seq[k], mono_ns(), pad);
                let key = format!("bench-{run_id}-{m}");
                let t0 = Instant::now();
                let r = match method {
                    Method::Publish => redis::cmd("PUBLISH")
                        .arg(format!("{}:user:{{{}}}", args.prefix, users[k]))
                        .arg(&body)
                        .query_async::<i64>(conn)
                        .await
                        .map(|_| String::new()),
                    Method::Fcall => {
                        fcall(
                            conn,
                            &format!("{}:inbox:{{{}}}", args.prefix, users[k]),
                            &body,
                        )
                        .await
                    }
                    _ => {
                        let inbox = format!("{}:inbox:{{{}}}", args.prefix, users[k]);
                        fcall_idem(conn, &inbox, &body, Some(&key)).await
                    }
                };
                calls.saturating_record((t0.elapsed().as_micros() as u64).max(1));
                match r {
                    Ok(id) => {
                        if method == Method::IdemNew {
                            idem.push(IdemCall {
                                user: k,
                                body,
                                key,
                                id,
                            });
                        }
                        true
                    }
                    Err(_) => {
                        // Not published: the receiver must not wait for it.
                        last_seq[k] -= 1;
                        false
                    }
                }
            }
        };
        if !ok {
            errors += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = meter.finish();
    tokio::time::sleep(Duration::from_secs_f64(args.drain)).await;
    let e2e = Lat::of(&shared.latency.merged(true));
    let per10k =
        |s: f64| (calls_made > errors).then(|| round3(s * 10_000.0 / (calls_made - errors) as f64));
    MethodCost {
        method: method.name(),
        calls: calls_made,
        errors,
        wrong_ids,
        seconds: round3(seconds),
        calls_per_s: round3(calls_made as f64 / seconds.max(1e-9)),
        call_ms: Lat::of(&calls),
        end_to_end_ms: e2e,
        redis_cpu_s: cpu.redis_s,
        redis_cpu_s_per_10k: per10k(cpu.redis_s),
        server_cpu_s: cpu.servers_s,
        server_cpu_s_per_10k: per10k(cpu.servers_s),
        cpu,
    }
}

/// Part (b): R fresh users, each with N pending durable messages, each reconnecting once.
async fn replays(
    args: &DurableArgs,
    dialer: &Dialer,
    conn: &mut redis::aio::MultiplexedConnection,
    pad: &str,
) -> ReplayResult {
    let mut welcome = new_hist();
    let mut replay = new_hist();
    let mut out = ReplayResult {
        replays: args.replays,
        completed: 0,
        messages_each: args.replay_messages,
        from_cursor: args.replay_from_cursor,
        welcome_ms: Lat::default(),
        replay_ms: Lat::default(),
        mismatches: 0,
        errors: Vec::new(),
    };
    let run_id = format!("{}-{}", std::process::id(), unix_secs());
    let started = Instant::now();
    for r in 0..args.replays {
        if started.elapsed() > PHASE_LIMIT {
            out.errors
                .push(format!("replays stopped after {PHASE_LIMIT:?} ({r} done)"));
            break;
        }
        let user = format!("bench-replay-{run_id}-{r}");
        let inbox = format!("{}:inbox:{{{user}}}", args.prefix);
        let mut ids = Vec::with_capacity(args.replay_messages as usize);
        for seq in 1..=args.replay_messages {
            match fcall(conn, &inbox, &payload(seq, mono_ns(), pad)).await {
                Ok(id) => ids.push(id),
                Err(e) => {
                    out.errors.push(format!("replay {r}: FCALL: {e}"));
                    break;
                }
            }
        }
        if ids.len() as u64 != args.replay_messages {
            continue;
        }
        let mut spec = dialer.spec(r);
        spec.user = user;
        if !args.replay_from_cursor {
            match id_before(&ids[0]) {
                Ok(s) => spec.since = Some(s),
                Err(e) => {
                    out.errors.push(format!("replay {r}: {e:#}"));
                    continue;
                }
            }
        }
        let t0 = Instant::now();
        let mut session = match dialer.open(&spec).await {
            Ok(s) => s,
            Err(e) => {
                out.errors.push(format!("replay {r}: connect: {e}"));
                continue;
            }
        };
        welcome.saturating_record((t0.elapsed().as_micros() as u64).max(1));
        let mut got = Vec::with_capacity(ids.len());
        let read = async {
            while got.len() < ids.len() {
                match session.ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        if let Incoming::Data { id: Some(id), .. } =
                            classify(Protocol::Herald, t.as_str())
                        {
                            got.push(id);
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                }
            }
        };
        let timed_out = tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .is_err();
        let took = t0.elapsed();
        if got == ids {
            replay.saturating_record((took.as_micros() as u64).max(1));
            out.completed += 1;
        } else {
            out.mismatches += 1;
            out.errors.push(format!(
                "replay {r}: got {} of {} ids{}",
                got.len(),
                ids.len(),
                if timed_out { " (timed out)" } else { "" }
            ));
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), session.ws.close(None)).await;
    }
    out.welcome_ms = Lat::of(&welcome);
    out.replay_ms = Lat::of(&replay);
    out.errors.truncate(20);
    out
}

pub(crate) async fn run(args: DurableArgs) -> anyhow::Result<u8> {
    let c = &args.client;
    if c.protocol != Protocol::Herald {
        bail!("durable measures herald's inbox: use --protocol herald");
    }
    if args.messages == 0 {
        bail!("--messages must be at least 1");
    }
    if !(args.rate.is_finite() && args.rate >= 0.0) {
        bail!("--rate must be 0 (back to back) or positive");
    }
    check_secs(args.drain, "--drain", true)?;
    check_secs(args.hold, "--hold", true)?;
    prepare_fd_limit(c.sessions + 1)?;
    let dialer = Arc::new(Dialer::new(c).await?);
    let client = redis_client(&args.redis_url)?;
    let mut conn = redis_conn(&client).await?;
    let pad = "x".repeat(args.payload_bytes);
    // Fail early and clearly when the function is missing (no node has started yet).
    let probe_inbox = format!("{}:inbox:{{bench-durable-probe}}", args.prefix);
    fcall(&mut conn, &probe_inbox, &payload(0, mono_ns(), &pad))
        .await
        .context("FCALL herald_notify failed: is a herald node running against this Redis with this --prefix?")?;
    let _: Result<i64, _> = redis::cmd("DEL")
        .arg(&probe_inbox)
        .query_async(&mut conn)
        .await;

    let (shared, mut rx) = RecvShared::with_durable(c.protocol, true);
    let (connect, _held) = {
        let d = dialer.clone();
        let sh = shared.clone();
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
    eprintln!(
        "herald-bench durable: {} sessions connected; {} PUBLISH then {} FCALL{}",
        connect.connected,
        args.messages,
        args.messages,
        if args.idempotency {
            " then as many with new idempotency keys, then their retries"
        } else {
            ""
        }
    );
    let users: Vec<String> = if connect.connected > 0 {
        connect
            .connected_indexes
            .iter()
            .map(|&i| dialer.user(i))
            .collect()
    } else {
        (0..100).map(|i| format!("bench-offline-{i}")).collect()
    };
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let _ = shared.latency.merged(true);

    let mut last_seq = vec![0u64; users.len()];
    let mut idem = Vec::new();
    // One phase after the other, each with the same connection, users and receivers.
    macro_rules! cost {
        ($method:expr) => {
            phase(
                $method,
                &args,
                &mut conn,
                &users,
                &mut last_seq,
                &shared,
                &pad,
                &mut idem,
            )
            .await
        };
    }
    let publish = cost!(Method::Publish);
    let fcall_cost = cost!(Method::Fcall);
    let (idem_new, idem_repeat) = if args.idempotency {
        let new = cost!(Method::IdemNew);
        (Some(new), Some(cost!(Method::IdemRepeat)))
    } else {
        (None, None)
    };
    let rss = rss_map(&args.probe.pids);

    shared.stop.cancel();
    let outcomes = collect(&mut rx, connect.connected, Duration::from_secs(10)).await;
    let mut tally = Tally::default();
    for (k, &i) in connect.connected_indexes.iter().enumerate() {
        if let Some(o) = outcomes.get(&i) {
            tally.add(o, last_seq[k], &[]);
        }
    }

    let replay = replays(&args, &dialer, &mut conn, &pad).await;

    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(round3(a / b)),
        _ => None,
    };
    let result = DurableResult {
        redis_cpu_ratio: ratio(fcall_cost.redis_cpu_s_per_10k, publish.redis_cpu_s_per_10k),
        call_p50_ratio: ratio(Some(fcall_cost.call_ms.p50), Some(publish.call_ms.p50)),
        idem_new_redis_cpu_ratio: idem_new
            .as_ref()
            .and_then(|m| ratio(m.redis_cpu_s_per_10k, fcall_cost.redis_cpu_s_per_10k)),
        idem_repeat_redis_cpu_ratio: idem_repeat
            .as_ref()
            .and_then(|m| ratio(m.redis_cpu_s_per_10k, fcall_cost.redis_cpu_s_per_10k)),
        publish,
        fcall: fcall_cost.clone(),
        idem_new,
        idem_repeat,
        tally: tally.clone(),
        replay,
    };
    let mut report = Report::new("durable", &dialer, c.concurrency, connect, result);
    let active_s = [
        Some(&report.result.publish),
        Some(&report.result.fcall),
        report.result.idem_new.as_ref(),
        report.result.idem_repeat.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|m| m.seconds)
    .sum();
    report.set_tally(&tally, active_s);
    // The top-level latency and CPU are the durable (FCALL) phase's.
    report.latency_ms = report.result.fcall.end_to_end_ms.clone();
    report.rss_kib = rss;
    report.set_cpu(fcall_cost.cpu);
    // Any phase being noisy makes the run noisy.
    let others: Vec<(&'static str, Vec<String>)> = [
        Some(&report.result.publish),
        report.result.idem_new.as_ref(),
        report.result.idem_repeat.as_ref(),
    ]
    .into_iter()
    .flatten()
    .filter(|m| m.cpu.noisy)
    .map(|m| (m.method, m.cpu.noisy_reasons.clone()))
    .collect();
    for (method, reasons) in others {
        report.noisy = true;
        report.cpu.noisy = true;
        report
            .cpu
            .noisy_reasons
            .extend(reasons.into_iter().map(|r| format!("{method} phase: {r}")));
    }
    warn_if_noisy(&report.cpu);
    print(&report);
    report.write_json(args.probe.json.as_deref())?;
    Ok(0)
}

fn print(r: &Report<DurableResult>) {
    r.print_head();
    let res = &r.result;
    println!();
    println!(
        "{:<11} {:>8} {:>7} {:>10} {:>22} {:>22} {:>11} {:>12}",
        "method",
        "calls",
        "errors",
        "calls/s",
        "call ms p50/p99/max",
        "e2e ms p50/p99/max",
        "redis s/10k",
        "server s/10k"
    );
    let methods = [
        Some(&res.publish),
        Some(&res.fcall),
        res.idem_new.as_ref(),
        res.idem_repeat.as_ref(),
    ];
    for m in methods.into_iter().flatten() {
        let f = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<11} {:>8} {:>7} {:>10.0} {:>22} {:>22} {:>11} {:>12}",
            m.method,
            m.calls,
            m.errors,
            m.calls_per_s,
            m.call_ms.short(),
            // Nothing delivered (idem_repeat): no latency to show.
            if m.end_to_end_ms.count == 0 {
                "-".to_string()
            } else {
                m.end_to_end_ms.short()
            },
            f(m.redis_cpu_s_per_10k),
            f(m.server_cpu_s_per_10k)
        );
    }
    println!();
    if let Some(v) = res.redis_cpu_ratio {
        row("redis CPU, FCALL / PUBLISH", format!("{v:.2}x"));
    }
    if let Some(v) = res.call_p50_ratio {
        row("call p50, FCALL / PUBLISH", format!("{v:.2}x"));
    }
    if let Some(v) = res.idem_new_redis_cpu_ratio {
        row("redis CPU, idem_new / FCALL", format!("{v:.2}x"));
    }
    if let Some(v) = res.idem_repeat_redis_cpu_ratio {
        row("redis CPU, idem_repeat / FCALL", format!("{v:.2}x"));
    }
    if let Some(m) = &res.idem_repeat {
        row("idem_repeat: replies not the first id", m.wrong_ids);
    }
    r.print_delivery();
    let rp = &res.replay;
    row(
        "replays completed",
        format!(
            "{} of {} ({} messages each, {})",
            rp.completed,
            rp.replays,
            rp.messages_each,
            if rp.from_cursor {
                "from the cursor"
            } else {
                "with since"
            }
        ),
    );
    row("replay: welcome ms p50/p99/max", rp.welcome_ms.short());
    row("replay: last message ms p50/p99/max", rp.replay_ms.short());
    for e in &rp.errors {
        row("  replay error", e);
    }
    r.print_cpu();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_before() {
        assert_eq!(id_before("5-3").unwrap(), "5-2"); // safe: test
        assert_eq!(id_before("5-0").unwrap(), format!("4-{}", u64::MAX)); // safe: test
        assert_eq!(id_before("0-0").unwrap(), "0-0"); // safe: test
        assert!(id_before("x").is_err());
    }
}
