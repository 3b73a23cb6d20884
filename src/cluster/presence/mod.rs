//! TTL'd presence: which sessions and nodes are alive, cluster-wide. Every entry carries an
//! expiry and is refreshed by its node's heartbeat, so nothing depends on a close handler
//! running. One interface, two engines: Redis for a cluster, memory for a standalone node.

mod memory;
mod redis;

use serde::Serialize;

pub(crate) use self::memory::MemoryPresence;
pub(crate) use self::redis::{EventPolicy, RedisPresence};
use super::error::{bounded, bounded_by, RedisError, CALL_TIMEOUT};
use crate::delivery::{Counts, SessionInfo};

/// One live session of a user, as `GET /api/presence/<uid>` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct PresenceSession {
    pub(crate) session: String,
    pub(crate) node: String,
    /// Unix milliseconds.
    pub(crate) connected_at: u64,
}

/// One live node, as `GET /api/stats` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct NodeStats {
    pub(crate) node: String,
    pub(crate) connections: u64,
    pub(crate) users: u64,
}

/// Connections and users over live nodes (the body of `GET /api/stats`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Stats {
    pub(crate) connections: u64,
    pub(crate) users: u64,
    pub(crate) nodes: Vec<NodeStats>,
}

/// The presence engine in use.
#[derive(Clone)]
pub(crate) enum Presence {
    Memory(MemoryPresence),
    Redis(RedisPresence),
}

impl Presence {
    /// Records a new session. `first_of_user` is true when the node had no other session of
    /// this user (it keeps the node's user count exact between heartbeats).
    pub(crate) async fn add(&self, s: &SessionInfo, first_of_user: bool) -> Result<(), RedisError> {
        match self {
            Presence::Memory(p) => {
                p.add(s);
                Ok(())
            }
            Presence::Redis(p) => bounded(p.add(s, first_of_user)).await,
        }
    }

    /// Removes a session at once (its expiry would remove it anyway). `reason` (closed,
    /// kicked, drained) is what the user's `offline` event reports if this was their last
    /// session anywhere.
    pub(crate) async fn remove(
        &self,
        s: &SessionInfo,
        last_of_user: bool,
        reason: &str,
    ) -> Result<(), RedisError> {
        match self {
            Presence::Memory(p) => {
                p.remove(s);
                Ok(())
            }
            Presence::Redis(p) => bounded(p.remove(s, last_of_user, reason)).await,
        }
    }

    /// Emits `offline` events whose grace has run out (Redis only; events need Redis).
    pub(crate) async fn reap(&self) -> Result<u64, RedisError> {
        match self {
            Presence::Memory(_) => Ok(0),
            Presence::Redis(p) => bounded(p.reap()).await,
        }
    }

    /// Extends the node's lease and refreshes a slice of its users; after the lease was
    /// lost (Redis lost its data, or the node was away past the TTL) or a presence write
    /// failed, takes a new lease and rewrites every session.
    pub(crate) async fn heartbeat(
        &self,
        sessions: &[SessionInfo],
        counts: Counts,
    ) -> Result<(), RedisError> {
        match self {
            Presence::Memory(p) => {
                p.heartbeat(sessions);
                Ok(())
            }
            // Big nodes send many batches; the bound scales with them.
            Presence::Redis(p) => {
                let budget = CALL_TIMEOUT * (1 + (sessions.len() / 20_000) as u32);
                bounded_by(budget, p.heartbeat(sessions, counts)).await
            }
        }
    }

    /// Makes the next heartbeat write every session again under a new lease: after the
    /// pub/sub connection was rebuilt, Redis may have restarted or failed over and lost
    /// recent writes.
    pub(crate) fn reassert_next(&self) {
        if let Presence::Redis(p) = self {
            p.reassert_next();
        }
    }

    /// Removes the node from the registry (clean stop).
    pub(crate) async fn deregister(&self) -> Result<(), RedisError> {
        match self {
            Presence::Memory(_) => Ok(()),
            Presence::Redis(p) => bounded(p.deregister()).await,
        }
    }

    /// Live sessions of `user` across the cluster.
    pub(crate) async fn user(&self, user: &str) -> Result<Vec<PresenceSession>, RedisError> {
        match self {
            Presence::Memory(p) => Ok(p.user(user)),
            Presence::Redis(p) => bounded(p.user(user)).await,
        }
    }

    /// Connections and users across live nodes.
    pub(crate) async fn stats(&self) -> Result<Stats, RedisError> {
        match self {
            Presence::Memory(p) => Ok(p.stats()),
            Presence::Redis(p) => bounded(p.stats()).await,
        }
    }
}
