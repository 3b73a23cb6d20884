//! The Redis command pool: deadpool with deadpool-redis's connection factory (to one URL,
//! or to the master the sentinels name), a recycle check that runs only now and then
//! instead of on every checkout, a reset that retires every connection made before it, and
//! a gate that keeps a storm of waiting callers cheap.
//!
//! Under Redis Cluster there is nothing to pool: redis-rs's cluster connection is already
//! multiplexed over one connection per cluster node, routes every command by its key's slot
//! and follows the cluster's changes itself, so every checkout is a clone of one shared
//! cluster connection. Callers see the same interface either way: a [`Conn`] that derefs to
//! a [`Link`], which is a `redis::aio::ConnectionLike`.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use deadpool::managed::{self, Metrics, RecycleResult};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

use super::connect::RedisTarget;

/// One connection to Redis as callers use it: a pooled multiplexed connection to one
/// instance, or a handle on the shared cluster connection. Cloning either is cheap and
/// shares the underlying connection.
#[derive(Clone)]
pub(crate) enum Link {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Single(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Single(c) => c.req_packed_commands(cmd, offset, count),
            Link::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection unused for longer than this is checked (UNWATCH + PING) before reuse.
const CHECK_WHEN_IDLE: Duration = Duration::from_secs(1);
/// A busy connection is checked every this many checkouts.
const CHECK_EVERY: usize = 64;

/// deadpool-redis's manager with a cheaper recycle. Its stock recycle runs a round trip on
/// every `pool.get()`; a multiplexed connection serves many callers at once, so that check
/// doubled the round trips of most herald operations (bench/history.md, "Profiling the
/// delivery path", finding 2: -15 % Redis CPU per connect/disconnect, -19 % replay time
/// without it). A broken connection still fails its next command, and is replaced at the
/// next check (within a second of idleness or 64 checkouts), or at once after a
/// [`Pool::reset`].
pub(crate) struct Manager {
    factory: Factory,
    /// When the manager was made; `reset_us` counts from it.
    born: Instant,
    /// Microseconds after `born` of the last [`Pool::reset`] (0: never). A connection
    /// created before it is not handed out again, even one that was checked out while the
    /// reset ran (deadpool's `retain` sees only idle ones).
    reset_us: AtomicU64,
}

/// Who makes the connections: deadpool-redis's manager for one URL, or its Sentinel manager,
/// which asks the sentinels for the current master before every connection it makes (so
/// connections made after a failover reach the promoted replica).
enum Factory {
    Single(deadpool_redis::Manager),
    Sentinel(deadpool_redis::sentinel::Manager),
}

impl Manager {
    fn micros_since_born(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.born).as_micros()).unwrap_or(u64::MAX)
    }
}

impl managed::Manager for Manager {
    type Type = Link;
    type Error = RedisError;

    async fn create(&self) -> Result<Link, RedisError> {
        match &self.factory {
            Factory::Single(m) => m.create().await.map(Link::Single),
            Factory::Sentinel(m) => m.create().await.map(Link::Single),
        }
    }

    async fn recycle(&self, link: &mut Link, metrics: &Metrics) -> RecycleResult<RedisError> {
        // The pool never holds a cluster link (see `Pool::Cluster`).
        let Link::Single(conn) = link else {
            return Ok(());
        };
        if self.micros_since_born(metrics.created) < self.reset_us.load(Ordering::Relaxed) {
            return Err(managed::RecycleError::message(
                "made before the pool was reset",
            ));
        }
        if metrics.last_used() < CHECK_WHEN_IDLE
            && !metrics.recycle_count.is_multiple_of(CHECK_EVERY)
        {
            return Ok(());
        }
        match &self.factory {
            Factory::Single(m) => m.recycle(conn, metrics).await,
            Factory::Sentinel(m) => m.recycle(conn, metrics).await,
        }
    }
}

/// Callers allowed into deadpool's `get` at once, per pooled connection.
const GATE_PER_CONNECTION: usize = 4;
/// How long a checkout may wait, at the gate and again for a connection.
const WAIT: Duration = Duration::from_secs(2);

/// The pool every Redis command of a node goes through.
///
/// deadpool's `get` future is about 7 KB (it can create a connection, with timeouts, in
/// place), and a session's setup and teardown embed it. When thousands of sessions connect
/// or drop at once (a reconnect storm, a load balancer failing over), each of them waited in
/// its own 7 KB future for one of the few connections: measured, ~70 MB of transient heap for
/// 8,000 simultaneous closes. Here callers first wait at a semaphore (a few dozen bytes
/// each); only `GATE_PER_CONNECTION` × size of them at a time allocate the boxed `get`.
#[derive(Clone)]
pub(crate) enum Pool {
    /// One instance, or the master the sentinels name.
    Pooled {
        inner: managed::Pool<Manager>,
        gate: Arc<Semaphore>,
    },
    /// A Redis Cluster: one shared cluster connection, made at the first checkout.
    Cluster(Arc<ClusterShared>),
}

/// The connection every checkout shares under Redis Cluster.
pub(crate) struct ClusterShared {
    client: ClusterClient,
    /// `None` until the first checkout connects (a node starts before Redis is reachable),
    /// and again after a failed first connection so the next checkout tries anew.
    conn: tokio::sync::Mutex<Option<ClusterConnection>>,
}

/// A checked-out connection; returns to the pool (and frees its gate slot) when dropped.
pub(crate) enum Conn {
    Pooled {
        conn: managed::Object<Manager>,
        _permit: OwnedSemaphorePermit,
    },
    Cluster(Link),
}

impl Deref for Conn {
    type Target = Link;
    fn deref(&self) -> &Link {
        match self {
            Conn::Pooled { conn, .. } => conn,
            Conn::Cluster(link) => link,
        }
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Link {
        match self {
            Conn::Pooled { conn, .. } => conn,
            Conn::Cluster(link) => link,
        }
    }
}

impl Pool {
    /// Checks a connection out, waiting at the gate first.
    pub(crate) async fn get(&self) -> Result<Conn, PoolError> {
        let (inner, gate) = match self {
            Pool::Pooled { inner, gate } => (inner, gate),
            // Boxed: the connect future is large and most checkouts never run it.
            Pool::Cluster(shared) => return Box::pin(shared.get()).await,
        };
        // The gate shares deadpool's wait budget, so a caller fails as fast as before
        // when Redis is down, instead of queueing behind everyone else's timeouts.
        let permit = match tokio::time::timeout(WAIT, gate.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(managed::PoolError::Closed),
            Err(_) => return Err(managed::PoolError::Timeout(managed::TimeoutType::Wait)),
        };
        let conn = Box::pin(inner.get()).await?;
        Ok(Conn::Pooled {
            conn,
            _permit: permit,
        })
    }

    /// Drops every idle pooled connection, and retires the checked-out ones when they come
    /// back, so the next operations connect afresh (with Sentinel: to the master the
    /// sentinels name now). Called after a failed operation: the pool checks connections
    /// only now and then, and a connection broken by a Redis restart, or still open to a
    /// master that was demoted, would otherwise be handed out again.
    ///
    /// Under Redis Cluster this does nothing: the cluster connection reconnects the nodes it
    /// lost and asks for the slot map again by itself (on a connection error, a MOVED, or a
    /// failover), and replacing it would throw that knowledge away in the middle of a
    /// failover, when every operation of the node fails at once.
    pub(crate) fn reset(&self) {
        let Pool::Pooled { inner, .. } = self else {
            return;
        };
        let manager = inner.manager();
        let now = manager.micros_since_born(Instant::now());
        manager.reset_us.fetch_max(now, Ordering::Relaxed);
        inner.retain(|_, _| false);
    }
}

impl ClusterShared {
    async fn get(&self) -> Result<Conn, PoolError> {
        let mut slot = match tokio::time::timeout(WAIT, self.conn.lock()).await {
            Ok(slot) => slot,
            Err(_) => return Err(managed::PoolError::Timeout(managed::TimeoutType::Wait)),
        };
        if let Some(conn) = slot.as_ref() {
            return Ok(Conn::Cluster(Link::Cluster(conn.clone())));
        }
        let conn = match tokio::time::timeout(WAIT, self.client.get_async_connection()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(managed::PoolError::Backend(e)),
            Err(_) => return Err(managed::PoolError::Timeout(managed::TimeoutType::Create)),
        };
        *slot = Some(conn.clone());
        Ok(Conn::Cluster(Link::Cluster(conn)))
    }
}

/// Why a connection could not be checked out.
pub(crate) type PoolError = managed::PoolError<RedisError>;

/// Why a pool could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BuildError {
    #[error("invalid Redis URL: {0}")]
    Url(#[from] RedisError),
    #[error("invalid Redis Sentinel configuration: {0}")]
    Sentinel(#[source] RedisError),
    #[error("invalid Redis Cluster configuration: {0}")]
    Cluster(#[source] RedisError),
    #[error("cannot build the Redis pool: {0}")]
    Build(#[from] managed::BuildError),
}

/// Builds a pool of `size` connections to `target` with bounded waits.
pub(crate) fn build(target: &RedisTarget, size: usize) -> Result<Pool, BuildError> {
    let factory = match target {
        RedisTarget::Cluster(c) => {
            return Ok(Pool::Cluster(Arc::new(ClusterShared {
                client: c.client(None).map_err(BuildError::Cluster)?,
                conn: tokio::sync::Mutex::new(None),
            })));
        }
        RedisTarget::Single { url } => Factory::Single(deadpool_redis::Manager::new(url.as_str())?),
        RedisTarget::Sentinel(s) => Factory::Sentinel(
            deadpool_redis::sentinel::Manager::new(
                s.sentinels.iter().map(String::as_str).collect(),
                s.master.clone(),
                Some(s.pool_node_info()),
                deadpool_redis::sentinel::SentinelServerType::Master,
            )
            .map_err(BuildError::Sentinel)?,
        ),
    };
    let manager = Manager {
        factory,
        born: Instant::now(),
        reset_us: AtomicU64::new(0),
    };
    let inner = managed::Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(WAIT))
        .create_timeout(Some(WAIT))
        .recycle_timeout(Some(WAIT))
        .runtime(deadpool::Runtime::Tokio1)
        .build()?;
    Ok(Pool::Pooled {
        inner,
        gate: Arc::new(Semaphore::new(
            size.saturating_mul(GATE_PER_CONNECTION).max(1),
        )),
    })
}
