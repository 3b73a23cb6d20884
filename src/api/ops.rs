//! Operations routes: `/healthz` (the process runs), `/readyz` (route traffic here) and
//! `/metrics` (Prometheus text; on its own listener with `--metrics-listen`).

use std::sync::Arc;

use http::header::CONTENT_TYPE;
use http::StatusCode;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::{json, with_api, Api};

pub(super) fn routes(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::with_header("ok\n", CONTENT_TYPE, "text/plain").into_response());
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_api(api.clone()))
        .map(|api: Arc<Api>| {
            let status = api.node.ready_status();
            let code = if status.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(code, &status)
        });
    let routes = healthz.or(readyz).unify();
    if api.node.config().metrics_listen.is_some() {
        // /metrics has its own listener; here it is an unknown path (404).
        return routes.boxed();
    }
    routes.or(metrics(api)).unify().boxed()
}

/// `GET /metrics`: the Prometheus text.
pub(super) fn metrics(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    warp::path!("metrics")
        .and(warp::get())
        .and(with_api(api))
        .map(|api: Arc<Api>| {
            warp::reply::with_header(
                api.node.render_metrics(),
                CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )
            .into_response()
        })
        .boxed()
}
