//! Whether one session is still alive and keeping up: when its client was last heard, when
//! its token expires, and the verdict the node's sweeper acts on.
//!
//! There is no timer per session. One sweeper task per node visits every session a few
//! times per interval (the hub's wheel decides which tick visits which session, and which
//! visit pings it) and asks [`Liveness::judge`] what to do, so an idle session owns two
//! integers here and nothing that wakes up by itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::protocol::CloseReason;

/// Liveness settings the sweeper applies to every session.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LivenessSettings {
    pub(crate) ping_interval: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) write_timeout: Duration,
    /// How long a session outlives its token's `exp` without a refresh.
    pub(crate) token_grace: Duration,
}

/// One sweep's clocks, read once for every session it visits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    /// [`crate::clock::mono_ms`].
    pub(crate) mono_ms: u64,
    /// Unix seconds (token expiries are wall-clock times).
    pub(crate) unix_s: u64,
}

impl LivenessSettings {
    /// How often the sweeper visits every session: a quarter of the shortest interval it
    /// enforces, between 20 ms and 1 s, so each limit is enforced within a quarter of
    /// itself without the sweep becoming a busy loop.
    pub(crate) fn sweep_period(&self) -> Duration {
        (self
            .ping_interval
            .min(self.idle_timeout)
            .min(self.write_timeout)
            / 4)
        .clamp(Duration::from_millis(20), Duration::from_secs(1))
    }
}

/// What the sweeper should do with one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing is due.
    Fine,
    /// The wheel says this visit pings the session.
    Ping,
    /// The session must close.
    Close(CloseReason),
}

/// When one session was last heard, in [`crate::clock::mono_ms`] milliseconds, and its
/// token's expiry. When it is pinged is not its own business: the sweeper's wheel pings each
/// session at its place in the ping cycle, so pings are spread evenly over the interval
/// instead of following connect times.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    last_heard: AtomicU64,
    /// Unix seconds; 0 when the token does not expire (--dev).
    token_exp: AtomicU64,
}

impl Liveness {
    /// A session that was just heard from at `now`, whose token expires at `token_exp`
    /// (Unix seconds).
    pub(crate) fn new(now: u64, token_exp: Option<u64>) -> Self {
        Liveness {
            last_heard: AtomicU64::new(now),
            token_exp: AtomicU64::new(token_exp.unwrap_or(0)),
        }
    }

    /// A session that sends nothing upstream (SSE): it is never judged idle; pings and the
    /// write timeout find a dead peer.
    pub(crate) fn never_idle(now: u64, token_exp: Option<u64>) -> Self {
        let live = Self::new(now, token_exp);
        live.last_heard.store(u64::MAX, Ordering::Relaxed);
        live
    }

    /// A fresh token was accepted.
    pub(crate) fn refreshed(&self, token_exp: Option<u64>) {
        self.token_exp
            .store(token_exp.unwrap_or(0), Ordering::Relaxed);
    }

    /// Records that the client sent something.
    pub(crate) fn heard(&self, now: u64) {
        self.last_heard.store(now, Ordering::Relaxed);
    }

    /// Judges the session at `now`. `stalled_since` is when its backlog last made progress,
    /// if it has one; `ping_due` says whether this visit is the session's place in the ping
    /// cycle. Closing wins over pinging.
    pub(crate) fn judge(
        &self,
        now: Now,
        s: &LivenessSettings,
        stalled_since: Option<u64>,
        ping_due: bool,
    ) -> Verdict {
        let exp = self.token_exp.load(Ordering::Relaxed);
        if exp != 0 && now.unix_s >= exp.saturating_add(s.token_grace.as_secs()) {
            return Verdict::Close(CloseReason::TokenExpired);
        }
        let now = now.mono_ms;
        let ms = |d: Duration| d.as_millis() as u64;
        if stalled_since.is_some_and(|t| now.saturating_sub(t) >= ms(s.write_timeout)) {
            return Verdict::Close(CloseReason::SlowConsumer);
        }
        let heard = self.last_heard.load(Ordering::Relaxed);
        if heard != u64::MAX && now.saturating_sub(heard) >= ms(s.idle_timeout) {
            return Verdict::Close(CloseReason::IdleTimeout);
        }
        if ping_due {
            return Verdict::Ping;
        }
        Verdict::Fine
    }
}
