//! The durable per-user inbox: a capped Redis stream per user, appended and published in one
//! atomic step by the `herald_notify` Redis Function, replayed on reconnect, acknowledged with
//! a per-user read cursor. A memory engine gives standalone nodes the same behaviour.

mod memory;
mod redis;

use std::time::Duration;

pub(crate) use self::memory::MemoryInbox;
pub(crate) use self::redis::RedisInbox;
use super::error::{bounded, RedisError};
use crate::protocol::{InboxEntry, StreamId};
use crate::transport::replay::{BoxFuture, InboxPort, PortError};

/// Marker byte in front of a durable payload on a user channel: `\0<id>\0<payload>`. Plain
/// PUBLISH payloads never start with a NUL byte in practice (JSON and text cannot), and the
/// envelope is documented as reserved in docs/redis.md.
pub(crate) const ENVELOPE_MARK: u8 = 0;

/// Wraps a durable payload as `herald_notify` publishes it (the Lua function writes the
/// same bytes in production; Rust needs it only to test the reader).
#[cfg(test)]
pub(crate) fn envelope(id: StreamId, payload: &[u8]) -> Vec<u8> {
    let id = id.to_string();
    let mut out = Vec::with_capacity(payload.len() + id.len() + 2);
    out.push(ENVELOPE_MARK);
    out.extend_from_slice(id.as_bytes());
    out.push(ENVELOPE_MARK);
    out.extend_from_slice(payload);
    out
}

/// Splits an enveloped payload into id and payload; `None` for plain payloads.
pub(crate) fn open_envelope(raw: &[u8]) -> Option<(StreamId, &[u8])> {
    let rest = raw.strip_prefix(&[ENVELOPE_MARK])?;
    let end = rest.iter().take(42).position(|b| *b == ENVELOPE_MARK)?;
    let id = std::str::from_utf8(&rest[..end]).ok()?.parse().ok()?;
    Some((id, &rest[end + 1..]))
}

/// Retention settings, shared by every node of a deployment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InboxPolicy {
    pub(crate) max_len: u64,
    pub(crate) retention: Duration,
}

/// Durable inbox engine.
#[derive(Clone)]
pub(crate) enum Inbox {
    Memory(MemoryInbox),
    Redis(RedisInbox),
}

impl Inbox {
    /// Loads the `herald_notify` function (Redis only). Called at start and after Redis
    /// restarts, since Functions are not persisted without an RDB/AOF.
    pub(crate) async fn load(&self) -> Result<(), RedisError> {
        match self {
            Inbox::Memory(_) => Ok(()),
            Inbox::Redis(r) => bounded(r.load()).await,
        }
    }

    /// Appends a durable message, delivers it to the user's live sessions with its id, and
    /// returns the id. On Redis `herald_notify` does both atomically; the memory engine
    /// hands it to this node's fan-out.
    pub(crate) async fn notify(&self, user: &str, payload: &[u8]) -> Result<StreamId, RedisError> {
        match self {
            Inbox::Memory(m) => Ok(m.notify(user, payload)),
            Inbox::Redis(r) => {
                match bounded(r.notify(user, payload)).await {
                    // The function vanishes when Redis restarts empty; load it and retry once.
                    Err(e) if e.is_function_missing() => {
                        bounded(r.load()).await?;
                        bounded(r.notify(user, payload)).await
                    }
                    other => other,
                }
            }
        }
    }

    /// Up to `count` entries after `after` (from the start when `None`), oldest first.
    pub(crate) async fn read_after(
        &self,
        user: &str,
        after: Option<StreamId>,
        count: usize,
    ) -> Result<Vec<InboxEntry>, RedisError> {
        match self {
            Inbox::Memory(m) => Ok(m.read_after(user, after, count)),
            Inbox::Redis(r) => bounded(r.read_after(user, after, count)).await,
        }
    }

    /// True when entries newer than `since` were dropped (length or age cap), so a replay
    /// from `since` cannot be complete.
    pub(crate) async fn trimmed_after(
        &self,
        user: &str,
        since: StreamId,
    ) -> Result<bool, RedisError> {
        match self {
            Inbox::Memory(m) => Ok(m.trimmed_after(user, since)),
            Inbox::Redis(r) => bounded(r.trimmed_after(user, since)).await,
        }
    }

    /// Moves the user's read cursor forward to `id`; false when it already was there or
    /// beyond.
    pub(crate) async fn ack(&self, user: &str, id: StreamId) -> Result<bool, RedisError> {
        match self {
            Inbox::Memory(m) => Ok(m.ack(user, id)),
            Inbox::Redis(r) => bounded(r.ack(user, id)).await,
        }
    }

    /// The user's read cursor: the last id they acknowledged.
    pub(crate) async fn cursor(&self, user: &str) -> Result<Option<StreamId>, RedisError> {
        match self {
            Inbox::Memory(m) => Ok(m.cursor(user)),
            Inbox::Redis(r) => bounded(r.cursor(user)).await,
        }
    }
}

/// Sessions reach the inbox through this port (transport knows nothing of Redis).
impl InboxPort for Inbox {
    fn cursor<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Option<StreamId>, PortError>> {
        Box::pin(async move { Ok(Inbox::cursor(self, user).await?) })
    }

    fn trimmed_after<'a>(
        &'a self,
        user: &'a str,
        since: StreamId,
    ) -> BoxFuture<'a, Result<bool, PortError>> {
        Box::pin(async move { Ok(Inbox::trimmed_after(self, user, since).await?) })
    }

    fn read_after<'a>(
        &'a self,
        user: &'a str,
        after: Option<StreamId>,
        count: usize,
    ) -> BoxFuture<'a, Result<Vec<InboxEntry>, PortError>> {
        Box::pin(async move { Ok(Inbox::read_after(self, user, after, count).await?) })
    }

    fn ack<'a>(&'a self, user: &'a str, id: StreamId) -> BoxFuture<'a, Result<bool, PortError>> {
        Box::pin(async move { Ok(Inbox::ack(self, user, id).await?) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_plain_payloads_stay_plain() {
        let id = StreamId { ms: 12, seq: 3 };
        let raw = envelope(id, b"{\"a\":1}");
        assert_eq!(open_envelope(&raw), Some((id, &b"{\"a\":1}"[..])));
        assert_eq!(open_envelope(b"{\"a\":1}"), None);
        assert_eq!(open_envelope(b"\0nope\0x"), None);
        assert_eq!(open_envelope(b"\0"), None);
    }
}
