//! The one error type of every Redis operation, and the one time bound around each.

use std::future::Future;
use std::time::Duration;

use super::pool::PoolError;

/// Why a Redis operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RedisError {
    /// No pooled connection could be had (Redis unreachable, or the pool's wait ran out).
    #[error("redis pool: {0}")]
    Pool(#[from] PoolError),
    /// The command or script failed, or the connection broke.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The whole operation took longer than its bound.
    #[error("timed out")]
    Timeout,
    /// Redis answered something herald cannot read (a script returned a malformed value).
    #[error("unexpected reply: {0}")]
    Reply(&'static str),
}

impl RedisError {
    /// True when Redis does not know the herald Functions library (it restarted empty).
    /// Redis reports this only as text under the generic `ERR` code, so the text is read
    /// here, in one place.
    pub(crate) fn is_function_missing(&self) -> bool {
        matches!(self, RedisError::Redis(e) if e.to_string().contains("Function not found"))
    }

    /// True when the connection, not the command, failed (or none could be had), or when
    /// it reached an instance that is no longer the master: pooled connections may be
    /// broken, or open to the wrong instance, and the next ones must be made afresh.
    pub(crate) fn is_connection_error(&self) -> bool {
        match self {
            RedisError::Pool(_) | RedisError::Timeout => true,
            RedisError::Redis(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || is_readonly(e)
            }
            RedisError::Reply(_) => false,
        }
    }
}

/// True for `-READONLY`: the command reached a replica. Under Sentinel that means the master
/// moved (a failover demoted the instance this connection was made to), so the connection
/// must be replaced by one to the master the sentinels name now.
fn is_readonly(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        // A script that writes on a replica may report it inside its own error text.
        || e.to_string().contains("READONLY")
}

/// Upper bound on any single Redis operation, so a hung Redis never stalls a session, a
/// request or the heartbeat for long.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs `f` within `limit`.
pub(crate) async fn bounded_by<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, RedisError> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| RedisError::Timeout)?
}

/// Runs `f` within [`CALL_TIMEOUT`].
pub(crate) async fn bounded<T>(
    f: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, RedisError> {
    bounded_by(CALL_TIMEOUT, f).await
}

#[cfg(test)]
mod tests {
    use super::*;

    use redis::{ErrorKind, ServerErrorKind};

    #[test]
    fn readonly_means_the_master_moved_and_counts_as_a_connection_error() {
        let readonly = RedisError::Redis(redis::RedisError::from((
            ErrorKind::Server(ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        )));
        assert!(readonly.is_connection_error());
        // A script's error may carry it only in its text.
        let in_script = RedisError::Redis(redis::RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "script failed",
            "READONLY You can't write against a read only replica.".to_string(),
        )));
        assert!(in_script.is_connection_error());
        let plain = RedisError::Redis(redis::RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "wrong number of arguments",
        )));
        assert!(!plain.is_connection_error());
        assert!(!RedisError::Reply("x").is_connection_error());
    }
}
