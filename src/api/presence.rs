//! Who is connected: `GET /api/presence/<uid>`, `GET /api/stats`, and ending a user's
//! sessions everywhere with `POST /api/disconnect/<uid>`.

use std::sync::Arc;

use http::StatusCode;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::Filter;

use crate::config::ApiScope;

use super::bodies::{OkResponse, PresenceResponse};
use super::{api_auth, count, decode_user, json, unavailable, with_api, Api};

pub(super) fn presence_route(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    warp::path!("api" / "presence" / String)
        .and(warp::get())
        .and(api_auth(api.clone(), ApiScope::Read))
        .and(with_api(api))
        .then(|user: String, api: Arc<Api>| async move {
            count("presence", presence(&user, &api).await)
        })
        .boxed()
}

pub(super) fn stats_route(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    warp::path!("api" / "stats")
        .and(warp::get())
        .and(api_auth(api.clone(), ApiScope::Read))
        .and(with_api(api))
        .then(|api: Arc<Api>| async move { count("stats", stats(&api).await) })
        .boxed()
}

pub(super) fn disconnect_route(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    warp::path!("api" / "disconnect" / String)
        .and(warp::post())
        .and(api_auth(api.clone(), ApiScope::Admin))
        .and(with_api(api))
        .then(|user: String, api: Arc<Api>| async move {
            count("disconnect", disconnect(&user, &api).await)
        })
        .boxed()
}

async fn presence(raw_user: &str, api: &Api) -> Response {
    let user = match decode_user(raw_user) {
        Ok(u) => u,
        Err(res) => return *res,
    };
    match api.node.presence(&user).await {
        Ok(sessions) => json(
            StatusCode::OK,
            &PresenceResponse {
                user,
                online: !sessions.is_empty(),
                sessions,
            },
        ),
        Err(e) => unavailable(api, "presence_read", &e),
    }
}

async fn stats(api: &Api) -> Response {
    match api.node.stats().await {
        Ok(s) => json(StatusCode::OK, &s),
        Err(e) => unavailable(api, "stats", &e),
    }
}

async fn disconnect(raw_user: &str, api: &Api) -> Response {
    let user = match decode_user(raw_user) {
        Ok(u) => u,
        Err(res) => return *res,
    };
    match api.node.kick(&user).await {
        Ok(()) => json(StatusCode::OK, &OkResponse { ok: true }),
        Err(e) => unavailable(api, "disconnect", &e),
    }
}
