//! The bound on how fast one client may send frames: the generic cell rate algorithm
//! (GCRA) kept in one `u64` per session. A client over its rate is not cut off and loses
//! nothing: the session stops reading its socket until the rate is back within bounds, so
//! the client's own writes back up. This is what bounds the Redis work one client can
//! cause (each acknowledgement is a Redis call).
//!
//! Hand-written rather than `governor` (used for the keyed `POST /ack` limit) because it
//! lives in every idle session: 8 bytes here against governor's direct limiter, which
//! carries its own quota and clock per instance.

use std::time::Duration;

/// A rate shared by every session of a node.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameRate {
    /// Microseconds between frames at the sustained rate.
    interval_us: u64,
    /// How far ahead of real time a client may get: the burst above the rate.
    tolerance_us: u64,
}

impl FrameRate {
    /// `per_second` frames per second on average, up to `burst` at once (both at least 1).
    pub(crate) fn new(per_second: u32, burst: u32) -> Self {
        let interval_us = 1_000_000 / u64::from(per_second.max(1));
        FrameRate {
            interval_us,
            tolerance_us: interval_us * u64::from(burst.max(1) - 1),
        }
    }
}

/// One session's state: the theoretical arrival time of its next frame.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Throttle {
    tat_us: u64,
}

impl Throttle {
    /// Counts a frame that arrived at `now_us`; returns how long to stop reading if the
    /// client is now ahead of its rate by more than the burst allows.
    pub(crate) fn take(&mut self, rate: &FrameRate, now_us: u64) -> Option<Duration> {
        self.tat_us = self.tat_us.max(now_us) + rate.interval_us;
        // The next frame conforms once now >= tat - tolerance.
        let resume = self.tat_us.saturating_sub(rate.tolerance_us);
        (resume > now_us).then(|| Duration::from_micros(resume - now_us))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_frames_are_paced_at_the_rate() {
        let rate = FrameRate::new(10, 5);
        let mut t = Throttle::default();
        let now = 1_000_000;
        for i in 0..4 {
            assert_eq!(t.take(&rate, now), None, "frame {i} of the burst");
        }
        // The fifth uses up the burst: reading pauses one interval.
        assert_eq!(t.take(&rate, now), Some(Duration::from_millis(100)));
        // After the pause a frame at the sustained rate is fine again... and then pauses.
        assert_eq!(
            t.take(&rate, now + 100_000),
            Some(Duration::from_millis(100))
        );
        // A client that keeps to the rate is never paused.
        let mut steady = Throttle::default();
        for i in 0..100u64 {
            assert_eq!(steady.take(&rate, now + i * 100_000), None);
        }
    }

    #[test]
    fn a_flood_is_paced_to_the_rate_over_time() {
        // 10,000 frames at once with a rate of 20/s: the pauses add up to what the rate
        // allows (the burst excepted), so the client gets through no faster than 20/s.
        let rate = FrameRate::new(20, 40);
        let mut t = Throttle::default();
        let mut now = 0u64;
        for _ in 0..10_000 {
            if let Some(p) = t.take(&rate, now) {
                now += p.as_micros() as u64;
            }
        }
        let secs = now as f64 / 1e6;
        assert!(
            (497.0..=500.0).contains(&secs),
            "{secs} s for 10,000 frames"
        );
    }

    #[test]
    fn the_state_is_one_word() {
        assert_eq!(size_of::<Throttle>(), 8);
    }
}
