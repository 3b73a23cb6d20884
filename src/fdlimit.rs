//! The process's open-file limit: raised from the soft to the hard limit at start, and the
//! connection caps fitted under it (or the start refused), so descriptors never run out
//! before `--max-connections` does.

use crate::config::{Config, FdLimitPolicy};

/// Descriptors kept for everything that is not a client connection: the listeners, the
/// spare descriptor of the accept loop, the refused connections it lingers on
/// ([`crate::transport::listener::REFUSALS_IN_FLIGHT`]), Redis (the pub/sub connection, the
/// pool is added on top), the runtime's epoll and event descriptors, standard streams and
/// files opened at start.
const RESERVE_BASE: u64 = 96 + crate::transport::listener::REFUSALS_IN_FLIGHT as u64;

/// Why the node will not start under its open-file limit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FdLimitError {
    #[error(
        "the open-file limit is {limit} (hard limit {hard}) but --max-connections {connections} \
         + --max-pending-connections {pending} + {reserve} reserved for Redis and listeners \
         need {need}: raise the limit (ulimit -n, LimitNOFILE=, docker --ulimit nofile=), \
         lower the caps, or pass --fd-limit-policy clamp"
    )]
    TooSmall {
        limit: u64,
        hard: u64,
        connections: usize,
        pending: usize,
        reserve: u64,
        need: u64,
    },
    #[error(
        "the open-file limit is {limit} (hard limit {hard}): too small to serve any \
         connection after the {reserve} descriptors reserved for Redis and listeners"
    )]
    Unusable { limit: u64, hard: u64, reserve: u64 },
    #[error("cannot read the open-file limit: {0}")]
    Read(String),
}

/// What [`fit`] did, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdReport {
    /// The soft limit found at start, and the one in force now.
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
    /// `Some((before, after))` for each cap that was lowered to fit.
    pub clamped_connections: Option<(usize, usize)>,
    pub clamped_pending: Option<(usize, usize)>,
}

/// Raises the soft open-file limit to the hard limit, then makes the connection caps of
/// `config` fit under it as `--fd-limit-policy` says.
pub fn raise_and_fit(config: &mut Config) -> Result<FdReport, FdLimitError> {
    use rlimit::Resource;
    let (soft_before, hard) =
        rlimit::getrlimit(Resource::NOFILE).map_err(|e| FdLimitError::Read(e.to_string()))?;
    let mut soft = soft_before;
    if soft < hard && rlimit::setrlimit(Resource::NOFILE, hard, hard).is_ok() {
        soft = hard;
    }
    let mut report = fit(config, soft, hard)?;
    report.soft_before = soft_before;
    Ok(report)
}

/// The arithmetic of [`raise_and_fit`] for a given limit.
fn fit(config: &mut Config, soft: u64, hard: u64) -> Result<FdReport, FdLimitError> {
    let reserve = RESERVE_BASE + config.redis_pool as u64;
    let mut report = FdReport {
        soft_before: soft,
        soft,
        hard,
        clamped_connections: None,
        clamped_pending: None,
    };
    let need = config.max_connections as u64 + config.max_pending_connections as u64 + reserve;
    if need <= soft {
        return Ok(report);
    }
    let available = soft.saturating_sub(reserve);
    if available < 2 {
        return Err(FdLimitError::Unusable {
            limit: soft,
            hard,
            reserve,
        });
    }
    if config.fd_limit_policy == FdLimitPolicy::Refuse {
        return Err(FdLimitError::TooSmall {
            limit: soft,
            hard,
            connections: config.max_connections,
            pending: config.max_pending_connections,
            reserve,
            need,
        });
    }
    // Connections waiting for their first answer get at most a quarter of what is left;
    // sessions get the rest.
    let pending_share = usize::try_from((available / 4).max(1)).unwrap_or(usize::MAX);
    if config.max_pending_connections > pending_share {
        report.clamped_pending = Some((config.max_pending_connections, pending_share));
        config.max_pending_connections = pending_share;
    }
    let left =
        usize::try_from(available - config.max_pending_connections as u64).unwrap_or(usize::MAX);
    if config.max_connections > left {
        report.clamped_connections = Some((config.max_connections, left));
        config.max_connections = left;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn config(args: &[&str]) -> Config {
        let mut v = vec!["herald", "--dev"];
        v.extend_from_slice(args);
        Config::parse_from(v)
    }

    #[test]
    fn caps_that_fit_are_left_alone() {
        let mut c = config(&[
            "--max-connections",
            "1000",
            "--max-pending-connections",
            "100",
        ]);
        let r = fit(&mut c, 4096, 4096).unwrap();
        assert_eq!((r.clamped_connections, r.clamped_pending), (None, None));
        assert_eq!(c.max_connections, 1000);
    }

    #[test]
    fn clamp_lowers_the_caps_to_fit() {
        let mut c = config(&["--max-connections", "100000"]);
        let r = fit(&mut c, 20_000, 20_000).unwrap();
        let reserve = RESERVE_BASE + c.redis_pool as u64;
        assert_eq!(r.clamped_pending, None, "4096 is below a quarter of 20,000");
        assert_eq!(r.clamped_connections, Some((100_000, c.max_connections)));
        assert_eq!(
            (c.max_connections + c.max_pending_connections) as u64 + reserve,
            20_000
        );
        let mut c = config(&["--max-connections", "100000"]);
        let r = fit(&mut c, 1024, 1024).unwrap();
        assert!(r.clamped_pending.is_some());
        assert!((c.max_connections + c.max_pending_connections) as u64 + reserve <= 1024);
        assert!(c.max_connections > c.max_pending_connections);
    }

    #[test]
    fn refuse_names_the_numbers() {
        let mut c = config(&["--max-connections", "5000", "--fd-limit-policy", "refuse"]);
        let e = fit(&mut c, 4096, 4096).unwrap_err();
        assert!(
            matches!(e, FdLimitError::TooSmall { limit: 4096, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("--max-connections 5000"));
        assert_eq!(c.max_connections, 5000, "nothing is changed");
    }

    #[test]
    fn a_limit_below_the_reserve_is_refused_whatever_the_policy() {
        let mut c = config(&[]);
        assert!(matches!(
            fit(&mut c, 64, 64),
            Err(FdLimitError::Unusable { .. })
        ));
    }
}
