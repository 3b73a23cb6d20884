//! A raw-TCP server-sent-events client: sends exactly the request a test asks for, decodes
//! the chunked response and splits it into events, so tests see what a browser's
//! `EventSource` would (and can stop reading, to play a slow client).

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::node::Herald;
use super::WAIT;

/// One event of the stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
    pub id: Option<String>,
    pub retry: Option<u64>,
    /// A comment line (`: keep-alive`), for an event that is only that.
    pub comment: Option<String>,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
}

/// An open event stream.
pub struct Sse {
    pub stream: TcpStream,
    pub status: u16,
    /// The response head, lower-cased.
    pub head: String,
    /// Decoded body bytes not yet split into events.
    body: Vec<u8>,
    /// Raw bytes not yet de-chunked.
    raw: Vec<u8>,
    /// The response body was chunked (else it is read as it comes).
    chunked: bool,
}

impl Sse {
    /// `GET <path>` on `node` with extra header lines (`"Name: value"`).
    pub async fn open(node: &Herald, path: &str, headers: &[&str]) -> Sse {
        let stream = TcpStream::connect(("127.0.0.1", node.port))
            .await
            .expect("tcp connect");
        Self::open_on(stream, node.port, path, headers).await
    }

    /// The same on a socket the test set up (a tiny receive buffer, say).
    pub async fn open_on(mut stream: TcpStream, port: u16, path: &str, headers: &[&str]) -> Sse {
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
        );
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .expect("send request");
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .expect("response head in time")
                .expect("read response head");
            assert!(n > 0, "connection closed before the response head");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Sse {
            stream,
            status,
            chunked: head.contains("transfer-encoding: chunked"),
            head,
            body: Vec::new(),
            raw: buf[end..].to_vec(),
        }
    }

    /// Moves complete chunks from `raw` to `body`; false once the last chunk was seen.
    fn dechunk(&mut self) -> bool {
        if !self.chunked {
            self.body.append(&mut self.raw);
            return true;
        }
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return true;
            };
            let size_text = String::from_utf8_lossy(&self.raw[..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .expect("chunk size");
            if size == 0 {
                return false;
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return true;
            }
            self.body.extend_from_slice(&self.raw[start..start + size]);
            self.raw.drain(..start + size + 2);
        }
    }

    fn split_event(&mut self) -> Option<SseEvent> {
        let end = self.body.windows(2).position(|w| w == b"\n\n")?;
        let text = String::from_utf8_lossy(&self.body[..end]).to_string();
        self.body.drain(..end + 2);
        let mut e = SseEvent::default();
        let mut data = Vec::new();
        for line in text.lines() {
            if let Some(c) = line.strip_prefix(':') {
                e.comment = Some(c.trim().to_string());
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => e.event = value.to_string(),
                "data" => data.push(value.to_string()),
                "id" => e.id = Some(value.to_string()),
                "retry" => e.retry = value.parse().ok(),
                _ => {}
            }
        }
        e.data = data.join("\n");
        Some(e)
    }

    /// The next event; `None` when the stream ended (or nothing came within `timeout`).
    pub async fn next(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(e) = self.split_event() {
                return Some(e);
            }
            if !self.dechunk() {
                return self.split_event();
            }
            if let Some(e) = self.split_event() {
                return Some(e);
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) | Ok(Err(_)) | Ok(Ok(0)) => return None,
                Ok(Ok(n)) => self.raw.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next event named `name` (others, comments included, are skipped).
    pub async fn next_named(&mut self, name: &str) -> Option<SseEvent> {
        loop {
            let e = self.next(WAIT).await?;
            if e.event == name {
                return Some(e);
            }
        }
    }
}
