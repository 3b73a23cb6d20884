//! What differs between the two protocols the bench speaks: herald's own JSON frames, and
//! Engine.IO v4 / Socket.IO v5 text frames over a plain WebSocket (for comparing against a
//! Socket.IO server that publishes the same payloads as `42["notify",{...}]`).

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Protocol {
    /// herald: GET /ws?token=..., welcome frame, {"type":"message",...,"data":{...}}.
    Herald,
    /// Engine.IO v4 / Socket.IO v5 over WebSocket: GET /socket.io/?EIO=4&transport=websocket
    /// &token=..., open packet `0{...}`, client `40`, server `40{...}`, events
    /// `42["notify",{...}]`, Engine.IO ping `2` answered with `3`.
    Socketio,
}

impl Protocol {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Protocol::Herald => "herald",
            Protocol::Socketio => "socketio",
        }
    }

    /// Path used when a target URL has none.
    pub(crate) fn default_path(self) -> &'static str {
        match self {
            Protocol::Herald => "/ws",
            Protocol::Socketio => "/socket.io/",
        }
    }
}

/// Builds the WebSocket URL of one session. `token` must already be URL-safe (a JWT is; a
/// --dev user id of the bench's own making is too).
pub(crate) fn session_url(
    protocol: Protocol,
    base: &str,
    token: &str,
    since: Option<&str>,
    dev_topics: Option<&str>,
) -> String {
    let mut url = match protocol {
        Protocol::Herald => format!("{base}?token={token}"),
        Protocol::Socketio => format!("{base}?EIO=4&transport=websocket&token={token}"),
    };
    if let Some(s) = since {
        url.push_str("&since=");
        url.push_str(s);
    }
    if let Some(t) = dev_topics {
        url.push_str("&topics=");
        url.push_str(t);
    }
    url
}

pub(crate) type Ws = WebSocketStream<TcpStream>;

/// Completes the application-level handshake after the WebSocket opened: herald's welcome
/// frame, or Socket.IO's open packet, CONNECT and its answer. Errors are short, groupable
/// texts.
pub(crate) async fn handshake(ws: &mut Ws, protocol: Protocol) -> Result<(), String> {
    match protocol {
        Protocol::Herald => match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let v: serde_json::Value = serde_json::from_str(text.as_str())
                    .map_err(|_| "welcome: not JSON".to_string())?;
                if v["type"] != "welcome" {
                    return Err(format!("welcome: first frame has type {}", v["type"]));
                }
                Ok(())
            }
            other => Err(format!("welcome: {}", describe_end(other))),
        },
        Protocol::Socketio => {
            // Bounded: the caller's connect timeout covers this loop too.
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        let t = text.as_str();
                        if t.starts_with("40") {
                            return Ok(());
                        } else if let Some(rest) = t.strip_prefix("44") {
                            let detail: String = rest.chars().take(80).collect();
                            return Err(format!("socket.io connect_error {detail}"));
                        } else if t.starts_with('0') {
                            ws.send(Message::text("40"))
                                .await
                                .map_err(|e| format!("socket.io CONNECT: {e}"))?;
                        } else if t == "2" {
                            ws.send(Message::text("3"))
                                .await
                                .map_err(|e| format!("engine.io pong: {e}"))?;
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => return Err(format!("socket.io open: {}", describe_end(other))),
                }
            }
        }
    }
}

fn describe_end(frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> String {
    match frame {
        Some(Ok(Message::Close(f))) => format!(
            "closed with {}",
            f.map(|f| u16::from(f.code)).unwrap_or(1005)
        ),
        Some(Ok(other)) => format!("unexpected {} frame", frame_kind(&other)),
        Some(Err(e)) => e.to_string(),
        None => "connection ended".into(),
    }
}

fn frame_kind(m: &Message) -> &'static str {
    match m {
        Message::Text(_) => "text",
        Message::Binary(_) => "binary",
        Message::Ping(_) => "ping",
        Message::Pong(_) => "pong",
        Message::Close(_) => "close",
        Message::Frame(_) => "raw",
    }
}

/// The fields of a bench payload the receiver needs (`pad` is ignored).
#[derive(Debug, Deserialize)]
struct BenchPayload {
    seq: u64,
    ts: u64,
}

#[derive(Debug, Deserialize)]
struct HeraldFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

/// One text frame, classified.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A bench payload: its sequence number, its send timestamp (CLOCK_MONOTONIC ns) and,
    /// for durable herald messages, the inbox id.
    Data {
        seq: u64,
        ts: u64,
        id: Option<String>,
    },
    /// A message that is not a bench payload (someone else's traffic).
    Foreign,
    /// herald gap frame.
    Gap,
    /// Engine.IO ping (`2`): answer `3`.
    EioPing,
    /// Anything else (pong, error frames, Socket.IO noise).
    Other,
}

pub(crate) fn classify(protocol: Protocol, text: &str) -> Incoming {
    match protocol {
        Protocol::Herald => {
            let Ok(f) = serde_json::from_str::<HeraldFrame>(text) else {
                return Incoming::Other;
            };
            match f.kind.as_ref() {
                "message" => match f
                    .data
                    .and_then(|d| serde_json::from_str::<BenchPayload>(d.get()).ok())
                {
                    Some(p) => Incoming::Data {
                        seq: p.seq,
                        ts: p.ts,
                        id: f.id.map(|s| s.into_owned()),
                    },
                    None => Incoming::Foreign,
                },
                "gap" => Incoming::Gap,
                _ => Incoming::Other,
            }
        }
        Protocol::Socketio => {
            if text == "2" {
                return Incoming::EioPing;
            }
            let Some(rest) = text.strip_prefix("42") else {
                return Incoming::Other;
            };
            let Ok(parts) = serde_json::from_str::<Vec<&RawValue>>(rest) else {
                return Incoming::Other;
            };
            if parts.len() < 2 || parts[0].get() != "\"notify\"" {
                return Incoming::Foreign;
            }
            match serde_json::from_str::<BenchPayload>(parts[1].get()) {
                Ok(p) => Incoming::Data {
                    seq: p.seq,
                    ts: p.ts,
                    id: None,
                },
                Err(_) => Incoming::Foreign,
            }
        }
    }
}

/// The payload every producer of the bench sends (and an external producer must send):
/// `{"seq":<n>,"ts":<CLOCK_MONOTONIC ns>,"pad":"xxx..."}`.
pub(crate) fn payload(seq: u64, ts: u64, pad: &str) -> String {
    format!(r#"{{"seq":{seq},"ts":{ts},"pad":"{pad}"}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn herald_frames_classify() {
        let p = payload(3, 99, "xx");
        let f = format!(r#"{{"type":"message","channel":"user:bench-1","data":{p}}}"#);
        assert_eq!(
            classify(Protocol::Herald, &f),
            Incoming::Data {
                seq: 3,
                ts: 99,
                id: None
            }
        );
        let f = format!(r#"{{"type":"message","channel":"user:u","id":"5-1","data":{p}}}"#);
        assert_eq!(
            classify(Protocol::Herald, &f),
            Incoming::Data {
                seq: 3,
                ts: 99,
                id: Some("5-1".into())
            }
        );
        assert_eq!(
            classify(
                Protocol::Herald,
                r#"{"type":"message","channel":"broadcast","data":"hi"}"#
            ),
            Incoming::Foreign
        );
        assert_eq!(
            classify(Protocol::Herald, r#"{"type":"gap","reason":"trimmed"}"#),
            Incoming::Gap
        );
        assert_eq!(classify(Protocol::Herald, "nope"), Incoming::Other);
    }

    #[test]
    fn socketio_frames_classify() {
        let p = payload(7, 12, "");
        assert_eq!(
            classify(Protocol::Socketio, &format!(r#"42["notify",{p}]"#)),
            Incoming::Data {
                seq: 7,
                ts: 12,
                id: None
            }
        );
        assert_eq!(classify(Protocol::Socketio, "2"), Incoming::EioPing);
        assert_eq!(
            classify(Protocol::Socketio, r#"42["other",{"seq":1,"ts":2}]"#),
            Incoming::Foreign
        );
        assert_eq!(
            classify(Protocol::Socketio, r#"40{"sid":"x"}"#),
            Incoming::Other
        );
    }

    #[test]
    fn urls_per_protocol() {
        assert_eq!(
            session_url(Protocol::Herald, "ws://h:1/ws", "T", Some("1-0"), None),
            "ws://h:1/ws?token=T&since=1-0"
        );
        assert_eq!(
            session_url(Protocol::Socketio, "ws://h:1/socket.io/", "T", None, None),
            "ws://h:1/socket.io/?EIO=4&transport=websocket&token=T"
        );
    }
}
