//! Per-user rate limits of what clients call over plain HTTP (`POST /ack`): a GCRA limiter
//! keyed by user, whose idle keys are dropped as the map grows, so neither a busy user nor
//! many users can make the node hold state that is not given back.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Below this many keys the limiter is never swept.
const SWEEP_FLOOR: usize = 4096;

pub(super) struct UserRateLimit {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    /// Sweep idle keys once the map holds more than this (doubles with the live set, so a
    /// sweep's cost is spread over at least as many requests as it visits keys).
    sweep_at: AtomicUsize,
}

impl UserRateLimit {
    /// `rate` requests per second per user, `burst` at once.
    pub(super) fn new(rate: u32, burst: u32) -> Self {
        let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        UserRateLimit {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
            sweep_at: AtomicUsize::new(SWEEP_FLOOR),
        }
    }

    /// Takes one request of `user`; when over the rate, the whole seconds to wait.
    pub(super) fn check(&self, user: &str) -> Result<(), u64> {
        let verdict = self.limiter.check_key(&user.to_string());
        let len = self.limiter.len();
        if len > self.sweep_at.load(Ordering::Relaxed) {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
            let live = self.limiter.len();
            self.sweep_at
                .store((live * 2).max(SWEEP_FLOOR), Ordering::Relaxed);
        }
        verdict.map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_the_burst_then_waits_and_others_are_not_affected() {
        let limit = UserRateLimit::new(1, 3);
        for _ in 0..3 {
            assert_eq!(limit.check("alice"), Ok(()));
        }
        assert_eq!(
            limit.check("alice"),
            Err(1),
            "fourth at once: wait about a second"
        );
        assert_eq!(
            limit.check("bob"),
            Ok(()),
            "another user has a bucket of their own"
        );
    }

    #[test]
    fn idle_keys_are_swept_as_the_map_grows() {
        // A bucket of 1 at 1000/s is full again 1 ms after its use: such keys are idle.
        let limit = UserRateLimit::new(1000, 1);
        for i in 0..(SWEEP_FLOOR * 4) {
            let _ = limit.check(&format!("user-{i}"));
            if i % 256 == 0 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        // Each sweep drops the keys idle by then; without sweeps all 16,384 would remain.
        assert!(limit.keys() < SWEEP_FLOOR * 2, "{} keys kept", limit.keys());
    }
}
