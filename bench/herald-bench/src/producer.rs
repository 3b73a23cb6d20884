//! The producing side: paced publishes over Redis (`PUBLISH` on the documented channels),
//! herald's HTTP API (`POST /api/publish`) or a Pusher-compatible HTTP API (signed
//! `POST /apps/<id>/batch_events`, for Sockudo), or expectations read from an external
//! producer.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::{interval, MissedTickBehavior};

use crate::dial::Target;
use crate::node_http;
use crate::pusher::{self, PusherArgs};
use crate::util::{mono_ns, round3, unix_secs, Rng};
use crate::wire::payload;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ProducerKind {
    /// PUBLISH on Redis from this process, on its own connection.
    Redis,
    /// POST /api/publish to the targets (round-robin over connections).
    Http,
    /// Pusher HTTP API: signed POST /apps/<id>/batch_events to the targets, up to 10 events
    /// per request (needs --pusher-secret; channels private-user-<uid> and broadcast).
    PusherApi,
    /// Someone else publishes; expectations come from --expect-file.
    External,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct ProducerArgs {
    /// Who publishes.
    #[arg(long, value_enum, default_value_t = ProducerKind::Redis)]
    pub(crate) producer: ProducerKind,

    /// Redis to publish on (and to count keys in): redis://127.0.0.1:<port>.
    #[arg(long)]
    pub(crate) redis_url: Option<String>,

    /// herald's --prefix: channels are <prefix>:user:{<uid>}, <prefix>:broadcast,
    /// <prefix>:topic:{<name>}.
    #[arg(long, default_value = "herald")]
    pub(crate) prefix: String,

    /// API key for --producer http (Authorization: Bearer).
    #[arg(long, env = "HERALD_BENCH_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,

    /// Messages per second, in total.
    #[arg(long, default_value_t = 1000.0)]
    pub(crate) rate: f64,

    /// Seconds to publish for.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) duration: f64,

    /// Bytes of "x" in each payload's "pad" field.
    #[arg(long, default_value_t = 100)]
    pub(crate) payload_bytes: usize,

    /// --producer external: the JSON file the external producer writes when it is done:
    /// {"sent": n, "per_user": {"bench-0": <last seq>, ...}} (fanout),
    /// {"sent": n, "per_topic": {"t0": <last seq>, ...}} (topic) or {"sent": n} (broadcast).
    #[arg(long)]
    pub(crate) expect_file: Option<PathBuf>,

    /// Seconds to wait for stragglers after the producer stops.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) drain: f64,

    /// --producer external: seconds to wait for --expect-file after --duration.
    #[arg(long, default_value_t = 60.0)]
    pub(crate) expect_timeout: f64,

    /// --producer http: publishes in flight at once, each on a kept-alive connection (at
    /// most this many open). Messages to one target always go through the same sender, one
    /// after the other, so their order is kept.
    #[arg(long, default_value_t = 16)]
    pub(crate) http_connections: usize,

    /// Most publishes sent in one pipelined batch (the producer ticks every millisecond).
    #[arg(long, default_value_t = 500)]
    pub(crate) max_batch: usize,
}

impl ProducerArgs {
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        if self.producer != ProducerKind::External && !(self.rate.is_finite() && self.rate > 0.0) {
            bail!("--rate must be a positive number of messages per second");
        }
        crate::util::check_secs(self.duration, "--duration", false)?;
        crate::util::check_secs(self.drain, "--drain", true)?;
        if self.payload_bytes > 60_000 {
            bail!(
                "--payload-bytes above 60,000 would exceed herald's default 64 KiB message limit"
            );
        }
        match self.producer {
            ProducerKind::Redis if self.redis_url.is_none() => {
                bail!("--producer redis needs --redis-url")
            }
            ProducerKind::External if self.expect_file.is_none() => {
                bail!("--producer external needs --expect-file")
            }
            _ => Ok(()),
        }
    }
}

/// What a message is addressed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    User,
    Topic,
    Broadcast,
}

/// The targets of a run: message `key`s index `names` (user ids or topic names).
#[derive(Debug, Clone)]
pub(crate) struct Targets {
    pub(crate) kind: Kind,
    pub(crate) names: Vec<String>,
}

impl Targets {
    pub(crate) fn channel(&self, prefix: &str, key: usize) -> String {
        match self.kind {
            Kind::User => format!("{prefix}:user:{{{}}}", self.names[key]),
            Kind::Topic => format!("{prefix}:topic:{{{}}}", self.names[key]),
            Kind::Broadcast => format!("{prefix}:broadcast"),
        }
    }

    /// The body of POST /api/publish up to `"data":`.
    fn http_prefix(&self, key: usize) -> String {
        match self.kind {
            Kind::User => format!(r#"{{"user":"{}","data":"#, self.names[key]),
            Kind::Topic => format!(r#"{{"topic":"{}","data":"#, self.names[key]),
            Kind::Broadcast => r#"{"broadcast":true,"data":"#.to_string(),
        }
    }
}

/// How each message's key is chosen.
#[derive(Debug, Clone)]
pub(crate) enum Pick {
    /// Uniformly among these keys.
    Random(Vec<usize>),
    /// In turn.
    Cycle(Vec<usize>),
}

impl Pick {
    fn next(&self, rng: &mut Rng, n: u64) -> usize {
        match self {
            Pick::Random(keys) => keys[rng.below(keys.len())],
            Pick::Cycle(keys) => keys[(n % keys.len() as u64) as usize],
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Pick::Random(k) | Pick::Cycle(k) => k.is_empty(),
        }
    }
}

/// One paced stream of publishes.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) rate: f64,
    pub(crate) duration: f64,
    pub(crate) pad: String,
    pub(crate) pick: Pick,
    pub(crate) targets: Targets,
    pub(crate) max_batch: usize,
}

/// What a producer did.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Produced {
    pub(crate) planned: u64,
    pub(crate) sent: u64,
    pub(crate) failed: u64,
    pub(crate) elapsed_s: f64,
    pub(crate) achieved_rate: f64,
    /// How far behind schedule the producer fell at worst, in ms.
    pub(crate) max_lag_ms: f64,
    pub(crate) errors: BTreeMap<String, u64>,
    /// Last sequence number per key (the expectation of its receivers).
    #[serde(skip)]
    pub(crate) last_seq: Vec<u64>,
    /// Sequence numbers whose publish failed, per key.
    #[serde(skip)]
    pub(crate) failed_seqs: HashMap<usize, Vec<u64>>,
}

impl Produced {
    fn fail(&mut self, key: usize, seq: u64, error: String) {
        self.failed += 1;
        self.failed_seqs.entry(key).or_default().push(seq);
        *self.errors.entry(error).or_default() += 1;
    }
}

/// Hands out how many messages are due, on a 1 ms tick, for `rate` × `duration` messages;
/// gives up 10 s after the planned end if the sender cannot keep up.
struct Pacer {
    start: Instant,
    rate: f64,
    total: u64,
    sent: u64,
    deadline: Instant,
    tick: tokio::time::Interval,
    max_lag: f64,
}

impl Pacer {
    fn new(rate: f64, duration: f64) -> Self {
        let start = Instant::now();
        let mut tick = interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Pacer {
            start,
            rate,
            total: (rate * duration).round() as u64,
            sent: 0,
            deadline: start + Duration::from_secs_f64(duration + 10.0),
            tick,
            max_lag: 0.0,
        }
    }

    /// Waits for the next tick; `None` once everything was sent or time ran out.
    async fn due(&mut self, max_batch: usize) -> Option<u64> {
        if self.sent >= self.total || Instant::now() > self.deadline {
            return None;
        }
        self.tick.tick().await;
        let el = self.start.elapsed().as_secs_f64();
        // Message k (from 0) is due at k / rate.
        let should = ((el * self.rate).floor() as u64 + 1).min(self.total);
        let lag = el - self.sent as f64 / self.rate;
        if should > self.sent && lag > self.max_lag {
            self.max_lag = lag;
        }
        Some(
            should
                .saturating_sub(self.sent)
                .min(max_batch.max(1) as u64),
        )
    }

    fn done(&mut self, n: u64) {
        self.sent += n;
    }
}

fn finish(mut p: Produced, pacer: &Pacer) -> Produced {
    let el = pacer.start.elapsed().as_secs_f64();
    p.planned = pacer.total;
    p.elapsed_s = round3(el);
    p.achieved_rate = round3(p.sent as f64 / el.max(1e-9));
    p.max_lag_ms = round3(pacer.max_lag * 1000.0);
    p
}

/// Publishes `plan` with PUBLISH on `conn`, pipelining each tick's messages.
pub(crate) async fn run_redis(
    plan: Plan,
    prefix: String,
    mut conn: redis::aio::MultiplexedConnection,
) -> Produced {
    let mut out = Produced {
        last_seq: vec![0; plan.targets.names.len().max(1)],
        ..Produced::default()
    };
    let channels: Vec<String> = (0..plan.targets.names.len().max(1))
        .map(|k| plan.targets.channel(&prefix, k))
        .collect();
    let mut pacer = Pacer::new(plan.rate, plan.duration);
    if plan.pick.is_empty() {
        return finish(out, &pacer);
    }
    let mut rng = Rng::seeded();
    let mut n = 0u64;
    let mut batch: Vec<(usize, u64)> = Vec::with_capacity(plan.max_batch);
    while let Some(due) = pacer.due(plan.max_batch).await {
        if due == 0 {
            continue;
        }
        batch.clear();
        let mut pipe = redis::pipe();
        for _ in 0..due {
            let key = plan.pick.next(&mut rng, n);
            n += 1;
            out.last_seq[key] += 1;
            let seq = out.last_seq[key];
            batch.push((key, seq));
            pipe.cmd("PUBLISH")
                .arg(&channels[key])
                .arg(payload(seq, mono_ns(), &plan.pad))
                .ignore();
        }
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => out.sent += due,
            Err(e) => {
                let text = format!(
                    "redis: {}",
                    e.to_string().chars().take(60).collect::<String>()
                );
                for &(key, seq) in &batch {
                    out.fail(key, seq, text.clone());
                }
            }
        }
        pacer.done(due);
    }
    finish(out, &pacer)
}

/// Publishes `plan` with POST /api/publish from `connections` workers spread over
/// `targets`, on `http`'s keep-alive connections. Each worker has one request in flight, so
/// at most `connections` are; messages for one key always take the same worker (order kept).
pub(crate) async fn run_http(
    plan: Plan,
    http: &reqwest::Client,
    targets: &[Target],
    api_key: Option<&str>,
    connections: usize,
) -> anyhow::Result<Produced> {
    let keys = plan.targets.names.len().max(1);
    let mut out = Produced {
        last_seq: vec![0; keys],
        ..Produced::default()
    };
    let workers = connections.clamp(1, 256);
    let prefixes: std::sync::Arc<Vec<String>> =
        std::sync::Arc::new((0..keys).map(|k| plan.targets.http_prefix(k)).collect());
    let auth = match api_key {
        Some(k) => {
            let mut v = node_http::header(&format!("Bearer {k}"), "--api-key")?;
            v.set_sensitive(true);
            Some(v)
        }
        None => None,
    };
    // Built once per target: each request clones them (a reference-count bump for the
    // headers, one short string for the URL).
    let endpoints = targets
        .iter()
        .map(|t| {
            Ok((
                node_http::url(t.addr, "/api/publish")?,
                node_http::header(&t.authority, "the target's host")?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if endpoints.is_empty() {
        bail!("--producer http needs a target");
    }
    let mut senders = Vec::with_capacity(workers);
    let mut handles = Vec::with_capacity(workers);
    // Jobs still queued when the pacer's own deadline passes are dropped (counted failed),
    // so a stalled server cannot keep the workers busy for 4,096 timeouts each.
    let deadline = Instant::now() + Duration::from_secs_f64(plan.duration + 10.0);
    for w in 0..workers {
        let (tx, mut rx) = mpsc::channel::<(usize, u64)>(4096);
        senders.push(tx);
        let (url, host) = endpoints[w % endpoints.len()].clone();
        let http = http.clone();
        let prefixes = prefixes.clone();
        let pad = plan.pad.clone();
        let auth = auth.clone();
        handles.push(tokio::spawn(async move {
            let json = HeaderValue::from_static("application/json");
            let mut got = Produced::default();
            while let Some((k, seq)) = rx.recv().await {
                if Instant::now() > deadline {
                    got.fail(k, seq, "http: not sent before the deadline".into());
                    continue;
                }
                let mut body = prefixes[k].clone();
                body.push_str(&payload(seq, mono_ns(), &pad));
                body.push('}');
                let mut req = http
                    .post(url.clone())
                    .header(HOST, host.clone())
                    .header(CONTENT_TYPE, json.clone());
                if let Some(a) = &auth {
                    req = req.header(AUTHORIZATION, a.clone());
                }
                match node_http::exchange(req.body(body)).await {
                    Ok((200, _)) => got.sent += 1,
                    Ok((status, _)) => got.fail(k, seq, format!("http: HTTP {status}")),
                    Err(e) => got.fail(k, seq, format!("http: {e}")),
                }
            }
            got
        }));
    }
    let mut pacer = Pacer::new(plan.rate, plan.duration);
    let mut rng = Rng::seeded();
    let mut n = 0u64;
    if !plan.pick.is_empty() {
        'outer: while let Some(due) = pacer.due(plan.max_batch).await {
            for _ in 0..due {
                let key = plan.pick.next(&mut rng, n);
                n += 1;
                out.last_seq[key] += 1;
                if senders[key % workers]
                    .send((key, out.last_seq[key]))
                    .await
                    .is_err()
                {
                    break 'outer;
                }
            }
            pacer.done(due);
        }
    }
    drop(senders);
    for h in handles {
        if let Ok(got) = h.await {
            out.sent += got.sent;
            out.failed += got.failed;
            for (k, v) in got.failed_seqs {
                out.failed_seqs.entry(k).or_default().extend(v);
            }
            for (e, c) in got.errors {
                *out.errors.entry(e).or_default() += c;
            }
        }
    }
    Ok(finish(out, &pacer))
}

/// Publishes `plan` through a Pusher-compatible HTTP API (Sockudo): signed
/// `POST /apps/<id>/batch_events` from `connections` workers spread over `targets`. Each
/// worker sends what is queued for it, up to [`pusher::MAX_BATCH`] events per request, one
/// request at a time; messages for one key always take the same worker (order kept).
pub(crate) async fn run_pusher_api(
    plan: Plan,
    http: &reqwest::Client,
    targets: &[Target],
    app: &PusherArgs,
    connections: usize,
) -> anyhow::Result<Produced> {
    let secret = app.secret()?.to_string();
    let keys = plan.targets.names.len().max(1);
    let mut out = Produced {
        last_seq: vec![0; keys],
        ..Produced::default()
    };
    let channels: std::sync::Arc<Vec<String>> = std::sync::Arc::new(match plan.targets.kind {
        Kind::User => plan
            .targets
            .names
            .iter()
            .map(|u| pusher::user_channel(u))
            .collect(),
        Kind::Broadcast => vec![pusher::BROADCAST_CHANNEL.to_string()],
        Kind::Topic => {
            bail!("--producer pusher-api has no topics (its sessions join no topic channel)")
        }
    });
    if targets.is_empty() {
        bail!("--producer pusher-api needs a target");
    }
    let workers = connections.clamp(1, 256);
    let deadline = Instant::now() + Duration::from_secs_f64(plan.duration + 10.0);
    let mut senders = Vec::with_capacity(workers);
    let mut handles = Vec::with_capacity(workers);
    for w in 0..workers {
        let (tx, mut rx) = mpsc::channel::<(usize, u64)>(4096);
        senders.push(tx);
        let target = &targets[w % targets.len()];
        let addr = target.addr;
        let host = node_http::header(&target.authority, "the target's host")?;
        let http = http.clone();
        let channels = channels.clone();
        let pad = plan.pad.clone();
        let app = app.clone();
        let secret = secret.clone();
        handles.push(tokio::spawn(async move {
            let json = HeaderValue::from_static("application/json");
            let mut got = Produced::default();
            let mut batch: Vec<(usize, u64)> = Vec::with_capacity(pusher::MAX_BATCH);
            while let Some(first) = rx.recv().await {
                // Whatever else is already queued for this worker goes in the same request.
                batch.clear();
                batch.push(first);
                while batch.len() < pusher::MAX_BATCH {
                    match rx.try_recv() {
                        Ok(j) => batch.push(j),
                        Err(_) => break,
                    }
                }
                if Instant::now() > deadline {
                    for &(k, seq) in &batch {
                        got.fail(k, seq, "pusher-api: not sent before the deadline".into());
                    }
                    continue;
                }
                let payloads: Vec<String> = batch
                    .iter()
                    .map(|&(_, seq)| payload(seq, mono_ns(), &pad))
                    .collect();
                let body = pusher::batch_body(
                    batch
                        .iter()
                        .zip(&payloads)
                        .map(|(&(k, _), p)| (channels[k].as_str(), p.as_str())),
                );
                let path = pusher::signed_batch_path(&app, &secret, &body, unix_secs());
                let result = match node_http::url(addr, &path) {
                    Ok(url) => {
                        let req = http
                            .post(url)
                            .header(HOST, host.clone())
                            .header(CONTENT_TYPE, json.clone())
                            .body(body);
                        node_http::exchange(req).await
                    }
                    Err(e) => Err(format!("{e:#}")),
                };
                match result {
                    Ok((200, _)) => got.sent += batch.len() as u64,
                    Ok((status, text)) => {
                        let detail: String =
                            String::from_utf8_lossy(&text).chars().take(60).collect();
                        for &(k, seq) in &batch {
                            got.fail(k, seq, format!("pusher-api: HTTP {status} {detail}"));
                        }
                    }
                    Err(e) => {
                        for &(k, seq) in &batch {
                            got.fail(k, seq, format!("pusher-api: {e}"));
                        }
                    }
                }
            }
            got
        }));
    }
    let mut pacer = Pacer::new(plan.rate, plan.duration);
    let mut rng = Rng::seeded();
    let mut n = 0u64;
    if !plan.pick.is_empty() {
        'outer: while let Some(due) = pacer.due(plan.max_batch).await {
            for _ in 0..due {
                let key = plan.pick.next(&mut rng, n);
                n += 1;
                out.last_seq[key] += 1;
                if senders[key % workers]
                    .send((key, out.last_seq[key]))
                    .await
                    .is_err()
                {
                    break 'outer;
                }
            }
            pacer.done(due);
        }
    }
    drop(senders);
    for h in handles {
        if let Ok(got) = h.await {
            out.sent += got.sent;
            out.failed += got.failed;
            for (k, v) in got.failed_seqs {
                out.failed_seqs.entry(k).or_default().extend(v);
            }
            for (e, c) in got.errors {
                *out.errors.entry(e).or_default() += c;
            }
        }
    }
    Ok(finish(out, &pacer))
}

/// What an external producer reports when it is done.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ExternalExpect {
    pub(crate) sent: u64,
    #[serde(default)]
    pub(crate) per_user: Option<HashMap<String, u64>>,
    #[serde(default)]
    pub(crate) per_topic: Option<HashMap<String, u64>>,
}

/// Waits up to `timeout` for the external producer's file, then reads it.
pub(crate) async fn read_expect_file(
    path: &PathBuf,
    timeout: f64,
) -> anyhow::Result<ExternalExpect> {
    let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
    while !path.exists() {
        if Instant::now() > deadline {
            bail!(
                "the external producer did not write {} within {timeout} s after --duration",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The writer may still be writing: retry a parse failure for a moment.
    let mut last_err = None;
    for _ in 0..25 {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        match serde_json::from_str::<ExternalExpect>(&text) {
            Ok(e) => return Ok(e),
            Err(e) => last_err = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!(
        "{} is not {{\"sent\": n, \"per_user\"|\"per_topic\": {{...}}}}: {}",
        path.display(),
        last_err.map(|e| e.to_string()).unwrap_or_default()
    )
}

/// Expectations turned into the `Produced` shape: last sequence number per key.
pub(crate) fn produced_from_external(
    e: &ExternalExpect,
    targets: &Targets,
    elapsed_s: f64,
) -> Produced {
    let last_seq = match targets.kind {
        Kind::Broadcast => vec![e.sent],
        Kind::User | Kind::Topic => {
            let map = if targets.kind == Kind::User {
                e.per_user.as_ref()
            } else {
                e.per_topic.as_ref()
            };
            targets
                .names
                .iter()
                .map(|n| map.and_then(|m| m.get(n)).copied().unwrap_or(0))
                .collect()
        }
    };
    Produced {
        planned: e.sent,
        sent: e.sent,
        elapsed_s: round3(elapsed_s),
        achieved_rate: round3(e.sent as f64 / elapsed_s.max(1e-9)),
        last_seq,
        ..Produced::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pacer_releases_rate_times_duration() {
        let mut p = Pacer::new(2000.0, 0.2);
        let mut total = 0;
        while let Some(n) = p.due(100).await {
            p.done(n);
            total += n;
        }
        assert_eq!(total, 400);
        let el = p.start.elapsed().as_secs_f64();
        assert!((0.18..0.5).contains(&el), "took {el}");
    }

    #[test]
    fn external_expectations_map_to_keys() {
        let e: ExternalExpect =
            serde_json::from_str(r#"{"sent":5,"per_user":{"bench-1":3,"bench-0":2}}"#).unwrap(); // safe: test
        let t = Targets {
            kind: Kind::User,
            names: vec!["bench-0".into(), "bench-1".into(), "bench-2".into()],
        };
        assert_eq!(produced_from_external(&e, &t, 1.0).last_seq, vec![2, 3, 0]);
        let b = Targets {
            kind: Kind::Broadcast,
            names: vec![],
        };
        assert_eq!(produced_from_external(&e, &b, 1.0).last_seq, vec![5]);
    }

    #[test]
    fn channels_and_bodies() {
        let t = Targets {
            kind: Kind::Topic,
            names: vec!["t0".into()],
        };
        assert_eq!(t.channel("p", 0), "p:topic:{t0}");
        assert_eq!(t.http_prefix(0), r#"{"topic":"t0","data":"#);
    }
}
