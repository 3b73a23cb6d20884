//! One session's bounded send queue and the socket it writes to: direct writes when
//! nothing is queued, the backlog when the kernel does not take a frame at once, the hold
//! during welcome and replay, and the last flush at close.
//!
//! A delivery writes straight to the socket when nothing is queued before it, so the common
//! case (a notification to a client that keeps up) costs one `write` and no task wake-up.
//! Only what the kernel does not take at once is queued; the session's own loop then waits
//! for the socket to become writable and drains the queue. Every write, from any thread,
//! happens under the outbox lock, so frames never interleave.
//!
//! The outbox knows nothing of closing or waking: it reports what happened ([`Pushed`]) and
//! the session's [`Client`](super::client::Client) acts on it.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;

use super::codec::{self, Kind};
use crate::clock::mono_ms;
use crate::protocol::{CloseReason, StreamId};

/// Frames gathered into one `writev` when draining a backlog.
const WRITE_BATCH: usize = 32;

/// One frame to send: the payload is shared by every recipient (cloning bumps a reference
/// count), and a durable message carries its inbox id so live copies of entries a replay
/// already delivered can be dropped.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub(crate) kind: Kind,
    pub(crate) payload: Bytes,
    pub(crate) id: Option<StreamId>,
}

impl Outgoing {
    pub(crate) fn text(text: String, id: Option<StreamId>) -> Self {
        Outgoing {
            kind: Kind::Text,
            payload: Bytes::from(text),
            id,
        }
    }

    pub(crate) fn control(kind: Kind, payload: impl Into<Bytes>) -> Self {
        Outgoing {
            kind,
            payload: payload.into(),
            id: None,
        }
    }

    pub(crate) fn close(reason: CloseReason) -> Self {
        Self::control(
            Kind::Close,
            codec::close_payload(reason.code(), reason.label()),
        )
    }

    /// Payload bytes: what the outbox byte budget counts.
    pub(crate) fn len(&self) -> usize {
        self.payload.len()
    }
}

/// Bounds of one session's outbox; reaching either marks the session a slow consumer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutboxLimits {
    pub(crate) messages: usize,
    pub(crate) bytes: usize,
}

/// What the outbox did with one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Handed to the kernel in full.
    Written,
    /// Queued; `wake` when the session loop must start draining (a new backlog).
    Queued { wake: bool },
    /// A live copy of a durable message the replay already delivered.
    Skipped,
    /// The queue is at its limits; nothing was queued.
    Full,
    /// The socket failed.
    Failed,
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

/// The write side of one session.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    out: Mutex<Out>,
    queued_bytes: AtomicUsize,
    /// Something is queued (read without the lock by the sweeper).
    backlog: AtomicBool,
    /// [`mono_ms`] of the last write progress while a backlog existed.
    progress_at: AtomicU64,
}

impl Outbox {
    /// An outbox on `sock` that queues every delivery until [`release`](Self::release).
    pub(crate) fn held(sock: Arc<TcpStream>) -> Self {
        Outbox {
            out: Mutex::new(Out {
                sock: Some(sock),
                held: true,
                ..Out::default()
            }),
            ..Outbox::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, Out> {
        // Every update of `Out` leaves it consistent before anything that could panic, so
        // a poisoned lock still guards valid data.
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// When a backlog exists: the [`mono_ms`] of its last write progress.
    pub(crate) fn stalled_since(&self) -> Option<u64> {
        self.backlog
            .load(Ordering::Acquire)
            .then(|| self.progress_at.load(Ordering::Relaxed))
    }

    /// Sends `msg` now if the socket takes it, else queues it within `limits`.
    pub(crate) fn push(&self, msg: &Outgoing, limits: OutboxLimits) -> Pushed {
        let mut out = self.lock();
        if let (Some(id), Some(done)) = (msg.id, out.replayed_up_to) {
            if id <= done {
                return Pushed::Skipped;
            }
        }
        if out.queue.is_empty() && !out.held {
            // Borrowed, not cloned: this runs once per recipient of every message.
            let written = out.sock.as_deref().map(|sock| {
                let (h, hl) = codec::header(msg.kind, msg.payload.len());
                (
                    write_frame(sock, &h[..hl], &msg.payload, 0),
                    hl + msg.payload.len(),
                )
            });
            if let Some((result, total)) = written {
                return match result {
                    Ok(n) if n == total => Pushed::Written,
                    Ok(n) => {
                        out.head_sent = n;
                        out.queue.push_back(msg.clone());
                        self.queued_bytes.fetch_add(msg.len(), Ordering::Relaxed);
                        self.start_backlog();
                        Pushed::Queued { wake: true }
                    }
                    Err(_) => Pushed::Failed,
                };
            }
        }
        let bytes = self.queued_bytes.load(Ordering::Relaxed);
        if out.queue.len() >= limits.messages || bytes.saturating_add(msg.len()) > limits.bytes {
            return Pushed::Full;
        }
        let was_empty = out.queue.is_empty();
        out.queue.push_back(msg.clone());
        self.queued_bytes.fetch_add(msg.len(), Ordering::Relaxed);
        // A held session's queue waits for `release`, which starts the backlog clock; the
        // welcome and replay are not the client's slowness.
        let wake = was_empty && !out.held;
        if wake {
            self.start_backlog();
        }
        Pushed::Queued { wake }
    }

    fn start_backlog(&self) {
        self.progress_at.store(mono_ms(), Ordering::Relaxed);
        self.backlog.store(true, Ordering::Release);
    }

    /// Writes one frame directly while the session is held (welcome, gap and replay
    /// frames, which go before anything queued). Gives up after `wait`.
    pub(crate) async fn send_now(&self, msg: &Outgoing, wait: Duration) -> Result<(), CloseReason> {
        let Some(sock) = self.lock().sock.clone() else {
            return Err(CloseReason::ConnectionLost);
        };
        let (h, hl) = codec::header(msg.kind, msg.payload.len());
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
    pub(crate) fn release(&self, replayed_up_to: Option<StreamId>) {
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
    pub(crate) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
            let mut headers = [([0u8; codec::MAX_HEADER], 0usize); WRITE_BATCH];
            for (slot, m) in headers.iter_mut().zip(out.queue.iter()) {
                *slot = codec::header(m.kind, m.payload.len());
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
            self.progress_at.store(mono_ms(), Ordering::Relaxed);
            let mut left = out.head_sent + written;
            out.head_sent = 0;
            while let Some(m) = out.queue.front() {
                let wire = codec::header(m.kind, m.payload.len()).1 + m.payload.len();
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
    pub(crate) async fn finish(&self, last: Option<Outgoing>, wait: Duration) {
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

    /// Takes up to `max` queued frames (tests read deliveries this way).
    #[cfg(test)]
    pub(crate) fn take(&self, max: usize) -> Vec<Outgoing> {
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
