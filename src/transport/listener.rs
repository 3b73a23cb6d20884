//! The HTTP accept loop. herald runs its own instead of `warp::serve` to set TCP_NODELAY
//! (small notification frames must not wait for Nagle), to bound slow header reads, to
//! survive running out of file descriptors, and to shut HTTP connections down on demand.

use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::filters::BoxedFilter;
use warp::reply::Response;

/// A client must finish sending request headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error (typically EMFILE) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// How long open HTTP (not WebSocket) connections get to finish after `shutdown`.
const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Serves `routes` on `listener` until `shutdown`, then finishes in-flight HTTP requests.
/// Upgraded WebSocket connections are not tracked here: the node owns and drains them.
/// `send_buffer` sets SO_SNDBUF on every accepted socket (see `--tcp-send-buffer`).
pub(crate) async fn serve(
    listener: TcpListener,
    routes: BoxedFilter<(Response,)>,
    send_buffer: Option<usize>,
    shutdown: CancellationToken,
) {
    let conns = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, _peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if let Some(bytes) = send_buffer {
            if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(bytes) {
                tracing::debug!(error = %e, "cannot set SO_SNDBUF");
            }
        }
        let inner = TowerToHyperService::new(warp::service(routes.clone()));
        let abort = ConnAbort(CancellationToken::new());
        let tag = abort.clone();
        // Every request carries its connection's abort handle (see ConnAbort).
        let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            req.extensions_mut().insert(tag.clone());
            hyper::service::Service::call(&inner, req)
        });
        let stop = shutdown.clone();
        conns.spawn(async move {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
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
