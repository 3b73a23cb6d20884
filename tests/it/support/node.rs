//! `herald` processes: [`NodeOpts`] to configure one, [`Herald`] to run it and call its
//! HTTP API.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::redis::RedisServer;
use super::redis_cluster::RedisCluster;
use super::sentinel::SentinelSet;
use super::{eventually, free_port, log_dir, prom, API_KEY, JWT_SECRET, WAIT};

/// Options for one herald process.
#[derive(Clone)]
pub struct NodeOpts {
    pub redis_url: Option<String>,
    pub prefix: String,
    pub node_id: String,
    pub presence_ttl: String,
    pub dev: bool,
    pub extra: Vec<String>,
    /// Environment variables for the process.
    pub env: Vec<(String, String)>,
    /// A command the binary is run through (e.g. `prlimit --nofile=S:H`), empty for none.
    pub wrapper: Vec<String>,
}

impl NodeOpts {
    pub fn cluster(redis: &RedisServer, prefix: &str, node_id: &str) -> Self {
        NodeOpts {
            redis_url: Some(redis.url()),
            prefix: prefix.to_string(),
            node_id: node_id.to_string(),
            presence_ttl: "3".into(),
            dev: false,
            extra: Vec::new(),
            env: Vec::new(),
            wrapper: Vec::new(),
        }
    }

    /// A node that finds its Redis master through the sentinels of `set`.
    pub fn sentinel(set: &SentinelSet, prefix: &str, node_id: &str) -> Self {
        NodeOpts {
            redis_url: None,
            prefix: prefix.to_string(),
            node_id: node_id.to_string(),
            presence_ttl: "3".into(),
            dev: false,
            extra: Vec::new(),
            env: Vec::new(),
            wrapper: Vec::new(),
        }
        .arg("--redis-sentinel", &set.addresses())
        .arg("--redis-master-name", &set.master_name)
    }

    /// A node on the Redis Cluster `cluster` (every node of it as a seed).
    pub fn redis_cluster(cluster: &RedisCluster, prefix: &str, node_id: &str) -> Self {
        NodeOpts {
            redis_url: None,
            prefix: prefix.to_string(),
            node_id: node_id.to_string(),
            presence_ttl: "3".into(),
            dev: false,
            extra: Vec::new(),
            env: Vec::new(),
            wrapper: Vec::new(),
        }
        .arg("--redis-cluster", &cluster.seeds())
    }

    pub fn standalone(node_id: &str) -> Self {
        NodeOpts {
            redis_url: None,
            prefix: "herald".into(),
            node_id: node_id.to_string(),
            presence_ttl: "3".into(),
            dev: false,
            extra: Vec::new(),
            env: Vec::new(),
            wrapper: Vec::new(),
        }
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Runs the binary through `command` (which must exec it, keeping the PID).
    pub fn wrap(mut self, command: &[&str]) -> Self {
        self.wrapper = command.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Serves /metrics on a port of its own (`--metrics-listen`).
    pub fn metrics_listener(self) -> Self {
        let port = free_port();
        self.arg("--metrics-listen", &format!("127.0.0.1:{port}"))
    }

    pub fn arg(mut self, name: &str, value: &str) -> Self {
        self.extra.push(name.to_string());
        self.extra.push(value.to_string());
        self
    }
}

pub fn herald_bin() -> &'static str {
    env!("CARGO_BIN_EXE_herald")
}

/// One running `herald` binary; killed (and continued first, if stopped) on drop.
pub struct Herald {
    pub port: u16,
    /// The `--metrics-listen` port, when the node has one.
    pub metrics_port: Option<u16>,
    pub node_id: String,
    pub log: PathBuf,
    child: Option<Child>,
    pub http: reqwest::Client,
}

impl Herald {
    /// Spawns a node and waits for /healthz (not for readiness: tests decide that).
    pub async fn spawn(opts: NodeOpts) -> Herald {
        let port = free_port();
        let log = log_dir().join(format!("{}-{}.log", opts.node_id, port));
        let logfile = std::fs::File::create(&log).expect("log file");
        let mut cmd = match opts.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(herald_bin());
                c
            }
            None => Command::new(herald_bin()),
        };
        let metrics_port = opts
            .extra
            .iter()
            .position(|a| a == "--metrics-listen")
            .and_then(|i| opts.extra.get(i + 1))
            .and_then(|addr| addr.rsplit(':').next())
            .and_then(|p| p.parse().ok());
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--node-id", &opts.node_id])
            .args(["--prefix", &opts.prefix])
            .args(["--presence-ttl", &opts.presence_ttl])
            .args(&opts.extra)
            .env("HERALD_LOG", "herald=debug,info")
            .env_remove("HERALD_REDIS_URL")
            .env_remove("HERALD_REDIS_SENTINEL")
            .env_remove("HERALD_REDIS_MASTER_NAME")
            .env_remove("HERALD_REDIS_MASTER_PASSWORD")
            .env_remove("HERALD_JWT_SECRET")
            .env_remove("HERALD_API_KEY")
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(logfile);
        if let Some(url) = &opts.redis_url {
            cmd.args(["--redis-url", url]);
        }
        if opts.dev {
            cmd.arg("--dev");
        } else {
            cmd.args(["--jwt-secret", JWT_SECRET, "--api-key", API_KEY]);
        }
        let child = cmd.spawn().expect("spawn herald");
        let h = Herald {
            port,
            metrics_port,
            node_id: opts.node_id.clone(),
            log,
            child: Some(child),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("http client"),
        };
        let url = h.url("/healthz");
        let client = h.http.clone();
        eventually(WAIT, "herald /healthz", || {
            let client = client.clone();
            let url = url.clone();
            async move {
                client
                    .get(&url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            }
        })
        .await;
        h
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://127.0.0.1:{}/ws{}", self.port, query)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `kill -<sig>` to the process.
    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let ok = Command::new("kill")
                .args([&format!("-{sig}"), &pid.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "kill -{sig} {pid} failed");
        }
    }

    /// SIGKILL, like a crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit; returns its exit status or None after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Some(status);
                }
            } else {
                return None;
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn ready(&self) -> bool {
        matches!(self.http.get(self.url("/readyz")).send().await, Ok(r) if r.status() == 200)
    }

    pub async fn wait_ready(&self) {
        eventually(WAIT, &format!("{} ready", self.node_id), || async {
            self.ready().await.then_some(())
        })
        .await;
    }

    pub async fn wait_not_ready(&self) {
        eventually(WAIT, &format!("{} not ready", self.node_id), || async {
            (!self.ready().await).then_some(())
        })
        .await;
    }

    /// GET /readyz: (status, body).
    pub async fn readyz(&self) -> (u16, Value) {
        let r = self
            .http
            .get(self.url("/readyz"))
            .send()
            .await
            .expect("readyz");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// GET with the API key; returns (status, JSON body or Null).
    pub async fn api_get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("api get");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POST JSON with the API key; returns (status, JSON body or Null).
    pub async fn api_post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(API_KEY)
            .json(body)
            .send()
            .await
            .expect("api post");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Publishes `data` to `user` as a durable message through the API (asserting 200) and
    /// returns its inbox id.
    pub async fn publish_durable(&self, user: &str, data: Value) -> String {
        let (status, body) = self
            .api_post(
                "/api/publish",
                &serde_json::json!({"user": user, "durable": true, "data": data}),
            )
            .await;
        assert_eq!(status, 200, "durable publish: {body}");
        body["ids"][user]
            .as_str()
            .expect("id in response")
            .to_string()
    }

    /// DELETE with the API key; returns (status, JSON body or Null).
    pub async fn api_delete(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .delete(self.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("api delete");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POST /api/publish; requires a 200.
    pub async fn publish(&self, body: Value) {
        let (status, resp) = self.api_post("/api/publish", &body).await;
        assert_eq!(status, 200, "publish failed: {resp}");
    }

    /// Sessions of `user` as reported by this node.
    pub async fn presence_sessions(&self, user: &str) -> Vec<Value> {
        let (status, body) = self.api_get(&format!("/api/presence/{user}")).await;
        assert_eq!(status, 200, "presence: {body}");
        body["sessions"].as_array().cloned().unwrap_or_default()
    }

    /// Whether this node reports `user` online.
    pub async fn online(&self, user: &str) -> bool {
        let (status, body) = self.api_get(&format!("/api/presence/{user}")).await;
        assert_eq!(status, 200, "presence: {body}");
        body["online"]
            .as_bool()
            .expect("presence body has a boolean \"online\"")
    }

    /// Polls until `user`'s sessions as seen by this node are exactly on `nodes` (sorted
    /// node ids, one entry per session).
    pub async fn wait_presence_nodes(&self, user: &str, nodes: &[&str]) {
        let want: Vec<String> = nodes.iter().map(|s| s.to_string()).collect();
        eventually(
            WAIT,
            &format!("presence of {user} on {nodes:?}, via {}", self.node_id),
            || async {
                let mut got: Vec<String> = self
                    .presence_sessions(user)
                    .await
                    .iter()
                    .map(|s| s["node"].as_str().unwrap_or_default().to_string())
                    .collect();
                got.sort();
                (got == want).then_some(())
            },
        )
        .await;
    }

    pub async fn stats(&self) -> Value {
        let (status, body) = self.api_get("/api/stats").await;
        assert_eq!(status, 200, "stats: {body}");
        body
    }

    /// Node ids listed by this node's /api/stats.
    pub async fn stats_nodes(&self) -> Vec<String> {
        let stats = self.stats().await;
        let mut ids: Vec<String> = stats["nodes"]
            .as_array()
            .expect("stats.nodes is an array")
            .iter()
            .map(|n| n["node"].as_str().expect("node id").to_string())
            .collect();
        ids.sort();
        ids
    }

    /// Where this node serves /metrics (its own port with `--metrics-listen`).
    pub fn metrics_url(&self) -> String {
        match self.metrics_port {
            Some(p) => format!("http://127.0.0.1:{p}/metrics"),
            None => self.url("/metrics"),
        }
    }

    /// The text of GET /metrics, or "" if the request fails.
    pub async fn metrics_text(&self) -> String {
        match self.http.get(self.metrics_url()).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// The value of `selector` in this node's /metrics, by the rule of [`prom::sum`]: the
    /// sum of the samples it selects, 0 if none (or if /metrics cannot be read).
    pub async fn metric(&self, selector: &str) -> f64 {
        prom::sum(&self.metrics_text().await, selector)
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A stopped process ignores SIGKILL until continued on some kernels' views; make
            // sure it can die.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
