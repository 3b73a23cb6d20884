//! The node's two clocks: wall time for what clients and producers see (`connected_at`),
//! and a cheap process-wide monotonic clock for liveness and write-progress checks.
//!
//! Expiry in Redis is never judged on either: presence scripts read Redis's own `TIME`.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds on a process-wide monotonic clock that starts at the first call; cheap
/// enough to read per frame.
pub(crate) fn mono_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// Microseconds on the same clock as [`mono_ms`] (for rates finer than a millisecond).
pub(crate) fn mono_us() -> u64 {
    epoch().elapsed().as_micros() as u64
}

fn epoch() -> &'static Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now)
}
