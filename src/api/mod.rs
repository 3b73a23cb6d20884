//! The HTTP surface of a node: the WebSocket upgrade, the producer API, health and metrics,
//! and the one `recover` that turns every rejection into a JSON error.
//!
//! Handlers talk to the node only through its facade ([`Node`]'s `pub(crate)` methods); the
//! bodies they read and write are all in [`bodies`].

mod bodies;
mod inbox;
mod limits;
mod ops;
mod presence;
mod publish;
#[cfg(test)]
mod tests;
mod upgrade;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use http::header::{HeaderValue, ALLOW, WWW_AUTHENTICATE};
use http::{Method, StatusCode};
use serde::Serialize;
use warp::filters::BoxedFilter;
use warp::path::FullPath;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use self::bodies::ErrorBody;
use crate::auth::{ApiKeys, Authenticator, KeyRefusal};
use crate::cluster::RedisError;
use crate::config::ApiScope;
use crate::metrics as m;
use crate::node::Node;
use crate::protocol::valid_name;

/// What every handler shares: the node and the credentials it checks.
pub(crate) struct Api {
    node: Arc<Node>,
    auth: Arc<Authenticator>,
    /// Bounds each user's `POST /ack` calls on this node (`--client-frame-rate`).
    ack_limit: limits::UserRateLimit,
    /// The API keys and their scopes (none, only possible with `--dev`: every API request
    /// is accepted).
    api_keys: ApiKeys,
}

/// All routes of a node.
pub(crate) fn routes(node: Arc<Node>) -> BoxedFilter<(Response,)> {
    let api = Arc::new(Api {
        api_keys: ApiKeys::new(node.config().scoped_api_keys()),
        ack_limit: limits::UserRateLimit::new(
            node.config().client_frame_rate,
            node.config().client_frame_burst,
        ),
        auth: node.authenticator().clone(),
        node,
    });
    let client = upgrade::route(api.clone())
        .or(upgrade::sse_route(api.clone()))
        .unify()
        .or(upgrade::ack_route(api.clone()))
        .unify();
    let client = match cors(api.node.config()) {
        Some(cors) => client.with(cors).map(Reply::into_response).boxed(),
        None => client.boxed(),
    };
    let mut routes = client
        .or(api_routes(api.clone()))
        .unify()
        .or(ops::routes(api.clone()))
        .unify()
        .boxed();
    if api.node.config().dev {
        routes = routes.or(demo()).unify().boxed();
    }
    routes
        .or(method_not_allowed())
        .unify()
        .recover(recover)
        .unify()
        .boxed()
}

/// The routes of the `--metrics-listen` address: `GET /metrics`, and a JSON 404 (or 405)
/// for anything else.
pub(crate) fn metrics_routes(node: Arc<Node>) -> BoxedFilter<(Response,)> {
    let api = Arc::new(Api {
        api_keys: ApiKeys::new(Vec::new()),
        ack_limit: limits::UserRateLimit::new(1, 1),
        auth: node.authenticator().clone(),
        node,
    });
    let only_metrics = warp::path!("metrics").map(|| method_not_allowed_reply(&["GET"]));
    ops::metrics(api)
        .or(only_metrics)
        .unify()
        .recover(recover)
        .unify()
        .boxed()
}

/// CORS for the routes browsers call (`--allowed-origins`; every origin in --dev unless
/// set): preflights answered, other origins refused with 403. `None`: no origin checks.
fn cors(config: &crate::config::Config) -> Option<warp::cors::Builder> {
    let origins = &config.allowed_origins;
    if origins.is_empty() && !config.dev {
        return None;
    }
    let builder = warp::cors()
        .allow_methods(["GET", "POST"])
        .allow_headers(["authorization", "content-type", "last-event-id"])
        .max_age(600);
    Some(if origins.is_empty() || origins.iter().any(|o| o == "*") {
        builder.allow_any_origin()
    } else {
        // Every entry was checked by the config's origin parser, so warp accepts it.
        builder.allow_origins(origins.iter().map(String::as_str))
    })
}

/// --dev only: the demo page (examples/browser, read from the working directory) at /demo/.
fn demo() -> BoxedFilter<(Response,)> {
    let slash = warp::path("demo")
        .and(warp::path::end())
        .map(|| warp::redirect::see_other(http::Uri::from_static("/demo/")).into_response());
    let files = warp::path("demo")
        .and(warp::fs::dir("examples/browser"))
        .map(Reply::into_response);
    warp::get().and(slash.or(files).unify()).boxed()
}

fn api_routes(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    publish::route(api.clone())
        .or(presence::presence_route(api.clone()))
        .unify()
        .or(inbox::list_route(api.clone()))
        .unify()
        .or(inbox::ack_route(api.clone()))
        .unify()
        .or(inbox::retract_route(api.clone()))
        .unify()
        .or(presence::stats_route(api.clone()))
        .unify()
        .or(presence::disconnect_route(api))
        .unify()
        .boxed()
}

/// Every path the node serves, as a template (`{name}` is one non-empty segment), with the
/// methods it has: the source of 405 answers and their `Allow` header. docs/openapi.yaml
/// documents the same routes (a test compares them); `/ws` is in docs/protocol.md.
const ROUTES: &[(&str, &str)] = &[
    ("/ws", "GET"),
    ("/sse", "GET"),
    ("/ack", "POST"),
    ("/api/publish", "POST"),
    ("/api/presence/{user}", "GET"),
    ("/api/stats", "GET"),
    ("/api/disconnect/{user}", "POST"),
    ("/api/inbox/{user}", "GET"),
    ("/api/inbox/{user}/ack", "POST"),
    ("/api/inbox/{user}/{id}", "DELETE"),
    ("/healthz", "GET"),
    ("/readyz", "GET"),
    ("/metrics", "GET"),
];

fn template_matches(template: &str, path: &str) -> bool {
    let mut want = template.split('/');
    let mut have = path.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return true,
            (Some(w), Some(h)) if w.starts_with('{') && !h.is_empty() => {}
            (Some(w), Some(h)) if w == h => {}
            _ => return false,
        }
    }
}

/// The methods this path has, in `ROUTES` order (empty: no such path). As in OpenAPI, a
/// concrete segment wins over a templated one: `/api/inbox/u/ack` is the ack resource
/// only, not also the entry `ack` of `/api/inbox/{user}/{id}`.
fn allowed_methods(path: &str) -> Vec<&'static str> {
    let literals = |t: &str| t.split('/').filter(|seg| !seg.starts_with('{')).count();
    let matching: Vec<&(&str, &str)> = ROUTES
        .iter()
        .filter(|(template, _)| template_matches(template, path))
        .collect();
    let most = matching.iter().map(|(t, _)| literals(t)).max().unwrap_or(0);
    let mut methods: Vec<&'static str> = Vec::new();
    for (template, method) in matching {
        if literals(template) == most && !methods.contains(method) {
            methods.push(method);
        }
    }
    methods
}

/// A 405 with the `Allow` header RFC 9110 asks for.
fn method_not_allowed_reply(allowed: &[&str]) -> Response {
    let allow = allowed.join(", ");
    let mut res = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("method not allowed; this path allows: {allow}"),
    );
    if let Ok(v) = HeaderValue::from_str(&allow) {
        res.headers_mut().insert(ALLOW, v);
    }
    res
}

/// Tried after every route: a known path asked with a method it does not have is a 405
/// (before authentication, like a 404). Anything else passes on the routes' own rejection.
fn method_not_allowed() -> BoxedFilter<(Response,)> {
    warp::method()
        .and(warp::path::full())
        .and_then(|method: Method, path: FullPath| async move {
            let allowed = allowed_methods(path.as_str());
            if allowed.is_empty() || allowed.contains(&method.as_str()) {
                Err(warp::reject::not_found())
            } else {
                Ok(method_not_allowed_reply(&allowed))
            }
        })
        .boxed()
}

#[derive(Debug)]
struct BodyTooLarge {
    limit: usize,
}
impl warp::reject::Reject for BodyTooLarge {}

#[derive(Debug)]
struct BodyUnreadable;
impl warp::reject::Reject for BodyUnreadable {}

#[derive(Debug)]
struct BodyTimeout {
    timeout: std::time::Duration,
}
impl warp::reject::Reject for BodyTimeout {}

/// The request body, at most `limit` bytes, sent with a Content-Length or chunked, within
/// `timeout` (`--body-timeout`) of the request head. A body over the limit is a 413: at
/// once when its Content-Length says so, else as soon as the chunks pass the limit (nothing
/// beyond it is buffered). A body that trickles is a 408 and its connection is closed, so a
/// client cannot hold a request (and its pending-connection slot) open by sending slowly.
fn body_limited(
    limit: usize,
    timeout: std::time::Duration,
) -> impl Filter<Extract = (Bytes,), Error = Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and(warp::body::stream())
        .and_then(move |declared: Option<u64>, body| async move {
            match tokio::time::timeout(timeout, read_limited(declared, body, limit)).await {
                Ok(read) => read,
                Err(_) => Err(warp::reject::custom(BodyTimeout { timeout })),
            }
        })
}

async fn read_limited<S, B>(
    declared: Option<u64>,
    body: S,
    limit: usize,
) -> Result<Bytes, Rejection>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(warp::reject::custom(BodyTooLarge { limit }));
    }
    let mut body = std::pin::pin!(body);
    let mut out = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|_| warp::reject::custom(BodyUnreadable))?;
        if out.len() + chunk.remaining() > limit {
            return Err(warp::reject::custom(BodyTooLarge { limit }));
        }
        out.put(chunk);
    }
    Ok(out.freeze())
}

/// Hands each request the shared state.
fn with_api(api: Arc<Api>) -> impl Filter<Extract = (Arc<Api>,), Error = Infallible> + Clone {
    warp::any().map(move || api.clone())
}

#[derive(Debug)]
struct Unauthorized;
impl warp::reject::Reject for Unauthorized {}

/// A known API key whose scope does not cover the route.
#[derive(Debug)]
struct Forbidden {
    have: ApiScope,
    need: ApiScope,
}
impl warp::reject::Reject for Forbidden {}

/// Requires an API key (`Authorization: Bearer <api key>`) whose scope allows `need`,
/// unless `--dev` runs without keys.
fn api_auth(api: Arc<Api>, need: ApiScope) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(with_api(api))
        .and_then(move |header: Option<String>, api: Arc<Api>| async move {
            match api.api_keys.check(header.as_deref(), need) {
                Ok(()) => Ok(()),
                Err(KeyRefusal::Unknown) => Err(warp::reject::custom(Unauthorized)),
                Err(KeyRefusal::Scope(have)) => {
                    metrics::counter!(m::API_FORBIDDEN, "scope" => have.label()).increment(1);
                    Err(warp::reject::custom(Forbidden { have, need }))
                }
            }
        })
        .untuple_one()
}

/// A JSON error reply.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        error: code.to_string(),
        message: message.into(),
    };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

fn bad_request(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// A 503 for a request that failed on Redis (see [`Node::redis_failed`]).
fn unavailable(api: &Api, op: &'static str, e: &RedisError) -> Response {
    api.node.redis_failed(op, e);
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "Redis is unavailable; retry later",
    )
}

/// Counts an API answer by route and status.
fn count(route: &'static str, res: Response) -> Response {
    metrics::counter!(m::API_REQUESTS, "route" => route, "status" => res.status().as_str().to_string())
        .increment(1);
    res
}

/// Percent-decodes one path segment. Strict: a `%` that does not start a `%XX` escape, or
/// bytes that are not UTF-8 once decoded, make it `None`. A lenient decoder would take the
/// `%` of an unencoded `50%` literally but decode the one of `50%41`: a client that forgot
/// to encode would be right or wrong by chance, and never told.
fn decode_segment(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let escapes_ok = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || (bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if !escapes_ok {
        return None;
    }
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// Percent-decodes and validates a user id taken from a path segment.
fn decode_user(raw: &str) -> Result<String, Box<Response>> {
    let Some(user) = decode_segment(raw) else {
        return Err(Box::new(bad_request(
            "the user id in the path is not percent-encoded UTF-8",
        )));
    };
    if !valid_name(&user) {
        return Err(Box::new(bad_request(
            "invalid user id: 1-256 bytes without whitespace, control characters or braces",
        )));
    }
    Ok(user)
}

/// Turns every rejection into a JSON error with the right status.
async fn recover(rej: Rejection) -> Result<Response, Infallible> {
    let res = if rej.is_not_found() {
        error(StatusCode::NOT_FOUND, "not_found", "no such route")
    } else if rej.find::<warp::cors::CorsForbidden>().is_some() {
        error(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "this origin may not use this node (--allowed-origins)",
        )
    } else if rej.find::<Unauthorized>().is_some() {
        let mut res = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong API key: send Authorization: Bearer <api key>",
        );
        res.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        res
    } else if let Some(Forbidden { have, need }) = rej.find() {
        error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this API key has the {} scope; this route needs {}",
                have.label(),
                need.label()
            ),
        )
    } else if let Some(BodyTooLarge { limit }) = rej.find() {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body too large: the limit is {limit} bytes"),
        )
    } else if let Some(BodyTimeout { timeout }) = rej.find() {
        let mut res = error(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} ms (--body-timeout)",
                timeout.as_millis()
            ),
        );
        // The rest of the body may still be on its way: the connection cannot be reused.
        res.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        res
    } else if rej.find::<BodyUnreadable>().is_some() {
        bad_request("the request body could not be read")
    } else if rej.find::<warp::reject::MethodNotAllowed>().is_some() {
        error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed",
        )
    } else if rej.find::<warp::reject::InvalidHeader>().is_some()
        || rej.find::<warp::reject::InvalidQuery>().is_some()
    {
        bad_request("invalid header or query")
    } else {
        tracing::debug!(?rej, "unhandled rejection");
        bad_request("bad request")
    };
    Ok(res)
}
