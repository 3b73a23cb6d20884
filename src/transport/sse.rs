//! The SSE transport: the response body of `GET /sse`, an event stream that takes the
//! session's frames from its [`Client`] (the same hub, fan-out, bounded outbox, hold,
//! sweeper and drain as a WebSocket session) and writes each as one event:
//!
//! ```text
//! event: message
//! id: 1732530000000-0          (durable messages only: the browser's Last-Event-ID)
//! data: {"type":"message",...} (the same JSON object as the WebSocket frame)
//! ```
//!
//! Pings become `: keep-alive` comments, and the end of a session an `event: close` with the
//! WebSocket close code, before the stream ends. hyper writes the body, so an SSE session
//! costs hyper's connection buffers on top of a WebSocket session's (BENCHMARKS.md).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::oneshot;
use warp::sse::Event;

use super::client::{Client, Taken};
use super::codec::Kind;
use super::outbox::Outgoing;
use crate::protocol::CloseReason;

/// The event stream of one SSE session. Dropping it (the client left, or the stream
/// ended) detaches the session and tells its task.
pub(crate) struct SseStream {
    client: Arc<Client>,
    /// The `retry:` advice still to send first.
    retry: Option<Duration>,
    done: bool,
    /// Dropped with the stream: the session task waits for that.
    _ended: oneshot::Sender<()>,
}

impl SseStream {
    /// A stream for `client`, and what resolves when it is gone.
    pub(crate) fn new(client: Arc<Client>, retry: Duration) -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (
            SseStream {
                client,
                retry: Some(retry),
                done: false,
                _ended: tx,
            },
            rx,
        )
    }
}

impl Drop for SseStream {
    fn drop(&mut self) {
        self.client.detach();
    }
}

impl Stream for SseStream {
    type Item = Result<Event, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(retry) = self.retry.take() {
            return Poll::Ready(Some(Ok(Event::default().retry(retry))));
        }
        loop {
            return match self.client.poll_take(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Taken::Frame(m)) => match event(&m) {
                    Some(e) => Poll::Ready(Some(Ok(e))),
                    None => continue,
                },
                Poll::Ready(Taken::Closed(reason)) => {
                    self.done = true;
                    if reason == CloseReason::ConnectionLost {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Ok(close_event(reason))))
                    }
                }
            };
        }
    }
}

/// The event for one frame; `None` for frames SSE has no use for (pongs, close frames: the
/// stream's end carries the close).
fn event(m: &Outgoing) -> Option<Event> {
    match m.kind {
        Kind::Text => {
            let text = std::str::from_utf8(&m.payload).ok()?;
            let mut e = Event::default().event(frame_type(text)).data(text);
            if let Some(id) = m.id {
                e = e.id(id.to_string());
            }
            Some(e)
        }
        Kind::Ping => Some(Event::default().comment("keep-alive")),
        Kind::Pong | Kind::Close => None,
    }
}

/// The `type` of a server frame, read from its start: every frame herald builds begins with
/// `{"type":"<name>"`.
fn frame_type(text: &str) -> &str {
    text.strip_prefix(r#"{"type":""#)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("message")
}

/// The last event of a session: the WebSocket close code and reason a client acts on.
fn close_event(reason: CloseReason) -> Event {
    let data =
        serde_json::json!({"type": "close", "code": reason.code(), "reason": reason.label()});
    Event::default().event("close").data(data.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_the_frame_type_the_id_and_the_same_json() {
        let m = Outgoing::text(
            r#"{"type":"message","channel":"user:1","id":"5-1","data":1}"#.into(),
            Some("5-1".parse().unwrap()),
        );
        let text = event(&m).unwrap().to_string();
        assert!(text.contains("event:message\n"), "{text}");
        assert!(text.contains("id:5-1\n"), "{text}");
        assert!(
            text.contains(r#"data:{"type":"message","channel":"user:1","id":"5-1","data":1}"#),
            "{text}"
        );
        let w = Outgoing::text(r#"{"type":"welcome","session":"s"}"#.into(), None);
        let text = event(&w).unwrap().to_string();
        assert!(
            text.contains("event:welcome\n") && !text.contains("id:"),
            "{text}"
        );
        let ping = event(&Outgoing::control(Kind::Ping, bytes::Bytes::new())).unwrap();
        assert!(ping.to_string().starts_with(":keep-alive"), "{ping}");
        assert!(event(&Outgoing::control(Kind::Pong, bytes::Bytes::new())).is_none());
        let close = close_event(CloseReason::TokenExpired).to_string();
        assert!(close.contains("event:close\n"), "{close}");
        assert!(
            close.contains(r#""code":4003"#) && close.contains("token_expired"),
            "{close}"
        );
    }
}
