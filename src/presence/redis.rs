//! Redis presence. All writes and reads are Lua scripts that take the time from the Redis
//! server (`TIME`), so clock skew between nodes can neither resurrect nor kill a session.
//! docs/redis.md lists the keys; every one carries a TTL.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::Pool;
use futures_util::future::try_join_all;
use redis::Script;

use super::PresenceError;
use crate::hub::{Counts, SessionInfo};
use crate::keys::Keys;
use crate::protocol::{NodeStats, PresenceSession, StatsResponse};

/// Shared Lua prelude: `now` and `exp` in Redis-server milliseconds, and a helper that
/// extends a key's TTL to at least `ttl` without ever shortening it.
const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local exp = string.format('%.0f', now + ttl)
local function extend(key)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
"#;

/// KEYS: users, presence:<uid>, node:<id>. ARGV: ttl, uid, member, first_of_user (0/1).
const ADD: &str = r#"
redis.call('ZADD', KEYS[2], exp, ARGV[3])
extend(KEYS[2])
redis.call('ZADD', KEYS[1], 'GT', exp, ARGV[2])
extend(KEYS[1])
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'connections', 1)
  if ARGV[4] == '1' then redis.call('HINCRBY', KEYS[3], 'users', 1) end
end
return 1
"#;

/// KEYS: users, presence:<uid>, node:<id>. ARGV: ttl (unused), uid, member, last_of_user.
const REMOVE: &str = r#"
local removed = redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('ZREM', KEYS[1], ARGV[2]) end
if removed == 1 and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'connections', -1)
  if ARGV[4] == '1' then redis.call('HINCRBY', KEYS[3], 'users', -1) end
end
return removed
"#;

/// KEYS: users, presence:<uid1>, presence:<uid2>, ...
/// ARGV: ttl, then per user: uid, member count, members...
const TOUCH: &str = r#"
local i = 2
for k = 2, #KEYS do
  local uid = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', now)
  for j = 1, n do redis.call('ZADD', KEYS[k], exp, ARGV[i + 1 + j]) end
  extend(KEYS[k])
  redis.call('ZADD', KEYS[1], 'GT', exp, uid)
  i = i + 2 + n
end
extend(KEYS[1])
return #KEYS - 1
"#;

/// KEYS: nodes, node:<id>, users. ARGV: ttl, node id, connections, users, started_at, listen.
const NODE: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], exp, ARGV[2])
extend(KEYS[1])
redis.call('HSET', KEYS[2], 'connections', ARGV[3], 'users', ARGV[4], 'started_at', ARGV[5], 'listen', ARGV[6])
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
return now
"#;

/// KEYS: nodes, node:<id>. ARGV: ttl (unused), node id.
const DEREGISTER: &str = r#"
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"#;

/// KEYS: presence:<uid>. ARGV: ttl (unused). Returns live members.
const READ_USER: &str = r#"
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
"#;

/// KEYS: nodes, users. ARGV: ttl (unused), node key prefix.
/// Returns {users, id1, connections1, users1, id2, ...} for live nodes.
const STATS: &str = r#"
local out = { redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf') }
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
  local h = redis.call('HMGET', ARGV[2] .. id, 'connections', 'users')
  table.insert(out, id)
  table.insert(out, tonumber(h[1]) or 0)
  table.insert(out, tonumber(h[2]) or 0)
end
return out
"#;

/// Users per TOUCH call: keeps each script run short so Redis stays responsive.
const TOUCH_BATCH: usize = 200;

struct Scripts {
    add: Script,
    remove: Script,
    touch: Script,
    node: Script,
    deregister: Script,
    read_user: Script,
    stats: Script,
}

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

/// Presence in Redis.
#[derive(Clone)]
pub struct RedisPresence {
    pool: Pool,
    keys: Keys,
    node: String,
    listen: String,
    started_at: u64,
    ttl: Duration,
    scripts: Arc<Scripts>,
}

impl RedisPresence {
    pub fn new(pool: Pool, keys: Keys, node: &str, listen: &str, ttl: Duration) -> Self {
        RedisPresence {
            pool,
            keys,
            node: node.to_string(),
            listen: listen.to_string(),
            started_at: crate::unix_ms(),
            ttl,
            scripts: Arc::new(Scripts {
                add: script(ADD),
                remove: script(REMOVE),
                touch: script(TOUCH),
                node: script(NODE),
                deregister: script(DEREGISTER),
                read_user: script(READ_USER),
                stats: script(STATS),
            }),
        }
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    /// The ZSET member for a session: `<session>|<node>|<connected_at ms>`.
    fn member(&self, s: &SessionInfo) -> String {
        format!("{}|{}|{}", s.id, self.node, s.connected_at)
    }

    pub async fn add(&self, s: &SessionInfo, first_of_user: bool) -> Result<(), PresenceError> {
        let mut conn = self.pool.get().await?;
        let _: i64 = self
            .scripts
            .add
            .key(self.keys.users_key())
            .key(self.keys.presence_key(&s.user))
            .key(self.keys.node_key(&self.node))
            .arg(self.ttl_ms())
            .arg(&*s.user)
            .arg(self.member(s))
            .arg(first_of_user as u8)
            .invoke_async(&mut *conn)
            .await?;
        Ok(())
    }

    pub async fn remove(&self, s: &SessionInfo, last_of_user: bool) -> Result<(), PresenceError> {
        let mut conn = self.pool.get().await?;
        let _: i64 = self
            .scripts
            .remove
            .key(self.keys.users_key())
            .key(self.keys.presence_key(&s.user))
            .key(self.keys.node_key(&self.node))
            .arg(self.ttl_ms())
            .arg(&*s.user)
            .arg(self.member(s))
            .arg(last_of_user as u8)
            .invoke_async(&mut *conn)
            .await?;
        Ok(())
    }

    pub async fn heartbeat(
        &self,
        sessions: &[SessionInfo],
        counts: Counts,
    ) -> Result<(), PresenceError> {
        // The node record goes first: presence readers only trust live nodes' counts.
        let mut conn = self.pool.get().await?;
        let _: i64 = self
            .scripts
            .node
            .key(self.keys.nodes_key())
            .key(self.keys.node_key(&self.node))
            .key(self.keys.users_key())
            .arg(self.ttl_ms())
            .arg(&self.node)
            .arg(counts.connections)
            .arg(counts.users)
            .arg(self.started_at)
            .arg(&self.listen)
            .invoke_async(&mut *conn)
            .await?;

        let mut by_user: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for s in sessions {
            by_user.entry(&s.user).or_default().push(self.member(s));
        }
        let users: Vec<(&str, Vec<String>)> = by_user.into_iter().collect();
        // The multiplexed connection pipelines these concurrent calls on one socket.
        let calls = users.chunks(TOUCH_BATCH).map(|chunk| {
            let mut inv = self.scripts.touch.key(self.keys.users_key());
            inv.arg(self.ttl_ms());
            for (user, members) in chunk {
                inv.key(self.keys.presence_key(user));
                inv.arg(*user).arg(members.len()).arg(members);
            }
            let mut conn = conn.clone();
            async move {
                let n: i64 = inv.invoke_async(&mut conn).await?;
                Ok::<i64, PresenceError>(n)
            }
        });
        try_join_all(calls).await?;
        Ok(())
    }

    pub async fn deregister(&self) -> Result<(), PresenceError> {
        let mut conn = self.pool.get().await?;
        let _: i64 = self
            .scripts
            .deregister
            .key(self.keys.nodes_key())
            .key(self.keys.node_key(&self.node))
            .arg(self.ttl_ms())
            .arg(&self.node)
            .invoke_async(&mut *conn)
            .await?;
        Ok(())
    }

    pub async fn user(&self, user: &str) -> Result<Vec<PresenceSession>, PresenceError> {
        let mut conn = self.pool.get().await?;
        let members: Vec<String> = self
            .scripts
            .read_user
            .key(self.keys.presence_key(user))
            .arg(self.ttl_ms())
            .invoke_async(&mut *conn)
            .await?;
        let mut out: Vec<PresenceSession> =
            members.iter().filter_map(|m| parse_member(m)).collect();
        out.sort_by_key(|s| s.connected_at);
        Ok(out)
    }

    pub async fn stats(&self) -> Result<StatsResponse, PresenceError> {
        let mut conn = self.pool.get().await?;
        let raw: Vec<redis::Value> = self
            .scripts
            .stats
            .key(self.keys.nodes_key())
            .key(self.keys.users_key())
            .arg(self.ttl_ms())
            .arg(self.keys.node_key_prefix())
            .invoke_async(&mut *conn)
            .await?;
        Ok(parse_stats(&raw))
    }
}

fn parse_member(m: &str) -> Option<PresenceSession> {
    let mut parts = m.splitn(3, '|');
    let session = parts.next()?.to_string();
    let node = parts.next()?.to_string();
    let connected_at = parts.next()?.parse().ok()?;
    Some(PresenceSession {
        session,
        node,
        connected_at,
    })
}

fn as_u64(v: &redis::Value) -> u64 {
    match v {
        redis::Value::Int(i) => (*i).max(0) as u64,
        redis::Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn parse_stats(raw: &[redis::Value]) -> StatsResponse {
    let users = raw.first().map(as_u64).unwrap_or(0);
    let mut nodes = Vec::new();
    for chunk in raw.get(1..).unwrap_or_default().chunks_exact(3) {
        let node = match &chunk[0] {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            redis::Value::SimpleString(s) => s.clone(),
            _ => continue,
        };
        nodes.push(NodeStats {
            node,
            connections: as_u64(&chunk[1]),
            users: as_u64(&chunk[2]),
        });
    }
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    StatsResponse {
        connections: nodes.iter().map(|n| n.connections).sum(),
        users,
        nodes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_parse_back() {
        let p = parse_member("abc|node-1|1700000000000").unwrap(); // safe: test
        assert_eq!(p.session, "abc");
        assert_eq!(p.node, "node-1");
        assert_eq!(p.connected_at, 1_700_000_000_000);
        assert!(parse_member("abc|node").is_none());
        assert!(parse_member("abc|node|x").is_none());
    }

    #[test]
    fn stats_sum_live_nodes() {
        use redis::Value::{BulkString, Int};
        let raw = vec![
            Int(3),
            BulkString(b"b".to_vec()),
            Int(2),
            Int(2),
            BulkString(b"a".to_vec()),
            Int(5),
            Int(1),
        ];
        let s = parse_stats(&raw);
        assert_eq!(s.connections, 7);
        assert_eq!(s.users, 3);
        assert_eq!(s.nodes[0].node, "a");
    }
}
