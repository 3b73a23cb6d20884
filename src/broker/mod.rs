//! Pub/sub: publishing payloads to channels and keeping this node subscribed to exactly the
//! channels its sessions need. One interface, two engines: Redis for a cluster, memory for
//! a standalone node.

mod memory;
mod redis;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use self::memory::MemoryBroker;
pub use self::redis::{RedisBroker, SubscriberSettings};
use crate::fanout::Fanout;
use crate::hub::SubCommand;

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("redis pool: {0}")]
    Pool(#[from] crate::redis_pool::PoolError),
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
}

/// The broker in use.
#[derive(Clone)]
pub enum Broker {
    Memory(MemoryBroker),
    Redis(RedisBroker),
}

impl Broker {
    /// Publishes `payload` on `channel`. Returns how many subscribers received it (Redis) or
    /// how many local sessions it was queued for (memory).
    pub async fn publish(&self, channel: &str, payload: &[u8]) -> Result<u64, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.publish(channel, payload)),
            Broker::Redis(b) => b.publish(channel, payload).await,
        }
    }

    /// Runs the subscription loop until `shutdown`: applies the hub's commands in order and
    /// hands every received payload to `fanout`.
    pub async fn run_subscriber(
        &self,
        fanout: Arc<Fanout>,
        cmds: mpsc::UnboundedReceiver<SubCommand>,
        settings: SubscriberSettings,
        shutdown: CancellationToken,
    ) {
        match self {
            Broker::Memory(b) => b.run_subscriber(cmds, shutdown).await,
            Broker::Redis(b) => b.run_subscriber(fanout, cmds, settings, shutdown).await,
        }
    }
}
