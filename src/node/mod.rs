//! The composition root: builds a node from its configuration (hub, fan-out, engines,
//! health), starts its background tasks, and offers the narrow facade the HTTP layer and
//! `main` use. Nothing outside this module reaches into a node's parts.

mod session;
mod tasks;
#[cfg(test)]
mod tests;

pub(crate) use session::SessionRequest;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::auth::{Authenticator, JwtSettings, KeyError};
use crate::cluster::broker::{Router, SubscriberSettings};
use crate::cluster::inbox::NotifyOptions;
use crate::cluster::keys::Keys;
use crate::cluster::presence::{PresenceSession, Stats};
use crate::cluster::{BuildError, Engines, RedisError};
use crate::config::Config;
use crate::delivery::{Fanout, Hub, SubCommand, Target, WheelShape};
use crate::health::{Health, ReadyStatus};
use crate::metrics as m;
use crate::protocol::{CloseReason, StreamId};
use crate::transport::replay::{Acked, Opening, ReplayLimits};
use crate::transport::session::SessionEnv;
use crate::transport::throttle::FrameRate;
use crate::transport::Client;

/// Why a node could not be built (only `main` sees it, to print and exit).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot set up Redis: {0}")]
    Engines(Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot use a JWT key: {0}")]
    Key(Box<dyn std::error::Error + Send + Sync>),
}

impl From<BuildError> for NodeError {
    fn from(e: BuildError) -> Self {
        NodeError::Engines(Box::new(e))
    }
}

impl From<KeyError> for NodeError {
    fn from(e: KeyError) -> Self {
        NodeError::Key(Box::new(e))
    }
}

/// A running node.
pub struct Node {
    config: Config,
    node_id: String,
    hub: Arc<Hub>,
    engines: Engines,
    health: Arc<Health>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Verifies client tokens, at connect and when a session refreshes its token.
    auth: Arc<Authenticator>,
    /// What every session shares.
    session_env: Arc<SessionEnv>,
    /// One permit per session; `--max-connections` of them.
    admission: Arc<Semaphore>,
    sessions: TaskTracker,
    background: TaskTracker,
    stop_background: CancellationToken,
}

/// Why a new session was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The node holds `--max-connections` sessions.
    Full,
    /// The user holds `--max-sessions-per-user` sessions on this node.
    TooManySessions,
}

/// A reserved session slot, released when dropped.
pub(crate) struct Admission(#[allow(dead_code)] OwnedSemaphorePermit);

impl Node {
    /// Builds the node and starts its background tasks (subscriber, heartbeat, reaper,
    /// sweeper). Never waits for Redis: a node started before Redis is reachable reports
    /// not-ready until it is.
    pub fn start(config: Config) -> Result<Arc<Node>, NodeError> {
        let node_id = config
            .node_id
            .clone()
            .unwrap_or_else(|| Uuid::new_v4().to_string());
        let keys = Keys::new(&config.prefix, &node_id);
        // The recorder goes first: components resolve their metric handles when built.
        let metrics = m::install();
        let health = Arc::new(Health::new(!config.uses_redis()));
        let (sub_tx, sub_rx) = mpsc::unbounded_channel::<SubCommand>();
        let hub = Arc::new(Hub::new(sub_tx, WheelShape::new(&config.liveness())));
        let fanout = Arc::new(Fanout::new(
            hub.clone(),
            config.max_message_bytes,
            config.outbox_limits(),
        ));
        let engines = Engines::build(&config, &node_id, &keys)?;
        engines.attach(fanout.clone());
        let auth = Arc::new(authenticator(&config)?);
        let session_env = Arc::new(SessionEnv {
            outbox: config.outbox_limits(),
            max_message: config.max_message_bytes,
            read_chunk: config.ws_read_buffer,
            ack_timeout: config.write_timeout,
            inbox: engines.inbox.clone(),
            auth: auth.clone(),
            frame_rate: FrameRate::new(config.client_frame_rate, config.client_frame_burst),
        });

        let node = Arc::new(Node {
            node_id,
            hub,
            engines,
            health: health.clone(),
            metrics,
            auth,
            session_env,
            admission: Arc::new(Semaphore::new(config.max_connections)),
            sessions: TaskTracker::new(),
            background: TaskTracker::new(),
            stop_background: CancellationToken::new(),
            config,
        });

        metrics::gauge!(m::CONNECTIONS_MAX).set(node.config.max_connections as f64);
        if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
            metrics::gauge!(m::FD_LIMIT).set(soft as f64);
        }
        let reassert = Arc::new(Notify::new());
        let (subscribed, catch_up) = watch::channel(0u64);
        let heartbeat = node.config.heartbeat_interval();
        let settings = SubscriberSettings {
            router: Router::new(keys, fanout, health),
            probe_interval: heartbeat.max(Duration::from_millis(500)),
            probe_timeout: (heartbeat * 2).max(Duration::from_secs(2)),
            on_reconnect: reassert.clone(),
            subscribed,
        };
        let stop = node.stop_background.clone();
        let n = node.clone();
        node.background.spawn(async move {
            n.engines
                .broker
                .run_subscriber(sub_rx, settings, stop)
                .await;
        });
        node.background
            .spawn(tasks::heartbeat_loop(node.clone(), reassert));
        if node.health.clustered() {
            node.background.spawn(tasks::reaper_loop(node.clone()));
        }
        node.background.spawn(tasks::sweep_loop(node.clone()));
        node.background
            .spawn(tasks::catch_up_loop(node.clone(), catch_up));
        Ok(node)
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Verifies client tokens.
    pub(crate) fn authenticator(&self) -> &Arc<Authenticator> {
        &self.auth
    }

    /// Readiness as `/readyz` reports it: the health flags, and not ready while full.
    pub(crate) fn ready_status(&self) -> ReadyStatus {
        let mut status = self.health.status();
        status.full = self.is_full();
        status.ready &= !status.full;
        status
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.health.draining()
    }

    /// The Prometheus text of `/metrics`.
    pub(crate) fn render_metrics(&self) -> String {
        self.metrics.render()
    }

    /// Live sessions on this node.
    pub(crate) fn session_count(&self) -> usize {
        self.hub.counts().connections
    }

    /// Publishes a notification for `target` on every node.
    pub(crate) async fn publish(
        &self,
        target: Target<'_>,
        payload: &[u8],
    ) -> Result<(), RedisError> {
        self.engines
            .broker
            .publish(target, payload)
            .await
            .map(|_| ())
    }

    /// Publishes a durable notification: stored in the user's inbox and delivered live with
    /// its id (on Redis the `herald_notify` function does both atomically).
    pub(crate) async fn publish_durable(
        &self,
        user: &str,
        payload: &[u8],
        options: &NotifyOptions,
    ) -> Result<StreamId, RedisError> {
        self.engines.inbox.notify(user, payload, options).await
    }

    /// Closes every session of `user` on every node with 4002.
    pub(crate) async fn kick(&self, user: &str) -> Result<(), RedisError> {
        self.engines.broker.kick(user).await
    }

    /// Live sessions of `user` across the cluster.
    pub(crate) async fn presence(&self, user: &str) -> Result<Vec<PresenceSession>, RedisError> {
        self.engines.presence.user(user).await
    }

    /// Connections and users across live nodes.
    pub(crate) async fn stats(&self) -> Result<Stats, RedisError> {
        self.engines.presence.stats().await
    }

    /// The user's read cursor (the opening's `start`), unread count and up to `limit`
    /// unacknowledged entries after the cursor.
    pub(crate) async fn inbox_page(&self, user: &str, limit: usize) -> Result<Opening, RedisError> {
        self.engines.inbox.open(user, None, true, true, limit).await
    }

    /// Moves the user's read cursor forward (at most to the newest entry) and tells the
    /// user's sessions on every node.
    /// `session` is the one that read it (an SSE client's ack names it): it is not told.
    pub(crate) async fn inbox_ack(
        &self,
        user: &str,
        id: StreamId,
        session: Option<&str>,
    ) -> Result<Acked, RedisError> {
        self.engines.inbox.ack(user, id, session).await
    }

    /// Withdraws an inbox entry and tells the user's sessions; false when there is none.
    pub(crate) async fn inbox_retract(&self, user: &str, id: StreamId) -> Result<bool, RedisError> {
        self.engines.inbox.retract(user, id).await
    }

    /// What one replay or catch-up may send.
    fn replay_limits(&self) -> ReplayLimits {
        ReplayLimits {
            max_entries: self.config.replay_limit,
            max_bytes: self.config.max_message_bytes,
            write_timeout: self.config.write_timeout,
        }
    }

    /// Records a failed Redis operation of the API: a failed command may mean a pooled
    /// connection broke (Redis restarted), so idle ones are dropped and the next request
    /// connects afresh.
    pub(crate) fn redis_failed(&self, op: &'static str, e: &RedisError) {
        self.engines.reset_connections();
        tracing::warn!(error = %e, op, "API request failed on Redis");
        metrics::counter!(m::REDIS_ERRORS, "op" => op).increment(1);
    }

    /// Parks every session for a catch-up, as the broker does after a rebuilt subscription.
    #[cfg(test)]
    pub(crate) fn hub_hold_all_for_test(&self) -> usize {
        let mut clients = Vec::new();
        self.hub.all_sessions(&mut clients);
        clients.iter().for_each(|c| c.hold_for_catch_up());
        clients.len()
    }

    /// One catch-up pass over every session, as the catch-up task runs it.
    #[cfg(test)]
    pub(crate) async fn catch_up_all_for_test(&self) {
        tasks::catch_up_pass(self).await;
    }

    /// Reserves a session slot for `user`, unless the node is at `--max-connections` or
    /// the user at `--max-sessions-per-user` (checked again, exactly, when the session
    /// registers).
    pub(crate) fn admit(&self, user: &str) -> Result<Admission, Refusal> {
        if self.hub.user_session_count(user) >= self.config.max_sessions_per_user {
            return Err(Refusal::TooManySessions);
        }
        self.admission
            .clone()
            .try_acquire_owned()
            .map(Admission)
            .map_err(|_| Refusal::Full)
    }

    /// Whether every session slot is taken (what `/readyz` reports as `full`).
    pub(crate) fn is_full(&self) -> bool {
        self.admission.available_permits() == 0
    }

    /// Clean stop: not-ready at once, refuse upgrades, close sessions with 1012 in paced
    /// batches (each removes its presence as it ends), deregister, stop background tasks.
    /// Returns within `drain_grace` whatever the clients do.
    pub async fn drain(&self) {
        let deadline = Instant::now() + self.config.drain_grace;
        self.health.set_draining();
        let mut clients: Vec<Arc<Client>> = Vec::new();
        self.hub.all_sessions(&mut clients);
        tracing::info!(sessions = clients.len(), "draining");
        for (i, batch) in clients.chunks(self.config.drain_batch).enumerate() {
            if i > 0 {
                sleep(self.config.drain_interval).await;
            }
            for client in batch {
                client.close(CloseReason::Draining);
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        // Sessions that arrived during the drain are closed too.
        clients.clear();
        self.hub.all_sessions(&mut clients);
        for client in clients {
            client.close(CloseReason::Draining);
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
        if let Err(e) = self.engines.presence.deregister().await {
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

/// The token verifier `config` asks for: the user id itself in --dev (whatever secrets the
/// environment holds, as documented: scripts/local-cluster.sh exports one in both modes),
/// else JWTs with the configured secrets and public keys.
fn authenticator(config: &Config) -> Result<Authenticator, NodeError> {
    if config.dev {
        return Ok(Authenticator::dev(config.max_topics));
    }
    let mut public_keys = Vec::new();
    for path in &config.jwt_public_key_file {
        let pem = std::fs::read(path)
            .map_err(|e| NodeError::Key(format!("cannot read {}: {e}", path.display()).into()))?;
        public_keys.push((path.display().to_string(), pem));
    }
    Ok(Authenticator::jwt(&JwtSettings {
        secrets: [&config.jwt_secret, &config.jwt_secret_previous]
            .into_iter()
            .flatten()
            .map(|s| s.as_bytes().to_vec())
            .collect(),
        public_keys,
        audience: config.jwt_audience.clone(),
        issuer: config.jwt_issuer.clone(),
        max_lifetime: config.jwt_max_lifetime,
        max_topics: config.max_topics,
    })?)
}
