//! The Redis command pool: deadpool with deadpool-redis's connection factory (to one URL,
//! or to the master the sentinels name), a recycle check that runs only now and then
//! instead of on every checkout, a reset that retires every connection made before it, and
//! a gate that keeps a storm of waiting callers cheap.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use deadpool::managed::{self, Metrics, RecycleResult};
use redis::aio::MultiplexedConnection;
use redis::RedisError;

use super::connect::RedisTarget;

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
    type Type = MultiplexedConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<MultiplexedConnection, RedisError> {
        match &self.factory {
            Factory::Single(m) => m.create().await,
            Factory::Sentinel(m) => m.create().await,
        }
    }

    async fn recycle(
        &self,
        conn: &mut MultiplexedConnection,
        metrics: &Metrics,
    ) -> RecycleResult<RedisError> {
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
pub(crate) struct Pool {
    inner: managed::Pool<Manager>,
    gate: Arc<Semaphore>,
}

/// A checked-out connection; returns to the pool (and frees its gate slot) when dropped.
pub(crate) struct Conn {
    conn: managed::Object<Manager>,
    _permit: OwnedSemaphorePermit,
}

impl Deref for Conn {
    type Target = MultiplexedConnection;
    fn deref(&self) -> &MultiplexedConnection {
        &self.conn
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut MultiplexedConnection {
        &mut self.conn
    }
}

impl Pool {
    /// Checks a connection out, waiting at the gate first.
    pub(crate) async fn get(&self) -> Result<Conn, PoolError> {
        // The gate shares deadpool's wait budget, so a caller fails as fast as before
        // when Redis is down, instead of queueing behind everyone else's timeouts.
        let permit = match tokio::time::timeout(WAIT, self.gate.clone().acquire_owned()).await {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(managed::PoolError::Closed),
            Err(_) => return Err(managed::PoolError::Timeout(managed::TimeoutType::Wait)),
        };
        let conn = Box::pin(self.inner.get()).await?;
        Ok(Conn {
            conn,
            _permit: permit,
        })
    }

    /// Drops every idle pooled connection, and retires the checked-out ones when they come
    /// back, so the next operations connect afresh (with Sentinel: to the master the
    /// sentinels name now). Called after a failed operation: the pool checks connections
    /// only now and then, and a connection broken by a Redis restart, or still open to a
    /// master that was demoted, would otherwise be handed out again.
    pub(crate) fn reset(&self) {
        let manager = self.inner.manager();
        let now = manager.micros_since_born(Instant::now());
        manager.reset_us.fetch_max(now, Ordering::Relaxed);
        self.inner.retain(|_, _| false);
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
    #[error("cannot build the Redis pool: {0}")]
    Build(#[from] managed::BuildError),
}

/// Builds a pool of `size` connections to `target` with bounded waits.
pub(crate) fn build(target: &RedisTarget, size: usize) -> Result<Pool, BuildError> {
    let factory = match target {
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
    Ok(Pool {
        inner,
        gate: Arc::new(Semaphore::new(
            size.saturating_mul(GATE_PER_CONNECTION).max(1),
        )),
    })
}
