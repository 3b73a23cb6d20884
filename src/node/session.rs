//! One session's life, WebSocket or SSE: take the socket from hyper (WebSocket), register
//! in the hub, record presence, greet and replay, run the loop (or let the SSE response
//! body run), then unregister and remove the presence record.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::timeout;
use uuid::Uuid;

use super::{Admission, Node};
use crate::clock::unix_ms;
use crate::delivery::SessionInfo;
use crate::metrics as m;
use crate::protocol::{CloseReason, ServerFrame, StreamId};
use crate::transport::codec::FrameReader;
use crate::transport::listener::ConnAbort;
use crate::transport::outbox::Released;
use crate::transport::replay;
use crate::transport::session::{self as session_loop, SessionParts};
use crate::transport::sse::SseStream;
use crate::transport::{Client, Outgoing};

/// How long an ended SSE session's body gets to write its close event.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// The same for a slow consumer, which is owed no patient goodbye.
const SLOW_CLOSE_GRACE: Duration = Duration::from_millis(100);

/// How long a new session waits for its subscriptions before its welcome is sent anyway.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(5);

/// Who a new session belongs to, as the API authenticated it.
#[derive(Debug)]
pub(crate) struct SessionRequest {
    pub(crate) user: String,
    pub(crate) topics: Vec<String>,
    /// The token's expiry (Unix seconds; `None` in --dev).
    pub(crate) exp: Option<u64>,
    /// Replay durable messages after this id instead of after the read cursor.
    pub(crate) since: Option<StreamId>,
}

/// What a WebSocket session keeps while it is live.
struct LiveSession {
    info: SessionInfo,
    parts: SessionParts,
}

impl Node {
    /// Runs a WebSocket session on an upgraded connection, from registration to presence
    /// removal.
    ///
    /// The task's own state is what every idle session costs, so the setup (upgrade,
    /// registration, presence, welcome, replay) and the teardown run as boxed futures that
    /// exist only while they run, and the session's long-lived data is one exact-size box.
    pub(crate) fn spawn_session(
        self: &Arc<Self>,
        upgrade: hyper::upgrade::OnUpgrade,
        request: SessionRequest,
        admission: Admission,
    ) {
        let node = self.clone();
        self.sessions.spawn(async move {
            let _admission = admission;
            let Some((sock, reader)) = Box::pin(take_socket(upgrade)).await else {
                return;
            };
            let (live, reason) = Box::pin(node.open_ws_session(sock, request)).await;
            let reason = match reason {
                Some(r) => r,
                None => session_loop::run(&live.parts, reader).await,
            };
            let LiveSession { info, parts } = *live;
            drop(parts);
            Box::pin(node.close_session(info, reason)).await;
        });
    }

    /// Starts an SSE session: returns the response body's event stream at once (the
    /// welcome and replay go through it) and runs the session's registration, greeting and,
    /// once the stream has ended, its teardown in a task of its own.
    pub(crate) fn spawn_sse_session(
        self: &Arc<Self>,
        request: SessionRequest,
        admission: Admission,
        conn: Option<ConnAbort>,
    ) -> SseStream {
        let client = Arc::new(Client::pull(request.exp));
        let (stream, ended) = SseStream::new(client.clone(), self.config.sse_retry);
        let node = self.clone();
        self.sessions.spawn(async move {
            let _admission = admission;
            let (info, opened) = Box::pin(node.open(&client, request)).await;
            if let Err(reason) = opened {
                client.close(reason);
            }
            // The body ends when the client leaves, or after the session closed (drain,
            // kick, expiry, slow consumer) and the body wrote its close event. A client that
            // stopped reading never lets hyper poll the body again: its connection is cut.
            tokio::pin!(ended);
            tokio::select! {
                _ = &mut ended => {}
                () = client.closed() => {
                    let grace = if client.reason() == Some(CloseReason::SlowConsumer) {
                        SLOW_CLOSE_GRACE
                    } else {
                        CLOSE_GRACE
                    };
                    if timeout(grace, &mut ended).await.is_err() {
                        if let Some(conn) = &conn {
                            conn.abort();
                        }
                        let _ = ended.await;
                    }
                }
            }
            let reason = client.reason().unwrap_or(CloseReason::ConnectionLost);
            drop(client);
            Box::pin(node.close_session(info, reason)).await;
        });
        stream
    }

    /// Registers a WebSocket session and greets it; returns it and, if it already ended,
    /// why (the close frame has then been sent).
    async fn open_ws_session(
        &self,
        sock: TcpStream,
        request: SessionRequest,
    ) -> (Box<LiveSession>, Option<CloseReason>) {
        let sock = Arc::new(sock);
        let client = Arc::new(Client::held(sock.clone(), request.exp));
        let (info, opened) = self.open(&client, request).await;
        let live = Box::new(LiveSession {
            parts: SessionParts {
                sock,
                client: client.clone(),
                session: info.id,
                user: info.user.clone(),
                env: self.session_env.clone(),
            },
            info,
        });
        match opened {
            Ok(()) => (live, None),
            Err(reason) => {
                client.close(reason);
                let last = (reason != CloseReason::ConnectionLost).then(|| Outgoing::close(reason));
                client.finish(last, Duration::from_millis(100)).await;
                (live, Some(reason))
            }
        }
    }

    /// What every session does first, whatever its transport: registers it, records its
    /// presence and sends the welcome and any replay (catching up if the subscription was
    /// rebuilt meanwhile). Returns the session and whether it is live.
    async fn open(
        &self,
        client: &Arc<Client>,
        request: SessionRequest,
    ) -> (SessionInfo, Result<(), CloseReason>) {
        let info = SessionInfo {
            id: Uuid::new_v4(),
            user: request.user.into(),
            topics: request.topics.into_iter().map(Arc::<str>::from).collect(),
            connected_at: unix_ms(),
        };
        let Some(reg) = self.hub.register(
            info.clone(),
            client.clone(),
            self.config.max_sessions_per_user,
        ) else {
            // Connects of one user raced past the API's check: the cap is settled here, under
            // the hub's lock. The session was never registered, so it has no presence.
            metrics::counter!(m::UPGRADES_REJECTED, "reason" => "too_many_sessions").increment(1);
            return (info, Err(CloseReason::TooManySessions));
        };
        metrics::counter!(m::SESSIONS_OPENED).increment(1);
        metrics::gauge!(m::CONNECTIONS).increment(1.0);
        if let Err(e) = self.engines.presence.add(&info, reg.first_of_user).await {
            // The next heartbeat writes it; the session is not refused for a Redis blip.
            tracing::warn!(error = %e, "presence add failed");
            self.engines.reset_connections();
            metrics::counter!(m::REDIS_ERRORS, "op" => "presence_add").increment(1);
        }
        let _ = timeout(SUBSCRIBE_WAIT, reg.subscribed).await;

        let session_id = info.id.to_string();
        let welcome = |unread| {
            ServerFrame::Welcome {
                session: &session_id,
                user: &info.user,
                node: &self.node_id,
                unread,
                exp: request.exp,
            }
            .to_text()
        };
        let limits = self.replay_limits();
        let greeted = replay::greet(
            client,
            &*self.engines.inbox,
            welcome,
            &info.user,
            request.since,
            limits,
        )
        .await
        .map(|start| client.finish_greeting(start));
        let opened = match greeted {
            // The subscription was rebuilt while the replay ran: what was published before
            // it came back may have been missed; catch up before going live.
            Ok(Released::StillHeld) => {
                replay::catch_up(client, &*self.engines.inbox, &info.user, limits)
                    .await
                    .map(|_| ())
            }
            Ok(_) => Ok(()),
            Err(reason) => Err(reason),
        };
        (info, opened)
    }

    /// Unregisters an ended session and removes its presence.
    async fn close_session(&self, info: SessionInfo, reason: CloseReason) {
        let Some(removed) = self.hub.unregister(info.id) else {
            // Refused at registration: nothing to undo.
            return;
        };
        metrics::gauge!(m::CONNECTIONS).decrement(1.0);
        metrics::counter!(m::SESSIONS_CLOSED, "reason" => reason.label()).increment(1);
        if reason == CloseReason::SlowConsumer {
            metrics::counter!(m::SLOW_CONSUMERS).increment(1);
        }
        let last = removed.last_of_user;
        let offline_reason = match reason {
            CloseReason::Kicked => "kicked",
            CloseReason::Draining => "drained",
            _ => "closed",
        };
        if let Err(e) = self
            .engines
            .presence
            .remove(&info, last, offline_reason)
            .await
        {
            tracing::debug!(error = %e, "presence remove failed; the entry will expire");
            self.engines.reset_connections();
            metrics::counter!(m::REDIS_ERRORS, "op" => "presence_remove").increment(1);
        }
        tracing::debug!(session = %info.id, user = %info.user, reason = reason.label(), "session closed");
    }
}

/// Takes the TCP stream back from hyper once the 101 response is out, with a frame reader
/// holding any bytes the client sent past the handshake. herald's accept loop serves
/// `TokioIo<TcpStream>`, so the downcast fails only if that changes; such a connection is
/// refused and counted.
async fn take_socket(upgrade: hyper::upgrade::OnUpgrade) -> Option<(TcpStream, FrameReader)> {
    let upgraded = match upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            metrics::counter!(m::UPGRADES_REJECTED, "reason" => "upgrade_failed").increment(1);
            return None;
        }
    };
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        // The leftover bytes are copied out: hyper's `read_buf` is a view of its whole
        // connection read buffer (8 KiB), which holding would keep alive per session.
        Ok(parts) => Some((
            parts.io.into_inner(),
            FrameReader::with_bytes(&parts.read_buf),
        )),
        Err(_) => {
            tracing::error!("upgraded connection is not a TCP stream; closing it");
            metrics::counter!(m::UPGRADES_REJECTED, "reason" => "not_tcp").increment(1);
            None
        }
    }
}
