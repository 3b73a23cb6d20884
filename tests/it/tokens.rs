//! Token lifetime and the edges of authentication: a session ends at its token's `exp`
//! (4003) unless refreshed in-band; secret rotation; tokens signed by an identity provider
//! (ES256 with a PEM public key); `aud`/`iss`, `nbf`, a maximum lifetime; case-insensitive
//! bearer schemes and which token wins when both are given; invisible characters.

use std::process::Command;
use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

const PREVIOUS: &str = "the-previous-jwt-secret-0123456789ab";

async fn node(redis: &RedisServer, prefix: &str, extra: &[(&str, &str)]) -> Herald {
    let mut opts = NodeOpts::cluster(redis, prefix, "a");
    for (k, v) in extra {
        opts = opts.arg(k, v);
    }
    let n = Herald::spawn(opts).await;
    n.wait_ready().await;
    n
}

fn expiring(user: &str, in_secs: u64) -> (String, u64) {
    let exp = now_secs() + in_secs;
    (
        token_with(&json!({"sub": user, "exp": exp}), JWT_SECRET),
        exp,
    )
}

/// The next frame of `kind`, skipping others; None if the connection ended first.
async fn frame_of(ws: &mut Ws, kind: &str) -> Option<Value> {
    loop {
        let v = recv_json(ws, WAIT).await?;
        if v["type"] == kind {
            return Some(v);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_with_4003_at_its_tokens_expiry_unless_refreshed_in_band() {
    let redis = RedisServer::start();
    let n = node(&redis, "tk", &[("--token-grace", "0")]).await;

    // Not refreshed: closed with 4003 once exp has passed.
    let (short, exp) = expiring("u", 2);
    let mut c = connect_url(&n.ws_url(&format!("?token={short}"))).await;
    assert_eq!(c.welcome["exp"], exp);
    assert_eq!(expect_close(&mut c.ws, WAIT).await, Ended::Close(4003));
    assert!(now_secs() >= exp, "not closed before exp");

    // Refreshed before exp with a token for the same user: the session lives on.
    let (short, _) = expiring("v", 2);
    let mut c = connect_url(&n.ws_url(&format!("?token={short}"))).await;
    let (fresh, fresh_exp) = expiring("v", 3600);
    send_text(
        &mut c.ws,
        &json!({"type": "refresh", "token": fresh}).to_string(),
    )
    .await;
    let answer = frame_of(&mut c.ws, "refreshed").await.expect("refreshed");
    assert_eq!(answer["exp"], fresh_exp);
    // Well past the first token's expiry it still receives.
    eventually(WAIT, "past the first expiry", || async {
        (now_secs() > fresh_exp - 3600 + 2).then_some(())
    })
    .await;
    n.publish(json!({"user": "v", "data": "still here"})).await;
    assert_eq!(
        recv_message(&mut c.ws, WAIT).await.expect("alive")["data"],
        "still here"
    );

    // A token for another user is refused in-band, and the session still ends on time.
    let (short, _) = expiring("w", 2);
    let mut c = connect_url(&n.ws_url(&format!("?token={short}"))).await;
    let (other, _) = expiring("someone-else", 3600);
    send_text(
        &mut c.ws,
        &json!({"type": "refresh", "token": other}).to_string(),
    )
    .await;
    let err = frame_of(&mut c.ws, "error").await.expect("error frame");
    assert_eq!(
        err,
        json!({"type": "error", "error": "refresh_failed", "reason": "wrong_subject"})
    );
    send_text(&mut c.ws, r#"{"type":"refresh","token":"garbage"}"#).await;
    let err = frame_of(&mut c.ws, "error").await.expect("error frame");
    assert_eq!(err["reason"], "malformed");
    assert_eq!(expect_close(&mut c.ws, WAIT).await, Ended::Close(4003));
    eventually(WAIT, "expiries counted", || async {
        (n.metric("herald_sessions_closed_total{reason=\"token_expired\"}")
            .await
            >= 2.0)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previous_secret_keeps_working_during_a_rotation() {
    let redis = RedisServer::start();
    let n = node(&redis, "rot", &[("--jwt-secret-previous", PREVIOUS)]).await;
    let old = token_with(&json!({"sub": "u", "exp": now_secs() + 600}), PREVIOUS);
    let c = connect_url(&n.ws_url(&format!("?token={old}"))).await;
    assert_eq!(c.welcome["user"], "u");
    let stranger = token_with(
        &json!({"sub": "u", "exp": now_secs() + 600}),
        "a-secret-nobody-configured-0123456789",
    );
    assert_eq!(
        refused_status(&n.ws_url(&format!("?token={stranger}"))).await,
        401
    );
}

/// An EC P-256 key pair made with openssl: (private PEM for signing, public PEM file).
fn es256_keys(dir: &std::path::Path) -> (Vec<u8>, std::path::PathBuf) {
    std::fs::create_dir_all(dir).expect("key dir");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "ec.pem",
    ]);
    run(&[
        "pkcs8",
        "-topk8",
        "-nocrypt",
        "-in",
        "ec.pem",
        "-out",
        "private.pem",
    ]);
    run(&["ec", "-in", "ec.pem", "-pubout", "-out", "public.pem"]);
    (
        std::fs::read(dir.join("private.pem")).expect("private key"),
        dir.join("public.pem"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_an_identity_provider_verify_with_its_public_key_and_aud_and_iss() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("herald-test-es256-{}", std::process::id()));
    let (private, public) = es256_keys(&dir);
    let redis = RedisServer::start();
    let public = public.display().to_string();
    let n = node(
        &redis,
        "idp",
        &[
            ("--jwt-public-key-file", &public),
            ("--jwt-audience", "herald"),
            ("--jwt-issuer", "https://idp.example"),
        ],
    )
    .await;
    let sign = |claims: Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &jsonwebtoken::EncodingKey::from_ec_pem(&private).expect("ec key"),
        )
        .expect("sign")
    };
    let exp = now_secs() + 600;
    let good = sign(json!({"sub": "u", "exp": exp, "aud": "herald", "iss": "https://idp.example"}));
    let c = connect_url(&n.ws_url(&format!("?token={good}"))).await;
    assert_eq!(c.welcome["user"], "u");
    for (what, claims) in [
        (
            "other audience",
            json!({"sub": "u", "exp": exp, "aud": "other", "iss": "https://idp.example"}),
        ),
        (
            "no audience",
            json!({"sub": "u", "exp": exp, "iss": "https://idp.example"}),
        ),
        (
            "other issuer",
            json!({"sub": "u", "exp": exp, "aud": "herald", "iss": "https://evil.example"}),
        ),
    ] {
        let t = sign(claims);
        assert_eq!(
            refused_status(&n.ws_url(&format!("?token={t}"))).await,
            401,
            "{what}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The JSON body of a refused upgrade with `token`.
async fn refusal_body(n: &Herald, token: &str) -> Value {
    let r = n
        .http
        .get(n.url(&format!("/ws?token={token}")))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401);
    r.json().await.expect("json body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_edges_nbf_lifetime_aud_invisible_characters_and_precedence() {
    let redis = RedisServer::start();
    let n = node(&redis, "edge", &[("--jwt-max-lifetime", "1d")]).await;
    let now = now_secs();
    let refused = [
        (
            "nbf in the future",
            json!({"sub": "u", "exp": now + 600, "nbf": now + 300}),
            "not valid yet",
        ),
        (
            "exp beyond the maximum lifetime",
            json!({"sub": "u", "exp": 1_000_000_000_000_000_000u64}),
            "lives too long",
        ),
        (
            "right-to-left override",
            json!({"sub": "ad\u{202e}nimu", "exp": now + 600}),
            "sub",
        ),
        (
            "zero-width space",
            json!({"sub": "a\u{200b}dmin", "exp": now + 600}),
            "sub",
        ),
        (
            "byte-order mark",
            json!({"sub": "\u{feff}admin", "exp": now + 600}),
            "sub",
        ),
        (
            "invisible topic",
            json!({"sub": "u", "exp": now + 600, "topics": ["news\u{2066}"]}),
            "topics",
        ),
    ];
    for (what, claims, says) in refused {
        let t = token_with(&claims, JWT_SECRET);
        let body = refusal_body(&n, &t).await;
        assert!(
            body["message"].as_str().unwrap_or("").contains(says),
            "{what}: {body}"
        );
    }
    // A token with an aud is fine when the node does not check audiences.
    let with_aud = token_with(
        &json!({"sub": "u", "exp": now + 600, "aud": "anything"}),
        JWT_SECRET,
    );
    connect_url(&n.ws_url(&format!("?token={with_aud}"))).await;

    // Auth schemes are case-insensitive, on /ws and on /api.
    let t = token("lower", &[]);
    let ws = open_with_authorization(&n.ws_url(""), &format!("bearer {t}")).await;
    assert!(ws.is_ok(), "a lower-case bearer scheme opens a session");
    let r = n
        .http
        .get(n.url("/api/stats"))
        .header("authorization", format!("bEaReR {API_KEY}"))
        .send()
        .await
        .expect("stats");
    assert_eq!(r.status(), 200);

    // The header wins over the query parameter, and an empty `?token=` is no token.
    let mut ws = open_bearer(&n.ws_url("?token="), &token("header-user", &[]))
        .await
        .expect("a valid header with an empty query token");
    assert_eq!(
        recv_json(&mut ws, WAIT).await.expect("welcome")["user"],
        "header-user"
    );
    let mut ws = open_bearer(
        &n.ws_url(&format!("?token={}", token("query-user", &[]))),
        &token("header-user", &[]),
    )
    .await
    .expect("both given");
    assert_eq!(
        recv_json(&mut ws, WAIT).await.expect("welcome")["user"],
        "header-user"
    );
    assert_silent(&mut ws, Duration::from_millis(10)).await;
}
