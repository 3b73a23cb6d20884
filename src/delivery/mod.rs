//! Delivery: who receives a publication on this node, and handing them one shared frame.
//!
//! The first data path runs through here: Redis → broker → **fanout → hub** → socket. The
//! [`Hub`] is the registry of local sessions and decides, under its lock, which users and
//! topics the node must subscribe to; the [`Fanout`] turns a payload into one frame and
//! offers it to every recipient's [`Client`](crate::transport::Client). Delivery speaks in
//! users, topics and inbox ids, never in Redis channels or keys.

pub(crate) mod fanout;
pub(crate) mod hub;
pub(crate) mod wheel;

pub(crate) use fanout::{Durable, Fanout, InboxEvent, Outcome, Source, Target};
pub(crate) use hub::{Counts, Hub, Interest, SessionInfo, SubCommand};
pub(crate) use wheel::WheelShape;

/// Test fixtures shared by delivery's and the broker's unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use tokio::sync::mpsc;

    use super::{Fanout, Hub, SessionInfo};
    use crate::transport::{Client, OutboxLimits};

    /// A fan-out over a hub holding one session of user `42` in topic `t`, with an outbox
    /// of 8 messages and payloads up to `max_bytes`.
    pub(crate) fn fanout_with_one_session(max_bytes: usize) -> (Arc<Fanout>, Arc<Client>) {
        let (stx, _srx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(stx, super::wheel::WheelShape::default()));
        let client = Arc::new(Client::default());
        let _ = hub.register(
            SessionInfo {
                id: uuid::Uuid::new_v4(),
                user: "42".into(),
                topics: vec![Arc::<str>::from("t")].into(),
                connected_at: 0,
            },
            client.clone(),
            usize::MAX,
        );
        let limits = OutboxLimits {
            messages: 8,
            bytes: 1 << 20,
        };
        (Arc::new(Fanout::new(hub, max_bytes, limits)), client)
    }
}
