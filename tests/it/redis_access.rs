//! Who may talk to Redis, and how: a node over TLS (`rediss://`) and with a password or an
//! ACL user, and a producer ACL user that can notify and publish but cannot kick users,
//! move cursors or touch presence (the ACL docs/redis.md recommends).

use std::time::Duration;

use crate::support::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_redis_over_tls_when_it_trusts_the_ca() {
    let ca = TestCa::new("node");
    let redis = RedisServer::start_tls(&ca.cert(), &ca.key());
    let ca_file = ca.ca().display().to_string();
    let a =
        Herald::spawn(NodeOpts::cluster(&redis, "tls", "a").env("SSL_CERT_FILE", &ca_file)).await;
    a.wait_ready().await;
    let mut c = connect(&a, "u", &[]).await;
    let (status, body) = a
        .api_post(
            "/api/publish",
            &json!({"user": "u", "durable": true, "data": "over tls"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let m = recv_message(&mut c.ws, WAIT)
        .await
        .expect("delivered over TLS");
    assert_eq!(m["data"], "over tls");

    // A node that does not trust the server's certificate never becomes ready.
    let b = Herald::spawn(NodeOpts::cluster(&redis, "tls", "b")).await;
    eventually(WAIT, "TLS connection attempts refused", || async {
        (b.metric("herald_redis_errors_total{op=\"pubsub_connect\"}")
            .await
            >= 2.0)
            .then_some(())
    })
    .await;
    assert!(
        !b.ready().await,
        "an untrusted Redis must not make the node ready"
    );
    assert!(ca.path().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_authenticates_with_a_password_or_an_acl_user() {
    let redis = RedisServer::start_with_password("node-secret-0123456789");
    let a = Herald::spawn(NodeOpts::cluster(&redis, "pw", "a")).await;
    a.wait_ready().await;
    let _: String = redis
        .cmd(&[
            "ACL",
            "SETUSER",
            "herald-node",
            "on",
            ">node-acl-secret-01234",
            "~pw:*",
            "&pw:*",
            "+@all",
        ])
        .expect("acl user");
    let mut opts = NodeOpts::cluster(&redis, "pw", "b");
    opts.redis_url = Some(redis.url_as("herald-node", "node-acl-secret-01234"));
    let b = Herald::spawn(opts).await;
    b.wait_ready().await;
    let mut c = connect(&a, "u", &[]).await;
    b.publish(json!({"user": "u", "data": "across nodes"}))
        .await;
    assert_eq!(
        recv_message(&mut c.ws, WAIT).await.expect("delivered")["data"],
        "across nodes"
    );
    // A wrong password keeps a node not ready.
    let mut opts = NodeOpts::cluster(&redis, "pw", "c");
    opts.redis_url = Some(redis.url_as("herald-node", "wrong-password-0123"));
    let c_node = Herald::spawn(opts).await;
    eventually(WAIT, "authentication refused", || async {
        (c_node
            .metric("herald_redis_errors_total{op=\"heartbeat\"}")
            .await
            >= 2.0)
            .then_some(())
    })
    .await;
    assert!(!c_node.ready().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_acl_user_can_notify_and_publish_but_not_kick_or_touch_state() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "acl", "a")).await;
    a.wait_ready().await;
    // The producer ACL of docs/redis.md ("Who may talk to Redis"), for prefix `acl`.
    let _: String = redis
        .cmd(&[
            "ACL",
            "SETUSER",
            "producer",
            "on",
            ">producer-secret-0123",
            "resetkeys",
            "resetchannels",
            "%RW~acl:inbox:*",
            "%RW~acl:gone:*",
            "%RW~acl:trimmed:*",
            "%RW~acl:collapse:*",
            "%RW~acl:idem:*",
            "%R~acl:cursor:*",
            "&acl:user:*",
            "&acl:topic:*",
            "&acl:broadcast",
            "-@all",
            "+fcall",
            "+publish",
            "+xadd",
            "+xlen",
            "+xtrim",
            "+xrange",
            "+xrevrange",
            "+pexpire",
            "+get",
            "+set",
            "+zadd",
            "+zscore",
            "+zremrangebyscore",
            "+exists",
            "+time",
        ])
        .expect("producer acl");
    let as_producer =
        |args: &[&str]| redis.cmd_as::<redis::Value>("producer", "producer-secret-0123", args);
    let mut c = connect(&a, "u", &[]).await;

    let id = as_producer(&[
        "FCALL",
        "herald_notify",
        "1",
        "acl:inbox:{u}",
        "durable",
        "idem",
        "k",
        "collapse",
        "c",
    ])
    .expect("the producer may notify");
    assert!(matches!(id, redis::Value::BulkString(_)), "{id:?}");
    assert_eq!(
        recv_message(&mut c.ws, WAIT).await.expect("durable")["data"],
        "durable"
    );
    as_producer(&["PUBLISH", "acl:user:{u}", "plain"]).expect("the producer may publish");
    assert_eq!(
        recv_message(&mut c.ws, WAIT).await.expect("plain")["data"],
        "plain"
    );

    let denied = |args: &[&str]| {
        let err = as_producer(args).expect_err(&format!("{args:?} must be refused"));
        assert!(
            err.to_string().to_uppercase().contains("NOPERM"),
            "{args:?}: {err}"
        );
    };
    denied(&["PUBLISH", "acl:ctl", r#"{"op":"disconnect","user":"u"}"#]);
    denied(&[
        "FCALL",
        "herald_ack",
        "2",
        "acl:cursor:{u}",
        "acl:inbox:{u}",
        "9999999999999-0",
        "",
    ]);
    denied(&["SET", "acl:presence:{u}", "x"]);
    denied(&["ZADD", "acl:nodes", "1", "u"]);
    denied(&["ZADD", "acl:online:{acl:events}", "1", "u"]);
    denied(&["PUBLISH", "acl:events", "{}"]);
    denied(&["DEL", "acl:inbox:{u}"]);
    // The session is still there: nothing the producer may do could kick it.
    assert_silent(&mut c.ws, Duration::from_millis(300)).await;
    assert_eq!(a.presence_sessions("u").await.len(), 1);
}
