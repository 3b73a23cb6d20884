//! Every warp filter: the WebSocket upgrade, the producer API, health and metrics, and the
//! one `recover` that turns rejections into JSON errors.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::join_all;
use http::header::{
    HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, UPGRADE,
};
use http::{HeaderMap, Method, StatusCode};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::auth::api_key_ok;
use crate::fanout::Control;
use crate::inbox::StreamId;
use crate::metrics as m;
use crate::node::Node;
use crate::protocol::{parse_publish, ErrorBody, PresenceResponse, Publish, PublishTarget};

/// Extra body room on top of the payload limit, for the target fields of a publish.
const PUBLISH_ENVELOPE_BYTES: u64 = 512 * 1024;

/// All routes of a node.
pub fn routes(node: Arc<Node>) -> BoxedFilter<(Response,)> {
    ws_route(node.clone())
        .or(api_routes(node.clone()))
        .unify()
        .or(ops_routes(node))
        .unify()
        .recover(recover)
        .unify()
        .boxed()
}

fn with_node(node: Arc<Node>) -> impl Filter<Extract = (Arc<Node>,), Error = Infallible> + Clone {
    warp::any().map(move || node.clone())
}

/// A JSON error reply.
pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        error: code.to_string(),
        message: message.into(),
    };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

// ===== WebSocket =====

#[derive(Debug, Deserialize, Default)]
struct WsQuery {
    token: Option<String>,
    topics: Option<String>,
    since: Option<String>,
}

fn ws_route(node: Arc<Node>) -> BoxedFilter<(Response,)> {
    warp::path("ws")
        .and(warp::path::end())
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::ext::optional::<hyper::upgrade::OnUpgrade>())
        .and(with_node(node))
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

fn reject_upgrade(
    status: StatusCode,
    reason: &'static str,
    message: impl Into<String>,
) -> Response {
    metrics::counter!(m::UPGRADES_REJECTED, "reason" => reason).increment(1);
    error(status, reason, message)
}

/// Checks and performs the WebSocket upgrade by hand, so each connection gets a small read
/// buffer (warp's `ws()` allocates 128 KiB per socket and cannot be told otherwise).
fn upgrade(
    method: Method,
    headers: HeaderMap,
    query: String,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    node: Arc<Node>,
) -> Response {
    if method != Method::GET {
        return reject_upgrade(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        );
    }
    if node.health.draining() {
        return reject_upgrade(
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
    let who = match node
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
        Some(Err(())) => {
            return reject_upgrade(
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
        return reject_upgrade(
            StatusCode::BAD_REQUEST,
            "not_websocket",
            "expected a WebSocket upgrade (Connection: upgrade, Upgrade: websocket, Sec-WebSocket-Version: 13, Sec-WebSocket-Key)",
        );
    };
    let Some(slot) = node.try_reserve() else {
        let mut res = reject_upgrade(
            StatusCode::SERVICE_UNAVAILABLE,
            "capacity",
            "node is at --max-connections",
        );
        res.headers_mut()
            .insert("retry-after", HeaderValue::from_static("5"));
        return res;
    };
    node.spawn_session(on_upgrade, who, since, slot);

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

// ===== Producer API =====

#[derive(Debug)]
struct Unauthorized;
impl warp::reject::Reject for Unauthorized {}

fn api_auth(node: Arc<Node>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(with_node(node))
        .and_then(|header: Option<String>, node: Arc<Node>| async move {
            if api_key_ok(node.config.api_key.as_deref(), header.as_deref()) {
                Ok(())
            } else {
                Err(warp::reject::custom(Unauthorized))
            }
        })
        .untuple_one()
}

fn api_routes(node: Arc<Node>) -> BoxedFilter<(Response,)> {
    let limit = node.config.max_message_bytes as u64 + PUBLISH_ENVELOPE_BYTES;
    let publish = warp::path!("api" / "publish")
        .and(warp::post())
        .and(api_auth(node.clone()))
        .and(warp::body::content_length_limit(limit))
        .and(warp::body::bytes())
        .and(with_node(node.clone()))
        .then(publish);
    let presence = warp::path!("api" / "presence" / String)
        .and(warp::get())
        .and(api_auth(node.clone()))
        .and(with_node(node.clone()))
        .then(presence);
    let stats = warp::path!("api" / "stats")
        .and(warp::get())
        .and(api_auth(node.clone()))
        .and(with_node(node.clone()))
        .then(stats);
    let disconnect = warp::path!("api" / "disconnect" / String)
        .and(warp::post())
        .and(api_auth(node.clone()))
        .and(with_node(node.clone()))
        .then(disconnect);
    let inbox = warp::path!("api" / "inbox" / String)
        .and(warp::get())
        .and(api_auth(node.clone()))
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(with_node(node.clone()))
        .then(inbox_list);
    let inbox_ack = warp::path!("api" / "inbox" / String / "ack")
        .and(warp::post())
        .and(api_auth(node.clone()))
        .and(warp::body::content_length_limit(4096))
        .and(warp::body::bytes())
        .and(with_node(node))
        .then(inbox_ack);
    publish
        .or(presence)
        .unify()
        .or(inbox)
        .unify()
        .or(inbox_ack)
        .unify()
        .or(stats)
        .unify()
        .or(disconnect)
        .unify()
        .boxed()
}

/// Percent-decodes and validates a user id taken from a path segment.
fn decode_user(raw: &str) -> Result<String, Box<Response>> {
    let bad = |msg: &str| Box::new(error(StatusCode::BAD_REQUEST, "bad_request", msg));
    let user = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| bad("user id is not valid UTF-8"))?
        .into_owned();
    if !crate::keys::valid_name(&user) {
        return Err(bad(
            "invalid user id: 1-256 printable characters without whitespace",
        ));
    }
    Ok(user)
}

fn unavailable(node: &Node, e: impl std::fmt::Display, op: &'static str) -> Response {
    // A failed command may mean a pooled connection broke (Redis restarted); drop the idle
    // ones so the next request connects afresh.
    node.presence.reset_connections();
    tracing::warn!(error = %e, op, "API request failed on Redis");
    metrics::counter!(m::REDIS_ERRORS, "op" => op).increment(1);
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "Redis is unavailable; retry later",
    )
}

fn count(route: &'static str, res: Response) -> Response {
    metrics::counter!(m::API_REQUESTS, "route" => route, "status" => res.status().as_str().to_string())
        .increment(1);
    res
}

#[derive(Serialize)]
struct PublishResponse {
    ok: bool,
    channels: usize,
    /// Inbox id per user, for durable publishes.
    #[serde(skip_serializing_if = "Option::is_none")]
    ids: Option<std::collections::BTreeMap<String, String>>,
}

async fn publish(body: Bytes, node: Arc<Node>) -> Response {
    count("publish", publish_inner(body, &node).await)
}

async fn publish_inner(body: Bytes, node: &Node) -> Response {
    let Publish {
        target,
        data,
        durable,
    } = match parse_publish(&body) {
        Ok(v) => v,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "bad_request", msg),
    };
    let payload = data.get().as_bytes();
    if payload.len() > node.config.max_message_bytes {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "\"data\" is {} bytes; the limit is {}",
                payload.len(),
                node.config.max_message_bytes
            ),
        );
    }
    if durable {
        let PublishTarget::Users(users) = target else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "durable applies to users only",
            );
        };
        let results = join_all(users.iter().map(|u| node.publish_durable(u, payload))).await;
        let mut ids = std::collections::BTreeMap::new();
        for (user, r) in users.iter().zip(results) {
            match r {
                Ok(id) => {
                    ids.insert(user.clone(), id.to_string());
                }
                Err(e) => return unavailable(node, e, "publish_durable"),
            }
        }
        return json(
            StatusCode::OK,
            &PublishResponse {
                ok: true,
                channels: users.len(),
                ids: Some(ids),
            },
        );
    }
    let channels: Vec<String> = match target {
        PublishTarget::Users(users) => users.iter().map(|u| node.keys.user_channel(u)).collect(),
        PublishTarget::Topic(t) => vec![node.keys.topic_channel(&t)],
        PublishTarget::Broadcast => vec![node.keys.broadcast_channel()],
    };
    let results = join_all(channels.iter().map(|c| node.broker.publish(c, payload))).await;
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        return unavailable(node, e, "publish");
    }
    json(
        StatusCode::OK,
        &PublishResponse {
            ok: true,
            channels: channels.len(),
            ids: None,
        },
    )
}

async fn presence(user: String, node: Arc<Node>) -> Response {
    let user = match decode_user(&user) {
        Ok(u) => u,
        Err(res) => return count("presence", *res),
    };
    let res = match node.presence.user(&user).await {
        Ok(sessions) => json(
            StatusCode::OK,
            &PresenceResponse {
                user,
                online: !sessions.is_empty(),
                sessions,
            },
        ),
        Err(e) => unavailable(&node, e, "presence_read"),
    };
    count("presence", res)
}

async fn stats(node: Arc<Node>) -> Response {
    let res = match node.presence.stats().await {
        Ok(s) => json(StatusCode::OK, &s),
        Err(e) => unavailable(&node, e, "stats"),
    };
    count("stats", res)
}

#[derive(Serialize)]
struct OkResponse {
    ok: bool,
}

async fn disconnect(user: String, node: Arc<Node>) -> Response {
    let user = match decode_user(&user) {
        Ok(u) => u,
        Err(res) => return count("disconnect", *res),
    };
    // Serialising an enum of strings cannot fail; the fallback is unreachable.
    let payload = serde_json::to_vec(&Control::Disconnect { user }).unwrap_or_default();
    let res = match node
        .broker
        .publish(&node.keys.control_channel(), &payload)
        .await
    {
        Ok(_) => json(StatusCode::OK, &OkResponse { ok: true }),
        Err(e) => unavailable(&node, e, "disconnect"),
    };
    count("disconnect", res)
}

#[derive(Deserialize, Default)]
struct InboxQuery {
    limit: Option<usize>,
}

/// Most entries one `GET /api/inbox/<uid>` returns.
const INBOX_PAGE_MAX: usize = 1000;

#[derive(Serialize)]
struct InboxEntryBody {
    id: String,
    data: serde_json::Value,
}

#[derive(Serialize)]
struct InboxResponse {
    user: String,
    cursor: Option<String>,
    entries: Vec<InboxEntryBody>,
}

/// The payload as clients receive it in `data`: JSON when it parses, else a string.
fn payload_value(data: &[u8]) -> serde_json::Value {
    serde_json::from_slice(data)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(data).into_owned()))
}

async fn inbox_list(user: String, query: String, node: Arc<Node>) -> Response {
    let user = match decode_user(&user) {
        Ok(u) => u,
        Err(res) => return count("inbox", *res),
    };
    let q: InboxQuery = serde_urlencoded::from_str(&query).unwrap_or_default();
    let limit = q.limit.unwrap_or(100).clamp(1, INBOX_PAGE_MAX);
    let cursor = match node.inbox.cursor(&user).await {
        Ok(c) => c,
        Err(e) => return count("inbox", unavailable(&node, e, "inbox_read")),
    };
    let res = match node.inbox.read_after(&user, cursor, limit).await {
        Ok(entries) => json(
            StatusCode::OK,
            &InboxResponse {
                user,
                cursor: cursor.map(|c| c.to_string()),
                entries: entries
                    .into_iter()
                    .map(|e| InboxEntryBody {
                        id: e.id.to_string(),
                        data: payload_value(&e.data),
                    })
                    .collect(),
            },
        ),
        Err(e) => unavailable(&node, e, "inbox_read"),
    };
    count("inbox", res)
}

#[derive(Deserialize)]
struct AckBody {
    id: String,
}

#[derive(Serialize)]
struct AckResponse {
    ok: bool,
    moved: bool,
}

async fn inbox_ack(user: String, body: Bytes, node: Arc<Node>) -> Response {
    let user = match decode_user(&user) {
        Ok(u) => u,
        Err(res) => return count("inbox_ack", *res),
    };
    let id = match serde_json::from_slice::<AckBody>(&body).map(|b| b.id.parse::<StreamId>()) {
        Ok(Ok(id)) => id,
        _ => {
            return count(
                "inbox_ack",
                error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    r#"body must be {"id":"<inbox id>"}"#,
                ),
            )
        }
    };
    let res = match node.inbox.ack(&user, id).await {
        Ok(moved) => json(StatusCode::OK, &AckResponse { ok: true, moved }),
        Err(e) => unavailable(&node, e, "inbox_ack"),
    };
    count("inbox_ack", res)
}

// ===== Operations =====

fn ops_routes(node: Arc<Node>) -> BoxedFilter<(Response,)> {
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::with_header("ok\n", CONTENT_TYPE, "text/plain").into_response());
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_node(node.clone()))
        .map(|node: Arc<Node>| {
            let status = node.health.status();
            let code = if status.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(code, &status)
        });
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_node(node))
        .map(|node: Arc<Node>| {
            warp::reply::with_header(
                node.metrics.render(),
                CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )
            .into_response()
        });
    healthz.or(readyz).unify().or(metrics).unify().boxed()
}

/// Turns every rejection into a JSON error with the right status.
async fn recover(rej: Rejection) -> Result<Response, Infallible> {
    let res = if rej.is_not_found() {
        error(StatusCode::NOT_FOUND, "not_found", "no such route")
    } else if rej.find::<Unauthorized>().is_some() {
        error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong API key: send Authorization: Bearer <api key>",
        )
    } else if rej.find::<warp::reject::PayloadTooLarge>().is_some() {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "request body too large",
        )
    } else if rej.find::<warp::reject::LengthRequired>().is_some() {
        error(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "send a Content-Length",
        )
    } else if rej.find::<warp::reject::MethodNotAllowed>().is_some() {
        error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed",
        )
    } else if rej.find::<warp::reject::InvalidHeader>().is_some()
        || rej.find::<warp::reject::InvalidQuery>().is_some()
    {
        error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "invalid header or query",
        )
    } else {
        tracing::debug!(?rej, "unhandled rejection");
        error(StatusCode::BAD_REQUEST, "bad_request", "bad request")
    };
    Ok(res)
}
