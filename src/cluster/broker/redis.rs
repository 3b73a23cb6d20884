//! The Redis broker: PUBLISH through the deadpool pool, and one dedicated pub/sub connection
//! whose reconnection, resubscription and liveness (ping and canary) this module drives
//! itself, because redis-rs pub/sub streams end on connection loss and never reconnect.
//! Every reconnection goes through the [`Connector`], so under Sentinel it asks the
//! sentinels for the master again and follows a failover. Under Redis Cluster the
//! subscription is `sharded.rs`'s instead; publishing stays here (SPUBLISH there).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::{interval, sleep, timeout, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::router::{ControlMessage, Router};
use crate::cluster::connect::Connector;
use crate::cluster::error::{bounded, RedisError};
use crate::cluster::keys::{slot_of, Keys};
use crate::cluster::pool::{Link, Pool};
use crate::delivery::{SubCommand, Target};
use crate::metrics as m;

/// How long connecting the pub/sub connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one SUBSCRIBE/UNSUBSCRIBE round trip may take before the connection is
/// considered broken.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Channels per SUBSCRIBE command when resubscribing everything after a reconnect.
const RESUBSCRIBE_CHUNK: usize = 1000;
/// Most hub commands applied in one batch.
const MAX_BATCH: usize = 1024;
/// Reconnect backoff bounds (the upper one is the connector's: shorter under Sentinel).
const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// What the subscription loop needs besides the broker itself.
pub(crate) struct SubscriberSettings {
    /// Where received payloads go.
    pub(crate) router: Router,
    /// How often the canary is published and checked.
    pub(crate) probe_interval: Duration,
    /// A canary not back within this time means the subscription is silently dead.
    pub(crate) probe_timeout: Duration,
    /// Notified after every successful (re)subscription, so the node re-asserts presence
    /// at once instead of waiting for its next heartbeat.
    pub(crate) on_reconnect: Arc<Notify>,
    /// Bumped after every successful (re)subscription, once every live session's
    /// deliveries are parked, so the node catches each up from its last durable message.
    pub(crate) subscribed: watch::Sender<u64>,
}

/// Redis-backed broker.
#[derive(Clone)]
pub(crate) struct RedisBroker {
    connector: Connector,
    pool: Pool,
    keys: Keys,
}

impl RedisBroker {
    pub(crate) fn new(connector: Connector, pool: Pool, keys: Keys) -> Self {
        RedisBroker {
            connector,
            pool,
            keys,
        }
    }

    pub(crate) async fn publish(
        &self,
        target: Target<'_>,
        payload: &[u8],
    ) -> Result<u64, RedisError> {
        self.publish_on(&self.keys.target_channel(target), payload)
            .await
    }

    /// Publishes a control message that every node carries out.
    pub(crate) async fn kick(&self, user: &str) -> Result<(), RedisError> {
        let msg = ControlMessage::Disconnect {
            user: user.to_string(),
        };
        let payload =
            serde_json::to_vec(&msg).map_err(|_| RedisError::Reply("unserialisable control"))?;
        self.publish_on(&self.keys.control_channel(), &payload)
            .await
            .map(|_| ())
    }

    /// Under Redis Cluster every herald channel is a sharded channel (see `sharded.rs`).
    fn sharded(&self) -> bool {
        matches!(self.connector, Connector::Cluster(_))
    }

    pub(super) async fn publish_on(
        &self,
        channel: &str,
        payload: &[u8],
    ) -> Result<u64, RedisError> {
        let verb = if self.sharded() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let result = bounded(async {
            let mut conn = self.pool.get().await?;
            let mut cmd = ::redis::cmd(verb);
            cmd.arg(channel).arg(payload);
            let n: u64 = match &mut *conn {
                // redis-rs counts SPUBLISH among the read-only commands, so when a shard's
                // master cannot be reached it sends the command to the shard's replica,
                // which answers it for its own subscribers (none: the nodes subscribe on the
                // master) and returns 0. The publish would "succeed" and reach nobody while
                // the failover runs. Routed to the master only, it fails instead, and the API
                // answers 503 so the producer knows to retry.
                Link::Cluster(c) => {
                    let route = Route::new(slot_of(channel), SlotAddr::Master);
                    let routing =
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                    ::redis::from_redis_value(c.route_command(cmd, routing).await?)
                        .map_err(::redis::RedisError::from)?
                }
                link => cmd.query_async(link).await?,
            };
            Ok(n)
        })
        .await;
        if result.as_ref().is_err_and(RedisError::is_connection_error) {
            // The canary publishes through here too: after a failover its failure is what
            // retires the connections to the old master, even with no API traffic.
            self.pool.reset();
        }
        result
    }

    pub(crate) async fn run_subscriber(
        &self,
        cmds: mpsc::UnboundedReceiver<SubCommand>,
        s: SubscriberSettings,
        shutdown: CancellationToken,
    ) {
        if let Connector::Cluster(target) = &self.connector {
            return super::sharded::run(self, target, cmds, s, shutdown).await;
        }
        self.run_classic(cmds, s, shutdown).await;
    }

    /// The subscriber on one instance (or the master the sentinels name): one classic
    /// pub/sub connection, rebuilt by this loop when it breaks.
    async fn run_classic(
        &self,
        mut cmds: mpsc::UnboundedReceiver<SubCommand>,
        s: SubscriberSettings,
        shutdown: CancellationToken,
    ) {
        let keys = s.router.keys().clone();
        let health = s.router.health().clone();
        // Subscribed for the node's whole life: broadcast, control and the canary.
        let canary_channel = keys.canary_channel();
        let mut desired: HashSet<String> = [
            keys.broadcast_channel(),
            keys.control_channel(),
            canary_channel.clone(),
        ]
        .into_iter()
        .collect();
        let mut backoff = BACKOFF_MIN;
        let backoff_max = self.connector.backoff_max();
        let mut canary_seq = 0u64;
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = timeout(CONNECT_TIMEOUT, self.connector.pubsub()) => r,
            };
            let pubsub = match connected {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "pub/sub connect failed");
                    metrics::counter!(m::REDIS_ERRORS, "op" => "pubsub_connect").increment(1);
                    if !wait_offline(&mut cmds, &keys, &mut desired, backoff, &shutdown).await {
                        return;
                    }
                    backoff = (backoff * 2).min(backoff_max);
                    continue;
                }
                Err(_) => {
                    tracing::warn!("pub/sub connect timed out");
                    metrics::counter!(m::REDIS_ERRORS, "op" => "pubsub_connect").increment(1);
                    if !wait_offline(&mut cmds, &keys, &mut desired, backoff, &shutdown).await {
                        return;
                    }
                    backoff = (backoff * 2).min(backoff_max);
                    continue;
                }
            };
            let (mut sink, mut stream) = pubsub.split();

            // Fold in whatever the hub asked for while we were away, then subscribe to the
            // whole desired set. Acks wait until the channels are confirmed.
            let mut pending_acks = Vec::new();
            while let Ok(cmd) = cmds.try_recv() {
                let (_, _, acks) = apply(&keys, &mut desired, vec![cmd]);
                pending_acks.extend(acks);
            }
            let all: Vec<String> = desired.iter().cloned().collect();
            let mut ok = true;
            for chunk in all.chunks(RESUBSCRIBE_CHUNK) {
                match timeout(SUBSCRIBE_TIMEOUT, sink.subscribe(chunk)).await {
                    Ok(Ok(())) => {}
                    _ => {
                        ok = false;
                        break;
                    }
                }
            }
            for a in pending_acks {
                let _ = a.send(());
            }
            if !ok {
                tracing::warn!("resubscribe failed; reconnecting");
                metrics::counter!(m::REDIS_ERRORS, "op" => "subscribe").increment(1);
                if !wait_offline(&mut cmds, &keys, &mut desired, backoff, &shutdown).await {
                    return;
                }
                backoff = (backoff * 2).min(backoff_max);
                continue;
            }
            backoff = BACKOFF_MIN;
            // Whatever was published while the subscription was down is in the inboxes,
            // not in this connection: park every session's live deliveries before the new
            // subscription delivers anything, and let the node catch each one up.
            // The same network event may have broken the pooled command connections: drop
            // the idle ones so the catch-up reads and presence re-assertion connect afresh.
            self.pool.reset();
            let held = s.router.hold_all_for_catch_up();
            s.subscribed.send_modify(|g| *g = g.wrapping_add(1));
            health.canary_reset();
            health.set_pubsub(true);
            metrics::counter!(m::PUBSUB_RECONNECTS).increment(1);
            tracing::info!(
                channels = desired.len(),
                sessions = held,
                "pub/sub subscribed"
            );
            s.on_reconnect.notify_one();

            let mut probe = interval(s.probe_interval);
            probe.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let reason = loop {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        health.set_pubsub(false);
                        return;
                    }
                    msg = stream.next() => match msg {
                        Some(msg) => {
                            s.router.route(msg.get_channel_name(), msg.get_payload_bytes()).await;
                        }
                        None => break "connection closed",
                    },
                    cmd = cmds.recv() => {
                        let Some(cmd) = cmd else {
                            health.set_pubsub(false);
                            return;
                        };
                        let (subs, unsubs, acks) = take_batch(&keys, &mut desired, cmd, &mut cmds);
                        let mut ok = true;
                        if !unsubs.is_empty() {
                            ok &= matches!(timeout(SUBSCRIBE_TIMEOUT, sink.unsubscribe(&unsubs)).await, Ok(Ok(())));
                        }
                        if ok && !subs.is_empty() {
                            ok &= matches!(timeout(SUBSCRIBE_TIMEOUT, sink.subscribe(&subs)).await, Ok(Ok(())));
                        }
                        if !settle(acks, ok) {
                            break "subscribe failed";
                        }
                    }
                    tick = probe.tick() => {
                        // A tick far behind schedule means this process was not running
                        // (SIGSTOP, VM pause): the canary may be sitting unread in the socket,
                        // so its clock restarts instead of condemning a healthy connection.
                        if tick.elapsed() > s.probe_interval / 2 {
                            tracing::warn!(late_ms = tick.elapsed().as_millis() as u64, "process was stalled; re-checking the subscription");
                            health.canary_reset();
                            s.on_reconnect.notify_one();
                            continue;
                        }
                        if health.canary_overdue(s.probe_timeout.as_millis() as u64) {
                            metrics::counter!(m::CANARY_TIMEOUTS).increment(1);
                            break "canary did not come back";
                        }
                        if health.canary_answered() {
                            canary_seq += 1;
                            health.canary_sending(canary_seq);
                            let this = self.clone();
                            let channel = canary_channel.clone();
                            // Published from its own task so a slow pool never stalls reading.
                            tokio::spawn(async move {
                                if let Err(e) = this.publish_on(&channel, canary_seq.to_string().as_bytes()).await {
                                    tracing::debug!(error = %e, "canary publish failed");
                                    metrics::counter!(m::REDIS_ERRORS, "op" => "canary").increment(1);
                                }
                            });
                        }
                    }
                }
            };
            health.set_pubsub(false);
            tracing::warn!(reason, "pub/sub connection lost; reconnecting");
            drop(stream);
            drop(sink);
            if !wait_offline(&mut cmds, &keys, &mut desired, backoff, &shutdown).await {
                return;
            }
        }
    }
}

/// While disconnected, keeps `desired` current and acknowledges subscriptions at once (the
/// next connection subscribes them), for `wait`. Returns false on shutdown.
pub(super) async fn wait_offline(
    cmds: &mut mpsc::UnboundedReceiver<SubCommand>,
    keys: &Keys,
    desired: &mut HashSet<String>,
    wait: Duration,
    shutdown: &CancellationToken,
) -> bool {
    let deadline = sleep(wait);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = &mut deadline => return true,
            cmd = cmds.recv() => match cmd {
                Some(cmd) => {
                    for a in apply(keys, desired, vec![cmd]).2 {
                        let _ = a.send(());
                    }
                }
                None => return false,
            },
        }
    }
}

/// Takes `first` and the hub commands already queued behind it (at most `MAX_BATCH` in
/// all), applies them to `desired`, and returns what `apply` returns: one SUBSCRIBE and one
/// UNSUBSCRIBE for a burst of joins and leaves instead of a round trip each.
pub(super) fn take_batch(
    keys: &Keys,
    desired: &mut HashSet<String>,
    first: SubCommand,
    cmds: &mut mpsc::UnboundedReceiver<SubCommand>,
) -> (Vec<String>, Vec<String>, Vec<oneshot::Sender<()>>) {
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match cmds.try_recv() {
            Ok(c) => batch.push(c),
            Err(_) => break,
        }
    }
    apply(keys, desired, batch)
}

/// Sends a batch's acknowledgements and counts a failed (UN)SUBSCRIBE; returns `ok`.
///
/// The acks go out even on failure: the channels are in `desired` and the reconnect that
/// follows a failure subscribes them; holding the sessions back would not help.
pub(super) fn settle(acks: Vec<oneshot::Sender<()>>, ok: bool) -> bool {
    for a in acks {
        let _ = a.send(());
    }
    if !ok {
        metrics::counter!(m::REDIS_ERRORS, "op" => "subscribe").increment(1);
    }
    ok
}

/// Applies hub commands in order to `desired` and returns the net channels to subscribe,
/// to unsubscribe, and the acknowledgements to send once that is done.
pub(super) fn apply(
    keys: &Keys,
    desired: &mut HashSet<String>,
    batch: Vec<SubCommand>,
) -> (Vec<String>, Vec<String>, Vec<oneshot::Sender<()>>) {
    let mut before: HashMap<String, bool> = HashMap::new();
    let mut acks = Vec::new();
    for cmd in batch {
        match cmd {
            SubCommand::Subscribe { interests, done } => {
                for ch in interests.iter().map(|i| keys.interest_channel(i)) {
                    before
                        .entry(ch.clone())
                        .or_insert_with(|| desired.contains(&ch));
                    desired.insert(ch);
                }
                acks.extend(done);
            }
            SubCommand::Unsubscribe { interests } => {
                for ch in interests.iter().map(|i| keys.interest_channel(i)) {
                    before
                        .entry(ch.clone())
                        .or_insert_with(|| desired.contains(&ch));
                    desired.remove(&ch);
                }
            }
        }
    }
    let mut subs = Vec::new();
    let mut unsubs = Vec::new();
    for (ch, was) in before {
        match (was, desired.contains(&ch)) {
            (false, true) => subs.push(ch),
            (true, false) => unsubs.push(ch),
            _ => {}
        }
    }
    (subs, unsubs, acks)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::delivery::Interest;

    fn keys() -> Keys {
        Keys::new("p", "n")
    }
    fn sub(topic: &str) -> SubCommand {
        SubCommand::Subscribe {
            interests: vec![Interest::Topic(topic.into())],
            done: None,
        }
    }
    fn unsub(topic: &str) -> SubCommand {
        SubCommand::Unsubscribe {
            interests: vec![Interest::Topic(topic.into())],
        }
    }

    #[test]
    fn batches_net_out_in_order() {
        let mut desired = HashSet::new();
        let (s, u, _) = apply(&keys(), &mut desired, vec![sub("a"), unsub("a"), sub("b")]);
        assert_eq!(s, vec!["p:topic:{b}".to_string()]);
        assert!(u.is_empty());
        // Leave then rejoin within one batch: stays subscribed, nothing sent.
        let (s, u, _) = apply(&keys(), &mut desired, vec![unsub("b"), sub("b")]);
        assert!(s.is_empty() && u.is_empty());
        assert!(desired.contains("p:topic:{b}"));
        let (s, u, _) = apply(&keys(), &mut desired, vec![unsub("b")]);
        assert!(s.is_empty());
        assert_eq!(u, vec!["p:topic:{b}".to_string()]);
        assert!(desired.is_empty());
    }

    #[test]
    fn acks_are_collected_even_without_channels() {
        let mut desired = HashSet::new();
        let (tx, _rx) = oneshot::channel();
        let (_, _, acks) = apply(
            &keys(),
            &mut desired,
            vec![SubCommand::Subscribe {
                interests: vec![],
                done: Some(tx),
            }],
        );
        assert_eq!(acks.len(), 1);
    }
}
