//! What the Redis failover tests (Sentinel and Cluster) share: a steady producer of durable
//! and plain messages, a reader that records what a client got, and a watch of a node's
//! not-ready window.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::{eventually, Herald, Ws, API_KEY, WAIT};

/// What one client received, read by its own task.
#[derive(Default)]
pub struct Received {
    /// Durable messages: (inbox id, data).
    pub durable: Vec<(String, i64)>,
    /// Plain messages' data.
    pub plain: Vec<i64>,
    pub gaps: Vec<Value>,
    /// How the session ended, if it did (a close code, or 0 for a dropped connection).
    pub ended: Option<u16>,
}

impl Received {
    /// Asserts that the session got no gap frame and exactly `inbox`'s durable messages, in
    /// order, once each; returns how many of the accepted plain messages `plain_ok` it did
    /// not get.
    pub fn check_inbox(&self, name: &str, inbox: &[String], plain_ok: &[i64]) -> usize {
        assert!(
            self.gaps.is_empty(),
            "gap frames on {name}: {:?}",
            self.gaps
        );
        let ids: Vec<&String> = self.durable.iter().map(|(id, _)| id).collect();
        let want: Vec<&String> = inbox.iter().collect();
        assert_eq!(
            ids, want,
            "the session on {name} received the inbox, in order, once each"
        );
        let seen: BTreeSet<i64> = self.plain.iter().copied().collect();
        plain_ok.iter().filter(|p| !seen.contains(p)).count()
    }
}

/// Waits until what the session on node `name` received satisfies `done`; fails the test
/// at once if the session ended meanwhile.
pub async fn wait_received(
    got: &Mutex<Received>,
    name: &str,
    what: &str,
    done: impl Fn(&Received) -> bool,
) {
    eventually(WAIT, &format!("the session on {name} {what}"), || async {
        let r = got.lock().unwrap();
        assert!(
            r.ended.is_none(),
            "the session on {name} ended: {:?}",
            r.ended
        );
        done(&r).then_some(())
    })
    .await;
}

/// Reads `ws` until `stop`, recording every message.
pub fn spawn_reader(
    mut ws: Ws,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Received>>, tokio::task::JoinHandle<()>) {
    let got = Arc::new(Mutex::new(Received::default()));
    let out = got.clone();
    let task = tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let next = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                Err(_) => continue,
                Ok(n) => n,
            };
            let text = match next {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(f))) => {
                    out.lock().unwrap().ended = Some(f.map(|f| u16::from(f.code)).unwrap_or(1005));
                    return;
                }
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => {
                    out.lock().unwrap().ended = Some(0);
                    return;
                }
            };
            let v: Value = serde_json::from_str(text.as_str()).expect("json frame");
            let mut r = out.lock().unwrap();
            match v["type"].as_str() {
                Some("message") => match v["id"].as_str() {
                    Some(id) => r
                        .durable
                        .push((id.to_string(), v["data"]["k"].as_i64().expect("k"))),
                    None => r.plain.push(v["data"]["p"].as_i64().expect("p")),
                },
                Some("gap") => r.gaps.push(v),
                _ => {}
            }
        }
    });
    (got, task)
}

/// When a node's /readyz first failed after the kill and when it was 200 again, polled
/// every 50 ms from the kill on, for at most `bound` + `WAIT`.
pub async fn not_ready_window(
    node: Arc<Herald>,
    since: Instant,
    bound: Duration,
) -> (Option<Duration>, Option<Duration>) {
    let mut down = None;
    let deadline = since + bound + WAIT;
    while Instant::now() < deadline {
        let ready = node.ready().await;
        match (down, ready) {
            (None, false) => down = Some(since.elapsed()),
            (Some(_), true) => return (down, Some(since.elapsed())),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (down, None)
}

/// What a [`Producer`] got accepted.
pub struct Produced {
    /// Durable messages: (data `k`, inbox id), in the order they were accepted.
    pub durable: Vec<(i64, String)>,
    /// Plain messages' data `p` that a node accepted.
    pub plain_ok: Vec<i64>,
    /// When each of `plain_ok` was accepted (the reply arrived), in the same order.
    pub plain_at: Vec<Instant>,
    /// Durable attempts a node refused (retried with the same idempotency key).
    pub refused: usize,
}

/// A steady producer: every 50 ms one durable message to `user` (retried with its
/// idempotency key until a node accepts it) and one plain message (not retried),
/// alternating between two nodes. Bounded in count (3,000 attempts) and time (90 s).
pub struct Producer {
    accepted: Arc<AtomicUsize>,
    attempts: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Produced>,
}

impl Producer {
    pub fn start(a: Arc<Herald>, b: Arc<Herald>, user: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let attempts = Arc::new(AtomicUsize::new(0));
        let user = user.to_string();
        let task = {
            let (stop, accepted, attempts) = (stop.clone(), accepted.clone(), attempts.clone());
            tokio::spawn(async move {
                let mut out = Produced {
                    durable: Vec::new(),
                    plain_ok: Vec::new(),
                    plain_at: Vec::new(),
                    refused: 0,
                };
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                let deadline = Instant::now() + Duration::from_secs(90);
                let mut k = 0i64;
                let mut attempt = 0usize;
                while !stop.load(Ordering::Relaxed) && attempt < 3000 && Instant::now() < deadline {
                    tick.tick().await;
                    attempt += 1;
                    attempts.store(attempt, Ordering::Relaxed);
                    let node = if attempt.is_multiple_of(2) { &a } else { &b };
                    let body = json!({"user": user, "durable": true, "data": {"k": k},
                                      "idempotency_key": format!("k-{k}")});
                    match post(node, &body).await {
                        Some(v) => {
                            let id = v["ids"][user.as_str()].as_str().expect("id").to_string();
                            out.durable.push((k, id));
                            accepted.fetch_add(1, Ordering::Relaxed);
                            k += 1;
                        }
                        None => out.refused += 1,
                    }
                    let p = attempt as i64;
                    if post(node, &json!({"user": user, "data": {"p": p}}))
                        .await
                        .is_some()
                    {
                        out.plain_ok.push(p);
                        out.plain_at.push(Instant::now());
                    }
                }
                out
            })
        };
        Self {
            accepted,
            attempts,
            stop,
            task,
        }
    }

    /// Durable messages accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Ticks started so far (each publishes one durable attempt and one plain message).
    pub fn attempts(&self) -> usize {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Stops publishing and returns what was accepted.
    pub async fn finish(self) -> Produced {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("producer task")
    }
}

/// `POST /api/publish` on `node`: the reply body when it was a 200.
async fn post(node: &Herald, body: &Value) -> Option<Value> {
    let r = node
        .http
        .post(node.url("/api/publish"))
        .bearer_auth(API_KEY)
        .json(body)
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    Some(r.json().await.expect("publish body"))
}
