//! One session's write side and liveness: the socket its loop shares with whoever delivers
//! to it, the bounded outbox, and the close, ping and idle state.
//!
//! A delivery writes straight to the socket when nothing is queued before it, so the common
//! case (a notification to a client that keeps up) costs one `write` and no task wake-up.
//! Only what the kernel does not take at once is queued; the session's own loop then waits
//! for the socket to become writable and drains the queue. Every write, from any thread,
//! happens under the outbox lock, so frames never interleave.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::net::TcpStream;

use crate::inbox::StreamId;
use crate::protocol::CloseReason;
use crate::ws::{self, Kind};

/// Frames gathered into one `writev` when draining a backlog.
const WRITE_BATCH: usize = 32;

/// Milliseconds on a process-wide monotonic clock; cheap enough to read per frame.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One frame to send: the payload is shared by every recipient (cloning bumps a reference
/// count), and a durable message carries its inbox id so live copies of entries a replay
/// already delivered can be dropped.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub kind: Kind,
    pub payload: Bytes,
    pub id: Option<StreamId>,
}

impl Outgoing {
    pub fn text(text: String, id: Option<StreamId>) -> Self {
        Outgoing {
            kind: Kind::Text,
            payload: Bytes::from(text),
            id,
        }
    }

    pub fn control(kind: Kind, payload: impl Into<Bytes>) -> Self {
        Outgoing {
            kind,
            payload: payload.into(),
            id: None,
        }
    }

    pub fn close(reason: CloseReason) -> Self {
        Self::control(
            Kind::Close,
            ws::close_payload(reason.code(), reason.label()),
        )
    }

    /// Payload bytes: what the outbox byte budget counts.
    pub fn len(&self) -> usize {
        self.payload.len()
    }

    pub fn is_empty(&self) -> bool {
        self.payload.is_empty()
    }
}

/// Bounds of one session's outbox; reaching either marks the session a slow consumer.
#[derive(Debug, Clone, Copy)]
pub struct OutboxLimits {
    pub messages: usize,
    pub bytes: usize,
}

/// What became of one offered frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
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

/// Liveness settings the node's sweeper applies to every session.
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
}

#[derive(Debug, Default)]
struct Out {
    /// `None` in unit tests and once the session has finished.
    sock: Option<Arc<TcpStream>>,
    queue: VecDeque<Outgoing>,
    /// Bytes (header and payload) of the queue's first frame already written.
    head_sent: usize,
    /// While the welcome and replay are written, live deliveries queue behind them.
    held: bool,
    /// Durable messages up to this id were replayed; live copies are dropped.
    replayed_up_to: Option<StreamId>,
}

/// Cross-task handle of one session.
#[derive(Debug, Default)]
pub struct SessionControl {
    out: Mutex<Out>,
    /// The session loop's waker: woken when the session must close or has a backlog.
    waker: AtomicWaker,
    reason: OnceLock<CloseReason>,
    closed: AtomicBool,
    queued_bytes: AtomicUsize,
    /// Something is queued (read without the lock by the sweeper).
    backlog: AtomicBool,
    /// [`now_ms`] of the last bytes read from the client.
    last_heard: AtomicU64,
    last_ping: AtomicU64,
    /// [`now_ms`] of the last write progress while a backlog existed.
    progress_at: AtomicU64,
}

impl SessionControl {
    /// A session on `sock` that queues every delivery until [`release`](Self::release).
    pub fn held(sock: Arc<TcpStream>) -> Self {
        let now = now_ms();
        let ctl = SessionControl {
            out: Mutex::new(Out {
                sock: Some(sock),
                held: true,
                ..Out::default()
            }),
            ..SessionControl::default()
        };
        ctl.last_heard.store(now, Ordering::Relaxed);
        ctl.last_ping.store(now, Ordering::Relaxed);
        ctl
    }

    fn lock(&self) -> MutexGuard<'_, Out> {
        // Every update of `Out` leaves it consistent before anything that could panic, so
        // a poisoned lock still guards valid data.
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the session to close with `reason`. The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.closed.store(true, Ordering::Release);
        self.waker.wake();
    }

    pub fn reason(&self) -> Option<CloseReason> {
        if self.closed.load(Ordering::Acquire) {
            self.reason.get().copied()
        } else {
            None
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Registers the session loop's waker.
    pub fn register(&self, waker: &Waker) {
        self.waker.register(waker);
    }

    /// Records that the client sent something.
    pub fn heard(&self) {
        self.last_heard.store(now_ms(), Ordering::Relaxed);
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// Sends `msg` now if the socket takes it, else queues it within `limits`.
    pub fn offer(&self, msg: &Outgoing, limits: OutboxLimits) -> Offered {
        if self.is_closed() {
            return Offered::Closed;
        }
        let mut out = self.lock();
        if let (Some(id), Some(done)) = (msg.id, out.replayed_up_to) {
            if id <= done {
                return Offered::Skipped;
            }
        }
        if out.queue.is_empty() && !out.held {
            // Borrowed, not cloned: this runs once per recipient of every message.
            let written = out.sock.as_deref().map(|sock| {
                let (h, hl) = ws::header(msg.kind, msg.payload.len());
                (
                    write_frame(sock, &h[..hl], &msg.payload, 0),
                    hl + msg.payload.len(),
                )
            });
            if let Some((result, total)) = written {
                match result {
                    Ok(n) if n == total => return Offered::Written,
                    Ok(n) => {
                        out.head_sent = n;
                        out.queue.push_back(msg.clone());
                        self.queued_bytes.fetch_add(msg.len(), Ordering::Relaxed);
                        self.start_backlog();
                        drop(out);
                        self.waker.wake();
                        return Offered::Queued;
                    }
                    Err(_) => {
                        drop(out);
                        self.close(CloseReason::ConnectionLost);
                        return Offered::Closed;
                    }
                }
            }
        }
        let bytes = self.queued_bytes.load(Ordering::Relaxed);
        if out.queue.len() >= limits.messages || bytes.saturating_add(msg.len()) > limits.bytes {
            drop(out);
            self.close(CloseReason::SlowConsumer);
            return Offered::Slow;
        }
        let was_empty = out.queue.is_empty();
        out.queue.push_back(msg.clone());
        self.queued_bytes.fetch_add(msg.len(), Ordering::Relaxed);
        // A held session's queue waits for `release`, which starts the backlog clock; the
        // welcome and replay are not the client's slowness.
        if was_empty && !out.held {
            self.start_backlog();
            drop(out);
            self.waker.wake();
        }
        Offered::Queued
    }

    fn start_backlog(&self) {
        self.progress_at.store(now_ms(), Ordering::Relaxed);
        self.backlog.store(true, Ordering::Release);
    }

    /// Writes one frame directly while the session is held (welcome, gap and replay
    /// frames, which go before anything queued). Gives up after `wait`.
    pub async fn send_now(&self, msg: &Outgoing, wait: Duration) -> Result<(), CloseReason> {
        let Some(sock) = self.lock().sock.clone() else {
            return Err(CloseReason::ConnectionLost);
        };
        let (h, hl) = ws::header(msg.kind, msg.payload.len());
        let total = hl + msg.payload.len();
        let write = async {
            let mut sent = 0;
            loop {
                {
                    // Held: deliveries only queue, so this is the only writer.
                    let _out = self.lock();
                    sent = write_frame(&sock, &h[..hl], &msg.payload, sent)
                        .map_err(|_| CloseReason::ConnectionLost)?;
                }
                if sent == total {
                    return Ok(());
                }
                sock.writable()
                    .await
                    .map_err(|_| CloseReason::ConnectionLost)?;
            }
        };
        match tokio::time::timeout(wait, write).await {
            Ok(r) => r,
            Err(_) => Err(CloseReason::SlowConsumer),
        }
    }

    /// Ends the hold: drops queued live copies of replayed entries; later deliveries may
    /// write directly once the loop has drained what was queued.
    pub fn release(&self, replayed_up_to: Option<StreamId>) {
        let mut out = self.lock();
        out.held = false;
        out.replayed_up_to = replayed_up_to;
        if let Some(done) = replayed_up_to {
            let before: usize = out.queue.iter().map(Outgoing::len).sum();
            out.queue
                .retain(|m| !matches!(m.id, Some(id) if id <= done));
            let after: usize = out.queue.iter().map(Outgoing::len).sum();
            self.queued_bytes
                .fetch_sub(before - after, Ordering::Relaxed);
        }
        if !out.queue.is_empty() {
            self.start_backlog();
        }
    }

    /// Drains the outbox as far as the socket allows. `Ready(Ok)` once it is empty (or the
    /// session is held or detached); `Pending` with the waker registered for writability.
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.backlog.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        loop {
            let mut out = self.lock();
            let Some(sock) = out.sock.clone() else {
                return Poll::Ready(Ok(()));
            };
            if out.held {
                return Poll::Ready(Ok(()));
            }
            match self.drain(&mut out, &sock) {
                Ok(true) => return Poll::Ready(Ok(())),
                Ok(false) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            drop(out);
            match sock.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Writes queued frames, several per `writev`, until the queue is empty (`true`) or
    /// the socket is full (`false`).
    fn drain(&self, out: &mut Out, sock: &TcpStream) -> io::Result<bool> {
        loop {
            if out.queue.is_empty() {
                self.backlog.store(false, Ordering::Release);
                if out.queue.capacity() > 64 {
                    // A burst grew the queue; an idle session should not keep that memory.
                    out.queue.shrink_to(0);
                }
                return Ok(true);
            }
            let mut headers = [([0u8; ws::MAX_HEADER], 0usize); WRITE_BATCH];
            for (slot, m) in headers.iter_mut().zip(out.queue.iter()) {
                *slot = ws::header(m.kind, m.payload.len());
            }
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 * WRITE_BATCH);
            let mut skip = out.head_sent;
            for ((h, hl), m) in headers.iter().zip(out.queue.iter()) {
                for part in [&h[..*hl], &m.payload[..]] {
                    if skip >= part.len() {
                        skip -= part.len();
                    } else {
                        slices.push(IoSlice::new(&part[skip..]));
                        skip = 0;
                    }
                }
            }
            let written = match sock.try_write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            drop(slices);
            self.progress_at.store(now_ms(), Ordering::Relaxed);
            let mut left = out.head_sent + written;
            out.head_sent = 0;
            while let Some(m) = out.queue.front() {
                let wire = ws::header(m.kind, m.payload.len()).1 + m.payload.len();
                if left < wire {
                    out.head_sent = left;
                    break;
                }
                left -= wire;
                let len = m.len();
                out.queue.pop_front();
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            }
        }
    }

    /// Closing: keeps only a half-written frame (which must be completed for the stream
    /// to stay valid), queues `last` (a close frame) and tries to flush within `wait`.
    /// Then the socket is released; the connection closes when the loop drops its handle.
    pub async fn finish(&self, last: Option<Outgoing>, wait: Duration) {
        {
            let mut out = self.lock();
            let keep = if out.head_sent > 0 { 1 } else { 0 };
            while out.queue.len() > keep {
                if let Some(m) = out.queue.pop_back() {
                    self.queued_bytes.fetch_sub(m.len(), Ordering::Relaxed);
                }
            }
            out.held = false;
            if let Some(m) = last {
                out.queue.push_back(m);
            }
            if !out.queue.is_empty() {
                self.start_backlog();
            }
        }
        let _ = tokio::time::timeout(wait, std::future::poll_fn(|cx| self.poll_flush(cx))).await;
        let mut out = self.lock();
        out.sock = None;
        out.queue = VecDeque::new();
        out.head_sent = 0;
        self.queued_bytes.store(0, Ordering::Relaxed);
        self.backlog.store(false, Ordering::Release);
    }

    /// The sweeper's visit: closes an idle or stalled session, or sends a ping when due.
    pub fn sweep(&self, now: u64, live: &Liveness, limits: OutboxLimits) {
        if self.is_closed() {
            return;
        }
        let ms = |d: Duration| d.as_millis() as u64;
        if self.backlog.load(Ordering::Acquire)
            && now.saturating_sub(self.progress_at.load(Ordering::Relaxed))
                >= ms(live.write_timeout)
        {
            self.close(CloseReason::SlowConsumer);
            return;
        }
        if now.saturating_sub(self.last_heard.load(Ordering::Relaxed)) >= ms(live.idle_timeout) {
            self.close(CloseReason::IdleTimeout);
            return;
        }
        if now.saturating_sub(self.last_ping.load(Ordering::Relaxed)) >= ms(live.ping_interval) {
            self.last_ping.store(now, Ordering::Relaxed);
            let _ = self.offer(&Outgoing::control(Kind::Ping, Bytes::new()), limits);
        }
    }

    /// Takes up to `max` queued frames (tests read deliveries this way).
    #[cfg(test)]
    pub fn take(&self, max: usize) -> Vec<Outgoing> {
        let mut out = self.lock();
        let n = out.queue.len().min(max);
        let batch: Vec<Outgoing> = out.queue.drain(..n).collect();
        let bytes: usize = batch.iter().map(Outgoing::len).sum();
        self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        if out.queue.is_empty() {
            self.backlog.store(false, Ordering::Release);
        }
        batch
    }
}

/// Writes what is left of one frame (`sent` bytes of it are out already) until it is out
/// or the socket is full; returns the bytes of the frame now written.
fn write_frame(
    sock: &TcpStream,
    header: &[u8],
    payload: &[u8],
    mut sent: usize,
) -> io::Result<usize> {
    let total = header.len() + payload.len();
    while sent < total {
        let r = if sent < header.len() {
            sock.try_write_vectored(&[IoSlice::new(&header[sent..]), IoSlice::new(payload)])
        } else {
            sock.try_write(&payload[sent - header.len()..])
        };
        match r {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    async fn pair() -> (Arc<TcpStream>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap(); // safe: test
        let addr = l.local_addr().unwrap(); // safe: test
        let client = TcpStream::connect(addr).await.unwrap(); // safe: test
        let (server, _) = l.accept().await.unwrap(); // safe: test
        (Arc::new(server), client)
    }

    /// A released session whose socket has a 4 KiB send buffer, so it fills quickly.
    async fn released_with_small_send_buffer() -> (Arc<SessionControl>, TcpStream) {
        let (sock, client) = pair().await;
        socket2::SockRef::from(&*sock)
            .set_send_buffer_size(4096)
            .unwrap(); // safe: test
        let ctl = Arc::new(SessionControl::held(sock));
        ctl.release(None);
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
            c.read_exact(&mut h).await.unwrap(); // safe: test
            let len = match h[1] & 0x7F {
                126 => c.read_u16().await.unwrap() as usize, // safe: test
                127 => c.read_u64().await.unwrap() as usize, // safe: test
                l => l as usize,
            };
            let mut p = vec![0u8; len];
            c.read_exact(&mut p).await.unwrap(); // safe: test
            got.push((h[0] & 0x0F, p));
        }
        got
    }

    #[tokio::test]
    async fn held_sessions_queue_until_released_and_drop_replayed_copies() {
        let (sock, mut client) = pair().await;
        let ctl = SessionControl::held(sock);
        let early = Outgoing::text("live-1".into(), Some("5-0".parse().unwrap())); // safe: test
        let later = Outgoing::text("live-2".into(), Some("9-0".parse().unwrap())); // safe: test
        assert_eq!(ctl.offer(&early, LIMITS), Offered::Queued);
        assert_eq!(ctl.offer(&later, LIMITS), Offered::Queued);
        let welcome = Outgoing::text("welcome".into(), None);
        ctl.send_now(&welcome, Duration::from_secs(1))
            .await
            .unwrap(); // safe: test
        ctl.release(Some("5-0".parse().unwrap())); // safe: test
        assert_eq!(ctl.queued(), 1);
        std::future::poll_fn(|cx| ctl.poll_flush(cx)).await.unwrap(); // safe: test
        assert_eq!(
            ctl.offer(&Outgoing::text("direct".into(), None), LIMITS),
            Offered::Written
        );
        let frames = read_frames(&mut client, 3).await;
        let texts: Vec<&[u8]> = frames.iter().map(|(_, p)| p.as_slice()).collect();
        assert_eq!(texts, vec![&b"welcome"[..], b"live-2", b"direct"]);
        assert_eq!(ctl.queued_bytes(), 0);
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
        flusher.await.unwrap().unwrap(); // safe: test
        assert_eq!((ctl.queued(), ctl.queued_bytes()), (0, 0));
    }

    #[tokio::test]
    async fn sweep_pings_then_closes_idle_and_stalled_sessions() {
        let (sock, mut client) = pair().await;
        let ctl = SessionControl::held(sock);
        ctl.release(None);
        let live = Liveness {
            ping_interval: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_millis(200),
        };
        let t0 = now_ms();
        ctl.sweep(t0, &live, LIMITS);
        assert!(!ctl.is_closed());
        ctl.sweep(t0 + 150, &live, LIMITS);
        assert_eq!(read_frames(&mut client, 1).await, vec![(0x9, vec![])]);
        ctl.sweep(t0 + 400, &live, LIMITS);
        assert_eq!(ctl.reason(), Some(CloseReason::IdleTimeout));

        let (stalled, _client) = released_with_small_send_buffer().await;
        let big = Outgoing::text("s".repeat(64 * 1024), None);
        while stalled.offer(&big, LIMITS) == Offered::Written {}
        assert!(!stalled.is_closed());
        stalled.sweep(now_ms() + 100, &live, LIMITS);
        assert!(
            !stalled.is_closed(),
            "stalled for less than the write timeout"
        );
        stalled.sweep(now_ms() + 250, &live, LIMITS);
        assert_eq!(stalled.reason(), Some(CloseReason::SlowConsumer));
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
                .await
            })
        };
        let frames = read_frames(&mut client, 2).await;
        assert_eq!(frames[0].1.len(), 200_000);
        assert_eq!(frames[1].0, 0x8);
        assert_eq!(&frames[1].1[..2], &4002u16.to_be_bytes());
        finisher.await.unwrap(); // safe: test
        assert_eq!(ctl.queued(), 0);
    }
}
