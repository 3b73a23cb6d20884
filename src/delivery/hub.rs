//! The local registry of live sessions: who is connected, which users and topics they hold,
//! and the [`Client`] handle of each. The hub does no I/O and knows nothing of Redis; it
//! names recipients and emits ordered subscription commands in its own terms (a user, a
//! topic) for the broker to carry out.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::wheel::{Wheel, WheelKey, WheelShape};
use crate::protocol::CloseReason;
use crate::transport::Client;

/// Something a node must receive publications for while it holds sessions that want it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Interest {
    /// Notifications for one user.
    User(Arc<str>),
    /// Notifications for one topic.
    Topic(Arc<str>),
}

/// A subscription change, in the order the hub decided it. The broker applies them in this
/// order, which is what makes "subscribe on first session, unsubscribe on last" race-free.
#[derive(Debug)]
pub(crate) enum SubCommand {
    /// Subscribe to `interests` (possibly none) and answer `done` once everything asked
    /// for so far is confirmed, or at once while the broker is disconnected.
    Subscribe {
        interests: Vec<Interest>,
        done: Option<oneshot::Sender<()>>,
    },
    Unsubscribe {
        interests: Vec<Interest>,
    },
}

/// What the node knows about one session; also what presence stores.
#[derive(Debug, Clone)]
pub(crate) struct SessionInfo {
    pub(crate) id: Uuid,
    pub(crate) user: Arc<str>,
    pub(crate) topics: Arc<[Arc<str>]>,
    /// Unix milliseconds.
    pub(crate) connected_at: u64,
}

struct Entry {
    info: SessionInfo,
    client: Arc<Client>,
    /// Its place in the sweeper's wheel (what removes it from there in O(1)).
    wheel_key: WheelKey,
}

struct Inner {
    sessions: HashMap<Uuid, Entry>,
    users: HashMap<Arc<str>, Vec<Uuid>>,
    topics: HashMap<Arc<str>, HashSet<Uuid>>,
    /// Which sweep tick visits (and pings) each session: placed on register, removed on
    /// unregister, under the same lock as the maps.
    wheel: Wheel<Arc<Client>>,
}

/// What registering a session changed.
#[derive(Debug)]
pub(crate) struct Registered {
    /// Resolves once the session's channels are subscribed (or the broker is offline).
    pub(crate) subscribed: oneshot::Receiver<()>,
    /// The node held no other session of this user.
    pub(crate) first_of_user: bool,
}

/// What unregistering a session changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Removed {
    /// The user has no other session on this node.
    pub(crate) last_of_user: bool,
}

/// Counts for stats and the node heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) connections: usize,
    pub(crate) users: usize,
}

/// The registry. Cheap reads (deliveries) take a read lock; joins and leaves a write lock.
pub(crate) struct Hub {
    inner: RwLock<Inner>,
    subs: mpsc::UnboundedSender<SubCommand>,
}

impl Hub {
    /// `subs` receives subscription changes; the queue is unbounded but holds at most one
    /// command per join or leave in flight, so it is bounded by the connection limit.
    /// `wheel` is how the sweeper's visits are spread (see [`Hub::sweep_tick`]).
    pub(crate) fn new(subs: mpsc::UnboundedSender<SubCommand>, wheel: WheelShape) -> Self {
        Hub {
            inner: RwLock::new(Inner {
                sessions: HashMap::new(),
                users: HashMap::new(),
                topics: HashMap::new(),
                wheel: Wheel::new(wheel),
            }),
            subs,
        }
    }

    /// The shape of the sweeper's wheel: how often it ticks.
    pub(crate) fn wheel_shape(&self) -> WheelShape {
        self.read().wheel.shape()
    }

    /// Appends the sessions sweep tick `tick` visits to `out`, each with whether a ping is
    /// due: about 1/slots of the sessions, each session once per rotation and pinged once
    /// per ping interval, however they connected.
    pub(crate) fn sweep_tick(&self, tick: u64, out: &mut Vec<(Arc<Client>, bool)>) {
        self.read().wheel.visit(tick, out);
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than stopping delivery would, so poisoning is ignored.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a session, unless its user already has `max_per_user` sessions here (`None`).
    /// The returned receiver resolves once the broker has confirmed every subscription this
    /// session needs (its user channel and topics). The cap is checked under the same lock
    /// that adds the session, so concurrent connects of one user cannot overshoot it.
    pub(crate) fn register(
        &self,
        info: SessionInfo,
        client: Arc<Client>,
        max_per_user: usize,
    ) -> Option<Registered> {
        let (done_tx, done_rx) = oneshot::channel();
        let mut inner = self.write();
        let mut interests = Vec::new();
        if inner.users.get(&info.user).map_or(0, Vec::len) >= max_per_user {
            return None;
        }
        let user_sessions = inner.users.entry(info.user.clone()).or_default();
        let first_of_user = user_sessions.is_empty();
        if first_of_user {
            interests.push(Interest::User(info.user.clone()));
        }
        user_sessions.push(info.id);
        for topic in info.topics.iter() {
            let members = inner.topics.entry(topic.clone()).or_default();
            if members.is_empty() {
                interests.push(Interest::Topic(topic.clone()));
            }
            members.insert(info.id);
        }
        let wheel_key = inner.wheel.insert(client.clone());
        inner.sessions.insert(
            info.id,
            Entry {
                info,
                client,
                wheel_key,
            },
        );
        // Sent under the lock so the broker sees joins and leaves in the order decided here.
        // A send error means the broker is gone (node shutting down); the receiver then
        // resolves with an error and the session proceeds without waiting.
        let _ = self.subs.send(SubCommand::Subscribe {
            interests,
            done: Some(done_tx),
        });
        Some(Registered {
            subscribed: done_rx,
            first_of_user,
        })
    }

    /// How many sessions `user` has on this node.
    pub(crate) fn user_session_count(&self, user: &str) -> usize {
        self.read().users.get(user).map_or(0, Vec::len)
    }

    /// Removes a session; returns `None` if it was not registered.
    pub(crate) fn unregister(&self, id: Uuid) -> Option<Removed> {
        let mut inner = self.write();
        let entry = inner.sessions.remove(&id)?;
        let in_wheel = inner.wheel.remove(entry.wheel_key);
        debug_assert!(in_wheel.is_some_and(|c| Arc::ptr_eq(&c, &entry.client)));
        let mut interests = Vec::new();
        let mut last_of_user = false;
        if let Some(list) = inner.users.get_mut(&entry.info.user) {
            list.retain(|s| *s != id);
            if list.is_empty() {
                inner.users.remove(&entry.info.user);
                interests.push(Interest::User(entry.info.user.clone()));
                last_of_user = true;
            }
        }
        for topic in entry.info.topics.iter() {
            if let Some(members) = inner.topics.get_mut(topic) {
                members.remove(&id);
                if members.is_empty() {
                    inner.topics.remove(topic);
                    interests.push(Interest::Topic(topic.clone()));
                }
            }
        }
        if !interests.is_empty() {
            let _ = self.subs.send(SubCommand::Unsubscribe { interests });
        }
        Some(Removed { last_of_user })
    }

    /// Appends the controls of every session of `user` to `out` (the fan-out writes to
    /// them after the lock is released: the hub does no I/O).
    pub(crate) fn user_sessions(&self, user: &str, out: &mut Vec<Arc<Client>>) {
        self.user_sessions_except(user, None, out);
    }

    /// Like [`user_sessions`](Self::user_sessions), leaving out the session `except`.
    pub(crate) fn user_sessions_except(
        &self,
        user: &str,
        except: Option<Uuid>,
        out: &mut Vec<Arc<Client>>,
    ) {
        let inner = self.read();
        if let Some(ids) = inner.users.get(user) {
            out.extend(
                ids.iter()
                    .filter(|id| Some(**id) != except)
                    .filter_map(|id| inner.sessions.get(id))
                    .map(|e| e.client.clone()),
            );
        }
    }

    /// Every live session with its user, for a catch-up.
    pub(crate) fn all_sessions_with_users(&self, out: &mut Vec<(Arc<Client>, Arc<str>)>) {
        let inner = self.read();
        out.reserve(inner.sessions.len());
        out.extend(
            inner
                .sessions
                .values()
                .map(|e| (e.client.clone(), e.info.user.clone())),
        );
    }

    pub(crate) fn topic_sessions(&self, topic: &str, out: &mut Vec<Arc<Client>>) {
        let inner = self.read();
        if let Some(ids) = inner.topics.get(topic) {
            out.extend(
                ids.iter()
                    .filter_map(|id| inner.sessions.get(id))
                    .map(|e| e.client.clone()),
            );
        }
    }

    pub(crate) fn all_sessions(&self, out: &mut Vec<Arc<Client>>) {
        let inner = self.read();
        out.reserve(inner.sessions.len());
        out.extend(inner.sessions.values().map(|e| e.client.clone()));
    }

    /// Closes every session of `user` with `reason`; returns how many were told.
    pub(crate) fn close_user(&self, user: &str, reason: CloseReason) -> usize {
        let inner = self.read();
        let mut n = 0;
        if let Some(ids) = inner.users.get(user) {
            for id in ids {
                if let Some(e) = inner.sessions.get(id) {
                    e.client.close(reason);
                    n += 1;
                }
            }
        }
        n
    }

    /// Every live session, for heartbeats and re-assertion after a Redis restart.
    pub(crate) fn snapshot(&self) -> Vec<SessionInfo> {
        self.read()
            .sessions
            .values()
            .map(|e| e.info.clone())
            .collect()
    }

    pub(crate) fn counts(&self) -> Counts {
        let inner = self.read();
        Counts {
            connections: inner.sessions.len(),
            users: inner.users.len(),
        }
    }

    /// Number of topics with at least one local session.
    #[cfg(test)]
    pub(crate) fn topic_count(&self) -> usize {
        self.read().topics.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> (Hub, mpsc::UnboundedReceiver<SubCommand>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Hub::new(tx, WheelShape::default()), rx)
    }

    fn info(user: &str, topics: &[&str]) -> SessionInfo {
        SessionInfo {
            id: Uuid::new_v4(),
            user: user.into(),
            topics: topics.iter().map(|t| Arc::<str>::from(*t)).collect(),
            connected_at: 0,
        }
    }

    fn interests_of(cmd: SubCommand) -> (bool, Vec<Interest>) {
        match cmd {
            SubCommand::Subscribe { interests, .. } => (true, interests),
            SubCommand::Unsubscribe { interests } => (false, interests),
        }
    }

    #[test]
    fn subscribes_on_first_session_and_unsubscribes_on_last() {
        let (hub, mut rx) = hub();
        let a = info("u1", &["t"]);
        let b = info("u1", &["t"]);
        let _ = hub.register(a.clone(), Default::default(), usize::MAX);
        let _ = hub.register(b.clone(), Default::default(), usize::MAX);
        let (sub, ch) = interests_of(rx.try_recv().unwrap());
        assert!(sub);
        assert_eq!(
            ch,
            vec![Interest::User("u1".into()), Interest::Topic("t".into())]
        );
        let (sub, ch) = interests_of(rx.try_recv().unwrap());
        assert!(sub && ch.is_empty());
        assert_eq!(
            hub.unregister(a.id),
            Some(Removed {
                last_of_user: false
            })
        );
        assert!(rx.try_recv().is_err());
        assert_eq!(hub.unregister(b.id), Some(Removed { last_of_user: true }));
        let (sub, ch) = interests_of(rx.try_recv().unwrap());
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
    fn recipients_are_the_members_of_the_target() {
        let (hub, _rx) = hub();
        let a = Arc::new(Client::default());
        let b = Arc::new(Client::default());
        let b2 = Arc::new(Client::default());
        let _ = hub.register(info("a", &["news"]), a.clone(), usize::MAX);
        let _ = hub.register(info("b", &[]), b.clone(), usize::MAX);
        let _ = hub.register(info("b", &["news"]), b2.clone(), usize::MAX);
        let mut got = Vec::new();
        hub.topic_sessions("news", &mut got);
        assert_eq!(got.len(), 2);
        assert!(got.iter().any(|c| Arc::ptr_eq(c, &a)) && got.iter().any(|c| Arc::ptr_eq(c, &b2)));
        got.clear();
        hub.user_sessions("b", &mut got);
        assert_eq!(got.len(), 2);
        assert!(got.iter().any(|c| Arc::ptr_eq(c, &b)) && got.iter().any(|c| Arc::ptr_eq(c, &b2)));
        got.clear();
        hub.user_sessions("nobody", &mut got);
        hub.topic_sessions("nothing", &mut got);
        assert!(got.is_empty());
        hub.all_sessions(&mut got);
        assert_eq!(got.len(), 3);
        assert_eq!(hub.close_user("a", CloseReason::Kicked), 1);
        assert_eq!(a.reason(), Some(CloseReason::Kicked));
        assert!(!b.is_closed());
    }

    #[test]
    fn the_sweeper_visits_registered_sessions_only_once_per_rotation() {
        let shape = WheelShape::new(&crate::transport::LivenessSettings {
            ping_interval: std::time::Duration::from_secs(25),
            idle_timeout: std::time::Duration::from_secs(60),
            write_timeout: std::time::Duration::from_secs(10),
            token_grace: std::time::Duration::from_secs(10),
        });
        let (tx, _rx) = mpsc::unbounded_channel();
        let hub = Hub::new(tx, shape);
        let infos: Vec<SessionInfo> = (0..120).map(|i| info(&format!("u{i}"), &[])).collect();
        let clients: Vec<Arc<Client>> = (0..120).map(|_| Arc::new(Client::default())).collect();
        for (i, c) in infos.iter().zip(&clients) {
            assert!(hub.register(i.clone(), c.clone(), usize::MAX).is_some());
        }
        for i in infos.iter().step_by(2) {
            assert!(hub.unregister(i.id).is_some());
        }
        let mut seen = vec![0u32; 120];
        let mut out = Vec::new();
        for t in 0..u64::from(shape.slots()) {
            hub.sweep_tick(t, &mut out);
            assert!(out.len() <= 120usize.div_ceil(shape.slots() as usize));
            for (c, _) in out.drain(..) {
                let i = clients.iter().position(|x| Arc::ptr_eq(x, &c)).unwrap();
                seen[i] += 1;
            }
        }
        for (i, n) in seen.iter().enumerate() {
            assert_eq!(*n, u32::from(i % 2 == 1), "session {i}");
        }
    }
}
