//! Redis presence. All writes and reads are Lua scripts that take the time from the Redis
//! server (`TIME`), so clock skew between nodes can neither resurrect nor kill a session.
//! docs/redis.md lists the keys; every one carries a TTL.

use std::sync::Arc;
use std::time::Duration;

use crate::redis_pool::Pool;
use futures_util::future::try_join_all;
use redis::{Script, ScriptInvocation};

use super::PresenceError;
use crate::hub::{Counts, SessionInfo};
use crate::keys::Keys;
use crate::protocol::{NodeStats, PresenceSession, StatsResponse};

/// Shared Lua prelude. Every script gets the same first four ARGV: presence TTL, offline
/// grace, events stream cap and events stream TTL (ms). It defines `now` and `exp` in
/// Redis-server milliseconds, `extend` (grows a key's TTL, never shrinks it) and `emit`
/// (appends an online/offline event to the events stream and publishes it).
const PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local grace = tonumber(ARGV[2])
local events_max = tonumber(ARGV[3])
local events_ttl = tonumber(ARGV[4])
local function ms(x) return string.format('%.0f', x) end
local exp = ms(now + ttl)
local function extend(key, min)
  min = min or ttl
  if redis.call('PTTL', key) < min then redis.call('PEXPIRE', key, min) end
end
local function emit(events, kind, uid, reason, node)
  local fields = {'type', kind, 'user', uid, 'ts', ms(now)}
  local ev = {type = kind, user = uid, ts = now}
  if reason ~= '' then
    table.insert(fields, 'reason'); table.insert(fields, reason); ev.reason = reason
  end
  if node ~= '' then
    table.insert(fields, 'node'); table.insert(fields, node); ev.node = node
  end
  ev.id = redis.call('XADD', events, 'MAXLEN', '~', events_max, '*', unpack(fields))
  extend(events, events_ttl)
  redis.call('PUBLISH', events, cjson.encode(ev))
end
-- A user is online while their users-score is above now + grace, pending offline while it
-- is between now and now + grace, and due for an offline event once it is below now.
local function settle_due(users, events, pending, uid)
  local known = redis.call('ZSCORE', users, uid)
  if known and tonumber(known) <= now then
    emit(events, 'offline', uid, redis.call('HGET', pending, uid) or 'expired', '')
    redis.call('HDEL', pending, uid)
    return false
  end
  if known and tonumber(known) <= now + grace then redis.call('HDEL', pending, uid) end
  return known
end
"#;

/// KEYS: users, presence:<uid>, node:<id>, events, offline-pending.
/// ARGV: (prelude), uid, member, first_of_user (0/1), node id.
const ADD: &str = r#"
local uid = ARGV[5]
local known = settle_due(KEYS[1], KEYS[4], KEYS[5], uid)
redis.call('ZADD', KEYS[2], exp, ARGV[6])
extend(KEYS[2])
redis.call('ZADD', KEYS[1], 'GT', ms(now + ttl + grace), uid)
extend(KEYS[1], ttl + grace)
if not known then emit(KEYS[4], 'online', uid, '', ARGV[8]) end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'connections', 1)
  if ARGV[7] == '1' then redis.call('HINCRBY', KEYS[3], 'users', 1) end
end
return 1
"#;

/// KEYS: users, presence:<uid>, node:<id>, events, offline-pending.
/// ARGV: (prelude), uid, member, last_of_user (0/1), reason (closed, kicked, drained).
/// The user's last session anywhere starts the grace window; the reaper emits `offline`.
const REMOVE: &str = r#"
local uid = ARGV[5]
local removed = redis.call('ZREM', KEYS[2], ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms(now))
if redis.call('ZCARD', KEYS[2]) == 0 and redis.call('ZSCORE', KEYS[1], uid) then
  redis.call('ZADD', KEYS[1], 'XX', ms(now + grace), uid)
  redis.call('HSET', KEYS[5], uid, ARGV[8])
  extend(KEYS[5], ttl + grace)
end
if removed == 1 and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'connections', -1)
  if ARGV[7] == '1' then redis.call('HINCRBY', KEYS[3], 'users', -1) end
end
return removed
"#;

/// KEYS: users, events, offline-pending, presence:<uid1>, presence:<uid2>, ...
/// ARGV: (prelude), node id, then per user: uid, member count, members...
const TOUCH: &str = r#"
local i = 6
for k = 4, #KEYS do
  local uid = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', ms(now))
  for j = 1, n do redis.call('ZADD', KEYS[k], exp, ARGV[i + 1 + j]) end
  extend(KEYS[k])
  local known = settle_due(KEYS[1], KEYS[2], KEYS[3], uid)
  redis.call('ZADD', KEYS[1], 'GT', ms(now + ttl + grace), uid)
  if not known then emit(KEYS[2], 'online', uid, '', ARGV[5]) end
  i = i + 2 + n
end
extend(KEYS[1], ttl + grace)
return #KEYS - 3
"#;

/// KEYS: users, events, offline-pending. ARGV: (prelude), presence key prefix, limit.
/// Emits exactly one `offline` per user whose grace has run out and who has no live
/// session; atomic, so any number of nodes may run it concurrently.
const REAP: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ms(now), 'LIMIT', 0, tonumber(ARGV[6]))
local n = 0
for _, uid in ipairs(due) do
  local pkey = ARGV[5] .. uid
  redis.call('ZREMRANGEBYSCORE', pkey, '-inf', ms(now))
  local best = redis.call('ZREVRANGE', pkey, 0, 0, 'WITHSCORES')
  if best[2] then
    redis.call('ZADD', KEYS[1], ms(tonumber(best[2]) + grace), uid)
  else
    redis.call('ZREM', KEYS[1], uid)
    emit(KEYS[2], 'offline', uid, redis.call('HGET', KEYS[3], uid) or 'expired', '')
    redis.call('HDEL', KEYS[3], uid)
    n = n + 1
  end
end
return n
"#;

/// KEYS: nodes, node:<id>. ARGV: (prelude), node id, connections, users, started_at, listen.
const NODE: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms(now))
redis.call('ZADD', KEYS[1], exp, ARGV[5])
extend(KEYS[1])
redis.call('HSET', KEYS[2], 'connections', ARGV[6], 'users', ARGV[7], 'started_at', ARGV[8], 'listen', ARGV[9])
redis.call('PEXPIRE', KEYS[2], ttl)
return now
"#;

/// KEYS: nodes, node:<id>. ARGV: (prelude), node id.
const DEREGISTER: &str = r#"
redis.call('ZREM', KEYS[1], ARGV[5])
redis.call('DEL', KEYS[2])
return 1
"#;

/// KEYS: presence:<uid>. ARGV: (prelude). Returns live members.
const READ_USER: &str = r#"
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ms(now), '+inf')
"#;

/// KEYS: nodes, users. ARGV: (prelude), node key prefix.
/// Returns {users, id1, connections1, users1, id2, ...} for live nodes. Users in their
/// offline grace window are not counted.
const STATS: &str = r#"
local out = { redis.call('ZCOUNT', KEYS[2], '(' .. ms(now + grace), '+inf') }
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ms(now), '+inf')) do
  local h = redis.call('HMGET', ARGV[5] .. id, 'connections', 'users')
  table.insert(out, id)
  table.insert(out, tonumber(h[1]) or 0)
  table.insert(out, tonumber(h[2]) or 0)
end
return out
"#;

/// Most users one reaper run settles.
const REAP_BATCH: usize = 200;

/// Users per TOUCH call: keeps each script run short so Redis stays responsive.
const TOUCH_BATCH: usize = 200;
/// TOUCH calls in flight at once (pipelined on one multiplexed connection).
const TOUCH_CONCURRENCY: usize = 4;

struct Scripts {
    add: Script,
    remove: Script,
    touch: Script,
    node: Script,
    deregister: Script,
    read_user: Script,
    stats: Script,
    reap: Script,
}

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

/// Online/offline event settings.
#[derive(Debug, Clone, Copy)]
pub struct EventPolicy {
    /// How long a user may be without sessions before `offline` is emitted.
    pub grace: Duration,
    /// Approximate cap of the events stream.
    pub max_len: u64,
    /// Expiry of the events stream after its last event.
    pub retention: Duration,
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
    events: EventPolicy,
    scripts: Arc<Scripts>,
}

impl RedisPresence {
    pub fn new(
        pool: Pool,
        keys: Keys,
        node: &str,
        listen: &str,
        ttl: Duration,
        events: EventPolicy,
    ) -> Self {
        RedisPresence {
            pool,
            keys,
            node: node.to_string(),
            listen: listen.to_string(),
            started_at: crate::unix_ms(),
            ttl,
            events,
            scripts: Arc::new(Scripts {
                add: script(ADD),
                remove: script(REMOVE),
                touch: script(TOUCH),
                node: script(NODE),
                deregister: script(DEREGISTER),
                read_user: script(READ_USER),
                stats: script(STATS),
                reap: script(REAP),
            }),
        }
    }

    /// Starts an invocation with the four prelude arguments every script expects.
    fn invoke<'a>(&self, script: &'a Script) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.arg(self.ttl.as_millis() as u64)
            .arg(self.events.grace.as_millis() as u64)
            .arg(self.events.max_len)
            .arg(self.events.retention.as_millis() as u64);
        inv
    }

    /// The ZSET member for a session: `<session>|<node>|<connected_at ms>`.
    fn member(&self, s: &SessionInfo) -> String {
        format!("{}|{}|{}", s.id, self.node, s.connected_at)
    }

    pub async fn add(&self, s: &SessionInfo, first_of_user: bool) -> Result<(), PresenceError> {
        let mut conn = self.pool.get().await?;
        let mut inv = self.invoke(&self.scripts.add);
        inv.key(self.keys.users_key())
            .key(self.keys.presence_key(&s.user))
            .key(self.keys.node_key(&self.node))
            .key(self.keys.events_key())
            .key(self.keys.offline_pending_key())
            .arg(&*s.user)
            .arg(self.member(s))
            .arg(first_of_user as u8)
            .arg(&self.node);
        let _: i64 = inv.invoke_async(&mut *conn).await?;
        Ok(())
    }

    pub async fn remove(
        &self,
        s: &SessionInfo,
        last_of_user: bool,
        reason: &str,
    ) -> Result<(), PresenceError> {
        let mut conn = self.pool.get().await?;
        let mut inv = self.invoke(&self.scripts.remove);
        inv.key(self.keys.users_key())
            .key(self.keys.presence_key(&s.user))
            .key(self.keys.node_key(&self.node))
            .key(self.keys.events_key())
            .key(self.keys.offline_pending_key())
            .arg(&*s.user)
            .arg(self.member(s))
            .arg(last_of_user as u8)
            .arg(reason);
        let _: i64 = inv.invoke_async(&mut *conn).await?;
        Ok(())
    }

    pub async fn heartbeat(
        &self,
        sessions: &[SessionInfo],
        counts: Counts,
    ) -> Result<(), PresenceError> {
        // The node record goes first: presence readers only trust live nodes' counts.
        let mut conn = self.pool.get().await?;
        let mut inv = self.invoke(&self.scripts.node);
        inv.key(self.keys.nodes_key())
            .key(self.keys.node_key(&self.node))
            .arg(&self.node)
            .arg(counts.connections)
            .arg(counts.users)
            .arg(self.started_at)
            .arg(&self.listen);
        let _: i64 = inv.invoke_async(&mut *conn).await?;

        // Sessions grouped by user, in chunks of TOUCH_BATCH users, sent in waves of
        // TOUCH_CONCURRENCY calls: a heartbeat of a big node never materialises every
        // member string at once (glibc would keep that peak as RSS).
        let mut sorted: Vec<&SessionInfo> = sessions.iter().collect();
        sorted.sort_unstable_by(|a, b| a.user.cmp(&b.user));
        let groups: Vec<&[&SessionInfo]> = sorted.chunk_by(|a, b| a.user == b.user).collect();
        for wave in groups.chunks(TOUCH_BATCH * TOUCH_CONCURRENCY) {
            let mut calls = Vec::with_capacity(TOUCH_CONCURRENCY);
            for chunk in wave.chunks(TOUCH_BATCH) {
                let mut inv = self.invoke(&self.scripts.touch);
                inv.key(self.keys.users_key())
                    .key(self.keys.events_key())
                    .key(self.keys.offline_pending_key())
                    .arg(&self.node);
                for group in chunk {
                    let user = &group[0].user;
                    inv.key(self.keys.presence_key(user));
                    inv.arg(&**user).arg(group.len());
                    for s in group.iter() {
                        inv.arg(self.member(s));
                    }
                }
                let mut conn = conn.clone();
                calls.push(async move {
                    let n: i64 = inv.invoke_async(&mut conn).await?;
                    Ok::<i64, PresenceError>(n)
                });
            }
            try_join_all(calls).await?;
        }
        Ok(())
    }

    /// Drops every idle pooled connection, so the next operations connect afresh. Called
    /// after a failed heartbeat: the pool checks connections only now and then, and a
    /// connection broken by a Redis restart would otherwise be handed out again.
    pub fn reset_connections(&self) {
        self.pool.retain(|_, _| false);
    }

    /// Emits `offline` for users whose grace ran out; returns how many.
    pub async fn reap(&self) -> Result<u64, PresenceError> {
        let mut conn = self.pool.get().await?;
        let mut inv = self.invoke(&self.scripts.reap);
        inv.key(self.keys.users_key())
            .key(self.keys.events_key())
            .key(self.keys.offline_pending_key())
            .arg(self.keys.presence_key(""))
            .arg(REAP_BATCH);
        let n: i64 = inv.invoke_async(&mut *conn).await?;
        Ok(n.max(0) as u64)
    }

    pub async fn deregister(&self) -> Result<(), PresenceError> {
        let mut conn = self.pool.get().await?;
        let mut inv = self.invoke(&self.scripts.deregister);
        inv.key(self.keys.nodes_key())
            .key(self.keys.node_key(&self.node))
            .arg(&self.node);
        let _: i64 = inv.invoke_async(&mut *conn).await?;
        Ok(())
    }

    pub async fn user(&self, user: &str) -> Result<Vec<PresenceSession>, PresenceError> {
        let mut conn = self.pool.get().await?;
        let mut inv = self.invoke(&self.scripts.read_user);
        inv.key(self.keys.presence_key(user));
        let members: Vec<String> = inv.invoke_async(&mut *conn).await?;
        let mut out: Vec<PresenceSession> =
            members.iter().filter_map(|m| parse_member(m)).collect();
        out.sort_by_key(|s| s.connected_at);
        Ok(out)
    }

    pub async fn stats(&self) -> Result<StatsResponse, PresenceError> {
        let mut conn = self.pool.get().await?;
        let mut inv = self.invoke(&self.scripts.stats);
        inv.key(self.keys.nodes_key())
            .key(self.keys.users_key())
            .arg(self.keys.node_key_prefix());
        let raw: Vec<redis::Value> = inv.invoke_async(&mut *conn).await?;
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

    /// Thousands of sessions may wait for a Redis connection at once (a reconnect storm, a
    /// mass disconnect); each waits inside one of these futures, so they must stay small.
    /// deadpool's own checkout future is ~7 KB, which is why `redis_pool::Pool` gates and
    /// boxes it.
    #[tokio::test]
    async fn presence_futures_stay_small_while_waiting_for_a_connection() {
        let pool = crate::redis_pool::build("redis://127.0.0.1:1", 2)
            .unwrap_or_else(|e| panic!("pool: {e}"));
        let p = RedisPresence::new(
            pool,
            Keys::new("p", "n"),
            "n",
            "127.0.0.1:1",
            Duration::from_secs(30),
            EventPolicy {
                grace: Duration::from_secs(5),
                max_len: 10,
                retention: Duration::from_secs(60),
            },
        );
        let info = SessionInfo {
            id: uuid::Uuid::new_v4(),
            user: "u".into(),
            topics: Vec::new().into(),
            connected_at: 0,
        };
        let get = p.pool.get();
        assert!(
            std::mem::size_of_val(&get) <= 512,
            "{}",
            std::mem::size_of_val(&get)
        );
        let add = p.add(&info, true);
        assert!(
            std::mem::size_of_val(&add) <= 2048,
            "{}",
            std::mem::size_of_val(&add)
        );
        let rm = p.remove(&info, true, "closed");
        assert!(
            std::mem::size_of_val(&rm) <= 2048,
            "{}",
            std::mem::size_of_val(&rm)
        );
    }
}
