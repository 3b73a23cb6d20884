//! The only wire types: frames the server sends, frames a client may send, close codes, and
//! the HTTP API's request and response bodies. docs/protocol.md documents all of them.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// WebSocket close codes herald uses, with what a client should do about each.
pub mod close {
    /// The client closed, or the server ended the session normally.
    pub const NORMAL: u16 = 1000;
    /// The client sent a binary frame; herald speaks text only. Do not retry unchanged.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// The client sent text that is not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A protocol violation detected by the WebSocket layer.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// The client sent a frame larger than --max-message-bytes.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// Unexpected server-side failure; reconnect with jittered backoff.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The node is draining (restart or scale-down); reconnect at once with jitter.
    pub const SERVICE_RESTART: u16 = 1012;
    /// Nothing (no frame, no pong) arrived within --idle-timeout; reconnect.
    pub const IDLE_TIMEOUT: u16 = 4000;
    /// The client read too slowly and its outbound queue filled; reconnect with backoff.
    pub const SLOW_CONSUMER: u16 = 4001;
    /// Disconnected by the API (`POST /api/disconnect/<uid>`); do not reconnect automatically.
    pub const KICKED: u16 = 4002;
}

/// Why a session ended; decides the close code and the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    ClientClosed,
    ConnectionLost,
    Binary,
    InvalidUtf8,
    Protocol,
    TooBig,
    Internal,
    Draining,
    IdleTimeout,
    SlowConsumer,
    Kicked,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            CloseReason::ClientClosed | CloseReason::ConnectionLost => close::NORMAL,
            CloseReason::Binary => close::UNSUPPORTED_DATA,
            CloseReason::InvalidUtf8 => close::INVALID_PAYLOAD,
            CloseReason::Protocol => close::PROTOCOL_ERROR,
            CloseReason::TooBig => close::MESSAGE_TOO_BIG,
            CloseReason::Internal => close::INTERNAL_ERROR,
            CloseReason::Draining => close::SERVICE_RESTART,
            CloseReason::IdleTimeout => close::IDLE_TIMEOUT,
            CloseReason::SlowConsumer => close::SLOW_CONSUMER,
            CloseReason::Kicked => close::KICKED,
        }
    }

    /// Short text sent in the close frame and used as the metric label.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::ConnectionLost => "connection_lost",
            CloseReason::Binary => "binary_frame",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::Protocol => "protocol_error",
            CloseReason::TooBig => "message_too_big",
            CloseReason::Internal => "internal_error",
            CloseReason::Draining => "draining",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Kicked => "kicked",
        }
    }
}

/// The legacy liveness text the Java clients send.
pub const LEGACY_HEARTBEAT: &str = "HEART-BEAT";

/// A frame from a client, after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// `HEART-BEAT` text: liveness only, no answer (the Java clients expect none).
    LegacyHeartbeat,
    /// `{"type":"ping"}`: answered with `{"type":"pong"}`.
    Ping,
    /// `{"type":"ack","id":"<stream id>"}`: moves the user's inbox read cursor.
    Ack(crate::inbox::StreamId),
    /// Anything else: answered with an error frame, the session stays open.
    Unknown(&'static str),
}

#[derive(Deserialize)]
struct TypedFrame<'a> {
    #[serde(borrow, rename = "type")]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    id: Option<std::borrow::Cow<'a, str>>,
}

/// Parses one text frame from a client. Never fails: unknown input is reported as such.
pub fn parse_client_frame(text: &str) -> ClientFrame {
    let trimmed = text.trim();
    if trimmed == LEGACY_HEARTBEAT {
        return ClientFrame::LegacyHeartbeat;
    }
    match serde_json::from_str::<TypedFrame>(trimmed) {
        Ok(f) if f.kind == "ping" => ClientFrame::Ping,
        Ok(f) if f.kind == "ack" => match f.id.as_deref().map(str::parse) {
            Some(Ok(id)) => ClientFrame::Ack(id),
            _ => ClientFrame::Unknown("bad_id"),
        },
        Ok(_) => ClientFrame::Unknown("unknown_type"),
        Err(_) => ClientFrame::Unknown("malformed"),
    }
}

/// Frames the server sends, other than messages (which are prebuilt once per node by
/// [`message_frame`] and shared by every recipient).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    Welcome {
        session: &'a str,
        user: &'a str,
        node: &'a str,
    },
    Pong,
    Error {
        error: &'a str,
    },
    /// Durable messages were lost to the client: `trimmed` (entries after `since` were
    /// dropped by the inbox caps; sent before the replay) or `replay_limit` (more were
    /// pending than one connection replays; sent after the replay).
    Gap {
        reason: &'a str,
    },
}

impl ServerFrame<'_> {
    pub fn to_text(&self) -> String {
        // Serialising a struct of strings into a String cannot fail; the fallback is unreachable.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Builds the message frame `{"type":"message","channel":..,["id":..,]"data":..}` once.
/// `data` is the payload itself when it is valid JSON, else the payload as a JSON string
/// (lossily decoded when it is not UTF-8).
pub fn message_frame(channel: &str, id: Option<&str>, payload: &[u8]) -> String {
    let mut out = String::with_capacity(payload.len() + channel.len() + 64);
    out.push_str(r#"{"type":"message","channel":"#);
    push_json_string(&mut out, channel);
    if let Some(id) = id {
        out.push_str(r#","id":"#);
        push_json_string(&mut out, id);
    }
    out.push_str(r#","data":"#);
    match std::str::from_utf8(payload) {
        Ok(text) if serde_json::from_str::<&RawValue>(text).is_ok() => out.push_str(text.trim()),
        Ok(text) => push_json_string(&mut out, text),
        Err(_) => push_json_string(&mut out, &String::from_utf8_lossy(payload)),
    }
    out.push('}');
    out
}

fn push_json_string(out: &mut String, s: &str) {
    // Serialising a &str cannot fail; the fallback is unreachable.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// Body of `POST /api/publish`. Exactly one of `user`, `users`, `topic`, `broadcast`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub user: Option<String>,
    pub users: Option<Vec<String>>,
    pub topic: Option<String>,
    pub broadcast: Option<bool>,
    /// Store in the users' durable inboxes as well (user and users targets only).
    #[serde(default)]
    pub durable: bool,
    /// Required; any JSON value, `null` included.
    pub data: Box<RawValue>,
}

/// A validated publish target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishTarget {
    Users(Vec<String>),
    Topic(String),
    Broadcast,
}

/// Why a publish request is refused (HTTP 400 with this text).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    #[error("give exactly one of \"user\", \"users\", \"topic\" or \"broadcast\": true")]
    TargetCount,
    #[error("invalid user id {0:?}: 1-256 printable characters without whitespace")]
    BadUser(String),
    #[error("invalid topic {0:?}: 1-256 printable characters without whitespace")]
    BadTopic(String),
    #[error("\"users\" must hold 1 to {0} ids")]
    UserCount(usize),
    #[error("\"broadcast\" must be true when given")]
    BroadcastFalse,
    #[error("\"durable\" applies to \"user\" and \"users\" only")]
    DurableTarget,
}

/// Most users one publish request may address.
pub const MAX_USERS_PER_PUBLISH: usize = 1000;

impl PublishRequest {
    /// Checks the request and returns its target and the raw JSON payload.
    pub fn validate(self) -> Result<(PublishTarget, Box<RawValue>), PublishError> {
        if self.durable && (self.topic.is_some() || self.broadcast.is_some()) {
            return Err(PublishError::DurableTarget);
        }
        let count = self.user.is_some() as u8
            + self.users.is_some() as u8
            + self.topic.is_some() as u8
            + self.broadcast.is_some() as u8;
        if count != 1 {
            return Err(PublishError::TargetCount);
        }
        let data = self.data;
        let target = if let Some(u) = self.user {
            if !crate::keys::valid_name(&u) {
                return Err(PublishError::BadUser(u));
            }
            PublishTarget::Users(vec![u])
        } else if let Some(users) = self.users {
            if users.is_empty() || users.len() > MAX_USERS_PER_PUBLISH {
                return Err(PublishError::UserCount(MAX_USERS_PER_PUBLISH));
            }
            if let Some(bad) = users.iter().find(|u| !crate::keys::valid_name(u)) {
                return Err(PublishError::BadUser(bad.clone()));
            }
            PublishTarget::Users(users)
        } else if let Some(t) = self.topic {
            if !crate::keys::valid_name(&t) {
                return Err(PublishError::BadTopic(t));
            }
            PublishTarget::Topic(t)
        } else if self.broadcast == Some(true) {
            PublishTarget::Broadcast
        } else {
            return Err(PublishError::BroadcastFalse);
        };
        Ok((target, data))
    }
}

/// A validated publish request.
#[derive(Debug)]
pub struct Publish {
    pub target: PublishTarget,
    pub data: Box<RawValue>,
    pub durable: bool,
}

/// Parses and validates a publish body in one step; used by the API and by fuzzing.
pub fn parse_publish(body: &[u8]) -> Result<Publish, String> {
    let req: PublishRequest = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let durable = req.durable;
    let (target, data) = req.validate().map_err(|e| e.to_string())?;
    Ok(Publish {
        target,
        data,
        durable,
    })
}

/// One session in `GET /api/presence/<uid>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PresenceSession {
    pub session: String,
    pub node: String,
    /// Unix milliseconds.
    pub connected_at: u64,
}

/// Body of `GET /api/presence/<uid>`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PresenceResponse {
    pub user: String,
    pub online: bool,
    pub sessions: Vec<PresenceSession>,
}

/// One node in `GET /api/stats`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeStats {
    pub node: String,
    pub connections: u64,
    pub users: u64,
}

/// Body of `GET /api/stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsResponse {
    pub connections: u64,
    pub users: u64,
    pub nodes: Vec<NodeStats>,
}

/// Error body of every 4xx/5xx the HTTP layer produces.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_parse_without_panicking() {
        assert_eq!(
            parse_client_frame("HEART-BEAT"),
            ClientFrame::LegacyHeartbeat
        );
        assert_eq!(
            parse_client_frame(" HEART-BEAT\n"),
            ClientFrame::LegacyHeartbeat
        );
        assert_eq!(parse_client_frame(r#"{"type":"ping"}"#), ClientFrame::Ping);
        assert_eq!(
            parse_client_frame(r#"{"type":"nope"}"#),
            ClientFrame::Unknown("unknown_type")
        );
        assert_eq!(parse_client_frame("{"), ClientFrame::Unknown("malformed"));
        assert_eq!(
            parse_client_frame(r#"{"type":"ack","id":"5-1"}"#),
            ClientFrame::Ack(crate::inbox::StreamId { ms: 5, seq: 1 })
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"ack","id":"x"}"#),
            ClientFrame::Unknown("bad_id")
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"ack"}"#),
            ClientFrame::Unknown("bad_id")
        );
        assert_eq!(parse_client_frame(""), ClientFrame::Unknown("malformed"));
    }

    #[test]
    fn message_frame_embeds_json_and_quotes_text() {
        let f = message_frame("user:42", None, br#"{"a":1}"#);
        assert_eq!(
            f,
            r#"{"type":"message","channel":"user:42","data":{"a":1}}"#
        );
        let f = message_frame("broadcast", None, b"hello \"x\"");
        let v: serde_json::Value = serde_json::from_str(&f).unwrap(); // safe: test
        assert_eq!(v["data"], "hello \"x\"");
        let f = message_frame("topic:t", Some("1-0"), b"\xff\xfe");
        let v: serde_json::Value = serde_json::from_str(&f).unwrap(); // safe: test
        assert_eq!(v["id"], "1-0");
        assert!(v["data"].is_string());
    }

    #[test]
    fn publish_requests_need_exactly_one_target() {
        assert!(parse_publish(br#"{"user":"42","data":1}"#).is_ok());
        assert!(parse_publish(br#"{"users":["1","2"],"data":{"x":1}}"#).is_ok());
        assert!(parse_publish(br#"{"topic":"t","data":"s"}"#).is_ok());
        assert!(parse_publish(br#"{"broadcast":true,"data":null}"#).is_ok());
        assert!(parse_publish(br#"{"broadcast":false,"data":1}"#).is_err());
        assert!(parse_publish(br#"{"user":"1","topic":"t","data":1}"#).is_err());
        assert!(parse_publish(br#"{"user":"1"}"#).is_err());
        assert!(parse_publish(br#"{"users":[],"data":1}"#).is_err());
        assert!(parse_publish(br#"{"user":"a b","data":1}"#).is_err());
        assert!(parse_publish(br#"{"user":"1","data":1,"extra":2}"#).is_err());
        assert!(parse_publish(b"\xff").is_err());
        assert!(parse_publish(br#"{"user":"1","durable":true,"data":1}"#).is_ok_and(|p| p.durable));
        assert!(parse_publish(br#"{"topic":"t","durable":true,"data":1}"#).is_err());
        assert!(parse_publish(br#"{"broadcast":true,"durable":true,"data":1}"#).is_err());
    }

    #[test]
    fn welcome_has_the_documented_shape() {
        let t = ServerFrame::Welcome {
            session: "s",
            user: "u",
            node: "n",
        }
        .to_text();
        assert_eq!(
            t,
            r#"{"type":"welcome","session":"s","user":"u","node":"n"}"#
        );
        assert_eq!(ServerFrame::Pong.to_text(), r#"{"type":"pong"}"#);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn client_frame_parser_never_panics(text in any::<String>()) {
                let _ = parse_client_frame(&text);
            }

            #[test]
            fn only_the_ping_type_is_a_ping(kind in "[a-zA-Z_]{0,12}") {
                let frame = parse_client_frame(&format!(r#"{{"type":"{kind}"}}"#));
                prop_assert_eq!(frame == ClientFrame::Ping, kind == "ping");
            }

            #[test]
            fn publish_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = parse_publish(&body);
            }

            #[test]
            fn publish_parser_accepts_every_valid_user(user in "[A-Za-z0-9@._:-]{1,64}", n in any::<i64>()) {
                let body = serde_json::json!({"user": user, "data": n}).to_string();
                let p = parse_publish(body.as_bytes()).map_err(TestCaseError::fail)?;
                prop_assert_eq!(p.target, PublishTarget::Users(vec![user]));
                prop_assert_eq!(p.data.get(), n.to_string());
                prop_assert!(!p.durable);
            }

            #[test]
            fn message_frames_are_always_valid_json(
                channel in any::<String>(),
                payload in proptest::collection::vec(any::<u8>(), 0..256),
            ) {
                let frame = message_frame(&channel, Some("1-0"), &payload);
                let v: serde_json::Value = serde_json::from_str(&frame).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(&v["type"], "message");
                prop_assert_eq!(v["channel"].as_str(), Some(channel.as_str()));
            }
        }
    }
}
