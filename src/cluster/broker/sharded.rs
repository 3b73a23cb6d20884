//! The subscriber under Redis Cluster: every herald channel is a sharded channel
//! (SSUBSCRIBE), held on one redis-rs cluster connection whose RESP3 pushes carry what
//! arrives; a canary per shard proves each shard's subscription; one classic pattern
//! subscription notices producers that still use plain PUBLISH.
//!
//! Why sharded channels for broadcast and control too: a classic PUBLISH in a cluster is
//! copied over the cluster bus to every node of every shard, which is the cost sharding is
//! here to remove; a sharded channel that every herald node subscribes to costs its one
//! shard a copy per herald node, as on a single Redis. So all herald traffic uses one verb
//! pair, and the shard that owns `<p>:broadcast` carries every broadcast.
//!
//! Failover: redis-rs tracks the subscriptions and, when a shard's master changes (it sees
//! the connection drop or a MOVED, and asks for the slot map again), subscribes them on the
//! new owner of their slots. This loop does not trust that blindly: a lost connection
//! (redis-rs's `Disconnection` push) or a canary that does not come back from some shard
//! makes the node not ready and parks every session's live deliveries; once every shard has
//! returned a fresh canary, it subscribes the whole channel set again (idempotent, and it
//! confirms each channel on its current owner), has every session caught up from its inbox
//! and becomes ready. While a shard is silent, the loop subscribes the canaries again now and
//! then: a command on the lost master's slots is what makes redis-rs ask for the slot map
//! again (and then move its subscriptions). Only a shard silent for [`REBUILD_AFTER`] makes
//! it rebuild the connection from the seed nodes.
//!
//! Resharding: when a slot's new owner is announced, the old owner drops the sharded
//! subscriptions of the slot's channels (an SUNSUBSCRIBE push, which redis-rs also forgets).
//! The loop subscribes each wanted channel again (redis-rs routes it to the new owner) and,
//! because what was published in between reached nobody, has the sessions of a moved user
//! channel caught up from their inbox, parked first as after a reconnect (only they: the
//! other channels carry nothing durable).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{PushKind, Value};
use tokio::sync::mpsc;
use tokio::time::{interval, timeout, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::redis::{apply, settle, take_batch, RedisBroker, SubscriberSettings};
use crate::cluster::connect::ClusterTarget;
use crate::cluster::keys::{slot_of, Channel, Keys};
use crate::delivery::SubCommand;
use crate::health::Health;
use crate::metrics as m;

/// How long connecting to the cluster (and learning its slot map) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one SSUBSCRIBE/SUNSUBSCRIBE round trip may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Sharded subscribe commands in flight at once (one per slot: a command may not span slots).
const SUBSCRIBE_CONCURRENCY: usize = 32;
/// How long asking a node for the slot map may take; the loop waits for it.
const TOPOLOGY_TIMEOUT: Duration = Duration::from_millis(800);
/// A shard silent this long, although redis-rs keeps recovering it, makes the loop rebuild
/// the whole connection. Longer than a failover (node timeout plus election, a few seconds
/// with the tests' 2 s node timeout).
const REBUILD_AFTER: Duration = Duration::from_secs(10);
/// While a shard is in doubt, a canary round unanswered this long is replaced by a new one.
const RESEND_AFTER_MS: u64 = 1000;
/// Bounds of the wait between two attempts to connect.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// At most one warning about plain PUBLISH per this interval (each one is counted).
const UNSHARDED_WARN_EVERY: Duration = Duration::from_secs(10);

/// Runs the subscription under Redis Cluster until `shutdown`.
pub(super) async fn run(
    broker: &RedisBroker,
    target: &ClusterTarget,
    mut cmds: mpsc::UnboundedReceiver<SubCommand>,
    s: SubscriberSettings,
    shutdown: CancellationToken,
) {
    let keys = s.router.keys().clone();
    let health = s.router.health().clone();
    // Subscribed for the node's whole life: broadcast and control (shard canaries are added
    // per connection, from the slot map).
    let mut desired: HashSet<String> = [keys.broadcast_channel(), keys.control_channel()]
        .into_iter()
        .collect();
    let mut backoff = BACKOFF_MIN;
    let mut canary_seq = 0u64;
    let mut unsharded = UnshardedWarning::default();
    loop {
        let (tx, mut pushes) = mpsc::unbounded_channel();
        let connected = match target.client(Some(tx)) {
            Ok(client) => tokio::select! {
                _ = shutdown.cancelled() => return,
                r = timeout(CONNECT_TIMEOUT, client.get_async_connection()) => match r {
                    Ok(Ok(conn)) => Ok(conn),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".to_string()),
                },
            },
            Err(e) => Err(e.to_string()),
        };
        let mut conn = match connected {
            Ok(conn) => conn,
            Err(error) => {
                tracing::warn!(error, "cluster pub/sub connect failed");
                metrics::counter!(m::REDIS_ERRORS, "op" => "pubsub_connect").increment(1);
                if !super::redis::wait_offline(&mut cmds, &keys, &mut desired, backoff, &shutdown)
                    .await
                {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };

        // Fold in what the hub asked for meanwhile, learn the shards, subscribe everything.
        let mut pending_acks = Vec::new();
        while let Ok(cmd) = cmds.try_recv() {
            let (_, _, acks) = apply(&keys, &mut desired, vec![cmd]);
            pending_acks.extend(acks);
        }
        let mut canaries = match shard_tags(&mut conn).await {
            Ok(tags) => tags,
            Err(error) => {
                tracing::warn!(error, "cannot read the cluster's slot map");
                Vec::new()
            }
        };
        let mut ok = !canaries.is_empty();
        if ok {
            health.set_shard_canaries(&canaries);
            let mut all: Vec<String> = desired.iter().cloned().collect();
            all.extend(canaries.iter().map(|t| keys.shard_canary_channel(t)));
            ok = subscribe(&conn, all, Verb::Subscribe).await
                && matches!(
                    timeout(
                        SUBSCRIBE_TIMEOUT,
                        conn.psubscribe(keys.all_channels_pattern())
                    )
                    .await,
                    Ok(Ok(()))
                );
        }
        for a in pending_acks {
            let _ = a.send(());
        }
        if !ok {
            tracing::warn!("cluster subscribe failed; reconnecting");
            metrics::counter!(m::REDIS_ERRORS, "op" => "subscribe").increment(1);
            if !super::redis::wait_offline(&mut cmds, &keys, &mut desired, backoff, &shutdown).await
            {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            continue;
        }
        backoff = BACKOFF_MIN;
        let held = s.router.hold_all_for_catch_up();
        s.subscribed.send_modify(|g| *g = g.wrapping_add(1));
        health.canary_reset();
        health.set_pubsub(true);
        metrics::counter!(m::PUBSUB_RECONNECTS).increment(1);
        tracing::info!(
            channels = desired.len(),
            shards = canaries.len(),
            sessions = held,
            "cluster pub/sub subscribed"
        );
        s.on_reconnect.notify_one();

        // `Some` while the node is not ready because a shard's subscription is in doubt.
        let mut down_since: Option<Instant> = None;
        let mut probe = interval(s.probe_interval);
        probe.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let reason = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    health.set_pubsub(false);
                    return;
                }
                push = pushes.recv() => {
                    let Some(push) = push else { break "push channel closed" };
                    match push.kind {
                        PushKind::SMessage => {
                            let Some((channel, payload)) = channel_and_payload(&push.data) else {
                                continue;
                            };
                            match keys.parse_shard_canary(channel) {
                                Some(tag) => health.shard_canary_received(tag, payload),
                                None => {
                                    s.router.route(channel, payload).await;
                                }
                            }
                        }
                        PushKind::PMessage => {
                            if let Some((channel, _)) = push.data.get(1..).and_then(channel_and_payload) {
                                unsharded.saw(&keys, channel);
                            }
                        }
                        PushKind::Disconnection if down_since.is_none() => {
                            tracing::warn!("a connection to a cluster node was lost; holding deliveries until every shard answers");
                            go_down(&s, &health);
                            down_since = Some(Instant::now());
                            canary_seq += 1;
                            send_canaries(broker, &keys, &health, &canaries, canary_seq);
                        }
                        PushKind::SUnsubscribe => {
                            // Redis drops a sharded subscription by itself when the slot moves
                            // away from the node (resharding): subscribe it again, on the
                            // slot's new owner, if it is still wanted.
                            let Some((channel, _)) = channel_and_payload(&push.data) else {
                                continue;
                            };
                            let canary = keys.parse_shard_canary(channel).is_some_and(|t| canaries.iter().any(|c| c == t));
                            if !canary && !desired.contains(channel) {
                                continue;
                            }
                            tracing::info!(channel, "a sharded subscription was dropped by the cluster; subscribing again");
                            metrics::counter!(m::PUBSUB_SLOT_MOVES).increment(1);
                            // What was published on the channel between the drop and the new
                            // subscription reached nobody here (the producer's SPUBLISH, or
                            // herald_notify's, ran on the new owner with no subscriber yet).
                            // Durable messages are in the user's inbox: park that user's
                            // sessions before the new subscription can deliver anything, and
                            // catch them up once it is confirmed, as after a reconnect. Only
                            // the channel's own users: a reshard moves thousands of slots, and
                            // parking everyone per moved channel would replay every session
                            // over and over. Topic, broadcast, control and canary channels
                            // carry nothing durable, so nothing of theirs is parked.
                            let held = s.router.hold_channel_for_catch_up(channel);
                            if !subscribe(&conn, vec![channel.to_string()], Verb::Subscribe).await {
                                break "resubscribe failed";
                            }
                            if held > 0 {
                                s.subscribed.send_modify(|g| *g = g.wrapping_add(1));
                            }
                        }
                        _ => {}
                    }
                }
                cmd = cmds.recv() => {
                    let Some(cmd) = cmd else {
                        health.set_pubsub(false);
                        return;
                    };
                    let (subs, unsubs, acks) = take_batch(&keys, &mut desired, cmd, &mut cmds);
                    let mut ok = true;
                    if !unsubs.is_empty() {
                        ok &= subscribe(&conn, unsubs, Verb::Unsubscribe).await;
                    }
                    if ok && !subs.is_empty() {
                        ok &= subscribe(&conn, subs, Verb::Subscribe).await;
                    }
                    if !settle(acks, ok) {
                        break "subscribe failed";
                    }
                }
                tick = probe.tick() => {
                    if tick.elapsed() > s.probe_interval / 2 {
                        tracing::warn!(late_ms = tick.elapsed().as_millis() as u64, "process was stalled; re-checking the subscription");
                        health.canary_reset();
                        s.on_reconnect.notify_one();
                        continue;
                    }
                    // The shards may have changed (a new master, resharding): follow them.
                    if let Ok(tags) = shard_tags(&mut conn).await {
                        if tags != canaries {
                            let old: HashSet<&String> = canaries.iter().collect();
                            let new: HashSet<&String> = tags.iter().collect();
                            let added: Vec<String> = new.difference(&old).map(|t| keys.shard_canary_channel(t)).collect();
                            let gone: Vec<String> = old.difference(&new).map(|t| keys.shard_canary_channel(t)).collect();
                            tracing::info!(shards = tags.len(), "the cluster's shards changed");
                            if (!added.is_empty() && !subscribe(&conn, added, Verb::Subscribe).await)
                                || (!gone.is_empty() && !subscribe(&conn, gone, Verb::Unsubscribe).await)
                            {
                                break "canary resubscribe failed";
                            }
                            health.set_shard_canaries(&tags);
                            canaries = tags;
                        }
                    }
                    match down_since {
                        Some(since) if health.canary_answered() => {
                            // Every shard answers again: confirm the whole set on the
                            // current owners, then catch every session up and be ready.
                            let mut all: Vec<String> = desired.iter().cloned().collect();
                            all.extend(canaries.iter().map(|t| keys.shard_canary_channel(t)));
                            if !subscribe(&conn, all, Verb::Subscribe).await {
                                break "resubscribe failed";
                            }
                            down_since = None;
                            s.subscribed.send_modify(|g| *g = g.wrapping_add(1));
                            health.set_pubsub(true);
                            metrics::counter!(m::PUBSUB_RECONNECTS).increment(1);
                            tracing::info!(down_ms = since.elapsed().as_millis() as u64, "every shard answers again; catching sessions up");
                            s.on_reconnect.notify_one();
                        }
                        Some(since) => {
                            if since.elapsed() > REBUILD_AFTER {
                                break "a shard stayed silent";
                            }
                            // Ask again once a round is a second old: the publish to a shard
                            // without a master fails, and only a later one can come back (a
                            // round still in flight is not replaced, or a shard slower than
                            // the probe interval would never count as answered).
                            if health.canary_overdue(RESEND_AFTER_MS) {
                                canary_seq += 1;
                                send_canaries(broker, &keys, &health, &canaries, canary_seq);
                                // Subscribing the canaries again (idempotent) is a command
                                // on the silent shard's slots: while its master is gone it
                                // fails, which makes redis-rs ask for the slot map again, and
                                // with the new map it moves every tracked subscription to the
                                // promoted replica. From a task, so reading goes on.
                                let conn = conn.clone();
                                let channels: Vec<String> = canaries.iter().map(|t| keys.shard_canary_channel(t)).collect();
                                tokio::spawn(async move {
                                    subscribe(&conn, channels, Verb::Subscribe).await;
                                });
                            }
                        }
                        None if health.canary_overdue(s.probe_timeout.as_millis() as u64) => {
                            metrics::counter!(m::CANARY_TIMEOUTS).increment(1);
                            tracing::warn!(shards = ?health.silent_shards(), "the canary did not come back from every shard; holding deliveries");
                            go_down(&s, &health);
                            down_since = Some(Instant::now());
                            canary_seq += 1;
                            send_canaries(broker, &keys, &health, &canaries, canary_seq);
                        }
                        None if health.canary_answered() => {
                            canary_seq += 1;
                            send_canaries(broker, &keys, &health, &canaries, canary_seq);
                        }
                        None => {}
                    }
                }
            }
        };
        health.set_pubsub(false);
        tracing::warn!(reason, "cluster pub/sub connection lost; reconnecting");
        drop(conn);
        if !super::redis::wait_offline(&mut cmds, &keys, &mut desired, backoff, &shutdown).await {
            return;
        }
    }
}

/// Not ready, and every session's live deliveries parked until the catch-up that follows
/// recovery: what the subscription missed meanwhile is read from the inboxes then, before
/// anything newer is let through.
fn go_down(s: &SubscriberSettings, health: &Health) {
    health.set_pubsub(false);
    s.router.hold_all_for_catch_up();
}

/// Publishes canary `seq` on every shard's canary channel, from a task of its own so a slow
/// shard never stalls reading.
fn send_canaries(broker: &RedisBroker, keys: &Keys, health: &Health, tags: &[String], seq: u64) {
    health.canary_sending(seq);
    let channels: Vec<String> = tags.iter().map(|t| keys.shard_canary_channel(t)).collect();
    let broker = broker.clone();
    tokio::spawn(async move {
        let payload = seq.to_string();
        let sends = channels
            .iter()
            .map(|ch| broker.publish_on(ch, payload.as_bytes()));
        for r in futures_util::future::join_all(sends).await {
            if let Err(e) = r {
                tracing::debug!(error = %e, "canary publish failed");
                metrics::counter!(m::REDIS_ERRORS, "op" => "canary").increment(1);
            }
        }
    });
}

#[derive(Clone, Copy)]
enum Verb {
    Subscribe,
    Unsubscribe,
}

/// SSUBSCRIBEs (or SUNSUBSCRIBEs) `channels`, one command per slot (a sharded command may
/// not span slots), a few at a time. True when every command was confirmed.
async fn subscribe(conn: &ClusterConnection, channels: Vec<String>, verb: Verb) -> bool {
    let mut by_slot: HashMap<u16, Vec<String>> = HashMap::new();
    for ch in channels {
        by_slot.entry(slot_of(&ch)).or_default().push(ch);
    }
    let results: Vec<bool> = futures_util::stream::iter(by_slot.into_values())
        .map(|group| {
            let mut conn = conn.clone();
            async move {
                let call = async {
                    match verb {
                        Verb::Subscribe => conn.ssubscribe(&group).await,
                        Verb::Unsubscribe => conn.sunsubscribe(&group).await,
                    }
                };
                matches!(timeout(SUBSCRIBE_TIMEOUT, call).await, Ok(Ok(())))
            }
        })
        .buffer_unordered(SUBSCRIBE_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().all(|ok| ok)
}

/// The channel name and payload at the front of a message push's data.
fn channel_and_payload(data: &[Value]) -> Option<(&str, &[u8])> {
    let channel = match data.first()? {
        Value::BulkString(b) => std::str::from_utf8(b).ok()?,
        Value::SimpleString(s) => s.as_str(),
        _ => return None,
    };
    let payload: &[u8] = match data.get(1) {
        Some(Value::BulkString(b)) => b,
        Some(Value::SimpleString(s)) => s.as_bytes(),
        _ => &[],
    };
    Some((channel, payload))
}

/// One canary tag per shard: for each master, the smallest number whose slot (as the hash
/// tag of `<p>:node:<id>:canary:{<n>}`) is one of the master's. Derived from the slot
/// ranges, not from the master's identity, so a failover that hands the same slots to a
/// promoted replica keeps the tag (and the subscription redis-rs moves over).
async fn shard_tags(conn: &mut ClusterConnection) -> Result<Vec<String>, String> {
    let slots = timeout(
        TOPOLOGY_TIMEOUT,
        conn.route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        ),
    )
    .await
    .map_err(|_| "timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let ranges = master_ranges(&slots).ok_or("unreadable CLUSTER SLOTS reply")?;
    Ok(tags_for(&ranges))
}

/// CLUSTER SLOTS as each master's slot ranges, keyed by the master's address (the shard).
fn master_ranges(reply: &Value) -> Option<BTreeMap<String, Vec<(u16, u16)>>> {
    let Value::Array(entries) = reply else {
        return None;
    };
    let mut out: BTreeMap<String, Vec<(u16, u16)>> = BTreeMap::new();
    for entry in entries {
        let Value::Array(fields) = entry else {
            return None;
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            return None;
        };
        let host = match master.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => return None,
        };
        let Some(Value::Int(port)) = master.get(1) else {
            return None;
        };
        let (start, end) = (u16::try_from(*start).ok()?, u16::try_from(*end).ok()?);
        out.entry(format!("{host}:{port}"))
            .or_default()
            .push((start, end));
    }
    Some(out)
}

/// The canary tag of each shard (see [`shard_tags`]), sorted.
fn tags_for(ranges: &BTreeMap<String, Vec<(u16, u16)>>) -> Vec<String> {
    let mut tags: Vec<String> = ranges
        .values()
        .filter_map(|owned| {
            (0u32..1_000_000).map(|n| n.to_string()).find(|n| {
                let slot = slot_of(n);
                owned.iter().any(|&(a, b)| (a..=b).contains(&slot))
            })
        })
        .collect();
    tags.sort();
    tags
}

/// Counts plain PUBLISH on herald channels (not delivered: docs/redis.md), with a warning at
/// most every [`UNSHARDED_WARN_EVERY`].
#[derive(Default)]
struct UnshardedWarning {
    last: Option<Instant>,
    since_last: u64,
}

impl UnshardedWarning {
    fn saw(&mut self, keys: &Keys, channel: &str) {
        match keys.parse_channel(channel) {
            Some(Channel::User(_) | Channel::Topic(_) | Channel::Broadcast | Channel::Control) => {}
            // Presence events, canaries and foreign names are not publications for clients.
            _ => return,
        }
        metrics::counter!(m::MESSAGES_DROPPED, "reason" => "unsharded_publish").increment(1);
        self.since_last += 1;
        if self
            .last
            .is_none_or(|t| t.elapsed() >= UNSHARDED_WARN_EVERY)
        {
            tracing::warn!(
                channel,
                count = self.since_last,
                "dropped messages sent with plain PUBLISH: under Redis Cluster producers must \
                 use SPUBLISH (or FCALL herald_notify), see docs/redis.md"
            );
            self.last = Some(Instant::now());
            self.since_last = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn every_shard_gets_a_tag_in_its_own_slots() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7000), bulk("id1")]),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7001), bulk("id2")]),
            ]),
            Value::Array(vec![
                Value::Int(10923),
                Value::Int(16383),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(7002), bulk("id3")]),
            ]),
        ]);
        let ranges = master_ranges(&reply).unwrap_or_default();
        assert_eq!(ranges.len(), 3);
        let tags = tags_for(&ranges);
        assert_eq!(tags.len(), 3);
        for (tag, owned) in tags_sorted_by_shard(&ranges, &tags) {
            let slot = slot_of(&tag);
            assert!(owned.iter().any(|&(a, b)| (a..=b).contains(&slot)));
        }
        assert!(master_ranges(&Value::Int(1)).is_none());
    }

    fn tags_sorted_by_shard(
        ranges: &BTreeMap<String, Vec<(u16, u16)>>,
        tags: &[String],
    ) -> Vec<(String, Vec<(u16, u16)>)> {
        ranges
            .values()
            .map(|owned| {
                let tag = tags
                    .iter()
                    .find(|t| {
                        let slot = slot_of(t);
                        owned.iter().any(|&(a, b)| (a..=b).contains(&slot))
                    })
                    .cloned()
                    .unwrap_or_default();
                (tag, owned.clone())
            })
            .collect()
    }

    #[test]
    fn message_pushes_are_read() {
        let data = vec![bulk("p:user:1"), bulk("hi")];
        assert_eq!(
            channel_and_payload(&data),
            Some(("p:user:1", b"hi".as_slice()))
        );
        assert_eq!(channel_and_payload(&[]), None);
        assert_eq!(channel_and_payload(&[Value::Int(1)]), None);
    }
}
