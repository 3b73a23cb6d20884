//! The node's background loops, one task each: the presence heartbeat, the offline reaper
//! and the liveness sweeper. Each runs until the node's background token is cancelled.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{watch, Notify};
use tokio::time::{sleep, Instant, MissedTickBehavior};

use super::Node;
use crate::clock::{mono_ms, unix_ms};
use crate::metrics as m;
use crate::transport::{replay, Now};

/// Sessions caught up at once after a broken subscription: bounds the Redis reads in
/// flight (and the node memory they hold) however many sessions there are.
const CATCH_UP_CONCURRENCY: usize = 32;

/// Heartbeat retry interval while Redis is failing (bounded by the normal interval).
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Ticks the hub's wheel: each tick visits one slot of sessions (about 1/slots of them),
/// pings those whose place in the ping cycle has come, and closes those that stayed silent
/// past the idle timeout, whose backlog made no progress within the write timeout, or whose
/// token expired. One task instead of a timer per session: an idle session then holds no
/// timer at all; and one slot per tick instead of every session per sweep, so sessions that
/// connected together are not pinged together (see `delivery::wheel`).
pub(super) async fn sweep_loop(node: Arc<Node>) {
    let live = node.config.liveness();
    let limits = node.config.outbox_limits();
    let shape = node.hub.wheel_shape();
    let mut tick = tokio::time::interval(shape.tick());
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let slots = u64::from(shape.slots());
    let queued_bytes = metrics::histogram!(m::OUTBOX_QUEUED_BYTES);
    let backlog_gauge = metrics::gauge!(m::OUTBOX_BACKLOG_SESSIONS);
    let mut visits = Vec::new();
    let mut turn: u64 = 0;
    // Sessions with a backlog seen so far in this rotation: published once per rotation,
    // when every session has been looked at once.
    let mut backlogged = 0u64;
    loop {
        tokio::select! {
            _ = node.stop_background.cancelled() => return,
            _ = tick.tick() => {}
        }
        node.hub.sweep_tick(turn, &mut visits);
        turn = turn.wrapping_add(1);
        let now = Now {
            mono_ms: mono_ms(),
            unix_s: unix_ms() / 1000,
        };
        for (client, ping_due) in visits.drain(..) {
            let queued = client.queued_bytes();
            if queued > 0 {
                backlogged += 1;
                queued_bytes.record(queued as f64);
            }
            client.sweep(now, &live, limits, ping_due);
        }
        if turn.is_multiple_of(slots) {
            backlog_gauge.set(backlogged as f64);
            backlogged = 0;
        }
    }
}

/// Extends the node's presence lease every third of the TTL, at once after a pub/sub
/// reconnect, and every second while Redis fails (so readiness recovers quickly). A lease
/// that expired meanwhile (the node was frozen, partitioned, or Redis lost its data) is
/// replaced and every session written again: presence/redis.rs.
pub(super) async fn heartbeat_loop(node: Arc<Node>, reassert: Arc<Notify>) {
    let interval = node.config.heartbeat_interval();
    let mut wait = Duration::ZERO;
    // Redis Functions are not persisted by a Redis without RDB/AOF, so the inbox function
    // is (re)loaded after start, after failures and after every reconnect.
    let mut functions_loaded = false;
    loop {
        tokio::select! {
            _ = node.stop_background.cancelled() => return,
            _ = sleep(wait) => {}
            _ = reassert.notified() => {
                functions_loaded = false;
                node.engines.presence.reassert_next();
            }
        }
        let sessions = node.hub.snapshot();
        let counts = node.hub.counts();
        metrics::gauge!(m::CONNECTIONS).set(counts.connections as f64);
        metrics::gauge!(m::USERS).set(counts.users as f64);
        let started = Instant::now();
        match node.engines.presence.heartbeat(&sessions, counts).await {
            Ok(()) => {
                if !functions_loaded {
                    match node.engines.inbox.load().await {
                        Ok(()) => functions_loaded = true,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot load the herald_notify function");
                            metrics::counter!(m::REDIS_ERRORS, "op" => "function_load")
                                .increment(1);
                        }
                    }
                }
                metrics::histogram!(m::HEARTBEAT_SECONDS).record(started.elapsed().as_secs_f64());
                node.health.set_redis(true);
                wait = interval;
            }
            Err(e) => {
                functions_loaded = false;
                node.engines.reset_connections();
                tracing::warn!(error = %e, "presence heartbeat failed");
                metrics::counter!(m::REDIS_ERRORS, "op" => "heartbeat").increment(1);
                node.health.set_redis(false);
                wait = interval.min(RETRY_INTERVAL);
            }
        }
    }
}

/// Emits the `offline` events that are due, every second (or every heartbeat interval if
/// shorter). Every node runs it; the script makes each event happen exactly once.
pub(super) async fn reaper_loop(node: Arc<Node>) {
    let every = node.config.heartbeat_interval().min(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = node.stop_background.cancelled() => return,
            _ = sleep(every) => {}
        }
        match node.engines.presence.reap().await {
            Ok(n) if n > 0 => {
                metrics::counter!(m::OFFLINE_EVENTS_REAPED).increment(n);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "offline reaper failed");
                metrics::counter!(m::REDIS_ERRORS, "op" => "reap").increment(1);
            }
        }
    }
}

/// Catches every live session up after the node's subscription was rebuilt (the broker has
/// parked their live deliveries before the new subscription delivered anything). Runs in
/// its own task with a bounded number of sessions in flight, so thousands of sessions are
/// caught up at a steady pace while the subscriber goes on reading. A rebuild during a pass
/// starts another pass once this one is done.
pub(super) async fn catch_up_loop(node: Arc<Node>, mut subscribed: watch::Receiver<u64>) {
    loop {
        tokio::select! {
            _ = node.stop_background.cancelled() => return,
            changed = subscribed.changed() => if changed.is_err() { return },
        }
        catch_up_pass(&node).await;
    }
}

/// One pass: every session waiting for a catch-up gets it.
pub(super) async fn catch_up_pass(node: &Node) {
    let limits = node.replay_limits();
    let started = Instant::now();
    let mut clients = Vec::new();
    node.hub.all_sessions_with_users(&mut clients);
    let inbox = &*node.engines.inbox;
    let sessions = clients.len();
    futures_util::stream::iter(clients)
        .for_each_concurrent(CATCH_UP_CONCURRENCY, |(client, user)| async move {
            if client.catch_up_start().is_none() {
                // Greeting (it catches up when its replay ends) or closing.
                return;
            }
            if let Err(reason) = replay::catch_up(&client, inbox, &user, limits).await {
                client.close(reason);
            }
            metrics::counter!(m::CATCH_UP_SESSIONS).increment(1);
        })
        .await;
    let took = started.elapsed();
    metrics::histogram!(m::CATCH_UP_SECONDS).record(took.as_secs_f64());
    tracing::info!(
        sessions,
        took_ms = took.as_millis() as u64,
        "live sessions caught up after the subscription was rebuilt"
    );
}
