//! A Redis Sentinel set owned by one test: a master, one replica and three sentinels, each on
//! a free loopback port, each sentinel with its own config file in a directory of its own
//! (sentinels rewrite their config as they learn the topology). Every process is stopped by
//! its PID when the set is dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::RedisServer;
use super::tls::TestCa;
use super::{free_port, WAIT};

/// How long the sentinels wait before calling an unreachable master down. Short, so a
/// failover fits in a test; long enough that a loaded 2-core machine does not trip it.
pub const DOWN_AFTER_MS: u64 = 1000;
/// The sentinels' failover timeout: also how long they wait before retrying a failover that
/// did not complete (twice this). Small, so a lost election does not stall a test.
pub const FAILOVER_TIMEOUT_MS: u64 = 3000;

/// One redis-sentinel process.
struct Sentinel {
    port: u16,
    child: Option<Child>,
}

/// A master, one replica and three sentinels watching them under `master_name`.
pub struct SentinelSet {
    pub master_name: String,
    /// The sentinels' own password (`requirepass` on each), if any.
    sentinel_password: Option<String>,
    /// The data nodes' password, if any.
    data_password: Option<String>,
    /// Everything speaks TLS only, with certificates from this CA (PEM), which the harness
    /// trusts for its own connections.
    tls_ca: Option<Vec<u8>>,
    /// The data nodes: `[0]` starts as the master, `[1]` as its replica. A killed one stays
    /// in the list, stopped.
    pub servers: Vec<RedisServer>,
    sentinels: Vec<Sentinel>,
    dir: PathBuf,
}

impl SentinelSet {
    /// Starts the set and waits until every sentinel knows the replica and the two other
    /// sentinels (so a failover can be authorised at once when the test needs one).
    pub fn start(master_name: &str) -> SentinelSet {
        Self::start_with_auth(master_name, None, None)
    }

    /// Starts a set where every process (data nodes, replication, sentinels) speaks TLS
    /// only, with `ca`'s server certificate.
    pub fn start_tls(master_name: &str, ca: &TestCa) -> SentinelSet {
        Self::start_inner(master_name, None, None, Some(ca))
    }

    /// Starts a set whose data nodes require `data_password` (the replica and the
    /// sentinels authenticate with it) and whose sentinels require `sentinel_password`.
    pub fn start_with_auth(
        master_name: &str,
        data_password: Option<&str>,
        sentinel_password: Option<&str>,
    ) -> SentinelSet {
        Self::start_inner(master_name, data_password, sentinel_password, None)
    }

    fn start_inner(
        master_name: &str,
        data_password: Option<&str>,
        sentinel_password: Option<&str>,
        tls: Option<&TestCa>,
    ) -> SentinelSet {
        // Each data node works in a directory of its own: a replica writes the RDB of its
        // full sync there, not into the crate's directory.
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("sentinel-{master_name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data_dir = |name: &str| {
            let d = dir.join(name);
            std::fs::create_dir_all(&d).expect("data node dir");
            d.display().to_string()
        };
        // The replica's first full sync starts at once, not after Redis's default 5 s wait
        // for more replicas to share it.
        let (ca_file, tls_args) = match tls {
            Some(ca) => (
                ca.ca().display().to_string(),
                vec![
                    ca.cert().display().to_string(),
                    ca.key().display().to_string(),
                ],
            ),
            None => (String::new(), Vec::new()),
        };
        let start = |extra: &[&str]| match (data_password, tls) {
            (Some(pw), _) => {
                let mut args = extra.to_vec();
                args.extend_from_slice(&["--masterauth", pw]);
                RedisServer::start_with_password_and(pw, &args)
            }
            (None, Some(ca)) => {
                let mut args = extra.to_vec();
                args.extend_from_slice(&[
                    "--tls-replication",
                    "yes",
                    "--tls-ca-cert-file",
                    &ca_file,
                ]);
                RedisServer::start_tls_with(&ca.cert(), &ca.key(), &args)
            }
            (None, None) => RedisServer::start_with(extra),
        };
        let master = start(&[
            "--dir",
            &data_dir("master"),
            "--repl-diskless-sync-delay",
            "0",
        ]);
        let replica = start(&[
            "--dir",
            &data_dir("replica"),
            "--replicaof",
            "127.0.0.1",
            &master.port.to_string(),
        ]);
        let mut set = SentinelSet {
            master_name: master_name.to_string(),
            sentinel_password: sentinel_password.map(str::to_string),
            data_password: data_password.map(str::to_string),
            tls_ca: tls.map(|ca| std::fs::read(ca.ca()).expect("CA certificate")),
            servers: vec![master, replica],
            sentinels: Vec::new(),
            dir,
        };
        set.wait_replica_synced();
        for i in 0..3 {
            let port = free_port();
            let own = set.dir.join(format!("s{i}"));
            std::fs::create_dir_all(&own).expect("sentinel's own dir");
            let conf = own.join("sentinel.conf");
            let mut auth = String::new();
            if let Some(pw) = data_password {
                auth += &format!("sentinel auth-pass {master_name} {pw}\n");
            }
            if tls_args.len() == 2 {
                // TLS only: `port 0` turns the plain port off (it comes after `port` above).
                auth += &format!(
                    "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                     tls-ca-cert-file {ca_file}\ntls-replication yes\ntls-auth-clients no\n",
                    tls_args[0], tls_args[1]
                );
            }
            if let Some(pw) = sentinel_password {
                // Sentinels that require a password must also give it to each other.
                auth += &format!("requirepass {pw}\nsentinel sentinel-pass {pw}\n");
            }
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\n\
                     dir {dir}\nlogfile {dir}/sentinel.log\n\
                     sentinel monitor {name} 127.0.0.1 {master} 2\n\
                     sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}\n\
                     sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}\n\
                     sentinel parallel-syncs {name} 1\n",
                    dir = own.display(),
                    name = master_name,
                    master = set.servers[0].port,
                ) + &auth,
            )
            .expect("sentinel config");
            // `redis-server --sentinel` is the same program as `redis-sentinel`, which
            // Debian ships in a package of its own that is not always installed.
            let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
            let child = Command::new(bin)
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (see README)");
            set.sentinels.push(Sentinel {
                port,
                child: Some(child),
            });
        }
        set.wait_topology_known();
        set
    }

    /// The sentinels as `--redis-sentinel` takes them: `127.0.0.1:port,...`, or URLs with
    /// the password when the sentinels require one.
    pub fn addresses(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| {
                let scheme = if self.tls_ca.is_some() {
                    "rediss"
                } else {
                    "redis"
                };
                match &self.sentinel_password {
                    Some(pw) => format!("{scheme}://:{pw}@127.0.0.1:{}", s.port),
                    None if self.tls_ca.is_some() => format!("rediss://127.0.0.1:{}", s.port),
                    None => format!("127.0.0.1:{}", s.port),
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The harness's own client for one sentinel or data node (with its password, over
    /// TLS trusting the set's CA when the set speaks TLS).
    fn client(&self, port: u16, password: Option<&String>) -> redis::RedisResult<redis::Client> {
        let scheme = if self.tls_ca.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let url = match password {
            Some(pw) => format!("{scheme}://:{pw}@127.0.0.1:{port}/"),
            None => format!("{scheme}://127.0.0.1:{port}/"),
        };
        match &self.tls_ca {
            Some(ca) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            ),
            None => redis::Client::open(url),
        }
    }

    fn sentinel_client(&self, port: u16) -> redis::RedisResult<redis::Client> {
        self.client(port, self.sentinel_password.as_ref())
    }

    /// Runs one command on the data node on `port`.
    fn data_cmd<T: redis::FromRedisValue>(
        &self,
        port: u16,
        args: &[&str],
    ) -> redis::RedisResult<T> {
        let mut conn = self
            .client(port, self.data_password.as_ref())?
            .get_connection_with_timeout(Duration::from_secs(2))?;
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query(&mut conn)
    }

    /// Runs one command on the first sentinel that answers.
    pub fn sentinel_cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let mut last = None;
        for s in &self.sentinels {
            if s.child.is_none() {
                continue;
            }
            let client = self.sentinel_client(s.port)?;
            let mut conn = match client.get_connection_with_timeout(Duration::from_secs(2)) {
                Ok(c) => c,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let mut c = redis::cmd(args[0]);
            for a in &args[1..] {
                c.arg(*a);
            }
            match c.query(&mut conn) {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| redis::RedisError::from((redis::ErrorKind::Io, "no sentinel"))))
    }

    /// The port the sentinels name as the master now.
    pub fn master_port(&self) -> u16 {
        let (_, port): (String, u16) = self
            .sentinel_cmd(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.master_name])
            .expect("sentinel master address");
        port
    }

    /// The data node the sentinels name as the master now.
    pub fn master(&self) -> &RedisServer {
        let port = self.master_port();
        self.servers
            .iter()
            .find(|s| s.port == port)
            .expect("the master is one of the set's servers")
    }

    /// `kill -9` of the current master; returns its port.
    pub fn kill_master(&mut self) -> u16 {
        let port = self.master_port();
        let server = self
            .servers
            .iter_mut()
            .find(|s| s.port == port)
            .expect("the master is one of the set's servers");
        server.stop();
        port
    }

    /// What the data node on `port` says it is (`ROLE`): "master" or "slave".
    pub fn role(&self, port: u16) -> Option<String> {
        let role: Vec<redis::Value> = self.data_cmd(port, &["ROLE"]).ok()?;
        match role.first()? {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            redis::Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    }

    fn wait_replica_synced(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let info: String = self
                .data_cmd(self.servers[1].port, &["INFO", "replication"])
                .unwrap_or_default();
            if info.contains("master_link_status:up") {
                return;
            }
            assert!(Instant::now() < deadline, "replica never synced: {info}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every sentinel sees one replica and two other sentinels (they find each other
    /// through hello messages on the master, every 2 s).
    fn wait_topology_known(&self) {
        let deadline = Instant::now() + WAIT;
        for s in &self.sentinels {
            loop {
                let known = self
                    .sentinel_client(s.port)
                    .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
                    .and_then(|mut conn| {
                        redis::cmd("SENTINEL")
                            .arg("MASTER")
                            .arg(&self.master_name)
                            .query::<std::collections::HashMap<String, String>>(&mut conn)
                    })
                    .map(|m| {
                        m.get("num-slaves").map(String::as_str) == Some("1")
                            && m.get("num-other-sentinels").map(String::as_str) == Some("2")
                    })
                    .unwrap_or(false);
                if known {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "sentinel {} never learned the topology (log in {})",
                    s.port,
                    self.dir.display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for s in &mut self.sentinels {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // The data nodes stop themselves (RedisServer's drop); the directory holds only
        // sentinel configs and logs, kept when the test failed for a look afterwards.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
