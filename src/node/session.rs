//! One session's life around its socket loop: take the socket from hyper, register in the
//! hub, record presence, greet and replay, run the loop, then unregister and remove the
//! presence record.

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
use crate::transport::outbox::Released;
use crate::transport::replay;
use crate::transport::session::{self as session_loop, SessionParts};
use crate::transport::{Client, Outgoing};

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

/// What a session keeps while it is live.
struct LiveSession {
    info: SessionInfo,
    parts: SessionParts,
}

impl Node {
    /// Runs a session on an upgraded connection, from registration to presence removal.
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
            let (live, reason) = Box::pin(node.open_session(sock, request)).await;
            let reason = match reason {
                Some(r) => r,
                None => session_loop::run(&live.parts, reader).await,
            };
            Box::pin(node.close_session(live, reason)).await;
        });
    }

    /// Registers the session, records its presence and writes the welcome and any replay.
    /// Returns the session and, if it already ended, why.
    async fn open_session(
        &self,
        sock: TcpStream,
        request: SessionRequest,
    ) -> (Box<LiveSession>, Option<CloseReason>) {
        let sock = Arc::new(sock);
        let info = SessionInfo {
            id: Uuid::new_v4(),
            user: request.user.into(),
            topics: request.topics.into_iter().map(Arc::<str>::from).collect(),
            connected_at: unix_ms(),
        };
        let client = Arc::new(Client::held(sock.clone(), request.exp));
        let reg = self.hub.register(info.clone(), client.clone());
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
        let mut greeted = replay::greet(
            &client,
            &*self.engines.inbox,
            welcome,
            &info.user,
            request.since,
            limits,
        )
        .await
        .map(|start| client.finish_greeting(start));
        if greeted == Ok(Released::StillHeld) {
            // The subscription was rebuilt while the replay ran: what was published before
            // it came back may have been missed; catch up before going live.
            greeted = replay::catch_up(&client, &*self.engines.inbox, &info.user, limits)
                .await
                .map(|_| Released::Idle);
        }
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
        match greeted {
            Ok(_) => (live, None),
            Err(reason) => {
                client.close(reason);
                let last = (reason != CloseReason::ConnectionLost).then(|| Outgoing::close(reason));
                client.finish(last, Duration::from_millis(100)).await;
                (live, Some(reason))
            }
        }
    }

    /// Unregisters an ended session and removes its presence.
    async fn close_session(&self, live: Box<LiveSession>, reason: CloseReason) {
        let LiveSession { info, parts } = *live;
        drop(parts);
        let removed = self.hub.unregister(info.id);
        metrics::gauge!(m::CONNECTIONS).decrement(1.0);
        metrics::counter!(m::SESSIONS_CLOSED, "reason" => reason.label()).increment(1);
        if reason == CloseReason::SlowConsumer {
            metrics::counter!(m::SLOW_CONSUMERS).increment(1);
        }
        let last = removed.map(|r| r.last_of_user).unwrap_or(false);
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
