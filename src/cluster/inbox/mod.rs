//! The durable per-user inbox: a capped Redis stream per user, appended and published in one
//! atomic step by the `herald_notify` Redis Function, replayed on reconnect, acknowledged with
//! a per-user read cursor. A memory engine gives standalone nodes the same behaviour.

mod memory;
mod redis;

use std::time::Duration;

pub(crate) use self::memory::MemoryInbox;
pub(crate) use self::redis::RedisInbox;
use uuid::Uuid;

use super::error::{bounded, RedisError};
use crate::delivery::Durable;
use crate::protocol::StreamId;
use crate::transport::replay::{Acked, BoxFuture, InboxPort, Opening, Page, PortError};

/// Marker byte around the envelope of what the inbox publishes on a user channel:
/// `\0<meta>\0<payload>`. Plain PUBLISH payloads never start with a NUL byte in practice
/// (JSON and text cannot), and the envelope is documented as reserved in docs/redis.md.
/// `<meta>` is written only by herald's own scripts (`lua/herald.lua`, `lua/inbox_*.lua`):
///
/// - `<id>` or `<id> <replaced id>`: a durable message (with the unread entry its collapse
///   key replaced);
/// - `read <id> [<session>]`: the read cursor moved to `<id>` (acknowledged by `<session>`);
/// - `retract <id>`: the entry was withdrawn.
pub(crate) const ENVELOPE_MARK: u8 = 0;

/// What an envelope carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Envelope<'a> {
    Message { durable: Durable, payload: &'a [u8] },
    Read { id: StreamId, session: Option<Uuid> },
    Retract { id: StreamId },
}

impl Envelope<'_> {
    /// The inbox id the envelope names.
    pub(crate) fn id(&self) -> StreamId {
        match self {
            Envelope::Message { durable, .. } => durable.id,
            Envelope::Read { id, .. } | Envelope::Retract { id } => *id,
        }
    }
}

/// Wraps a durable payload as `herald_notify` publishes it (the Lua function writes the
/// same bytes in production; Rust needs it only to test the reader).
#[cfg(test)]
pub(crate) fn envelope(meta: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + meta.len() + 2);
    out.push(ENVELOPE_MARK);
    out.extend_from_slice(meta.as_bytes());
    out.push(ENVELOPE_MARK);
    out.extend_from_slice(payload);
    out
}

/// Reads an envelope; `None` for plain payloads (and for anything that is not a valid
/// envelope, which is then delivered as it is).
pub(crate) fn open_envelope(raw: &[u8]) -> Option<Envelope<'_>> {
    let rest = raw.strip_prefix(&[ENVELOPE_MARK])?;
    // The longest meta: `read <id> <uuid>` is under 100 bytes.
    let end = rest.iter().take(100).position(|b| *b == ENVELOPE_MARK)?;
    let meta = std::str::from_utf8(&rest[..end]).ok()?;
    let payload = &rest[end + 1..];
    let mut words = meta.split(' ');
    let first = words.next()?;
    let envelope = match first {
        "read" => {
            let id = words.next()?.parse().ok()?;
            let session = match words.next() {
                Some(s) => Some(s.parse().ok()?),
                None => None,
            };
            Envelope::Read { id, session }
        }
        "retract" => Envelope::Retract {
            id: words.next()?.parse().ok()?,
        },
        id => {
            let replaces = match words.next() {
                Some(r) => Some(r.parse().ok()?),
                None => None,
            };
            Envelope::Message {
                durable: Durable {
                    id: id.parse().ok()?,
                    replaces,
                },
                payload,
            }
        }
    };
    words.next().is_none().then_some(envelope)
}

/// Inbox settings, shared by every node of a deployment (the Functions library embeds
/// them).
#[derive(Debug, Clone, Copy)]
pub(crate) struct InboxPolicy {
    /// Entries kept per user.
    pub(crate) max_len: u64,
    /// How long entries, the cursor and withdrawn-entry marks are kept.
    pub(crate) retention: Duration,
    /// Largest payload stored (`--max-message-bytes`).
    pub(crate) max_bytes: usize,
    /// How long an idempotency key answers with its first id.
    pub(crate) idempotency_window: Duration,
}

/// Options of a durable publish (docs/redis.md, `herald_notify`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NotifyOptions {
    /// The same key within the idempotency window returns the first id, storing nothing.
    pub(crate) idempotency_key: Option<String>,
    /// Replay and reads skip the entry once this many seconds have passed.
    pub(crate) ttl_secs: Option<u64>,
    /// Replaces the user's unread entry that last used this key.
    pub(crate) collapse_key: Option<String>,
}

/// Durable inbox engine.
#[derive(Clone)]
pub(crate) enum Inbox {
    Memory(MemoryInbox),
    Redis(RedisInbox),
}

impl Inbox {
    /// Loads the Functions library (Redis only). Called at start and after Redis restarts,
    /// since Functions are not persisted without an RDB/AOF.
    pub(crate) async fn load(&self) -> Result<(), RedisError> {
        match self {
            Inbox::Memory(_) => Ok(()),
            Inbox::Redis(r) => bounded(r.load()).await,
        }
    }

    /// Appends a durable message, delivers it to the user's live sessions with its id, and
    /// returns the id. On Redis `herald_notify` does both atomically; the memory engine
    /// hands it to this node's fan-out.
    pub(crate) async fn notify(
        &self,
        user: &str,
        payload: &[u8],
        options: &NotifyOptions,
    ) -> Result<StreamId, RedisError> {
        match self {
            Inbox::Memory(m) => Ok(m.notify(user, payload, options)),
            Inbox::Redis(r) => bounded(r.notify(user, payload, options)).await,
        }
    }

    /// Where a replay starts and its first page (see [`InboxPort::open`]).
    pub(crate) async fn open(
        &self,
        user: &str,
        after: Option<StreamId>,
        after_cursor: bool,
        count_unread: bool,
        count: usize,
    ) -> Result<Opening, RedisError> {
        match self {
            Inbox::Memory(m) => Ok(m.open(user, after, after_cursor, count_unread, count)),
            Inbox::Redis(r) => {
                bounded(r.open(user, after, after_cursor, count_unread, count)).await
            }
        }
    }

    /// The next page after `after`.
    pub(crate) async fn page(
        &self,
        user: &str,
        after: StreamId,
        count: usize,
    ) -> Result<Page, RedisError> {
        match self {
            Inbox::Memory(m) => Ok(m.page(user, Some(after), count)),
            Inbox::Redis(r) => bounded(r.page(user, after, count)).await,
        }
    }

    /// Moves the user's read cursor forward to `id`, at most to the newest entry held, and
    /// tells the user's sessions (but `session`, the reader) on every node.
    pub(crate) async fn ack(
        &self,
        user: &str,
        id: StreamId,
        session: Option<&str>,
    ) -> Result<Acked, RedisError> {
        match self {
            Inbox::Memory(m) => Ok(m.ack(user, id, session)),
            Inbox::Redis(r) => bounded(r.ack(user, id, session)).await,
        }
    }

    /// Withdraws an entry; false when the inbox holds no such entry.
    pub(crate) async fn retract(&self, user: &str, id: StreamId) -> Result<bool, RedisError> {
        match self {
            Inbox::Memory(m) => Ok(m.retract(user, id)),
            Inbox::Redis(r) => bounded(r.retract(user, id)).await,
        }
    }
}

/// Sessions reach the inbox through this port (transport knows nothing of Redis).
impl InboxPort for Inbox {
    fn open<'a>(
        &'a self,
        user: &'a str,
        after: Option<StreamId>,
        after_cursor: bool,
        count_unread: bool,
        count: usize,
    ) -> BoxFuture<'a, Result<Opening, PortError>> {
        Box::pin(async move {
            Ok(Inbox::open(self, user, after, after_cursor, count_unread, count).await?)
        })
    }

    fn page<'a>(
        &'a self,
        user: &'a str,
        after: StreamId,
        count: usize,
    ) -> BoxFuture<'a, Result<Page, PortError>> {
        Box::pin(async move { Ok(Inbox::page(self, user, after, count).await?) })
    }

    fn ack<'a>(
        &'a self,
        user: &'a str,
        id: StreamId,
        session: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Acked, PortError>> {
        Box::pin(async move { Ok(Inbox::ack(self, user, id, session).await?) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_plain_payloads_stay_plain() {
        let id = StreamId { ms: 12, seq: 3 };
        let old = StreamId { ms: 11, seq: 0 };
        assert_eq!(
            open_envelope(&envelope("12-3", b"{\"a\":1}")),
            Some(Envelope::Message {
                durable: Durable::new(id),
                payload: &b"{\"a\":1}"[..]
            })
        );
        assert_eq!(
            open_envelope(&envelope("12-3 11-0", b"x")),
            Some(Envelope::Message {
                durable: Durable {
                    id,
                    replaces: Some(old)
                },
                payload: &b"x"[..]
            })
        );
        let session = Uuid::new_v4();
        assert_eq!(
            open_envelope(&envelope(&format!("read 12-3 {session}"), b"")),
            Some(Envelope::Read {
                id,
                session: Some(session)
            })
        );
        assert_eq!(
            open_envelope(&envelope("read 12-3", b"")),
            Some(Envelope::Read { id, session: None })
        );
        assert_eq!(
            open_envelope(&envelope("retract 12-3", b"")),
            Some(Envelope::Retract { id })
        );
        assert_eq!(open_envelope(b"{\"a\":1}"), None);
        assert_eq!(open_envelope(b"\0nope\0x"), None);
        assert_eq!(open_envelope(b"\0"), None);
        assert_eq!(open_envelope(&envelope("read x", b"")), None);
        assert_eq!(open_envelope(&envelope("12-3 11-0 9", b"")), None);
        assert_eq!(open_envelope(&envelope("retract 12-3 junk", b"")), None);
    }
}
