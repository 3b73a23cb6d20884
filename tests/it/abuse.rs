//! Load-shaped faults: slow consumers under a flood, a churn soak (the original OOM bug),
//! and hostile input. Bounds here are generous on purpose: precise numbers come from the
//! benchmarks, these tests prove that state does not pile up and nothing panics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

/// Resident set size of a process in bytes, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Samples a process's RSS every 20 ms until dropped; keeps the peak.
struct RssPeak {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssPeak {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(rss_bytes(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        RssPeak { peak, stop }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooded_slow_consumers_are_cut_with_bounded_memory_and_others_unaffected() {
    const SLOW: usize = 20;
    const OUTBOX_BYTES: u64 = 256 * 1024;
    let redis = RedisServer::start();
    let a = Herald::spawn(
        NodeOpts::cluster(&redis, "sc", "a")
            .arg("--tcp-send-buffer", "32768")
            .arg("--outbox-messages", "64")
            .arg("--outbox-bytes", &OUTBOX_BYTES.to_string()),
    )
    .await;
    a.wait_ready().await;
    let pid = a.pid().expect("pid");

    // Slow clients: connected with a tiny receive buffer, welcomed, then never read again.
    let mut slow = Vec::new();
    for i in 0..SLOW {
        slow.push(connect_small_rcvbuf(&a, &format!("slow-{i}")).await.ws);
    }
    let mut fast = connect(&a, "fast", &[]).await;
    let before = rss_bytes(pid);
    let peak = RssPeak::start(pid);

    // Flood every slow user's channel from a producer thread: 20 x 150 x 16 KiB = 47 MiB.
    let url = redis.url();
    let producer = std::thread::spawn(move || {
        let client = redis::Client::open(url).expect("client");
        let mut conn = client.get_connection().expect("conn");
        let payload = vec![b'z'; 16 * 1024];
        for _ in 0..150 {
            for i in 0..SLOW {
                let _: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                    .arg(format!("sc:user:{{slow-{i}}}"))
                    .arg(&payload)
                    .query(&mut conn);
            }
        }
    });

    // While the flood runs, another user's messages still arrive promptly.
    let mut worst = Duration::ZERO;
    for i in 0..10 {
        let sent = Instant::now();
        a.publish(json!({"user": "fast", "data": i})).await;
        let m = recv_message(&mut fast.ws, WAIT)
            .await
            .expect("fast user still served");
        assert_eq!(m["data"], i);
        worst = worst.max(sent.elapsed());
    }
    producer.join().expect("producer");
    // Generous: this proves "unaffected", the benchmark measures it precisely.
    assert!(
        worst < Duration::from_secs(3),
        "fast user's worst latency {worst:?}"
    );

    eventually(WAIT, "every slow consumer disconnected", || async {
        (a.metric("herald_slow_consumer_disconnects_total").await >= SLOW as f64).then_some(())
    })
    .await;
    eventually(WAIT, "slow users gone from presence", || async {
        let mut online = 0;
        for i in 0..SLOW {
            online += a.presence_sessions(&format!("slow-{i}")).await.len();
        }
        (online == 0).then_some(())
    })
    .await;
    // Bound: each slow session may hold its outbox bytes plus the same again in the socket
    // write buffer; 48 MiB covers allocator slack and the fast path.
    let bound = SLOW as u64 * 2 * (OUTBOX_BYTES + 64 * 1024) + 48 * 1024 * 1024;
    let growth = peak.peak().saturating_sub(before);
    assert!(
        growth < bound,
        "RSS grew {} KiB during the flood, bound {} KiB",
        growth / 1024,
        bound / 1024
    );
    drop(slow);
    assert!(a.ready().await);
}

/// One churn client: connect, maybe read the welcome, leave in one of three ways.
async fn churn_once(node_port: u16, user: &str, how: u8) {
    let url = format!(
        "ws://127.0.0.1:{node_port}/ws?token={}",
        token(user, &["churn"])
    );
    let Ok(mut ws) = open(&url).await else {
        return;
    };
    match how % 3 {
        0 => {
            let _ = recv_json(&mut ws, Duration::from_secs(5)).await;
            let _ = ws.close(None).await;
        }
        1 => {
            // Abrupt reset: SO_LINGER 0 makes the close send RST.
            if let MaybeTlsStream::Plain(tcp) = ws.get_ref() {
                let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
            }
            drop(ws);
        }
        _ => {
            let _ = recv_json(&mut ws, Duration::from_secs(5)).await;
            drop(ws);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_soak_leaves_no_sessions_no_memory_growth_and_no_keys() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "ch", "a")).await;
    a.wait_ready().await;
    let pid = a.pid().expect("pid");
    let port = a.port;

    let soak = |secs: u64| async move {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let workers: Vec<_> = (0..16)
            .map(|w| {
                tokio::spawn(async move {
                    let mut n = 0u64;
                    // Bounded in time and in count.
                    while Instant::now() < deadline && n < 5_000 {
                        churn_once(
                            port,
                            &format!("churn-{}", (w * 131 + n) % 300),
                            (w + n) as u8,
                        )
                        .await;
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let mut total = 0;
        for w in workers {
            total += w.await.expect("worker");
        }
        total
    };

    // Warm up allocator and runtime, then take the baseline.
    soak(2).await;
    eventually(WAIT, "warm-up sessions closed", || async {
        (a.metric("herald_connections").await == 0.0).then_some(())
    })
    .await;
    let baseline = rss_bytes(pid);
    let cycles = soak(10).await;
    assert!(
        cycles > 200,
        "soak too small to mean anything: {cycles} cycles"
    );

    eventually(WAIT, "node registry empty after the soak", || async {
        let stats = a.stats().await;
        (a.metric("herald_connections").await == 0.0 && stats["connections"] == 0).then_some(())
    })
    .await;
    let after = rss_bytes(pid);
    assert!(
        after < baseline + 16 * 1024 * 1024,
        "RSS {} KiB after {cycles} churn cycles, baseline {} KiB",
        after / 1024,
        baseline / 1024
    );
    // Sessions close cleanly or by reset; either way nothing of theirs stays in Redis.
    eventually(
        Duration::from_secs(3) + WAIT,
        "no presence keys left",
        || async {
            let keys = redis.keys("ch:presence");
            let users: i64 = redis.cmd(&["ZCARD", "ch:online:{ch:events}"]).unwrap_or(-1);
            (keys.is_empty() && users == 0).then_some(())
        },
    )
    .await;
    assert_eq!(a.stats().await["users"], 0);
    assert!(a.ready().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_redis_payloads_are_dropped_and_counted_never_delivered_half() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "bi", "a").arg("--max-message-bytes", "1024"))
        .await;
    a.wait_ready().await;
    let mut c = connect(&a, "victim", &[]).await;

    redis.publish("bi:ctl", b"\xff\xfe not json");
    redis.publish("bi:ctl", br#"{"op":"explode"}"#);
    redis.publish("bi:user:{victim}", &[b'x'; 1025]);
    redis.publish("bi:user:{victim}", b"\xff\xfe\x00binary");
    redis.publish("bi:user:{victim}", br#"{"unterminated": "#);
    redis.publish("bi:user:{victim}", b"last");

    let first = recv_message(&mut c.ws, WAIT)
        .await
        .expect("binary payload as text");
    assert!(first["data"].is_string());
    let second = recv_message(&mut c.ws, WAIT)
        .await
        .expect("broken JSON as text");
    assert_eq!(second["data"], r#"{"unterminated": "#);
    assert_eq!(
        recv_message(&mut c.ws, WAIT).await.expect("last")["data"],
        "last"
    );
    assert!(
        a.metric("herald_messages_dropped_total{reason=\"oversize\"}")
            .await
            >= 1.0
    );
    assert!(
        a.metric("herald_messages_dropped_total{reason=\"bad_control\"}")
            .await
            >= 2.0
    );
    assert!(a.ready().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_get_close_codes_and_the_node_stays_ready() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "hc", "a")).await;
    a.wait_ready().await;

    // Invalid UTF-8 in a text frame: 1007.
    let mut c = connect(&a, "u1", &[]).await;
    let frame = Frame::message(vec![0xff, 0xfe, 0xfd], OpCode::Data(Data::Text), true);
    c.ws.send(Message::Frame(frame))
        .await
        .expect("send raw frame");
    assert_eq!(expect_close(&mut c.ws, WAIT).await, Ended::Close(1007));

    // A flood of pings of both kinds: every application ping is answered, the session lives.
    let mut c = connect(&a, "u2", &[]).await;
    for _ in 0..2_000 {
        c.ws.feed(Message::Ping(Default::default()))
            .await
            .expect("ping");
        c.ws.feed(Message::text(r#"{"type":"ping"}"#))
            .await
            .expect("app ping");
    }
    c.ws.flush().await.expect("flush");
    let mut pongs = 0;
    while pongs < 2_000 {
        let v = recv_json(&mut c.ws, WAIT).await.expect("pong");
        if v["type"] == "pong" {
            pongs += 1;
        }
    }
    a.publish(json!({"user": "u2", "data": "alive"})).await;
    assert_eq!(
        recv_message(&mut c.ws, WAIT).await.expect("alive")["data"],
        "alive"
    );

    // Thousands of upgrades with bad tokens: all refused before upgrade, all counted.
    let http = reqwest::Client::new();
    let bad = futures_util::stream::iter(0..2_000)
        .map(|i| {
            let http = http.clone();
            let url = a.url(&format!("/ws?token=bad.{i}.token"));
            async move {
                http.get(url)
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket")
                    .header("sec-websocket-version", "13")
                    .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<u16>>()
        .await;
    assert!(bad.iter().all(|s| *s == 401), "every bad token gets 401");
    assert!(a.metric("herald_upgrades_rejected_total").await >= 2_000.0);

    // Absurd query strings: a clear 4xx, never a crash.
    for q in [
        "?token=%ZZ%ZZ",
        "?token=a&token=b&token=c",
        "?=&&&==&token",
        &format!("?token={}", "x".repeat(60_000)),
    ] {
        let status = http
            .get(a.url(&format!("/ws{q}")))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        assert!(
            (400..500).contains(&status),
            "query {:.40} gave {status}",
            q
        );
    }
    let huge = format!("/ws?token={}", "y".repeat(2_000_000));
    let status = http
        .get(a.url(&huge))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    assert!(
        status == 0 || (400..500).contains(&status),
        "huge query gave {status}"
    );

    assert!(a.ready().await, "node must stay ready");
    assert!(!a.log_text().contains("panicked"), "node log shows a panic");
}
