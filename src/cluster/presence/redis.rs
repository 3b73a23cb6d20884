//! Redis presence on node leases. A node holds a lease (a hash that lives `--presence-ttl`
//! after its last heartbeat); each session is written once, into its user's presence hash,
//! tagged with the lease; readers keep the sessions of live leases, and when a lease dies
//! some live node's reaper drops its sessions user by user. So the heartbeat costs the same
//! whatever the node holds: it extends the lease and refreshes a slice of its users (each
//! user once per [`REFRESH_PERIOD`], to keep every key's TTL). All scripts take the time from
//! the Redis server (`TIME`), so clock skew between nodes can neither resurrect nor kill a
//! session. Every script touches one slot, so the same code runs on Redis Cluster.
//! docs/redis.md lists the keys; every one carries a TTL.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use redis::aio::ConnectionLike;
use redis::{Script, ScriptInvocation, Value};

use super::{NodeStats, PresenceSession, Stats};
use crate::cluster::error::RedisError;
use crate::cluster::keys::Keys;
use crate::cluster::pool::Pool;
use crate::delivery::{Counts, SessionInfo};

/// Shared Lua prelude: every script gets the same first five ARGV (presence TTL, offline
/// grace, events stream cap and TTL, whether events are written inline) and its helpers.
const PRELUDE: &str = include_str!("../lua/presence_prelude.lua");

/// Values of `dirty`: no rewrite is due; a session write failed; the subscription was
/// rebuilt (a Redis restart or failover may have lost recent writes).
const DIRTY_NONE: u8 = 0;
const DIRTY_WRITE_FAILED: u8 = 1;
const DIRTY_RESUBSCRIBED: u8 = 2;
/// The reason a rotation after a rebuilt subscription logs.
const RESUBSCRIBED: &str = "the subscription was rebuilt";

/// How often every user a node holds has its presence key refreshed (by one heartbeat in
/// `REFRESH_PERIOD / heartbeat interval`). The key TTL is twice this plus the presence TTL.
/// The only heartbeat work that grows with sessions, and it grows by one script call per
/// user per half hour.
pub(crate) const REFRESH_PERIOD: Duration = Duration::from_secs(30 * 60);

/// How long a dead lease's sets outlive it, for reapers to visit them. Reapers run every
/// second, so this only matters when every node is gone at once (then nothing is reaped and
/// everything expires by itself).
const REAP_WINDOW: Duration = Duration::from_secs(120);

/// Users one reaper pass takes from one lease (pending or dropped).
const REAP_BATCH: usize = 200;

/// Dead leases one reaper pass visits.
const DEAD_LEASES_PER_PASS: usize = 8;

/// How long a reaper's claim on a dead lease lasts; it renews it every pass.
const REAPER_CLAIM: Duration = Duration::from_secs(10);

/// Per-user script calls in flight at once (pipelined on one multiplexed connection): a
/// re-assertion of a big node is many short calls, never one long one.
const USER_CALLS_IN_FLIGHT: usize = 32;

/// What presence runs its scripts on: the pool's multiplexed connection, cheap to clone
/// for calls in flight together.
trait Connection: ConnectionLike + Clone + Send + Sync {}
impl<T: ConnectionLike + Clone + Send + Sync> Connection for T {}

struct Scripts {
    add: Script,
    remove: Script,
    settle: Script,
    drop: Script,
    refresh: Script,
    read_user: Script,
    events: Script,
    lease_beat: Script,
    lease_session: Script,
    lease_work: Script,
    lease_done: Script,
    registry_beat: Script,
    registry_scan: Script,
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

/// The node's current lease: `<node>~<epoch>`. A new epoch replaces it when the lease was
/// lost (the node was away longer than the TTL, or Redis lost its data) or when a write
/// failed (the new lease's full re-assertion is what reconciles).
struct Lease {
    id: String,
    /// Whether `lease_beat` has created it in Redis.
    created: bool,
    /// Heartbeats under this lease: picks each beat's refresh slice.
    beats: u64,
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
    heartbeat: Duration,
    events: EventPolicy,
    /// Events are written by the presence scripts themselves (one Redis), or handed back and
    /// appended by the node (Redis Cluster: the events stream lives in another slot).
    inline_events: bool,
    lease: Arc<Mutex<Lease>>,
    /// Why the next heartbeat takes a new lease and writes everything ([`DIRTY_NONE`] when
    /// it need not): a session write failed, or the subscription was rebuilt.
    dirty: Arc<AtomicU8>,
    /// A full rewrite is in flight; sessions closed meanwhile are listed in `closed`.
    reasserting: Arc<AtomicBool>,
    closed: Arc<Mutex<Vec<(SessionInfo, String)>>>,
    epochs: Arc<AtomicU64>,
    scripts: Arc<Scripts>,
}

/// What a presence script replies: its result, an extra value and the events it handed back.
struct Reply {
    result: i64,
    extra: String,
    events: Vec<String>,
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        other => text(other).parse().unwrap_or(0),
    }
}

impl Reply {
    fn parse(raw: Vec<Value>) -> Reply {
        let mut it = raw.into_iter();
        Reply {
            result: it.next().map(|v| int(&v)).unwrap_or(0),
            extra: it.next().map(|v| text(&v)).unwrap_or_default(),
            events: it.map(|v| text(&v)).collect(),
        }
    }
}

impl RedisPresence {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        pool: Pool,
        keys: Keys,
        node: &str,
        listen: &str,
        ttl: Duration,
        heartbeat: Duration,
        events: EventPolicy,
        inline_events: bool,
    ) -> Self {
        let epoch = rand_epoch(0);
        RedisPresence {
            pool,
            keys,
            node: node.to_string(),
            listen: listen.to_string(),
            started_at: crate::clock::unix_ms(),
            ttl,
            heartbeat,
            events,
            inline_events,
            lease: Arc::new(Mutex::new(Lease {
                id: format!("{node}~{epoch:08x}"),
                created: false,
                beats: 0,
            })),
            dirty: Arc::default(),
            reasserting: Arc::default(),
            closed: Arc::default(),
            epochs: Arc::new(AtomicU64::new(1)),
            scripts: Arc::new(Scripts {
                add: script(include_str!("../lua/presence_add.lua")),
                remove: script(include_str!("../lua/presence_remove.lua")),
                settle: script(include_str!("../lua/presence_settle.lua")),
                drop: script(include_str!("../lua/presence_drop.lua")),
                refresh: script(include_str!("../lua/presence_refresh.lua")),
                read_user: script(include_str!("../lua/presence_read.lua")),
                events: script(include_str!("../lua/events_append.lua")),
                lease_beat: script(include_str!("../lua/lease_beat.lua")),
                lease_session: script(include_str!("../lua/lease_session.lua")),
                lease_work: script(include_str!("../lua/lease_work.lua")),
                lease_done: script(include_str!("../lua/lease_done.lua")),
                registry_beat: script(include_str!("../lua/registry_beat.lua")),
                registry_scan: script(include_str!("../lua/registry_scan.lua")),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lease> {
        // The lease is replaced whole, never left half-written, so a poisoned lock is usable.
        self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lease_id(&self) -> String {
        self.lock().id.clone()
    }

    /// Starts an invocation with the five prelude arguments every script expects.
    fn invoke<'a>(&self, script: &'a Script) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.arg(self.ttl.as_millis() as u64)
            .arg(self.events.grace.as_millis() as u64)
            .arg(self.events.max_len)
            .arg(self.events.retention.as_millis() as u64)
            .arg(if self.inline_events { "1" } else { "0" });
        inv
    }

    /// A per-user presence script on `user`'s key, with the events keys when inline.
    fn user_script<'a>(&self, script: &'a Script, user: &str) -> ScriptInvocation<'a> {
        let mut inv = self.invoke(script);
        inv.key(self.keys.presence_key(user));
        if self.inline_events {
            inv.key(self.keys.events_key()).key(self.keys.online_key());
        }
        inv.arg(user);
        inv
    }

    /// Runs a per-user script and appends the events it handed back (Redis Cluster).
    async fn run_user(
        &self,
        conn: &mut impl Connection,
        inv: &ScriptInvocation<'_>,
    ) -> Result<Reply, RedisError> {
        let raw: Vec<Value> = inv.invoke_async(conn).await?;
        let reply = Reply::parse(raw);
        if !reply.events.is_empty() {
            let mut ev = self.invoke(&self.scripts.events);
            ev.key(self.keys.events_key()).key(self.keys.online_key());
            for e in &reply.events {
                ev.arg(e);
            }
            let _: i64 = ev.invoke_async(conn).await?;
        }
        Ok(reply)
    }

    fn key_ttl(&self) -> u64 {
        (REFRESH_PERIOD * 2 + self.ttl).as_millis() as u64
    }

    fn window_ms(&self) -> u64 {
        REAP_WINDOW.as_millis() as u64
    }

    /// The value of a session's field: `<lease>|<connected_at>`.
    fn value(lease: &str, s: &SessionInfo) -> String {
        format!("{lease}|{}", s.connected_at)
    }

    /// The lease's own record of a session opening or closing.
    async fn lease_session(
        &self,
        conn: &mut impl Connection,
        lease: &str,
        user: &str,
        delta: i64,
        edge: bool,
        due: &str,
    ) -> Result<(), RedisError> {
        let mut inv = self.invoke(&self.scripts.lease_session);
        inv.key(self.keys.lease_key(lease))
            .key(self.keys.lease_users_key(lease))
            .key(self.keys.lease_pending_key(lease))
            .arg(user)
            .arg(delta)
            .arg(if edge { "1" } else { "0" })
            .arg(due)
            .arg(self.window_ms());
        let _: i64 = inv.invoke_async(conn).await?;
        Ok(())
    }

    /// Marks presence for a full rewrite under a new lease when `result` failed.
    fn note<T>(&self, result: Result<T, RedisError>) -> Result<T, RedisError> {
        if result.is_err() {
            self.dirty.store(DIRTY_WRITE_FAILED, Ordering::Relaxed);
        }
        result
    }

    pub(crate) async fn add(&self, s: &SessionInfo, first_of_user: bool) -> Result<(), RedisError> {
        let r = self.add_inner(s, first_of_user).await;
        self.note(r)
    }

    async fn add_inner(&self, s: &SessionInfo, first_of_user: bool) -> Result<(), RedisError> {
        let lease = self.lease_id();
        let pooled = self.pool.get().await?;
        let mut conn = (*pooled).clone();
        // The lease's user set first: if the node dies between the two writes, the reaper
        // visits a user with nothing to drop, never misses one.
        self.lease_session(&mut conn, &lease, &s.user, 1, first_of_user, "")
            .await?;
        let mut inv = self.user_script(&self.scripts.add, &s.user);
        inv.arg(s.id.to_string())
            .arg(Self::value(&lease, s))
            .arg(&self.node)
            .arg(self.key_ttl());
        self.run_user(&mut conn, &inv).await?;
        Ok(())
    }

    /// `reason` (closed, kicked, drained) is what the user's `offline` event will say.
    pub(crate) async fn remove(
        &self,
        s: &SessionInfo,
        last_of_user: bool,
        reason: &str,
    ) -> Result<(), RedisError> {
        if self.reasserting.load(Ordering::SeqCst) {
            // A rewrite in flight may write this session again after it is removed here:
            // the rewrite removes it once more when it is done.
            self.closed_lock().push((s.clone(), reason.to_string()));
        }
        let r = async {
            let pooled = self.pool.get().await?;
            let mut conn = (*pooled).clone();
            self.remove_inner(s, last_of_user, reason, &mut conn).await
        }
        .await;
        self.note(r)
    }

    async fn remove_inner(
        &self,
        s: &SessionInfo,
        last_of_user: bool,
        reason: &str,
        conn: &mut impl Connection,
    ) -> Result<(), RedisError> {
        let mut inv = self.user_script(&self.scripts.remove, &s.user);
        inv.arg(s.id.to_string()).arg(reason).arg(self.window_ms());
        let reply = self.run_user(conn, &inv).await?;
        let due = if reply.result == 2 {
            reply.extra
        } else {
            String::new()
        };
        // The lease as it is now: a pending offline must go to a lease whose reaper will
        // look at it, not to one retired while the script ran.
        let lease = self.lease_id();
        self.lease_session(conn, &lease, &s.user, -1, last_of_user, &due)
            .await
    }

    fn closed_lock(&self) -> std::sync::MutexGuard<'_, Vec<(SessionInfo, String)>> {
        // A list of records, consistent between statements: a poisoned lock is usable.
        self.closed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The heartbeat: extends the lease and its registry entry (constant work), then
    /// refreshes one slice of the node's users; after the lease was lost or a write failed,
    /// takes a new lease and writes every session under it.
    pub(crate) async fn heartbeat(
        &self,
        sessions: &[SessionInfo],
        counts: Counts,
    ) -> Result<(), RedisError> {
        let pooled = self.pool.get().await?;
        let mut conn = (*pooled).clone();
        match self.dirty.swap(DIRTY_NONE, Ordering::Relaxed) {
            DIRTY_NONE => {}
            DIRTY_RESUBSCRIBED => self.rotate(&mut conn, RESUBSCRIBED).await?,
            _ => self.rotate(&mut conn, "a presence write failed").await?,
        }
        let (lease, created) = {
            let l = self.lock();
            (l.id.clone(), l.created)
        };
        let alive = self.beat_lease(&mut conn, &lease, !created, counts).await?;
        let full = if !alive {
            metrics::counter!(crate::metrics::PRESENCE_REASSERTS).increment(1);
            self.rotate(&mut conn, "the lease expired or Redis lost it")
                .await?;
            let lease = self.lease_id();
            self.beat_lease(&mut conn, &lease, true, counts).await?;
            true
        } else {
            !created
        };
        let (lease, beat) = {
            let mut l = self.lock();
            l.created = true;
            l.beats += 1;
            (l.id.clone(), l.beats - 1)
        };
        self.registry_beat(&mut conn, &lease, false).await?;
        // The online index lives as long as the events, and at least as long as any node
        // heartbeats (GT: never shortened).
        let _: i64 = redis::cmd("PEXPIRE")
            .arg(self.keys.online_key())
            .arg((self.ttl + REAP_WINDOW).as_millis() as u64)
            .arg("GT")
            .query_async(&mut conn)
            .await?;

        let rounds = (REFRESH_PERIOD.as_millis() / self.heartbeat.as_millis().max(1)).max(1) as u64;
        if full {
            let r = self.reassert(&conn, &lease, sessions).await;
            // A rewrite cut short is done again, whole, under yet another lease.
            self.note(r)
        } else {
            self.refresh_slice(&conn, sessions, beat % rounds, rounds)
                .await
        }
    }

    /// Extends the presence keys of one slice of the node's users (one `PEXPIRE ... GT`
    /// each): the heartbeat's only work that grows with sessions, 1/`rounds` of them.
    async fn refresh_slice(
        &self,
        conn: &(impl Connection + 'static),
        sessions: &[SessionInfo],
        slice: u64,
        rounds: u64,
    ) -> Result<(), RedisError> {
        let mut users: Vec<&str> = sessions
            .iter()
            .map(|s| &*s.user)
            .filter(|u| slice_of(u, rounds) == slice)
            .collect();
        users.sort_unstable();
        users.dedup();
        // Owned commands, so the futures borrow nothing but `conn` (a stream of futures
        // over borrowed items is not `Send` for every lifetime, which spawn needs).
        let mut cmds = Vec::with_capacity(users.len());
        for user in users {
            let mut cmd = redis::cmd("PEXPIRE");
            cmd.arg(self.keys.presence_key(user))
                .arg(self.key_ttl())
                .arg("GT");
            cmds.push(cmd);
        }
        let mut calls: Vec<Call<'_>> = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            let mut conn = conn.clone();
            calls.push(Box::pin(async move {
                let _: i64 = cmd.query_async(&mut conn).await?;
                Ok(())
            }));
        }
        in_flight(calls).await
    }

    /// Writes every session under the new lease `lease`: its user set first (so that a
    /// reaper of this lease visits every user), then each user's sessions. Sessions that
    /// close meanwhile are removed again afterwards, so the rewrite cannot resurrect them.
    async fn reassert(
        &self,
        conn: &(impl Connection + 'static),
        lease: &str,
        sessions: &[SessionInfo],
    ) -> Result<(), RedisError> {
        self.reasserting.store(true, Ordering::SeqCst);
        let result = self.reassert_inner(conn, lease, sessions).await;
        self.reasserting.store(false, Ordering::SeqCst);
        let closed: Vec<(SessionInfo, String)> = std::mem::take(&mut *self.closed_lock());
        let mut conn = conn.clone();
        for (s, reason) in closed {
            self.remove_inner(&s, false, &reason, &mut conn).await?;
        }
        result
    }

    async fn reassert_inner(
        &self,
        conn: &(impl Connection + 'static),
        lease: &str,
        sessions: &[SessionInfo],
    ) -> Result<(), RedisError> {
        let mut sorted: Vec<&SessionInfo> = sessions.iter().collect();
        sorted.sort_unstable_by(|a, b| a.user.cmp(&b.user));
        let groups: Vec<&[&SessionInfo]> = sorted.chunk_by(|a, b| a.user == b.user).collect();
        let mut c = conn.clone();
        for chunk in groups.chunks(REAP_BATCH) {
            let mut cmd = redis::cmd("SADD");
            cmd.arg(self.keys.lease_users_key(lease));
            for g in chunk {
                cmd.arg(&*g[0].user);
            }
            let _: i64 = cmd.query_async(&mut c).await?;
        }
        let _: i64 = redis::cmd("PEXPIRE")
            .arg(self.keys.lease_users_key(lease))
            .arg((self.ttl + REAP_WINDOW).as_millis() as u64)
            .query_async(&mut c)
            .await?;
        let mut invs = Vec::with_capacity(groups.len());
        for group in groups {
            let mut inv = self.user_script(&self.scripts.refresh, &group[0].user);
            inv.arg(&self.node).arg(self.key_ttl());
            for s in group {
                inv.arg(s.id.to_string()).arg(Self::value(lease, s));
            }
            invs.push(inv);
        }
        let mut calls: Vec<Call<'_>> = Vec::with_capacity(invs.len());
        for inv in invs {
            let mut conn = conn.clone();
            calls.push(Box::pin(async move {
                self.run_user(&mut conn, &inv).await.map(|_| ())
            }));
        }
        in_flight(calls).await
    }

    /// The next heartbeat takes a new lease and writes every session again: after the
    /// subscription was rebuilt (a Redis restart or failover may have lost recent writes).
    /// A lease not created yet is written whole by its first heartbeat anyway.
    pub(crate) fn reassert_next(&self) {
        if self.lock().created {
            // A write failure already asks for the same rewrite; its reason is kept.
            let _ = self.dirty.compare_exchange(
                DIRTY_NONE,
                DIRTY_RESUBSCRIBED,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    async fn beat_lease(
        &self,
        conn: &mut impl Connection,
        lease: &str,
        create: bool,
        counts: Counts,
    ) -> Result<bool, RedisError> {
        let mut inv = self.invoke(&self.scripts.lease_beat);
        inv.key(self.keys.lease_key(lease))
            .key(self.keys.lease_users_key(lease))
            .key(self.keys.lease_pending_key(lease))
            .arg(if create { "1" } else { "0" })
            .arg(&self.node)
            .arg(counts.connections)
            .arg(counts.users)
            .arg(self.started_at)
            .arg(&self.listen)
            .arg(self.window_ms());
        let raw: Vec<Value> = inv.invoke_async(conn).await?;
        Ok(raw.first().map(int).unwrap_or(0) != 0)
    }

    async fn registry_beat(
        &self,
        conn: &mut impl Connection,
        lease: &str,
        retire: bool,
    ) -> Result<(), RedisError> {
        let mut inv = self.invoke(&self.scripts.registry_beat);
        inv.key(self.keys.registry_key())
            .arg(lease)
            .arg(self.window_ms())
            .arg(if retire { "1" } else { "0" });
        let _: i64 = inv.invoke_async(conn).await?;
        Ok(())
    }

    /// Retires the current lease (reapers drop its sessions, which the new lease has
    /// written again by then) and takes a new one, to be created and fully written by the
    /// heartbeat that called this.
    async fn rotate(&self, conn: &mut impl Connection, why: &str) -> Result<(), RedisError> {
        let old = self.lease_id();
        let n = self.epochs.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}~{:08x}", self.node, rand_epoch(n));
        if n == 1 && why == RESUBSCRIBED {
            // The first rotation of a process that follows a subscription follows its first
            // subscription, which every start makes: routine, and not worth a warning.
            tracing::info!(old = %old, new = %id, why, "taking a new presence lease; re-asserting every session");
        } else {
            tracing::warn!(old = %old, new = %id, why, "taking a new presence lease; re-asserting every session");
        }
        {
            let mut l = self.lock();
            *l = Lease {
                id,
                created: false,
                beats: 0,
            };
        }
        // After the swap: sessions opened from now on are written under the new lease.
        self.registry_beat(conn, &old, true).await
    }

    /// Settles due offlines of this node's lease and reaps dead leases; returns how many
    /// `offline` events it emitted.
    pub(crate) async fn reap(&self) -> Result<u64, RedisError> {
        let pooled = self.pool.get().await?;
        let mut conn = (*pooled).clone();
        let own = self.lease_id();
        let mut emitted = self.reap_lease(&mut conn, &own, false).await?;
        let scan = self.scan(&mut conn, DEAD_LEASES_PER_PASS).await?;
        for dead in scan.dead.iter().filter(|d| **d != own) {
            emitted += self.reap_lease(&mut conn, dead, true).await?;
        }
        Ok(emitted)
    }

    /// One batch of a lease's work: its due offlines, and when it is dead, its users.
    async fn reap_lease(
        &self,
        conn: &mut impl Connection,
        lease: &str,
        dead: bool,
    ) -> Result<u64, RedisError> {
        let mut inv = self.invoke(&self.scripts.lease_work);
        inv.key(self.keys.lease_key(lease))
            .key(self.keys.lease_users_key(lease))
            .key(self.keys.lease_pending_key(lease))
            .key(self.keys.lease_reaper_key(lease))
            .arg(if dead { "1" } else { "0" })
            .arg(&self.node)
            .arg(REAP_BATCH)
            .arg(REAPER_CLAIM.as_millis() as u64);
        let raw: Vec<Value> = inv.invoke_async(conn).await?;
        match raw.first().map(text).as_deref() {
            Some("work") => {}
            Some("idle") => {
                // Nothing is left of the dead lease: out of the registry, so reapers stop
                // visiting it (a retired lease would otherwise be looked at every second
                // until it is pruned).
                let _: i64 = redis::cmd("ZREM")
                    .arg(self.keys.registry_key())
                    .arg(lease)
                    .query_async(conn)
                    .await?;
                return Ok(0);
            }
            _ => return Ok(0),
        }
        let n_due = raw.get(1).map(int).unwrap_or(0).max(0) as usize;
        let names: Vec<String> = raw.iter().skip(2).map(text).collect();
        let (due, users) = names.split_at(n_due.min(names.len()));
        let mut emitted = 0;
        let mut settled = Vec::with_capacity(due.len());
        for user in due {
            let inv = self.user_script(&self.scripts.settle, user);
            let reply = self.run_user(conn, &inv).await?;
            if reply.result == 1 {
                emitted += 1;
            }
            // -1: not due on the user's clock yet; it stays and is looked at again.
            if reply.result != -1 {
                settled.push(user);
            }
        }
        for user in users {
            let mut inv = self.user_script(&self.scripts.drop, user);
            inv.arg(lease).arg(self.window_ms());
            let reply = self.run_user(conn, &inv).await?;
            if reply.result == 2 {
                // The offline is now this node's to settle, in its own (current) lease.
                let own = self.lease_id();
                self.lease_session(conn, &own, user, 0, false, &reply.extra)
                    .await?;
            }
        }
        if !settled.is_empty() || !users.is_empty() {
            let mut inv = self.invoke(&self.scripts.lease_done);
            inv.key(self.keys.lease_users_key(lease))
                .key(self.keys.lease_pending_key(lease))
                .arg(settled.len());
            for u in &settled {
                inv.arg(u.as_str());
            }
            for u in users {
                inv.arg(u.as_str());
            }
            let _: i64 = inv.invoke_async(conn).await?;
        }
        Ok(emitted)
    }

    /// Retires the lease on a clean stop: it is dead at once, and the offlines still
    /// pending in it are settled by the other nodes' reapers.
    pub(crate) async fn deregister(&self) -> Result<(), RedisError> {
        let pooled = self.pool.get().await?;
        let mut conn = (*pooled).clone();
        let lease = self.lease_id();
        self.registry_beat(&mut conn, &lease, true).await?;
        // Its sets stay for the reapers (pending offlines); the hash is the node's record.
        let _: i64 = redis::cmd("DEL")
            .arg(self.keys.lease_key(&lease))
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn scan(&self, conn: &mut impl Connection, dead: usize) -> Result<Scan, RedisError> {
        let mut inv = self.invoke(&self.scripts.registry_scan);
        inv.key(self.keys.registry_key()).arg(dead);
        let raw: Vec<Value> = inv.invoke_async(conn).await?;
        Ok(Scan::parse(&raw))
    }

    pub(crate) async fn user(&self, user: &str) -> Result<Vec<PresenceSession>, RedisError> {
        let pooled = self.pool.get().await?;
        let mut conn = (*pooled).clone();
        let mut inv = self.invoke(&self.scripts.read_user);
        inv.key(self.keys.presence_key(user));
        let raw: Vec<String> = inv.invoke_async(&mut conn).await?;
        if raw.is_empty() {
            return Ok(Vec::new());
        }
        let scan = self.scan(&mut conn, 0).await?;
        let mut out: Vec<PresenceSession> = raw
            .chunks_exact(2)
            .filter_map(|kv| parse_session(&kv[0], &kv[1], &scan.live))
            .collect();
        out.sort_by_key(|s| s.connected_at);
        Ok(out)
    }

    pub(crate) async fn stats(&self) -> Result<Stats, RedisError> {
        let pooled = self.pool.get().await?;
        let mut conn = (*pooled).clone();
        let scan = self.scan(&mut conn, 0).await?;
        // Users in their offline grace window have score -1: not counted.
        let online: u64 = redis::cmd("ZCOUNT")
            .arg(self.keys.online_key())
            .arg("(0")
            .arg("+inf")
            .query_async(&mut conn)
            .await?;
        // One call per live lease: each lease's hash lives in its own slot, and a pipeline
        // across slots is refused on Redis Cluster. There are as many as there are nodes.
        type Record = (Option<String>, Option<i64>, Option<i64>);
        let mut records: Vec<Record> = Vec::with_capacity(scan.live.len());
        for lease in &scan.live {
            records.push(
                redis::cmd("HMGET")
                    .arg(self.keys.lease_key(lease))
                    .arg("node")
                    .arg("connections")
                    .arg("users")
                    .query_async(&mut conn)
                    .await?,
            );
        }
        let mut nodes = Vec::with_capacity(records.len());
        for (node, connections, users) in records {
            // A lease in the registry whose hash expired a moment ago is not live.
            let Some(node) = node else { continue };
            // The heartbeat writes exact counts and opens/closes adjust them in between, so
            // a close landing just after a heartbeat that no longer counted it can take a
            // count briefly below the truth, even below zero, until the next heartbeat.
            nodes.push(NodeStats {
                node,
                connections: connections.unwrap_or(0).max(0) as u64,
                users: users.unwrap_or(0).max(0) as u64,
            });
        }
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(Stats {
            connections: nodes.iter().map(|n| n.connections).sum(),
            users: online,
            nodes,
        })
    }
}

/// One Redis call of a batch, boxed: a stream of `async` blocks over borrowed items is not
/// `Send` for every lifetime (which spawning the heartbeat needs); boxed futures with an
/// explicit `Send` are.
type Call<'a> = Pin<Box<dyn Future<Output = Result<(), RedisError>> + Send + 'a>>;

/// Runs `calls` with at most [`USER_CALLS_IN_FLIGHT`] in flight; stops at the first error.
async fn in_flight(calls: Vec<Call<'_>>) -> Result<(), RedisError> {
    stream::iter(calls)
        .buffer_unordered(USER_CALLS_IN_FLIGHT)
        .try_collect::<()>()
        .await
}

/// The registry, read on the Redis clock.
struct Scan {
    live: Vec<String>,
    dead: Vec<String>,
}

impl Scan {
    fn parse(raw: &[Value]) -> Scan {
        let n_live = raw.first().map(int).unwrap_or(0).max(0) as usize;
        let rest: Vec<String> = raw.iter().skip(1).map(text).collect();
        let (live, dead) = rest.split_at(n_live.min(rest.len()));
        Scan {
            live: live.to_vec(),
            dead: dead.to_vec(),
        }
    }
}

/// Which heartbeat of every `rounds` refreshes `user` (FNV-1a of the id: stable across
/// nodes and restarts, so a user's key is refreshed at a steady pace).
fn slice_of(user: &str, rounds: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h % rounds
}

/// A random-looking epoch for a new lease: a restarted node with the same id never reuses
/// the lease of its previous life, whose sessions reapers may still be dropping.
fn rand_epoch(n: u64) -> u32 {
    let seed = uuid::Uuid::new_v4().as_u128() as u64 ^ n;
    (seed ^ (seed >> 32)) as u32
}

/// A session of a live lease: field `session`, value `<lease>|<connected_at>`; the node id
/// is the lease id before its `~`.
fn parse_session(session: &str, value: &str, live: &[String]) -> Option<PresenceSession> {
    let (lease, connected_at) = value.split_once('|')?;
    if !live.iter().any(|l| l == lease) {
        return None;
    }
    let node = lease.rsplit_once('~').map_or(lease, |(n, _)| n);
    Some(PresenceSession {
        session: session.to_string(),
        node: node.to_string(),
        connected_at: connected_at.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_of_live_leases_parse_back_and_others_are_dropped() {
        let live = vec!["node-1~0000abcd".to_string()];
        let p = parse_session("abc", "node-1~0000abcd|1700000000000", &live).unwrap();
        assert_eq!(p.session, "abc");
        assert_eq!(p.node, "node-1");
        assert_eq!(p.connected_at, 1_700_000_000_000);
        assert!(parse_session("abc", "node-1~dead|1", &live).is_none());
        assert!(parse_session("abc", "node-1~0000abcd", &live).is_none());
        assert!(parse_session("abc", "node-1~0000abcd|x", &live).is_none());
    }

    #[test]
    fn registry_scans_split_live_and_dead() {
        use redis::Value::{BulkString, Int};
        let raw = vec![
            Int(1),
            BulkString(b"a~1".to_vec()),
            BulkString(b"b~2".to_vec()),
        ];
        let s = Scan::parse(&raw);
        assert_eq!(s.live, vec!["a~1"]);
        assert_eq!(s.dead, vec!["b~2"]);
    }

    #[test]
    fn every_user_falls_in_one_refresh_slice_and_slices_spread() {
        let rounds = 180;
        let mut seen = vec![0u32; rounds as usize];
        for i in 0..18_000 {
            seen[slice_of(&format!("user-{i}"), rounds) as usize] += 1;
        }
        // 100 per slice on average; no slice takes several times its share.
        assert!(seen.iter().all(|n| (40..=200).contains(n)), "{seen:?}");
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
            Duration::from_secs(10),
            EventPolicy {
                grace: Duration::from_secs(5),
                max_len: 10,
                retention: Duration::from_secs(60),
            },
            true,
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
