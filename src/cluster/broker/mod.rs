//! Pub/sub: publishing to users, topics and everyone, and keeping this node subscribed to
//! exactly what its sessions need. One interface, two engines: Redis for a cluster, memory
//! for a standalone node.
//!
//! The broker is where Redis's vocabulary ends. What arrives on a channel is read back into
//! delivery's terms by the [`Router`] (a target and, for durable messages, an inbox id) or
//! handled here (control messages, the canary); the fan-out never sees a channel name.

mod memory;
mod redis;
mod router;
mod sharded;

pub(crate) use self::memory::MemoryBroker;
pub(crate) use self::redis::{RedisBroker, SubscriberSettings};
pub(crate) use self::router::Router;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::error::RedisError;
use crate::delivery::{SubCommand, Target};

/// The broker in use. One per node, so the size difference of the variants is moot.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Broker {
    Memory(MemoryBroker),
    Redis(RedisBroker),
}

impl Broker {
    /// Publishes `payload` for `target`. Returns how many subscribers received it (Redis:
    /// nodes) or how many local sessions it was offered to (memory).
    pub(crate) async fn publish(
        &self,
        target: Target<'_>,
        payload: &[u8],
    ) -> Result<u64, RedisError> {
        match self {
            Broker::Memory(b) => Ok(b.publish(target, payload)),
            Broker::Redis(b) => b.publish(target, payload).await,
        }
    }

    /// Closes every session of `user` on every node with 4002.
    pub(crate) async fn kick(&self, user: &str) -> Result<(), RedisError> {
        match self {
            Broker::Memory(b) => {
                b.kick(user);
                Ok(())
            }
            Broker::Redis(b) => b.kick(user).await,
        }
    }

    /// Runs the subscription loop until `shutdown`: applies the hub's commands in order and
    /// routes every received payload.
    pub(crate) async fn run_subscriber(
        &self,
        cmds: mpsc::UnboundedReceiver<SubCommand>,
        settings: SubscriberSettings,
        shutdown: CancellationToken,
    ) {
        match self {
            Broker::Memory(b) => b.run_subscriber(cmds, shutdown).await,
            Broker::Redis(b) => b.run_subscriber(cmds, settings, shutdown).await,
        }
    }
}
