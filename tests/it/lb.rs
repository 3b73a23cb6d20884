//! Three nodes behind a real nginx configured from deploy/nginx-local.conf.tmpl (the twin of
//! deploy/nginx.conf): clients connect and producers publish through the load balancer,
//! sessions spread over the nodes, and a SIGTERMed node's clients are closed with 1012 and
//! reconnect through nginx onto the remaining nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::support::*;
use serde_json::{json, Value};

/// POSTs to /api/publish on nginx's internal server with the API key and requires a 200.
/// The public server does not serve the API at all.
async fn publish_via_lb(http: &reqwest::Client, lb: &Nginx, body: Value) {
    let public = http
        .post(lb.url("/api/publish"))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await
        .expect("publish on the public server");
    assert_eq!(public.status(), 404, "/api/ must not be public");
    let r = http
        .post(lb.api_url("/api/publish"))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await
        .expect("publish through nginx");
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    assert_eq!(status, 200, "publish through nginx: {text}");
}

/// Connects through nginx, retrying while the upgrade fails (nginx may briefly have no
/// live node to offer), and returns the client.
async fn connect_via_lb(lb: &Nginx, user: &str) -> Client {
    let url = lb.ws_url(user, &[]);
    let ws = eventually(WAIT, &format!("{user} connects through nginx"), || {
        let url = url.clone();
        async move { open(&url).await.ok() }
    })
    .await;
    let mut ws = ws;
    let welcome = recv_json(&mut ws, WAIT).await.expect("welcome frame");
    assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
    assert_eq!(welcome["user"], user, "welcome: {welcome}");
    Client { ws, welcome }
}

fn node_of(c: &Client) -> String {
    c.welcome["node"].as_str().unwrap_or_default().to_string()
}

/// Every client's next message frame is on `channel` and carries `data`.
async fn all_receive(clients: &mut [Client], channel: &str, data: &Value) {
    for (i, c) in clients.iter_mut().enumerate() {
        let m = recv_message(&mut c.ws, WAIT)
            .await
            .unwrap_or_else(|| panic!("client {i} on {} got no message", node_of(c)));
        assert_eq!(
            (&m["channel"], &m["data"]),
            (&json!(channel), data),
            "client {i} on {}: {m}",
            node_of(c)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_spread_over_nodes_behind_nginx_and_move_when_one_drains() {
    // Fail first, before starting anything, if nginx is missing.
    nginx_bin();
    let redis = RedisServer::start();
    let mut nodes = Vec::new();
    for id in ["lb-1", "lb-2", "lb-3"] {
        nodes.push(Herald::spawn(NodeOpts::cluster(&redis, "lb", id)).await);
    }
    for n in &nodes {
        n.wait_ready().await;
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client");
    let mut lb = Nginx::start([&nodes[0], &nodes[1], &nodes[2]], &http).await;

    // /metrics stays private to the nodes.
    let r = http.get(lb.url("/metrics")).send().await.expect("get");
    assert_eq!(r.status(), 404, "/metrics must not be exposed by the LB");

    // Six sessions of one user and one of another, all through nginx.
    let mut alice = Vec::new();
    for _ in 0..6 {
        alice.push(connect_via_lb(&lb, "alice").await);
    }
    let mut bob = vec![connect_via_lb(&lb, "bob").await];
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for c in alice.iter().chain(&bob) {
        *spread.entry(node_of(c)).or_default() += 1;
    }
    eprintln!("sessions per node through nginx: {spread:?}");
    assert!(
        spread.len() >= 2,
        "nginx should spread sessions over the nodes: {spread:?}"
    );

    // A user message and a broadcast, published through nginx.
    let to_alice = json!({"user": "alice", "data": {"n": 1}});
    publish_via_lb(&http, &lb, to_alice).await;
    publish_via_lb(&http, &lb, json!({"broadcast": true, "data": {"n": 2}})).await;
    all_receive(&mut alice, "user:alice", &json!({"n": 1})).await;
    // bob's first message is the broadcast: alice's message did not reach him.
    all_receive(&mut alice, "broadcast", &json!({"n": 2})).await;
    all_receive(&mut bob, "broadcast", &json!({"n": 2})).await;

    // SIGTERM the node holding alice's first session.
    let victim_id = node_of(&alice[0]);
    let victim = nodes
        .iter()
        .position(|n| n.node_id == victim_id)
        .expect("welcome names a known node");
    nodes[victim].signal("TERM");

    let (moved, stayed): (Vec<Client>, Vec<Client>) =
        alice.into_iter().partition(|c| node_of(c) == victim_id);
    let (bob_moved, bob_stayed): (Vec<Client>, Vec<Client>) =
        bob.into_iter().partition(|c| node_of(c) == victim_id);
    let mut alice: Vec<Client> = stayed;
    let mut bob: Vec<Client> = bob_stayed;
    for (user, group) in [("alice", moved), ("bob", bob_moved)] {
        for mut c in group {
            assert_eq!(
                expect_close(&mut c.ws, WAIT).await,
                Ended::Close(1012),
                "a draining node closes its sessions with 1012 (service restart)"
            );
            let again = connect_via_lb(&lb, user).await;
            assert_ne!(
                node_of(&again),
                victim_id,
                "a reconnect must not land on the draining node"
            );
            if user == "alice" {
                alice.push(again);
            } else {
                bob.push(again);
            }
        }
    }
    assert_eq!(alice.len(), 6);
    assert_eq!(bob.len(), 1);
    let nodes_now: BTreeSet<String> = alice.iter().chain(&bob).map(node_of).collect();
    assert!(!nodes_now.contains(&victim_id), "{nodes_now:?}");

    // The drained node exits cleanly on its own.
    let status = nodes[victim]
        .wait_exit(Duration::from_secs(40))
        .await
        .expect("the drained node exits");
    assert!(status.success(), "drained node exit status: {status}");

    // Delivery through nginx still reaches everyone, with one node gone.
    publish_via_lb(&http, &lb, json!({"user": "alice", "data": {"n": 3}})).await;
    publish_via_lb(&http, &lb, json!({"broadcast": true, "data": {"n": 4}})).await;
    all_receive(&mut alice, "user:alice", &json!({"n": 3})).await;
    all_receive(&mut alice, "broadcast", &json!({"n": 4})).await;
    all_receive(&mut bob, "broadcast", &json!({"n": 4})).await;

    lb.assert_running();
}
