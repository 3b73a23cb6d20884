//! Standalone presence: the same expiring records as Redis keeps, held in this process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{NodeStats, PresenceSession, Stats};
use crate::delivery::SessionInfo;

struct Record {
    session: PresenceSession,
    expires: Instant,
}

/// In-memory presence with the same TTL semantics as the Redis engine.
#[derive(Clone)]
pub(crate) struct MemoryPresence {
    node: String,
    ttl: Duration,
    users: Arc<Mutex<HashMap<String, HashMap<String, Record>>>>,
}

impl MemoryPresence {
    pub(crate) fn new(node: &str, ttl: Duration) -> Self {
        MemoryPresence {
            node: node.to_string(),
            ttl,
            users: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, Record>>> {
        // The map stays consistent between statements, so a poisoned lock is still usable.
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, s: &SessionInfo, now: Instant) -> Record {
        Record {
            session: PresenceSession {
                session: s.id.to_string(),
                node: self.node.clone(),
                connected_at: s.connected_at,
            },
            expires: now + self.ttl,
        }
    }

    pub(crate) fn add(&self, s: &SessionInfo) {
        let rec = self.record(s, Instant::now());
        self.lock()
            .entry(s.user.to_string())
            .or_default()
            .insert(rec.session.session.clone(), rec);
    }

    pub(crate) fn remove(&self, s: &SessionInfo) {
        let mut users = self.lock();
        if let Some(sessions) = users.get_mut(&*s.user) {
            sessions.remove(&s.id.to_string());
            if sessions.is_empty() {
                users.remove(&*s.user);
            }
        }
    }

    /// Refreshes the given sessions and forgets every expired one.
    pub(crate) fn heartbeat(&self, sessions: &[SessionInfo]) {
        let now = Instant::now();
        let mut users = self.lock();
        for s in sessions {
            let rec = self.record(s, now);
            users
                .entry(s.user.to_string())
                .or_default()
                .insert(rec.session.session.clone(), rec);
        }
        users.retain(|_, sessions| {
            sessions.retain(|_, r| r.expires > now);
            !sessions.is_empty()
        });
    }

    pub(crate) fn user(&self, user: &str) -> Vec<PresenceSession> {
        let now = Instant::now();
        let users = self.lock();
        let mut out: Vec<PresenceSession> = users
            .get(user)
            .map(|s| {
                s.values()
                    .filter(|r| r.expires > now)
                    .map(|r| r.session.clone())
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|s| s.connected_at);
        out
    }

    pub(crate) fn stats(&self) -> Stats {
        let now = Instant::now();
        let users = self.lock();
        let mut connections = 0u64;
        let mut online = 0u64;
        for sessions in users.values() {
            let live = sessions.values().filter(|r| r.expires > now).count() as u64;
            connections += live;
            online += (live > 0) as u64;
        }
        Stats {
            connections,
            users: online,
            nodes: vec![NodeStats {
                node: self.node.clone(),
                connections,
                users: online,
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(user: &str) -> SessionInfo {
        SessionInfo {
            id: uuid::Uuid::new_v4(),
            user: user.into(),
            topics: Arc::from(Vec::new()),
            connected_at: 1,
        }
    }

    #[test]
    fn sessions_expire_without_remove() {
        let p = MemoryPresence::new("n", Duration::from_millis(30));
        let a = info("u");
        p.add(&a);
        assert_eq!(p.user("u").len(), 1);
        assert_eq!(p.stats().connections, 1);
        std::thread::sleep(Duration::from_millis(60));
        assert!(p.user("u").is_empty());
        assert_eq!(p.stats().users, 0);
        p.heartbeat(&[]);
        assert!(p.lock().is_empty());
    }

    #[test]
    fn remove_forgets_at_once_and_heartbeat_refreshes() {
        let p = MemoryPresence::new("n", Duration::from_secs(60));
        let a = info("u");
        let b = info("u");
        p.add(&a);
        p.heartbeat(&[a.clone(), b.clone()]);
        assert_eq!(p.user("u").len(), 2);
        p.remove(&a);
        p.remove(&b);
        assert!(p.user("u").is_empty());
        assert!(p.lock().is_empty());
    }
}
