//! The HTTP accept loop. herald runs its own instead of `warp::serve` to set TCP_NODELAY
//! (small notification frames must not wait for Nagle), to bound what a connection may cost
//! before it has been answered (header size and time, the number of such connections), to
//! survive running out of file descriptors, and to shut HTTP connections down on demand.

use std::io::ErrorKind;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use crate::metrics as m;

/// A client must finish sending request headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error that handing back the spare descriptor did not cure, so the
/// loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// How long open HTTP (not WebSocket) connections get to finish after `shutdown`.
const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Refused connections whose request is read and discarded after the 503, so that closing
/// them does not reset the connection before the client has read the answer. Beyond this
/// many at once a refused connection is closed at once (its client may then see a reset).
pub(crate) const REFUSALS_IN_FLIGHT: usize = 32;
/// How long, and how many bytes, a refused connection is read from before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;

/// The answer to a connection over `--max-pending-connections` (or accepted only to be
/// closed because the process ran out of descriptors). Written by hand: such a connection
/// is never handed to hyper, which is the point.
const REFUSAL_503: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 86\r\n\
\r\n\
{\"error\":\"overloaded\",\"message\":\"too many connections are waiting; retry in a moment\"}";

/// What the accept loop enforces on every connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ListenerSettings {
    /// SO_SNDBUF on every accepted socket (see `--tcp-send-buffer`).
    pub(crate) send_buffer: Option<usize>,
    /// hyper's read buffer limit: a request head longer than this is answered 431.
    pub(crate) max_header_bytes: usize,
    /// Connections that have not had a request answered yet.
    pub(crate) max_pending: usize,
}

/// Serves `routes` on `listener` until `shutdown`, then finishes in-flight HTTP requests.
/// Upgraded WebSocket connections are not tracked here: the node owns and drains them.
pub(crate) async fn serve(
    listener: TcpListener,
    routes: BoxedFilter<(Response,)>,
    settings: ListenerSettings,
    shutdown: CancellationToken,
) {
    let conns = TaskTracker::new();
    let pending = Arc::new(Semaphore::new(settings.max_pending));
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
    let mut spare = Spare::open();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                on_accept_error(&listener, &e, &mut spare).await;
                continue;
            }
        };
        // Taken before anything else is done for the connection: over the cap it costs one
        // short write and a close, nothing that grows with what the client sends.
        let slot = match pending.clone().try_acquire_owned() {
            Ok(permit) => PendingSlot::new(permit),
            Err(_) => {
                refuse(stream, "pending", &refusals, &conns);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if let Some(bytes) = settings.send_buffer {
            if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(bytes) {
                tracing::debug!(error = %e, "cannot set SO_SNDBUF");
            }
        }
        let inner = TowerToHyperService::new(warp::service(routes.clone()));
        let abort = ConnAbort(CancellationToken::new());
        let tag = abort.clone();
        // The connection stops counting as pending once its first request is answered
        // (the 101 of an upgrade, the head of an SSE stream, any full response), or when it
        // closes, whichever comes first. A keep-alive connection between requests is not
        // pending: its next request head is still bounded by the header limit and timeout.
        let slot = Arc::new(Mutex::new(Some(slot)));
        let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            // Every request carries its connection's abort handle (see ConnAbort).
            req.extensions_mut().insert(tag.clone());
            let held = slot.lock().ok().and_then(|mut s| s.take());
            let answer = hyper::service::Service::call(&inner, req);
            async move {
                let res = answer.await;
                drop(held);
                res
            }
        });
        let stop = shutdown.clone();
        let max_header_bytes = settings.max_header_bytes;
        conns.spawn(async move {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                // A head that does not fit is answered 431 by hyper and the connection
                // closed; the buffer never grows past this (hyper's default is ~400 KB).
                .max_buf_size(max_header_bytes)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => log_conn_result(r),
                // Dropping the connection closes the socket, whatever hyper still buffers.
                _ = abort.0.cancelled() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        _ = conn => {}
                        _ = abort.0.cancelled() => {}
                    }
                }
            }
        });
    }
    drop(listener);
    conns.close();
    let _ = tokio::time::timeout(HTTP_SHUTDOWN_GRACE, conns.wait()).await;
}

/// One connection counted in `herald_connections_pending` until dropped.
struct PendingSlot(#[allow(dead_code)] OwnedSemaphorePermit);

impl PendingSlot {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        metrics::gauge!(m::CONNECTIONS_PENDING).increment(1.0);
        PendingSlot(permit)
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        metrics::gauge!(m::CONNECTIONS_PENDING).decrement(1.0);
    }
}

/// Answers a bare 503 and closes. The write cannot block: the socket was just accepted, so
/// its send buffer is empty. When a refusal slot is free the client's request is read and
/// discarded for a moment after the answer (and our side shut down), so that the close is
/// a FIN the client reads after the 503, not a reset that may discard it.
fn refuse(stream: TcpStream, reason: &'static str, refusals: &Arc<Semaphore>, conns: &TaskTracker) {
    metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => reason).increment(1);
    let _ = stream.try_write(REFUSAL_503);
    let Ok(permit) = refusals.clone().try_acquire_owned() else {
        return;
    };
    conns.spawn(async move {
        let mut stream = stream;
        let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            let mut buf = [0u8; 4096];
            let mut read = 0;
            while read < REFUSAL_DRAIN_BYTES {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n,
                }
            }
        })
        .await;
        drop(permit);
    });
}

/// A descriptor held in reserve (on /dev/null). When `accept` fails because the process
/// is out of descriptors, the connection stays in the backlog and the listener stays
/// readable: the loop would spin on it, and the client would wait for a timeout. Giving the
/// spare back lets the loop accept that one connection, answer it 503 and close it, then
/// take the spare again.
struct Spare(Option<std::fs::File>);

impl Spare {
    fn open() -> Self {
        Spare(std::fs::File::open("/dev/null").ok())
    }
}

async fn on_accept_error(listener: &TcpListener, e: &std::io::Error, spare: &mut Spare) {
    let out_of_fds = matches!(e.raw_os_error(), Some(code) if code == EMFILE || code == ENFILE);
    let kind = if out_of_fds { "no_fds" } else { "other" };
    metrics::counter!(m::ACCEPT_ERRORS, "kind" => kind).increment(1);
    if out_of_fds && spare.0.take().is_some() {
        // The connection that failed is still queued, so this accept does not wait; the
        // timeout only guards against another thread having taken it.
        if let Ok(Ok((stream, _))) =
            tokio::time::timeout(Duration::from_millis(10), listener.accept()).await
        {
            metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "no_fds").increment(1);
            let _ = stream.try_write(REFUSAL_503);
            drop(stream);
        }
        *spare = Spare::open();
        if spare.0.is_some() {
            return;
        }
    }
    if e.kind() != ErrorKind::WouldBlock {
        tracing::warn!(error = %e, "accept failed");
    }
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}

/// errno values of "too many open files" (per process and system-wide) on Linux.
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// Closes the HTTP connection a request came on, whatever state hyper is in. An SSE
/// session uses it when its client stopped reading: hyper then polls the response body no
/// more, so the session's end cannot travel through the body.
#[derive(Clone, Debug)]
pub(crate) struct ConnAbort(CancellationToken);

impl ConnAbort {
    pub(crate) fn abort(&self) {
        self.0.cancel();
    }
}

fn log_conn_result(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_complete_response() {
        let text = std::str::from_utf8(REFUSAL_503).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "overloaded");
    }
}
