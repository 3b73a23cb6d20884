//! The Pusher protocol 7 side of the bench (for comparing against Sockudo): the app
//! credentials, the private-channel auth signature, the signed HTTP API request of
//! `POST /apps/<app_id>/batch_events`, and the client's subscribe and pong frames.

use clap::Args;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;

/// Events per `batch_events` request: Sockudo's (and Pusher's) default `max_batch_size`.
pub(crate) const MAX_BATCH: usize = 10;

/// The event name every bench payload is published under.
pub(crate) const EVENT: &str = "notify";

/// The public channel every session joins and broadcasts go to.
pub(crate) const BROADCAST_CHANNEL: &str = "broadcast";

/// The pong a client sends back for `pusher:ping`.
pub(crate) const PONG: &str = r#"{"event":"pusher:pong","data":{}}"#;

/// One Pusher app: what the clients (key, and secret for private-channel auth) and the
/// HTTP API producer (id, key, secret) need.
#[derive(Debug, Clone, Args)]
pub(crate) struct PusherArgs {
    /// --protocol pusher / --producer pusher-api: the app id (the HTTP API's /apps/<id>/).
    #[arg(long, default_value = "herald-bench")]
    pub(crate) pusher_app_id: String,

    /// --protocol pusher / --producer pusher-api: the app key (the WebSocket path /app/<key>).
    #[arg(long, default_value = "herald-bench-key")]
    pub(crate) pusher_key: String,

    /// --protocol pusher / --producer pusher-api: the app secret, which signs private-channel
    /// subscriptions and API requests.
    #[arg(long, env = "HERALD_BENCH_PUSHER_SECRET", hide_env_values = true)]
    pub(crate) pusher_secret: Option<String>,
}

impl PusherArgs {
    pub(crate) fn secret(&self) -> anyhow::Result<&str> {
        self.pusher_secret.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "the Pusher protocol needs --pusher-secret (or HERALD_BENCH_PUSHER_SECRET)"
            )
        })
    }
}

/// The private channel of a user: `private-user-<uid>`.
pub(crate) fn user_channel(user: &str) -> String {
    format!("private-user-{user}")
}

/// Lower-case hex HMAC-SHA256 of `message` under `secret`.
fn hmac_hex(secret: &str, message: &str) -> String {
    // HMAC accepts a key of any length, so this never fails; the fallback keeps the
    // function total without an unwrap.
    match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(message.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

/// The `auth` field of a private-channel subscription:
/// `<key>:<hex HMAC-SHA256(secret, "<socket_id>:<channel>")>`.
pub(crate) fn channel_auth(key: &str, secret: &str, socket_id: &str, channel: &str) -> String {
    format!(
        "{key}:{}",
        hmac_hex(secret, &format!("{socket_id}:{channel}"))
    )
}

/// The `pusher:subscribe` frame for `channel`, with `auth` for a private channel.
pub(crate) fn subscribe_frame(channel: &str, auth: Option<&str>) -> String {
    let data = match auth {
        Some(a) => serde_json::json!({ "channel": channel, "auth": a }),
        None => serde_json::json!({ "channel": channel }),
    };
    serde_json::json!({ "event": "pusher:subscribe", "data": data }).to_string()
}

/// The body of a `batch_events` request: every event is `notify` on its channel with the
/// payload as its (string) data.
pub(crate) fn batch_body<'a>(events: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let batch: Vec<serde_json::Value> = events
        .into_iter()
        .map(|(channel, data)| serde_json::json!({ "name": EVENT, "channel": channel, "data": data }))
        .collect();
    serde_json::json!({ "batch": batch }).to_string()
}

/// Path and query of a signed `POST /apps/<app_id>/batch_events` (Pusher's HTTP API
/// authentication: the query parameters sorted by name, signed with
/// HMAC-SHA256("POST\n<path>\n<query>") under the app secret).
pub(crate) fn signed_batch_path(
    app: &PusherArgs,
    secret: &str,
    body: &str,
    unix_secs: u64,
) -> String {
    let path = format!("/apps/{}/batch_events", app.pusher_app_id);
    let body_md5 = hex::encode(Md5::digest(body.as_bytes()));
    // Already in name order: auth_key < auth_timestamp < auth_version < body_md5.
    let query = format!(
        "auth_key={}&auth_timestamp={unix_secs}&auth_version=1.0&body_md5={body_md5}",
        app.pusher_key
    );
    let signature = hmac_hex(secret, &format!("POST\n{path}\n{query}"));
    format!("{path}?{query}&auth_signature={signature}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_auth_matches_the_pusher_docs_vector() {
        // https://pusher.com/docs/channels/library_auth_reference/auth-signatures/
        assert_eq!(
            channel_auth(
                "278d425bdf160c739803",
                "7ad3773142a6692b25b8",
                "1234.1234",
                "private-foobar"
            ),
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
    }

    #[test]
    fn api_signature_matches_the_pusher_docs_vector() {
        // The worked example of Pusher's HTTP API reference ("Generating authentication
        // signatures"): POST /apps/3/events with this body at timestamp 1353088179.
        let body = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(
            hex::encode(Md5::digest(body.as_bytes())),
            "ec365a775a4cd0599faeb73354201b6f"
        );
        let query = "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f";
        assert_eq!(
            hmac_hex(
                "7ad3773142a6692b25b8",
                &format!("POST\n/apps/3/events\n{query}")
            ),
            "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    #[test]
    fn batch_requests_are_signed_over_their_own_body() {
        let app = PusherArgs {
            pusher_app_id: "a1".into(),
            pusher_key: "k".into(),
            pusher_secret: Some("s".into()),
        };
        let body = batch_body([("private-user-bench-1", r#"{"seq":1}"#)]);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap(); // safe: test
        assert_eq!(
            v,
            serde_json::json!({"batch": [{"name": "notify", "channel": "private-user-bench-1", "data": "{\"seq\":1}"}]})
        );
        let p = signed_batch_path(&app, "s", &body, 1_700_000_000);
        let (path, query) = p.split_once('?').unwrap(); // safe: test
        assert_eq!(path, "/apps/a1/batch_events");
        let (signed, sig) = query.split_once("&auth_signature=").unwrap(); // safe: test
        assert!(
            signed.starts_with("auth_key=k&auth_timestamp=1700000000&auth_version=1.0&body_md5=")
        );
        assert_eq!(sig, hmac_hex("s", &format!("POST\n{path}\n{signed}")));
        assert_eq!(sig.len(), 64);
    }

    #[test]
    fn subscribe_frames() {
        let f: serde_json::Value =
            serde_json::from_str(&subscribe_frame("private-user-u", Some("k:abc"))).unwrap(); // safe: test
        assert_eq!(f["event"], "pusher:subscribe");
        assert_eq!(f["data"]["channel"], "private-user-u");
        assert_eq!(f["data"]["auth"], "k:abc");
        let f: serde_json::Value =
            serde_json::from_str(&subscribe_frame("broadcast", None)).unwrap(); // safe: test
        assert!(f["data"].get("auth").is_none());
    }
}
