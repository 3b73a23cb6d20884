//! Delivery: who receives a publication on this node, and handing them one shared frame.
//!
//! The first data path runs through here: Redis → broker → **fanout → hub** → socket. The
//! [`Hub`] is the registry of local sessions and decides, under its lock, which users and
//! topics the node must subscribe to; the [`Fanout`] turns a payload into one frame and
//! offers it to every recipient's [`Client`](crate::transport::Client). Delivery speaks in
//! users, topics and inbox ids, never in Redis channels or keys.

pub(crate) mod fanout;
pub(crate) mod hub;

pub(crate) use fanout::{Fanout, Outcome, Source, Target};
pub(crate) use hub::{Counts, Hub, Interest, SessionInfo, SubCommand};
