//! Where the node's Redis connections go: one fixed URL (`--redis-url`), or whichever
//! instance a set of Redis Sentinels names as the current master (`--redis-sentinel` and
//! `--redis-master-name`). Every new connection asks again, so the connections made after a
//! failover reach the promoted replica.
//!
//! Discovery is redis-rs's own (`SentinelClient`): it asks the sentinels in turn for the
//! master of the name, then connects to that address and checks with `ROLE` that it really
//! is a master, so a sentinel that has not yet seen the failover cannot send the node to a
//! demoted instance. The command pool uses deadpool-redis's Sentinel manager, which wraps the
//! same client; the pub/sub connection uses [`Connector`].
//!
//! Or a Redis Cluster (`--redis-cluster`): seed nodes from which redis-rs's `ClusterClient`
//! learns the topology. Its connection is multiplexed, follows MOVED/ASK and refreshes the
//! slot map by itself, so the pool shares one of them and the broker holds another, with
//! RESP3 pushes for sharded pub/sub.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::PubSub;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{IntoConnectionInfo, RedisConnectionInfo, TlsMode};

use crate::config::Config;

/// Why the Redis target could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TargetError {
    #[error("invalid Redis URL: {0}")]
    Url(#[source] redis::RedisError),
    /// The address is shown without its credentials.
    #[error("invalid --redis-sentinel address {0:?}: {1}")]
    Sentinel(String, #[source] redis::RedisError),
    /// The addresses are shown without their credentials.
    #[error("invalid --redis-cluster nodes {0:?}: {1}")]
    Cluster(String, #[source] redis::RedisError),
}

/// What a node connects to.
#[derive(Clone)]
pub(crate) enum RedisTarget {
    /// One instance, at a fixed URL.
    Single { url: String },
    /// The master that the sentinels name `master`.
    Sentinel(SentinelTarget),
    /// A Redis Cluster, found from its seed nodes.
    Cluster(ClusterTarget),
}

/// A Redis Cluster deployment: the seed nodes as URLs (`redis://host:port`, with credentials
/// and `rediss://` when the nodes need them; every node of a cluster shares them).
#[derive(Clone)]
pub(crate) struct ClusterTarget {
    pub(crate) nodes: Vec<String>,
}

impl ClusterTarget {
    /// A redis-rs cluster client for the seed nodes. Responses may take as long as the
    /// longest herald script (the caller bounds the whole call anyway, see
    /// [`crate::cluster::error::bounded`]); a handful of retries with short waits lets a
    /// command ride out a MOVED or a reconnection without outliving that bound.
    pub(crate) fn client(
        &self,
        push: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
    ) -> Result<redis::cluster::ClusterClient, redis::RedisError> {
        let mut b =
            redis::cluster::ClusterClientBuilder::new(self.nodes.iter().map(String::as_str))
                .connection_timeout(Duration::from_secs(1))
                .response_timeout(crate::cluster::error::CALL_TIMEOUT)
                .retries(4)
                .min_retry_wait(50)
                .max_retry_wait(500);
        if let Some(tx) = push {
            // Pushes (sharded messages) exist only in RESP3.
            b = b
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(tx);
        }
        b.build()
    }

    fn redacted(&self) -> String {
        let all: Vec<String> = self.nodes.iter().map(|u| redacted(u)).collect();
        all.join(",")
    }
}

/// A Sentinel deployment: the sentinels' URLs, the master's name, and how to talk to the
/// data nodes (the master and its replicas) once found.
#[derive(Clone)]
pub(crate) struct SentinelTarget {
    /// Each sentinel as a URL (`redis://host:port`, or with its own credentials and
    /// `rediss://` when it needs them).
    pub(crate) sentinels: Vec<String>,
    pub(crate) master: String,
    /// The data nodes' password, if they require one (sentinels have their own, in their
    /// URLs).
    pub(crate) password: Option<String>,
    /// The data nodes speak TLS when the sentinels do (`rediss://`): a deployment that
    /// encrypts one hop and not the other would be unusual.
    pub(crate) tls: bool,
}

impl RedisTarget {
    /// The target `config` names, or `None` for a standalone node. Checks every URL now, so
    /// a typo stops the start instead of showing up as a node that never becomes ready.
    pub(crate) fn from_config(config: &Config) -> Result<Option<RedisTarget>, TargetError> {
        if let Some(url) = &config.redis_url {
            url.as_str()
                .into_connection_info()
                .map_err(TargetError::Url)?;
            return Ok(Some(RedisTarget::Single { url: url.clone() }));
        }
        if !config.redis_cluster.is_empty() {
            let target = ClusterTarget {
                nodes: config
                    .redis_cluster
                    .iter()
                    .map(|e| sentinel_url(e))
                    .collect(),
            };
            // Building the client parses every URL and checks that they agree on credentials.
            target
                .client(None)
                .map_err(|e| TargetError::Cluster(target.redacted(), e))?;
            return Ok(Some(RedisTarget::Cluster(target)));
        }
        let (Some(master), false) = (&config.redis_master_name, config.redis_sentinel.is_empty())
        else {
            return Ok(None);
        };
        let mut sentinels = Vec::with_capacity(config.redis_sentinel.len());
        for entry in &config.redis_sentinel {
            let url = sentinel_url(entry);
            url.as_str()
                .into_connection_info()
                .map_err(|e| TargetError::Sentinel(redacted(entry), e))?;
            sentinels.push(url);
        }
        let tls = sentinels.iter().any(|u| u.starts_with("rediss://"));
        Ok(Some(RedisTarget::Sentinel(SentinelTarget {
            sentinels,
            master: master.clone(),
            password: config.redis_master_password.clone(),
            tls,
        })))
    }
}

/// `entry` with any `user:password@` replaced by `***@`, for error messages and logs.
fn redacted(entry: &str) -> String {
    match (entry.find("://"), entry.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}***{}", &entry[..scheme_end + 3], &entry[at..])
        }
        _ => entry.to_string(),
    }
}

/// `host:port` becomes `redis://host:port`; a URL stays as it is (sentinels and cluster
/// seed nodes alike).
fn sentinel_url(entry: &str) -> String {
    let entry = entry.trim();
    if entry.contains("://") {
        entry.to_string()
    } else {
        format!("redis://{entry}")
    }
}

impl SentinelTarget {
    /// How redis-rs reaches the data nodes it discovers.
    pub(crate) fn node_info(&self) -> SentinelNodeConnectionInfo {
        let mut info = SentinelNodeConnectionInfo::default();
        if self.tls {
            info = info.set_tls_mode(TlsMode::Secure);
        }
        if let Some(pw) = &self.password {
            info = info.set_redis_connection_info(RedisConnectionInfo::default().set_password(pw));
        }
        info
    }

    /// The same, in deadpool-redis's terms (it keeps its own copy of these types).
    pub(crate) fn pool_node_info(&self) -> deadpool_redis::sentinel::SentinelNodeConnectionInfo {
        deadpool_redis::sentinel::SentinelNodeConnectionInfo {
            tls_mode: self
                .tls
                .then_some(deadpool_redis::sentinel::TlsMode::Secure),
            redis_connection_info: self.password.as_ref().map(|pw| {
                deadpool_redis::RedisConnectionInfo {
                    password: Some(pw.clone()),
                    ..Default::default()
                }
            }),
        }
    }

    /// A redis-rs client that finds the master through the sentinels.
    fn client(&self) -> Result<SentinelClient, redis::RedisError> {
        SentinelClient::build(
            self.sentinels.iter().map(String::as_str).collect(),
            self.master.as_str(),
            Some(self.node_info()),
            SentinelServerType::Master,
        )
    }
}

/// Opens the broker's dedicated pub/sub connection: to the fixed URL, or to the master the
/// sentinels name at the moment of each (re)connection.
///
/// One per node, held by the broker, so the size difference of the variants is moot.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Connector {
    Single(redis::Client),
    /// Behind a lock because discovery caches its connections to the sentinels (`&mut`);
    /// only the broker's reconnect loop uses it, so the lock is never contended.
    Sentinel(Arc<tokio::sync::Mutex<SentinelClient>>),
    /// A Redis Cluster: the broker subscribes through a cluster connection of its own (see
    /// `broker::sharded`), not through [`Connector::pubsub`].
    Cluster(ClusterTarget),
}

impl Connector {
    pub(crate) fn new(target: &RedisTarget) -> Result<Connector, TargetError> {
        match target {
            RedisTarget::Single { url } => redis::Client::open(url.as_str())
                .map(Connector::Single)
                .map_err(TargetError::Url),
            RedisTarget::Sentinel(s) => s
                .client()
                .map(|c| Connector::Sentinel(Arc::new(tokio::sync::Mutex::new(c))))
                .map_err(|e| {
                    let all: Vec<String> = s.sentinels.iter().map(|u| redacted(u)).collect();
                    TargetError::Sentinel(all.join(","), e)
                }),
            RedisTarget::Cluster(c) => Ok(Connector::Cluster(c.clone())),
        }
    }

    /// The longest wait between two attempts to reconnect the pub/sub connection. With one
    /// Redis, 2 s: a restart takes seconds and there is nothing to learn sooner. With
    /// Sentinel, 500 ms: the end of a failover shows only by asking again, an attempt costs
    /// one round trip to a sentinel, and every moment the subscription is down after the
    /// promoted replica already takes publishes is a moment whose plain messages reach no
    /// node (measured: 2 s let up to 1.6 s of them go, bench/history.md).
    pub(crate) fn backoff_max(&self) -> Duration {
        match self {
            Connector::Single(_) => Duration::from_secs(2),
            // A shard failover, like a Sentinel one, shows only by asking again.
            Connector::Sentinel(_) | Connector::Cluster(_) => Duration::from_millis(500),
        }
    }

    /// A new pub/sub connection. With Sentinel, the sentinels are asked for the master
    /// first, every time: after a failover this is what moves the subscription to the
    /// promoted replica.
    pub(crate) async fn pubsub(&self) -> Result<PubSub, redis::RedisError> {
        match self {
            Connector::Single(client) => client.get_async_pubsub().await,
            Connector::Sentinel(sentinel) => {
                let client = sentinel.lock().await.async_get_client().await?;
                client.get_async_pubsub().await
            }
            Connector::Cluster(_) => Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "a Redis Cluster subscribes through the sharded subscriber",
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_an_error_message() {
        assert_eq!(redacted("redis://:pw@s1:26379"), "redis://***@s1:26379");
        assert_eq!(redacted("rediss://u:p@ss@s1:1"), "rediss://***@s1:1");
        assert_eq!(redacted("s1:26379"), "s1:26379");
        let c = config(&[
            "--redis-sentinel",
            "redis://:hunter2@h:notaport",
            "--redis-master-name",
            "m",
        ]);
        let e = RedisTarget::from_config(&c).err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| !e.contains("hunter2")),
            "{e:?}"
        );
    }

    #[test]
    fn sentinel_entries_may_be_bare_addresses_or_urls() {
        assert_eq!(sentinel_url("127.0.0.1:26379"), "redis://127.0.0.1:26379");
        assert_eq!(sentinel_url(" s1:26379 "), "redis://s1:26379");
        assert_eq!(
            sentinel_url("rediss://:pw@s1:26379"),
            "rediss://:pw@s1:26379"
        );
    }

    fn config(args: &[&str]) -> Config {
        use clap::Parser;
        let mut v = vec!["herald"];
        v.extend_from_slice(args);
        Config::parse_from(v)
    }

    #[test]
    fn the_target_is_read_from_the_flags_and_bad_addresses_stop_the_start() {
        let c = config(&[
            "--redis-sentinel",
            "a:1,rediss://b:2",
            "--redis-master-name",
            "m",
        ]);
        match RedisTarget::from_config(&c) {
            Ok(Some(RedisTarget::Sentinel(s))) => {
                assert_eq!(s.sentinels, vec!["redis://a:1", "rediss://b:2"]);
                assert_eq!(s.master, "m");
                assert!(s.tls, "a TLS sentinel means TLS data nodes");
            }
            _ => panic!("a sentinel target"),
        }
        let c = config(&["--redis-sentinel", "a:notaport", "--redis-master-name", "m"]);
        assert!(matches!(
            RedisTarget::from_config(&c),
            Err(TargetError::Sentinel(..))
        ));
        assert!(matches!(RedisTarget::from_config(&config(&[])), Ok(None)));
    }

    #[test]
    fn cluster_seeds_may_be_bare_addresses_or_urls_and_bad_ones_stop_the_start() {
        let c = config(&["--redis-cluster", "a:1,redis://:pw@b:2"]);
        match RedisTarget::from_config(&c) {
            Ok(Some(RedisTarget::Cluster(t))) => {
                assert_eq!(t.nodes, vec!["redis://a:1", "redis://:pw@b:2"]);
            }
            _ => panic!("a cluster target"),
        }
        let c = config(&["--redis-cluster", "redis://:hunter2@a:notaport"]);
        let e = RedisTarget::from_config(&c).err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("--redis-cluster") && !e.contains("hunter2")),
            "{e:?}"
        );
    }
}
