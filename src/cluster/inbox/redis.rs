//! The Redis inbox: every operation is a function of the `herald` Functions library
//! (`lua/herald.lua`), which nodes load with this deployment's settings and load again
//! whenever Redis has lost it.

use redis::Value;

use super::{InboxPolicy, NotifyOptions};
use crate::cluster::error::RedisError;
use crate::cluster::keys::Keys;
use crate::cluster::pool::Pool;
use crate::metrics as m;
use crate::protocol::{InboxEntry, StreamId};
use crate::transport::replay::{Acked, Opening, Page};

/// The Functions library source, with its settings as placeholders.
const LIBRARY: &str = include_str!("../lua/herald.lua");

/// The library's `VERSION`: bumped whenever its functions change.
const LIBRARY_VERSION: i64 = 3;

/// Most entries scanned to count a user's unread messages (the welcome's `unread`).
pub(crate) const UNREAD_CAP: usize = 1000;

/// The Functions library with this deployment's settings in place of its placeholders.
pub(crate) fn function_library(prefix: &str, policy: &InboxPolicy) -> String {
    LIBRARY
        .replace("__PREFIX__", prefix)
        .replace("__MAX_LEN__", &policy.max_len.to_string())
        .replace(
            "__RETENTION_MS__",
            &policy.retention.as_millis().to_string(),
        )
        .replace("__MAX_BYTES__", &policy.max_bytes.to_string())
        .replace(
            "__IDEMPOTENCY_WINDOW_MS__",
            &policy.idempotency_window.as_millis().to_string(),
        )
        .replace("__UNREAD_CAP__", &UNREAD_CAP.to_string())
}

/// What `herald_config` returns: the settings a loaded library was built with.
type LoadedConfig = (i64, String, i64, i64, i64, i64);

/// Redis inbox.
#[derive(Clone)]
pub(crate) struct RedisInbox {
    pool: Pool,
    keys: Keys,
    library: std::sync::Arc<str>,
    /// This node's settings as `herald_config` reports them.
    config: std::sync::Arc<LoadedConfig>,
}

impl RedisInbox {
    pub(crate) fn new(pool: Pool, keys: Keys, policy: InboxPolicy) -> Self {
        let library = function_library(keys.prefix(), &policy).into();
        let config = (
            LIBRARY_VERSION,
            keys.prefix().to_string(),
            policy.max_len as i64,
            policy.retention.as_millis() as i64,
            policy.max_bytes as i64,
            policy.idempotency_window.as_millis() as i64,
        );
        RedisInbox {
            pool,
            keys,
            library,
            config: std::sync::Arc::new(config),
        }
    }

    /// Loads the library with this node's settings. If Redis holds one built with other
    /// settings (another deployment sharing this Redis, or nodes of one deployment started
    /// with different flags), says so loudly first: whichever loads last wins, and the
    /// others' producers then see their keys refused.
    pub(crate) async fn load(&self) -> Result<(), RedisError> {
        let mut c = self.pool.get().await?;
        let loaded: Result<LoadedConfig, _> = redis::cmd("FCALL")
            .arg("herald_config")
            .arg(0)
            .query_async(&mut *c)
            .await;
        if let Ok(loaded) = loaded {
            if loaded != *self.config {
                tracing::error!(
                    loaded = ?loaded,
                    ours = ?*self.config,
                    "the herald Functions library in Redis was loaded with other settings \
                     (version, prefix, inbox max len, retention ms, max bytes, idempotency \
                     window ms); replacing it: every node of a deployment must run with the \
                     same settings, and one Redis serves one deployment"
                );
                metrics::counter!(m::FUNCTION_CONFLICTS).increment(1);
            }
        }
        let _: String = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&*self.library)
            .query_async(&mut *c)
            .await?;
        Ok(())
    }

    /// Calls one function of the library; loads the library and retries once when Redis
    /// has lost it (it restarted empty).
    async fn fcall<T: redis::FromRedisValue>(
        &self,
        function: &str,
        keys: &[String],
        args: &[&[u8]],
    ) -> Result<T, RedisError> {
        let call = || async {
            let mut c = self.pool.get().await?;
            let mut cmd = redis::cmd("FCALL");
            cmd.arg(function).arg(keys.len()).arg(keys);
            for a in args {
                cmd.arg(*a);
            }
            Ok::<T, RedisError>(cmd.query_async(&mut *c).await?)
        };
        let result = match call().await {
            Err(e) if e.is_function_missing() => {
                self.load().await?;
                call().await
            }
            other => other,
        };
        if result.as_ref().is_err_and(RedisError::is_connection_error) {
            // A broken pooled connection is handed out again until the pool's next check:
            // drop the idle ones so that a retry connects afresh.
            self.pool.reset();
        }
        result
    }

    pub(crate) async fn notify(
        &self,
        user: &str,
        payload: &[u8],
        options: &NotifyOptions,
    ) -> Result<StreamId, RedisError> {
        let ttl = options.ttl_secs.map(|t| t.to_string());
        let mut args: Vec<&[u8]> = vec![payload];
        if let Some(k) = &options.idempotency_key {
            args.extend([&b"idem"[..], k.as_bytes()]);
        }
        if let Some(t) = &ttl {
            args.extend([&b"ttl"[..], t.as_bytes()]);
        }
        if let Some(k) = &options.collapse_key {
            args.extend([&b"collapse"[..], k.as_bytes()]);
        }
        let id: String = self
            .fcall("herald_notify", &[self.keys.inbox_key(user)], &args)
            .await?;
        parse_id(&id)
    }

    pub(crate) async fn open(
        &self,
        user: &str,
        after: Option<StreamId>,
        after_cursor: bool,
        count_unread: bool,
        count: usize,
    ) -> Result<Opening, RedisError> {
        let after = after.map(|a| a.to_string()).unwrap_or_default();
        let count = count.to_string();
        let keys = [
            self.keys.inbox_key(user),
            self.keys.cursor_key(user),
            self.keys.gone_key(user),
            self.keys.trimmed_key(user),
        ];
        let flag = |b: bool| if b { &b"1"[..] } else { &b"0"[..] };
        let raw: Vec<Value> = self
            .fcall(
                "herald_open",
                &keys,
                &[
                    after.as_bytes(),
                    flag(after_cursor),
                    flag(count_unread),
                    count.as_bytes(),
                ],
            )
            .await?;
        let [start, trimmed, unread, rest @ ..] = &raw[..] else {
            return Err(RedisError::Reply("herald_open returned too little"));
        };
        Ok(Opening {
            start: optional_id(start)?,
            trimmed: integer(trimmed)? == 1,
            unread: u64::try_from(integer(unread)?).ok(),
            page: parse_page(rest)?,
        })
    }

    pub(crate) async fn page(
        &self,
        user: &str,
        after: StreamId,
        count: usize,
    ) -> Result<Page, RedisError> {
        let keys = [self.keys.inbox_key(user), self.keys.gone_key(user)];
        let (after, count) = (after.to_string(), count.to_string());
        let raw: Vec<Value> = self
            .fcall("herald_page", &keys, &[after.as_bytes(), count.as_bytes()])
            .await?;
        parse_page(&raw)
    }

    pub(crate) async fn ack(
        &self,
        user: &str,
        id: StreamId,
        session: Option<&str>,
    ) -> Result<Acked, RedisError> {
        let keys = [self.keys.cursor_key(user), self.keys.inbox_key(user)];
        let id = id.to_string();
        let (moved, cursor): (i64, String) = self
            .fcall(
                "herald_ack",
                &keys,
                &[id.as_bytes(), session.unwrap_or("").as_bytes()],
            )
            .await?;
        Ok(Acked {
            moved: moved == 1,
            cursor: if cursor.is_empty() {
                None
            } else {
                Some(parse_id(&cursor)?)
            },
        })
    }

    pub(crate) async fn retract(&self, user: &str, id: StreamId) -> Result<bool, RedisError> {
        let keys = [self.keys.inbox_key(user), self.keys.gone_key(user)];
        let id = id.to_string();
        let n: i64 = self
            .fcall("herald_retract", &keys, &[id.as_bytes()])
            .await?;
        Ok(n == 1)
    }
}

fn parse_id(s: &str) -> Result<StreamId, RedisError> {
    s.parse()
        .map_err(|_| RedisError::Reply("the inbox returned a malformed id"))
}

fn text(v: &Value) -> Result<&str, RedisError> {
    match v {
        Value::BulkString(b) => {
            std::str::from_utf8(b).map_err(|_| RedisError::Reply("the inbox returned bad text"))
        }
        Value::SimpleString(s) => Ok(s),
        _ => Err(RedisError::Reply("the inbox returned a non-string")),
    }
}

fn integer(v: &Value) -> Result<i64, RedisError> {
    match v {
        Value::Int(i) => Ok(*i),
        _ => Err(RedisError::Reply("the inbox returned a non-integer")),
    }
}

fn optional_id(v: &Value) -> Result<Option<StreamId>, RedisError> {
    let s = text(v)?;
    if s.is_empty() {
        Ok(None)
    } else {
        parse_id(s).map(Some)
    }
}

/// `{next, id1, data1, id2, data2, ...}` as the library's `page` returns it.
fn parse_page(raw: &[Value]) -> Result<Page, RedisError> {
    let [next, rest @ ..] = raw else {
        return Err(RedisError::Reply("the inbox returned an empty page"));
    };
    let mut entries = Vec::with_capacity(rest.len() / 2);
    for pair in rest.chunks(2) {
        let [id, data] = pair else {
            return Err(RedisError::Reply("the inbox returned an odd page"));
        };
        let Value::BulkString(data) = data else {
            return Err(RedisError::Reply("the inbox returned a non-string payload"));
        };
        entries.push(InboxEntry {
            id: parse_id(text(id)?)?,
            data: data.clone(),
        });
    }
    Ok(Page {
        entries,
        next: optional_id(next)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn library_carries_the_deployment_settings() {
        let lib = function_library(
            "hx",
            &InboxPolicy {
                max_len: 42,
                retention: Duration::from_secs(2),
                max_bytes: 777,
                idempotency_window: Duration::from_secs(60),
            },
        );
        assert!(lib.starts_with("#!lua name=herald\n"));
        assert!(lib.contains("local PREFIX = 'hx'"));
        assert!(lib.contains("local MAXLEN = 42"));
        assert!(lib.contains("local RETENTION = 2000"));
        assert!(lib.contains("local MAX_BYTES = 777"));
        assert!(lib.contains("local IDEM_WINDOW = 60000"));
        assert!(lib.contains("register_function('herald_notify'"));
        assert!(!lib.contains("__"), "every placeholder is replaced");
        assert!(lib.contains(&format!("local VERSION = {LIBRARY_VERSION}\n")));
    }

    #[test]
    fn pages_parse_and_malformed_replies_are_errors() {
        let raw = vec![
            Value::BulkString(b"5-0".to_vec()),
            Value::BulkString(b"4-0".to_vec()),
            Value::BulkString(b"{}".to_vec()),
        ];
        let p = parse_page(&raw).unwrap();
        assert_eq!(p.next, Some(StreamId { ms: 5, seq: 0 }));
        assert_eq!(p.entries[0].id, StreamId { ms: 4, seq: 0 });
        assert!(parse_page(&[]).is_err());
        assert!(parse_page(&raw[..2]).is_err());
        assert!(parse_page(&[Value::Int(1)]).is_err());
    }
}
