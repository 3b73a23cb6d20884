//! herald's SSE transport seen from a client: `GET /sse?token=...` over a plain TCP
//! connection, the HTTP/1.1 response head, chunked transfer decoding and the event-stream
//! lines (events and `:keep-alive` comments). Written by hand rather than with an HTTP
//! client so that one held stream costs the bench a socket, a small read buffer and a few
//! strings: 10,000 of them fit in one bench process next to the node being measured.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head accepted (herald's is a few hundred bytes).
const MAX_HEAD: usize = 8 * 1024;
/// Largest event or line accepted before the stream is treated as broken.
const MAX_LINE: usize = 1 << 20;

/// One item of an event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SseItem {
    /// A dispatched event: its `event:` name ("message" when absent), `data:` lines joined
    /// with '\n', and its `id:` if it had one.
    Event {
        event: String,
        data: String,
        id: Option<String>,
    },
    /// A comment line (`:keep-alive`), without the colon.
    Comment(String),
}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// This many data bytes of the current chunk are still to come.
    Data(usize),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The last (zero-size) chunk was read: the body is over.
    Done,
    /// No chunked encoding: the body runs until the connection closes.
    Identity,
}

/// The body decoder and event parser, kept apart from the socket so it can be tested.
#[derive(Debug)]
pub(crate) struct SseParser {
    /// Bytes read from the socket and not decoded yet.
    raw: Vec<u8>,
    chunk: Chunk,
    /// Decoded body bytes not yet split into lines.
    body: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
    id: Option<String>,
}

impl SseParser {
    pub(crate) fn new(chunked: bool) -> Self {
        SseParser {
            raw: Vec::new(),
            chunk: if chunked {
                Chunk::Size
            } else {
                Chunk::Identity
            },
            body: Vec::new(),
            event: None,
            data: None,
            id: None,
        }
    }

    /// Feeds bytes read from the connection.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        self.raw.extend_from_slice(bytes);
    }

    /// The body has ended (the last chunk arrived).
    pub(crate) fn finished(&self) -> bool {
        self.chunk == Chunk::Done
    }

    /// Moves what the chunked framing allows from `raw` to `body`.
    fn decode(&mut self) -> Result<(), String> {
        loop {
            match self.chunk {
                Chunk::Identity => {
                    self.body.append(&mut self.raw);
                    return Ok(());
                }
                Chunk::Done => {
                    self.raw.clear();
                    return Ok(());
                }
                Chunk::Size => {
                    let Some(end) = find(&self.raw, b"\r\n") else {
                        if self.raw.len() > 1024 {
                            return Err("chunk size line too long".into());
                        }
                        return Ok(());
                    };
                    let line = std::str::from_utf8(&self.raw[..end])
                        .map_err(|_| "chunk size not ASCII".to_string())?;
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(hex, 16)
                        .map_err(|_| format!("bad chunk size {hex:?}"))?;
                    self.raw.drain(..end + 2);
                    self.chunk = if size == 0 {
                        Chunk::Done
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    if self.raw.is_empty() {
                        return Ok(());
                    }
                    let n = left.min(self.raw.len());
                    self.body.extend(self.raw.drain(..n));
                    self.chunk = if n == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - n)
                    };
                }
                Chunk::DataEnd => {
                    if self.raw.len() < 2 {
                        return Ok(());
                    }
                    if &self.raw[..2] != b"\r\n" {
                        return Err("no CRLF after chunk data".into());
                    }
                    self.raw.drain(..2);
                    self.chunk = Chunk::Size;
                }
            }
        }
    }

    /// The next complete item, if the bytes fed so far hold one.
    pub(crate) fn next_item(&mut self) -> Result<Option<SseItem>, String> {
        self.decode()?;
        loop {
            let Some(end) = self.body.iter().position(|&b| b == b'\n') else {
                if self.body.len() > MAX_LINE {
                    return Err("event line too long".into());
                }
                return Ok(None);
            };
            let mut line: Vec<u8> = self.body.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8(line).map_err(|_| "event line not UTF-8".to_string())?;
            if line.is_empty() {
                // Dispatch: only an event with data is one (a lone `retry:` is not).
                let event = self.event.take();
                let id = self.id.take();
                if let Some(data) = self.data.take() {
                    return Ok(Some(SseItem::Event {
                        event: event.unwrap_or_else(|| "message".into()),
                        data,
                        id,
                    }));
                }
                continue;
            }
            if let Some(comment) = line.strip_prefix(':') {
                return Ok(Some(SseItem::Comment(comment.trim_start().to_string())));
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_str(), ""),
            };
            match field {
                "event" => self.event = Some(value.to_string()),
                "id" => self.id = Some(value.to_string()),
                "data" => match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => self.data = Some(value.to_string()),
                },
                // retry: and unknown fields change nothing a bench session needs.
                _ => {}
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One open event stream.
pub(crate) struct SseConn {
    stream: TcpStream,
    parser: SseParser,
    /// Read buffer, allocated once per stream.
    buf: Box<[u8]>,
}

impl SseConn {
    /// Sends `GET <path_and_query>` to `authority` over `stream` and reads the response
    /// head; anything but a 200 with an event stream is an error ("handshake: HTTP 401").
    pub(crate) async fn start(
        mut stream: TcpStream,
        authority: &str,
        path_and_query: &str,
        read_buffer: usize,
    ) -> Result<Self, String> {
        let request = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/event-stream\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("handshake: write: {e}"))?;
        let mut buf = vec![0u8; read_buffer.max(256)].into_boxed_slice();
        let mut head = Vec::new();
        let end = loop {
            if let Some(end) = find(&head, b"\r\n\r\n") {
                break end;
            }
            if head.len() > MAX_HEAD {
                return Err("handshake: response head too large".into());
            }
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("handshake: read: {e}"))?;
            if n == 0 {
                return Err("handshake: connection ended".into());
            }
            head.extend_from_slice(&buf[..n]);
        };
        let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
        let status = text
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string();
        if status != "200" {
            return Err(format!("handshake: HTTP {status}"));
        }
        if !text.contains("content-type: text/event-stream") {
            return Err("handshake: not an event stream".into());
        }
        let chunked = text
            .lines()
            .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
        let mut parser = SseParser::new(chunked);
        parser.feed(&head[end + 4..]);
        Ok(SseConn {
            stream,
            parser,
            buf,
        })
    }

    /// The next item; `Ok(None)` when the stream ended (last chunk, or the connection was
    /// closed by the node).
    pub(crate) async fn next(&mut self) -> Result<Option<SseItem>, String> {
        loop {
            if let Some(item) = self.parser.next_item()? {
                return Ok(Some(item));
            }
            if self.parser.finished() {
                return Ok(None);
            }
            let n = self
                .stream
                .read(&mut self.buf)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(None);
            }
            self.parser.feed(&self.buf[..n]);
        }
    }

    /// Reads until the welcome event (herald sends `retry:` and then the welcome).
    pub(crate) async fn welcome(&mut self) -> Result<(), String> {
        loop {
            match self.next().await {
                Ok(Some(SseItem::Event { event, .. })) if event == "welcome" => return Ok(()),
                Ok(Some(SseItem::Event { event, data, .. })) if event == "close" => {
                    return Err(format!("welcome: closed: {data}"))
                }
                Ok(Some(SseItem::Event { event, .. })) => {
                    return Err(format!("welcome: first event is {event:?}"))
                }
                Ok(Some(SseItem::Comment(_))) => {}
                Ok(None) => return Err("welcome: stream ended".into()),
                Err(e) => return Err(format!("welcome: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(p: &mut SseParser) -> Vec<SseItem> {
        let mut v = Vec::new();
        while let Some(i) = p.next_item().unwrap() {
            // safe: test
            v.push(i);
        }
        v
    }

    #[test]
    fn chunked_events_and_comments_split_anywhere() {
        let body = "retry:3000\n\nevent:welcome\ndata:{\"type\":\"welcome\"}\n\n:keep-alive\n\nevent:message\nid:5-1\ndata:{\"a\":1}\n\n";
        // Two chunks, then the end.
        let (a, b) = body.split_at(30);
        let wire = format!("{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n", a.len(), b.len());
        // Fed one byte at a time: every state must wait for more input correctly.
        let mut p = SseParser::new(true);
        let mut got = Vec::new();
        for byte in wire.as_bytes() {
            p.feed(std::slice::from_ref(byte));
            got.extend(items(&mut p));
        }
        assert!(p.finished());
        assert_eq!(
            got,
            vec![
                SseItem::Event {
                    event: "welcome".into(),
                    data: "{\"type\":\"welcome\"}".into(),
                    id: None
                },
                SseItem::Comment("keep-alive".into()),
                SseItem::Event {
                    event: "message".into(),
                    data: "{\"a\":1}".into(),
                    id: Some("5-1".into())
                },
            ]
        );
    }

    #[test]
    fn identity_bodies_and_multiline_data() {
        let mut p = SseParser::new(false);
        p.feed(b"data: one\r\ndata:two\r\n\r\n");
        assert_eq!(
            items(&mut p),
            vec![SseItem::Event {
                event: "message".into(),
                data: "one\ntwo".into(),
                id: None
            }]
        );
        assert!(!p.finished());
    }

    #[test]
    fn broken_framing_is_an_error() {
        let mut p = SseParser::new(true);
        p.feed(b"zz\r\n");
        assert!(p.next_item().is_err());
        let mut p = SseParser::new(true);
        p.feed(b"2\r\nabXY");
        assert!(p.next_item().is_err());
    }
}
