//! Turns one published payload into one message frame and offers it to every local
//! recipient the hub names: the frame is serialised once per node, never once per session,
//! and written to each socket without a copy (see `transport::outbox`).
//!
//! The fan-out speaks delivery's own terms: a [`Target`] and an optional inbox id. Reading
//! them out of Redis channel names and durable envelopes is the broker's job.

use std::sync::Arc;

use uuid::Uuid;

use super::hub::Hub;
use crate::metrics as m;
use crate::protocol::{message_frame, CloseReason, ServerFrame, StreamId};
use crate::transport::{Client, Offered, OutboxLimits, Outgoing};

/// Who a published payload is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target<'a> {
    /// Every session of one user.
    User(&'a str),
    /// Sessions that joined the topic.
    Topic(&'a str),
    /// Every session.
    Broadcast,
}

impl Target<'_> {
    /// The `channel` clients see in message frames: `user:42`, `topic:news`, `broadcast`.
    pub(crate) fn label(&self) -> String {
        match self {
            Target::User(u) => format!("user:{u}"),
            Target::Topic(t) => format!("topic:{t}"),
            Target::Broadcast => "broadcast".to_string(),
        }
    }
}

/// What makes a message durable: its inbox id, and the unread entry it replaced (a
/// collapse key's previous message), if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Durable {
    pub(crate) id: StreamId,
    pub(crate) replaces: Option<StreamId>,
}

impl Durable {
    #[cfg(test)]
    pub(crate) fn new(id: StreamId) -> Self {
        Durable { id, replaces: None }
    }
}

/// A change to a user's inbox that their live sessions are told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InboxEvent {
    /// The read cursor moved to this id.
    Read(StreamId),
    /// This entry was withdrawn.
    Retract(StreamId),
}

/// What happened to one payload; returned for tests and callers that count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Offered to this many local sessions (written or queued).
    Delivered { queued: usize },
    /// Above `--max-message-bytes`: dropped whole and counted.
    Oversize,
}

/// Where a payload came from, for the `herald_messages_in_total{source}` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// A Redis subscription.
    Redis,
    /// This process (the standalone engine).
    Local,
}

/// Recipients written by one task when [`Fanout::handle_spread`] splits a delivery.
pub(crate) const SPREAD_CHUNK: usize = 2048;

enum Route {
    Done(Outcome),
    Deliver(Outgoing, Vec<Arc<Client>>),
}

/// Routes payloads to local sessions.
pub(crate) struct Fanout {
    hub: Arc<Hub>,
    max_bytes: usize,
    outbox: OutboxLimits,
    // Per-message counters, resolved once: `counter!` looks the metric up in the registry
    // on every call, which is measurable on the hot path.
    in_redis: metrics::Counter,
    in_local: metrics::Counter,
    out: metrics::Counter,
}

impl Fanout {
    pub(crate) fn new(hub: Arc<Hub>, max_bytes: usize, outbox: OutboxLimits) -> Self {
        Fanout {
            hub,
            max_bytes,
            outbox,
            in_redis: metrics::counter!(m::MESSAGES_IN, "source" => "redis"),
            in_local: metrics::counter!(m::MESSAGES_IN, "source" => "local"),
            out: metrics::counter!(m::MESSAGES_OUT),
        }
    }

    /// Delivers one payload for `target` (with its inbox id when durable), writing to every
    /// recipient from the calling task.
    pub(crate) fn handle(
        &self,
        target: Target<'_>,
        durable: Option<Durable>,
        payload: &[u8],
        source: Source,
    ) -> Outcome {
        match self.route(target, durable, payload, source) {
            Route::Done(outcome) => outcome,
            Route::Deliver(msg, recipients) => self.deliver(&msg, &recipients),
        }
    }

    /// Like [`handle`](Self::handle), but a message for more than [`SPREAD_CHUNK`] local
    /// sessions (a broadcast, a big topic) is written by several tasks at once, so a node
    /// with many cores does not deliver it from one thread. Returns once every chunk is
    /// written: the next message starts only then, which keeps each session's order.
    pub(crate) async fn handle_spread(
        self: &Arc<Self>,
        target: Target<'_>,
        durable: Option<Durable>,
        payload: &[u8],
        source: Source,
    ) -> Outcome {
        let (msg, mut recipients) = match self.route(target, durable, payload, source) {
            Route::Done(outcome) => return outcome,
            Route::Deliver(msg, recipients) => (msg, recipients),
        };
        let mut chunks = Vec::new();
        while recipients.len() > SPREAD_CHUNK {
            let tail = recipients.split_off(recipients.len() - SPREAD_CHUNK);
            let (fanout, msg) = (self.clone(), msg.clone());
            chunks.push(tokio::spawn(async move { fanout.deliver(&msg, &tail) }));
        }
        let mut queued = match self.deliver(&msg, &recipients) {
            Outcome::Delivered { queued } => queued,
            Outcome::Oversize => 0,
        };
        for chunk in chunks {
            // A chunk cannot panic short of a bug; its deliveries are then simply not counted.
            if let Ok(Outcome::Delivered { queued: q }) = chunk.await {
                queued += q;
            }
        }
        Outcome::Delivered { queued }
    }

    /// Tells the user's local sessions (but `except`, the one it came from) about a change
    /// to their inbox. Returns how many were told.
    pub(crate) fn inbox_event(&self, user: &str, event: InboxEvent, except: Option<Uuid>) -> usize {
        let mut recipients = Vec::new();
        self.hub.user_sessions_except(user, except, &mut recipients);
        if recipients.is_empty() {
            return 0;
        }
        let frame = match event {
            InboxEvent::Read(id) => ServerFrame::Read {
                id: &id.to_string(),
            }
            .to_text(),
            InboxEvent::Retract(id) => ServerFrame::Retract {
                id: &id.to_string(),
            }
            .to_text(),
        };
        match self.deliver(&Outgoing::text(frame, None), &recipients) {
            Outcome::Delivered { queued } => queued,
            Outcome::Oversize => 0,
        }
    }

    /// Parks live deliveries to every local session until each is caught up from its last
    /// durable message: called when the subscription was rebuilt, before any publication
    /// of the new one is delivered, so nothing published meanwhile overtakes what the
    /// catch-up sends. Returns how many sessions wait for a catch-up.
    pub(crate) fn hold_all_for_catch_up(&self) -> usize {
        let mut clients = Vec::new();
        self.hub.all_sessions(&mut clients);
        for client in &clients {
            client.hold_for_catch_up();
        }
        clients.len()
    }

    /// Parks live deliveries to the local sessions of `user` until each is caught up, as
    /// [`hold_all_for_catch_up`](Self::hold_all_for_catch_up) does for everyone: called when
    /// only that user's channel lost its subscription (its slot moved to another master).
    /// Returns how many sessions wait for a catch-up.
    pub(crate) fn hold_user_for_catch_up(&self, user: &str) -> usize {
        let mut clients = Vec::new();
        self.hub.user_sessions(user, &mut clients);
        for client in &clients {
            client.hold_for_catch_up();
        }
        clients.len()
    }

    /// Closes every local session of `user` with 4002 (`POST /api/disconnect`); returns how
    /// many were told.
    pub(crate) fn kick(&self, user: &str) -> usize {
        let n = self.hub.close_user(user, CloseReason::Kicked);
        tracing::info!(user, sessions = n, "disconnect requested");
        n
    }

    /// Offers `msg` to each recipient and counts the outcome.
    fn deliver(&self, msg: &Outgoing, recipients: &[Arc<Client>]) -> Outcome {
        let (mut delivered, mut slow) = (0usize, 0usize);
        for client in recipients {
            match client.offer(msg, self.outbox) {
                Offered::Written | Offered::Queued => delivered += 1,
                Offered::Slow => slow += 1,
                Offered::Skipped | Offered::Closed => {}
            }
        }
        self.out.increment(delivered as u64);
        if slow > 0 {
            metrics::counter!(m::MESSAGES_DROPPED, "reason" => "slow_consumer")
                .increment(slow as u64);
        }
        Outcome::Delivered { queued: delivered }
    }

    /// Checks the payload and finds the local recipients: either what to deliver to whom,
    /// or what became of the payload.
    fn route(
        &self,
        target: Target<'_>,
        durable: Option<Durable>,
        payload: &[u8],
        source: Source,
    ) -> Route {
        match source {
            Source::Redis => self.in_redis.increment(1),
            Source::Local => self.in_local.increment(1),
        }
        if payload.len() > self.max_bytes {
            metrics::counter!(m::MESSAGES_DROPPED, "reason" => "oversize").increment(1);
            tracing::warn!(
                target = %target.label(),
                bytes = payload.len(),
                max = self.max_bytes,
                "dropped oversize payload"
            );
            return Route::Done(Outcome::Oversize);
        }
        let mut recipients: Vec<Arc<Client>> = Vec::new();
        match target {
            Target::User(u) => self.hub.user_sessions(u, &mut recipients),
            Target::Topic(t) => self.hub.topic_sessions(t, &mut recipients),
            Target::Broadcast => self.hub.all_sessions(&mut recipients),
        }
        // Nobody here reads it (a flood for a user who just left, say): build nothing.
        if recipients.is_empty() {
            return Route::Done(Outcome::Delivered { queued: 0 });
        }
        let id_text = durable.map(|d| d.id.to_string());
        let replaces = durable.and_then(|d| d.replaces).map(|r| r.to_string());
        let msg = Outgoing::text(
            message_frame(
                &target.label(),
                id_text.as_deref(),
                replaces.as_deref(),
                payload,
            ),
            durable.map(|d| d.id),
        );
        Route::Deliver(msg, recipients)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::hub::SessionInfo;
    use tokio::sync::mpsc;

    fn setup() -> (Arc<Fanout>, Arc<Client>, Arc<Client>) {
        let (f, client) = crate::delivery::testing::fanout_with_one_session(16);
        (f, client.clone(), client)
    }

    #[test]
    fn delivers_user_topic_and_broadcast_frames() {
        let (f, rx, _) = setup();
        assert_eq!(
            f.handle(Target::User("42"), None, b"{\"a\":1}", Source::Redis),
            Outcome::Delivered { queued: 1 }
        );
        assert_eq!(
            f.handle(Target::Topic("t"), None, b"x", Source::Redis),
            Outcome::Delivered { queued: 1 }
        );
        assert_eq!(
            f.handle(Target::Broadcast, None, b"1", Source::Redis),
            Outcome::Delivered { queued: 1 }
        );
        assert_eq!(
            f.handle(Target::User("7"), None, b"1", Source::Redis),
            Outcome::Delivered { queued: 0 }
        );
        let first = rx.take(1).remove(0);
        assert_eq!(
            std::str::from_utf8(&first.payload).unwrap_or_default(),
            r#"{"type":"message","channel":"user:42","data":{"a":1}}"#
        );
        assert_eq!(first.id, None);
    }

    #[test]
    fn durable_messages_carry_their_inbox_id() {
        let (f, rx, _) = setup();
        let id = StreamId { ms: 9, seq: 1 };
        assert_eq!(
            f.handle(
                Target::User("42"),
                Some(Durable::new(id)),
                b"{\"x\":2}",
                Source::Redis
            ),
            Outcome::Delivered { queued: 1 }
        );
        let got = rx.take(1).remove(0);
        assert_eq!(got.id, Some(id));
        assert_eq!(
            std::str::from_utf8(&got.payload).unwrap_or_default(),
            r#"{"type":"message","channel":"user:42","id":"9-1","data":{"x":2}}"#
        );
    }

    #[test]
    fn oversize_payloads_are_dropped() {
        let (f, rx, _) = setup();
        assert_eq!(
            f.handle(Target::User("42"), None, &[b'x'; 17], Source::Redis),
            Outcome::Oversize
        );
        assert_eq!(rx.queued(), 0);
    }

    #[test]
    fn kick_closes_every_session_of_the_user() {
        let (f, _rx, client) = setup();
        assert_eq!(f.kick("nobody"), 0);
        assert!(!client.is_closed());
        assert_eq!(f.kick("42"), 1);
        assert_eq!(client.reason(), Some(CloseReason::Kicked));
    }

    #[test]
    fn a_full_outbox_marks_a_slow_consumer_and_spares_the_others() {
        let (stx, _srx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(stx, crate::delivery::WheelShape::default()));
        let (slow, fast) = (Arc::new(Client::default()), Arc::new(Client::default()));
        for (user, ctl) in [("slow", &slow), ("fast", &fast)] {
            let _ = hub.register(
                SessionInfo {
                    id: Uuid::new_v4(),
                    user: user.into(),
                    topics: Vec::new().into(),
                    connected_at: 0,
                },
                ctl.clone(),
                usize::MAX,
            );
        }
        let limits = OutboxLimits {
            messages: 2,
            bytes: 150,
        };
        let f = Fanout::new(hub, 1024, limits);
        let mut fast_got = 0;
        for i in 0..3 {
            let want = if i < 2 { 2 } else { 1 };
            assert_eq!(
                f.handle(Target::Broadcast, None, b"1", Source::Redis),
                Outcome::Delivered { queued: want }
            );
            // The fast session keeps up; the slow one never reads.
            fast_got += fast.take(16).len();
        }
        assert_eq!(slow.reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(fast_got, 3);
        assert!(!fast.is_closed());
        // The byte budget binds too: two of these frames fit in 150 bytes, a third does not.
        let big = [b'x'; 10];
        assert_eq!(
            f.handle(Target::User("fast"), None, &big, Source::Redis),
            Outcome::Delivered { queued: 1 }
        );
        let frame_len = fast.queued_bytes();
        assert!(
            frame_len > 10 && 2 * frame_len <= 150 && 3 * frame_len > 150,
            "{frame_len}"
        );
        assert_eq!(
            f.handle(Target::User("fast"), None, &big, Source::Redis),
            Outcome::Delivered { queued: 1 }
        );
        assert_eq!(
            f.handle(Target::User("fast"), None, &big, Source::Redis),
            Outcome::Delivered { queued: 0 }
        );
        assert_eq!(fast.reason(), Some(CloseReason::SlowConsumer));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spread_deliveries_reach_everyone_once_and_in_order() {
        let (stx, _srx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(stx, crate::delivery::WheelShape::default()));
        let n = 2 * SPREAD_CHUNK + 5;
        let ctls: Vec<Arc<Client>> = (0..n).map(|_| Arc::new(Client::default())).collect();
        for (i, ctl) in ctls.iter().enumerate() {
            let _ = hub.register(
                SessionInfo {
                    id: Uuid::new_v4(),
                    user: format!("u{i}").into(),
                    topics: Vec::new().into(),
                    connected_at: 0,
                },
                ctl.clone(),
                usize::MAX,
            );
        }
        let limits = OutboxLimits {
            messages: 8,
            bytes: 1 << 20,
        };
        let f = Arc::new(Fanout::new(hub, 1024, limits));
        for seq in 0..3 {
            assert_eq!(
                f.handle_spread(
                    Target::Broadcast,
                    None,
                    seq.to_string().as_bytes(),
                    Source::Redis
                )
                .await,
                Outcome::Delivered { queued: n }
            );
        }
        for ctl in &ctls {
            let got: Vec<String> = ctl
                .take(8)
                .iter()
                .map(|m| String::from_utf8_lossy(&m.payload).to_string())
                .collect();
            assert_eq!(got.len(), 3);
            for (seq, frame) in got.iter().enumerate() {
                assert!(frame.ends_with(&format!("\"data\":{seq}}}")), "{frame}");
            }
        }
    }
}
