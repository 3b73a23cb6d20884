//! The durable inbox over HTTP: `GET /api/inbox/<uid>` lists what the user has not
//! acknowledged, `POST /api/inbox/<uid>/ack` moves their read cursor, and
//! `DELETE /api/inbox/<uid>/<id>` withdraws an entry.

use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::Filter;

use crate::config::ApiScope;

use super::bodies::{
    inbox_page_size, AckBody, AckResponse, InboxEntryBody, InboxResponse, OkResponse,
};
use super::{
    api_auth, bad_request, body_limited, count, decode_segment, decode_user, error, json,
    unavailable, with_api, Api,
};
use crate::protocol::StreamId;

/// Largest body of `POST /api/inbox/<uid>/ack`.
const ACK_BODY_MAX: usize = 4096;

pub(super) fn list_route(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    warp::path!("api" / "inbox" / String)
        .and(warp::get())
        .and(api_auth(api.clone(), ApiScope::Read))
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(with_api(api))
        .then(|user: String, query: String, api: Arc<Api>| async move {
            count("inbox", list(&user, &query, &api).await)
        })
        .boxed()
}

pub(super) fn ack_route(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    warp::path!("api" / "inbox" / String / "ack")
        .and(warp::post())
        .and(api_auth(api.clone(), ApiScope::Admin))
        .and(body_limited(ACK_BODY_MAX, api.node.config().body_timeout))
        .and(with_api(api))
        .then(|user: String, body: Bytes, api: Arc<Api>| async move {
            count("inbox_ack", ack(&user, &body, &api).await)
        })
        .boxed()
}

pub(super) fn retract_route(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    warp::path!("api" / "inbox" / String / EntrySegment)
        .and(warp::delete())
        .and(api_auth(api.clone(), ApiScope::Admin))
        .and(with_api(api))
        .then(|user: String, id: EntrySegment, api: Arc<Api>| async move {
            count("inbox_retract", retract(&user, &id.0, &api).await)
        })
        .boxed()
}

/// The `{id}` segment of `DELETE /api/inbox/{user}/{id}`: anything but `ack`, which names
/// the ack resource (a concrete segment wins over a templated one, as in OpenAPI), so
/// `DELETE /api/inbox/{user}/ack` is a 405 rather than a malformed id.
struct EntrySegment(String);

impl FromStr for EntrySegment {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        if s == "ack" {
            Err(())
        } else {
            Ok(EntrySegment(s.to_string()))
        }
    }
}

/// The payload as clients receive it in `data`: JSON when it parses, else a string.
fn payload_value(data: &[u8]) -> serde_json::Value {
    serde_json::from_slice(data)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(data).into_owned()))
}

async fn list(raw_user: &str, query: &str, api: &Api) -> Response {
    let user = match decode_user(raw_user) {
        Ok(u) => u,
        Err(res) => return *res,
    };
    let limit = match inbox_page_size(query) {
        Ok(n) => n,
        Err(e) => return bad_request(e),
    };
    match api.node.inbox_page(&user, limit).await {
        Ok(opening) => json(
            StatusCode::OK,
            &InboxResponse {
                user,
                cursor: opening.start.map(|c| c.to_string()),
                unread: opening.unread.unwrap_or(0),
                entries: opening
                    .page
                    .entries
                    .into_iter()
                    .map(|e| InboxEntryBody {
                        id: e.id.to_string(),
                        data: payload_value(&e.data),
                    })
                    .collect(),
            },
        ),
        Err(e) => unavailable(api, "inbox_read", &e),
    }
}

async fn ack(raw_user: &str, body: &[u8], api: &Api) -> Response {
    let user = match decode_user(raw_user) {
        Ok(u) => u,
        Err(res) => return *res,
    };
    let id = match serde_json::from_slice::<AckBody>(body).map(|b| b.id.parse::<StreamId>()) {
        Ok(Ok(id)) => id,
        _ => return bad_request(r#"body must be {"id":"<inbox id>"}"#),
    };
    match api.node.inbox_ack(&user, id, None).await {
        Ok(acked) => json(StatusCode::OK, &AckResponse::from(acked)),
        Err(e) => unavailable(api, "inbox_ack", &e),
    }
}

async fn retract(raw_user: &str, raw_id: &str, api: &Api) -> Response {
    let user = match decode_user(raw_user) {
        Ok(u) => u,
        Err(res) => return *res,
    };
    let Some(Ok(id)) = decode_segment(raw_id).map(|id| id.parse::<StreamId>()) else {
        return bad_request("the entry id must be an inbox id such as 1732530000000-0");
    };
    match api.node.inbox_retract(&user, id).await {
        Ok(true) => json(StatusCode::OK, &OkResponse { ok: true }),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the inbox holds no such entry (it was never there, aged out or was withdrawn)",
        ),
        Err(e) => unavailable(api, "inbox_retract", &e),
    }
}
