//! The HTTP surface of a node: the WebSocket upgrade, the producer API, health and metrics,
//! and the one `recover` that turns every rejection into a JSON error.
//!
//! Handlers talk to the node only through its facade ([`Node`]'s `pub(crate)` methods); the
//! bodies they read and write are all in [`bodies`].

mod bodies;
mod inbox;
mod ops;
mod presence;
mod publish;
#[cfg(test)]
mod tests;
mod upgrade;

use std::convert::Infallible;
use std::sync::Arc;

use http::StatusCode;
use serde::Serialize;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use self::bodies::ErrorBody;
use crate::auth::{api_key_ok, Authenticator};
use crate::cluster::RedisError;
use crate::metrics as m;
use crate::node::Node;
use crate::protocol::valid_name;

/// What every handler shares: the node and the credentials it checks.
pub(crate) struct Api {
    node: Arc<Node>,
    auth: Arc<Authenticator>,
    /// `None` (only possible with `--dev`): every API request is accepted.
    api_key: Option<String>,
}

/// All routes of a node.
pub(crate) fn routes(node: Arc<Node>) -> BoxedFilter<(Response,)> {
    let api = Arc::new(Api {
        api_key: node.config().api_key.clone(),
        auth: node.authenticator().clone(),
        node,
    });
    let client = upgrade::route(api.clone())
        .or(upgrade::sse_route(api.clone()))
        .unify()
        .or(upgrade::ack_route(api.clone()))
        .unify();
    let client = match cors(api.node.config()) {
        Some(cors) => client
            .with(cors)
            .map(Reply::into_response)
            .boxed(),
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
    routes.recover(recover).unify().boxed()
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
    let slash = warp::path("demo").and(warp::path::end()).map(|| {
        warp::redirect::see_other(http::Uri::from_static("/demo/")).into_response()
    });
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

/// Hands each request the shared state.
fn with_api(api: Arc<Api>) -> impl Filter<Extract = (Arc<Api>,), Error = Infallible> + Clone {
    warp::any().map(move || api.clone())
}

#[derive(Debug)]
struct Unauthorized;
impl warp::reject::Reject for Unauthorized {}

/// Requires the API key (`Authorization: Bearer <api key>`) unless `--dev`.
fn api_auth(api: Arc<Api>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(with_api(api))
        .and_then(|header: Option<String>, api: Arc<Api>| async move {
            if api_key_ok(api.api_key.as_deref(), header.as_deref()) {
                Ok(())
            } else {
                Err(warp::reject::custom(Unauthorized))
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

/// Percent-decodes and validates a user id taken from a path segment.
fn decode_user(raw: &str) -> Result<String, Box<Response>> {
    let bad = |msg: &str| Box::new(bad_request(msg));
    let user = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| bad("user id is not valid UTF-8"))?
        .into_owned();
    if !valid_name(&user) {
        return Err(bad(
            "invalid user id: 1-256 printable characters without whitespace",
        ));
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
        bad_request("invalid header or query")
    } else {
        tracing::debug!(?rej, "unhandled rejection");
        bad_request("bad request")
    };
    Ok(res)
}
