//! A Redis Cluster owned by one test: three masters and three replicas
//! (`redis-server --cluster-enabled yes`, joined by `redis-cli --cluster create
//! --cluster-replicas 1`), each node on a free loopback port below 55535 (its cluster bus
//! listens on the port + 10000) with its own directory and cluster config file. A master
//! can be killed (`kill -9`) on demand, and a slot can be moved from one master to another
//! by the manual resharding procedure; every process is stopped by its PID on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use super::WAIT;

/// The cluster's node timeout: how long a master may be unreachable before its replica
/// takes over. Short so a failover fits in a test, long enough that a loaded 2-core machine
/// does not trip it.
pub const NODE_TIMEOUT_MS: u64 = 2000;

/// One cluster node (master or replica).
pub struct ClusterNode {
    pub port: u16,
    child: Option<Child>,
}

impl ClusterNode {
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

/// Three masters, each with one replica.
pub struct RedisCluster {
    /// Every node, in the order given to `redis-cli --cluster create` (the first three
    /// start as masters). A killed node stays in the list, stopped.
    pub nodes: Vec<ClusterNode>,
    dir: PathBuf,
}

/// Data ports are taken from 20000-22767, so that they and their bus ports (30000-32767)
/// stay below the kernel's ephemeral range (32768 and up), where a port free a moment ago
/// may be taken by any outgoing connection. The walk starts at an offset of this process's
/// id so parallel test binaries do not race for the same ports; each candidate and its bus
/// port are checked free.
fn cluster_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    const LOW: u16 = 20000;
    const SPAN: u16 = 2768;
    let start = (std::process::id() % u32::from(SPAN)) as u16;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (start.wrapping_add(n.wrapping_mul(7))) % SPAN;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10000) {
            return port;
        }
    }
    panic!("no free cluster port pair");
}

fn redis_bin() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

impl RedisCluster {
    /// Starts six nodes, creates the cluster and waits until every node says
    /// `cluster_state:ok` and every replica is in sync with its master.
    pub fn start(name: &str) -> RedisCluster {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("redis-cluster-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cluster = RedisCluster {
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..6 {
            let port = cluster_port();
            let own = cluster.dir.join(port.to_string());
            std::fs::create_dir_all(&own).expect("cluster node dir");
            let child = Command::new(redis_bin())
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args([
                    "--cluster-config-file",
                    &own.join("nodes.conf").display().to_string(),
                ])
                .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
                .args(["--dir", &own.display().to_string()])
                .args(["--logfile", &own.join("redis.log").display().to_string()])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .args(["--repl-diskless-sync-delay", "0", "--loglevel", "notice"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (see README)");
            cluster.nodes.push(ClusterNode {
                port,
                child: Some(child),
            });
        }
        let deadline = Instant::now() + WAIT;
        for n in &cluster.nodes {
            while cluster.cmd_on::<String>(n.port, &["PING"]).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "redis-server did not start on {}",
                    n.port
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli must be installed (see README)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_healthy(3);
        cluster
    }

    /// Waits until every running node says `cluster_state:ok`, the slot map names
    /// `masters` masters, and each of them has a replica in sync.
    pub fn wait_healthy(&self, masters: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let ok = self.nodes.iter().filter(|n| n.running()).all(|n| {
                self.cmd_on::<String>(n.port, &["CLUSTER", "INFO"])
                    .is_ok_and(|i| i.contains("cluster_state:ok"))
            });
            let synced = ok && {
                let m = self.masters();
                m.len() == masters
                    && m.iter().all(|&p| {
                        self.cmd_on::<String>(p, &["INFO", "replication"])
                            .is_ok_and(|i| {
                                i.contains("connected_slaves:1") && i.contains("state=online")
                            })
                    })
            };
            if synced {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster never became healthy (logs in {})",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs one command on the node on `port`.
    pub fn cmd_on<T: redis::FromRedisValue>(
        &self,
        port: u16,
        args: &[&str],
    ) -> redis::RedisResult<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut conn)
    }

    /// Runs one command on the first running node that answers.
    fn cmd_any<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let mut last = None;
        for n in self.nodes.iter().filter(|n| n.running()) {
            match self.cmd_on(n.port, args) {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| redis::RedisError::from((redis::ErrorKind::Io, "no node"))))
    }

    /// The seed nodes as `--redis-cluster` takes them (every node: any may be killed).
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The slot of `key`, as the cluster computes it.
    pub fn slot(&self, key: &str) -> u16 {
        let s: i64 = self
            .cmd_any(&["CLUSTER", "KEYSLOT", key])
            .expect("cluster keyslot");
        u16::try_from(s).expect("slot")
    }

    /// The masters' ports and slot ranges, from `CLUSTER SLOTS` on a running node.
    fn slot_map(&self) -> Vec<(u16, u16, u16)> {
        parse_slots(self.cmd_any(&["CLUSTER", "SLOTS"]).unwrap_or_default())
    }

    /// The master that owns `key`'s slot when every running node says the same, else `None`.
    ///
    /// After a failover the nodes learn the promoted replica's new epoch by gossip, one after
    /// the other; a test that asks one node right after a herald node recovered can still be
    /// told the killed master. Waiting for agreement makes every later `master_of` and
    /// `masters` answer the new topology.
    pub fn agreed_master_of(&self, key: &str) -> Option<u16> {
        let slot = self.slot(key);
        let mut agreed = None;
        for n in self.nodes.iter().filter(|n| n.running()) {
            let map = parse_slots(self.cmd_on(n.port, &["CLUSTER", "SLOTS"]).ok()?);
            let m = map
                .into_iter()
                .find(|&(a, b, _)| (a..=b).contains(&slot))
                .map(|(_, _, p)| p)?;
            if agreed.is_some_and(|p| p != m) {
                return None;
            }
            agreed = Some(m);
        }
        agreed
    }

    /// The ports of the masters that own slots, sorted.
    pub fn masters(&self) -> Vec<u16> {
        let mut m: Vec<u16> = self.slot_map().into_iter().map(|(_, _, p)| p).collect();
        m.sort_unstable();
        m.dedup();
        m
    }

    /// The port of the master that owns `key`'s slot now.
    pub fn master_of(&self, key: &str) -> u16 {
        let slot = self.slot(key);
        self.slot_map()
            .into_iter()
            .find(|&(a, b, _)| (a..=b).contains(&slot))
            .map(|(_, _, p)| p)
            .expect("a master owns every slot")
    }

    /// Runs one command on the master that owns `key`.
    pub fn cmd_for<T: redis::FromRedisValue>(
        &self,
        key: &str,
        args: &[&str],
    ) -> redis::RedisResult<T> {
        self.cmd_on(self.master_of(key), args)
    }

    /// The cluster node id of the node on `port` (`CLUSTER MYID`).
    pub fn node_id(&self, port: u16) -> String {
        self.cmd_on(port, &["CLUSTER", "MYID"])
            .expect("cluster myid")
    }

    /// Starts moving `slot` from its master to the master on `dst`, the first step of the
    /// manual resharding procedure: `CLUSTER SETSLOT <slot> IMPORTING <src-id>` on the target,
    /// then `MIGRATING <dst-id>` on the source. From now on the source answers a command on a
    /// key it no longer holds with an ASK redirection to the target.
    pub fn begin_slot_move(&self, slot: u16, dst: u16) -> SlotMove {
        let src = self
            .slot_map()
            .into_iter()
            .find(|&(a, b, _)| (a..=b).contains(&slot))
            .map(|(_, _, p)| p)
            .expect("a master owns every slot");
        assert_ne!(src, dst, "the slot moves to another master");
        let m = SlotMove {
            slot: slot.to_string(),
            src,
            dst,
            src_id: self.node_id(src),
            dst_id: self.node_id(dst),
        };
        let _: () = self
            .cmd_on(
                dst,
                &["CLUSTER", "SETSLOT", &m.slot, "IMPORTING", &m.src_id],
            )
            .expect("setslot importing");
        let _: () = self
            .cmd_on(
                src,
                &["CLUSTER", "SETSLOT", &m.slot, "MIGRATING", &m.dst_id],
            )
            .expect("setslot migrating");
        m
    }

    /// Moves every key of the slot to the target (`CLUSTER GETKEYSINSLOT` and
    /// `MIGRATE ... KEYS`, until the source holds none); returns how many moved.
    pub fn migrate_slot_keys(&self, m: &SlotMove) -> usize {
        let dst_port = m.dst.to_string();
        let mut moved = 0;
        let deadline = Instant::now() + WAIT;
        loop {
            let keys: Vec<String> = self
                .cmd_on(m.src, &["CLUSTER", "GETKEYSINSLOT", &m.slot, "100"])
                .expect("getkeysinslot");
            if keys.is_empty() {
                return moved;
            }
            assert!(Instant::now() < deadline, "the slot's keys never all moved");
            let mut args = vec![
                "MIGRATE",
                "127.0.0.1",
                dst_port.as_str(),
                "",
                "0",
                "5000",
                "KEYS",
            ];
            args.extend(keys.iter().map(String::as_str));
            // NOKEY when a key expired between the two commands: the next round sees.
            let _: redis::Value = self.cmd_on(m.src, &args).expect("migrate");
            moved += keys.len();
        }
    }

    /// Ends the move: `CLUSTER SETSLOT <slot> NODE <dst-id>` on the target, the source and
    /// then every other master, as the manual procedure says (the replicas learn it by
    /// gossip). Redis then drops the source's sharded subscriptions of the slot's channels
    /// (an SUNSUBSCRIBE push to each subscriber).
    pub fn finish_slot_move(&self, m: &SlotMove) {
        let others: Vec<u16> = self
            .masters()
            .into_iter()
            .filter(|&p| p != m.dst && p != m.src)
            .collect();
        let mut order = vec![m.dst, m.src];
        order.extend(others);
        for port in order {
            let _: () = self
                .cmd_on(port, &["CLUSTER", "SETSLOT", &m.slot, "NODE", &m.dst_id])
                .expect("setslot node");
        }
    }

    /// `kill -9` of the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("one of the cluster's nodes");
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `kill -9` of the master that owns `key`; returns its port.
    pub fn kill_master_of(&mut self, key: &str) -> u16 {
        let port = self.master_of(key);
        self.kill(port);
        port
    }
}

/// A slot on its way from one master to another (see [`RedisCluster::begin_slot_move`]).
pub struct SlotMove {
    slot: String,
    /// The source master's port.
    pub src: u16,
    /// The target master's port.
    pub dst: u16,
    src_id: String,
    dst_id: String,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Kept when the test failed, for a look at the nodes' logs.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `CLUSTER SLOTS` as (first slot, last slot, master port) triples.
fn parse_slots(reply: Vec<redis::Value>) -> Vec<(u16, u16, u16)> {
    let mut out = Vec::new();
    for entry in reply {
        let redis::Value::Array(fields) = entry else {
            continue;
        };
        if let (
            Some(redis::Value::Int(a)),
            Some(redis::Value::Int(b)),
            Some(redis::Value::Array(m)),
        ) = (fields.first(), fields.get(1), fields.get(2))
        {
            if let Some(redis::Value::Int(port)) = m.get(1) {
                out.push((*a as u16, *b as u16, *port as u16));
            }
        }
    }
    out
}
