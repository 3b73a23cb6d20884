//! The local registry of live sessions: who is connected, which users and topics they hold,
//! and the bounded outbox of each. The hub does no I/O and never touches Redis; it only
//! emits ordered subscription commands for the broker to carry out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::{mpsc, oneshot, Notify};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::inbox::StreamId;
use crate::keys::Keys;
use crate::protocol::CloseReason;

/// A subscription change, in the order the hub decided it. The broker applies them in this
/// order, which is what makes "subscribe on first session, unsubscribe on last" race-free.
#[derive(Debug)]
pub enum SubCommand {
    /// Subscribe to `channels` (possibly none) and answer `done` once every channel asked
    /// for so far is confirmed, or at once while the broker is disconnected.
    Subscribe {
        channels: Vec<String>,
        done: Option<oneshot::Sender<()>>,
    },
    Unsubscribe {
        channels: Vec<String>,
    },
}

/// One queued frame: the serialised text, shared by every recipient (cloning bumps a
/// reference count), and the inbox id of a durable message, used to drop live copies of
/// entries a replay already delivered.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub text: Utf8Bytes,
    pub id: Option<StreamId>,
}

impl Outgoing {
    pub fn new(text: String, id: Option<StreamId>) -> Self {
        Outgoing {
            text: text.into(),
            id,
        }
    }

    pub fn len(&self) -> usize {
        self.text.len()
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }
}

/// Cross-task handle of one session: its bounded outbox and the means to end it from
/// outside its loop. The outbox is a plain queue that allocates nothing until the first
/// message (a channel per session would cost ~2 KiB even when idle).
#[derive(Debug, Default)]
pub struct SessionControl {
    kill: CancellationToken,
    reason: OnceLock<CloseReason>,
    queued_bytes: AtomicUsize,
    outbox: Mutex<VecDeque<Outgoing>>,
    ready: Notify,
}

impl SessionControl {
    /// Asks the session to close with `reason`. The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.kill.cancel();
    }

    pub fn reason(&self) -> Option<CloseReason> {
        self.reason.get().copied()
    }

    pub async fn closed(&self) {
        self.kill.cancelled().await
    }

    pub fn is_closed(&self) -> bool {
        self.kill.is_cancelled()
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Outgoing>> {
        // Pushing and popping cannot leave the queue inconsistent, so poisoning is ignored.
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a message unless `capacity` messages are already waiting.
    fn push(&self, msg: Outgoing, capacity: usize) -> bool {
        {
            let mut q = self.queue();
            if q.len() >= capacity {
                return false;
            }
            q.push_back(msg);
        }
        self.ready.notify_one();
        true
    }

    /// Waits until a message may be waiting (spurious wake-ups are possible).
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Takes up to `max` queued messages, oldest first, and releases their byte budget.
    pub fn take(&self, max: usize) -> Vec<Outgoing> {
        let batch: Vec<Outgoing> = {
            let mut q = self.queue();
            let n = q.len().min(max);
            let batch = q.drain(..n).collect();
            if !q.is_empty() {
                // More is waiting: make sure the loop comes back for it.
                self.ready.notify_one();
            }
            if q.is_empty() && q.capacity() > 64 {
                // A burst grew the queue; idle sessions should not keep that memory.
                q.shrink_to(0);
            }
            batch
        };
        let bytes: usize = batch.iter().map(Outgoing::len).sum();
        self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        batch
    }

    /// Drops everything queued (the session is ending) and frees the memory at once.
    pub fn discard(&self) {
        let mut q = self.queue();
        q.clear();
        q.shrink_to(0);
        self.queued_bytes.store(0, Ordering::Relaxed);
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    pub fn queued(&self) -> usize {
        self.queue().len()
    }
}

/// What the node knows about one session; also what presence stores.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: Uuid,
    pub user: Arc<str>,
    pub topics: Arc<[Arc<str>]>,
    /// Unix milliseconds.
    pub connected_at: u64,
}

struct Entry {
    info: SessionInfo,
    ctl: Arc<SessionControl>,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<Uuid, Entry>,
    users: HashMap<Arc<str>, Vec<Uuid>>,
    topics: HashMap<Arc<str>, HashSet<Uuid>>,
}

/// Result of a delivery attempt to the sessions of a target.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Messages queued for a session.
    pub queued: usize,
    /// Sessions whose outbox was full; each was told to close as a slow consumer.
    pub slow: usize,
}

/// What registering a session changed.
#[derive(Debug)]
pub struct Registered {
    /// Resolves once the session's channels are subscribed (or the broker is offline).
    pub subscribed: oneshot::Receiver<()>,
    /// The node held no other session of this user.
    pub first_of_user: bool,
}

/// What unregistering a session changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The user has no other session on this node.
    pub last_of_user: bool,
}

/// Counts for stats and the node heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub connections: usize,
    pub users: usize,
}

/// The registry. Cheap reads (deliveries) take a read lock; joins and leaves a write lock.
pub struct Hub {
    inner: RwLock<Inner>,
    keys: Keys,
    subs: mpsc::UnboundedSender<SubCommand>,
    outbox_messages: usize,
    outbox_bytes: usize,
}

impl Hub {
    /// `subs` receives subscription changes; the queue is unbounded but holds at most one
    /// command per join or leave in flight, so it is bounded by the connection limit.
    /// Each session's outbox holds at most `outbox_messages` messages and `outbox_bytes`
    /// bytes; either limit reached marks the session a slow consumer.
    pub fn new(
        keys: Keys,
        subs: mpsc::UnboundedSender<SubCommand>,
        outbox_messages: usize,
        outbox_bytes: usize,
    ) -> Self {
        Hub {
            inner: RwLock::new(Inner::default()),
            keys,
            subs,
            outbox_messages,
            outbox_bytes,
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than stopping delivery would, so poisoning is ignored.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a session. The returned receiver resolves once the broker has confirmed every
    /// subscription this session needs (its user channel and topics).
    pub fn register(&self, info: SessionInfo, ctl: Arc<SessionControl>) -> Registered {
        let (done_tx, done_rx) = oneshot::channel();
        let mut inner = self.write();
        let mut channels = Vec::new();
        let user_sessions = inner.users.entry(info.user.clone()).or_default();
        let first_of_user = user_sessions.is_empty();
        if first_of_user {
            channels.push(self.keys.user_channel(&info.user));
        }
        user_sessions.push(info.id);
        for topic in info.topics.iter() {
            let members = inner.topics.entry(topic.clone()).or_default();
            if members.is_empty() {
                channels.push(self.keys.topic_channel(topic));
            }
            members.insert(info.id);
        }
        inner.sessions.insert(info.id, Entry { info, ctl });
        // Sent under the lock so the broker sees joins and leaves in the order decided here.
        // A send error means the broker is gone (node shutting down); the receiver then
        // resolves with an error and the session proceeds without waiting.
        let _ = self.subs.send(SubCommand::Subscribe {
            channels,
            done: Some(done_tx),
        });
        Registered {
            subscribed: done_rx,
            first_of_user,
        }
    }

    /// Removes a session; returns `None` if it was not registered.
    pub fn unregister(&self, id: Uuid) -> Option<Removed> {
        let mut inner = self.write();
        let entry = inner.sessions.remove(&id)?;
        let mut channels = Vec::new();
        let mut last_of_user = false;
        if let Some(list) = inner.users.get_mut(&entry.info.user) {
            list.retain(|s| *s != id);
            if list.is_empty() {
                inner.users.remove(&entry.info.user);
                channels.push(self.keys.user_channel(&entry.info.user));
                last_of_user = true;
            }
        }
        for topic in entry.info.topics.iter() {
            if let Some(members) = inner.topics.get_mut(topic) {
                members.remove(&id);
                if members.is_empty() {
                    inner.topics.remove(topic);
                    channels.push(self.keys.topic_channel(topic));
                }
            }
        }
        if !channels.is_empty() {
            let _ = self.subs.send(SubCommand::Unsubscribe { channels });
        }
        Some(Removed { last_of_user })
    }

    fn offer(&self, entry: &Entry, msg: &Outgoing, len: usize, d: &mut Delivery) {
        if entry.ctl.is_closed() {
            return;
        }
        let queued = entry.ctl.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
        if queued > self.outbox_bytes {
            entry.ctl.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            entry.ctl.close(CloseReason::SlowConsumer);
            d.slow += 1;
            return;
        }
        if entry.ctl.push(msg.clone(), self.outbox_messages) {
            d.queued += 1;
        } else {
            entry.ctl.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            entry.ctl.close(CloseReason::SlowConsumer);
            d.slow += 1;
        }
    }

    /// True when at least one local session would receive a message for `user` (or
    /// `topic`): lets the fan-out skip building frames nobody here will read, which matters
    /// when a flood for a just-disconnected user is still in flight.
    pub fn has_user(&self, user: &str) -> bool {
        self.read().users.contains_key(user)
    }

    pub fn has_topic(&self, topic: &str) -> bool {
        self.read().topics.contains_key(topic)
    }

    /// Queues `msg` (cheap to clone: the payload is shared) for every session of `user`.
    pub fn deliver_user(&self, user: &str, msg: &Outgoing, len: usize) -> Delivery {
        let inner = self.read();
        let mut d = Delivery::default();
        if let Some(ids) = inner.users.get(user) {
            for id in ids {
                if let Some(e) = inner.sessions.get(id) {
                    self.offer(e, msg, len, &mut d);
                }
            }
        }
        d
    }

    pub fn deliver_topic(&self, topic: &str, msg: &Outgoing, len: usize) -> Delivery {
        let inner = self.read();
        let mut d = Delivery::default();
        if let Some(ids) = inner.topics.get(topic) {
            for id in ids {
                if let Some(e) = inner.sessions.get(id) {
                    self.offer(e, msg, len, &mut d);
                }
            }
        }
        d
    }

    pub fn deliver_broadcast(&self, msg: &Outgoing, len: usize) -> Delivery {
        let inner = self.read();
        let mut d = Delivery::default();
        for e in inner.sessions.values() {
            self.offer(e, msg, len, &mut d);
        }
        d
    }

    /// Closes every session of `user` with `reason`; returns how many were told.
    pub fn close_user(&self, user: &str, reason: CloseReason) -> usize {
        let inner = self.read();
        let mut n = 0;
        if let Some(ids) = inner.users.get(user) {
            for id in ids {
                if let Some(e) = inner.sessions.get(id) {
                    e.ctl.close(reason);
                    n += 1;
                }
            }
        }
        n
    }

    /// Every live session, for heartbeats and re-assertion after a Redis restart.
    pub fn snapshot(&self) -> Vec<SessionInfo> {
        self.read()
            .sessions
            .values()
            .map(|e| e.info.clone())
            .collect()
    }

    /// Controls of every live session, for draining.
    pub fn controls(&self) -> Vec<Arc<SessionControl>> {
        self.read()
            .sessions
            .values()
            .map(|e| e.ctl.clone())
            .collect()
    }

    /// Channels the node must be subscribed to for its current sessions.
    pub fn channels(&self) -> Vec<String> {
        let inner = self.read();
        inner
            .users
            .keys()
            .map(|u| self.keys.user_channel(u))
            .chain(inner.topics.keys().map(|t| self.keys.topic_channel(t)))
            .collect()
    }

    pub fn counts(&self) -> Counts {
        let inner = self.read();
        Counts {
            connections: inner.sessions.len(),
            users: inner.users.len(),
        }
    }

    /// Number of topics with at least one local session (for tests and metrics).
    pub fn topic_count(&self) -> usize {
        self.read().topics.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> (Hub, mpsc::UnboundedReceiver<SubCommand>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Hub::new(Keys::new("p", "n"), tx, 2, 1024), rx)
    }

    fn info(user: &str, topics: &[&str]) -> SessionInfo {
        SessionInfo {
            id: Uuid::new_v4(),
            user: user.into(),
            topics: topics.iter().map(|t| Arc::<str>::from(*t)).collect(),
            connected_at: 0,
        }
    }

    fn channels_of(cmd: SubCommand) -> (bool, Vec<String>) {
        match cmd {
            SubCommand::Subscribe { channels, .. } => (true, channels),
            SubCommand::Unsubscribe { channels } => (false, channels),
        }
    }

    #[test]
    fn subscribes_on_first_session_and_unsubscribes_on_last() {
        let (hub, mut rx) = hub();
        let a = info("u1", &["t"]);
        let b = info("u1", &["t"]);
        let _ = hub.register(a.clone(), Default::default());
        let _ = hub.register(b.clone(), Default::default());
        let (sub, ch) = channels_of(rx.try_recv().unwrap()); // safe: test
        assert!(sub);
        assert_eq!(ch, vec!["p:user:u1".to_string(), "p:topic:t".to_string()]);
        let (sub, ch) = channels_of(rx.try_recv().unwrap()); // safe: test
        assert!(sub && ch.is_empty());
        assert_eq!(
            hub.unregister(a.id),
            Some(Removed {
                last_of_user: false
            })
        );
        assert!(rx.try_recv().is_err());
        assert_eq!(hub.unregister(b.id), Some(Removed { last_of_user: true }));
        let (sub, ch) = channels_of(rx.try_recv().unwrap()); // safe: test
        assert!(!sub);
        assert_eq!(ch.len(), 2);
        assert_eq!(
            hub.counts(),
            Counts {
                connections: 0,
                users: 0
            }
        );
        assert_eq!(hub.topic_count(), 0);
        assert_eq!(hub.unregister(b.id), None);
    }

    #[test]
    fn full_outbox_marks_slow_consumer_and_spares_others() {
        let (hub, _rx) = hub();
        let slow_ctl = Arc::new(SessionControl::default());
        let fast_ctl = Arc::new(SessionControl::default());
        let _ = hub.register(info("slow", &[]), slow_ctl.clone());
        let _ = hub.register(info("fast", &[]), fast_ctl.clone());
        let msg = Outgoing::new("x".into(), None);
        let mut total = Delivery::default();
        let mut fast_got = 0;
        for _ in 0..3 {
            let d = hub.deliver_broadcast(&msg, 1);
            total.queued += d.queued;
            total.slow += d.slow;
            // The fast session keeps up; the slow one never reads.
            fast_got += fast_ctl.take(16).len();
        }
        assert_eq!(total.slow, 1);
        assert_eq!(slow_ctl.reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(fast_got, 3);
        assert!(!fast_ctl.is_closed());
        slow_ctl.discard();
        assert_eq!((slow_ctl.queued(), slow_ctl.queued_bytes()), (0, 0));
    }

    #[test]
    fn byte_budget_is_enforced_and_released_on_take() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let hub = Hub::new(Keys::new("p", "n"), tx, 100, 1024);
        let ctl = Arc::new(SessionControl::default());
        let _ = hub.register(info("u", &[]), ctl.clone());
        let msg = Outgoing::new("y".repeat(600), None);
        assert_eq!(hub.deliver_user("u", &msg, 600).queued, 1);
        assert_eq!(ctl.take(10).len(), 1);
        assert_eq!(ctl.queued_bytes(), 0);
        assert_eq!(hub.deliver_user("u", &msg, 600).queued, 1);
        assert_eq!(hub.deliver_user("u", &msg, 600).slow, 1);
        assert!(ctl.is_closed());
        assert_eq!(ctl.queued_bytes(), 600);
    }

    #[test]
    fn take_returns_batches_in_order() {
        let ctl = SessionControl::default();
        for i in 0..5 {
            assert!(ctl.push(Outgoing::new(i.to_string(), None), 10));
        }
        let first: Vec<String> = ctl.take(3).iter().map(|m| m.text.to_string()).collect();
        assert_eq!(first, vec!["0", "1", "2"]);
        assert_eq!(ctl.take(10).len(), 2);
        assert!(ctl.take(10).is_empty());
    }

    #[test]
    fn topic_and_user_delivery_reach_only_members() {
        let (hub, _rx) = hub();
        let a = Arc::new(SessionControl::default());
        let b = Arc::new(SessionControl::default());
        let _ = hub.register(info("a", &["news"]), a.clone());
        let _ = hub.register(info("b", &[]), b.clone());
        let m = Outgoing::new("m".into(), None);
        assert_eq!(hub.deliver_topic("news", &m, 1).queued, 1);
        assert_eq!(hub.deliver_user("b", &m, 1).queued, 1);
        assert_eq!(hub.deliver_user("nobody", &m, 1).queued, 0);
        assert_eq!((a.queued(), b.queued()), (1, 1));
        assert_eq!(hub.close_user("a", CloseReason::Kicked), 1);
    }
}
