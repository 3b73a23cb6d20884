//! Reading the machine: process RSS and CPU from /proc, CPU accounting of a measured phase
//! (with the "noisy machine" check), Redis key counts, and node metrics.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use crate::util::{require_loopback, round3};

/// Linux reports CPU times in /proc in USER_HZ ticks, fixed at 100 by the ABI.
pub(crate) const USER_HZ: f64 = 100.0;

/// Options for reading processes and writing results, shared by every scenario.
#[derive(Debug, Clone, Args)]
pub(crate) struct ProbeArgs {
    /// Server (node) PIDs to read RSS (/proc/<pid>/status VmRSS) and CPU time
    /// (/proc/<pid>/stat utime+stime) from, comma-separated. For `idle`, when as many PIDs
    /// as targets are given they pair up by position.
    #[arg(long = "pids", value_delimiter = ',', num_args = 1..)]
    pub(crate) pids: Vec<u32>,

    /// PID of the redis-server, for its CPU time.
    #[arg(long)]
    pub(crate) redis_pid: Option<u32>,

    /// Other PIDs whose CPU belongs to the experiment (other bench processes, an external
    /// producer): counted as known load, not as noise.
    #[arg(long = "known-pids", value_delimiter = ',', num_args = 1..)]
    pub(crate) known_pids: Vec<u32>,

    /// Unexplained machine load, in cores, above which a run is flagged "noisy".
    #[arg(long, default_value_t = 0.3)]
    pub(crate) noise_threshold: f64,

    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<std::path::PathBuf>,

    /// Write a small JSON file here once all sessions are settled (connected or failed), so
    /// a script (or an external producer) knows when to start.
    #[arg(long)]
    pub(crate) ready_file: Option<std::path::PathBuf>,
}

/// One reading of a process.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct ProcSample {
    pub(crate) rss_kib: u64,
    pub(crate) rss_anon_kib: u64,
    /// utime + stime, in seconds.
    pub(crate) cpu_s: f64,
}

impl ProcSample {
    pub(crate) fn read(pid: &str) -> anyhow::Result<Self> {
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
        let cpu_s = cpu_ticks(pid)? as f64 / USER_HZ;
        Ok(ProcSample {
            rss_kib,
            rss_anon_kib,
            cpu_s,
        })
    }
}

/// utime + stime of a process (all its threads), in ticks.
pub(crate) fn cpu_ticks(pid: &str) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    parse_stat_ticks(&stat).with_context(|| format!("bad /proc/{pid}/stat"))
}

/// (comm, utime + stime) from a /proc/<pid>/stat line.
fn parse_stat(stat: &str) -> Option<(String, u64)> {
    // The command name (field 2) may hold spaces and parentheses: split at the last ')'.
    let open = stat.find('(')?;
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.get(open + 1..)?.to_string();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

fn parse_stat_ticks(stat: &str) -> Option<u64> {
    parse_stat(stat).map(|(_, t)| t)
}

pub(crate) fn sample_all(pids: &[u32]) -> anyhow::Result<Vec<ProcSample>> {
    pids.iter()
        .map(|p| ProcSample::read(&p.to_string()))
        .collect()
}

pub(crate) fn rss_map(pids: &[u32]) -> BTreeMap<String, u64> {
    pids.iter()
        .filter_map(|p| {
            ProcSample::read(&p.to_string())
                .ok()
                .map(|s| (format!("server:{p}"), s.rss_kib))
        })
        .collect()
}

// ===== The machine =====

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) nproc: usize,
    pub(crate) cpu_model: String,
    pub(crate) kernel: String,
}

impl Machine {
    pub(crate) fn detect() -> Self {
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

// ===== CPU accounting of a phase =====

/// The first line of /proc/stat, in ticks.
#[derive(Debug, Clone, Copy, Default)]
struct SysStat {
    user_nice_system: u64,
    irq: u64,
    steal: u64,
}

fn read_sys_stat() -> SysStat {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return SysStat::default();
    };
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return SysStat::default();
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    SysStat {
        user_nice_system: at(0) + at(1) + at(2),
        irq: at(5) + at(6),
        steal: at(7),
    }
}

/// CPU ticks of every process on the machine, with its name.
fn scan_all() -> HashMap<u32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Some(v) = parse_stat(&stat) {
                out.insert(pid, v);
            }
        }
    }
    out
}

/// A process whose CPU a phase accounts for.
#[derive(Debug, Clone)]
struct Known {
    label: String,
    pid: u32,
    role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Server,
    Redis,
    Bench,
    Other,
}

/// Measures the CPU of the known processes and of the whole machine over one phase.
pub(crate) struct Meter {
    known: Vec<Known>,
    start_ticks: Vec<Option<u64>>,
    start_sys: SysStat,
    start_all: HashMap<u32, (String, u64)>,
    t0: Instant,
    threshold: f64,
}

/// What a phase cost.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct PhaseCpu {
    pub(crate) wall_s: f64,
    /// CPU seconds per process, labelled `server:<pid>`, `redis:<pid>`, `bench:<pid>`,
    /// `other:<pid>`.
    pub(crate) cpu_seconds: BTreeMap<String, f64>,
    pub(crate) servers_s: f64,
    pub(crate) redis_s: f64,
    pub(crate) bench_s: f64,
    /// user+nice+system over the phase, in cores.
    pub(crate) machine_busy_cores: f64,
    /// The known processes' CPU, in cores.
    pub(crate) known_cores: f64,
    /// ksoftirqd threads (network work our own traffic causes), in cores.
    pub(crate) ksoftirqd_cores: f64,
    /// irq+softirq time not attributed to any process, in cores (loopback networking).
    pub(crate) irq_cores: f64,
    pub(crate) steal_cores: f64,
    /// Busy time no known process explains, in cores.
    pub(crate) unexplained_cores: f64,
    /// The largest unknown consumers over the phase: "name(pid)" -> cores.
    pub(crate) top_unknown: Vec<(String, f64)>,
    pub(crate) noisy: bool,
    pub(crate) noisy_reasons: Vec<String>,
}

impl Meter {
    pub(crate) fn start(probe: &ProbeArgs) -> Self {
        let mut known: Vec<Known> = probe
            .pids
            .iter()
            .map(|&pid| Known {
                label: format!("server:{pid}"),
                pid,
                role: Role::Server,
            })
            .collect();
        if let Some(pid) = probe.redis_pid {
            known.push(Known {
                label: format!("redis:{pid}"),
                pid,
                role: Role::Redis,
            });
        }
        let me = std::process::id();
        known.push(Known {
            label: format!("bench:{me}"),
            pid: me,
            role: Role::Bench,
        });
        for &pid in &probe.known_pids {
            if !known.iter().any(|k| k.pid == pid) {
                known.push(Known {
                    label: format!("other:{pid}"),
                    pid,
                    role: Role::Other,
                });
            }
        }
        let start_all = scan_all();
        let start_ticks = known
            .iter()
            .map(|k| start_all.get(&k.pid).map(|(_, t)| *t))
            .collect();
        Meter {
            known,
            start_ticks,
            start_sys: read_sys_stat(),
            start_all,
            t0: Instant::now(),
            threshold: probe.noise_threshold,
        }
    }

    pub(crate) fn finish(&self) -> PhaseCpu {
        let wall = self.t0.elapsed().as_secs_f64().max(1e-6);
        let sys = read_sys_stat();
        let all = scan_all();
        let mut out = PhaseCpu {
            wall_s: round3(wall),
            ..PhaseCpu::default()
        };
        let mut known_ticks = 0u64;
        for (k, start) in self.known.iter().zip(&self.start_ticks) {
            let (Some(start), Some((_, end))) = (start, all.get(&k.pid)) else {
                continue;
            };
            let ticks = end.saturating_sub(*start);
            known_ticks += ticks;
            let s = ticks as f64 / USER_HZ;
            out.cpu_seconds.insert(k.label.clone(), round3(s));
            match k.role {
                Role::Server => out.servers_s += s,
                Role::Redis => out.redis_s += s,
                Role::Bench => out.bench_s += s,
                Role::Other => {}
            }
        }
        let mut softirqd = 0u64;
        let mut unknown: Vec<(String, u64)> = Vec::new();
        for (pid, (comm, end)) in &all {
            if self.known.iter().any(|k| k.pid == *pid) {
                continue;
            }
            let start = self.start_all.get(pid).map(|(_, t)| *t).unwrap_or(0);
            let d = end.saturating_sub(start);
            if d == 0 {
                continue;
            }
            if comm.starts_with("ksoftirqd") {
                softirqd += d;
            } else {
                unknown.push((format!("{comm}({pid})"), d));
            }
        }
        unknown.sort_by_key(|u| std::cmp::Reverse(u.1));
        let cores = |ticks: u64| round3(ticks as f64 / USER_HZ / wall);
        let busy = sys
            .user_nice_system
            .saturating_sub(self.start_sys.user_nice_system);
        out.machine_busy_cores = cores(busy);
        out.known_cores = cores(known_ticks);
        out.ksoftirqd_cores = cores(softirqd);
        out.irq_cores = cores(sys.irq.saturating_sub(self.start_sys.irq));
        out.steal_cores = cores(sys.steal.saturating_sub(self.start_sys.steal));
        out.unexplained_cores = cores(busy.saturating_sub(known_ticks + softirqd));
        out.top_unknown = unknown
            .into_iter()
            .take(5)
            .map(|(n, t)| (n, cores(t)))
            .collect();
        out.servers_s = round3(out.servers_s);
        out.redis_s = round3(out.redis_s);
        out.bench_s = round3(out.bench_s);
        if out.unexplained_cores > self.threshold {
            out.noisy_reasons.push(format!(
                "{:.2} cores of CPU load not from the measured processes (top: {})",
                out.unexplained_cores,
                out.top_unknown
                    .iter()
                    .take(3)
                    .map(|(n, c)| format!("{n} {c:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if out.steal_cores > self.threshold {
            out.noisy_reasons.push(format!(
                "{:.2} cores stolen by the hypervisor",
                out.steal_cores
            ));
        }
        out.noisy = !out.noisy_reasons.is_empty();
        out
    }
}

pub(crate) fn warn_if_noisy(cpu: &PhaseCpu) {
    for r in &cpu.noisy_reasons {
        eprintln!("herald-bench: WARNING: noisy run: {r}");
    }
}

// ===== Redis =====

/// Opens a Redis client for a URL on this machine only.
pub(crate) fn redis_client(url: &str) -> anyhow::Result<redis::Client> {
    let client = redis::Client::open(url).with_context(|| format!("bad --redis-url {url:?}"))?;
    match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, _) => {
            let host = host.trim_matches(['[', ']']);
            let ip: std::net::IpAddr = if host == "localhost" {
                std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
            } else {
                host.parse()
                    .with_context(|| format!("--redis-url host {host:?} must be an IP address"))?
            };
            require_loopback(ip, "--redis-url")?;
        }
        redis::ConnectionAddr::Unix(_) => {}
        _ => bail!("--redis-url must be redis://127.0.0.1:<port> (TLS is not supported)"),
    }
    Ok(client)
}

pub(crate) async fn redis_conn(
    client: &redis::Client,
) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .context("cannot connect to Redis")
}

/// Keys under `<prefix>:*`, counted with SCAN (COUNT 1000); duplicates SCAN may return are
/// removed. Returns the count and up to `keep` names.
pub(crate) async fn count_keys(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    keep: usize,
) -> anyhow::Result<(usize, Vec<String>)> {
    let pattern = format!("{prefix}:*");
    let mut seen = std::collections::HashSet::new();
    let mut cursor: u64 = 0;
    // Bounded: SCAN terminates by contract; the iteration cap guards a misbehaving server.
    for _ in 0..1_000_000 {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .context("SCAN failed")?;
        seen.extend(keys);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let mut names: Vec<String> = seen.iter().cloned().collect();
    names.sort();
    names.truncate(keep);
    Ok((seen.len(), names))
}

// ===== Node metrics =====

/// Sums a Prometheus counter (all label sets) from GET <url> (http://host:port/metrics).
pub(crate) async fn scrape_counter(
    http: &reqwest::Client,
    url: &str,
    name: &str,
) -> anyhow::Result<f64> {
    let uri: http::Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
    let authority = uri
        .authority()
        .with_context(|| format!("{url:?} has no host"))?
        .clone();
    let port = uri.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((authority.host().trim_matches(['[', ']']), port))
        .await
        .with_context(|| format!("cannot resolve {url:?}"))?
        .next()
        .with_context(|| format!("{url:?} resolves to nothing"))?;
    require_loopback(addr.ip(), url)?;
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/metrics");
    let req = http.get(crate::node_http::url(addr, path)?).header(
        reqwest::header::HOST,
        crate::node_http::header(authority.as_str(), url)?,
    );
    let (status, body) = crate::node_http::exchange(req)
        .await
        .map_err(|e| anyhow::anyhow!("GET {url}: {e}"))?;
    if status != 200 {
        bail!("GET {url}: HTTP {status}");
    }
    Ok(sum_counter(&String::from_utf8_lossy(&body), name))
}

fn sum_counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                return None;
            }
            l.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_self_can_be_sampled() {
        let s = ProcSample::read("self").unwrap(); // safe: test
        assert!(s.rss_kib > 0);
    }

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let line = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15";
        assert_eq!(parse_stat(line), Some(("a (b) c".to_string(), 11 + 12)));
    }

    #[test]
    fn a_phase_accounts_for_this_process() {
        let probe = ProbeArgs {
            pids: vec![],
            redis_pid: None,
            known_pids: vec![],
            noise_threshold: 0.3,
            json: None,
            ready_file: None,
        };
        let m = Meter::start(&probe);
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(200) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let p = m.finish();
        assert!(x > 0);
        assert!(p.bench_s > 0.05, "{p:?}");
        assert!(p.cpu_seconds.keys().any(|k| k.starts_with("bench:")));
    }

    #[test]
    fn counters_are_summed_over_labels() {
        let text = "# TYPE x counter\nherald_slow_consumer_disconnects_total 3\nherald_slow_consumer_disconnects_total_other 9\nfoo{a=\"1\"} 2\nfoo{a=\"2\"} 5\n";
        assert_eq!(
            sum_counter(text, "herald_slow_consumer_disconnects_total"),
            3.0
        );
        assert_eq!(sum_counter(text, "foo"), 7.0);
    }

    #[test]
    fn redis_urls_must_be_local() {
        assert!(redis_client("redis://127.0.0.1:7000").is_ok());
        assert!(redis_client("redis://10.0.0.1:7000").is_err());
    }
}
