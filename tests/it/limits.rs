//! Connection-level limits (issue 13): the request head size cap (431), the cap on
//! connections that have not been answered yet (bare 503), running out of descriptors, the
//! open-file limit at start (through `prlimit`), the request body timeout (408), and
//! `/metrics` on its own listener. Every test runs the real binary over raw sockets; counts
//! and times are bounded.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// How a raw exchange ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The server closed the connection (FIN).
    Closed,
    /// The connection was reset, or a read failed.
    Reset,
    /// Still open when the deadline passed.
    Open,
}

/// Reads everything until the server closes the connection, or until `timeout`.
async fn read_to_close(stream: &mut TcpStream, timeout: Duration) -> (String, End) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = Vec::new();
    let end = loop {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) => break End::Closed,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(_)) => break End::Reset,
            Err(_) => break End::Open,
        }
    };
    (String::from_utf8_lossy(&buf).into_owned(), end)
}

/// Reads until `buf` holds `marker` (or panics after WAIT).
async fn read_until(stream: &mut TcpStream, marker: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut buf = Vec::new();
    while !String::from_utf8_lossy(&buf).contains(marker) {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    assert!(text.contains(marker), "no {marker:?} in {text:?}");
    text
}

async fn connect_raw(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect")
}

/// A request head of about `bytes` bytes (one long header), complete.
fn head_of(bytes: usize) -> String {
    let start = "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ";
    let pad = bytes.saturating_sub(start.len() + 4);
    format!("{start}{}\r\n\r\n", "a".repeat(pad))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_the_limit_gets_431_and_a_close() {
    let n = Herald::spawn(NodeOpts::standalone("hdr")).await;
    n.wait_ready().await;

    // Under the default 16 KiB: served.
    let mut s = connect_raw(n.port).await;
    s.write_all(head_of(12 * 1024).as_bytes()).await.unwrap();
    let ok = read_until(&mut s, "ok\n").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");

    // Over it, sent whole: hyper answers 431 and closes. The client's bytes beyond the
    // limit are never read, so the close may reach the client as a reset, but only after
    // the 431 (Linux keeps received data readable after a reset).
    let mut s = connect_raw(n.port).await;
    let _ = s.write_all(head_of(20 * 1024).as_bytes()).await;
    let (text, end) = read_to_close(&mut s, WAIT).await;
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "expected 431, got {text:?} ({end:?})"
    );
    assert_ne!(end, End::Open, "the connection is closed after the 431");

    // An unfinished head that keeps growing past the limit is cut as soon as it passes it,
    // not after the header timeout: what one connection can make the node buffer is bounded.
    let mut s = connect_raw(n.port).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut sent = 0;
    while sent < 64 * 1024 {
        if s.write_all(&[b'a'; 1024]).await.is_err() {
            break;
        }
        sent += 1024;
    }
    let (text, end) = read_to_close(&mut s, WAIT).await;
    assert!(text.starts_with("HTTP/1.1 431"), "{text:?} ({end:?})");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "cut by the size limit, not the 10 s header timeout"
    );

    // The limit is the flag's: 20 KiB passes at 32 KiB.
    let m = Herald::spawn(NodeOpts::standalone("hdr32").arg("--max-header-bytes", "32768")).await;
    let mut s = connect_raw(m.port).await;
    s.write_all(head_of(20 * 1024).as_bytes()).await.unwrap();
    let ok = read_until(&mut s, "ok\n").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    // The node is fine after all of it.
    assert!(n.ready().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_limit_below_hypers_floor_is_refused_at_start() {
    let out = std::process::Command::new(herald_bin())
        .args([
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--max-header-bytes",
            "4096",
        ])
        .output()
        .expect("run herald");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--max-header-bytes must be at least 8192"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_not_yet_answered_are_capped_and_the_rest_get_503() {
    const CAP: usize = 8;
    let n = Herald::spawn(
        NodeOpts::standalone("pending")
            .arg("--max-pending-connections", &CAP.to_string())
            .metrics_listener(),
    )
    .await;
    n.wait_ready().await;

    // Sessions do not hold a pending slot once upgraded.
    let mut sessions = Vec::new();
    for i in 0..3 {
        sessions.push(connect(&n, &format!("u{i}"), &[]).await);
    }
    // CAP connections that send half a request head and wait.
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut s = connect_raw(n.port).await;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        held.push(s);
    }
    eventually(WAIT, "pending gauge at the cap", || async {
        (n.metric("herald_connections_pending").await == CAP as f64).then_some(())
    })
    .await;

    // One more gets the bare 503 and a close, whatever it sends.
    let mut s = connect_raw(n.port).await;
    let _ = s
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let (text, end) = read_to_close(&mut s, WAIT).await;
    assert!(text.starts_with("HTTP/1.1 503"), "{text:?}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(text.contains(r#""error":"overloaded""#), "{text}");
    assert_eq!(end, End::Closed, "closed with a FIN after the answer");
    assert!(
        n.metric(r#"herald_connections_refused_total{reason="pending"}"#)
            .await
            >= 1.0
    );
    // Sessions already open are not affected.
    n.publish(serde_json::json!({"user": "u0", "data": "still here"}))
        .await;
    let m = recv_message(&mut sessions[0].ws, WAIT)
        .await
        .expect("a message");
    assert_eq!(m["data"], "still here");

    // Finishing one held request frees its slot; closing the others frees theirs.
    let mut first = held.remove(0);
    first.write_all(b"\r\n").await.unwrap();
    let ok = read_until(&mut first, "ok\n").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    drop(held);
    eventually(WAIT, "no connection pending", || async {
        (n.metric("herald_connections_pending").await == 0.0).then_some(())
    })
    .await;
    assert!(n.ready().await, "the main listener answers again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_out_of_descriptors_refuses_and_recovers() {
    // 300 descriptors: the caps and the reserve fit (20 + 20 + 136), but connections that
    // were answered and kept alive are counted by neither cap, so enough of them exhaust
    // the process's descriptors.
    let n = Herald::spawn(
        NodeOpts::standalone("nofd")
            .wrap(&["prlimit", "--nofile=300:300"])
            .arg("--max-connections", "20")
            .arg("--max-pending-connections", "20")
            .metrics_listener(),
    )
    .await;
    n.wait_ready().await;
    let mut kept = Vec::new();
    let mut refused = 0;
    for _ in 0..340 {
        let mut s = connect_raw(n.port).await;
        if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .is_err()
        {
            refused += 1;
            continue;
        }
        let mut buf = Vec::new();
        let answered = loop {
            let mut chunk = [0u8; 512];
            match tokio::time::timeout(WAIT, s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break false,
                Ok(Ok(k)) => {
                    buf.extend_from_slice(&chunk[..k]);
                    let text = String::from_utf8_lossy(&buf);
                    if text.starts_with("HTTP/1.1 200") && text.ends_with("ok\n") {
                        break true;
                    }
                    if text.starts_with("HTTP/1.1 503") && text.ends_with('}') {
                        break false;
                    }
                }
                Err(_) => panic!("no answer within {WAIT:?}: the accept loop is stuck"),
            }
        };
        if answered {
            kept.push(s);
        } else {
            refused += 1;
        }
    }
    assert!(
        kept.len() < 300,
        "{} kept: the limit did not apply",
        kept.len()
    );
    assert!(refused >= 40, "only {refused} refused");
    // Give descriptors back; the node serves again and has counted what happened.
    kept.truncate(kept.len() - 50);
    assert!(
        n.metric(r#"herald_accept_errors_total{kind="no_fds"}"#)
            .await
            >= 1.0
    );
    assert!(
        n.metric(r#"herald_connections_refused_total{reason="no_fds"}"#)
            .await
            >= 1.0
    );
    assert!(n.ready().await);
    drop(kept);
}

/// Runs `herald` through `prlimit` and returns its exit status and stderr; panics if it is
/// still running after WAIT.
fn run_limited(nofile: &str, args: &[&str]) -> (Option<i32>, String) {
    let log = std::env::temp_dir().join(format!(
        "herald-fd-{}-{}.log",
        std::process::id(),
        free_port()
    ));
    let mut child = std::process::Command::new("prlimit")
        .arg(format!("--nofile={nofile}"))
        .arg(herald_bin())
        .args(["--dev", "--listen", &format!("127.0.0.1:{}", free_port())])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("run prlimit");
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "herald did not exit: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    (status.code(), err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_that_cannot_fit_the_open_file_limit_refuse_the_start_when_asked() {
    // The soft limit is raised to the hard one first: 512, still short of 1000 + 4096.
    let (code, err) = run_limited(
        "256:512",
        &["--max-connections", "1000", "--fd-limit-policy", "refuse"],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("open-file limit is 512"), "{err}");
    assert!(err.contains("--max-connections 1000"), "{err}");
    // Below the reserve nothing can be served, whatever the policy.
    let (code, err) = run_limited("64:64", &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("too small to serve any connection"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_the_caps_are_clamped_under_the_raised_limit_with_a_warning() {
    let n = Herald::spawn(
        NodeOpts::standalone("clamp")
            .wrap(&["prlimit", "--nofile=256:1024"])
            .arg("--max-connections", "5000"),
    )
    .await;
    n.wait_ready().await;
    let pid = n.pid().expect("pid");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line");
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums, ["1024", "1024"], "soft raised to hard: {line}");
    assert_eq!(n.metric("herald_fd_limit").await, 1024.0);
    let max = n.metric("herald_connections_max").await;
    assert!(max > 0.0 && max < 1024.0, "clamped to {max}");
    let log = n.log_text();
    assert!(
        log.contains("--max-connections lowered from 5000 to"),
        "{log}"
    );
    // Without prlimit the machine's limit fits a small cap: nothing is clamped.
    let m = Herald::spawn(NodeOpts::standalone("noclamp").arg("--max-connections", "100")).await;
    assert_eq!(m.metric("herald_connections_max").await, 100.0);
    assert!(!m.log_text().contains("lowered from"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_request_body_gets_408_and_the_connection_closes() {
    let n = Herald::spawn(NodeOpts::standalone("body").arg("--body-timeout", "1s")).await;
    n.wait_ready().await;
    let user = token("slow-body", &[]);
    let cases = [
        ("/api/publish", API_KEY.to_string()),
        ("/ack", user.clone()),
        ("/api/inbox/slow-body/ack", API_KEY.to_string()),
    ];
    for (path, key) in cases {
        let mut s = connect_raw(n.port).await;
        let started = std::time::Instant::now();
        s.write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let (text, end) = read_to_close(&mut s, WAIT).await;
        assert!(text.starts_with("HTTP/1.1 408"), "{path}: {text:?}");
        assert!(text.contains(r#""error":"body_timeout""#), "{path}: {text}");
        assert_eq!(end, End::Closed, "{path}: the connection closes");
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{path}: answered before the timeout"
        );
    }
    // A body that arrives in time is served as before.
    n.publish(serde_json::json!({"user": "slow-body", "data": 1}))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_served_on_their_own_listener_only() {
    let n = Herald::spawn(NodeOpts::standalone("mlisten").metrics_listener()).await;
    n.wait_ready().await;
    let port = n.metrics_port.expect("metrics port");
    let r = n.http.get(n.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404, "the main listener has no /metrics");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "not_found");

    let r = n.http.get(n.metrics_url()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("herald_connections_max"), "{text}");
    let other = format!("http://127.0.0.1:{port}");
    let r = n.http.get(format!("{other}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 404, "only /metrics on the metrics listener");
    let r = n.http.get(format!("{other}/ws")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = n.http.post(n.metrics_url()).send().await.unwrap();
    assert_eq!(r.status(), 405);

    // The same address twice is a configuration error.
    let out = std::process::Command::new(herald_bin())
        .args([
            "--dev",
            "--listen",
            "127.0.0.1:9",
            "--metrics-listen",
            "127.0.0.1:9",
        ])
        .output()
        .expect("run herald");
    assert_eq!(out.status.code(), Some(2));
}
