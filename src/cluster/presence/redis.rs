//! Redis presence. All writes and reads are Lua scripts that take the time from the Redis
//! server (`TIME`), so clock skew between nodes can neither resurrect nor kill a session.
//! docs/redis.md lists the keys; every one carries a TTL.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::try_join_all;
use redis::{Script, ScriptInvocation};

use super::{NodeStats, PresenceSession, Stats};
use crate::cluster::error::RedisError;
use crate::cluster::keys::Keys;
use crate::cluster::pool::Pool;
use crate::delivery::{Counts, SessionInfo};

/// Shared Lua prelude: every script gets the same first four ARGV (presence TTL, offline
/// grace, events stream cap and TTL) and the helpers `extend`, `emit` and `settle_due`.
const PRELUDE: &str = include_str!("../lua/presence_prelude.lua");

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
pub(crate) struct EventPolicy {
    /// How long a user may be without sessions before `offline` is emitted.
    pub(crate) grace: Duration,
    /// Approximate cap of the events stream.
    pub(crate) max_len: u64,
    /// Expiry of the events stream after its last event.
    pub(crate) retention: Duration,
}

/// Presence in Redis.
#[derive(Clone)]
pub(crate) struct RedisPresence {
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
    pub(crate) fn new(
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
            started_at: crate::clock::unix_ms(),
            ttl,
            events,
            scripts: Arc::new(Scripts {
                add: script(include_str!("../lua/presence_add.lua")),
                remove: script(include_str!("../lua/presence_remove.lua")),
                touch: script(include_str!("../lua/presence_touch.lua")),
                node: script(include_str!("../lua/node_heartbeat.lua")),
                deregister: script(include_str!("../lua/node_deregister.lua")),
                read_user: script(include_str!("../lua/presence_read.lua")),
                stats: script(include_str!("../lua/presence_stats.lua")),
                reap: script(include_str!("../lua/presence_reap.lua")),
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

    pub(crate) async fn add(&self, s: &SessionInfo, first_of_user: bool) -> Result<(), RedisError> {
        self.session_change(&self.scripts.add, s, first_of_user, &self.node)
            .await
    }

    /// `reason` (closed, kicked, drained) is what the user's `offline` event will say.
    pub(crate) async fn remove(
        &self,
        s: &SessionInfo,
        last_of_user: bool,
        reason: &str,
    ) -> Result<(), RedisError> {
        self.session_change(&self.scripts.remove, s, last_of_user, reason)
            .await
    }

    /// Runs the add or remove script, which share their keys and first arguments.
    async fn session_change(
        &self,
        script: &Script,
        s: &SessionInfo,
        flag: bool,
        last: &str,
    ) -> Result<(), RedisError> {
        let mut conn = self.pool.get().await?;
        let mut inv = self.invoke(script);
        inv.key(self.keys.users_key())
            .key(self.keys.presence_key(&s.user))
            .key(self.keys.node_key())
            .key(self.keys.events_key())
            .key(self.keys.offline_pending_key())
            .arg(&*s.user)
            .arg(self.member(s))
            .arg(flag as u8)
            .arg(last);
        let _: i64 = inv.invoke_async(&mut *conn).await?;
        Ok(())
    }

    pub(crate) async fn heartbeat(
        &self,
        sessions: &[SessionInfo],
        counts: Counts,
    ) -> Result<(), RedisError> {
        // The node record goes first: presence readers only trust live nodes' counts.
        let mut conn = self.pool.get().await?;
        let mut inv = self.invoke(&self.scripts.node);
        inv.key(self.keys.nodes_key())
            .key(self.keys.node_key())
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
                    Ok::<i64, RedisError>(n)
                });
            }
            try_join_all(calls).await?;
        }
        Ok(())
    }

    /// Emits `offline` for users whose grace ran out; returns how many.
    pub(crate) async fn reap(&self) -> Result<u64, RedisError> {
        let mut conn = self.pool.get().await?;
        let mut inv = self.invoke(&self.scripts.reap);
        inv.key(self.keys.users_key())
            .key(self.keys.events_key())
            .key(self.keys.offline_pending_key())
            .arg(self.keys.presence_key_prefix())
            .arg(REAP_BATCH);
        let n: i64 = inv.invoke_async(&mut *conn).await?;
        Ok(n.max(0) as u64)
    }

    pub(crate) async fn deregister(&self) -> Result<(), RedisError> {
        let mut conn = self.pool.get().await?;
        let mut inv = self.invoke(&self.scripts.deregister);
        inv.key(self.keys.nodes_key())
            .key(self.keys.node_key())
            .arg(&self.node);
        let _: i64 = inv.invoke_async(&mut *conn).await?;
        Ok(())
    }

    pub(crate) async fn user(&self, user: &str) -> Result<Vec<PresenceSession>, RedisError> {
        let mut conn = self.pool.get().await?;
        let mut inv = self.invoke(&self.scripts.read_user);
        inv.key(self.keys.presence_key(user));
        let members: Vec<String> = inv.invoke_async(&mut *conn).await?;
        let mut out: Vec<PresenceSession> =
            members.iter().filter_map(|m| parse_member(m)).collect();
        out.sort_by_key(|s| s.connected_at);
        Ok(out)
    }

    pub(crate) async fn stats(&self) -> Result<Stats, RedisError> {
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

fn parse_stats(raw: &[redis::Value]) -> Stats {
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
    Stats {
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
        let p = parse_member("abc|node-1|1700000000000").unwrap();
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
        let target = crate::cluster::connect::RedisTarget::Single {
            url: "redis://127.0.0.1:1".into(),
        };
        let pool = crate::cluster::pool::build(&target, 2).unwrap_or_else(|e| panic!("pool: {e}"));
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
        assert!(size_of_val(&get) <= 512, "{}", size_of_val(&get));
        let add = p.add(&info, true);
        assert!(size_of_val(&add) <= 2048, "{}", size_of_val(&add));
        let rm = p.remove(&info, true, "closed");
        assert!(size_of_val(&rm) <= 2048, "{}", size_of_val(&rm));
    }
}
