//! The standalone broker: a publish is handed straight to this node's fan-out, and
//! subscriptions need no work because every local session is already reachable.

use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use uuid::Uuid;

use crate::delivery::{Durable, Fanout, InboxEvent, Outcome, Source, SubCommand, Target};

/// In-process broker for a node without Redis.
#[derive(Clone, Default)]
pub(crate) struct MemoryBroker {
    fanout: Arc<OnceLock<Arc<Fanout>>>,
}

impl MemoryBroker {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Connects the broker to the fan-out it publishes into (done once by the node).
    pub(crate) fn attach(&self, fanout: Arc<Fanout>) {
        let _ = self.fanout.set(fanout);
    }

    /// Delivers to local sessions; returns how many it was offered to.
    pub(crate) fn publish(&self, target: Target<'_>, payload: &[u8]) -> u64 {
        self.deliver(target, None, payload)
    }

    /// Delivers a message (durable with its inbox id) to local sessions.
    pub(crate) fn deliver(
        &self,
        target: Target<'_>,
        durable: Option<Durable>,
        payload: &[u8],
    ) -> u64 {
        match self
            .fanout
            .get()
            .map(|f| f.handle(target, durable, payload, Source::Local))
        {
            Some(Outcome::Delivered { queued }) => queued as u64,
            _ => 0,
        }
    }

    /// Tells the user's local sessions (but `except`) about a change to their inbox.
    pub(crate) fn inbox_event(&self, user: &str, event: InboxEvent, except: Option<Uuid>) {
        if let Some(f) = self.fanout.get() {
            f.inbox_event(user, event, except);
        }
    }

    /// Closes every local session of `user`.
    pub(crate) fn kick(&self, user: &str) {
        if let Some(f) = self.fanout.get() {
            f.kick(user);
        }
    }

    /// Acknowledges subscription commands at once; there is nothing to subscribe to.
    pub(crate) async fn run_subscriber(
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
