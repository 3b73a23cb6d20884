//! The standalone inbox: the same caps (length and age), per-entry expiry, collapse and
//! idempotency keys, withdrawn entries, replay, gap detection and clamped cursor as the
//! Redis library, held in this process. Durable messages and inbox events reach this node's
//! sessions through the memory broker.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{InboxPolicy, NotifyOptions};
use crate::clock::unix_ms;
use crate::cluster::broker::MemoryBroker;
use crate::delivery::{Durable, InboxEvent, Target};
use crate::protocol::{InboxEntry, StreamId};
use crate::transport::replay::{Acked, Opening, Page};

use super::redis::UNREAD_CAP;

struct Stored {
    id: StreamId,
    data: Vec<u8>,
    /// Unix ms after which replay and reads skip it.
    expires: Option<u64>,
    /// Retracted, or replaced by a collapse key.
    gone: bool,
}

impl Stored {
    fn deliverable(&self, now: u64) -> bool {
        !self.gone && self.expires.is_none_or(|x| x > now)
    }
}

#[derive(Default)]
struct UserInbox {
    entries: VecDeque<Stored>,
    /// The newest id the caps removed: a replay from before it is incomplete.
    max_trimmed: Option<StreamId>,
    cursor: Option<StreamId>,
    /// Collapse key → the id that last used it.
    collapse: HashMap<String, StreamId>,
    /// Idempotency key → (the id it produced, Unix ms until which it answers).
    idem: HashMap<String, (StreamId, u64)>,
}

/// Standalone inbox with the same behaviour as the Redis one.
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

    fn lock(&self) -> MutexGuard<'_, HashMap<String, UserInbox>> {
        // Every update leaves the maps consistent, so a poisoned lock still guards valid data.
        self.users.lock().unwrap_or_else(|e| e.into_inner())
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

    fn retention_ms(&self) -> u64 {
        self.policy.retention.as_millis() as u64
    }

    fn trim(&self, inbox: &mut UserInbox, now: u64) {
        let min_ms = now.saturating_sub(self.retention_ms());
        while inbox.entries.len() as u64 > self.policy.max_len
            || inbox.entries.front().is_some_and(|e| e.id.ms < min_ms)
        {
            if let Some(e) = inbox.entries.pop_front() {
                inbox.max_trimmed = inbox.max_trimmed.max(Some(e.id));
            }
        }
        inbox.idem.retain(|_, (_, until)| *until > now);
    }

    pub(crate) fn notify(&self, user: &str, payload: &[u8], options: &NotifyOptions) -> StreamId {
        let now = unix_ms();
        let mut users = self.lock();
        let inbox = users.entry(user.to_string()).or_default();
        self.trim(inbox, now);
        if let Some(k) = &options.idempotency_key {
            if let Some((id, _)) = inbox.idem.get(k) {
                return *id;
            }
        }
        let mut replaces = None;
        if let Some(k) = &options.collapse_key {
            if let Some(prev) = inbox.collapse.get(k).copied() {
                let unread = inbox.cursor.is_none_or(|c| prev > c);
                if let Some(e) = inbox.entries.iter_mut().find(|e| e.id == prev) {
                    if unread && !e.gone {
                        e.gone = true;
                        replaces = Some(prev);
                    }
                }
            }
        }
        let id = self.next_id();
        inbox.entries.push_back(Stored {
            id,
            data: payload.to_vec(),
            expires: options.ttl_secs.map(|t| now + t * 1000),
            gone: false,
        });
        self.trim(inbox, now);
        if let Some(k) = &options.collapse_key {
            inbox.collapse.insert(k.clone(), id);
        }
        if let Some(k) = &options.idempotency_key {
            let until = now + self.policy.idempotency_window.as_millis() as u64;
            inbox.idem.insert(k.clone(), (id, until));
        }
        drop(users);
        let durable = Durable { id, replaces };
        self.broker
            .deliver(Target::User(user), Some(durable), payload);
        id
    }

    fn page_of(inbox: &UserInbox, after: Option<StreamId>, count: usize, now: u64) -> Page {
        let scanned = inbox
            .entries
            .iter()
            .filter(|e| after.is_none_or(|a| e.id > a))
            .take(count);
        let mut entries = Vec::new();
        let mut last = None;
        let mut n = 0;
        for e in scanned {
            n += 1;
            last = Some(e.id);
            if e.deliverable(now) {
                entries.push(InboxEntry {
                    id: e.id,
                    data: e.data.clone(),
                });
            }
        }
        Page {
            entries,
            next: if n == count { last } else { None },
        }
    }

    fn trimmed_after(&self, inbox: Option<&UserInbox>, since: StreamId, now: u64) -> bool {
        match inbox {
            Some(i) if !i.entries.is_empty() || i.max_trimmed.is_some() => {
                i.max_trimmed.is_some_and(|t| t > since)
            }
            _ => since.ms.saturating_add(self.retention_ms()) < now,
        }
    }

    pub(crate) fn open(
        &self,
        user: &str,
        after: Option<StreamId>,
        after_cursor: bool,
        count_unread: bool,
        count: usize,
    ) -> Opening {
        let now = unix_ms();
        let mut users = self.lock();
        if let Some(inbox) = users.get_mut(user) {
            self.trim(inbox, now);
        }
        let inbox = users.get(user);
        let cursor = inbox.and_then(|i| i.cursor);
        let start = if after_cursor {
            after.max(cursor)
        } else {
            after
        };
        let trimmed = start.is_some_and(|s| self.trimmed_after(inbox, s, now));
        let unread = count_unread.then(|| {
            inbox.map_or(0, |i| {
                i.entries
                    .iter()
                    .filter(|e| cursor.is_none_or(|c| e.id > c))
                    .take(UNREAD_CAP)
                    .filter(|e| e.deliverable(now))
                    .count() as u64
            })
        });
        let page = inbox.map_or_else(Page::default, |i| Self::page_of(i, start, count, now));
        Opening {
            start,
            trimmed,
            unread,
            page,
        }
    }

    pub(crate) fn page(&self, user: &str, after: Option<StreamId>, count: usize) -> Page {
        let now = unix_ms();
        let users = self.lock();
        users
            .get(user)
            .map_or_else(Page::default, |i| Self::page_of(i, after, count, now))
    }

    pub(crate) fn ack(&self, user: &str, id: StreamId, session: Option<&str>) -> Acked {
        let mut users = self.lock();
        let Some(inbox) = users.get_mut(user) else {
            return Acked {
                moved: false,
                cursor: None,
            };
        };
        let Some(newest) = inbox.entries.back().map(|e| e.id) else {
            return Acked {
                moved: false,
                cursor: inbox.cursor,
            };
        };
        let target = id.min(newest);
        if inbox.cursor.is_some_and(|c| c >= target) {
            return Acked {
                moved: false,
                cursor: inbox.cursor,
            };
        }
        inbox.cursor = Some(target);
        drop(users);
        let except = session.and_then(|s| s.parse().ok());
        self.broker
            .inbox_event(user, InboxEvent::Read(target), except);
        Acked {
            moved: true,
            cursor: Some(target),
        }
    }

    pub(crate) fn retract(&self, user: &str, id: StreamId) -> bool {
        let mut users = self.lock();
        let Some(e) = users
            .get_mut(user)
            .and_then(|i| i.entries.iter_mut().find(|e| e.id == id && !e.gone))
        else {
            return false;
        };
        e.gone = true;
        drop(users);
        self.broker.inbox_event(user, InboxEvent::Retract(id), None);
        true
    }

    /// The user's read cursor (tests).
    #[cfg(test)]
    fn cursor(&self, user: &str) -> Option<StreamId> {
        self.lock().get(user).and_then(|i| i.cursor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn inbox(max_len: u64) -> MemoryInbox {
        MemoryInbox::new(
            InboxPolicy {
                max_len,
                retention: Duration::from_secs(60),
                max_bytes: 1024,
                idempotency_window: Duration::from_secs(60),
            },
            MemoryBroker::new(),
        )
    }

    fn plain() -> NotifyOptions {
        NotifyOptions::default()
    }

    #[test]
    fn memory_inbox_caps_replays_and_acks() {
        let m = inbox(3);
        let ids: Vec<StreamId> = (0..5)
            .map(|i| m.notify("u", format!("{i}").as_bytes(), &plain()))
            .collect();
        let all = m.open("u", None, false, true, 10);
        assert_eq!(all.page.entries.len(), 3);
        assert_eq!(all.page.entries[0].id, ids[2]);
        assert_eq!(all.unread, Some(3));
        assert!(m.open("u", Some(ids[0]), false, false, 1).trimmed);
        assert!(!m.open("u", Some(ids[1]), false, false, 1).trimmed);
        assert_eq!(m.page("u", Some(ids[3]), 10).entries.len(), 1);
        assert!(m.ack("u", ids[3], None).moved);
        assert!(!m.ack("u", ids[2], None).moved);
        assert_eq!(m.cursor("u"), Some(ids[3]));
        // An ack beyond the newest entry moves the cursor only to it.
        let far = StreamId {
            ms: u64::MAX,
            seq: u64::MAX,
        };
        assert_eq!(
            m.ack("u", far, None),
            Acked {
                moved: true,
                cursor: Some(ids[4])
            }
        );
        assert_eq!(m.open("u", None, true, true, 10).unread, Some(0));
    }

    #[test]
    fn idempotency_collapse_expiry_and_retract() {
        let m = inbox(100);
        let idem = NotifyOptions {
            idempotency_key: Some("k".into()),
            ..plain()
        };
        let a = m.notify("u", b"a", &idem);
        assert_eq!(m.notify("u", b"again", &idem), a, "same key, same id");
        let c = NotifyOptions {
            collapse_key: Some("comments".into()),
            ..plain()
        };
        let c1 = m.notify("u", b"1 comment", &c);
        let c2 = m.notify("u", b"2 comments", &c);
        let short = NotifyOptions {
            ttl_secs: Some(1),
            ..plain()
        };
        m.notify("u", b"soon gone", &short);
        {
            // Expire it without sleeping: its deadline moves into the past.
            let mut users = m.lock();
            if let Some(e) = users
                .get_mut("u")
                .and_then(|i| i.entries.iter_mut().find(|e| e.expires.is_some()))
            {
                e.expires = Some(1);
            }
        }
        let ids: Vec<StreamId> = m
            .open("u", None, true, true, 10)
            .page
            .entries
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(
            ids,
            vec![a, c2],
            "collapsed and expired entries are not replayed"
        );
        assert_ne!(c1, c2);
        assert!(m.retract("u", a));
        assert!(!m.retract("u", a), "already withdrawn");
        assert_eq!(m.open("u", None, true, true, 10).unread, Some(1));
    }
}
