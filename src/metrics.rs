//! Metric names and the Prometheus recorder. Every metric herald exports is named here, so
//! docs/operations.md and dashboards have one place to look.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Gauge: open WebSocket sessions on this node.
pub(crate) const CONNECTIONS: &str = "herald_connections";
/// Gauge: the node's effective `--max-connections` (after fitting it under the open-file
/// limit at start).
pub(crate) const CONNECTIONS_MAX: &str = "herald_connections_max";
/// Gauge: the process's open-file limit (soft, after raising it to the hard limit).
pub(crate) const FD_LIMIT: &str = "herald_fd_limit";
/// Gauge: TCP connections accepted that have not had a request answered yet.
pub(crate) const CONNECTIONS_PENDING: &str = "herald_connections_pending";
/// Counter: connections answered a bare 503 and closed at accept, by `reason` (`pending`:
/// over --max-pending-connections; `no_fds`: the process was out of descriptors).
pub(crate) const CONNECTIONS_REFUSED: &str = "herald_connections_refused_total";
/// Counter: failed `accept` calls, by `kind` (`no_fds`, `other`).
pub(crate) const ACCEPT_ERRORS: &str = "herald_accept_errors_total";
/// Gauge: distinct users with a session on this node.
pub(crate) const USERS: &str = "herald_users";
/// Counter: sessions opened.
pub(crate) const SESSIONS_OPENED: &str = "herald_sessions_opened_total";
/// Counter: sessions closed, by `reason`.
pub(crate) const SESSIONS_CLOSED: &str = "herald_sessions_closed_total";
/// Counter: upgrades refused before the WebSocket opened, by `reason`.
pub(crate) const UPGRADES_REJECTED: &str = "herald_upgrades_rejected_total";
/// Counter: payloads received for fan-out, by `source` (redis, local).
pub(crate) const MESSAGES_IN: &str = "herald_messages_in_total";
/// Counter: durable messages replayed to reconnecting sessions.
pub(crate) const MESSAGES_REPLAYED: &str = "herald_messages_replayed_total";
/// Counter: durable messages sent to live sessions by a catch-up after their node's
/// subscription broke.
pub(crate) const MESSAGES_CAUGHT_UP: &str = "herald_messages_caught_up_total";
/// Counter: sessions caught up after a broken subscription.
pub(crate) const CATCH_UP_SESSIONS: &str = "herald_catch_up_sessions_total";
/// Histogram: seconds one catch-up of every live session took.
pub(crate) const CATCH_UP_SECONDS: &str = "herald_catch_up_seconds";
/// Counter: message frames queued to sessions.
pub(crate) const MESSAGES_OUT: &str = "herald_messages_out_total";
/// Counter: payloads or deliveries dropped, by `reason`.
pub(crate) const MESSAGES_DROPPED: &str = "herald_messages_dropped_total";
/// Counter: sessions disconnected because they read too slowly.
pub(crate) const SLOW_CONSUMERS: &str = "herald_slow_consumer_disconnects_total";
/// Counter: frames received from clients, by `kind`.
pub(crate) const CLIENT_FRAMES: &str = "herald_client_frames_total";
/// Counter: Redis command or connection failures, by `op`.
pub(crate) const REDIS_ERRORS: &str = "herald_redis_errors_total";
/// Gauge: 1 while the pub/sub connection is up and subscribed.
pub(crate) const PUBSUB_CONNECTED: &str = "herald_pubsub_connected";
/// Counter: pub/sub (re)connections that completed their subscriptions.
pub(crate) const PUBSUB_RECONNECTS: &str = "herald_pubsub_reconnects_total";
/// Counter: sharded subscriptions Redis Cluster dropped because their slot moved to another
/// master (resharding), each subscribed again on the new owner.
pub(crate) const PUBSUB_SLOT_MOVES: &str = "herald_pubsub_slot_moves_total";
/// Gauge: 1 while the node reports ready.
pub(crate) const READY: &str = "herald_ready";
/// Counter: API requests, by `route` and `status`.
pub(crate) const API_REQUESTS: &str = "herald_api_requests_total";
/// Counter: API requests refused because the key's scope does not cover the route, by
/// the key's `scope`.
pub(crate) const API_FORBIDDEN: &str = "herald_api_forbidden_total";
/// Counter: times a session's client frames were paused because it sent faster than
/// --client-frame-rate (nothing is dropped).
pub(crate) const CLIENT_FRAMES_THROTTLED: &str = "herald_client_frames_throttled_total";
/// Counter: `POST /ack` requests refused with 429 (the user acked faster than
/// --client-frame-rate on this node).
pub(crate) const ACKS_THROTTLED: &str = "herald_acks_throttled_total";
/// Histogram: seconds for a canary to come back over the pub/sub connection.
pub(crate) const CANARY_RTT_SECONDS: &str = "herald_pubsub_canary_rtt_seconds";
/// Counter: canaries that did not come back in time (the subscription was then rebuilt).
pub(crate) const CANARY_TIMEOUTS: &str = "herald_pubsub_canary_timeouts_total";
/// Counter: heartbeats that found this node's presence already expired (it was away).
pub(crate) const PRESENCE_REASSERTS: &str = "herald_presence_reasserts_total";
/// Counter: `offline` events this node's reaper emitted.
pub(crate) const OFFLINE_EVENTS_REAPED: &str = "herald_offline_events_reaped_total";
/// Counter: times this node found the herald Functions library loaded with other settings
/// than its own (and replaced it).
pub(crate) const FUNCTION_CONFLICTS: &str = "herald_function_conflicts_total";
/// Gauge: sessions with something queued in their outbox (frames the socket did not take
/// at once, or deliveries parked behind a welcome, replay or catch-up), counted by the
/// sweeper over its last full rotation (at most a second old).
pub(crate) const OUTBOX_BACKLOG_SESSIONS: &str = "herald_outbox_backlog_sessions";
/// Histogram: payload bytes queued in one session's outbox, sampled by the sweeper once
/// per rotation for every session that has a backlog (sessions with none are not recorded:
/// the gauge above counts those that have one).
pub(crate) const OUTBOX_QUEUED_BYTES: &str = "herald_outbox_queued_bytes";
/// Histogram: seconds a queued frame waited in a session's outbox before the socket took
/// it in full (or an SSE body took it). Frames written at once are not queued and not
/// recorded; `herald_messages_out_total` counts every frame.
pub(crate) const OUTBOX_WAIT_SECONDS: &str = "herald_outbox_wait_seconds";
/// Histogram: seconds a presence heartbeat took.
pub(crate) const HEARTBEAT_SECONDS: &str = "herald_heartbeat_seconds";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder once per process and returns the handle that renders it.
pub(crate) fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // A second recorder can only exist if something else installed one first; the
            // handle still renders ours (empty) and herald keeps running.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
