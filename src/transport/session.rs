//! One connection's loop: reads and answers client frames, drains the outbox when the
//! socket was busy, and closes with a documented code when told to.
//!
//! The loop is a single `poll_fn` over state kept outside any `select!`, so an idle session
//! costs a few hundred bytes: no read buffer (reads go to a per-thread scratch buffer), no
//! timer (the node's sweeper sends pings and enforces timeouts), no wake-up per delivered
//! message (deliveries write to the socket themselves; see `outbox`).

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;

use super::client::Client;
use super::codec::{self, FrameReader, Incoming, Kind};
use super::outbox::{OutboxLimits, Outgoing};
use super::replay::InboxPort;
use super::throttle::{FrameRate, Throttle};
use crate::auth::Authenticator;
use crate::clock::mono_us;
use crate::metrics as m;
use crate::protocol::{parse_client_frame, ClientFrame, CloseReason, ServerFrame};

/// How long a closing handshake may take before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Reads handled in one poll before the loop yields to other tasks.
const READS_PER_POLL: usize = 16;

thread_local! {
    /// Read scratch space, one per worker thread instead of one per connection.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Everything the loop needs.
pub(crate) struct SessionParts {
    pub(crate) sock: Arc<TcpStream>,
    pub(crate) client: Arc<Client>,
    /// The session's id (what an ack names as the reader, so the user's other sessions
    /// are told and this one is not).
    pub(crate) session: uuid::Uuid,
    pub(crate) user: Arc<str>,
    /// What every session of the node shares.
    pub(crate) env: Arc<SessionEnv>,
}

/// Settings and handles every session of a node shares (one allocation per node, not a
/// copy per session).
pub(crate) struct SessionEnv {
    pub(crate) outbox: OutboxLimits,
    /// Largest client message accepted.
    pub(crate) max_message: usize,
    /// Bytes read per `read` call (the per-thread scratch buffer's size).
    pub(crate) read_chunk: usize,
    /// Bounds an inbox acknowledgement's Redis call.
    pub(crate) ack_timeout: Duration,
    /// Where acknowledgements go (the user's inbox read cursor).
    pub(crate) inbox: Arc<dyn InboxPort>,
    /// Verifies the tokens a client sends to refresh its session.
    pub(crate) auth: Arc<Authenticator>,
    /// How fast a client may send frames (`--client-frame-rate`, `--client-frame-burst`).
    pub(crate) frame_rate: FrameRate,
}

type Pending = Option<Pin<Box<dyn Future<Output = ()> + Send>>>;

/// What the loop keeps between polls.
struct LoopState {
    /// Reading waits for this: an acknowledgement being stored, or a pause for a client
    /// that sent faster than its frame rate.
    pending: Pending,
    /// The close frame that answers the client's, once it sent one.
    echo: Option<Outgoing>,
    /// The client's frame rate so far.
    throttle: Throttle,
}

/// Runs the session until it ends and returns why. The caller has registered it, sent the
/// welcome (and any replay) and released the hold. `reader` may hold bytes the client sent
/// before the upgrade completed.
pub(crate) async fn run(parts: &SessionParts, reader: FrameReader) -> CloseReason {
    let mut reader = reader;
    let mut state = LoopState {
        pending: None,
        echo: None,
        throttle: Throttle::default(),
    };
    let reason = poll_fn(|cx| poll_session(parts, &mut reader, &mut state, cx)).await;
    let LoopState { pending, echo, .. } = state;
    drop(pending);
    parts.client.close(reason);
    let last = match reason {
        CloseReason::ConnectionLost => None,
        // Complete the closing handshake the client started.
        CloseReason::ClientClosed => echo,
        r => Some(Outgoing::close(r)),
    };
    // A slow consumer is not owed a patient goodbye; its buffers go now.
    let wait = if reason == CloseReason::SlowConsumer {
        Duration::from_millis(100)
    } else {
        CLOSE_TIMEOUT
    };
    Box::pin(parts.client.finish(last, wait)).await;
    reason
}

fn poll_session(
    parts: &SessionParts,
    reader: &mut FrameReader,
    state: &mut LoopState,
    cx: &mut Context<'_>,
) -> Poll<CloseReason> {
    let ctl = &parts.client;
    ctl.register(cx.waker());
    let mut reads = 0;
    loop {
        if let Some(r) = ctl.reason() {
            return Poll::Ready(r);
        }
        if let Some(f) = state.pending.as_mut() {
            if f.as_mut().poll(cx).is_ready() {
                state.pending = None;
            }
        }
        if let Poll::Ready(Err(_)) = ctl.poll_flush(cx) {
            return Poll::Ready(CloseReason::ConnectionLost);
        }
        if state.pending.is_some() {
            // An acknowledgement is in flight, or the client is over its rate: read
            // nothing more until it is stored, or the pause is over.
            return Poll::Pending;
        }
        if reader.has_partial() {
            // Frames left over when the last read stopped early (an ack started).
            if let Some(r) = handle(parts, reader, &[], state) {
                return Poll::Ready(r);
            }
            if state.pending.is_some() {
                continue;
            }
        }
        if reads == READS_PER_POLL {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match parts.sock.poll_read_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(CloseReason::ConnectionLost),
            Poll::Ready(Ok(())) => {}
        }
        reads += 1;
        let read = SCRATCH.with(|s| {
            let mut buf = s.borrow_mut();
            if buf.len() != parts.env.read_chunk {
                buf.resize(parts.env.read_chunk, 0);
            }
            match parts.sock.try_read(&mut buf) {
                Ok(0) => Err(CloseReason::ConnectionLost),
                Ok(n) => {
                    ctl.heard();
                    match handle(parts, reader, &buf[..n], state) {
                        Some(r) => Err(r),
                        None => Ok(()),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                Err(_) => Err(CloseReason::ConnectionLost),
            }
        });
        if let Err(r) = read {
            return Poll::Ready(r);
        }
    }
}

/// Feeds read bytes to the frame reader and acts on each frame. Returns why the session
/// must end, if it must.
fn handle(
    parts: &SessionParts,
    reader: &mut FrameReader,
    data: &[u8],
    state: &mut LoopState,
) -> Option<CloseReason> {
    let mut end = None;
    let LoopState {
        pending,
        echo,
        throttle,
    } = state;
    let fed = reader.feed(data, parts.env.max_message, |frame| {
        // Every frame the client chose to send counts against its rate; pongs answer the
        // node's own pings and a close ends the session anyway.
        let counted = !matches!(frame, Incoming::Pong | Incoming::Close(_));
        let go = on_frame(parts, frame, pending, echo, &mut end);
        if counted {
            if let Some(pause) = throttle.take(&parts.env.frame_rate, mono_us()) {
                metrics::counter!(m::CLIENT_FRAMES_THROTTLED).increment(1);
                let before = pending.take();
                *pending = Some(Box::pin(async move {
                    if let Some(f) = before {
                        f.await;
                    }
                    tokio::time::sleep(pause).await;
                }));
                return false;
            }
        }
        go
    });
    match fed {
        Err(e) => Some(e.into()),
        Ok(()) => end,
    }
}

/// Acts on one client frame; returns whether to go on reading.
fn on_frame(
    parts: &SessionParts,
    frame: Incoming<'_>,
    pending: &mut Pending,
    echo: &mut Option<Outgoing>,
    end: &mut Option<CloseReason>,
) -> bool {
    let ctl = &parts.client;
    match frame {
        Incoming::Text(text) => match parse_client_frame(text) {
            ClientFrame::LegacyHeartbeat => {
                metrics::counter!(m::CLIENT_FRAMES, "kind" => "heartbeat").increment(1);
                true
            }
            ClientFrame::Ping => {
                metrics::counter!(m::CLIENT_FRAMES, "kind" => "ping").increment(1);
                ctl.offer(
                    &Outgoing::text(ServerFrame::Pong.to_text(), None),
                    parts.env.outbox,
                );
                true
            }
            ClientFrame::Ack(id) => {
                metrics::counter!(m::CLIENT_FRAMES, "kind" => "ack").increment(1);
                let ctl = ctl.clone();
                let (limits, wait) = (parts.env.outbox, parts.env.ack_timeout);
                let (inbox, user) = (parts.env.inbox.clone(), parts.user.clone());
                let session = parts.session.to_string();
                *pending = Some(Box::pin(async move {
                    let stored = matches!(
                        timeout(wait, inbox.ack(&user, id, Some(&session))).await,
                        Ok(Ok(_))
                    );
                    if !stored {
                        let text = ServerFrame::Error {
                            error: "ack_failed",
                            reason: None,
                        }
                        .to_text();
                        ctl.offer(&Outgoing::text(text, None), limits);
                    }
                }));
                // Stop here; the rest is read once the cursor is stored, in order.
                false
            }
            ClientFrame::Refresh(token) => {
                metrics::counter!(m::CLIENT_FRAMES, "kind" => "refresh").increment(1);
                let text = match parts.env.auth.verify_refresh(&token, &parts.user) {
                    Ok(exp) => {
                        ctl.refreshed(exp);
                        ServerFrame::Refreshed { exp }.to_text()
                    }
                    Err(e) => ServerFrame::Error {
                        error: "refresh_failed",
                        reason: Some(e.label()),
                    }
                    .to_text(),
                };
                ctl.offer(&Outgoing::text(text, None), parts.env.outbox);
                true
            }
            ClientFrame::Unknown(kind) => {
                metrics::counter!(m::CLIENT_FRAMES, "kind" => kind).increment(1);
                let text = ServerFrame::Error {
                    error: kind,
                    reason: None,
                }
                .to_text();
                ctl.offer(&Outgoing::text(text, None), parts.env.outbox);
                true
            }
        },
        Incoming::Binary => {
            metrics::counter!(m::CLIENT_FRAMES, "kind" => "binary").increment(1);
            *end = Some(CloseReason::Binary);
            false
        }
        Incoming::Ping(payload) => {
            ctl.offer(
                &Outgoing::control(Kind::Pong, payload.to_vec()),
                parts.env.outbox,
            );
            true
        }
        // Pongs only prove liveness, which reading them already recorded.
        Incoming::Pong => true,
        Incoming::Close(code) => {
            *echo = Some(match code {
                None => Outgoing::control(Kind::Close, Vec::new()),
                Some(c) if valid_close_code(c) => {
                    Outgoing::control(Kind::Close, codec::close_payload(c, ""))
                }
                Some(_) => Outgoing::close(CloseReason::Protocol),
            });
            *end = Some(CloseReason::ClientClosed);
            false
        }
    }
}

/// Close codes a peer may send (RFC 6455 7.4).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}
