//! Readiness state shared by the broker, presence heartbeat, drain and `/readyz`, plus the
//! pub/sub canary bookkeeping that catches a subscription which is connected but silent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::clock::mono_ms;

/// Flags that make up readiness. Standalone nodes have no Redis and are always
/// Redis-ready.
#[derive(Debug)]
pub(crate) struct Health {
    clustered: bool,
    redis_ok: AtomicBool,
    pubsub_ok: AtomicBool,
    draining: AtomicBool,
    canary_sent: AtomicU64,
    /// [`mono_ms`] when the last canary was published.
    canary_sent_at_ms: AtomicU64,
    canary_seen: AtomicU64,
    /// Under Redis Cluster, one canary channel per shard (by its tag), each with the last
    /// sequence number seen on it: the canary counts as back only when every shard has
    /// returned it, so a subscription dead on one shard shows. Empty otherwise.
    shard_canaries: Mutex<HashMap<String, u64>>,
}

/// Body of `/readyz`.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub(crate) struct ReadyStatus {
    pub(crate) ready: bool,
    pub(crate) redis: bool,
    pub(crate) pubsub: bool,
    pub(crate) draining: bool,
    /// Every session slot (`--max-connections`) is taken: send new sessions elsewhere.
    pub(crate) full: bool,
}

impl Health {
    pub(crate) fn new(standalone: bool) -> Self {
        Health {
            clustered: !standalone,
            redis_ok: AtomicBool::new(standalone),
            pubsub_ok: AtomicBool::new(standalone),
            draining: AtomicBool::new(false),
            canary_sent: AtomicU64::new(0),
            canary_sent_at_ms: AtomicU64::new(0),
            canary_seen: AtomicU64::new(0),
            shard_canaries: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn clustered(&self) -> bool {
        self.clustered
    }

    pub(crate) fn set_redis(&self, ok: bool) {
        self.redis_ok.store(ok, Ordering::Relaxed);
        self.publish_ready();
    }

    pub(crate) fn set_pubsub(&self, ok: bool) {
        self.pubsub_ok.store(ok, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::PUBSUB_CONNECTED).set(if ok { 1.0 } else { 0.0 });
        self.publish_ready();
    }

    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.publish_ready();
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn status(&self) -> ReadyStatus {
        let redis = self.redis_ok.load(Ordering::Relaxed);
        let pubsub = self.pubsub_ok.load(Ordering::Relaxed);
        let draining = self.draining();
        ReadyStatus {
            ready: redis && pubsub && !draining,
            redis,
            pubsub,
            draining,
            full: false,
        }
    }

    fn publish_ready(&self) {
        let ready = self.status().ready;
        metrics::gauge!(crate::metrics::READY).set(if ready { 1.0 } else { 0.0 });
    }

    /// Records that canary `seq` is being published now.
    pub(crate) fn canary_sending(&self, seq: u64) {
        self.canary_sent_at_ms.store(mono_ms(), Ordering::Relaxed);
        self.canary_sent.store(seq, Ordering::Relaxed);
    }

    /// Called by the broker when a canary comes back over the subscription.
    pub(crate) fn canary_received(&self, payload: &[u8]) {
        let Some(seq) = std::str::from_utf8(payload)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return;
        };
        if seq == self.canary_sent.load(Ordering::Relaxed) {
            let rtt_ms = mono_ms().saturating_sub(self.canary_sent_at_ms.load(Ordering::Relaxed));
            metrics::histogram!(crate::metrics::CANARY_RTT_SECONDS).record(rtt_ms as f64 / 1000.0);
        }
        self.canary_seen.fetch_max(seq, Ordering::Relaxed);
    }

    /// Under Redis Cluster: the shards whose canaries must come back, by tag. A shard new to
    /// the set counts as answered until the next canary is sent.
    pub(crate) fn set_shard_canaries(&self, tags: &[String]) {
        let sent = self.canary_sent.load(Ordering::Relaxed);
        let Ok(mut shards) = self.shard_canaries.lock() else {
            return;
        };
        shards.retain(|tag, _| tags.contains(tag));
        for tag in tags {
            shards.entry(tag.clone()).or_insert(sent);
        }
        let lowest = shards.values().copied().min().unwrap_or(sent);
        drop(shards);
        self.canary_seen.store(lowest, Ordering::Relaxed);
    }

    /// Called by the sharded subscriber when the canary comes back on the shard `tag`: the
    /// canary as a whole is back when the last shard has returned it.
    pub(crate) fn shard_canary_received(&self, tag: &str, payload: &[u8]) {
        let Some(seq) = std::str::from_utf8(payload)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return;
        };
        let lowest = {
            let Ok(mut shards) = self.shard_canaries.lock() else {
                return;
            };
            let Some(seen) = shards.get_mut(tag) else {
                return;
            };
            *seen = (*seen).max(seq);
            shards.values().copied().min().unwrap_or(seq)
        };
        self.canary_received(lowest.to_string().as_bytes());
    }

    /// The shards whose canary has not come back (tags), for the log.
    pub(crate) fn silent_shards(&self) -> Vec<String> {
        let sent = self.canary_sent.load(Ordering::Relaxed);
        self.shard_canaries
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|(_, seen)| **seen < sent)
                    .map(|(tag, _)| tag.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forgets an outstanding canary, for a fresh subscription.
    pub(crate) fn canary_reset(&self) {
        if let Ok(mut shards) = self.shard_canaries.lock() {
            let sent = self.canary_sent.load(Ordering::Relaxed);
            shards
                .values_mut()
                .for_each(|seen| *seen = (*seen).max(sent));
        }
        self.canary_seen
            .store(self.canary_sent.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// True when the last canary sent has not come back for longer than `timeout_ms`.
    pub(crate) fn canary_overdue(&self, timeout_ms: u64) -> bool {
        let sent = self.canary_sent.load(Ordering::Relaxed);
        sent > self.canary_seen.load(Ordering::Relaxed)
            && mono_ms().saturating_sub(self.canary_sent_at_ms.load(Ordering::Relaxed)) > timeout_ms
    }

    /// True when the last canary sent has come back (or none was sent yet).
    pub(crate) fn canary_answered(&self) -> bool {
        self.canary_seen.load(Ordering::Relaxed) >= self.canary_sent.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_is_ready_until_draining() {
        let h = Health::new(true);
        assert!(h.status().ready);
        h.set_draining();
        assert_eq!(
            h.status(),
            ReadyStatus {
                ready: false,
                redis: true,
                pubsub: true,
                draining: true,
                full: false
            }
        );
    }

    #[test]
    fn cluster_needs_redis_and_pubsub() {
        let h = Health::new(false);
        assert!(!h.status().ready);
        h.set_redis(true);
        assert!(!h.status().ready);
        h.set_pubsub(true);
        assert!(h.status().ready);
    }

    #[test]
    fn canary_tracks_round_trips() {
        let h = Health::new(false);
        assert!(h.canary_answered());
        h.canary_sending(1);
        assert!(!h.canary_answered());
        assert!(!h.canary_overdue(10_000));
        // Overdue with a zero timeout as soon as the clock has moved past the send.
        let sent = mono_ms();
        while mono_ms() <= sent {
            std::thread::yield_now();
        }
        assert!(h.canary_overdue(0));
        h.canary_received(b"1");
        assert!(h.canary_answered());
        h.canary_received(b"garbage");
        assert!(h.canary_answered());
    }

    #[test]
    fn a_sharded_canary_is_back_only_when_every_shard_returned_it() {
        let h = Health::new(false);
        h.set_shard_canaries(&["a".into(), "b".into()]);
        assert!(h.canary_answered());
        h.canary_sending(1);
        h.shard_canary_received("a", b"1");
        assert!(!h.canary_answered());
        assert_eq!(h.silent_shards(), vec!["b".to_string()]);
        // Another node's shard tag, or garbage, changes nothing.
        h.shard_canary_received("z", b"1");
        h.shard_canary_received("b", b"x");
        assert!(!h.canary_answered());
        h.shard_canary_received("b", b"1");
        assert!(h.canary_answered());
        assert!(h.silent_shards().is_empty());
        // A shard that appears (a new master) is not condemned for a canary it never got.
        h.set_shard_canaries(&["a".into(), "b".into(), "c".into()]);
        assert!(h.canary_answered());
        h.canary_sending(2);
        h.shard_canary_received("a", b"2");
        h.shard_canary_received("b", b"2");
        assert!(!h.canary_answered());
        h.canary_reset();
        assert!(h.canary_answered());
    }
}
