//! Where sessions start: `GET /ws` authenticates the token, checks the upgrade request and
//! hands the connection to the node (done by hand so each connection gets a small read
//! buffer: warp's `ws()` allocates 128 KiB per socket and cannot be told otherwise), and
//! `GET /sse` starts the same session over a server-sent event stream, with `POST /ack`
//! for its acknowledgements.

use std::sync::Arc;

use http::header::{
    HeaderValue, AUTHORIZATION, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, Method, StatusCode};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::Filter;

use bytes::Bytes;
use warp::Reply;

use super::bodies::{AckResponse, ClientAckBody, WsQuery};
use super::{bad_request, body_limited, count, error, json, unavailable, with_api, Api};

/// The largest `POST /ack` body: an inbox id and a session id fit many times over.
const ACK_BODY_MAX: usize = 4096;
use crate::auth::bearer;
use crate::metrics as m;
use crate::node::{Admission, Refusal, SessionRequest};
use crate::protocol::StreamId;
use crate::transport::listener::ConnAbort;

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
    // Authentication comes before the upgrade checks so a bad token is always a 401.
    let request = match start(&api, &headers, &query, None) {
        Ok(r) => r,
        Err(res) => return *res,
    };
    let (key, on_upgrade) = match handshake(&headers, on_upgrade) {
        Ok(checked) => checked,
        Err(res) => return *res,
    };
    let admission = match admit(&api, &request.user) {
        Ok(a) => a,
        Err(res) => return *res,
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

/// Checks the handshake headers RFC 6455 4.2.1 requires and returns the client's key. A
/// version other than 13 gets 426 and a missing one 400, both with `Sec-WebSocket-Version:
/// 13` (4.2.2: the versions the server speaks); a key that is missing, repeated, or not
/// the base64 of 16 bytes gets 400.
fn handshake(
    headers: &HeaderMap,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Result<(HeaderValue, hyper::upgrade::OnUpgrade), Box<Response>> {
    let on_upgrade = match on_upgrade {
        Some(u)
            if header_has(headers, CONNECTION, "upgrade")
                && header_has(headers, UPGRADE, "websocket") =>
        {
            u
        }
        _ => {
            return Err(Box::new(with_version(reject(
            StatusCode::BAD_REQUEST,
            "not_websocket",
            "expected a WebSocket upgrade (Connection: upgrade, Upgrade: websocket, Sec-WebSocket-Version: 13, Sec-WebSocket-Key)",
            ))))
        }
    };
    let versions: Vec<&HeaderValue> = headers.get_all(SEC_WEBSOCKET_VERSION).iter().collect();
    match versions.as_slice() {
        [v] if v.as_bytes() == b"13" => {}
        [] => {
            return Err(Box::new(with_version(reject(
                StatusCode::BAD_REQUEST,
                "bad_version",
                "Sec-WebSocket-Version is missing; this server speaks version 13",
            ))))
        }
        _ => {
            return Err(Box::new(with_version(reject(
                StatusCode::UPGRADE_REQUIRED,
                "bad_version",
                "unsupported Sec-WebSocket-Version; this server speaks version 13",
            ))))
        }
    }
    let keys: Vec<&HeaderValue> = headers.get_all(SEC_WEBSOCKET_KEY).iter().collect();
    match keys.as_slice() {
        [key] if valid_key(key.as_bytes()) => Ok(((*key).clone(), on_upgrade)),
        [] => Err(Box::new(with_version(reject(
            StatusCode::BAD_REQUEST,
            "bad_key",
            "Sec-WebSocket-Key is missing",
        )))),
        [_] => Err(Box::new(with_version(reject(
            StatusCode::BAD_REQUEST,
            "bad_key",
            "Sec-WebSocket-Key must be the base64 of 16 random bytes",
        )))),
        _ => Err(Box::new(with_version(reject(
            StatusCode::BAD_REQUEST,
            "bad_key",
            "Sec-WebSocket-Key must be sent once",
        )))),
    }
}

/// RFC 6455 4.1: the key is a nonce of 16 bytes, base64-encoded (24 characters).
fn valid_key(key: &[u8]) -> bool {
    use base64::Engine;
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|nonce| nonce.len() == 16)
}

/// Adds the `Sec-WebSocket-Version` a refused handshake must carry (RFC 6455 4.2.2).
fn with_version(mut res: Response) -> Response {
    res.headers_mut()
        .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    res
}

/// The client's token: an `Authorization: Bearer` header wins over the `token` query
/// parameter (headers stay out of access logs), and an empty parameter counts as none.
pub(super) fn client_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .or(query.filter(|t| !t.is_empty()))
        .map(str::to_string)
}

/// What starting any session checks: the node is not draining, the token is valid, `since`
/// (or, for SSE, the `Last-Event-ID` the browser resends) is an inbox id.
fn start(
    api: &Api,
    headers: &HeaderMap,
    query: &str,
    last_event_id: Option<&str>,
) -> Result<SessionRequest, Box<Response>> {
    if api.node.is_draining() {
        return Err(Box::new(reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "node is draining; connect to another",
        )));
    }
    let query: WsQuery = serde_urlencoded::from_str(query).unwrap_or_default();
    let token = client_token(headers, query.token.as_deref());
    let who = api
        .auth
        .verify(token.as_deref().unwrap_or(""), query.topics.as_deref())
        .map_err(|e| {
            metrics::counter!(m::UPGRADES_REJECTED, "reason" => e.label()).increment(1);
            Box::new(error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                e.to_string(),
            ))
        })?;
    let since = match last_event_id
        .filter(|id| !id.is_empty())
        .or(query.since.as_deref())
        .map(str::parse::<StreamId>)
    {
        None => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            return Err(Box::new(reject(
                StatusCode::BAD_REQUEST,
                "bad_since",
                "since (or Last-Event-ID) must be an inbox id such as 1732530000000-0",
            )))
        }
    };
    Ok(SessionRequest {
        user: who.user,
        topics: who.topics,
        exp: who.exp,
        since,
    })
}

/// A session slot for `user`, or the refusal: 503 when the node is full, 429 when the user
/// has --max-sessions-per-user sessions here.
fn admit(api: &Api, user: &str) -> Result<Admission, Box<Response>> {
    let (status, reason, message, retry) = match api.node.admit(user) {
        Ok(a) => return Ok(a),
        Err(Refusal::Full) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "capacity",
            "node is at --max-connections",
            "5",
        ),
        Err(Refusal::TooManySessions) => (
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_sessions",
            "this user has --max-sessions-per-user sessions on this node; close one first",
            "10",
        ),
    };
    let mut res = reject(status, reason, message);
    res.headers_mut()
        .insert("retry-after", HeaderValue::from_static(retry));
    Err(Box::new(res))
}

/// `GET /sse`: the session as a server-sent event stream.
pub(super) fn sse_route(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    warp::path("sse")
        .and(warp::path::end())
        .and(warp::get())
        .and(warp::header::headers_cloned())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::ext::optional::<ConnAbort>())
        .and(with_api(api))
        .map(
            |headers: HeaderMap, query: String, conn: Option<ConnAbort>, api: Arc<Api>| {
                let last = headers
                    .get("last-event-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let request = match start(&api, &headers, &query, last.as_deref()) {
                    Ok(r) => r,
                    Err(res) => return *res,
                };
                let admission = match admit(&api, &request.user) {
                    Ok(a) => a,
                    Err(res) => return *res,
                };
                let stream = api.node.spawn_sse_session(request, admission, conn);
                let mut res = warp::sse::reply(stream).into_response();
                // nginx buffers proxied responses unless told otherwise; events must flow.
                res.headers_mut()
                    .insert("x-accel-buffering", HeaderValue::from_static("no"));
                res
            },
        )
        .boxed()
}

/// `POST /ack`: an SSE client's acknowledgement, with the user's own token.
pub(super) fn ack_route(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    warp::path("ack")
        .and(warp::path::end())
        .and(warp::post())
        .and(warp::header::headers_cloned())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(body_limited(ACK_BODY_MAX, api.node.config().body_timeout))
        .and(with_api(api))
        .then(
            |headers: HeaderMap, query: String, body: Bytes, api: Arc<Api>| async move {
                count("ack", client_ack(&headers, &query, &body, &api).await)
            },
        )
        .boxed()
}

async fn client_ack(headers: &HeaderMap, query: &str, body: &[u8], api: &Api) -> Response {
    let query: WsQuery = serde_urlencoded::from_str(query).unwrap_or_default();
    let token = client_token(headers, query.token.as_deref());
    let who = match api.auth.verify(token.as_deref().unwrap_or(""), None) {
        Ok(who) => who,
        Err(e) => return error(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
    };
    if let Err(retry) = api.ack_limit.check(&who.user) {
        metrics::counter!(m::ACKS_THROTTLED).increment(1);
        let mut res = error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            "acknowledgements above --client-frame-rate; send the newest id after Retry-After",
        );
        res.headers_mut()
            .insert("retry-after", HeaderValue::from(retry));
        return res;
    }
    let Ok(ack) = serde_json::from_slice::<ClientAckBody>(body) else {
        return bad_request(r#"body must be {"id":"<inbox id>"[,"session":"<session id>"]}"#);
    };
    let Ok(id) = ack.id.parse::<StreamId>() else {
        return bad_request("id must be an inbox id such as 1732530000000-0");
    };
    match api
        .node
        .inbox_ack(&who.user, id, ack.session.as_deref())
        .await
    {
        Ok(acked) => json(StatusCode::OK, &AckResponse::from(acked)),
        Err(e) => unavailable(api, "client_ack", &e),
    }
}
