//! The Redis command pool: deadpool with deadpool-redis's connection factory, and a recycle
//! check that runs only now and then instead of on every checkout.

use std::time::Duration;

use deadpool::managed::{self, Metrics, RecycleResult};
use redis::aio::MultiplexedConnection;
use redis::RedisError;

/// A connection unused for longer than this is checked (UNWATCH + PING) before reuse.
const CHECK_WHEN_IDLE: Duration = Duration::from_secs(1);
/// A busy connection is checked every this many checkouts.
const CHECK_EVERY: usize = 64;

/// deadpool-redis's manager with a cheaper recycle. Its stock recycle runs a round trip on
/// every `pool.get()`; a multiplexed connection serves many callers at once, so that check
/// doubled the round trips of most herald operations (BENCHMARKS.md, "Profiling the
/// delivery path", finding 2: -15 % Redis CPU per connect/disconnect, -19 % replay time
/// without it). A broken connection still fails its next command, and is replaced at the
/// next check (within a second of idleness or 64 checkouts).
pub struct Manager {
    inner: deadpool_redis::Manager,
}

impl managed::Manager for Manager {
    type Type = MultiplexedConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<MultiplexedConnection, RedisError> {
        self.inner.create().await
    }

    async fn recycle(
        &self,
        conn: &mut MultiplexedConnection,
        metrics: &Metrics,
    ) -> RecycleResult<RedisError> {
        if metrics.last_used() < CHECK_WHEN_IDLE
            && !metrics.recycle_count.is_multiple_of(CHECK_EVERY)
        {
            return Ok(());
        }
        self.inner.recycle(conn, metrics).await
    }
}

/// The pool every Redis command of a node goes through.
pub type Pool = managed::Pool<Manager>;
/// Why a connection could not be checked out.
pub type PoolError = managed::PoolError<RedisError>;

/// Builds a pool of `size` connections to `url` with bounded waits.
pub fn build(url: &str, size: usize) -> Result<Pool, String> {
    let inner = deadpool_redis::Manager::new(url).map_err(|e| e.to_string())?;
    Pool::builder(Manager { inner })
        .max_size(size)
        .wait_timeout(Some(Duration::from_secs(2)))
        .create_timeout(Some(Duration::from_secs(2)))
        .recycle_timeout(Some(Duration::from_secs(2)))
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| e.to_string())
}
