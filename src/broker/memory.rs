//! The standalone broker: a publish is handed straight to this node's fan-out, and
//! subscriptions need no work because every local session is already reachable.

use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::fanout::{Fanout, Outcome};
use crate::hub::SubCommand;

/// In-process broker for a node without Redis.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    fanout: Arc<OnceLock<Arc<Fanout>>>,
}

impl MemoryBroker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connects the broker to the fan-out it publishes into (done once by the node).
    pub fn attach(&self, fanout: Arc<Fanout>) {
        let _ = self.fanout.set(fanout);
    }

    pub fn publish(&self, channel: &str, payload: &[u8]) -> u64 {
        match self
            .fanout
            .get()
            .map(|f| f.handle(channel, payload, "local"))
        {
            Some(Outcome::Delivered { queued }) => queued as u64,
            _ => 0,
        }
    }

    /// Acknowledges subscription commands at once; there is nothing to subscribe to.
    pub async fn run_subscriber(
        &self,
        mut cmds: mpsc::UnboundedReceiver<SubCommand>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                cmd = cmds.recv() => match cmd {
                    Some(SubCommand::Subscribe { done: Some(done), .. }) => {
                        let _ = done.send(());
                    }
                    Some(_) => {}
                    None => return,
                },
            }
        }
    }
}
