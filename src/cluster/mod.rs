//! The Redis side of a node: the command pool, pub/sub (broker), TTL'd presence and the
//! durable inbox, with the key layout and Lua scripts they share, and a memory engine for
//! each so a standalone node runs the same code without Redis.
//!
//! Redis's vocabulary (channels, keys, envelopes, scripts) stays in here. What the broker
//! reads from Redis it hands to delivery in delivery's own terms; presence and the inbox
//! answer in plain records. Every Redis operation fails with the one [`RedisError`] and is
//! bounded in time.

pub(crate) mod broker;
pub(crate) mod connect;
pub(crate) mod error;
pub(crate) mod inbox;
pub(crate) mod keys;
pub(crate) mod pool;
pub(crate) mod presence;

use std::sync::Arc;

pub(crate) use error::RedisError;

use broker::{Broker, MemoryBroker, RedisBroker};
use connect::{Connector, RedisTarget};
use inbox::{Inbox, InboxPolicy, MemoryInbox, RedisInbox};
use keys::Keys;
use pool::Pool;
use presence::{EventPolicy, MemoryPresence, Presence, RedisPresence};

use crate::config::Config;
use crate::delivery::Fanout;

/// Why the engines could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BuildError {
    #[error(transparent)]
    Target(#[from] connect::TargetError),
    #[error(transparent)]
    Pool(#[from] pool::BuildError),
}

/// The broker, presence and inbox a node runs on, built together from one configuration:
/// all on Redis, or all in memory.
pub(crate) struct Engines {
    pub(crate) broker: Broker,
    pub(crate) presence: Presence,
    pub(crate) inbox: Arc<Inbox>,
    /// The command pool the Redis engines share.
    pool: Option<Pool>,
}

impl Engines {
    /// Builds the engines for `config`: Redis when it names one (a URL, or sentinels and a
    /// master name), else memory. Connects to nothing yet, so a node starts (not ready)
    /// before Redis is reachable.
    pub(crate) fn build(
        config: &Config,
        node_id: &str,
        keys: &Keys,
    ) -> Result<Engines, BuildError> {
        let policy = InboxPolicy {
            max_len: config.inbox_max_len,
            retention: config.inbox_retention,
            max_bytes: config.max_message_bytes,
            idempotency_window: config.idempotency_window,
        };
        let Some(target) = RedisTarget::from_config(config)? else {
            let broker = MemoryBroker::new();
            return Ok(Engines {
                inbox: Arc::new(Inbox::Memory(MemoryInbox::new(policy, broker.clone()))),
                broker: Broker::Memory(broker),
                presence: Presence::Memory(MemoryPresence::new(node_id, config.presence_ttl)),
                pool: None,
            });
        };
        let connector = Connector::new(&target)?;
        let pool = pool::build(&target, config.redis_pool)?;
        Ok(Engines {
            broker: Broker::Redis(RedisBroker::new(connector, pool.clone(), keys.clone())),
            presence: Presence::Redis(RedisPresence::new(
                pool.clone(),
                keys.clone(),
                node_id,
                &config.listen.to_string(),
                config.presence_ttl,
                config.heartbeat_interval(),
                EventPolicy {
                    grace: config.offline_grace,
                    max_len: config.events_max_len,
                    retention: config.events_retention,
                },
                // One Redis: presence scripts write events themselves, atomically.
                true,
            )),
            inbox: Arc::new(Inbox::Redis(RedisInbox::new(
                pool.clone(),
                keys.clone(),
                policy,
            ))),
            pool: Some(pool),
        })
    }

    /// Connects the memory broker to the fan-out it publishes into (the Redis broker routes
    /// through the subscriber instead).
    pub(crate) fn attach(&self, fanout: Arc<Fanout>) {
        if let Broker::Memory(b) = &self.broker {
            b.attach(fanout);
        }
    }

    /// Drops every idle pooled connection after a failed operation (see [`Pool::reset`]).
    pub(crate) fn reset_connections(&self) {
        if let Some(pool) = &self.pool {
            pool.reset();
        }
    }
}
