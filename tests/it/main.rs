//! herald's integration tests, one binary: every test runs the real `herald` binary against
//! private redis-servers on free loopback ports (and a real nginx in `lb`), never the
//! library. One module per area; the shared harness is in `support`.
//!
//! Run one area with `cargo test --test it cluster::`, one test by its name.

// This is test harness code: a failed `expect`/`unwrap`/`panic!` is how a test reports the
// line that failed, so the workspace's denials of them (meant for the server's request
// paths) do not apply here. The crate has no public API, so `pub` only means "visible to
// the other modules" (`unreachable_pub` would ask for `pub(crate)` everywhere). Test
// futures are large by nature (whole scenarios in one `async fn`) and are each awaited
// once, at the top of a test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::large_futures,
    unreachable_pub
)]

mod support;

mod abuse;
mod api;
mod client;
mod cluster;
mod events;
mod faults;
mod hostile;
mod inbox;
mod inbox_ops;
mod lb;
mod lifecycle;
mod limits;
mod redis_access;
mod redis_cluster;
mod sentinel;
mod sse;
mod standalone;
mod tokens;
mod wire;
