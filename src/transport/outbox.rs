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
//!
//! An SSE session has no socket of its own (hyper writes its response body): its outbox is
//! a *pull* sink, from which the response body takes frames ([`Outbox::poll_take`]), with
//! the same bounds, hold, dedupe and stall detection.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::codec::{self, Kind};
use crate::clock::{mono_ms, mono_us};
use crate::metrics as m;
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
    /// [`mono_us`] when this copy entered a session's queue (0: not queued). Only queued
    /// copies carry one, so a frame written at once costs no clock read, and an idle session
    /// (no queue) holds none.
    queued_at: u64,
}

impl Outgoing {
    pub(crate) fn text(text: String, id: Option<StreamId>) -> Self {
        Outgoing {
            kind: Kind::Text,
            payload: Bytes::from(text),
            id,
            queued_at: 0,
        }
    }

    pub(crate) fn control(kind: Kind, payload: impl Into<Bytes>) -> Self {
        Outgoing {
            kind,
            payload: payload.into(),
            id: None,
            queued_at: 0,
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

    /// This session's copy, stamped with the time it was queued.
    fn queued(&self, now_us: u64) -> Self {
        Outgoing {
            queued_at: now_us.max(1),
            ..self.clone()
        }
    }
}

/// Records how long the frames that just left a queue waited in it (`now_us` is when they
/// were written in full, or taken by an SSE body).
fn record_waits<'a>(frames: impl Iterator<Item = &'a Outgoing>, now_us: u64) {
    let mut waits = frames.filter(|m| m.queued_at != 0).peekable();
    if waits.peek().is_none() {
        return;
    }
    let h = metrics::histogram!(m::OUTBOX_WAIT_SECONDS);
    for f in waits {
        h.record(now_us.saturating_sub(f.queued_at) as f64 / 1e6);
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

/// What is left to do for a frame `queue_held` took.
enum Queued {
    /// Written in full.
    Sent,
    /// Queued for this socket: write the writable frames.
    Socket(Arc<TcpStream>),
    /// Queued for the response body: wait until it took them.
    Pull(Arc<Notify>),
}

/// What ending a hold left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Released {
    /// Still held: another catch-up is due (or the greeting is not over).
    StillHeld,
    /// Released with nothing queued.
    Idle,
    /// Released with parked deliveries to drain: the session loop must be woken.
    Backlog,
}

/// Where an outbox's frames go.
#[derive(Debug, Default)]
enum Sink {
    /// Nowhere: unit tests, and a session that has finished.
    #[default]
    Detached,
    /// Straight to the session's socket (WebSocket).
    Socket(Arc<TcpStream>),
    /// Taken by the response body (SSE); notified when it took some.
    Pull(Arc<Notify>),
}

impl Sink {
    fn socket(&self) -> Option<&Arc<TcpStream>> {
        match self {
            Sink::Socket(s) => Some(s),
            _ => None,
        }
    }

    fn attached(&self) -> bool {
        !matches!(self, Sink::Detached)
    }
}

#[derive(Debug, Default)]
struct Out {
    sink: Sink,
    queue: VecDeque<Outgoing>,
    /// Bytes (header and payload) of the queue's first frame already written.
    head_sent: usize,
    /// The welcome and replay are being written: live deliveries are parked behind them.
    greeting: bool,
    /// A catch-up was asked for (the subscription broke): live deliveries are parked until
    /// the session is caught up from `last_durable`.
    catch_up: bool,
    /// Bumped by every catch-up request, so one that arrives during a catch-up is not
    /// mistaken for the one being finished.
    catch_up_gen: u32,
    /// While held (greeting or catching up): how many frames at the front of the queue may
    /// be written (what was queued before the hold, then welcome, replay or catch-up frames).
    /// The frames behind them are parked live deliveries.
    ready: usize,
    /// The highest inbox id this session was sent (written or queued, parked frames
    /// excepted). Inbox ids grow in publish order, so a live copy at or below it is a
    /// duplicate of what replay or catch-up delivered, and a catch-up starts after it.
    last_durable: Option<StreamId>,
}

impl Out {
    fn held(&self) -> bool {
        self.greeting || self.catch_up
    }

    /// Frames that may be written now.
    fn writable(&self) -> usize {
        if self.held() {
            self.ready
        } else {
            self.queue.len()
        }
    }

    fn is_duplicate(&self, id: Option<StreamId>) -> bool {
        matches!((id, self.last_durable), (Some(id), Some(done)) if id <= done)
    }

    fn saw(&mut self, id: Option<StreamId>) {
        if id > self.last_durable {
            self.last_durable = id;
        }
    }
}

/// What a catch-up needs to start: where to read from, and which request it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CatchUp {
    /// The session was sent every durable message up to here.
    pub(crate) after: Option<StreamId>,
    generation: u32,
}

/// The write side of one session.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    out: Mutex<Out>,
    queued_bytes: AtomicUsize,
    /// Something writable is queued (read without the lock by the sweeper).
    backlog: AtomicBool,
    /// [`mono_ms`] of the last write progress while a backlog existed.
    progress_at: AtomicU64,
}

impl Outbox {
    /// An outbox on `sock` that parks every delivery until the greeting is over
    /// ([`finish_greeting`](Self::finish_greeting)).
    pub(crate) fn held(sock: Arc<TcpStream>) -> Self {
        Self::held_on(Sink::Socket(sock))
    }

    /// A held outbox whose frames a response body takes ([`poll_take`](Self::poll_take)).
    pub(crate) fn held_pull() -> Self {
        Self::held_on(Sink::Pull(Arc::new(Notify::new())))
    }

    fn held_on(sink: Sink) -> Self {
        Outbox {
            out: Mutex::new(Out {
                sink,
                greeting: true,
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

    /// Payload bytes queued (the sweeper samples it without the lock).
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

    /// Sends `msg` now if the socket takes it, else queues it within `limits` (parked
    /// behind the welcome, replay or catch-up while the session is held).
    pub(crate) fn push(&self, msg: &Outgoing, limits: OutboxLimits) -> Pushed {
        let mut out = self.lock();
        if out.is_duplicate(msg.id) {
            return Pushed::Skipped;
        }
        let held = out.held();
        if out.queue.is_empty() && !held {
            // Borrowed, not cloned: this runs once per recipient of every message.
            let written = out.sink.socket().map(|sock| {
                let (h, hl) = codec::header(msg.kind, msg.payload.len());
                (
                    write_frame(sock, &h[..hl], &msg.payload, 0),
                    hl + msg.payload.len(),
                )
            });
            if let Some((result, total)) = written {
                return match result {
                    Ok(n) if n == total => {
                        out.saw(msg.id);
                        Pushed::Written
                    }
                    Ok(n) => {
                        out.head_sent = n;
                        out.queue.push_back(msg.queued(mono_us()));
                        out.saw(msg.id);
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
        out.queue.push_back(msg.queued(mono_us()));
        self.queued_bytes.fetch_add(msg.len(), Ordering::Relaxed);
        if held {
            // Parked: the hold's end decides whether it is a duplicate and starts the
            // backlog clock; the welcome, replay or catch-up is not the client's slowness.
            return Pushed::Queued { wake: false };
        }
        out.saw(msg.id);
        if was_empty {
            self.start_backlog();
        }
        Pushed::Queued { wake: was_empty }
    }

    fn start_backlog(&self) {
        self.progress_at.store(mono_ms(), Ordering::Relaxed);
        self.backlog.store(true, Ordering::Release);
    }

    /// Puts a held frame after the writable ones (writing it at once when nothing is
    /// before it on a socket). Says what is left to wait for.
    fn queue_held(&self, msg: &Outgoing) -> Result<Queued, CloseReason> {
        let mut out = self.lock();
        if !out.held() {
            return Err(CloseReason::ConnectionLost);
        }
        let left = match &out.sink {
            Sink::Socket(s) => Queued::Socket(s.clone()),
            Sink::Pull(drained) => Queued::Pull(drained.clone()),
            Sink::Detached => return Err(CloseReason::ConnectionLost),
        };
        out.saw(msg.id);
        match &left {
            Queued::Socket(sock) if out.ready == 0 && out.head_sent == 0 => {
                // Nothing writable before it: straight to the socket, no queue (an idle
                // session should not keep a queue allocation for its welcome).
                let (h, hl) = codec::header(msg.kind, msg.payload.len());
                match write_frame(sock, &h[..hl], &msg.payload, 0) {
                    Ok(n) if n == hl + msg.payload.len() => return Ok(Queued::Sent),
                    Ok(n) => {
                        out.head_sent = n;
                        out.queue.push_front(msg.queued(mono_us()));
                    }
                    Err(_) => return Err(CloseReason::ConnectionLost),
                }
            }
            _ => {
                let at = out.ready;
                out.queue.insert(at, msg.queued(mono_us()));
            }
        }
        out.ready += 1;
        self.queued_bytes.fetch_add(msg.len(), Ordering::Relaxed);
        self.start_backlog();
        Ok(left)
    }

    /// Writes one frame of the welcome, a replay or a catch-up while the session is held:
    /// after what was queued before the hold, before every parked live delivery. Returns
    /// once it (and everything before it) is written; a client that does not take it within
    /// `wait` is a slow consumer.
    /// `body` is woken when a pull sink has a new frame for it.
    pub(crate) async fn send_held(
        &self,
        msg: &Outgoing,
        wait: Duration,
        body: &AtomicWaker,
    ) -> Result<(), CloseReason> {
        let sock = match self.queue_held(msg)? {
            Queued::Sent => return Ok(()),
            Queued::Pull(drained) => {
                body.wake();
                return self.wait_taken(&drained, wait).await;
            }
            Queued::Socket(sock) => sock,
        };
        let write = async {
            loop {
                {
                    let mut out = self.lock();
                    if !out.sink.attached() {
                        return Err(CloseReason::ConnectionLost);
                    }
                    match self.drain(&mut out, &sock) {
                        Ok(true) => return Ok(()),
                        Ok(false) => {}
                        Err(_) => return Err(CloseReason::ConnectionLost),
                    }
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

    /// Ends the greeting. `start` is where its replay started (the `since` the client gave,
    /// or the read cursor): the client has everything up to it, so live copies up to there
    /// are dropped too. Returns true when a catch-up was asked for meanwhile: the session
    /// then stays held until [`finish_catch_up`](Self::finish_catch_up); else its parked
    /// deliveries are released (and true is returned only in that case if they must be
    /// drained: see [`Released`]).
    pub(crate) fn finish_greeting(&self, start: Option<StreamId>) -> Released {
        let mut out = self.lock();
        out.greeting = false;
        out.saw(start);
        if out.catch_up {
            return Released::StillHeld;
        }
        self.release_parked(&mut out)
    }

    /// Asks for a catch-up: parks live deliveries from now on, until the session has been
    /// sent what its subscription may have missed. Called before any live message of a new
    /// subscription is delivered.
    pub(crate) fn hold_for_catch_up(&self) {
        let mut out = self.lock();
        if !out.sink.attached() {
            return;
        }
        if !out.held() {
            out.ready = out.queue.len();
        }
        out.catch_up = true;
        out.catch_up_gen = out.catch_up_gen.wrapping_add(1);
    }

    /// Where a pending catch-up starts, if one is pending and the greeting is over.
    pub(crate) fn catch_up_start(&self) -> Option<CatchUp> {
        let out = self.lock();
        (out.catch_up && !out.greeting && out.sink.attached()).then_some(CatchUp {
            after: out.last_durable,
            generation: out.catch_up_gen,
        })
    }

    /// Ends the catch-up `done` served. If another was asked for meanwhile, the session
    /// stays held ([`Released::StillHeld`]) and must be caught up again.
    pub(crate) fn finish_catch_up(&self, done: CatchUp) -> Released {
        let mut out = self.lock();
        if out.catch_up_gen != done.generation {
            return Released::StillHeld;
        }
        out.catch_up = false;
        if out.greeting {
            return Released::StillHeld;
        }
        self.release_parked(&mut out)
    }

    /// Releases the parked deliveries: drops live copies of what was sent meanwhile, and
    /// lets the rest go out in order.
    fn release_parked(&self, out: &mut Out) -> Released {
        let ready = std::mem::take(&mut out.ready);
        let done = out.last_durable;
        let mut dropped = 0usize;
        let mut newest = None;
        let mut i = 0usize;
        out.queue.retain(|m| {
            let parked = i >= ready;
            i += 1;
            if parked && matches!((m.id, done), (Some(id), Some(d)) if id <= d) {
                dropped += m.len();
                return false;
            }
            if parked && m.id > newest {
                newest = m.id;
            }
            true
        });
        self.queued_bytes.fetch_sub(dropped, Ordering::Relaxed);
        out.saw(newest);
        if out.queue.is_empty() {
            // Free what parking allocated: an idle session keeps no queue.
            out.queue = VecDeque::new();
            Released::Idle
        } else {
            self.start_backlog();
            Released::Backlog
        }
    }

    /// Drains the outbox as far as the socket allows (only the frames before the parked
    /// ones while held). `Ready(Ok)` once that is done or the session is detached;
    /// `Pending` with the waker registered for writability.
    pub(crate) fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.backlog.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        loop {
            let mut out = self.lock();
            let Some(sock) = out.sink.socket().cloned() else {
                return Poll::Ready(Ok(()));
            };
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

    /// Writes the writable frames, several per `writev`, until none is left (`true`) or the
    /// socket is full (`false`).
    fn drain(&self, out: &mut Out, sock: &TcpStream) -> io::Result<bool> {
        loop {
            let writable = out.writable();
            if writable == 0 {
                self.backlog.store(false, Ordering::Release);
                if out.queue.is_empty() && out.queue.capacity() > 64 {
                    // A burst grew the queue; an idle session should not keep that memory.
                    out.queue.shrink_to(0);
                }
                return Ok(true);
            }
            let batch = writable.min(WRITE_BATCH);
            let mut headers = [([0u8; codec::MAX_HEADER], 0usize); WRITE_BATCH];
            for (slot, m) in headers.iter_mut().zip(out.queue.iter().take(batch)) {
                *slot = codec::header(m.kind, m.payload.len());
            }
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 * batch);
            let mut skip = out.head_sent;
            for ((h, hl), m) in headers.iter().zip(out.queue.iter().take(batch)) {
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
            let held = out.held();
            let mut done = 0usize;
            let mut bytes = 0usize;
            for m in out.queue.iter() {
                let wire = codec::header(m.kind, m.payload.len()).1 + m.payload.len();
                if left < wire {
                    break;
                }
                left -= wire;
                done += 1;
                bytes += m.len();
            }
            out.head_sent = left;
            record_waits(out.queue.iter().take(done), mono_us());
            out.queue.drain(..done);
            if held {
                out.ready -= done;
            }
            self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Waits until the response body has taken every writable frame (a pull sink's
    /// `send_held`); a client that does not read them within `wait` is a slow consumer.
    async fn wait_taken(&self, drained: &Notify, wait: Duration) -> Result<(), CloseReason> {
        let taken = async {
            loop {
                let notified = drained.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                {
                    let out = self.lock();
                    if !out.sink.attached() {
                        return Err(CloseReason::ConnectionLost);
                    }
                    if out.ready == 0 || !out.held() {
                        return Ok(());
                    }
                }
                notified.await;
            }
        };
        match tokio::time::timeout(wait, taken).await {
            Ok(r) => r,
            Err(_) => Err(CloseReason::SlowConsumer),
        }
    }

    /// A pull sink's next writable frame, for the response body; `None` when there is none
    /// now (the caller registers its waker first: every push that makes a frame writable
    /// wakes it).
    pub(crate) fn take_next(&self) -> Option<Outgoing> {
        let mut out = self.lock();
        let Sink::Pull(drained) = &out.sink else {
            return None;
        };
        let drained = drained.clone();
        if out.writable() == 0 {
            return None;
        }
        let msg = out.queue.pop_front()?;
        record_waits(std::iter::once(&msg), mono_us());
        if out.held() {
            out.ready -= 1;
        }
        self.queued_bytes.fetch_sub(msg.len(), Ordering::Relaxed);
        self.progress_at.store(mono_ms(), Ordering::Relaxed);
        if out.writable() == 0 {
            self.backlog.store(false, Ordering::Release);
            if out.queue.is_empty() {
                out.queue = VecDeque::new();
            }
        }
        drop(out);
        drained.notify_waiters();
        Some(msg)
    }

    /// Wakes whoever waits on a pull sink (the SSE session task, a `send_held`): the
    /// session closed.
    pub(crate) fn notify_pull(&self) {
        if let Sink::Pull(n) = &self.lock().sink {
            n.notify_waiters();
        }
    }

    /// The pull sink's notification, to wait for a close or a drain.
    pub(crate) fn pull_notify(&self) -> Option<Arc<Notify>> {
        match &self.lock().sink {
            Sink::Pull(n) => Some(n.clone()),
            _ => None,
        }
    }

    /// The response body is gone: nothing more can be sent; queued frames are dropped.
    pub(crate) fn detach(&self) {
        let mut out = self.lock();
        if let Sink::Pull(drained) = std::mem::take(&mut out.sink) {
            drained.notify_waiters();
        }
        out.queue = VecDeque::new();
        out.ready = 0;
        self.queued_bytes.store(0, Ordering::Relaxed);
        self.backlog.store(false, Ordering::Release);
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
            out.greeting = false;
            out.catch_up = false;
            out.ready = 0;
            if let Some(m) = last {
                out.queue.push_back(m);
            }
            if !out.queue.is_empty() {
                self.start_backlog();
            }
        }
        let _ = tokio::time::timeout(wait, std::future::poll_fn(|cx| self.poll_flush(cx))).await;
        let mut out = self.lock();
        out.sink = Sink::Detached;
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
