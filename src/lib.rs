//! herald: a WebSocket notification server whose state expires by itself. ARCHITECTURE.md
//! has the map of modules and the invariants they keep.
//!
//! Four folders follow the data: `cluster` (Redis: broker, presence, inbox) hands
//! publications to `delivery` (hub and fan-out), which writes them through `transport`
//! (sockets, outbox, session loop); `api` is the HTTP surface. `node` wires them together.
//! Shared ground below all four: `protocol`, `auth`, `health`, `metrics`, `clock`, `config`.

mod api;
mod auth;
mod clock;
mod cluster;
pub mod config;
mod delivery;
pub mod fdlimit;
mod health;
mod metrics;
mod node;
mod protocol;
mod transport;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use node::{Node, NodeError};

/// Serves HTTP and WebSocket for `node` on `listener` until `stop`, then finishes in-flight
/// HTTP requests. Upgraded sessions are not waited for here: [`Node::drain`] closes them.
/// With `--metrics-listen`, `/metrics` is not served here (see [`serve_metrics`]).
pub async fn serve(node: Arc<Node>, listener: TcpListener, stop: CancellationToken) {
    let settings = listener_settings(node.config());
    transport::listener::serve(listener, api::routes(node), settings, stop).await;
}

/// Serves only `GET /metrics` (everything else is 404) on `listener`, the address of
/// `--metrics-listen`, until `stop`.
pub async fn serve_metrics(node: Arc<Node>, listener: TcpListener, stop: CancellationToken) {
    let settings = listener_settings(node.config());
    transport::listener::serve(listener, api::metrics_routes(node), settings, stop).await;
}

fn listener_settings(config: &Config) -> transport::listener::ListenerSettings {
    transport::listener::ListenerSettings {
        send_buffer: config.tcp_send_buffer,
        max_header_bytes: config.max_header_bytes,
        max_pending: config.max_pending_connections,
    }
}
