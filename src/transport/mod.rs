//! Sockets: the accept loop, the WebSocket codec, each session's loop, its outbox and
//! liveness, the welcome-and-replay that starts every session's stream, and the SSE
//! response body that carries the same sessions over HTTP.
//!
//! Transport is the bottom of both data paths. Deliveries arrive through a [`Client`]
//! handle (Redis → fanout → hub → **socket**); client frames leave through the session loop
//! (**socket → frame reader** → inbox), which reaches the inbox only through the
//! [`InboxPort`] it is given. Nothing here imports delivery, cluster or api.

pub(crate) mod client;
pub(crate) mod codec;
pub(crate) mod listener;
pub(crate) mod liveness;
pub(crate) mod outbox;
pub(crate) mod replay;
pub(crate) mod session;
pub(crate) mod sse;
pub(crate) mod throttle;

pub(crate) use client::{Client, Offered};
pub(crate) use liveness::{LivenessSettings, Now};
pub(crate) use outbox::{OutboxLimits, Outgoing};
