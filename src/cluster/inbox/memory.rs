//! The standalone inbox: the same caps (length and age), replay, gap detection and cursor
//! as the Redis one, held in this process; a durable message is delivered to this node's
//! sessions through the memory broker.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use super::InboxPolicy;
use crate::clock::unix_ms;
use crate::cluster::broker::MemoryBroker;
use crate::delivery::Target;
use crate::protocol::{InboxEntry, StreamId};

#[derive(Default)]
struct UserInbox {
    entries: VecDeque<(StreamId, Vec<u8>)>,
    max_deleted: Option<StreamId>,
    cursor: Option<StreamId>,
}

/// Standalone inbox with the same caps (length and age) as the Redis one.
#[derive(Clone)]
pub(crate) struct MemoryInbox {
    policy: InboxPolicy,
    broker: MemoryBroker,
    users: Arc<Mutex<HashMap<String, UserInbox>>>,
    last: Arc<Mutex<StreamId>>,
}

impl MemoryInbox {
    pub(crate) fn new(policy: InboxPolicy, broker: MemoryBroker) -> Self {
        MemoryInbox {
            policy,
            broker,
            users: Arc::default(),
            last: Arc::default(),
        }
    }

    fn next_id(&self) -> StreamId {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let ms = unix_ms();
        *last = if ms > last.ms {
            StreamId { ms, seq: 0 }
        } else {
            StreamId {
                ms: last.ms,
                seq: last.seq + 1,
            }
        };
        *last
    }

    fn trim(&self, inbox: &mut UserInbox, now: u64) {
        let min_ms = now.saturating_sub(self.policy.retention.as_millis() as u64);
        while inbox.entries.len() as u64 > self.policy.max_len
            || inbox.entries.front().is_some_and(|(id, _)| id.ms < min_ms)
        {
            if let Some((id, _)) = inbox.entries.pop_front() {
                inbox.max_deleted = Some(id);
            }
        }
    }

    pub(crate) fn notify(&self, user: &str, payload: &[u8]) -> StreamId {
        let id = self.next_id();
        let now = unix_ms();
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let inbox = users.entry(user.to_string()).or_default();
        inbox.entries.push_back((id, payload.to_vec()));
        self.trim(inbox, now);
        drop(users);
        self.broker.deliver(Target::User(user), Some(id), payload);
        id
    }

    pub(crate) fn read_after(
        &self,
        user: &str,
        after: Option<StreamId>,
        count: usize,
    ) -> Vec<InboxEntry> {
        let now = unix_ms();
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let Some(inbox) = users.get_mut(user) else {
            return Vec::new();
        };
        self.trim(inbox, now);
        inbox
            .entries
            .iter()
            .filter(|(id, _)| after.is_none_or(|a| *id > a))
            .take(count)
            .map(|(id, d)| InboxEntry {
                id: *id,
                data: d.clone(),
            })
            .collect()
    }

    pub(crate) fn trimmed_after(&self, user: &str, since: StreamId) -> bool {
        let now = unix_ms();
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        match users.get_mut(user) {
            Some(inbox) => {
                self.trim(inbox, now);
                // The memory engine knows exactly what it dropped.
                inbox.max_deleted.is_some_and(|d| since < d)
            }
            None => {
                since
                    .ms
                    .saturating_add(self.policy.retention.as_millis() as u64)
                    < now
            }
        }
    }

    pub(crate) fn ack(&self, user: &str, id: StreamId) -> bool {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let inbox = users.entry(user.to_string()).or_default();
        if inbox.cursor.is_some_and(|c| c >= id) {
            return false;
        }
        inbox.cursor = Some(id);
        true
    }

    pub(crate) fn cursor(&self, user: &str) -> Option<StreamId> {
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .and_then(|i| i.cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn memory_inbox_caps_replays_and_acks() {
        let m = MemoryInbox::new(
            InboxPolicy {
                max_len: 3,
                retention: Duration::from_secs(60),
            },
            MemoryBroker::new(),
        );
        let ids: Vec<StreamId> = (0..5)
            .map(|i| m.notify("u", format!("{i}").as_bytes()))
            .collect();
        let all = m.read_after("u", None, 10);
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].id, ids[2]);
        assert!(m.trimmed_after("u", ids[0]));
        assert!(!m.trimmed_after("u", ids[1]));
        assert_eq!(m.read_after("u", Some(ids[3]), 10).len(), 1);
        assert!(m.ack("u", ids[3]));
        assert!(!m.ack("u", ids[2]));
        assert_eq!(m.cursor("u"), Some(ids[3]));
    }
}
