//! `POST /api/publish`: plain notifications to users, a topic or everyone, and durable
//! ones to users.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::join_all;
use http::StatusCode;
use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::Filter;

use crate::config::ApiScope;

use super::bodies::{parse_publish, Publish, PublishResponse, PublishTarget};
use super::{api_auth, bad_request, body_limited, count, error, json, unavailable, with_api, Api};
use crate::delivery::Target;

/// Extra body room on top of the payload limit, for the target fields of a publish.
const PUBLISH_ENVELOPE_BYTES: usize = 512 * 1024;

pub(super) fn route(api: Arc<Api>) -> BoxedFilter<(Response,)> {
    let limit = api.node.config().max_message_bytes + PUBLISH_ENVELOPE_BYTES;
    warp::path!("api" / "publish")
        .and(warp::post())
        .and(api_auth(api.clone(), ApiScope::Publish))
        .and(body_limited(limit, api.node.config().body_timeout))
        .and(with_api(api))
        .then(|body: Bytes, api: Arc<Api>| async move { count("publish", publish(&body, &api).await) })
        .boxed()
}

async fn publish(body: &[u8], api: &Api) -> Response {
    let Publish {
        target,
        data,
        durable,
        options,
    } = match parse_publish(body) {
        Ok(v) => v,
        Err(e) => return bad_request(e.to_string()),
    };
    let payload = data.get().as_bytes();
    let max = api.node.config().max_message_bytes;
    if payload.len() > max {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("\"data\" is {} bytes; the limit is {max}", payload.len()),
        );
    }
    if durable {
        let PublishTarget::Users(users) = target else {
            return bad_request("durable applies to users only");
        };
        let retention = api.node.config().inbox_retention.as_secs();
        if options.ttl_secs.is_some_and(|t| t > retention) {
            return bad_request(format!(
                "\"expires_in\" must be at most the inbox retention ({retention} s)"
            ));
        }
        let results = join_all(
            users
                .iter()
                .map(|u| api.node.publish_durable(u, payload, &options)),
        )
        .await;
        let mut ids = BTreeMap::new();
        for (user, r) in users.iter().zip(results) {
            match r {
                Ok(id) => {
                    ids.insert(user.clone(), id.to_string());
                }
                Err(e) => return unavailable(api, "publish_durable", &e),
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
    let targets: Vec<Target<'_>> = match &target {
        PublishTarget::Users(users) => users.iter().map(|u| Target::User(u)).collect(),
        PublishTarget::Topic(t) => vec![Target::Topic(t)],
        PublishTarget::Broadcast => vec![Target::Broadcast],
    };
    let results = join_all(targets.iter().map(|t| api.node.publish(*t, payload))).await;
    if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
        return unavailable(api, "publish", &e);
    }
    json(
        StatusCode::OK,
        &PublishResponse {
            ok: true,
            channels: targets.len(),
            ids: None,
        },
    )
}
