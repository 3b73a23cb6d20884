//! In-process tests of a whole standalone node (memory engines, real loopback sockets, a
//! tokio-tungstenite client): paths that need the node's parts together but no Redis and no
//! separate process. What needs Redis or signals is in the integration suite (tests/it).

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::cluster::inbox::NotifyOptions;
use crate::config::Config;
use crate::node::Node;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A standalone `--dev` node serving on a loopback port.
async fn serve() -> (Arc<Node>, u16, CancellationToken) {
    let node = Node::start(Config::parse_from(["herald", "--dev"])).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    tokio::spawn(crate::serve(node.clone(), listener, stop.clone()));
    (node, port, stop)
}

async fn connect(port: u16, user: &str) -> (Ws, Value) {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws?token={user}"))
            .await
            .unwrap();
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome");
    (ws, welcome)
}

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("open")
            .expect("frame");
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_session_is_caught_up_in_order_and_its_parked_copies_are_dropped() {
    let (node, port, stop) = serve().await;
    let (mut ws, welcome) = connect(port, "u").await;
    assert_eq!(welcome["unread"], 0);
    let plain = NotifyOptions::default();
    let first = node.publish_durable("u", b"1", &plain).await.unwrap();
    assert_eq!(next_json(&mut ws).await["id"], first.to_string().as_str());

    // As after a rebuilt subscription: every session parked, then messages published (their
    // live copies are parked too), then the catch-up pass.
    assert_eq!(node.hub_hold_all_for_test(), 1);
    let mut ids = Vec::new();
    for i in 2..=4 {
        ids.push(
            node.publish_durable("u", i.to_string().as_bytes(), &plain)
                .await
                .unwrap()
                .to_string(),
        );
    }
    node.catch_up_all_for_test().await;
    for (i, id) in ids.iter().enumerate() {
        let m = next_json(&mut ws).await;
        assert_eq!(m["id"], id.as_str());
        assert_eq!(m["data"], i as i64 + 2);
    }
    // The parked live copies were duplicates: the next frame is the next message.
    let fifth = node.publish_durable("u", b"5", &plain).await.unwrap();
    assert_eq!(next_json(&mut ws).await["id"], fifth.to_string().as_str());
    stop.cancel();
}
