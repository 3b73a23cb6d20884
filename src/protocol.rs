//! The WebSocket wire protocol every layer shares: frames the server sends, frames a client
//! may send, close codes, inbox ids, and the rule for user and topic names.
//! docs/protocol.md documents all of it; the HTTP API's bodies are in `api::bodies`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// WebSocket close codes herald uses, with what a client should do about each.
pub(crate) mod close {
    /// The client closed, or the server ended the session normally.
    pub(crate) const NORMAL: u16 = 1000;
    /// The client sent a binary frame; herald speaks text only. Do not retry unchanged.
    pub(crate) const UNSUPPORTED_DATA: u16 = 1003;
    /// The client sent text that is not valid UTF-8.
    pub(crate) const INVALID_PAYLOAD: u16 = 1007;
    /// A protocol violation detected by the WebSocket layer.
    pub(crate) const PROTOCOL_ERROR: u16 = 1002;
    /// The client sent a frame larger than --max-message-bytes.
    pub(crate) const MESSAGE_TOO_BIG: u16 = 1009;
    /// The node is draining (restart or scale-down), or could not catch the session up
    /// after an interruption (`resync`); reconnect at once with jitter, with `since`.
    pub(crate) const SERVICE_RESTART: u16 = 1012;
    /// Nothing (no frame, no pong) arrived within --idle-timeout; reconnect.
    pub(crate) const IDLE_TIMEOUT: u16 = 4000;
    /// The client read too slowly and its outbound queue filled; reconnect with backoff.
    pub(crate) const SLOW_CONSUMER: u16 = 4001;
    /// The session's token expired (and no fresh one was sent in-band): get a new token
    /// and reconnect.
    pub(crate) const TOKEN_EXPIRED: u16 = 4003;
    /// Disconnected by the API (`POST /api/disconnect/<uid>`); do not reconnect automatically.
    pub(crate) const KICKED: u16 = 4002;
    /// The user already has --max-sessions-per-user sessions on this node: close another
    /// tab or reconnect later, with backoff.
    pub(crate) const TOO_MANY_SESSIONS: u16 = 4004;
}

/// Why a session ended; decides the close code and the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    ClientClosed,
    ConnectionLost,
    Binary,
    InvalidUtf8,
    Protocol,
    TooBig,
    Draining,
    /// The session could not be caught up after its node's subscription broke: the client
    /// must reconnect (with `since`) to replay what it missed.
    Resync,
    IdleTimeout,
    SlowConsumer,
    Kicked,
    TokenExpired,
    /// The user's sessions on this node reached --max-sessions-per-user.
    TooManySessions,
}

impl CloseReason {
    pub(crate) fn code(self) -> u16 {
        match self {
            CloseReason::ClientClosed | CloseReason::ConnectionLost => close::NORMAL,
            CloseReason::Binary => close::UNSUPPORTED_DATA,
            CloseReason::InvalidUtf8 => close::INVALID_PAYLOAD,
            CloseReason::Protocol => close::PROTOCOL_ERROR,
            CloseReason::TooBig => close::MESSAGE_TOO_BIG,
            CloseReason::Draining | CloseReason::Resync => close::SERVICE_RESTART,
            CloseReason::IdleTimeout => close::IDLE_TIMEOUT,
            CloseReason::SlowConsumer => close::SLOW_CONSUMER,
            CloseReason::Kicked => close::KICKED,
            CloseReason::TokenExpired => close::TOKEN_EXPIRED,
            CloseReason::TooManySessions => close::TOO_MANY_SESSIONS,
        }
    }

    /// Short text sent in the close frame and used as the metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::ConnectionLost => "connection_lost",
            CloseReason::Binary => "binary_frame",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::Protocol => "protocol_error",
            CloseReason::TooBig => "message_too_big",
            CloseReason::Draining => "draining",
            CloseReason::Resync => "resync",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Kicked => "kicked",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::TooManySessions => "too_many_sessions",
        }
    }
}

/// The legacy liveness text the Java clients send.
pub(crate) const LEGACY_HEARTBEAT: &str = "HEART-BEAT";

/// A frame from a client, after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientFrame {
    /// `HEART-BEAT` text: liveness only, no answer (the Java clients expect none).
    LegacyHeartbeat,
    /// `{"type":"ping"}`: answered with `{"type":"pong"}`.
    Ping,
    /// `{"type":"ack","id":"<stream id>"}`: moves the user's inbox read cursor.
    Ack(StreamId),
    /// `{"type":"refresh","token":"<JWT>"}`: a fresh token for the same user.
    Refresh(String),
    /// Anything else: answered with an error frame, the session stays open.
    Unknown(&'static str),
}

#[derive(Deserialize)]
struct TypedFrame<'a> {
    #[serde(borrow, rename = "type")]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    token: Option<std::borrow::Cow<'a, str>>,
}

/// Parses one text frame from a client. Never fails: unknown input is reported as such.
pub(crate) fn parse_client_frame(text: &str) -> ClientFrame {
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
        Ok(f) if f.kind == "refresh" => match f.token {
            Some(t) if !t.is_empty() => ClientFrame::Refresh(t.into_owned()),
            _ => ClientFrame::Unknown("bad_token"),
        },
        Ok(_) => ClientFrame::Unknown("unknown_type"),
        Err(_) => ClientFrame::Unknown("malformed"),
    }
}

/// Frames the server sends, other than messages (which are prebuilt once per node by
/// [`message_frame`] and shared by every recipient).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum ServerFrame<'a> {
    Welcome {
        session: &'a str,
        user: &'a str,
        node: &'a str,
        /// Durable messages after the user's read cursor (absent when the inbox could not
        /// be read).
        #[serde(skip_serializing_if = "Option::is_none")]
        unread: Option<u64>,
        /// When the session's token expires (Unix seconds; absent in --dev): refresh it
        /// before then.
        #[serde(skip_serializing_if = "Option::is_none")]
        exp: Option<u64>,
    },
    Pong,
    Error {
        error: &'a str,
        /// Why, for errors that have several causes (a refused refresh).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    /// A `refresh` was accepted: the session now ends at this token's `exp` (plus grace).
    Refreshed {
        #[serde(skip_serializing_if = "Option::is_none")]
        exp: Option<u64>,
    },
    /// Durable messages were lost to the client: `trimmed` (entries after `since` were
    /// dropped by the inbox caps; sent before the replay) or `replay_limit` (more were
    /// pending than one connection replays; sent after the replay).
    Gap {
        reason: &'a str,
    },
    /// The user read durable messages up to `id` (on this or another device): the read
    /// cursor moved there.
    Read {
        id: &'a str,
    },
    /// The durable message `id` was withdrawn by its producer.
    Retract {
        id: &'a str,
    },
}

impl ServerFrame<'_> {
    pub(crate) fn to_text(&self) -> String {
        // Serialising a struct of strings into a String cannot fail; the fallback is unreachable.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Builds the message frame
/// `{"type":"message","channel":..,["id":..,]["replaces":..,]"data":..}` once. `data` is the
/// payload itself when it is valid JSON, else the payload as a JSON string (lossily decoded
/// when it is not UTF-8). `replaces` names the unread durable message this one collapsed.
pub(crate) fn message_frame(
    channel: &str,
    id: Option<&str>,
    replaces: Option<&str>,
    payload: &[u8],
) -> String {
    let mut out = String::with_capacity(payload.len() + channel.len() + 64);
    out.push_str(r#"{"type":"message","channel":"#);
    push_json_string(&mut out, channel);
    if let Some(id) = id {
        out.push_str(r#","id":"#);
        push_json_string(&mut out, id);
    }
    if let Some(replaces) = replaces {
        out.push_str(r#","replaces":"#);
        push_json_string(&mut out, replaces);
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

/// An inbox entry id, `<ms>-<seq>`, as Redis streams number entries; orders like Redis does.
/// Clients see it as the `id` of durable messages and send it back in acks and `since`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct StreamId {
    pub(crate) ms: u64,
    pub(crate) seq: u64,
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A text that is not an inbox id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not an inbox id: expected <ms>-<seq> or <ms>, decimal")]
pub(crate) struct InvalidId;

impl FromStr for StreamId {
    type Err = InvalidId;
    /// Accepts `<ms>-<seq>` and a bare `<ms>` (seq 0), like Redis range arguments.
    fn from_str(s: &str) -> Result<Self, InvalidId> {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        let ok = |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        if !ok(ms) || !ok(seq) {
            return Err(InvalidId);
        }
        Ok(StreamId {
            ms: ms.parse().map_err(|_| InvalidId)?,
            seq: seq.parse().map_err(|_| InvalidId)?,
        })
    }
}

/// One durable inbox entry: its id and the payload as the producer stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InboxEntry {
    pub(crate) id: StreamId,
    pub(crate) data: Vec<u8>,
}

/// User ids and topic names travel inside channel names, keys, logs and events. They may be
/// any text of 1-256 bytes without white-space, control or invisible characters, and
/// without braces: in every Redis key and channel the name is wrapped in `{}` as its Redis
/// Cluster hash tag, and a brace inside it would end the tag early or start another one
/// (the Functions library applies the same rule to inbox keys: keep `lua/herald.lua` in
/// step).
pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.chars()
            .all(|c| !c.is_control() && !c.is_whitespace() && !invisible(c) && c != '{' && c != '}')
}

/// Format characters that render as nothing but change what a reader sees: zero-width
/// spaces and joiners, bidirectional embeddings, overrides and isolates (U+202E turns
/// `resu` into `user` on screen), the byte-order mark and invisible fillers. All in the
/// BMP, so docs/openapi.yaml states the same rule as a pattern.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_parse_print_and_order() {
        let a: StreamId = "1700000000000-5".parse().unwrap();
        assert_eq!(a.to_string(), "1700000000000-5");
        let b: StreamId = "1700000000001".parse().unwrap();
        assert!(a < b);
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "a-1",
            "1-2-3",
            "99999999999999999999999-0",
        ] {
            assert_eq!(bad.parse::<StreamId>(), Err(InvalidId), "{bad}");
        }
    }

    #[test]
    fn names_reject_whitespace_and_control_characters() {
        assert!(valid_name("user-42@example.com"));
        assert!(valid_name("ünïcode"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name("a\nb"));
        assert!(!valid_name(&"x".repeat(257)));
        for c in [
            '\u{202E}', '\u{200B}', '\u{FEFF}', '\u{2066}', '\u{00AD}', '\u{3164}',
        ] {
            assert!(!valid_name(&format!("a{c}b")), "U+{:04X}", c as u32);
        }
        assert!(valid_name("José-Ñandú"));
        for bad in ["{a}", "a{", "}a", "a}b"] {
            assert!(!valid_name(bad), "{bad}: braces would break the hash tag");
        }
    }

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
            ClientFrame::Ack(StreamId { ms: 5, seq: 1 })
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
        assert_eq!(
            parse_client_frame(r#"{"type":"refresh","token":"a.b.c"}"#),
            ClientFrame::Refresh("a.b.c".into())
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"refresh"}"#),
            ClientFrame::Unknown("bad_token")
        );
    }

    #[test]
    fn message_frame_embeds_json_and_quotes_text() {
        let f = message_frame("user:42", None, None, br#"{"a":1}"#);
        assert_eq!(
            f,
            r#"{"type":"message","channel":"user:42","data":{"a":1}}"#
        );
        let f = message_frame("broadcast", None, None, b"hello \"x\"");
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["data"], "hello \"x\"");
        let f = message_frame("topic:t", Some("1-0"), Some("0-1"), b"\xff\xfe");
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["id"], "1-0");
        assert_eq!(v["replaces"], "0-1");
        assert!(v["data"].is_string());
    }

    #[test]
    fn welcome_has_the_documented_shape() {
        let t = ServerFrame::Welcome {
            session: "s",
            user: "u",
            node: "n",
            unread: Some(3),
            exp: None,
        }
        .to_text();
        assert_eq!(
            t,
            r#"{"type":"welcome","session":"s","user":"u","node":"n","unread":3}"#
        );
        let t = ServerFrame::Welcome {
            session: "s",
            user: "u",
            node: "n",
            unread: None,
            exp: Some(99),
        }
        .to_text();
        assert_eq!(
            t,
            r#"{"type":"welcome","session":"s","user":"u","node":"n","exp":99}"#
        );
        assert_eq!(
            ServerFrame::Read { id: "1-0" }.to_text(),
            r#"{"type":"read","id":"1-0"}"#
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
            fn message_frames_are_always_valid_json(
                channel in any::<String>(),
                payload in proptest::collection::vec(any::<u8>(), 0..256),
            ) {
                let frame = message_frame(&channel, Some("1-0"), None, &payload);
                let v: serde_json::Value = serde_json::from_str(&frame).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(&v["type"], "message");
                prop_assert_eq!(v["channel"].as_str(), Some(channel.as_str()));
            }
        }
    }
}
