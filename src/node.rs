//! Wires a node together (hub, broker, presence, health, auth) and owns its lifecycle:
//! background tasks, the session life cycle around the socket loop, and draining.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::time::{sleep, timeout, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::auth::{Authenticator, Identity};
use crate::broker::{Broker, MemoryBroker, RedisBroker, SubscriberSettings};
use crate::config::Config;
use crate::control::{Liveness, Outgoing, SessionControl};
use crate::fanout::Fanout;
use crate::health::Health;
use crate::hub::{Hub, SessionInfo, SubCommand};
use crate::inbox::{envelope, Inbox, InboxError, InboxPolicy, MemoryInbox, RedisInbox, StreamId};
use crate::keys::Keys;
use crate::metrics as m;
use crate::presence::{EventPolicy, MemoryPresence, Presence, RedisPresence};
use crate::protocol::{message_frame, CloseReason, ServerFrame};
use crate::session::{self, Acker, SessionParts};
use crate::ws::FrameReader;

/// Why a node could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid Redis URL: {0}")]
    RedisUrl(#[from] redis::RedisError),
    #[error("cannot build the Redis pool: {0}")]
    Pool(String),
}

/// How long a new session waits for its subscriptions before its welcome is sent anyway.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);
/// Heartbeat retry interval while Redis is failing (bounded by the normal interval).
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// A running node.
pub struct Node {
    pub config: Config,
    pub node_id: String,
    pub keys: Keys,
    pub hub: Arc<Hub>,
    pub broker: Broker,
    pub presence: Presence,
    pub inbox: Inbox,
    pub health: Arc<Health>,
    pub auth: Authenticator,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    slots: AtomicUsize,
    sessions: TaskTracker,
    background: TaskTracker,
    stop_background: CancellationToken,
}

/// A reserved connection slot; released when dropped.
pub struct Slot {
    node: Arc<Node>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.node.slots.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Node {
    /// Builds the node and starts its background tasks (subscriber, heartbeat). Never waits
    /// for Redis: a node started before Redis is reachable reports not-ready until it is.
    pub fn start(config: Config) -> Result<Arc<Node>, NodeError> {
        let node_id = config
            .node_id
            .clone()
            .unwrap_or_else(|| Uuid::new_v4().to_string());
        let keys = Keys::new(&config.prefix, &node_id);
        // The recorder goes first: components resolve their metric handles when built.
        let metrics = crate::metrics::install();
        let standalone = config.redis_url.is_none();
        let health = Arc::new(Health::new(standalone));
        let (sub_tx, sub_rx) = mpsc::unbounded_channel::<SubCommand>();
        let hub = Arc::new(Hub::new(keys.clone(), sub_tx));
        let fanout = Arc::new(Fanout::new(
            hub.clone(),
            keys.clone(),
            config.max_message_bytes,
            config.outbox_limits(),
            health.clone(),
        ));

        let policy = InboxPolicy {
            max_len: config.inbox_max_len,
            retention: config.inbox_retention,
        };
        let (broker, presence, inbox) = match &config.redis_url {
            None => {
                let b = MemoryBroker::new();
                b.attach(fanout.clone());
                (
                    Broker::Memory(b),
                    Presence::Memory(MemoryPresence::new(&node_id, config.presence_ttl)),
                    Inbox::Memory(MemoryInbox::new(policy)),
                )
            }
            Some(url) => {
                let client = redis::Client::open(url.as_str())?;
                let pool =
                    crate::redis_pool::build(url, config.redis_pool).map_err(NodeError::Pool)?;
                (
                    Broker::Redis(RedisBroker::new(client, pool.clone())),
                    Presence::Redis(RedisPresence::new(
                        pool.clone(),
                        keys.clone(),
                        &node_id,
                        &config.listen.to_string(),
                        config.presence_ttl,
                        EventPolicy {
                            grace: config.offline_grace,
                            max_len: config.events_max_len,
                            retention: config.events_retention,
                        },
                    )),
                    Inbox::Redis(RedisInbox::new(pool, keys.clone(), policy)),
                )
            }
        };

        let auth = match &config.jwt_secret {
            Some(secret) if !config.dev => Authenticator::jwt(secret, config.max_topics),
            _ => Authenticator::dev(config.max_topics),
        };

        let node = Arc::new(Node {
            node_id,
            keys: keys.clone(),
            hub,
            broker,
            presence,
            inbox,
            health: health.clone(),
            auth,
            metrics,
            slots: AtomicUsize::new(0),
            sessions: TaskTracker::new(),
            background: TaskTracker::new(),
            stop_background: CancellationToken::new(),
            config,
        });

        let reassert = Arc::new(Notify::new());
        let settings = SubscriberSettings {
            static_channels: vec![
                keys.broadcast_channel(),
                keys.control_channel(),
                keys.canary_channel(),
            ],
            canary_channel: keys.canary_channel(),
            probe_interval: node
                .config
                .heartbeat_interval()
                .max(Duration::from_millis(500)),
            probe_timeout: (node.config.heartbeat_interval() * 2).max(Duration::from_secs(2)),
            health: health.clone(),
            on_reconnect: reassert.clone(),
        };
        {
            let n = node.clone();
            let stop = node.stop_background.clone();
            node.background.spawn(async move {
                n.broker
                    .run_subscriber(fanout, sub_rx, settings, stop)
                    .await;
            });
        }
        {
            let n = node.clone();
            node.background
                .spawn(async move { n.heartbeat_loop(reassert).await });
        }
        if node.health.clustered() {
            let n = node.clone();
            node.background.spawn(async move { n.reaper_loop().await });
        }
        {
            let n = node.clone();
            node.background.spawn(async move { n.sweep_loop().await });
        }
        Ok(node)
    }

    /// Visits every session a few times per ping interval: sends due pings and closes
    /// sessions that stayed silent past the idle timeout or whose backlog made no progress
    /// within the write timeout. One task instead of a timer per session: an idle session
    /// then holds no timer at all.
    async fn sweep_loop(self: Arc<Self>) {
        let live = Liveness {
            ping_interval: self.config.ping_interval,
            idle_timeout: self.config.idle_timeout,
            write_timeout: self.config.write_timeout,
        };
        let period = (live
            .ping_interval
            .min(live.idle_timeout)
            .min(live.write_timeout)
            / 4)
        .clamp(Duration::from_millis(20), Duration::from_secs(1));
        let limits = self.config.outbox_limits();
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut controls = Vec::new();
        loop {
            tokio::select! {
                _ = self.stop_background.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.hub.all_sessions(&mut controls);
            let now = crate::control::now_ms();
            for ctl in controls.drain(..) {
                ctl.sweep(now, &live, limits);
            }
        }
    }

    /// Refreshes presence every third of the TTL, at once after a pub/sub reconnect, and
    /// every second while Redis fails (so readiness recovers quickly).
    async fn heartbeat_loop(self: Arc<Self>, reassert: Arc<Notify>) {
        let interval = self.config.heartbeat_interval();
        let mut wait = Duration::ZERO;
        let mut last_ok: Option<Instant> = None;
        // Redis Functions are not persisted by a Redis without RDB/AOF, so the inbox
        // function is (re)loaded after start, after failures and after every reconnect.
        let mut functions_loaded = false;
        loop {
            tokio::select! {
                _ = self.stop_background.cancelled() => return,
                _ = sleep(wait) => {}
                _ = reassert.notified() => functions_loaded = false,
            }
            // Longer than the TTL since the last successful heartbeat means this node's
            // records have expired (it was frozen, partitioned or Redis lost them): the
            // heartbeat below rewrites every session, so it doubles as the re-assertion.
            if let Some(t) = last_ok {
                if t.elapsed() > self.config.presence_ttl {
                    tracing::warn!(
                        away_ms = t.elapsed().as_millis() as u64,
                        "presence expired while this node was away; re-asserting"
                    );
                    metrics::counter!(m::PRESENCE_REASSERTS).increment(1);
                }
            }
            let sessions = self.hub.snapshot();
            let counts = self.hub.counts();
            metrics::gauge!(m::CONNECTIONS).set(counts.connections as f64);
            metrics::gauge!(m::USERS).set(counts.users as f64);
            let started = Instant::now();
            match self.presence.heartbeat(&sessions, counts).await {
                Ok(()) => {
                    last_ok = Some(Instant::now());
                    if !functions_loaded {
                        match self.inbox.load().await {
                            Ok(()) => functions_loaded = true,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot load the herald_notify function");
                                metrics::counter!(m::REDIS_ERRORS, "op" => "function_load")
                                    .increment(1);
                            }
                        }
                    }
                    metrics::histogram!(m::HEARTBEAT_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    self.health.set_redis(true);
                    wait = interval;
                }
                Err(e) => {
                    functions_loaded = false;
                    self.presence.reset_connections();
                    tracing::warn!(error = %e, "presence heartbeat failed");
                    metrics::counter!(m::REDIS_ERRORS, "op" => "heartbeat").increment(1);
                    self.health.set_redis(false);
                    wait = interval.min(RETRY_INTERVAL);
                }
            }
        }
    }

    /// Emits the `offline` events that are due, every second (or every heartbeat interval if
    /// shorter). Every node runs it; the script makes each event happen exactly once.
    async fn reaper_loop(self: Arc<Self>) {
        let every = self.config.heartbeat_interval().min(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = self.stop_background.cancelled() => return,
                _ = sleep(every) => {}
            }
            match self.presence.reap().await {
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

    /// Reserves a connection slot, or `None` when the node is full.
    pub fn try_reserve(self: &Arc<Self>) -> Option<Slot> {
        let prev = self.slots.fetch_add(1, Ordering::AcqRel);
        let slot = Slot { node: self.clone() };
        (prev < self.config.max_connections).then_some(slot)
    }

    /// Runs a session on an upgraded connection, from registration to presence removal.
    ///
    /// The task's own state is what every idle session costs, so the setup (upgrade,
    /// registration, presence, welcome, replay) and the teardown run as boxed futures that
    /// exist only while they run, and the session's long-lived data is one exact-size box.
    pub fn spawn_session(
        self: &Arc<Self>,
        upgrade: hyper::upgrade::OnUpgrade,
        who: Identity,
        since: Option<StreamId>,
        slot: Slot,
    ) {
        let node = self.clone();
        self.sessions.spawn(async move {
            let _slot = slot;
            let Some((sock, reader)) = Box::pin(take_socket(upgrade)).await else {
                return;
            };
            let (live, reason) = Box::pin(node.open_session(sock, who, since)).await;
            let reason = match reason {
                Some(r) => r,
                None => session::run(&live.parts, reader).await,
            };
            Box::pin(node.close_session(live, reason)).await;
        });
    }

    /// Registers the session, records its presence and writes the welcome and any replay.
    /// Returns the session and, if it already ended, why.
    async fn open_session(
        &self,
        sock: TcpStream,
        who: Identity,
        since: Option<StreamId>,
    ) -> (Box<LiveSession>, Option<CloseReason>) {
        let sock = Arc::new(sock);
        let info = SessionInfo {
            id: Uuid::new_v4(),
            user: who.user.into(),
            topics: who.topics.into_iter().map(Arc::<str>::from).collect(),
            connected_at: crate::unix_ms(),
        };
        let ctl = Arc::new(SessionControl::held(sock.clone()));
        let reg = self.hub.register(info.clone(), ctl.clone());
        metrics::counter!(m::SESSIONS_OPENED).increment(1);
        metrics::gauge!(m::CONNECTIONS).increment(1.0);
        if let Err(e) = self.presence.add(&info, reg.first_of_user).await {
            // The next heartbeat writes it; the session is not refused for a Redis blip.
            tracing::warn!(error = %e, "presence add failed");
            self.presence.reset_connections();
            metrics::counter!(m::REDIS_ERRORS, "op" => "presence_add").increment(1);
        }
        let _ = timeout(SUBSCRIBE_WAIT, reg.subscribed).await;

        let session_id = info.id.to_string();
        let welcome = ServerFrame::Welcome {
            session: &session_id,
            user: &info.user,
            node: &self.node_id,
        }
        .to_text();
        let greeted = self.greet(&ctl, welcome, &info.user, since).await;
        let live = Box::new(LiveSession {
            parts: SessionParts {
                sock,
                ctl: ctl.clone(),
                outbox: self.config.outbox_limits(),
                max_message: self.config.max_message_bytes,
                read_chunk: self.config.ws_read_buffer,
                ack_timeout: self.config.write_timeout,
                acker: Some(Acker {
                    inbox: self.inbox.clone(),
                    user: info.user.clone(),
                }),
            },
            info,
        });
        match greeted {
            Ok(replayed_up_to) => {
                ctl.release(replayed_up_to);
                (live, None)
            }
            Err(reason) => {
                ctl.close(reason);
                let last = (reason != CloseReason::ConnectionLost).then(|| Outgoing::close(reason));
                ctl.finish(last, Duration::from_millis(100)).await;
                (live, Some(reason))
            }
        }
    }

    /// Unregisters an ended session and removes its presence.
    async fn close_session(&self, live: Box<LiveSession>, reason: CloseReason) {
        let LiveSession { info, parts } = *live;
        drop(parts);
        let removed = self.hub.unregister(info.id);
        metrics::gauge!(m::CONNECTIONS).decrement(1.0);
        metrics::counter!(m::SESSIONS_CLOSED, "reason" => reason.label()).increment(1);
        if reason == CloseReason::SlowConsumer {
            metrics::counter!(m::SLOW_CONSUMERS).increment(1);
        }
        let last = removed.map(|r| r.last_of_user).unwrap_or(false);
        let offline_reason = match reason {
            CloseReason::Kicked => "kicked",
            CloseReason::Draining => "drained",
            _ => "closed",
        };
        if let Err(e) = self.presence.remove(&info, last, offline_reason).await {
            tracing::debug!(error = %e, "presence remove failed; the entry will expire");
            self.presence.reset_connections();
            metrics::counter!(m::REDIS_ERRORS, "op" => "presence_remove").increment(1);
        }
        tracing::debug!(session = %info.id, user = %info.user, reason = reason.label(), "session closed");
    }

    /// Sends the welcome, then replays the durable inbox after `since` (or after the user's
    /// read cursor) in pages, with a gap frame when entries were lost. Runs after the
    /// subscription is confirmed, so live copies of replayed entries can be dropped by id
    /// (returned) without a hole between replay and live delivery.
    async fn greet(
        &self,
        ws: &SessionControl,
        welcome: String,
        user: &str,
        since: Option<StreamId>,
    ) -> Result<Option<StreamId>, CloseReason> {
        let wt = self.config.write_timeout;
        send_text(ws, welcome, wt).await?;
        let start = match since {
            Some(s) => Some(s),
            None => match self.inbox.cursor(user).await {
                Ok(c) => c,
                Err(e) => {
                    replay_failed(&e);
                    return Ok(None);
                }
            },
        };
        if let Some(start) = start {
            match self.inbox.trimmed_after(user, start).await {
                Ok(true) => {
                    send_text(ws, ServerFrame::Gap { reason: "trimmed" }.to_text(), wt).await?
                }
                Ok(false) => {}
                Err(e) => {
                    replay_failed(&e);
                    return Ok(None);
                }
            }
        }
        let label = format!("user:{user}");
        let limit = self.config.replay_limit;
        let mut after = start;
        let mut replayed = None;
        let mut sent = 0usize;
        while sent < limit {
            let page = match self
                .inbox
                .read_after(user, after, REPLAY_PAGE.min(limit - sent))
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    replay_failed(&e);
                    break;
                }
            };
            if page.is_empty() {
                break;
            }
            for entry in page {
                after = Some(entry.id);
                replayed = Some(entry.id);
                sent += 1;
                if entry.data.len() > self.config.max_message_bytes {
                    metrics::counter!(m::MESSAGES_DROPPED, "reason" => "oversize").increment(1);
                    continue;
                }
                let frame = message_frame(&label, Some(&entry.id.to_string()), &entry.data);
                send_text(ws, frame, wt).await?;
                metrics::counter!(m::MESSAGES_REPLAYED).increment(1);
            }
        }
        if sent >= limit
            && matches!(self.inbox.read_after(user, after, 1).await, Ok(more) if !more.is_empty())
        {
            send_text(
                ws,
                ServerFrame::Gap {
                    reason: "replay_limit",
                }
                .to_text(),
                wt,
            )
            .await?;
        }
        Ok(replayed)
    }

    /// Publishes a durable notification: stored in the user's inbox and delivered live with
    /// its id. On Redis the `herald_notify` function does both atomically.
    pub async fn publish_durable(
        &self,
        user: &str,
        payload: &[u8],
    ) -> Result<StreamId, InboxError> {
        let id = self.inbox.notify(user, payload).await?;
        if let Inbox::Memory(_) = self.inbox {
            // The memory broker cannot fail.
            let _ = self
                .broker
                .publish(&self.keys.user_channel(user), &envelope(id, payload))
                .await;
        }
        Ok(id)
    }

    /// Live sessions on this node.
    pub fn session_count(&self) -> usize {
        self.hub.counts().connections
    }

    /// Clean stop: not-ready at once, refuse upgrades, close sessions with 1012 in paced
    /// batches (each removes its presence as it ends), deregister, stop background tasks.
    /// Returns within `drain_grace` whatever the clients do.
    pub async fn drain(&self) {
        let deadline = Instant::now() + self.config.drain_grace;
        self.health.set_draining();
        let controls = self.hub.controls();
        tracing::info!(sessions = controls.len(), "draining");
        for (i, batch) in controls.chunks(self.config.drain_batch).enumerate() {
            if i > 0 {
                sleep(self.config.drain_interval).await;
            }
            for ctl in batch {
                ctl.close(CloseReason::Draining);
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        // Sessions that arrived during the drain are closed too.
        for ctl in self.hub.controls() {
            ctl.close(CloseReason::Draining);
        }
        self.sessions.close();
        // Keep a little of the grace for deregistering.
        let session_deadline = deadline
            .checked_sub(Duration::from_millis(500))
            .unwrap_or(deadline)
            .max(Instant::now());
        if tokio::time::timeout_at(session_deadline, self.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.session_count(),
                "drain grace ran out; dropping remaining sessions"
            );
        }
        if let Err(e) = self.presence.deregister().await {
            tracing::warn!(error = %e, "deregister failed; the node record will expire");
        }
        self.stop_background.cancel();
        self.background.close();
        let _ = tokio::time::timeout_at(
            deadline.max(Instant::now() + Duration::from_millis(100)),
            self.background.wait(),
        )
        .await;
        tracing::info!("drained");
    }
}

/// What a session keeps while it is live.
struct LiveSession {
    info: SessionInfo,
    parts: SessionParts,
}

/// Entries read from the inbox per round trip while replaying: bounds node memory per
/// replaying session to this many payloads.
const REPLAY_PAGE: usize = 16;

fn replay_failed(e: &InboxError) {
    tracing::warn!(error = %e, "inbox replay failed; continuing with live messages");
    metrics::counter!(m::REDIS_ERRORS, "op" => "inbox_replay").increment(1);
}

/// Writes one text frame of the welcome or replay (the session is held: nothing else
/// writes). A client that does not take it within `wait` is a slow consumer.
async fn send_text(ws: &SessionControl, text: String, wait: Duration) -> Result<(), CloseReason> {
    ws.send_now(&Outgoing::text(text, None), wait).await
}

/// Takes the TCP stream back from hyper once the 101 response is out, with a frame reader
/// holding any bytes the client sent past the handshake. herald's accept loop serves
/// `TokioIo<TcpStream>`, so the downcast fails only if that changes; such a connection is
/// refused and counted.
async fn take_socket(upgrade: hyper::upgrade::OnUpgrade) -> Option<(TcpStream, FrameReader)> {
    let upgraded = match upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            metrics::counter!(m::UPGRADES_REJECTED, "reason" => "upgrade_failed").increment(1);
            return None;
        }
    };
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        // The leftover bytes are copied out: hyper's `read_buf` is a view of its whole
        // connection read buffer (8 KiB), which holding would keep alive per session.
        Ok(parts) => Some((
            parts.io.into_inner(),
            FrameReader::with_bytes(&parts.read_buf),
        )),
        Err(_) => {
            tracing::error!("upgraded connection is not a TCP stream; closing it");
            metrics::counter!(m::UPGRADES_REJECTED, "reason" => "not_tcp").increment(1);
            None
        }
    }
}
