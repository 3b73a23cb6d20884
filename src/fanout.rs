//! Turns one published payload into one message frame and offers it to every local
//! recipient the hub names: the frame is serialised once per node, never once per session,
//! and written to each socket without a copy (see `control`).

use std::sync::Arc;

use crate::control::{Offered, OutboxLimits, Outgoing, SessionControl};
use crate::hub::Hub;
use crate::inbox::open_envelope;
use crate::keys::{Keys, Target};
use crate::metrics as m;
use crate::protocol::{message_frame, CloseReason};
use serde::Deserialize;

/// Control messages nodes exchange on `<prefix>:ctl`.
#[derive(Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Control {
    /// Close every session of `user` with 4002.
    Disconnect { user: String },
}

/// What happened to one payload; returned for tests and the canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered { queued: usize },
    Oversize,
    UnknownChannel,
    Control,
    BadControl,
    Canary,
}

/// Recipients written by one task when [`Fanout::handle_spread`] splits a delivery.
pub const SPREAD_CHUNK: usize = 2048;

enum Route {
    Done(Outcome),
    Deliver(Outgoing, Vec<Arc<SessionControl>>),
}

/// Routes payloads from the broker to local sessions.
pub struct Fanout {
    hub: Arc<Hub>,
    keys: Keys,
    max_bytes: usize,
    outbox: OutboxLimits,
    canary: Arc<crate::health::Health>,
    // Per-message counters, resolved once: `counter!` looks the metric up in the registry
    // on every call, which is measurable on the hot path.
    in_redis: metrics::Counter,
    in_local: metrics::Counter,
    out: metrics::Counter,
}

impl Fanout {
    pub fn new(
        hub: Arc<Hub>,
        keys: Keys,
        max_bytes: usize,
        outbox: OutboxLimits,
        health: Arc<crate::health::Health>,
    ) -> Self {
        Fanout {
            hub,
            keys,
            max_bytes,
            outbox,
            canary: health,
            in_redis: metrics::counter!(m::MESSAGES_IN, "source" => "redis"),
            in_local: metrics::counter!(m::MESSAGES_IN, "source" => "local"),
            out: metrics::counter!(m::MESSAGES_OUT),
        }
    }

    /// Handles one payload published on `channel`, writing to every recipient from the
    /// calling task.
    pub fn handle(&self, channel: &str, payload: &[u8], source: &'static str) -> Outcome {
        match self.route(channel, payload, source) {
            Route::Done(outcome) => outcome,
            Route::Deliver(msg, recipients) => self.deliver(&msg, &recipients),
        }
    }

    /// Like [`handle`](Self::handle), but a message for more than [`SPREAD_CHUNK`] local
    /// sessions (a broadcast, a big topic) is written by several tasks at once, so a node
    /// with many cores does not deliver it from one thread. Returns once every chunk is
    /// written: the next message starts only then, which keeps each session's order.
    pub async fn handle_spread(
        self: &Arc<Self>,
        channel: &str,
        payload: &[u8],
        source: &'static str,
    ) -> Outcome {
        let (msg, mut recipients) = match self.route(channel, payload, source) {
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
            _ => 0,
        };
        for chunk in chunks {
            // A chunk cannot panic short of a bug; its deliveries are then simply not counted.
            if let Ok(Outcome::Delivered { queued: q }) = chunk.await {
                queued += q;
            }
        }
        Outcome::Delivered { queued }
    }

    /// Offers `msg` to each recipient and counts the outcome.
    fn deliver(&self, msg: &Outgoing, recipients: &[Arc<SessionControl>]) -> Outcome {
        let (mut delivered, mut slow) = (0usize, 0usize);
        for ctl in recipients {
            match ctl.offer(msg, self.outbox) {
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

    /// Parses the channel and payload and finds the local recipients: either what to
    /// deliver to whom, or what became of the payload.
    fn route(&self, channel: &str, payload: &[u8], source: &'static str) -> Route {
        let Some(target) = self.keys.parse_channel(channel) else {
            metrics::counter!(m::MESSAGES_DROPPED, "reason" => "unknown_channel").increment(1);
            return Route::Done(Outcome::UnknownChannel);
        };
        match target {
            Target::Control => return Route::Done(self.control(payload)),
            Target::Canary => {
                self.canary.canary_received(payload);
                return Route::Done(Outcome::Canary);
            }
            _ => {}
        }
        match source {
            "redis" => self.in_redis.increment(1),
            "local" => self.in_local.increment(1),
            other => metrics::counter!(m::MESSAGES_IN, "source" => other).increment(1),
        }
        // Durable messages arrive enveloped with their inbox id (see inbox::envelope).
        let (id, payload) = match target {
            Target::User(_) => match open_envelope(payload) {
                Some((id, inner)) => (Some(id), inner),
                None => (None, payload),
            },
            _ => (None, payload),
        };
        if payload.len() > self.max_bytes {
            metrics::counter!(m::MESSAGES_DROPPED, "reason" => "oversize").increment(1);
            tracing::warn!(
                channel,
                bytes = payload.len(),
                max = self.max_bytes,
                "dropped oversize payload"
            );
            return Route::Done(Outcome::Oversize);
        }
        let mut recipients: Vec<Arc<SessionControl>> = Vec::new();
        match target {
            Target::User(u) => self.hub.user_sessions(u, &mut recipients),
            Target::Topic(t) => self.hub.topic_sessions(t, &mut recipients),
            Target::Broadcast => self.hub.all_sessions(&mut recipients),
            Target::Control | Target::Canary => return Route::Done(Outcome::UnknownChannel),
        }
        // Nobody here reads it (a flood for a user who just left, say): build nothing.
        if recipients.is_empty() {
            return Route::Done(Outcome::Delivered { queued: 0 });
        }
        // The channel label clients see is the channel without the prefix: "user:42".
        let label = &channel[self.keys.prefix().len() + 1..];
        let id_text = id.map(|i| i.to_string());
        let msg = Outgoing::text(message_frame(label, id_text.as_deref(), payload), id);
        Route::Deliver(msg, recipients)
    }

    fn control(&self, payload: &[u8]) -> Outcome {
        match serde_json::from_slice::<Control>(payload) {
            Ok(Control::Disconnect { user }) => {
                let n = self.hub.close_user(&user, CloseReason::Kicked);
                tracing::info!(user, sessions = n, "disconnect requested");
                Outcome::Control
            }
            Err(e) => {
                metrics::counter!(m::MESSAGES_DROPPED, "reason" => "bad_control").increment(1);
                tracing::warn!(error = %e, "ignored malformed control message");
                Outcome::BadControl
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::SessionInfo;
    use tokio::sync::mpsc;

    fn setup() -> (Fanout, Arc<SessionControl>, Arc<SessionControl>) {
        let (stx, _srx) = mpsc::unbounded_channel();
        let keys = Keys::new("p", "n1");
        let hub = Arc::new(Hub::new(keys.clone(), stx));
        let ctl = Arc::new(SessionControl::default());
        let _ = hub.register(
            SessionInfo {
                id: uuid::Uuid::new_v4(),
                user: "42".into(),
                topics: vec![Arc::<str>::from("t")].into(),
                connected_at: 0,
            },
            ctl.clone(),
        );
        let health = Arc::new(crate::health::Health::new(true));
        let limits = OutboxLimits {
            messages: 8,
            bytes: 1 << 20,
        };
        (Fanout::new(hub, keys, 16, limits, health), ctl.clone(), ctl)
    }

    #[test]
    fn delivers_user_topic_and_broadcast_frames() {
        let (f, rx, _) = setup();
        assert_eq!(
            f.handle("p:user:42", b"{\"a\":1}", "redis"),
            Outcome::Delivered { queued: 1 }
        );
        assert_eq!(
            f.handle("p:topic:t", b"x", "redis"),
            Outcome::Delivered { queued: 1 }
        );
        assert_eq!(
            f.handle("p:broadcast", b"1", "redis"),
            Outcome::Delivered { queued: 1 }
        );
        assert_eq!(
            f.handle("p:user:7", b"1", "redis"),
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
    fn enveloped_payloads_carry_their_inbox_id() {
        let (f, rx, _) = setup();
        let id = crate::inbox::StreamId { ms: 9, seq: 1 };
        let raw = crate::inbox::envelope(id, b"{\"x\":2}");
        assert_eq!(
            f.handle("p:user:42", &raw, "redis"),
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
    fn oversize_and_foreign_payloads_are_dropped() {
        let (f, rx, _) = setup();
        assert_eq!(
            f.handle("p:user:42", &[b'x'; 17], "redis"),
            Outcome::Oversize
        );
        assert_eq!(
            f.handle("q:user:42", b"1", "redis"),
            Outcome::UnknownChannel
        );
        assert_eq!(rx.queued(), 0);
    }

    #[test]
    fn control_disconnect_kicks_the_user() {
        let (f, _rx, ctl) = setup();
        assert_eq!(
            f.handle("p:ctl", b"{\"op\":\"nope\"}", "redis"),
            Outcome::BadControl
        );
        assert!(!ctl.is_closed());
        assert_eq!(
            f.handle("p:ctl", br#"{"op":"disconnect","user":"42"}"#, "redis"),
            Outcome::Control
        );
        assert_eq!(ctl.reason(), Some(CloseReason::Kicked));
    }

    #[test]
    fn a_full_outbox_marks_a_slow_consumer_and_spares_the_others() {
        let (stx, _srx) = mpsc::unbounded_channel();
        let keys = Keys::new("p", "n1");
        let hub = Arc::new(Hub::new(keys.clone(), stx));
        let (slow, fast) = (
            Arc::new(SessionControl::default()),
            Arc::new(SessionControl::default()),
        );
        for (user, ctl) in [("slow", &slow), ("fast", &fast)] {
            let _ = hub.register(
                SessionInfo {
                    id: uuid::Uuid::new_v4(),
                    user: user.into(),
                    topics: Vec::new().into(),
                    connected_at: 0,
                },
                ctl.clone(),
            );
        }
        let health = Arc::new(crate::health::Health::new(true));
        let limits = OutboxLimits {
            messages: 2,
            bytes: 150,
        };
        let f = Fanout::new(hub, keys, 1024, limits, health);
        let mut fast_got = 0;
        for i in 0..3 {
            let want = if i < 2 { 2 } else { 1 };
            assert_eq!(
                f.handle("p:broadcast", b"1", "redis"),
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
            f.handle("p:user:fast", &big, "redis"),
            Outcome::Delivered { queued: 1 }
        );
        let frame_len = fast.queued_bytes();
        assert!(
            frame_len > 10 && 2 * frame_len <= 150 && 3 * frame_len > 150,
            "{frame_len}"
        );
        assert_eq!(
            f.handle("p:user:fast", &big, "redis"),
            Outcome::Delivered { queued: 1 }
        );
        assert_eq!(
            f.handle("p:user:fast", &big, "redis"),
            Outcome::Delivered { queued: 0 }
        );
        assert_eq!(fast.reason(), Some(CloseReason::SlowConsumer));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spread_deliveries_reach_everyone_once_and_in_order() {
        let (stx, _srx) = mpsc::unbounded_channel();
        let keys = Keys::new("p", "n1");
        let hub = Arc::new(Hub::new(keys.clone(), stx));
        let n = 2 * SPREAD_CHUNK + 5;
        let ctls: Vec<Arc<SessionControl>> = (0..n)
            .map(|_| Arc::new(SessionControl::default()))
            .collect();
        for (i, ctl) in ctls.iter().enumerate() {
            let _ = hub.register(
                SessionInfo {
                    id: uuid::Uuid::new_v4(),
                    user: format!("u{i}").into(),
                    topics: Vec::new().into(),
                    connected_at: 0,
                },
                ctl.clone(),
            );
        }
        let health = Arc::new(crate::health::Health::new(true));
        let limits = OutboxLimits {
            messages: 8,
            bytes: 1 << 20,
        };
        let f = Arc::new(Fanout::new(hub, keys, 1024, limits, health));
        for seq in 0..3 {
            assert_eq!(
                f.handle_spread("p:broadcast", seq.to_string().as_bytes(), "redis")
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
