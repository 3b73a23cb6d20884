//! Multi-node delivery through a real redis-server: user, broadcast and topic channels,
//! from the HTTP API and from raw Redis PUBLISH.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_message_published_on_one_node_reaches_sessions_on_every_node() {
    let redis = RedisServer::start();
    let a = Herald::spawn(NodeOpts::cluster(&redis, "t1", "a")).await;
    let b = Herald::spawn(NodeOpts::cluster(&redis, "t1", "b")).await;
    a.wait_ready().await;
    b.wait_ready().await;

    let mut on_a = connect(&a, "42", &[]).await;
    let mut on_b = connect(&b, "42", &[]).await;
    let mut other = connect(&b, "7", &[]).await;
    assert_eq!(on_a.welcome["user"], "42");
    assert_eq!(on_b.welcome["node"], "b");

    a.publish(json!({"user": "42", "data": {"export": "ready"}}))
        .await;
    for c in [&mut on_a, &mut on_b] {
        let m = recv_message(&mut c.ws, WAIT).await.expect("message");
        assert_eq!(
            m,
            json!({"type":"message","channel":"user:42","data":{"export":"ready"}})
        );
    }
    // Raw Redis publish, the producer contract, with a non-JSON payload.
    assert!(redis.publish("t1:user:42", b"plain text") >= 2);
    for c in [&mut on_a, &mut on_b] {
        let m = recv_message(&mut c.ws, WAIT).await.expect("message");
        assert_eq!(m["data"], "plain text");
    }
    assert_silent(&mut other.ws, Duration::from_millis(300)).await;
}
