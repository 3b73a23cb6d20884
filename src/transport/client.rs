//! The node's handle on one connected client: its outbox, its liveness and its close state.
//! The hub holds one per session; deliveries, the sweeper, draining and the session loop
//! all act on the session through it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::net::TcpStream;

use super::codec::Kind;
use super::liveness::{Liveness, LivenessSettings, Now, Verdict};
use super::outbox::{CatchUp, Outbox, OutboxLimits, Outgoing, Pushed, Released};
use crate::clock::mono_ms;
use crate::protocol::{CloseReason, StreamId};

/// What became of one offered frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offered {
    /// Handed to the kernel in full.
    Written,
    /// Queued (the socket was busy, or the session is not yet live).
    Queued,
    /// A live copy of a durable message the replay already delivered.
    Skipped,
    /// The outbox was full: the session was told to close as a slow consumer.
    Slow,
    /// The session is closing; nothing was sent.
    Closed,
}

/// What an SSE response body gets next.
#[derive(Debug)]
pub(crate) enum Taken {
    Frame(Outgoing),
    Closed(CloseReason),
}

/// Cross-task handle of one session.
#[derive(Debug, Default)]
pub(crate) struct Client {
    outbox: Outbox,
    liveness: Liveness,
    /// The session loop's waker: woken when the session must close or has a backlog.
    waker: AtomicWaker,
    reason: OnceLock<CloseReason>,
    closed: AtomicBool,
}

impl Client {
    /// A client on `sock` whose deliveries are parked until its greeting is over, with a
    /// token that expires at `token_exp` (Unix seconds).
    pub(crate) fn held(sock: Arc<TcpStream>, token_exp: Option<u64>) -> Self {
        Client {
            outbox: Outbox::held(sock),
            liveness: Liveness::new(mono_ms(), token_exp),
            ..Client::default()
        }
    }

    /// An SSE client: its frames are taken by the response body ([`poll_take`]), it sends
    /// nothing upstream (so it is never judged idle: its liveness is the socket's), and its
    /// deliveries are parked until its greeting is over.
    ///
    /// [`poll_take`]: Self::poll_take
    pub(crate) fn pull(token_exp: Option<u64>) -> Self {
        Client {
            outbox: Outbox::held_pull(),
            liveness: Liveness::never_idle(mono_ms(), token_exp),
            ..Client::default()
        }
    }

    /// The response body's next event: a frame, the reason the session ended, or nothing
    /// yet (the body's waker is registered and woken by the next writable frame or close).
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Taken> {
        self.waker.register(cx.waker());
        if let Some(reason) = self.reason() {
            return Poll::Ready(Taken::Closed(reason));
        }
        match self.outbox.take_next() {
            Some(m) => Poll::Ready(Taken::Frame(m)),
            None => Poll::Pending,
        }
    }

    /// The response body is gone (the client left, or the stream ended).
    pub(crate) fn detach(&self) {
        self.close(CloseReason::ConnectionLost);
        self.outbox.detach();
    }

    /// The client sent a fresh token; the session now ends at its expiry.
    pub(crate) fn refreshed(&self, token_exp: Option<u64>) {
        self.liveness.refreshed(token_exp);
    }

    /// Asks the session to close with `reason`. The first reason wins.
    pub(crate) fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.closed.store(true, Ordering::Release);
        self.waker.wake();
        self.outbox.notify_pull();
    }

    /// Resolves once the session is closed (SSE sessions; a WebSocket session's loop learns
    /// it from its waker).
    pub(crate) async fn closed(&self) {
        let Some(notify) = self.outbox.pull_notify() else {
            return;
        };
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn reason(&self) -> Option<CloseReason> {
        if self.closed.load(Ordering::Acquire) {
            self.reason.get().copied()
        } else {
            None
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Registers the session loop's waker.
    pub(crate) fn register(&self, waker: &Waker) {
        self.waker.register(waker);
    }

    /// Records that the client sent something.
    pub(crate) fn heard(&self) {
        self.liveness.heard(mono_ms());
    }

    /// Payload bytes waiting in the outbox (read without its lock).
    pub(crate) fn queued_bytes(&self) -> usize {
        self.outbox.queued_bytes()
    }

    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.outbox.queued()
    }

    /// Sends `msg` now if the socket takes it, else queues it within `limits`; a full
    /// outbox closes the session as a slow consumer, a failed socket as lost.
    pub(crate) fn offer(&self, msg: &Outgoing, limits: OutboxLimits) -> Offered {
        if self.is_closed() {
            return Offered::Closed;
        }
        match self.outbox.push(msg, limits) {
            Pushed::Written => Offered::Written,
            Pushed::Queued { wake } => {
                if wake {
                    self.waker.wake();
                }
                Offered::Queued
            }
            Pushed::Skipped => Offered::Skipped,
            Pushed::Full => {
                self.close(CloseReason::SlowConsumer);
                Offered::Slow
            }
            Pushed::Failed => {
                self.close(CloseReason::ConnectionLost);
                Offered::Closed
            }
        }
    }

    /// Writes one welcome, replay or catch-up frame while the session is held (see
    /// [`Outbox::send_held`]).
    pub(crate) async fn send_held(
        &self,
        msg: &Outgoing,
        wait: Duration,
    ) -> Result<(), CloseReason> {
        self.outbox.send_held(msg, wait, &self.waker).await
    }

    /// Ends the greeting (see [`Outbox::finish_greeting`]); wakes the session loop when
    /// parked deliveries are now to be written.
    pub(crate) fn finish_greeting(&self, start: Option<StreamId>) -> Released {
        self.woken(self.outbox.finish_greeting(start))
    }

    /// Parks live deliveries until the session is caught up (see
    /// [`Outbox::hold_for_catch_up`]).
    pub(crate) fn hold_for_catch_up(&self) {
        if !self.is_closed() {
            self.outbox.hold_for_catch_up();
        }
    }

    /// Where a pending catch-up starts, if one is due now.
    pub(crate) fn catch_up_start(&self) -> Option<CatchUp> {
        if self.is_closed() {
            return None;
        }
        self.outbox.catch_up_start()
    }

    /// Ends a catch-up (see [`Outbox::finish_catch_up`]).
    pub(crate) fn finish_catch_up(&self, done: CatchUp) -> Released {
        self.woken(self.outbox.finish_catch_up(done))
    }

    fn woken(&self, released: Released) -> Released {
        if released == Released::Backlog {
            self.waker.wake();
        }
        released
    }

    /// Drains the outbox as far as the socket allows (see [`Outbox::poll_flush`]).
    pub(crate) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.outbox.poll_flush(cx)
    }

    /// Closing: the last flush (see [`Outbox::finish`]).
    pub(crate) async fn finish(&self, last: Option<Outgoing>, wait: Duration) {
        self.outbox.finish(last, wait).await;
    }

    /// The sweeper's visit: closes an idle, stalled or expired session, or sends a ping
    /// when this visit is its place in the ping cycle (`ping_due`).
    pub(crate) fn sweep(
        &self,
        now: Now,
        live: &LivenessSettings,
        limits: OutboxLimits,
        ping_due: bool,
    ) {
        if self.is_closed() {
            return;
        }
        match self
            .liveness
            .judge(now, live, self.outbox.stalled_since(), ping_due)
        {
            Verdict::Fine => {}
            Verdict::Close(reason) => self.close(reason),
            Verdict::Ping => {
                let _ = self.offer(&Outgoing::control(Kind::Ping, Bytes::new()), limits);
            }
        }
    }

    /// Takes up to `max` queued frames (tests read deliveries this way).
    #[cfg(test)]
    pub(crate) fn take(&self, max: usize) -> Vec<Outgoing> {
        self.outbox.take(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::outbox::Released;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    async fn pair() -> (Arc<TcpStream>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (Arc::new(server), client)
    }

    /// A released session whose socket has a 4 KiB send buffer, so it fills quickly.
    async fn released_with_small_send_buffer() -> (Arc<Client>, TcpStream) {
        let (sock, client) = pair().await;
        socket2::SockRef::from(&*sock)
            .set_send_buffer_size(4096)
            .unwrap();
        let ctl = Arc::new(Client::held(sock, None));
        ctl.finish_greeting(None);
        (ctl, client)
    }

    const LIMITS: OutboxLimits = OutboxLimits {
        messages: 4,
        bytes: 1 << 20,
    };

    /// Reads unmasked server frames: (opcode, payload).
    async fn read_frames(c: &mut TcpStream, n: usize) -> Vec<(u8, Vec<u8>)> {
        let mut got = Vec::new();
        for _ in 0..n {
            let mut h = [0u8; 2];
            c.read_exact(&mut h).await.unwrap();
            let len = match h[1] & 0x7F {
                126 => c.read_u16().await.unwrap() as usize,
                127 => c.read_u64().await.unwrap() as usize,
                l => l as usize,
            };
            let mut p = vec![0u8; len];
            c.read_exact(&mut p).await.unwrap();
            got.push((h[0] & 0x0F, p));
        }
        got
    }

    #[tokio::test]
    async fn held_sessions_queue_until_released_and_drop_replayed_copies() {
        let (sock, mut client) = pair().await;
        let ctl = Client::held(sock, None);
        let early = Outgoing::text("live-1".into(), Some("5-0".parse().unwrap()));
        let later = Outgoing::text("live-2".into(), Some("9-0".parse().unwrap()));
        assert_eq!(ctl.offer(&early, LIMITS), Offered::Queued);
        assert_eq!(ctl.offer(&later, LIMITS), Offered::Queued);
        let welcome = Outgoing::text("welcome".into(), None);
        ctl.send_held(&welcome, Duration::from_secs(1))
            .await
            .unwrap();
        ctl.finish_greeting(Some("5-0".parse().unwrap()));
        assert_eq!(ctl.queued(), 1);
        std::future::poll_fn(|cx| ctl.poll_flush(cx)).await.unwrap();
        assert_eq!(
            ctl.offer(&Outgoing::text("direct".into(), None), LIMITS),
            Offered::Written
        );
        let frames = read_frames(&mut client, 3).await;
        let texts: Vec<&[u8]> = frames.iter().map(|(_, p)| p.as_slice()).collect();
        assert_eq!(texts, vec![&b"welcome"[..], b"live-2", b"direct"]);
        assert_eq!(ctl.queued_bytes(), 0);
    }

    fn durable(text: &str, id: &str) -> Outgoing {
        Outgoing::text(text.into(), Some(id.parse().unwrap()))
    }

    #[tokio::test]
    async fn a_catch_up_goes_after_the_backlog_and_before_parked_live_messages() {
        let (ctl, mut client) = released_with_small_send_buffer().await;
        let limits = OutboxLimits {
            messages: 1000,
            bytes: 64 << 20,
        };
        // A backlog that the kernel did not take yet: it was sent before the break.
        let big = "b".repeat(100_000);
        assert_eq!(ctl.offer(&durable(&big, "3-0"), limits), Offered::Queued);
        // The subscription broke; what arrives on the new one is parked.
        ctl.hold_for_catch_up();
        let request = ctl.catch_up_start().unwrap();
        assert_eq!(request.after, Some("3-0".parse().unwrap()));
        assert_eq!(
            ctl.offer(&durable("live-5", "5-0"), limits),
            Offered::Queued
        );
        assert_eq!(
            ctl.offer(&durable("live-7", "7-0"), limits),
            Offered::Queued
        );
        assert_eq!(
            ctl.offer(&Outgoing::text("plain".into(), None), limits),
            Offered::Queued
        );
        // The catch-up sends what the inbox holds after 3-0: 4, 5 and 6.
        let catch_up = {
            let ctl = ctl.clone();
            tokio::spawn(async move {
                for (t, id) in [
                    ("caught-4", "4-0"),
                    ("caught-5", "5-0"),
                    ("caught-6", "6-0"),
                ] {
                    ctl.send_held(&durable(t, id), Duration::from_secs(5))
                        .await
                        .unwrap();
                }
                ctl.finish_catch_up(request)
            })
        };
        let first = read_frames(&mut client, 4).await;
        assert_eq!(first[0].1.len(), 100_000, "the backlog goes first");
        let texts: Vec<&[u8]> = first[1..].iter().map(|(_, p)| p.as_slice()).collect();
        assert_eq!(texts, vec![&b"caught-4"[..], b"caught-5", b"caught-6"]);
        assert_eq!(catch_up.await.unwrap(), Released::Backlog);
        // The parked live copy of 5 is a duplicate; 7 and the plain message follow.
        std::future::poll_fn(|cx| ctl.poll_flush(cx)).await.unwrap();
        let rest = read_frames(&mut client, 2).await;
        let texts: Vec<&[u8]> = rest.iter().map(|(_, p)| p.as_slice()).collect();
        assert_eq!(texts, vec![&b"live-7"[..], b"plain"]);
        // And a late live copy of anything sent is dropped.
        assert_eq!(
            ctl.offer(&durable("late-6", "6-0"), limits),
            Offered::Skipped
        );
        assert_eq!(ctl.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn a_catch_up_asked_for_during_another_runs_again() {
        let (sock, _client) = pair().await;
        let ctl = Client::held(sock, None);
        ctl.finish_greeting(None);
        ctl.hold_for_catch_up();
        let first = ctl.catch_up_start().unwrap();
        ctl.hold_for_catch_up();
        assert_eq!(ctl.finish_catch_up(first), Released::StillHeld);
        let second = ctl.catch_up_start().unwrap();
        assert_eq!(ctl.finish_catch_up(second), Released::Idle);
        assert!(ctl.catch_up_start().is_none());
        // While greeting, a catch-up waits for the greeting's end.
        let (sock, _client) = pair().await;
        let greeting = Client::held(sock, None);
        greeting.hold_for_catch_up();
        assert!(greeting.catch_up_start().is_none());
        assert_eq!(greeting.finish_greeting(None), Released::StillHeld);
        assert!(greeting.catch_up_start().is_some());
    }

    #[tokio::test]
    async fn a_full_socket_queues_then_marks_a_slow_consumer() {
        let (ctl, client) = released_with_small_send_buffer().await;
        let big = Outgoing::text("x".repeat(64 * 1024), None);
        let mut outcomes = Vec::new();
        for _ in 0..64 {
            let o = ctl.offer(&big, LIMITS);
            outcomes.push(o);
            if o != Offered::Written && o != Offered::Queued {
                break;
            }
        }
        assert!(outcomes.contains(&Offered::Queued), "{outcomes:?}");
        assert_eq!(outcomes.last(), Some(&Offered::Slow), "{outcomes:?}");
        assert_eq!(ctl.reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(ctl.offer(&big, LIMITS), Offered::Closed);
        drop(client);
    }

    #[tokio::test]
    async fn a_backlog_drains_in_order_once_the_client_reads() {
        let (ctl, mut client) = released_with_small_send_buffer().await;
        let limits = OutboxLimits {
            messages: 1000,
            bytes: 64 << 20,
        };
        let n = 200;
        for i in 0..n {
            let text = format!("{i:05}{}", "y".repeat(3000));
            assert_ne!(
                ctl.offer(&Outgoing::text(text, None), limits),
                Offered::Slow
            );
        }
        let flusher = {
            let ctl = ctl.clone();
            tokio::spawn(async move { std::future::poll_fn(|cx| ctl.poll_flush(cx)).await })
        };
        let frames = read_frames(&mut client, n).await;
        for (i, (op, p)) in frames.iter().enumerate() {
            assert_eq!(*op, 0x1);
            assert_eq!(&p[..5], format!("{i:05}").as_bytes());
            assert_eq!(p.len(), 3005);
        }
        flusher.await.unwrap().unwrap();
        assert_eq!((ctl.queued(), ctl.queued_bytes()), (0, 0));
    }

    #[tokio::test]
    async fn sweep_pings_then_closes_idle_and_stalled_sessions() {
        let (sock, mut client) = pair().await;
        let ctl = Client::held(sock, None);
        ctl.finish_greeting(None);
        let live = LivenessSettings {
            ping_interval: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_millis(200),
            token_grace: Duration::from_secs(10),
        };
        let at = |mono_ms| Now {
            mono_ms,
            unix_s: 1_000,
        };
        let t0 = mono_ms();
        ctl.sweep(at(t0), &live, LIMITS, false);
        assert!(!ctl.is_closed());
        ctl.sweep(at(t0 + 150), &live, LIMITS, true);
        assert_eq!(read_frames(&mut client, 1).await, vec![(0x9, vec![])]);
        // Closing wins over a ping due at the same visit.
        ctl.sweep(at(t0 + 400), &live, LIMITS, true);
        assert_eq!(ctl.reason(), Some(CloseReason::IdleTimeout));

        let (stalled, _client) = released_with_small_send_buffer().await;
        let big = Outgoing::text("s".repeat(64 * 1024), None);
        while stalled.offer(&big, LIMITS) == Offered::Written {}
        assert!(!stalled.is_closed());
        stalled.sweep(at(mono_ms() + 100), &live, LIMITS, false);
        assert!(
            !stalled.is_closed(),
            "stalled for less than the write timeout"
        );
        stalled.sweep(at(mono_ms() + 250), &live, LIMITS, false);
        assert_eq!(stalled.reason(), Some(CloseReason::SlowConsumer));

        // A token expiry ends the session after the grace, unless it was refreshed.
        let (sock, _c) = pair().await;
        let expiring = Client::held(sock, Some(2_000));
        expiring.finish_greeting(None);
        let now = mono_ms();
        let wall = |unix_s| Now {
            mono_ms: now,
            unix_s,
        };
        expiring.sweep(wall(2_009), &live, LIMITS, false);
        assert!(!expiring.is_closed(), "within the grace");
        expiring.refreshed(Some(3_000));
        expiring.sweep(wall(2_011), &live, LIMITS, false);
        assert!(!expiring.is_closed(), "refreshed");
        expiring.sweep(wall(3_010), &live, LIMITS, false);
        assert_eq!(expiring.reason(), Some(CloseReason::TokenExpired));
    }

    #[tokio::test]
    async fn finish_completes_a_half_written_frame_before_the_close() {
        let (ctl, mut client) = released_with_small_send_buffer().await;
        let big = Outgoing::text("z".repeat(200_000), None);
        let limits = OutboxLimits {
            messages: 10,
            bytes: 1 << 20,
        };
        assert_eq!(ctl.offer(&big, limits), Offered::Queued);
        assert_eq!(ctl.offer(&big, limits), Offered::Queued);
        let finisher = {
            let ctl = ctl.clone();
            tokio::spawn(async move {
                ctl.finish(
                    Some(Outgoing::close(CloseReason::Kicked)),
                    Duration::from_secs(5),
                )
                .await;
            })
        };
        let frames = read_frames(&mut client, 2).await;
        assert_eq!(frames[0].1.len(), 200_000);
        assert_eq!(frames[1].0, 0x8);
        assert_eq!(&frames[1].1[..2], &4002u16.to_be_bytes());
        finisher.await.unwrap();
        assert_eq!(ctl.queued(), 0);
    }
}
