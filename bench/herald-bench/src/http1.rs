//! A minimal HTTP/1.1 keep-alive client for the bench's own requests to a node
//! (`POST /api/publish`, `GET /metrics`). The node answers with Content-Length bodies; a
//! chunked answer is read too, in case a server in front of it re-frames responses.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response the bench accepts (a /metrics page is a few KiB).
const MAX_RESPONSE: usize = 8 << 20;

pub struct HttpConn {
    addr: SocketAddr,
    host: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    timeout: Duration,
}

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpConn {
    pub fn new(addr: SocketAddr, host: &str) -> Self {
        HttpConn {
            addr,
            host: host.to_string(),
            stream: None,
            buf: Vec::with_capacity(4096),
            timeout: Duration::from_secs(10),
        }
    }

    /// Sends one request and reads its response; reconnects once if the kept-alive
    /// connection turned out to be closed.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: &[u8],
    ) -> Result<Response, String> {
        let fresh = self.stream.is_none();
        match tokio::time::timeout(self.timeout, self.request_once(method, path, bearer, body))
            .await
        {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.stream = None;
                if fresh {
                    return Err(e);
                }
                match tokio::time::timeout(
                    self.timeout,
                    self.request_once(method, path, bearer, body),
                )
                .await
                {
                    Ok(r) => r.inspect_err(|_| self.stream = None),
                    Err(_) => {
                        self.stream = None;
                        Err("timeout".into())
                    }
                }
            }
            Err(_) => {
                self.stream = None;
                Err("timeout".into())
            }
        }
    }

    async fn request_once(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: &[u8],
    ) -> Result<Response, String> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = s.set_nodelay(true);
            self.stream = Some(s);
            self.buf.clear();
        }
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.host,
            body.len()
        );
        if !body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        if let Some(b) = bearer {
            head.push_str("Authorization: Bearer ");
            head.push_str(b);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        let stream = self.stream.as_mut().ok_or("not connected")?;
        stream
            .write_all(&req)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let (resp, keep) = read_response(stream, &mut self.buf).await?;
        if !keep {
            self.stream = None;
        }
        Ok(resp)
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    if buf.len() > MAX_RESPONSE {
        return Err("response too large".into());
    }
    let mut chunk = [0u8; 16 * 1024];
    let n = stream
        .read(&mut chunk)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if n == 0 {
        return Err("connection closed".into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response from `stream` (bytes already read are in `buf`); returns it and
/// whether the connection may be reused.
async fn read_response(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<(Response, bool), String> {
    let head_end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            break p;
        }
        fill(stream, buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    let mut keep = !status_line.starts_with("HTTP/1.0");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => {
                if value.eq_ignore_ascii_case("close") {
                    keep = false;
                } else if value.eq_ignore_ascii_case("keep-alive") {
                    keep = true;
                }
            }
            _ => {}
        }
    }
    buf.drain(..head_end + 4);
    let body = if chunked {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(p) = find(buf, b"\r\n") {
                    break p;
                }
                fill(stream, buf).await?;
            };
            let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| format!("bad chunk size {size_text:?}"))?;
            buf.drain(..line_end + 2);
            while buf.len() < size + 2 {
                fill(stream, buf).await?;
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
            if size == 0 {
                break;
            }
        }
        body
    } else if let Some(n) = length {
        while buf.len() < n {
            fill(stream, buf).await?;
        }
        buf.drain(..n).collect()
    } else {
        // No length: the body runs to the end of the connection.
        loop {
            match fill(stream, buf).await {
                Ok(()) => {}
                Err(e) if e == "connection closed" => break,
                Err(e) => return Err(e),
            }
        }
        keep = false;
        std::mem::take(buf)
    };
    Ok((Response { status, body }, keep))
}
