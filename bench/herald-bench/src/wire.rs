//! What differs between the protocols the bench speaks: herald's own JSON frames,
//! Engine.IO v4 / Socket.IO v5 text frames over a plain WebSocket (for comparing against a
//! Socket.IO server that publishes the same payloads as `42["notify",{...}]`), and Pusher
//! protocol 7 (for comparing against Sockudo, which delivers them as
//! `{"event":"notify","channel":...,"data":"<payload as a JSON string>"}`).

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
    /// Pusher protocol 7: GET /app/<key>?protocol=7, `pusher:connection_established`, then
    /// `pusher:subscribe` to `private-user-<uid>` (HMAC-signed) and to `broadcast`; events
    /// `{"event":"notify","data":"<json>"}`, `pusher:ping` answered with `pusher:pong`.
    Pusher,
}

impl Protocol {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Protocol::Herald => "herald",
            Protocol::Socketio => "socketio",
            Protocol::Pusher => "pusher",
        }
    }

    /// Path used when a target URL has none.
    pub(crate) fn default_path(self) -> &'static str {
        match self {
            Protocol::Herald => "/ws",
            Protocol::Socketio => "/socket.io/",
            // The app key follows (see `session_url`).
            Protocol::Pusher => "/app",
        }
    }
}

/// Builds the WebSocket URL of one session. `token` must already be URL-safe (a JWT is; a
/// --dev user id of the bench's own making is too). For Pusher `token` is the app key: the
/// user is named in the channel it subscribes to, not in the URL.
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
        Protocol::Pusher => format!(
            "{}/{token}?protocol=7&client=herald-bench&version=1",
            base.trim_end_matches('/')
        ),
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

/// What a Pusher session needs for its handshake: who it is and how to sign.
pub(crate) struct PusherHello<'a> {
    pub(crate) user: &'a str,
    pub(crate) key: &'a str,
    pub(crate) secret: &'a str,
}

/// Completes the application-level handshake after the WebSocket opened: herald's welcome
/// frame, Socket.IO's open packet, CONNECT and its answer, or Pusher's
/// connection_established and both subscriptions. Errors are short, groupable texts.
pub(crate) async fn handshake(
    ws: &mut Ws,
    protocol: Protocol,
    pusher: Option<PusherHello<'_>>,
) -> Result<(), String> {
    match protocol {
        Protocol::Pusher => {
            let hello = pusher.ok_or_else(|| "pusher: no app credentials".to_string())?;
            pusher_handshake(ws, hello).await
        }
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

#[derive(Debug, Deserialize)]
struct PusherFrame<'a> {
    #[serde(borrow)]
    event: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    channel: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

/// The `data` of a Pusher frame parsed as `T`: Pusher sends it as a JSON string holding
/// JSON, Sockudo sometimes as the JSON itself; both are accepted.
fn pusher_data<T: serde::de::DeserializeOwned>(data: Option<&RawValue>) -> Option<T> {
    let raw = data?.get();
    if raw.starts_with('"') {
        let inner: String = serde_json::from_str(raw).ok()?;
        serde_json::from_str(&inner).ok()
    } else {
        serde_json::from_str(raw).ok()
    }
}

#[derive(Debug, Deserialize)]
struct Established {
    socket_id: String,
}

/// Waits for `pusher:connection_established`, subscribes to the user's private channel
/// (signed with the socket id) and to the broadcast channel, and returns once the server
/// confirmed both, so a connected session receives everything published afterwards.
async fn pusher_handshake(ws: &mut Ws, hello: PusherHello<'_>) -> Result<(), String> {
    let private = crate::pusher::user_channel(hello.user);
    let mut pending = 0u8;
    // Bounded: the caller's connect timeout covers this loop too.
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => return Err(format!("pusher: {}", describe_end(other))),
        };
        let f: PusherFrame = serde_json::from_str(text.as_str())
            .map_err(|_| "pusher: frame is not JSON".to_string())?;
        match f.event.as_ref() {
            "pusher:connection_established" => {
                let e: Established = pusher_data(f.data).ok_or_else(|| {
                    "pusher: connection_established without socket_id".to_string()
                })?;
                let auth =
                    crate::pusher::channel_auth(hello.key, hello.secret, &e.socket_id, &private);
                for frame in [
                    crate::pusher::subscribe_frame(&private, Some(&auth)),
                    crate::pusher::subscribe_frame(crate::pusher::BROADCAST_CHANNEL, None),
                ] {
                    ws.send(Message::text(frame))
                        .await
                        .map_err(|e| format!("pusher: subscribe: {e}"))?;
                }
                pending = 2;
            }
            "pusher_internal:subscription_succeeded" if pending > 0 => {
                pending -= 1;
                if pending == 0 {
                    return Ok(());
                }
            }
            "pusher:ping" => ws
                .send(Message::text(crate::pusher::PONG))
                .await
                .map_err(|e| format!("pusher: pong: {e}"))?,
            "pusher:error" | "pusher:subscription_error" => {
                let detail: String = f
                    .data
                    .map(|d| d.get())
                    .unwrap_or("")
                    .chars()
                    .take(80)
                    .collect();
                return Err(format!("pusher: {} {detail}", f.event));
            }
            _ => {}
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
    /// A protocol-level ping to answer with [`pong`]: Engine.IO `2`, Pusher `pusher:ping`.
    Ping,
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
                return Incoming::Ping;
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
        Protocol::Pusher => {
            let Ok(f) = serde_json::from_str::<PusherFrame>(text) else {
                return Incoming::Other;
            };
            match f.event.as_ref() {
                "pusher:ping" => Incoming::Ping,
                e if e.starts_with("pusher:") || e.starts_with("pusher_internal:") => {
                    Incoming::Other
                }
                crate::pusher::EVENT if f.channel.is_some() => {
                    match pusher_data::<BenchPayload>(f.data) {
                        Some(p) => Incoming::Data {
                            seq: p.seq,
                            ts: p.ts,
                            id: None,
                        },
                        None => Incoming::Foreign,
                    }
                }
                _ => Incoming::Foreign,
            }
        }
    }
}

/// The answer to an [`Incoming::Ping`] of `protocol` (herald's pings are WebSocket pings,
/// which tungstenite answers itself).
pub(crate) fn pong(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Pusher => crate::pusher::PONG,
        Protocol::Socketio | Protocol::Herald => "3",
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
        assert_eq!(classify(Protocol::Socketio, "2"), Incoming::Ping);
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
    fn pusher_frames_classify() {
        let p = payload(9, 44, "xx");
        let f =
            serde_json::json!({"event": "notify", "channel": "private-user-bench-1", "data": p})
                .to_string();
        assert_eq!(
            classify(Protocol::Pusher, &f),
            Incoming::Data {
                seq: 9,
                ts: 44,
                id: None
            }
        );
        // Data as an object, not a string, is read the same way.
        let f = format!(r#"{{"event":"notify","channel":"broadcast","data":{p}}}"#);
        assert_eq!(
            classify(Protocol::Pusher, &f),
            Incoming::Data {
                seq: 9,
                ts: 44,
                id: None
            }
        );
        assert_eq!(
            classify(Protocol::Pusher, r#"{"event":"pusher:ping","data":{}}"#),
            Incoming::Ping
        );
        assert_eq!(
            pong(Protocol::Pusher),
            r#"{"event":"pusher:pong","data":{}}"#
        );
        assert_eq!(
            classify(
                Protocol::Pusher,
                r#"{"event":"pusher_internal:subscription_succeeded","channel":"broadcast","data":"{}"}"#
            ),
            Incoming::Other
        );
        assert_eq!(
            classify(
                Protocol::Pusher,
                r#"{"event":"other","channel":"c","data":"{\"seq\":1,\"ts\":2}"}"#
            ),
            Incoming::Foreign
        );
        assert_eq!(
            classify(
                Protocol::Pusher,
                r#"{"event":"notify","channel":"c","data":"hello"}"#
            ),
            Incoming::Foreign
        );
    }

    #[test]
    fn urls_per_protocol() {
        assert_eq!(
            session_url(Protocol::Pusher, "ws://h:1/app", "KEY", None, None),
            "ws://h:1/app/KEY?protocol=7&client=herald-bench&version=1"
        );
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
