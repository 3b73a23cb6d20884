//! Every request and response body of the HTTP API, and the validation of publish requests.
//! docs/protocol.md ("HTTP API") documents them. The presence and stats records
//! (`PresenceSession`, `cluster::presence::Stats`) are presence's own types, serialised as
//! they are.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::cluster::inbox::NotifyOptions;
pub(crate) use crate::cluster::presence::PresenceSession;
use crate::protocol::valid_name;

/// Query of `GET /ws`.
#[derive(Debug, Deserialize, Default)]
pub(crate) struct WsQuery {
    pub(crate) token: Option<String>,
    pub(crate) topics: Option<String>,
    pub(crate) since: Option<String>,
}

/// Body of `POST /api/publish`. Exactly one of `user`, `users`, `topic`, `broadcast`.
/// Optional fields are left out when unused; `null` is not a way to leave them out (it is
/// refused like any other wrong type, as docs/openapi.yaml says).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishRequest {
    #[serde(default, deserialize_with = "non_null")]
    user: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    users: Option<Vec<String>>,
    #[serde(default, deserialize_with = "non_null")]
    topic: Option<String>,
    #[serde(default, deserialize_with = "non_null")]
    broadcast: Option<bool>,
    /// Store in the users' durable inboxes as well (user and users targets only).
    #[serde(default)]
    durable: bool,
    /// Durable only: a retry with the same key within the idempotency window returns the
    /// first ids and stores nothing new.
    #[serde(default, deserialize_with = "non_null")]
    idempotency_key: Option<String>,
    /// Durable only: seconds after which the message is no longer replayed or listed.
    #[serde(default, deserialize_with = "non_null")]
    expires_in: Option<u64>,
    /// Durable only: replaces the user's unread message that last used this key.
    #[serde(default, deserialize_with = "non_null")]
    collapse_key: Option<String>,
    /// Required; any JSON value, `null` included.
    data: Box<RawValue>,
}

/// An optional field that, when present, must hold a `T` (serde would read `null` as absent).
fn non_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A validated publish target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PublishTarget {
    Users(Vec<String>),
    Topic(String),
    Broadcast,
}

/// Why a publish request is refused (HTTP 400 with this text).
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    /// Not JSON, or not the documented shape (serde's own message says where).
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("give exactly one of \"user\", \"users\", \"topic\" or \"broadcast\": true")]
    TargetCount,
    #[error("invalid user id {0:?}: 1-256 printable characters without whitespace or braces")]
    BadUser(String),
    #[error("invalid topic {0:?}: 1-256 printable characters without whitespace or braces")]
    BadTopic(String),
    #[error("\"users\" must hold 1 to {0} ids")]
    UserCount(usize),
    #[error("\"broadcast\" must be true when given")]
    BroadcastFalse,
    #[error("\"durable\" applies to \"user\" and \"users\" only")]
    DurableTarget,
    #[error("\"{0}\" applies to durable publishes only (\"durable\": true)")]
    NotDurable(&'static str),
    #[error("\"{0}\" must be 1-128 printable ASCII characters")]
    BadOptionKey(&'static str),
    #[error("\"expires_in\" must be a whole number of seconds from 1")]
    BadExpiry,
}

/// Most users one publish request may address.
pub(crate) const MAX_USERS_PER_PUBLISH: usize = 1000;

/// A validated publish request.
#[derive(Debug)]
pub(crate) struct Publish {
    pub(crate) target: PublishTarget,
    pub(crate) data: Box<RawValue>,
    pub(crate) durable: bool,
    /// Options of a durable publish (all `None` for a plain one).
    pub(crate) options: NotifyOptions,
}

/// Idempotency and collapse keys: 1-128 printable ASCII characters (what `herald_notify`
/// accepts).
pub(crate) fn valid_option_key(k: &str) -> bool {
    (1..=128).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic())
}

impl PublishRequest {
    /// Checks the request and returns its target and the raw JSON payload.
    fn validate(self) -> Result<Publish, PublishError> {
        if self.durable && (self.topic.is_some() || self.broadcast.is_some()) {
            return Err(PublishError::DurableTarget);
        }
        if !self.durable {
            for (given, name) in [
                (self.idempotency_key.is_some(), "idempotency_key"),
                (self.expires_in.is_some(), "expires_in"),
                (self.collapse_key.is_some(), "collapse_key"),
            ] {
                if given {
                    return Err(PublishError::NotDurable(name));
                }
            }
        }
        for (key, name) in [
            (&self.idempotency_key, "idempotency_key"),
            (&self.collapse_key, "collapse_key"),
        ] {
            if key.as_deref().is_some_and(|k| !valid_option_key(k)) {
                return Err(PublishError::BadOptionKey(name));
            }
        }
        if self.expires_in == Some(0) {
            return Err(PublishError::BadExpiry);
        }
        let count = self.user.is_some() as u8
            + self.users.is_some() as u8
            + self.topic.is_some() as u8
            + self.broadcast.is_some() as u8;
        if count != 1 {
            return Err(PublishError::TargetCount);
        }
        let target = if let Some(u) = self.user {
            if !valid_name(&u) {
                return Err(PublishError::BadUser(u));
            }
            PublishTarget::Users(vec![u])
        } else if let Some(users) = self.users {
            if users.is_empty() || users.len() > MAX_USERS_PER_PUBLISH {
                return Err(PublishError::UserCount(MAX_USERS_PER_PUBLISH));
            }
            if let Some(bad) = users.iter().find(|u| !valid_name(u)) {
                return Err(PublishError::BadUser(bad.clone()));
            }
            // A user named twice would get the notification twice (and, durable, two
            // inbox entries): each user is addressed once, in the order first given.
            let mut seen = std::collections::HashSet::with_capacity(users.len());
            let users: Vec<String> = users
                .into_iter()
                .filter(|u| seen.insert(u.clone()))
                .collect();
            PublishTarget::Users(users)
        } else if let Some(t) = self.topic {
            if !valid_name(&t) {
                return Err(PublishError::BadTopic(t));
            }
            PublishTarget::Topic(t)
        } else if self.broadcast == Some(true) {
            PublishTarget::Broadcast
        } else {
            return Err(PublishError::BroadcastFalse);
        };
        Ok(Publish {
            target,
            data: self.data,
            durable: self.durable,
            options: NotifyOptions {
                idempotency_key: self.idempotency_key,
                ttl_secs: self.expires_in,
                collapse_key: self.collapse_key,
            },
        })
    }
}

/// Parses and validates a publish body in one step.
pub(crate) fn parse_publish(body: &[u8]) -> Result<Publish, PublishError> {
    serde_json::from_slice::<PublishRequest>(body)?.validate()
}

/// Answer of `POST /api/publish`.
#[derive(Debug, Serialize)]
pub(crate) struct PublishResponse {
    pub(crate) ok: bool,
    pub(crate) channels: usize,
    /// Inbox id per user, for durable publishes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ids: Option<BTreeMap<String, String>>,
}

/// Answer of `GET /api/presence/<uid>`.
#[derive(Debug, Serialize)]
pub(crate) struct PresenceResponse {
    pub(crate) user: String,
    pub(crate) online: bool,
    pub(crate) sessions: Vec<PresenceSession>,
}

/// `{"ok":true}`.
#[derive(Debug, Serialize)]
pub(crate) struct OkResponse {
    pub(crate) ok: bool,
}

/// Query of `GET /api/inbox/<uid>`. Other parameters are ignored.
#[derive(Debug, Deserialize, Default)]
struct InboxQuery {
    limit: Option<String>,
}

/// Entries one `GET /api/inbox/<uid>` returns without a `limit`.
pub(crate) const INBOX_PAGE_DEFAULT: usize = 100;
/// Most entries one `GET /api/inbox/<uid>` returns.
pub(crate) const INBOX_PAGE_MAX: usize = 1000;

/// The page size a `GET /api/inbox/<uid>` query asks for; the error is the 400's text. A
/// `limit` that is not a whole number from 1 to 1000 is refused, not clamped: a client
/// that sends `limit=0` or `limit=abc` has a bug it should hear about.
pub(crate) fn inbox_page_size(query: &str) -> Result<usize, String> {
    let q: InboxQuery =
        serde_urlencoded::from_str(query).map_err(|e| format!("invalid query: {e}"))?;
    let Some(raw) = q.limit else {
        return Ok(INBOX_PAGE_DEFAULT);
    };
    raw.parse::<usize>()
        .ok()
        .filter(|n| raw.bytes().all(|b| b.is_ascii_digit()) && (1..=INBOX_PAGE_MAX).contains(n))
        .ok_or_else(|| {
            format!("\"limit\" must be a whole number from 1 to {INBOX_PAGE_MAX}, not {raw:?}")
        })
}

/// One entry of `GET /api/inbox/<uid>`.
#[derive(Debug, Serialize)]
pub(crate) struct InboxEntryBody {
    pub(crate) id: String,
    pub(crate) data: serde_json::Value,
}

/// Answer of `GET /api/inbox/<uid>`.
#[derive(Debug, Serialize)]
pub(crate) struct InboxResponse {
    pub(crate) user: String,
    pub(crate) cursor: Option<String>,
    /// Unacknowledged entries in all (counted up to 1,000).
    pub(crate) unread: u64,
    pub(crate) entries: Vec<InboxEntryBody>,
}

/// Body of `POST /api/inbox/<uid>/ack`.
#[derive(Debug, Deserialize)]
pub(crate) struct AckBody {
    pub(crate) id: String,
}

/// Body of `POST /ack` (an SSE client's acknowledgement).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientAckBody {
    pub(crate) id: String,
    /// The session that read it (from its welcome): it gets no `read` event.
    pub(crate) session: Option<String>,
}

/// Answer of `POST /api/inbox/<uid>/ack` and `POST /ack`.
#[derive(Debug, Serialize)]
pub(crate) struct AckResponse {
    pub(crate) ok: bool,
    pub(crate) moved: bool,
    /// The cursor after the ack: at most the newest entry the inbox holds.
    pub(crate) cursor: Option<String>,
}

impl From<crate::transport::replay::Acked> for AckResponse {
    fn from(acked: crate::transport::replay::Acked) -> Self {
        AckResponse {
            ok: true,
            moved: acked.moved,
            cursor: acked.cursor.map(|c| c.to_string()),
        }
    }
}

/// Error body of every 4xx/5xx the HTTP layer produces.
#[derive(Debug, Serialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: String,
    pub(crate) message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_requests_need_exactly_one_target() {
        assert!(parse_publish(br#"{"user":"42","data":1}"#).is_ok());
        assert!(parse_publish(br#"{"users":["1","2"],"data":{"x":1}}"#).is_ok());
        assert!(parse_publish(br#"{"topic":"t","data":"s"}"#).is_ok());
        assert!(parse_publish(br#"{"broadcast":true,"data":null}"#).is_ok());
        assert!(parse_publish(br#"{"user":"1","durable":false,"data":1}"#).is_ok());
        assert!(parse_publish(br#"{"broadcast":false,"data":1}"#).is_err());
        assert!(parse_publish(br#"{"user":"1","topic":"t","data":1}"#).is_err());
        assert!(parse_publish(br#"{"user":"1"}"#).is_err());
        assert!(parse_publish(br#"{"users":[],"data":1}"#).is_err());
        let Ok(Publish {
            target: PublishTarget::Users(users),
            ..
        }) = parse_publish(br#"{"users":["b","a","b","a","c"],"data":1}"#)
        else {
            panic!("users parse");
        };
        assert_eq!(
            users,
            ["b", "a", "c"],
            "duplicates dropped, first order kept"
        );
        assert!(parse_publish(br#"{"user":"a b","data":1}"#).is_err());
        assert!(parse_publish(br#"{"user":"1","data":1,"extra":2}"#).is_err());
        assert!(parse_publish(b"\xff").is_err());
        assert!(parse_publish(br#"{"user":"1","durable":true,"data":1}"#).is_ok_and(|p| p.durable));
        assert!(parse_publish(br#"{"topic":"t","durable":true,"data":1}"#).is_err());
        assert!(parse_publish(br#"{"broadcast":true,"durable":true,"data":1}"#).is_err());
    }

    #[test]
    fn durable_options_need_durable_and_valid_values() {
        let p = parse_publish(
            br#"{"user":"1","durable":true,"idempotency_key":"k-1","expires_in":60,"collapse_key":"c","data":1}"#,
        )
        .unwrap();
        assert_eq!(
            p.options,
            NotifyOptions {
                idempotency_key: Some("k-1".into()),
                ttl_secs: Some(60),
                collapse_key: Some("c".into()),
            }
        );
        for body in [
            &br#"{"user":"1","idempotency_key":"k","data":1}"#[..],
            br#"{"user":"1","expires_in":5,"data":1}"#,
            br#"{"user":"1","collapse_key":"c","data":1}"#,
            br#"{"user":"1","durable":true,"idempotency_key":"","data":1}"#,
            br#"{"user":"1","durable":true,"idempotency_key":"a b","data":1}"#,
            br#"{"user":"1","durable":true,"expires_in":0,"data":1}"#,
            br#"{"user":"1","durable":true,"expires_in":-1,"data":1}"#,
            br#"{"user":"1","durable":true,"expires_in":1.5,"data":1}"#,
            // Found by schemathesis: null was read as "absent", which the contract does not say.
            br#"{"user":"1","collapse_key":null,"data":1}"#,
            br#"{"user":"1","durable":true,"idempotency_key":null,"data":1}"#,
            br#"{"user":"1","durable":true,"expires_in":null,"data":1}"#,
            br#"{"user":"1","topic":null,"data":1}"#,
            br#"{"user":null,"topic":"t","data":1}"#,
            br#"{"users":null,"broadcast":true,"data":1}"#,
            br#"{"broadcast":null,"user":"1","data":1}"#,
            br#"{"user":"1","durable":null,"data":1}"#,
        ] {
            assert!(
                parse_publish(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn inbox_limit_is_a_whole_number_from_1_to_1000() {
        assert_eq!(inbox_page_size(""), Ok(INBOX_PAGE_DEFAULT));
        assert_eq!(inbox_page_size("other=x"), Ok(INBOX_PAGE_DEFAULT));
        assert_eq!(inbox_page_size("limit=1"), Ok(1));
        assert_eq!(inbox_page_size("limit=1000&x=1"), Ok(1000));
        assert_eq!(inbox_page_size("limit=007"), Ok(7));
        // Found by schemathesis: these were clamped or replaced by the default, not refused.
        for bad in [
            "limit=abc",
            "limit=-1",
            "limit=0",
            "limit=1001",
            "limit=-971833",
            "limit=",
            "limit=+5",
            "limit=1.5",
            "limit=99999999999999999999999",
            "limit=1&limit=2",
        ] {
            assert!(inbox_page_size(bad).is_err(), "{bad}");
        }
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn publish_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = parse_publish(&body);
            }

            #[test]
            fn publish_parser_accepts_every_valid_user(user in "[A-Za-z0-9@._:-]{1,64}", n in any::<i64>()) {
                let body = serde_json::json!({"user": user, "data": n}).to_string();
                let p = parse_publish(body.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(p.target, PublishTarget::Users(vec![user]));
                prop_assert_eq!(p.data.get(), n.to_string());
                prop_assert!(!p.durable);
            }
        }
    }
}
