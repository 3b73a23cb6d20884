//! TTL'd presence: which sessions and nodes are alive, cluster-wide. Every entry carries an
//! expiry and is refreshed by its node's heartbeat, so nothing depends on a close handler
//! running. One interface, two engines: Redis for a cluster, memory for a standalone node.

mod memory;
mod redis;

use std::time::Duration;

pub use self::memory::MemoryPresence;
pub use self::redis::{EventPolicy, RedisPresence};
use crate::hub::{Counts, SessionInfo};
use crate::protocol::{PresenceSession, StatsResponse};

/// Why a presence operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("redis pool: {0}")]
    Pool(#[from] crate::redis_pool::PoolError),
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("timed out")]
    Timeout,
}

/// Upper bound on any single presence call, so a hung Redis never stalls a session or the
/// heartbeat for long.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// The presence engine in use.
#[derive(Clone)]
pub enum Presence {
    Memory(MemoryPresence),
    Redis(RedisPresence),
}

impl Presence {
    /// Records a new session. `first_of_user` is true when the node had no other session of
    /// this user (it keeps the node's user count exact between heartbeats).
    pub async fn add(&self, s: &SessionInfo, first_of_user: bool) -> Result<(), PresenceError> {
        match self {
            Presence::Memory(p) => {
                p.add(s);
                Ok(())
            }
            Presence::Redis(p) => with_timeout(p.add(s, first_of_user)).await,
        }
    }

    /// Removes a session at once (its expiry would remove it anyway). `reason` (closed,
    /// kicked, drained) is what the user's `offline` event reports if this was their last
    /// session anywhere.
    pub async fn remove(
        &self,
        s: &SessionInfo,
        last_of_user: bool,
        reason: &str,
    ) -> Result<(), PresenceError> {
        match self {
            Presence::Memory(p) => {
                p.remove(s);
                Ok(())
            }
            Presence::Redis(p) => with_timeout(p.remove(s, last_of_user, reason)).await,
        }
    }

    /// Forgets pooled Redis connections after a failure (see RedisPresence).
    pub fn reset_connections(&self) {
        if let Presence::Redis(p) = self {
            p.reset_connections();
        }
    }

    /// Emits `offline` events whose grace has run out (Redis only; events need Redis).
    pub async fn reap(&self) -> Result<u64, PresenceError> {
        match self {
            Presence::Memory(_) => Ok(0),
            Presence::Redis(p) => with_timeout(p.reap()).await,
        }
    }

    /// Refreshes the node and every session it holds. Also the re-assertion after Redis
    /// lost its data: it rewrites everything, not only expiries.
    pub async fn heartbeat(
        &self,
        sessions: &[SessionInfo],
        counts: Counts,
    ) -> Result<(), PresenceError> {
        match self {
            Presence::Memory(p) => {
                p.heartbeat(sessions);
                Ok(())
            }
            // Big nodes send many batches; the bound scales with them.
            Presence::Redis(p) => {
                let budget = CALL_TIMEOUT * (1 + (sessions.len() / 20_000) as u32);
                tokio::time::timeout(budget, p.heartbeat(sessions, counts))
                    .await
                    .map_err(|_| PresenceError::Timeout)?
            }
        }
    }

    /// Removes the node from the registry (clean stop).
    pub async fn deregister(&self) -> Result<(), PresenceError> {
        match self {
            Presence::Memory(_) => Ok(()),
            Presence::Redis(p) => with_timeout(p.deregister()).await,
        }
    }

    /// Live sessions of `user` across the cluster.
    pub async fn user(&self, user: &str) -> Result<Vec<PresenceSession>, PresenceError> {
        match self {
            Presence::Memory(p) => Ok(p.user(user)),
            Presence::Redis(p) => with_timeout(p.user(user)).await,
        }
    }

    /// Connections and users across live nodes.
    pub async fn stats(&self) -> Result<StatsResponse, PresenceError> {
        match self {
            Presence::Memory(p) => Ok(p.stats()),
            Presence::Redis(p) => with_timeout(p.stats()).await,
        }
    }
}

async fn with_timeout<T>(
    f: impl std::future::Future<Output = Result<T, PresenceError>>,
) -> Result<T, PresenceError> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .map_err(|_| PresenceError::Timeout)?
}
