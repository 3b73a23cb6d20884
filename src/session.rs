//! One connection's loop: reads client frames, drains the bounded outbox to the socket,
//! pings, enforces the idle timeout, and closes with a documented code when told to.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{interval_at, timeout, Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::hub::SessionControl;
use crate::inbox::{Inbox, StreamId};
use crate::metrics as m;
use crate::protocol::{parse_client_frame, ClientFrame, CloseReason, ServerFrame};

/// Timing and size limits of a session loop.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
}

/// Most queued messages written before one flush.
const WRITE_BATCH: usize = 64;
/// How long a closing handshake may take before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Lets a session move its user's inbox read cursor when the client acknowledges.
#[derive(Clone)]
pub struct Acker {
    pub inbox: Inbox,
    pub user: Arc<str>,
}

/// Everything the loop needs besides the socket.
pub struct SessionParts {
    /// Holds the outbox too.
    pub ctl: Arc<SessionControl>,
    pub limits: SessionLimits,
    /// Durable messages up to this id were already replayed; live copies are dropped.
    pub replayed_up_to: Option<StreamId>,
    pub acker: Option<Acker>,
}

/// Runs the session until it ends and returns why. The caller has registered it and sent
/// the welcome (and any replay).
pub async fn run<S>(ws: WebSocketStream<S>, parts: SessionParts) -> CloseReason
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let SessionParts {
        ctl,
        limits,
        replayed_up_to,
        acker,
    } = parts;
    let (mut sink, mut stream) = ws.split();
    let mut last_heard = Instant::now();
    let mut ticker = interval_at(Instant::now() + limits.ping_interval, limits.ping_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut reason = None;

    while reason.is_none() {
        tokio::select! {
            biased;
            _ = ctl.closed() => {
                reason = Some(ctl.reason().unwrap_or(CloseReason::Internal));
            }
            _ = ctl.ready() => {
                // Feed what is already queued, then flush once: one syscall for a burst.
                let batch = ctl.take(WRITE_BATCH);
                if batch.is_empty() {
                    continue;
                }
                let write = async {
                    for m in batch {
                        // A live copy of an entry the replay already delivered.
                        if m.id.is_some() && m.id <= replayed_up_to {
                            continue;
                        }
                        sink.feed(Message::Text(m.text)).await?;
                    }
                    sink.flush().await
                };
                tokio::pin!(write);
                // Fast path: a socket with room completes the write on the first poll, so
                // no timer and no cancellation waiter are set up for it. That is nearly
                // every write, and a broadcast does thousands of them back to back.
                let result = match futures_util::FutureExt::now_or_never(&mut write) {
                    Some(r) => Some(Ok(r)),
                    None => tokio::select! {
                        biased;
                        _ = ctl.closed() => None,
                        r = timeout(limits.write_timeout, &mut write) => Some(r),
                    },
                };
                match result {
                    None => reason = Some(ctl.reason().unwrap_or(CloseReason::Internal)),
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(_))) => reason = Some(CloseReason::ConnectionLost),
                    Some(Err(_)) => {
                        // Counted once, by the node, like every SlowConsumer ending.
                        ctl.close(CloseReason::SlowConsumer);
                        reason = Some(CloseReason::SlowConsumer);
                    }
                }
            }
            frame = stream.next() => {
                last_heard = Instant::now();
                match frame {
                    None => reason = Some(CloseReason::ConnectionLost),
                    Some(Ok(Message::Text(text))) => match parse_client_frame(text.as_str()) {
                        ClientFrame::LegacyHeartbeat => {
                            metrics::counter!(m::CLIENT_FRAMES, "kind" => "heartbeat").increment(1);
                        }
                        ClientFrame::Ping => {
                            metrics::counter!(m::CLIENT_FRAMES, "kind" => "ping").increment(1);
                            if !reply(&mut sink, ServerFrame::Pong.to_text(), limits.write_timeout).await {
                                reason = Some(CloseReason::ConnectionLost);
                            }
                        }
                        ClientFrame::Ack(id) => {
                            metrics::counter!(m::CLIENT_FRAMES, "kind" => "ack").increment(1);
                            let stored = match &acker {
                                // Boxed: the Redis future is large and would otherwise size
                                // every idle session's task.
                                Some(a) => matches!(
                                    timeout(limits.write_timeout, Box::pin(a.inbox.ack(&a.user, id))).await,
                                    Ok(Ok(_))
                                ),
                                None => false,
                            };
                            if !stored {
                                let text = ServerFrame::Error { error: "ack_failed" }.to_text();
                                if !reply(&mut sink, text, limits.write_timeout).await {
                                    reason = Some(CloseReason::ConnectionLost);
                                }
                            }
                        }
                        ClientFrame::Unknown(kind) => {
                            metrics::counter!(m::CLIENT_FRAMES, "kind" => kind).increment(1);
                            let text = ServerFrame::Error { error: kind }.to_text();
                            if !reply(&mut sink, text, limits.write_timeout).await {
                                reason = Some(CloseReason::ConnectionLost);
                            }
                        }
                    },
                    Some(Ok(Message::Binary(_))) => {
                        metrics::counter!(m::CLIENT_FRAMES, "kind" => "binary").increment(1);
                        reason = Some(CloseReason::Binary);
                    }
                    Some(Ok(Message::Close(_))) => reason = Some(CloseReason::ClientClosed),
                    // Pings are answered by tungstenite as part of reading; pongs only
                    // prove liveness, which `last_heard` already recorded.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Err(e)) => reason = Some(classify(&e)),
                }
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() >= limits.idle_timeout {
                    reason = Some(CloseReason::IdleTimeout);
                } else if !matches!(
                    timeout(limits.write_timeout, sink.send(Message::Ping(Default::default()))).await,
                    Ok(Ok(()))
                ) {
                    reason = Some(CloseReason::ConnectionLost);
                }
            }
        }
    }
    // safe: the loop only exits once `reason` is set.
    let reason = reason.unwrap_or(CloseReason::Internal);

    // Stop deliveries and free queued messages before the (possibly slow) close handshake.
    ctl.close(reason);
    ctl.discard();
    if !matches!(
        reason,
        CloseReason::ClientClosed | CloseReason::ConnectionLost
    ) {
        let frame = CloseFrame {
            code: CloseCode::from(reason.code()),
            reason: reason.label().into(),
        };
        // A slow consumer is not owed a patient goodbye; its buffers go now.
        let wait = if reason == CloseReason::SlowConsumer {
            Duration::from_millis(100)
        } else {
            CLOSE_TIMEOUT
        };
        let _ = timeout(wait, sink.send(Message::Close(Some(frame)))).await;
    } else if reason == CloseReason::ClientClosed {
        // Complete the closing handshake the client started.
        let _ = timeout(CLOSE_TIMEOUT, sink.close()).await;
    }
    reason
}

async fn reply<K>(sink: &mut K, text: String, wait: Duration) -> bool
where
    K: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    matches!(
        timeout(wait, sink.send(Message::text(text))).await,
        Ok(Ok(()))
    )
}

fn classify(e: &WsError) -> CloseReason {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => CloseReason::TooBig,
        WsError::Utf8(_) => CloseReason::InvalidUtf8,
        WsError::Protocol(_) => CloseReason::Protocol,
        _ => CloseReason::ConnectionLost,
    }
}
