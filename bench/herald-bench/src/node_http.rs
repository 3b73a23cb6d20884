//! The bench's own HTTP requests to a node (`POST /api/publish`, `GET /metrics`), made with
//! reqwest. One client is shared per run: its pool keeps connections alive between
//! requests. Requests go to the already resolved (and loopback-checked) socket address with
//! the original `Host`, never through a proxy and never to a redirect's location.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use reqwest::header::HeaderValue;

/// Time for one whole request: connect (when no pooled connection is free), send, and read
/// the response.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest response the bench accepts (a /metrics page is a few KiB).
const MAX_RESPONSE: usize = 8 << 20;

/// The client for one run (cheap to clone: clones share the pool).
pub(crate) fn client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true)
        // herald-bench only sends traffic to loopback addresses: no HTTP_PROXY, no redirects.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("cannot build the HTTP client")
}

/// `http://<addr><path>`; `path` starts with '/' and may hold a query.
pub(crate) fn url(addr: SocketAddr, path: &str) -> anyhow::Result<reqwest::Url> {
    let raw = format!("http://{addr}{path}");
    reqwest::Url::parse(&raw).with_context(|| format!("bad URL {raw:?}"))
}

/// A `Host` (or other) header value from text given on the command line.
pub(crate) fn header(value: &str, what: &str) -> anyhow::Result<HeaderValue> {
    HeaderValue::from_str(value).with_context(|| format!("{what} is not a valid header value"))
}

/// Sends `req` and reads the whole response, so that its connection goes back to the pool.
/// Returns the status and the body, or a short description of the failure (short enough to
/// count failures by).
pub(crate) async fn exchange(req: reqwest::RequestBuilder) -> Result<(u16, Vec<u8>), String> {
    let mut resp = req.send().await.map_err(|e| describe(&e))?;
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e))? {
        if body.len() + chunk.len() > MAX_RESPONSE {
            return Err("response too large".into());
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, body))
}

/// "timeout", "connect: <cause>", "read: <cause>" or "send: <cause>", where the cause is the
/// innermost error (e.g. "Connection refused (os error 111)"); no URL in it.
fn describe(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    let cause = cause.to_string();
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        format!("connect: {cause}")
    } else if e.is_body() || e.is_decode() {
        format!("read: {cause}")
    } else {
        format!("send: {cause}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_the_address_and_path() {
        let v4 = url("127.0.0.1:8080".parse().unwrap(), "/metrics?x=1").unwrap(); // safe: test
        assert_eq!(v4.as_str(), "http://127.0.0.1:8080/metrics?x=1");
        let v6 = url("[::1]:9".parse().unwrap(), "/api/publish").unwrap(); // safe: test
        assert_eq!(v6.as_str(), "http://[::1]:9/api/publish");
    }

    /// An HTTP/1.1 server answering every request with 200 "ok"; returns its address and a
    /// receiver of (connection number, request head).
    async fn tiny_server() -> (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<(usize, String)>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(); // safe: test
        let addr = listener.local_addr().unwrap(); // safe: test
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for conn in 0..16 {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(conn, s, tx.clone()));
            }
        });
        (addr, rx)
    }

    async fn serve(
        conn: usize,
        mut s: tokio::net::TcpStream,
        tx: tokio::sync::mpsc::UnboundedSender<(usize, String)>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap()); // safe: test
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await.unwrap(); // safe: test
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..end + 4 + len);
            let _ = tx.send((conn, head));
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap(); // safe: test
        }
    }

    #[tokio::test]
    async fn requests_reuse_one_connection_and_carry_host_and_auth() {
        let (addr, mut rx) = tiny_server().await;
        let c = client().unwrap(); // safe: test
        let host = header("node.test:1", "host").unwrap(); // safe: test
        let auth = header("Bearer k", "key").unwrap(); // safe: test
        for _ in 0..3 {
            let req = c
                .post(url(addr, "/api/publish").unwrap()) // safe: test
                .header(reqwest::header::HOST, host.clone())
                .header(reqwest::header::AUTHORIZATION, auth.clone())
                .body("{}");
            assert_eq!(exchange(req).await, Ok((200, b"ok".to_vec())));
        }
        for _ in 0..3 {
            let (conn, head) = rx.recv().await.unwrap(); // safe: test
            assert_eq!(conn, 0, "a new connection was opened");
            assert!(head.starts_with("post /api/publish http/1.1"), "{head}");
            assert!(head.contains("\r\nhost: node.test:1"), "{head}");
            assert!(head.contains("\r\nauthorization: bearer k"), "{head}");
            assert!(head.contains("\r\ncontent-length: 2"), "{head}");
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_described_without_the_url() {
        // Bind then drop a listener: its port is free and nothing accepts on it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap() // safe: test
            .local_addr()
            .unwrap(); // safe: test
        let c = client().unwrap(); // safe: test
        let err = exchange(c.get(url(addr, "/metrics").unwrap())) // safe: test
            .await
            .unwrap_err(); // safe: test
        assert!(err.starts_with("connect: "), "{err}");
        assert!(!err.contains("127.0.0.1"), "{err}");
    }
}
