//! The receiving side of the delivery scenarios: per-session sequence tracking (lost,
//! duplicated, out of order), end-to-end latency, and how sessions ended.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::dial::Session;
use crate::hist::Recorder;
use crate::util::mono_ns;
use crate::wire::{classify, pong, Incoming, Protocol};

/// Most holes (missing ranges) remembered per session; beyond it further gaps are still
/// counted as lost but cannot turn into "out of order" when they arrive late.
const MAX_HOLES: usize = 10_000;

/// Sequence numbers seen by one session, from one producer sequence (starting at 1).
#[derive(Debug, Clone, Default)]
pub(crate) struct SeqTracker {
    /// Highest sequence number seen.
    pub(crate) max_seen: u64,
    /// Missing ranges below `max_seen` (inclusive, ascending, disjoint).
    holes: Vec<(u64, u64)>,
    /// Missing numbers that did not fit in `holes`.
    overflow_missing: u64,
    /// Distinct payloads received.
    pub(crate) unique: u64,
    pub(crate) duplicated: u64,
    /// Arrived after a higher sequence number.
    pub(crate) out_of_order: u64,
    /// seq 0 or otherwise unusable.
    pub(crate) invalid: u64,
}

impl SeqTracker {
    pub(crate) fn observe(&mut self, seq: u64) {
        if seq == 0 {
            self.invalid += 1;
            return;
        }
        if seq > self.max_seen {
            if seq > self.max_seen + 1 {
                let hole = (self.max_seen + 1, seq - 1);
                if self.holes.len() < MAX_HOLES {
                    self.holes.push(hole);
                } else {
                    self.overflow_missing += hole.1 - hole.0 + 1;
                }
            }
            self.max_seen = seq;
            self.unique += 1;
            return;
        }
        // Below the maximum: a late arrival filling a hole, or a duplicate.
        let i = self.holes.partition_point(|&(_, end)| end < seq);
        match self.holes.get(i).copied() {
            Some((start, end)) if start <= seq && seq <= end => {
                match (seq == start, seq == end) {
                    (true, true) => {
                        self.holes.remove(i);
                    }
                    (true, false) => self.holes[i].0 = seq + 1,
                    (false, true) => self.holes[i].1 = seq - 1,
                    (false, false) => {
                        self.holes[i].1 = seq - 1;
                        self.holes.insert(i + 1, (seq + 1, end));
                    }
                }
                self.unique += 1;
                self.out_of_order += 1;
            }
            _ => self.duplicated += 1,
        }
    }

    /// Numbers up to `expected_last` never received, ignoring `forgiven` (publishes that
    /// failed at the producer, so never reached the server).
    pub(crate) fn lost(&self, expected_last: u64, forgiven: &[u64]) -> u64 {
        let mut lost = self.overflow_missing
            + self.holes.iter().map(|(a, b)| b - a + 1).sum::<u64>()
            + expected_last.saturating_sub(self.max_seen);
        for &f in forgiven {
            if f > expected_last {
                continue;
            }
            let missing = if f > self.max_seen {
                true
            } else {
                let i = self.holes.partition_point(|&(_, end)| end < f);
                matches!(self.holes.get(i), Some(&(a, b)) if a <= f && f <= b)
            };
            if missing {
                lost = lost.saturating_sub(1);
            }
        }
        lost
    }

    /// Received numbers above what the producer says it sent.
    pub(crate) fn beyond(&self, expected_last: u64) -> u64 {
        self.max_seen.saturating_sub(expected_last)
    }
}

/// What one session saw, handed back when it stops.
#[derive(Debug, Clone, Default)]
pub(crate) struct SessionOutcome {
    pub(crate) index: usize,
    pub(crate) seq: SeqTracker,
    /// How the session ended before it was told to stop: "close 4001", "eof", "error: ..".
    pub(crate) ended: Option<String>,
    pub(crate) foreign: u64,
    pub(crate) gaps: u64,
}

/// Shared by every receiving session of a scenario.
pub(crate) struct RecvShared {
    pub(crate) protocol: Protocol,
    pub(crate) latency: Recorder,
    pub(crate) stop: CancellationToken,
    pub(crate) out: mpsc::UnboundedSender<SessionOutcome>,
    /// Count messages that carry a durable inbox id. Only the durable scenario publishes
    /// such messages; elsewhere they are replays of an earlier run's inbox entries (a user
    /// id reused against the same Redis) and are counted as foreign, not as deliveries.
    pub(crate) accept_durable: bool,
}

impl RecvShared {
    pub(crate) fn new(protocol: Protocol) -> (Arc<Self>, mpsc::UnboundedReceiver<SessionOutcome>) {
        Self::with_durable(protocol, false)
    }

    pub(crate) fn with_durable(
        protocol: Protocol,
        accept_durable: bool,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<SessionOutcome>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(RecvShared {
                protocol,
                latency: Recorder::new(16),
                stop: CancellationToken::new(),
                out: tx,
                accept_durable,
            }),
            rx,
        )
    }
}

fn close_text(m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> String {
    match m {
        Some(Ok(Message::Close(f))) => {
            format!("close {}", f.map(|f| u16::from(f.code)).unwrap_or(1005))
        }
        Some(Err(e)) => {
            let text = e.to_string();
            if text.contains("reset") {
                // The node dropped the connection without a close frame reaching us.
                "reset".into()
            } else {
                format!("error: {}", text.chars().take(60).collect::<String>())
            }
        }
        _ => "eof".into(),
    }
}

/// Reads a session until `stop`, recording every bench payload; answers Engine.IO and
/// Pusher pings (tungstenite answers WebSocket pings itself while reading).
pub(crate) async fn receive(mut session: Session, shared: Arc<RecvShared>) {
    let mut o = SessionOutcome {
        index: session.index,
        ..SessionOutcome::default()
    };
    let shard = session.index;
    // Created once: a fresh `cancelled()` per frame would lock the token and register a
    // waiter every time.
    let stopped = shared.stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let frame = tokio::select! {
            biased;
            _ = &mut stopped => break,
            f = session.ws.next() => f,
        };
        match frame {
            Some(Ok(Message::Text(text))) => match classify(shared.protocol, text.as_str()) {
                Incoming::Data { id: Some(_), .. } if !shared.accept_durable => o.foreign += 1,
                Incoming::Data { seq, ts, .. } => {
                    let now = mono_ns();
                    shared
                        .latency
                        .record_micros(shard, now.saturating_sub(ts) / 1000);
                    o.seq.observe(seq);
                }
                Incoming::Ping => {
                    if session
                        .ws
                        .send(Message::text(pong(shared.protocol)))
                        .await
                        .is_err()
                    {
                        o.ended = Some("error: pong write".into());
                        break;
                    }
                }
                Incoming::Gap => o.gaps += 1,
                Incoming::Foreign => o.foreign += 1,
                Incoming::Other => {}
            },
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                o.ended = Some(close_text(frame));
                break;
            }
            Some(Ok(_)) => {}
        }
    }
    let _ = shared.out.send(o);
    // The socket closes when `session` drops here.
}

/// A consumer that never reads (its socket has a tiny SO_RCVBUF): holds the connection
/// until `stop`, then reads for up to `probe` to learn whether and how the node closed it.
pub(crate) async fn hold_unread(mut session: Session, shared: Arc<RecvShared>, probe: Duration) {
    shared.stop.cancelled().await;
    let mut o = SessionOutcome {
        index: session.index,
        ..SessionOutcome::default()
    };
    let deadline = tokio::time::Instant::now() + probe;
    // Bounded by the deadline: drains what the node had queued, looking for its close.
    loop {
        match tokio::time::timeout_at(deadline, session.ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(Some(Ok(Message::Binary(_) | Message::Frame(_)))) => {}
            Ok(other) => {
                o.ended = Some(close_text(other));
                break;
            }
        }
    }
    let _ = shared.out.send(o);
}

/// Waits for `n` outcomes (bounded by `wait`), indexed by session index.
pub(crate) async fn collect(
    rx: &mut mpsc::UnboundedReceiver<SessionOutcome>,
    n: usize,
    wait: Duration,
) -> BTreeMap<usize, SessionOutcome> {
    let mut out = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + wait;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(o)) => {
                out.insert(o.index, o);
            }
            _ => break,
        }
    }
    out
}

/// Delivery totals over a set of sessions.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Tally {
    pub(crate) sessions: usize,
    pub(crate) delivered: u64,
    pub(crate) expected: u64,
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    pub(crate) out_of_order: u64,
    /// Sequence numbers above what the producer reported sending.
    pub(crate) beyond_expected: u64,
    pub(crate) invalid: u64,
    /// Frames with a message that was not a bench payload.
    pub(crate) foreign: u64,
    pub(crate) gaps: u64,
    /// Sessions that ended before the run did, by how.
    pub(crate) ended_early: BTreeMap<String, usize>,
    /// Sessions that lost at least one message.
    pub(crate) sessions_with_loss: usize,
}

impl Tally {
    pub(crate) fn add(&mut self, o: &SessionOutcome, expected_last: u64, forgiven: &[u64]) {
        let forgiven_n = forgiven.iter().filter(|&&f| f <= expected_last).count() as u64;
        self.sessions += 1;
        self.delivered += o.seq.unique;
        self.expected += expected_last.saturating_sub(forgiven_n);
        let lost = o.seq.lost(expected_last, forgiven);
        self.lost += lost;
        if lost > 0 {
            self.sessions_with_loss += 1;
        }
        self.duplicated += o.seq.duplicated;
        self.out_of_order += o.seq.out_of_order;
        self.beyond_expected += o.seq.beyond(expected_last);
        self.invalid += o.seq.invalid;
        self.foreign += o.foreign;
        self.gaps += o.gaps;
        if let Some(e) = &o.ended {
            *self.ended_early.entry(e.clone()).or_default() += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(seqs: &[u64]) -> SeqTracker {
        let mut t = SeqTracker::default();
        for &s in seqs {
            t.observe(s);
        }
        t
    }

    #[test]
    fn in_order_has_no_loss() {
        let t = track(&[1, 2, 3, 4]);
        assert_eq!((t.unique, t.duplicated, t.out_of_order), (4, 0, 0));
        assert_eq!(t.lost(4, &[]), 0);
        assert_eq!(t.lost(6, &[]), 2, "trailing messages never received");
    }

    #[test]
    fn gaps_late_arrivals_and_duplicates() {
        let t = track(&[1, 4, 2, 2, 7, 5, 4]);
        assert_eq!(t.unique, 5); // 1 4 2 7 5
        assert_eq!(t.out_of_order, 2); // 2, 5
        assert_eq!(t.duplicated, 2); // second 2, second 4
        assert_eq!(t.lost(7, &[]), 2); // 3, 6
        assert_eq!(t.lost(8, &[]), 3);
        // A failed publish of 3 and of 8 is not a loss.
        assert_eq!(t.lost(8, &[3, 8]), 1);
        assert_eq!(t.beyond(6), 1);
    }

    #[test]
    fn hole_splitting_keeps_ranges_ordered() {
        let mut t = track(&[10]);
        for s in [5, 3, 7, 4, 6, 1, 2, 9, 8] {
            t.observe(s);
        }
        assert_eq!(t.unique, 10);
        assert_eq!(t.out_of_order, 9);
        assert_eq!(t.lost(10, &[]), 0);
        t.observe(0);
        assert_eq!(t.invalid, 1);
    }

    #[test]
    fn tally_sums_sessions() {
        let mut tally = Tally::default();
        let o = SessionOutcome {
            index: 0,
            seq: track(&[1, 3]),
            ended: Some("close 4001".into()),
            ..SessionOutcome::default()
        };
        tally.add(&o, 3, &[]);
        tally.add(&o, 4, &[4]);
        assert_eq!(tally.delivered, 4);
        assert_eq!(tally.expected, 6);
        assert_eq!(tally.lost, 2);
        assert_eq!(tally.ended_early["close 4001"], 2);
        assert_eq!(tally.sessions_with_loss, 2);
    }
}
