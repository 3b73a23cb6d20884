//! `GET /ws`: authenticates the token, checks the upgrade request and hands the connection
//! to the node. Done by hand so each connection gets a small read buffer (warp's `ws()`
//! allocates 128 KiB per socket and cannot be told otherwise).

use std::sync::Arc;

use http::header::{HeaderValue, AUTHORIZATION, CONNECTION, SEC_WEBSOCKET_ACCEPT, UPGRADE};
use http::{HeaderMap, Method, StatusCode};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::Filter;

use super::bodies::WsQuery;
use super::{error, with_api, Api};
use crate::metrics as m;
use crate::node::SessionRequest;
use crate::protocol::StreamId;

pub(super) fn route(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    warp::path("ws")
        .and(warp::path::end())
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::ext::optional::<hyper::upgrade::OnUpgrade>())
        .and(with_api(api))
        .map(upgrade)
        .boxed()
}

fn header_has(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn reject(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Response {
    metrics::counter!(m::UPGRADES_REJECTED, "reason" => reason).increment(1);
    error(status, reason, message)
}

/// Checks and performs the WebSocket upgrade.
fn upgrade(
    method: Method,
    headers: HeaderMap,
    query: String,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    api: Arc<Api>,
) -> Response {
    if method != Method::GET {
        let mut res = reject(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        );
        res.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("GET"));
        return res;
    }
    if api.node.is_draining() {
        return reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "node is draining; connect to another",
        );
    }
    let query: WsQuery = serde_urlencoded::from_str(&query).unwrap_or_default();
    let token = query.token.or_else(|| {
        headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string)
    });
    // Authentication comes before the upgrade checks so a bad token is always a 401.
    let who = match api
        .auth
        .verify(token.as_deref().unwrap_or(""), query.topics.as_deref())
    {
        Ok(who) => who,
        Err(e) => {
            metrics::counter!(m::UPGRADES_REJECTED, "reason" => e.label()).increment(1);
            return error(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string());
        }
    };
    let since = match query.since.as_deref().map(str::parse::<StreamId>) {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            return reject(
                StatusCode::BAD_REQUEST,
                "bad_since",
                "since must be an inbox id such as 1732530000000-0",
            )
        }
    };
    let key = headers.get("sec-websocket-key").cloned();
    let is_ws = header_has(&headers, CONNECTION, "upgrade")
        && header_has(&headers, UPGRADE, "websocket")
        && headers.get("sec-websocket-version").map(|v| v.as_bytes()) == Some(b"13");
    let (Some(key), Some(on_upgrade), true) = (key, on_upgrade, is_ws) else {
        return reject(
            StatusCode::BAD_REQUEST,
            "not_websocket",
            "expected a WebSocket upgrade (Connection: upgrade, Upgrade: websocket, Sec-WebSocket-Version: 13, Sec-WebSocket-Key)",
        );
    };
    let Some(admission) = api.node.admit() else {
        let mut res = reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "capacity",
            "node is at --max-connections",
        );
        res.headers_mut()
            .insert("retry-after", HeaderValue::from_static("5"));
        return res;
    };
    let request = SessionRequest {
        user: who.user,
        topics: who.topics,
        since,
    };
    api.node.spawn_session(on_upgrade, request, admission);

    let mut res = Response::new(Default::default());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(SEC_WEBSOCKET_ACCEPT, accept);
    }
    res
}
