//! `churn`: K loops connect and disconnect (clean close, dropped socket, TCP RST) for
//! --duration next to --sessions steady sessions; node RSS and Redis key count are sampled
//! throughout, and after --settle both must be back near their baseline.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;

use crate::dial::{open_sessions, prepare_fd_limit, write_ready_file, ClientArgs, Dialer};
use crate::hist::{new_hist, Lat};
use crate::probe::{
    count_keys, redis_client, redis_conn, warn_if_noisy, Meter, ProbeArgs, ProcSample,
};
use crate::recv::{receive, RecvShared};
use crate::report::{row, Report};
use crate::util::{check_secs, round3, Rng};
use crate::wire::Ws;

#[derive(Debug, Clone, Args)]
pub(crate) struct ChurnArgs {
    /// --sessions is the number of steady sessions held through the whole run (0 for none).
    #[command(flatten)]
    pub(crate) client: ClientArgs,

    #[command(flatten)]
    pub(crate) probe: ProbeArgs,

    /// Concurrent connect/disconnect loops.
    #[arg(long, default_value_t = 50)]
    pub(crate) loops: usize,

    /// Seconds of churn.
    #[arg(long, default_value_t = 60.0)]
    pub(crate) duration: f64,

    /// Most connects per second over all loops.
    #[arg(long, default_value_t = 200.0)]
    pub(crate) rate: f64,

    /// A churning session stays open a random time up to this many milliseconds.
    #[arg(long, default_value_t = 500)]
    pub(crate) max_hold_ms: u64,

    /// How churning sessions end, as weights: clean close frame, dropped socket (FIN), and
    /// TCP RST (SO_LINGER 0).
    #[arg(long, default_value = "clean=1,drop=1,rst=1")]
    pub(crate) mix: String,

    /// Distinct users the loops connect as (bench-<first-user + sessions + j>), so users
    /// come and go and presence keys appear and expire.
    #[arg(long, default_value_t = 1000)]
    pub(crate) churn_users: usize,

    /// Seconds between samples of RSS and key count.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) sample_interval: f64,

    /// Seconds to wait after the last churning session ended before the final sample
    /// (longer than the node's --presence-ttl plus --offline-grace).
    #[arg(long, default_value_t = 15.0)]
    pub(crate) settle: f64,

    /// Redis to count keys in (SCAN MATCH <prefix>:*); without it only RSS is checked.
    #[arg(long)]
    pub(crate) redis_url: Option<String>,

    #[arg(long, default_value = "herald")]
    pub(crate) prefix: String,

    /// Seconds to hold the steady sessions before the baseline sample.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) hold: f64,

    /// Final RSS may exceed the baseline by this share of the baseline...
    #[arg(long, default_value_t = 0.25)]
    pub(crate) rss_tolerance: f64,

    /// ...or by this many KiB, whichever is larger.
    #[arg(long, default_value_t = 16_384)]
    pub(crate) rss_tolerance_kib: u64,

    /// Final key count may exceed the baseline by this many keys (e.g. the events stream).
    #[arg(long, default_value_t = 3)]
    pub(crate) key_tolerance: usize,

    /// Most connects one loop makes (a bound besides --duration).
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) max_connects_per_loop: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Clean,
    Drop,
    Rst,
}

fn parse_mix(spec: &str) -> anyhow::Result<Vec<(Ending, u32)>> {
    let mut out = Vec::new();
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let (name, w) = part
            .split_once('=')
            .with_context(|| format!("--mix part {part:?} is not name=weight"))?;
        let w: u32 = w
            .trim()
            .parse()
            .with_context(|| format!("bad weight in {part:?}"))?;
        let e = match name.trim() {
            "clean" => Ending::Clean,
            "drop" => Ending::Drop,
            "rst" => Ending::Rst,
            other => bail!("--mix: unknown ending {other:?} (clean, drop, rst)"),
        };
        out.push((e, w));
    }
    if out.iter().map(|(_, w)| w).sum::<u32>() == 0 {
        bail!("--mix needs at least one positive weight");
    }
    Ok(out)
}

fn pick_ending(mix: &[(Ending, u32)], rng: &mut Rng) -> Ending {
    let total: u32 = mix.iter().map(|(_, w)| w).sum();
    let mut r = rng.below(total as usize) as u32;
    for &(e, w) in mix {
        if r < w {
            return e;
        }
        r -= w;
    }
    Ending::Clean
}

/// One point of the time series.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    pub(crate) t_s: f64,
    pub(crate) phase: &'static str,
    pub(crate) rss_kib: BTreeMap<String, u64>,
    pub(crate) keys: Option<usize>,
    pub(crate) churn_open: usize,
    pub(crate) connects: u64,
    pub(crate) failures: u64,
}

#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    failures: AtomicU64,
    open: AtomicUsize,
    clean: AtomicU64,
    dropped: AtomicU64,
    rst: AtomicU64,
    closed_by_server: AtomicU64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ChurnResult {
    pub(crate) loops: usize,
    pub(crate) churn_s: f64,
    pub(crate) connects: u64,
    pub(crate) connects_per_s: f64,
    pub(crate) failures: u64,
    pub(crate) failure_kinds: BTreeMap<String, u64>,
    pub(crate) endings: BTreeMap<&'static str, u64>,
    /// Churning sessions the server closed while they were held.
    pub(crate) closed_by_server: u64,
    pub(crate) churn_connect_ms: Lat,
    pub(crate) samples: Vec<Sample>,
    pub(crate) baseline_rss_kib: BTreeMap<String, u64>,
    pub(crate) final_rss_kib: BTreeMap<String, u64>,
    pub(crate) peak_rss_kib: BTreeMap<String, u64>,
    pub(crate) baseline_keys: Option<usize>,
    pub(crate) peak_keys: Option<usize>,
    pub(crate) final_keys: Option<usize>,
    /// Up to 20 key names present at the end (when the count is above baseline).
    pub(crate) final_key_sample: Vec<String>,
    pub(crate) rss_ok: bool,
    pub(crate) keys_ok: Option<bool>,
    pub(crate) verdict: &'static str,
}

struct Sampler {
    pids: Vec<u32>,
    redis: Option<redis::aio::MultiplexedConnection>,
    prefix: String,
    t0: Instant,
    samples: Vec<Sample>,
}

impl Sampler {
    async fn sample(&mut self, phase: &'static str, c: &Counters) -> Sample {
        let rss_kib = self
            .pids
            .iter()
            .filter_map(|p| {
                ProcSample::read(&p.to_string())
                    .ok()
                    .map(|s| (format!("server:{p}"), s.rss_kib))
            })
            .collect();
        let keys = match self.redis.as_mut() {
            Some(conn) => match count_keys(conn, &self.prefix, 0).await {
                Ok((n, _)) => Some(n),
                Err(e) => {
                    eprintln!("herald-bench: key count failed: {e:#}");
                    None
                }
            },
            None => None,
        };
        let s = Sample {
            t_s: round3(self.t0.elapsed().as_secs_f64()),
            phase,
            rss_kib,
            keys,
            churn_open: c.open.load(Ordering::Relaxed),
            connects: c.connects.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
        };
        let rss: Vec<String> = s.rss_kib.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "t={:>7.1}s {:<8} rss_kib {} keys={} open={} connects={} failures={}",
            s.t_s,
            s.phase,
            rss.join(" "),
            s.keys.map(|k| k.to_string()).unwrap_or_else(|| "-".into()),
            s.churn_open,
            s.connects,
            s.failures
        );
        self.samples.push(s.clone());
        s
    }
}

/// Reads (answering pings) until `hold` passes or the server ends the session; true if
/// the server ended it.
async fn hold_for(ws: &mut Ws, hold: Duration) -> bool {
    let read = async {
        while let Some(f) = ws.next().await {
            match f {
                Ok(tokio_tungstenite::tungstenite::Message::Close(_)) | Err(_) => return true,
                Ok(tokio_tungstenite::tungstenite::Message::Text(t)) if t.as_str() == "2" => {
                    let _ = ws
                        .send(tokio_tungstenite::tungstenite::Message::text("3"))
                        .await;
                }
                Ok(_) => {}
            }
        }
        true
    };
    tokio::time::timeout(hold, read).await.unwrap_or(false)
}

async fn end_session(mut ws: Ws, how: Ending) {
    match how {
        Ending::Clean => {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = ws.close(None).await;
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
        }
        Ending::Drop => drop(ws),
        Ending::Rst => {
            let _ = socket2::SockRef::from(ws.get_ref()).set_linger(Some(Duration::ZERO));
            drop(ws);
        }
    }
}

pub(crate) async fn run(args: ChurnArgs) -> anyhow::Result<u8> {
    let c = &args.client;
    check_secs(args.duration, "--duration", false)?;
    check_secs(args.sample_interval, "--sample-interval", false)?;
    check_secs(args.settle, "--settle", true)?;
    check_secs(args.hold, "--hold", true)?;
    if !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate must be positive");
    }
    if args.loops == 0 || args.churn_users == 0 {
        bail!("--loops and --churn-users must be at least 1");
    }
    let mix = parse_mix(&args.mix)?;
    prepare_fd_limit(c.sessions + args.loops)?;
    let dialer = Arc::new(Dialer::new(c).await?);
    let redis = match &args.redis_url {
        Some(url) => Some(redis_conn(&redis_client(url)?).await?),
        None => None,
    };
    let mut sampler = Sampler {
        pids: args.probe.pids.clone(),
        redis,
        prefix: args.prefix.clone(),
        t0: Instant::now(),
        samples: Vec::new(),
    };
    let counters = Arc::new(Counters::default());

    // Steady sessions, then the baseline.
    let (shared, _rx) = RecvShared::new(c.protocol);
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
        "herald-bench churn: {} steady sessions connected; {} loops for {} s at most {} connects/s",
        connect.connected, args.loops, args.duration, args.rate
    );
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let baseline = sampler.sample("baseline", &counters).await;

    // Churn.
    let meter = Meter::start(&args.probe);
    let churn_started = Instant::now();
    let deadline = churn_started + Duration::from_secs_f64(args.duration);
    let next_index = Arc::new(AtomicUsize::new(c.sessions));
    let failure_kinds: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let hist = Arc::new(Mutex::new(new_hist()));
    let per_loop_gap = Duration::from_secs_f64(args.loops as f64 / args.rate);
    let mut loops = Vec::with_capacity(args.loops);
    for k in 0..args.loops {
        let dialer = dialer.clone();
        let counters = counters.clone();
        let next_index = next_index.clone();
        let failure_kinds = failure_kinds.clone();
        let hist = hist.clone();
        let mix = mix.clone();
        let users = args.churn_users;
        let base_user = c.sessions;
        let max_hold = args.max_hold_ms;
        let max_connects = args.max_connects_per_loop;
        let nloops = args.loops;
        loops.push(tokio::spawn(async move {
            let mut rng = Rng::new(k as u64 ^ crate::util::mono_ns());
            // Spread the loops' starts over one gap.
            let offset = per_loop_gap.mul_f64(k as f64 / nloops as f64);
            let mut next = tokio::time::Instant::now() + offset;
            let mut made = 0u64;
            while Instant::now() < deadline && made < max_connects {
                tokio::time::sleep_until(next).await;
                // A loop that fell behind (slow connects, long holds) does not burst to
                // catch up: the rate is a ceiling.
                next = next.max(tokio::time::Instant::now()) + per_loop_gap;
                if Instant::now() >= deadline {
                    break;
                }
                made += 1;
                let idx = next_index.fetch_add(1, Ordering::Relaxed);
                let mut spec = dialer.spec(idx);
                spec.user = dialer.user(base_user + rng.below(users));
                let t0 = Instant::now();
                match dialer.open(&spec).await {
                    Ok(mut s) => {
                        let micros = t0.elapsed().as_micros() as u64;
                        hist.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .saturating_record(micros.max(1));
                        counters.connects.fetch_add(1, Ordering::Relaxed);
                        counters.open.fetch_add(1, Ordering::Relaxed);
                        let hold = Duration::from_millis(rng.next_u64() % (max_hold + 1));
                        let remaining = deadline.saturating_duration_since(Instant::now());
                        if hold_for(&mut s.ws, hold.min(remaining)).await {
                            counters.closed_by_server.fetch_add(1, Ordering::Relaxed);
                        }
                        let how = pick_ending(&mix, &mut rng);
                        match how {
                            Ending::Clean => &counters.clean,
                            Ending::Drop => &counters.dropped,
                            Ending::Rst => &counters.rst,
                        }
                        .fetch_add(1, Ordering::Relaxed);
                        end_session(s.ws, how).await;
                        counters.open.fetch_sub(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        counters.failures.fetch_add(1, Ordering::Relaxed);
                        *failure_kinds
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(e)
                            .or_default() += 1;
                    }
                }
            }
        }));
    }
    let all_loops = futures_util::future::join_all(loops);
    tokio::pin!(all_loops);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(args.sample_interval));
    tick.tick().await;
    // Bounded: the loops stop at the deadline; the connect timeout bounds their last try.
    let loops_bound = tokio::time::sleep(
        Duration::from_secs_f64(args.duration) + Duration::from_secs_f64(c.connect_timeout + 5.0),
    );
    tokio::pin!(loops_bound);
    loop {
        tokio::select! {
            _ = &mut all_loops => break,
            _ = &mut loops_bound => {
                eprintln!("herald-bench: churn loops did not stop in time; reporting anyway");
                break;
            }
            _ = tick.tick() => {
                sampler.sample("churn", &counters).await;
            }
        }
    }
    let churn_s = churn_started.elapsed().as_secs_f64();
    let cpu = meter.finish();
    sampler.sample("stopped", &counters).await;

    // Settle: presence of the churned sessions expires, offline events are emitted.
    let settle_end = Instant::now() + Duration::from_secs_f64(args.settle);
    while Instant::now() + Duration::from_secs_f64(args.sample_interval) < settle_end {
        tokio::time::sleep(Duration::from_secs_f64(args.sample_interval)).await;
        sampler.sample("settle", &counters).await;
    }
    tokio::time::sleep(settle_end.saturating_duration_since(Instant::now())).await;
    let last = sampler.sample("final", &counters).await;
    let final_key_sample = match (sampler.redis.as_mut(), last.keys, baseline.keys) {
        (Some(conn), Some(f), Some(b)) if f > b => count_keys(conn, &args.prefix, 20)
            .await
            .map(|(_, names)| names)
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    shared.stop.cancel();

    // Verdict.
    let mut rss_ok = true;
    for (label, &b) in &baseline.rss_kib {
        let allowed = b + ((b as f64 * args.rss_tolerance) as u64).max(args.rss_tolerance_kib);
        if last.rss_kib.get(label).copied().unwrap_or(0) > allowed {
            rss_ok = false;
        }
    }
    let keys_ok = match (baseline.keys, last.keys) {
        (Some(b), Some(f)) => Some(f <= b + args.key_tolerance),
        _ => None,
    };
    let pass = rss_ok && keys_ok != Some(false);
    let mut peak_rss: BTreeMap<String, u64> = BTreeMap::new();
    for s in &sampler.samples {
        for (k, &v) in &s.rss_kib {
            let e = peak_rss.entry(k.clone()).or_default();
            *e = (*e).max(v);
        }
    }
    let connects = counters.connects.load(Ordering::Relaxed);
    let result = ChurnResult {
        loops: args.loops,
        churn_s: round3(churn_s),
        connects,
        connects_per_s: round3(connects as f64 / churn_s.max(1e-9)),
        failures: counters.failures.load(Ordering::Relaxed),
        failure_kinds: failure_kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        endings: BTreeMap::from([
            ("clean", counters.clean.load(Ordering::Relaxed)),
            ("drop", counters.dropped.load(Ordering::Relaxed)),
            ("rst", counters.rst.load(Ordering::Relaxed)),
        ]),
        closed_by_server: counters.closed_by_server.load(Ordering::Relaxed),
        churn_connect_ms: Lat::of(&hist.lock().unwrap_or_else(|e| e.into_inner())),
        peak_keys: sampler.samples.iter().filter_map(|s| s.keys).max(),
        samples: sampler.samples.clone(),
        baseline_rss_kib: baseline.rss_kib.clone(),
        final_rss_kib: last.rss_kib.clone(),
        peak_rss_kib: peak_rss,
        baseline_keys: baseline.keys,
        final_keys: last.keys,
        final_key_sample,
        rss_ok,
        keys_ok,
        verdict: if pass { "PASS" } else { "FAIL" },
    };
    let mut report = Report::new("churn", &dialer, c.concurrency, connect, result);
    report.latency_ms = report.result.churn_connect_ms.clone();
    report.rss_kib = last.rss_kib.clone();
    report.set_cpu(cpu);
    warn_if_noisy(&report.cpu);
    print(&report, &args);
    report.write_json(args.probe.json.as_deref())?;
    Ok(if pass { 0 } else { 3 })
}

fn print(r: &Report<ChurnResult>, args: &ChurnArgs) {
    r.print_head();
    let res = &r.result;
    row(
        "churn loops, duration (s)",
        format!("{}, {:.1}", res.loops, res.churn_s),
    );
    row(
        "churn connects, per s",
        format!("{}, {:.1}", res.connects, res.connects_per_s),
    );
    row("churn connect failures", res.failures);
    for (e, n) in &res.failure_kinds {
        row("  failure", format!("x{n}: {e}"));
    }
    row(
        "endings clean / drop / rst",
        format!(
            "{} / {} / {}",
            res.endings["clean"], res.endings["drop"], res.endings["rst"]
        ),
    );
    row("closed by server while held", res.closed_by_server);
    row("churn connect ms p50/p99/max", res.churn_connect_ms.short());
    for (label, b) in &res.baseline_rss_kib {
        row(
            &format!("rss KiB {label}"),
            format!(
                "baseline {b}, peak {}, final {}",
                res.peak_rss_kib.get(label).copied().unwrap_or(0),
                res.final_rss_kib.get(label).copied().unwrap_or(0)
            ),
        );
    }
    let k = |v: Option<usize>| v.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
    row(
        &format!("redis keys {}:*", args.prefix),
        format!(
            "baseline {}, peak {}, final {}",
            k(res.baseline_keys),
            k(res.peak_keys),
            k(res.final_keys)
        ),
    );
    if !res.final_key_sample.is_empty() {
        row("  keys at the end", res.final_key_sample.join(" "));
    }
    r.print_cpu();
    println!(
        "VERDICT: {} (rss {} within max({:.0}%, {} KiB) of baseline; keys {} within +{} after {} s settle)",
        res.verdict,
        if res.rss_ok { "back" } else { "NOT back" },
        args.rss_tolerance * 100.0,
        args.rss_tolerance_kib,
        match res.keys_ok {
            Some(true) => "back",
            Some(false) => "NOT back",
            None => "not measured,",
        },
        args.key_tolerance,
        args.settle
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_parse_and_pick() {
        let m = parse_mix("clean=1,drop=0,rst=3").unwrap(); // safe: test
        let mut rng = Rng::new(1);
        let picks: Vec<Ending> = (0..400).map(|_| pick_ending(&m, &mut rng)).collect();
        assert!(!picks.contains(&Ending::Drop));
        let rst = picks.iter().filter(|&&e| e == Ending::Rst).count();
        assert!((250..350).contains(&rst), "{rst}");
        assert!(parse_mix("clean=0").is_err());
        assert!(parse_mix("fin=1").is_err());
    }
}
