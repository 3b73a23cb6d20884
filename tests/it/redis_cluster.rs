//! Redis Cluster: herald nodes on a 3-master/3-replica cluster deliver across nodes to
//! users whose slots lie on every shard (sharded channels: SSUBSCRIBE on the shard that owns
//! the user's slot, SPUBLISH by producers and by `herald_notify`), broadcast and topics to
//! everyone, keep each durable inbox in its user's slot, count a producer's plain PUBLISH
//! instead of delivering it, and, when a shard master is killed (`kill -9`) under a steady
//! stream of durable and plain publishes, go not-ready only for the failover and deliver
//! every durable message exactly once; and when a user's slot is moved to another master
//! (manual resharding) under the same stream, keep the user's sessions, subscribe the
//! user's channel on the new owner and deliver every durable message exactly once.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

/// The bound this suite states for a shard failover: from `kill -9` of a shard master until
/// every node answers /readyz with 200 again. The cluster needs its node timeout (2 s) to
/// call the master failed and about a second more for the replica's election; the node
/// then needs up to one probe interval (1 s at `--presence-ttl 3`) for every shard's canary
/// to come back and one to resubscribe; the rest is slack for a loaded 2-core machine.
const READY_AGAIN_WITHIN: Duration = Duration::from_secs(15);

/// A user's key or channel of `kind` as herald names it: the user id is the hash tag, so
/// all of a user's state (inbox, cursor, channel) lives in one slot (docs/redis.md).
fn user_key(prefix: &str, kind: &str, user: &str) -> String {
    format!("{prefix}:{kind}:{{{user}}}")
}

/// Users `<stem>0`, `<stem>1`, ... until their slots cover every master, at least `min`.
fn users_on_every_shard(cluster: &RedisCluster, stem: &str, min: usize) -> Vec<String> {
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "three shards");
    let mut users = Vec::new();
    let mut covered = BTreeSet::new();
    for i in 0..200 {
        let u = format!("{stem}{i}");
        covered.insert(cluster.master_of(&format!("{{{u}}}")));
        users.push(u);
        if covered.len() == masters.len() && users.len() >= min {
            return users;
        }
    }
    panic!("200 users did not cover every shard");
}

/// Entry ids of `user`'s inbox stream, read on the master that owns it.
fn inbox_ids(cluster: &RedisCluster, prefix: &str, user: &str) -> Vec<String> {
    let key = user_key(prefix, "inbox", user);
    let entries: Vec<(String, HashMap<String, redis::Value>)> = cluster
        .cmd_for(&key, &["XRANGE", &key, "-", "+"])
        .expect("xrange on the owning master");
    entries.into_iter().map(|(id, _)| id).collect()
}

async fn ready_nodes(cluster: &RedisCluster, prefix: &str, ids: &[&str]) -> Vec<Herald> {
    let mut nodes = Vec::new();
    for id in ids {
        nodes.push(Herald::spawn(NodeOpts::redis_cluster(cluster, prefix, id)).await);
    }
    for n in &nodes {
        n.wait_ready().await;
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_every_shard_get_plain_durable_and_raw_sharded_messages_across_nodes() {
    let cluster = RedisCluster::start("deliver");
    let nodes = ready_nodes(&cluster, "cx", &["a", "b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let users = users_on_every_shard(&cluster, "u", 6);

    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for u in &users {
        on_a.push(connect(a, u, &[]).await);
        on_b.push(connect(b, u, &[]).await);
    }
    // Each user's channel is a sharded channel on the master that owns its slot, with one
    // subscriber per node; nothing is subscribed classically.
    for u in &users {
        let ch = user_key("cx", "user", u);
        let n: Vec<redis::Value> = cluster
            .cmd_for(&ch, &["PUBSUB", "SHARDNUMSUB", &ch])
            .expect("shardnumsub");
        assert_eq!(n.get(1), Some(&redis::Value::Int(2)), "{ch}: {n:?}");
    }

    for (i, u) in users.iter().enumerate() {
        // Through the API of the node the sessions are not on, and the other.
        b.publish(json!({"user": u, "data": {"plain": i}})).await;
        let id = a.publish_durable(u, json!({"durable": i})).await;
        for c in [&mut on_a[i], &mut on_b[i]] {
            let m = recv_message(&mut c.ws, WAIT).await.expect("plain");
            assert_eq!(m["data"], json!({"plain": i}));
            assert_eq!(m["channel"], format!("user:{u}"));
            let m = recv_message(&mut c.ws, WAIT).await.expect("durable");
            assert_eq!(m["data"], json!({"durable": i}));
            assert_eq!(m["id"], id.as_str());
        }
        assert_eq!(inbox_ids(&cluster, "cx", u), vec![id]);
    }

    // The producer contract, straight to Redis: SPUBLISH on the user's channel, and
    // FCALL herald_notify on the user's inbox key, each on the master that owns the slot.
    let u = &users[0];
    let ch = user_key("cx", "user", u);
    let n: i64 = cluster
        .cmd_for(&ch, &["SPUBLISH", &ch, "raw sharded"])
        .expect("spublish");
    assert_eq!(n, 2, "one subscriber per node");
    let inbox = user_key("cx", "inbox", u);
    let id: String = cluster
        .cmd_for(
            &inbox,
            &["FCALL", "herald_notify", "1", &inbox, "{\"via\":\"fcall\"}"],
        )
        .expect("fcall herald_notify");
    for c in [&mut on_a[0], &mut on_b[0]] {
        assert_eq!(
            recv_message(&mut c.ws, WAIT).await.expect("spublish")["data"],
            "raw sharded"
        );
        let m = recv_message(&mut c.ws, WAIT).await.expect("fcall");
        assert_eq!(m["id"], id.as_str());
        assert_eq!(m["data"], json!({"via": "fcall"}));
    }

    // A plain PUBLISH is not delivered under Redis Cluster: each node counts it.
    let _: i64 = cluster
        .cmd_for(&ch, &["PUBLISH", &ch, "unsharded"])
        .expect("publish");
    for n in [a, b] {
        eventually(WAIT, "the plain PUBLISH counted", || async {
            (n.metric("herald_messages_dropped_total{reason=\"unsharded_publish\"}")
                .await
                == 1.0)
                .then_some(())
        })
        .await;
    }
    for c in on_a.iter_mut().chain(on_b.iter_mut()) {
        assert_silent(&mut c.ws, Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_topics_presence_stats_and_disconnect_work_on_a_cluster() {
    let cluster = RedisCluster::start("shared");
    let nodes = ready_nodes(&cluster, "cs", &["a", "b", "c"]).await;
    let users = users_on_every_shard(&cluster, "p", 3);

    // Broadcast: every session on every node, once.
    let mut clients = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        clients.push(connect(n, &users[i], &["news"]).await);
    }
    let (status, body) = nodes[1]
        .api_post("/api/publish", &json!({"broadcast": true, "data": "all"}))
        .await;
    assert_eq!((status, body), (200, json!({"ok": true, "channels": 1})));
    for c in clients.iter_mut() {
        let m = recv_message(&mut c.ws, WAIT).await.expect("broadcast");
        assert_eq!(
            m,
            json!({"type":"message","channel":"broadcast","data":"all"})
        );
    }
    // Topics: only the sessions that joined.
    let mut sports = connect(&nodes[2], &users[0], &["sports"]).await;
    nodes[0]
        .publish(json!({"topic": "sports", "data": "score"}))
        .await;
    let m = recv_message(&mut sports.ws, WAIT).await.expect("topic");
    assert_eq!(
        m,
        json!({"type":"message","channel":"topic:sports","data":"score"})
    );
    nodes[0]
        .publish(json!({"topic": "news", "data": "headline"}))
        .await;
    for c in clients.iter_mut() {
        assert_eq!(
            recv_message(&mut c.ws, WAIT).await.expect("news")["data"],
            "headline"
        );
        assert_silent(&mut c.ws, Duration::from_millis(100)).await;
    }
    assert_silent(&mut sports.ws, Duration::from_millis(100)).await;

    // Presence and stats, read on any node.
    nodes[0].wait_presence_nodes(&users[0], &["a", "c"]).await;
    nodes[1].wait_presence_nodes(&users[2], &["c"]).await;
    let stats = eventually(WAIT, "stats count every session", || async {
        let s = nodes[2].stats().await;
        (s["connections"] == 4).then_some(s)
    })
    .await;
    assert_eq!(stats["users"], 3, "{stats}");

    // The disconnect API reaches the user's sessions on every node.
    let (status, _) = nodes[1]
        .api_post(&format!("/api/disconnect/{}", users[0]), &json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        expect_close(&mut clients[0].ws, WAIT).await,
        Ended::Close(4002)
    );
    assert_eq!(expect_close(&mut sports.ws, WAIT).await, Ended::Close(4002));
    eventually(WAIT, "the kicked user offline", || async {
        (!nodes[1].online(&users[0]).await).then_some(())
    })
    .await;
    assert!(nodes[0].online(&users[1]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_durable_inbox_replays_and_acks_on_the_users_shard() {
    let cluster = RedisCluster::start("inbox");
    let nodes = ready_nodes(&cluster, "ci", &["a", "b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    for u in users_on_every_shard(&cluster, "i", 3) {
        let id1 = a.publish_durable(&u, json!(1)).await;
        let id2 = b.publish_durable(&u, json!(2)).await;
        let id3 = a.publish_durable(&u, json!(3)).await;
        assert_eq!(
            inbox_ids(&cluster, "ci", &u),
            vec![id1.clone(), id2.clone(), id3.clone()]
        );

        // A session on the other node replays after `since`, and its ack moves the cursor
        // (in the user's slot, next to the inbox).
        let url = b.ws_url(&format!("?token={}&since={id1}", token(&u, &[])));
        let mut c = connect_url(&url).await;
        let m = recv_message(&mut c.ws, WAIT).await.expect("replay 2");
        assert_eq!(m["id"], id2.as_str());
        let m = recv_message(&mut c.ws, WAIT).await.expect("replay 3");
        assert_eq!(m["id"], id3.as_str());
        send_text(&mut c.ws, &format!(r#"{{"type":"ack","id":"{id3}"}}"#)).await;
        let cursor = user_key("ci", "cursor", &u);
        eventually(WAIT, "cursor moved", || async {
            let v: Option<String> = cluster.cmd_for(&cursor, &["GET", &cursor]).ok()?;
            (v.as_deref() == Some(id3.as_str())).then_some(())
        })
        .await;
        let fresh = connect(a, &u, &[]).await;
        assert_eq!(fresh.welcome["unread"], 0, "everything was acknowledged");
        close_client(fresh.ws).await;
        close_client(c.ws).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_master_failover_under_durable_load_loses_and_duplicates_nothing() {
    let mut cluster = RedisCluster::start("failover");
    let nodes = ready_nodes(&cluster, "cf", &["a", "b"]).await;
    let mut nodes = nodes.into_iter();
    let a = Arc::new(nodes.next().expect("a"));
    let b = Arc::new(nodes.next().expect("b"));
    let user = "fo";
    // One session of the user on each node: each must end up with the whole inbox.
    let c1 = connect(&a, user, &[]).await;
    let c2 = connect(&b, user, &[]).await;
    b.wait_presence_nodes(user, &["a", "b"]).await;
    let stop_readers = Arc::new(AtomicBool::new(false));
    let (got1, r1) = spawn_reader(c1.ws, stop_readers.clone());
    let (got2, r2) = spawn_reader(c2.ws, stop_readers.clone());

    // The producer: every 50 ms one durable and one plain message, alternating nodes.
    let producer = Producer::start(a.clone(), b.clone(), user);

    // Kill the master of the user's shard once a steady stream is flowing.
    eventually(WAIT, "20 durable messages accepted", || async {
        (producer.accepted() >= 20).then_some(())
    })
    .await;
    let tag = format!("{{{user}}}");
    let killed_at = Instant::now();
    let old = cluster.kill_master_of(&tag);
    let watch_a = tokio::spawn(not_ready_window(a.clone(), killed_at, READY_AGAIN_WITHIN));
    let watch_b = tokio::spawn(not_ready_window(b.clone(), killed_at, READY_AGAIN_WITHIN));
    let (wa, wb) = (watch_a.await.unwrap(), watch_b.await.unwrap());
    for (name, (down, up)) in [("a", wa), ("b", wb)] {
        let down =
            down.unwrap_or_else(|| panic!("node {name} never went not-ready after the kill"));
        let up = up.unwrap_or_else(|| panic!("node {name} not ready again after the kill"));
        assert!(
            up <= READY_AGAIN_WITHIN,
            "node {name} ready again only after {up:?} (bound {READY_AGAIN_WITHIN:?}); down at {down:?}"
        );
    }
    // The replica took over: every cluster node names a master other than the killed one.
    eventually(
        WAIT,
        "every cluster node names the promoted replica",
        || async {
            cluster
                .agreed_master_of(&tag)
                .filter(|&m| m != old)
                .map(|_| ())
        },
    )
    .await;
    // Presence is back: both sessions, each on its node.
    a.wait_presence_nodes(user, &["a", "b"]).await;

    // Twenty more after both nodes are back, then stop.
    let after = producer.accepted();
    eventually(
        WAIT,
        "20 more durable messages accepted after the failover",
        || async { (producer.accepted() >= after + 20).then_some(()) },
    )
    .await;
    let Produced {
        durable,
        plain_ok,
        plain_at,
        refused,
    } = producer.finish().await;

    // Both sessions survived and hold exactly the inbox: every accepted message, each once,
    // in inbox order.
    let inbox = inbox_ids(&cluster, "cf", user);
    let accepted_ids: BTreeSet<String> = durable.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(
        accepted_ids.len(),
        durable.len(),
        "one inbox id per accepted message"
    );
    let in_inbox: BTreeSet<String> = inbox.iter().cloned().collect();
    // Asynchronous replication may lose what the old master accepted and had not yet sent
    // to its replica (docs/operations.md): counted and printed, and every message the
    // clients got must be in the inbox.
    let durable_lost = accepted_ids.difference(&in_inbox).count();
    assert!(
        in_inbox.is_subset(&accepted_ids),
        "the inbox holds only accepted messages"
    );
    for (name, got) in [("a", &got1), ("b", &got2)] {
        wait_received(got, name, "has the whole inbox", |r| {
            r.durable.len() >= inbox.len()
        })
        .await;
    }
    stop_readers.store(true, Ordering::Relaxed);
    let _ = (r1.await, r2.await);
    let mut plain_lost = Vec::new();
    for (name, got) in [("a", &got1), ("b", &got2)] {
        let r = got.lock().unwrap();
        plain_lost.push(r.check_inbox(name, &inbox, &plain_ok));
        // When each lost plain message was accepted, in ms from the kill (negative: before
        // it), to tell which part of the failover costs them.
        let ms_from_kill = |t: &Instant| {
            if *t >= killed_at {
                t.duration_since(killed_at).as_millis() as i128
            } else {
                -(killed_at.duration_since(*t).as_millis() as i128)
            }
        };
        let seen: BTreeSet<i64> = r.plain.iter().copied().collect();
        let lost_at: Vec<(i64, i128)> = plain_ok
            .iter()
            .zip(&plain_at)
            .filter(|(p, _)| !seen.contains(*p))
            .map(|(p, t)| (*p, ms_from_kill(t)))
            .collect();
        let accepted_ms: Vec<i128> = plain_at.iter().map(ms_from_kill).collect();
        eprintln!(
            "cluster failover: plain lost on {name} (p, ms after the kill): {lost_at:?}; \
             every accepted plain at (ms): {accepted_ms:?}"
        );
    }
    // Printed for the record (bench/history.md), not asserted: plain messages are
    // fire-and-forget, and how many a failover costs depends on timing.
    eprintln!(
        "cluster failover: not ready a {:?}..{:?}, b {:?}..{:?} after the kill; durable \
         accepted {} (refused attempts {refused}), lost by replication {durable_lost}, \
         duplicated 0; plain accepted {}, lost {:?} (a, b)",
        wa.0,
        wa.1,
        wb.0,
        wb.1,
        durable.len(),
        plain_ok.len(),
        plain_lost
    );
}

/// True when the node's /readyz says its subscription is proven (every shard's canary back).
async fn pubsub_ok(node: &Herald) -> bool {
    node.readyz().await.1["pubsub"] == true
}

/// `SPUBLISH channel payload` on the master that owns the channel: how many subscribers got
/// it (0 when the command failed, e.g. during a failover).
fn spublish(cluster: &RedisCluster, channel: &str, payload: &str) -> i64 {
    cluster
        .cmd_for(channel, &["SPUBLISH", channel, payload])
        .unwrap_or(0)
}

/// The sharded channels of `pattern` on the node on `port`.
fn shard_channels(cluster: &RedisCluster, port: u16, pattern: &str) -> Vec<String> {
    let mut v: Vec<String> = cluster
        .cmd_on(port, &["PUBSUB", "SHARDCHANNELS", pattern])
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_hold_sharded_channels_with_one_canary_per_shard_and_count_plain_publish() {
    let cluster = RedisCluster::start("subs");
    let a = Herald::spawn(NodeOpts::redis_cluster(&cluster, "cb", "a")).await;
    let b = Herald::spawn(NodeOpts::redis_cluster(&cluster, "cb", "b")).await;
    for n in [&a, &b] {
        eventually(WAIT, "every shard's canary back", || async {
            pubsub_ok(n).await.then_some(())
        })
        .await;
    }
    // Broadcast and control are sharded channels every node subscribes to.
    assert_eq!(spublish(&cluster, "cb:broadcast", "{}"), 2);
    assert_eq!(spublish(&cluster, "cb:ctl", "{\"op\":\"noop\"}"), 2);
    // Each master holds exactly one canary channel of each node, in a slot it owns.
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    for node in ["a", "b"] {
        let mut tags = BTreeSet::new();
        for &m in &masters {
            let here = shard_channels(&cluster, m, &format!("cb:node:{node}:canary:*"));
            assert_eq!(here.len(), 1, "node {node} on master {m}: {here:?}");
            assert_eq!(
                cluster.master_of(&here[0]),
                m,
                "{} lives on its shard",
                here[0]
            );
            tags.insert(here[0].clone());
        }
        assert_eq!(tags.len(), 3);
    }
    // A plain PUBLISH on a herald channel is not delivered but counted by every node; one
    // on the presence events channel is not a publication for clients and is not counted.
    let any = masters[0];
    let _: i64 = cluster
        .cmd_on(any, &["PUBLISH", "cb:user:{someone}", "hi"])
        .expect("publish");
    let _: i64 = cluster
        .cmd_on(any, &["PUBLISH", "cb:events", "{}"])
        .expect("publish");
    let _: i64 = cluster
        .cmd_on(any, &["PUBLISH", "cb:topic:{t}", "hi"])
        .expect("publish");
    for n in [&a, &b] {
        eventually(WAIT, "plain PUBLISH counted", || async {
            let v = n
                .metric("herald_messages_dropped_total{reason=\"unsharded_publish\"}")
                .await;
            (v == 2.0).then_some(())
        })
        .await;
    }
    assert!(
        a.log_text().contains("plain PUBLISH"),
        "a warning names the mistake"
    );
}

/// The bound for the subscription alone to recover from a shard master's `kill -9`: the
/// node timeout (2 s) and the replica's election (about 1 s), then up to a canary round
/// (1 s) and the resubscription; the rest is slack for a loaded 2-core machine.
const PUBSUB_BACK_WITHIN: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_shard_master_dies_the_subscriptions_move_to_the_promoted_replica() {
    let mut cluster = RedisCluster::start("subfail");
    let a = Herald::spawn(NodeOpts::redis_cluster(&cluster, "cz", "a")).await;
    eventually(WAIT, "subscribed", || async {
        pubsub_ok(&a).await.then_some(())
    })
    .await;
    assert_eq!(spublish(&cluster, "cz:broadcast", "{}"), 1);

    // Kill the master that holds the broadcast channel (and one of a's canaries).
    let killed_at = Instant::now();
    let old = cluster.kill_master_of("cz:broadcast");
    let down = eventually(WAIT, "the subscription reported in doubt", || async {
        (!pubsub_ok(&a).await).then(|| killed_at.elapsed())
    })
    .await;
    let back = eventually(
        PUBSUB_BACK_WITHIN + WAIT,
        "the subscription proven again",
        || async { pubsub_ok(&a).await.then(|| killed_at.elapsed()) },
    )
    .await;
    assert!(
        back <= PUBSUB_BACK_WITHIN,
        "subscription back only after {back:?} (bound {PUBSUB_BACK_WITHIN:?})"
    );
    // The replica took over: every cluster node names a master other than the killed one.
    eventually(
        WAIT,
        "every cluster node names the promoted replica",
        || async {
            cluster
                .agreed_master_of("cz:broadcast")
                .filter(|&m| m != old)
                .map(|_| ())
        },
    )
    .await;
    // The broadcast channel is subscribed on the promoted replica, and every shard (the
    // promoted one too) holds the node's canary again.
    assert_eq!(spublish(&cluster, "cz:broadcast", "{}"), 1);
    for m in cluster.masters() {
        assert_eq!(
            shard_channels(&cluster, m, "cz:node:a:canary:*").len(),
            1,
            "a canary on master {m}"
        );
    }
    // It recovered on the same connection: redis-rs moved the subscriptions, the node did
    // not have to rebuild it from the seeds.
    let log = a.log_text();
    assert!(
        !log.contains("cluster pub/sub connection lost"),
        "the subscription connection was rebuilt"
    );
    eprintln!(
        "cluster subscription failover: in doubt {down:?} after the kill, proven again {back:?}"
    );
}

/// Every event in `<prefix>:events` (on the master that owns it), as (type, user, reason).
fn events(cluster: &RedisCluster, prefix: &str) -> Vec<(String, String, String)> {
    let key = format!("{prefix}:events");
    let raw: Vec<(String, Vec<(String, String)>)> = cluster
        .cmd_for(&key, &["XRANGE", &key, "-", "+"])
        .unwrap_or_default();
    raw.into_iter()
        .map(|(_, fields)| {
            let f: HashMap<String, String> = fields.into_iter().collect();
            (
                f.get("type").cloned().unwrap_or_default(),
                f.get("user").cloned().unwrap_or_default(),
                f.get("reason").cloned().unwrap_or_default(),
            )
        })
        .collect()
}

fn count(evs: &[(String, String, String)], kind: &str, user: &str) -> usize {
    evs.iter()
        .filter(|(k, u, _)| k == kind && u == user)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_users_on_every_shard_get_exactly_one_offline() {
    let cluster = RedisCluster::start("offline");
    let node = |id: &str| NodeOpts::redis_cluster(&cluster, "co", id).arg("--offline-grace", "1");
    let mut a = Herald::spawn(node("a")).await;
    let b = Herald::spawn(node("b")).await;
    let c = Herald::spawn(node("c")).await;
    for n in [&a, &b, &c] {
        n.wait_ready().await;
    }
    let users = users_on_every_shard(&cluster, "k", 3);
    let mut clients = Vec::new();
    for u in &users {
        clients.push(connect(&a, u, &[]).await);
    }
    clients.push(connect(&a, "shared", &[]).await);
    let _shared_on_b = connect(&b, "shared", &[]).await;
    for u in &users {
        eventually(WAIT, &format!("online event for {u}"), || async {
            (count(&events(&cluster, "co"), "online", u) == 1).then_some(())
        })
        .await;
    }

    a.kill9();
    drop(clients);
    // TTL 3 s + grace 1 s + reaper cadence, with slack for a loaded machine.
    for u in &users {
        eventually(
            Duration::from_secs(20),
            &format!("offline event for {u}"),
            || async {
                events(&cluster, "co")
                    .into_iter()
                    .find(|(k, user, _)| k == "offline" && user == u)
                    .map(|(_, _, reason)| assert_eq!(reason, "expired"))
            },
        )
        .await;
    }
    // b and c both run the reaper; give them time to (wrongly) emit twice.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let evs = events(&cluster, "co");
    for u in &users {
        assert_eq!(count(&evs, "offline", u), 1, "{evs:?}");
    }
    assert_eq!(count(&evs, "offline", "shared"), 0, "{evs:?}");
    assert_eq!(count(&evs, "online", "shared"), 1, "{evs:?}");
    assert!(b.online("shared").await);
}

/// The log line the subscriber writes when Redis drops one of its sharded subscriptions
/// because the channel's slot moved away (src/cluster/broker/sharded.rs).
const RESUBSCRIBED: &str = "a sharded subscription was dropped by the cluster";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_a_users_slot_under_durable_load_keeps_sessions_and_loses_nothing() {
    let cluster = RedisCluster::start("reshard");
    let nodes = ready_nodes(&cluster, "cr", &["a", "b"]).await;
    let mut nodes = nodes.into_iter();
    let a = Arc::new(nodes.next().expect("a"));
    let b = Arc::new(nodes.next().expect("b"));
    let user = "rs";
    let tag = format!("{{{user}}}");
    let channel = user_key("cr", "user", user);
    // One session of the user on each node: each must end up with the whole inbox.
    let c1 = connect(&a, user, &[]).await;
    let c2 = connect(&b, user, &[]).await;
    b.wait_presence_nodes(user, &["a", "b"]).await;
    let stop_readers = Arc::new(AtomicBool::new(false));
    let (got1, r1) = spawn_reader(c1.ws, stop_readers.clone());
    let (got2, r2) = spawn_reader(c2.ws, stop_readers.clone());
    // A bystander on node a whose slot stays where it is: the move must not park it or
    // catch it up (only the moved user channel's sessions need that).
    let src_before = cluster.master_of(&tag);
    let bystander = (0..200)
        .map(|i| format!("by{i}"))
        .find(|u| cluster.master_of(&format!("{{{u}}}")) != src_before)
        .expect("a user whose slot is on another master");
    let _c3 = connect(&a, &bystander, &[]).await;
    a.wait_presence_nodes(&bystander, &["a"]).await;
    let caught_up_before = a.metric("herald_catch_up_sessions_total").await;

    // The producer: every 50 ms one durable and one plain message, alternating nodes.
    let producer = Producer::start(a.clone(), b.clone(), user);
    let more = |n: usize| {
        let target = producer.accepted() + n;
        let producer = &producer;
        async move {
            eventually(
                WAIT,
                &format!("{target} durable messages accepted"),
                || async { (producer.accepted() >= target).then_some(()) },
            )
            .await;
        }
    };
    more(10).await;

    // Move the user's slot to another master while the producer goes on, with a pause at
    // each step: while the slot is migrating with its keys on the source, after the keys
    // moved (the source answers ASK for them), and after the new owner was announced.
    let slot = cluster.slot(&tag);
    let src = cluster.master_of(&tag);
    let dst = cluster
        .masters()
        .into_iter()
        .find(|&p| p != src)
        .expect("another master");
    // While the slot is migrating, Redis refuses a script that touches a key of the slot
    // it does not hold (herald_notify creates the idempotency key): durable publishes are
    // refused (503) and retried until the move ends, so here the wait is for ticks of the
    // producer, not for accepted messages.
    let ticks = |n: usize| {
        let target = producer.attempts() + n;
        let producer = &producer;
        async move {
            eventually(WAIT, &format!("{target} producer ticks"), || async {
                (producer.attempts() >= target).then_some(())
            })
            .await;
        }
    };
    let mv = cluster.begin_slot_move(slot, dst);
    ticks(10).await;
    let moved = cluster.migrate_slot_keys(&mv);
    assert!(moved > 0, "the user's inbox and cursor live in the slot");
    ticks(10).await;
    cluster.finish_slot_move(&mv);
    eventually(WAIT, "every cluster node names the new owner", || async {
        (cluster.agreed_master_of(&tag) == Some(dst)).then_some(())
    })
    .await;

    // Redis dropped each node's subscription of the user's channel on the old owner (an
    // SUNSUBSCRIBE push); each node subscribed again, now on the new owner.
    for (name, n) in [("a", &a), ("b", &b)] {
        eventually(
            WAIT,
            &format!("node {name} logged the resubscription"),
            || async {
                let log = n.log_text();
                log.lines()
                    .any(|l| l.contains(RESUBSCRIBED) && l.contains(&channel))
                    .then_some(())
            },
        )
        .await;
        assert!(
            n.metric("herald_pubsub_slot_moves_total").await >= 1.0,
            "node {name} counted the moved subscription"
        );
    }
    eventually(WAIT, "both nodes subscribed on the new owner", || async {
        let v: Vec<redis::Value> = cluster
            .cmd_on(dst, &["PUBSUB", "SHARDNUMSUB", &channel])
            .ok()?;
        (v.get(1) == Some(&redis::Value::Int(2))).then_some(())
    })
    .await;
    let on_src: Vec<redis::Value> = cluster
        .cmd_on(src, &["PUBSUB", "SHARDNUMSUB", &channel])
        .expect("shardnumsub on the old owner");
    assert_eq!(on_src.get(1), Some(&redis::Value::Int(0)), "{on_src:?}");
    for n in [&a, &b] {
        n.wait_ready().await;
    }
    // Node a caught up the moved user's session, and only it.
    eventually(
        WAIT,
        "node a caught the moved user's session up",
        || async {
            (a.metric("herald_catch_up_sessions_total").await > caught_up_before).then_some(())
        },
    )
    .await;
    // Presence followed the slot: both sessions, each on its node, read on either node.
    a.wait_presence_nodes(user, &["a", "b"]).await;
    b.wait_presence_nodes(user, &["a", "b"]).await;
    more(20).await;
    let Produced {
        durable,
        plain_ok,
        refused,
        ..
    } = producer.finish().await;

    // Later messages, plain and durable, reach both sessions.
    a.publish(json!({"user": user, "data": {"p": -1}})).await;
    let last = b.publish_durable(user, json!({"k": -1})).await;
    for (name, got) in [("a", &got1), ("b", &got2)] {
        wait_received(got, name, "got the later messages", |r| {
            r.plain.contains(&-1) && r.durable.iter().any(|(id, _)| *id == last)
        })
        .await;
    }
    stop_readers.store(true, Ordering::Relaxed);
    let _ = (r1.await, r2.await);
    assert_eq!(
        a.metric("herald_catch_up_sessions_total").await - caught_up_before,
        1.0,
        "node a caught up the moved user's one session, not the bystander's"
    );

    // No failover: every accepted durable message is in the inbox on the new owner, and
    // each session received exactly the inbox, in order, once each.
    let inbox: Vec<String> = {
        let key = user_key("cr", "inbox", user);
        let entries: Vec<(String, HashMap<String, redis::Value>)> = cluster
            .cmd_on(dst, &["XRANGE", &key, "-", "+"])
            .expect("xrange on the new owner");
        entries.into_iter().map(|(id, _)| id).collect()
    };
    let mut accepted: Vec<String> = durable.iter().map(|(_, id)| id.clone()).collect();
    accepted.push(last.clone());
    assert_eq!(
        inbox.iter().cloned().collect::<BTreeSet<_>>(),
        accepted.iter().cloned().collect::<BTreeSet<_>>(),
        "the inbox holds every accepted message"
    );
    assert_eq!(inbox.len(), accepted.len(), "one inbox entry per message");
    let mut plain_lost = Vec::new();
    for (name, got) in [("a", &got1), ("b", &got2)] {
        let r = got.lock().unwrap();
        plain_lost.push(r.check_inbox(name, &inbox, &plain_ok));
    }

    // Replay and ack on the new owner: a session that saw all but the last two replays
    // them, and its ack moves the cursor, which lives on the new owner.
    let n = inbox.len();
    let url = b.ws_url(&format!(
        "?token={}&since={}",
        token(user, &[]),
        inbox[n - 3]
    ));
    let mut c = connect_url(&url).await;
    for id in &inbox[n - 2..] {
        let m = recv_message(&mut c.ws, WAIT).await.expect("replay");
        assert_eq!(m["id"], id.as_str());
    }
    send_text(&mut c.ws, &format!(r#"{{"type":"ack","id":"{last}"}}"#)).await;
    let cursor = user_key("cr", "cursor", user);
    eventually(WAIT, "the cursor moved on the new owner", || async {
        let v: Option<String> = cluster.cmd_on(dst, &["GET", &cursor]).ok()?;
        (v.as_deref() == Some(last.as_str())).then_some(())
    })
    .await;
    let fresh = connect(&a, user, &[]).await;
    assert_eq!(fresh.welcome["unread"], 0, "everything was acknowledged");
    close_client(fresh.ws).await;
    close_client(c.ws).await;

    // Printed for the record: plain messages are fire-and-forget, and those published
    // between the old owner's SUNSUBSCRIBE and the new subscription are not delivered.
    eprintln!(
        "resharding: slot {slot} moved {src} -> {dst} with {moved} keys; durable accepted {} \
         (refused attempts {refused}), lost 0, duplicated 0; plain accepted {}, lost {:?} (a, b)",
        durable.len(),
        plain_ok.len(),
        plain_lost
    );
}
