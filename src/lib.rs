//! herald: a WebSocket notification server whose state expires by itself. See
//! ARCHITECTURE.md for the map of modules and the invariants they keep.

pub mod auth;
pub mod broker;
pub mod config;
pub mod control;
pub mod fanout;
pub mod health;
pub mod http;
pub mod hub;
pub mod inbox;
pub mod keys;
pub mod metrics;
pub mod node;
pub mod presence;
pub mod protocol;
pub mod redis_pool;
pub mod server;
pub mod session;
pub mod ws;

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
