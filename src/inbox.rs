//! The durable per-user inbox: a capped Redis stream per user, appended and published in one
//! atomic step by the `herald_notify` Redis Function, replayed on reconnect, acknowledged with
//! a per-user read cursor. A memory engine gives standalone nodes the same behaviour.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::redis_pool::Pool;
use redis::Script;

use crate::keys::Keys;

/// A stream entry id `<ms>-<seq>`; orders like Redis does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl FromStr for StreamId {
    type Err = ();
    /// Accepts `<ms>-<seq>` and a bare `<ms>` (seq 0), like Redis range arguments.
    fn from_str(s: &str) -> Result<Self, ()> {
        let (ms, seq) = match s.split_once('-') {
            Some((ms, seq)) => (ms, seq),
            None => (s, "0"),
        };
        let ok = |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        if !ok(ms) || !ok(seq) {
            return Err(());
        }
        Ok(StreamId {
            ms: ms.parse().map_err(|_| ())?,
            seq: seq.parse().map_err(|_| ())?,
        })
    }
}

/// Marker byte in front of a durable payload on a user channel: `\0<id>\0<payload>`. Plain
/// PUBLISH payloads never start with a NUL byte in practice (JSON and text cannot), and the
/// envelope is documented as reserved in docs/redis.md.
pub const ENVELOPE_MARK: u8 = 0;

/// Wraps a durable payload for publishing.
pub fn envelope(id: StreamId, payload: &[u8]) -> Vec<u8> {
    let id = id.to_string();
    let mut out = Vec::with_capacity(payload.len() + id.len() + 2);
    out.push(ENVELOPE_MARK);
    out.extend_from_slice(id.as_bytes());
    out.push(ENVELOPE_MARK);
    out.extend_from_slice(payload);
    out
}

/// Splits an enveloped payload into id and payload; `None` for plain payloads.
pub fn open_envelope(raw: &[u8]) -> Option<(StreamId, &[u8])> {
    let rest = raw.strip_prefix(&[ENVELOPE_MARK])?;
    let end = rest.iter().take(42).position(|b| *b == ENVELOPE_MARK)?;
    let id = std::str::from_utf8(&rest[..end]).ok()?.parse().ok()?;
    Some((id, &rest[end + 1..]))
}

/// One inbox entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: StreamId,
    pub data: Vec<u8>,
}

/// Why an inbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("redis pool: {0}")]
    Pool(#[from] crate::redis_pool::PoolError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("timed out")]
    Timeout,
}

/// Retention settings, shared by every node of a deployment.
#[derive(Debug, Clone, Copy)]
pub struct InboxPolicy {
    pub max_len: u64,
    pub retention: Duration,
}

/// The Redis Functions library nodes load at start-up and after every Redis restart.
/// `herald_notify` appends to the user's capped inbox, trims by age, refreshes the expiry and
/// publishes the entry with its id on the user's channel, all in one atomic step.
pub fn function_library(policy: InboxPolicy) -> String {
    format!(
        r#"#!lua name=herald
local MAXLEN = {max_len}
local RETENTION = {retention}
local function notify(keys, args)
  local inbox = keys[1]
  local payload = args[1]
  if not inbox or not payload then
    return redis.error_reply('usage: FCALL herald_notify 1 <prefix>:inbox:<user> <payload>')
  end
  local cut = string.find(inbox, ':inbox:', 1, true)
  if not cut then
    return redis.error_reply('key must be <prefix>:inbox:<user>')
  end
  local channel = string.sub(inbox, 1, cut - 1) .. ':user:' .. string.sub(inbox, cut + 7)
  local id = redis.call('XADD', inbox, 'MAXLEN', '~', MAXLEN, '*', 'd', payload)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('XTRIM', inbox, 'MINID', '~', string.format('%.0f', now - RETENTION))
  redis.call('PEXPIRE', inbox, RETENTION)
  redis.call('PUBLISH', channel, '\0' .. id .. '\0' .. payload)
  return id
end
redis.register_function('herald_notify', notify)
"#,
        max_len = policy.max_len,
        retention = policy.retention.as_millis()
    )
}

/// KEYS: inbox. Returns {first retained id or '' when the stream does not exist,
/// 1 when entries were ever trimmed (entries-added > length; assumed on Redis < 7), now ms}.
const GAP_INFO: &str = r#"
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
if redis.call('EXISTS', KEYS[1]) == 0 then return {'', 0, now} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local len, added = nil, nil
for i = 1, #info, 2 do
  if info[i] == 'length' then len = info[i + 1] end
  if info[i] == 'entries-added' then added = info[i + 1] end
end
local trimmed = 1
if len and added and added <= len then trimmed = 0 end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local first_id = ''
if first[1] then first_id = first[1][1] end
return {first_id, trimmed, now}
"#;

/// KEYS: cursor. ARGV: id, ttl ms. Moves the cursor forward only.
const ACK: &str = r#"
local function parse(id)
  local a, b = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(a), tonumber(b)
end
local nm, ns = parse(ARGV[1])
if not nm then return redis.error_reply('bad id') end
local cur = redis.call('GET', KEYS[1])
if cur then
  local cm, cs = parse(cur)
  if cm and (cm > nm or (cm == nm and cs >= ns)) then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"#;

/// Durable inbox engine.
#[derive(Clone)]
pub enum Inbox {
    Memory(MemoryInbox),
    Redis(RedisInbox),
}

/// Redis inbox.
#[derive(Clone)]
pub struct RedisInbox {
    pool: Pool,
    keys: Keys,
    policy: InboxPolicy,
    gap: Arc<Script>,
    ack: Arc<Script>,
}

const CALL_TIMEOUT: Duration = Duration::from_secs(3);

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, InboxError>>,
) -> Result<T, InboxError> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .map_err(|_| InboxError::Timeout)?
}

/// XRANGE reply: (id, [(field, value)]).
type RawEntries = Vec<(String, Vec<(String, Vec<u8>)>)>;

fn parse_entries(raw: RawEntries) -> Vec<Entry> {
    raw.into_iter()
        .filter_map(|(id, fields)| {
            let id = id.parse().ok()?;
            let data = fields.into_iter().find(|(k, _)| k == "d").map(|(_, v)| v)?;
            Some(Entry { id, data })
        })
        .collect()
}

impl RedisInbox {
    pub fn new(pool: Pool, keys: Keys, policy: InboxPolicy) -> Self {
        RedisInbox {
            pool,
            keys,
            policy,
            gap: Arc::new(Script::new(GAP_INFO)),
            ack: Arc::new(Script::new(ACK)),
        }
    }

    async fn load(&self) -> Result<(), InboxError> {
        let mut c = self.pool.get().await?;
        let _: String = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(function_library(self.policy))
            .query_async(&mut *c)
            .await?;
        Ok(())
    }

    async fn notify(&self, user: &str, payload: &[u8]) -> Result<StreamId, InboxError> {
        let mut c = self.pool.get().await?;
        let id: String = redis::cmd("FCALL")
            .arg("herald_notify")
            .arg(1)
            .arg(self.keys.inbox_key(user))
            .arg(payload)
            .query_async(&mut *c)
            .await?;
        id.parse().map_err(|_| {
            InboxError::Redis(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "herald_notify returned a bad id",
            )))
        })
    }

    async fn read_after(
        &self,
        user: &str,
        after: Option<StreamId>,
        count: usize,
    ) -> Result<Vec<Entry>, InboxError> {
        let mut c = self.pool.get().await?;
        let start = after
            .map(|id| format!("({id}"))
            .unwrap_or_else(|| "-".to_string());
        let raw: RawEntries = redis::cmd("XRANGE")
            .arg(self.keys.inbox_key(user))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut *c)
            .await?;
        Ok(parse_entries(raw))
    }

    async fn trimmed_after(&self, user: &str, since: StreamId) -> Result<bool, InboxError> {
        let mut c = self.pool.get().await?;
        let (first, trimmed, now): (String, i64, String) = self
            .gap
            .key(self.keys.inbox_key(user))
            .invoke_async(&mut *c)
            .await?;
        let now: u64 = now.parse().unwrap_or(0);
        Ok(match first.parse::<StreamId>() {
            // Trimming removes the oldest entries only: if `since` is at or after the first
            // retained entry, everything after it is still there. Before it, entries may
            // have been dropped, unless nothing was ever trimmed.
            Ok(first) => since < first && trimmed == 1,
            // No stream: everything expired; a gap if `since` is older than the retention.
            Err(()) => {
                since
                    .ms
                    .saturating_add(self.policy.retention.as_millis() as u64)
                    < now
            }
        })
    }

    async fn ack(&self, user: &str, id: StreamId) -> Result<bool, InboxError> {
        let mut c = self.pool.get().await?;
        let moved: i64 = self
            .ack
            .key(self.keys.cursor_key(user))
            .arg(id.to_string())
            .arg(self.policy.retention.as_millis() as u64)
            .invoke_async(&mut *c)
            .await?;
        Ok(moved == 1)
    }

    async fn cursor(&self, user: &str) -> Result<Option<StreamId>, InboxError> {
        let mut c = self.pool.get().await?;
        let v: Option<String> = redis::cmd("GET")
            .arg(self.keys.cursor_key(user))
            .query_async(&mut *c)
            .await?;
        Ok(v.and_then(|s| s.parse().ok()))
    }
}

#[derive(Default)]
struct UserInbox {
    entries: VecDeque<(StreamId, Vec<u8>)>,
    max_deleted: Option<StreamId>,
    cursor: Option<StreamId>,
}

/// Standalone inbox with the same caps (length and age) as the Redis one.
#[derive(Clone)]
pub struct MemoryInbox {
    policy: InboxPolicy,
    users: Arc<Mutex<HashMap<String, UserInbox>>>,
    last: Arc<Mutex<StreamId>>,
}

impl MemoryInbox {
    pub fn new(policy: InboxPolicy) -> Self {
        MemoryInbox {
            policy,
            users: Arc::default(),
            last: Arc::default(),
        }
    }

    fn next_id(&self) -> StreamId {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let ms = crate::unix_ms();
        *last = if ms > last.ms {
            StreamId { ms, seq: 0 }
        } else {
            StreamId {
                ms: last.ms,
                seq: last.seq + 1,
            }
        };
        *last
    }

    fn trim(&self, inbox: &mut UserInbox, now: u64) {
        let min_ms = now.saturating_sub(self.policy.retention.as_millis() as u64);
        while inbox.entries.len() as u64 > self.policy.max_len
            || inbox.entries.front().is_some_and(|(id, _)| id.ms < min_ms)
        {
            if let Some((id, _)) = inbox.entries.pop_front() {
                inbox.max_deleted = Some(id);
            }
        }
    }

    fn notify(&self, user: &str, payload: &[u8]) -> StreamId {
        let id = self.next_id();
        let now = crate::unix_ms();
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let inbox = users.entry(user.to_string()).or_default();
        inbox.entries.push_back((id, payload.to_vec()));
        self.trim(inbox, now);
        id
    }

    fn read_after(&self, user: &str, after: Option<StreamId>, count: usize) -> Vec<Entry> {
        let now = crate::unix_ms();
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let Some(inbox) = users.get_mut(user) else {
            return Vec::new();
        };
        self.trim(inbox, now);
        inbox
            .entries
            .iter()
            .filter(|(id, _)| after.is_none_or(|a| *id > a))
            .take(count)
            .map(|(id, d)| Entry {
                id: *id,
                data: d.clone(),
            })
            .collect()
    }

    fn trimmed_after(&self, user: &str, since: StreamId) -> bool {
        let now = crate::unix_ms();
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        match users.get_mut(user) {
            Some(inbox) => {
                self.trim(inbox, now);
                // The memory engine knows exactly what it dropped.
                inbox.max_deleted.is_some_and(|d| since < d)
            }
            None => {
                since
                    .ms
                    .saturating_add(self.policy.retention.as_millis() as u64)
                    < now
            }
        }
    }

    fn ack(&self, user: &str, id: StreamId) -> bool {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let inbox = users.entry(user.to_string()).or_default();
        if inbox.cursor.is_some_and(|c| c >= id) {
            return false;
        }
        inbox.cursor = Some(id);
        true
    }

    fn cursor(&self, user: &str) -> Option<StreamId> {
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .and_then(|i| i.cursor)
    }
}

impl Inbox {
    /// Loads the `herald_notify` function (Redis only). Called at start and after Redis
    /// restarts, since Functions are not persisted without an RDB/AOF.
    pub async fn load(&self) -> Result<(), InboxError> {
        match self {
            Inbox::Memory(_) => Ok(()),
            Inbox::Redis(r) => bounded(r.load()).await,
        }
    }

    /// Appends a durable message and returns its id. The Redis engine also publishes it;
    /// the memory engine leaves publishing to the caller.
    pub async fn notify(&self, user: &str, payload: &[u8]) -> Result<StreamId, InboxError> {
        match self {
            Inbox::Memory(m) => Ok(m.notify(user, payload)),
            Inbox::Redis(r) => {
                match bounded(r.notify(user, payload)).await {
                    // The function vanishes when Redis restarts empty; load it and retry once.
                    Err(InboxError::Redis(e)) if e.to_string().contains("Function not found") => {
                        bounded(r.load()).await?;
                        bounded(r.notify(user, payload)).await
                    }
                    other => other,
                }
            }
        }
    }

    /// Up to `count` entries after `after` (from the start when `None`), oldest first.
    pub async fn read_after(
        &self,
        user: &str,
        after: Option<StreamId>,
        count: usize,
    ) -> Result<Vec<Entry>, InboxError> {
        match self {
            Inbox::Memory(m) => Ok(m.read_after(user, after, count)),
            Inbox::Redis(r) => bounded(r.read_after(user, after, count)).await,
        }
    }

    /// True when entries newer than `since` were dropped (length or age cap), so a replay
    /// from `since` cannot be complete.
    pub async fn trimmed_after(&self, user: &str, since: StreamId) -> Result<bool, InboxError> {
        match self {
            Inbox::Memory(m) => Ok(m.trimmed_after(user, since)),
            Inbox::Redis(r) => bounded(r.trimmed_after(user, since)).await,
        }
    }

    /// Moves the user's read cursor forward to `id`; false when it already was there or
    /// beyond.
    pub async fn ack(&self, user: &str, id: StreamId) -> Result<bool, InboxError> {
        match self {
            Inbox::Memory(m) => Ok(m.ack(user, id)),
            Inbox::Redis(r) => bounded(r.ack(user, id)).await,
        }
    }

    pub async fn cursor(&self, user: &str) -> Result<Option<StreamId>, InboxError> {
        match self {
            Inbox::Memory(m) => Ok(m.cursor(user)),
            Inbox::Redis(r) => bounded(r.cursor(user)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_parse_print_and_order() {
        let a: StreamId = "1700000000000-5".parse().unwrap(); // safe: test
        assert_eq!(a.to_string(), "1700000000000-5");
        let b: StreamId = "1700000000001".parse().unwrap(); // safe: test
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
            assert!(bad.parse::<StreamId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn envelopes_round_trip_and_plain_payloads_stay_plain() {
        let id = StreamId { ms: 12, seq: 3 };
        let raw = envelope(id, b"{\"a\":1}");
        assert_eq!(open_envelope(&raw), Some((id, &b"{\"a\":1}"[..])));
        assert_eq!(open_envelope(b"{\"a\":1}"), None);
        assert_eq!(open_envelope(b"\0nope\0x"), None);
        assert_eq!(open_envelope(b"\0"), None);
    }

    #[test]
    fn memory_inbox_caps_replays_and_acks() {
        let m = MemoryInbox::new(InboxPolicy {
            max_len: 3,
            retention: Duration::from_secs(60),
        });
        let ids: Vec<StreamId> = (0..5)
            .map(|i| m.notify("u", format!("{i}").as_bytes()))
            .collect();
        let all = m.read_after("u", None, 10);
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].id, ids[2]);
        assert!(m.trimmed_after("u", ids[0]));
        assert!(!m.trimmed_after("u", ids[1]));
        assert_eq!(m.read_after("u", Some(ids[3]), 10).len(), 1);
        assert!(m.ack("u", ids[3]));
        assert!(!m.ack("u", ids[2]));
        assert_eq!(m.cursor("u"), Some(ids[3]));
    }

    #[test]
    fn library_names_the_function_and_policy() {
        let lib = function_library(InboxPolicy {
            max_len: 42,
            retention: Duration::from_secs(2),
        });
        assert!(lib.starts_with("#!lua name=herald\n"));
        assert!(lib.contains("local MAXLEN = 42"));
        assert!(lib.contains("local RETENTION = 2000"));
        assert!(lib.contains("register_function('herald_notify'"));
    }
}
