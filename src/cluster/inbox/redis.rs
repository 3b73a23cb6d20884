//! The Redis inbox: the `herald_notify` Functions library (`lua/herald.lua`), replay reads
//! with XRANGE, gap detection and the forward-only cursor (`lua/inbox_*.lua`).

use std::sync::Arc;

use redis::Script;

use super::InboxPolicy;
use crate::cluster::error::RedisError;
use crate::cluster::keys::Keys;
use crate::cluster::pool::Pool;
use crate::protocol::{InboxEntry, StreamId};

/// The Functions library source, with its policy placeholders.
const LIBRARY: &str = include_str!("../lua/herald.lua");

/// The Redis Functions library nodes load at start-up and after every Redis restart, with
/// this deployment's inbox policy in place of its placeholders.
pub(crate) fn function_library(policy: InboxPolicy) -> String {
    LIBRARY
        .replace("__MAX_LEN__", &policy.max_len.to_string())
        .replace(
            "__RETENTION_MS__",
            &policy.retention.as_millis().to_string(),
        )
}

/// Redis inbox.
#[derive(Clone)]
pub(crate) struct RedisInbox {
    pool: Pool,
    keys: Keys,
    policy: InboxPolicy,
    gap: Arc<Script>,
    ack: Arc<Script>,
}

/// XRANGE reply: (id, [(field, value)]).
type RawEntries = Vec<(String, Vec<(String, Vec<u8>)>)>;

fn parse_entries(raw: RawEntries) -> Vec<InboxEntry> {
    raw.into_iter()
        .filter_map(|(id, fields)| {
            let id = id.parse().ok()?;
            let data = fields.into_iter().find(|(k, _)| k == "d").map(|(_, v)| v)?;
            Some(InboxEntry { id, data })
        })
        .collect()
}

impl RedisInbox {
    pub(crate) fn new(pool: Pool, keys: Keys, policy: InboxPolicy) -> Self {
        RedisInbox {
            pool,
            keys,
            policy,
            gap: Arc::new(Script::new(include_str!("../lua/inbox_gap.lua"))),
            ack: Arc::new(Script::new(include_str!("../lua/inbox_ack.lua"))),
        }
    }

    pub(crate) async fn load(&self) -> Result<(), RedisError> {
        let mut c = self.pool.get().await?;
        let _: String = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(function_library(self.policy))
            .query_async(&mut *c)
            .await?;
        Ok(())
    }

    pub(crate) async fn notify(&self, user: &str, payload: &[u8]) -> Result<StreamId, RedisError> {
        let mut c = self.pool.get().await?;
        let id: String = redis::cmd("FCALL")
            .arg("herald_notify")
            .arg(1)
            .arg(self.keys.inbox_key(user))
            .arg(payload)
            .query_async(&mut *c)
            .await?;
        id.parse()
            .map_err(|_| RedisError::Reply("herald_notify returned a bad id"))
    }

    pub(crate) async fn read_after(
        &self,
        user: &str,
        after: Option<StreamId>,
        count: usize,
    ) -> Result<Vec<InboxEntry>, RedisError> {
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

    pub(crate) async fn trimmed_after(
        &self,
        user: &str,
        since: StreamId,
    ) -> Result<bool, RedisError> {
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
            Err(_) => {
                since
                    .ms
                    .saturating_add(self.policy.retention.as_millis() as u64)
                    < now
            }
        })
    }

    pub(crate) async fn ack(&self, user: &str, id: StreamId) -> Result<bool, RedisError> {
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

    pub(crate) async fn cursor(&self, user: &str) -> Result<Option<StreamId>, RedisError> {
        let mut c = self.pool.get().await?;
        let v: Option<String> = redis::cmd("GET")
            .arg(self.keys.cursor_key(user))
            .query_async(&mut *c)
            .await?;
        Ok(v.and_then(|s| s.parse().ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        assert!(!lib.contains("__"), "every placeholder is replaced");
    }
}
