//! Latency histograms (HDR, microsecond resolution) and their percentile summaries.

use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::util::round3;

/// Highest latency recorded, in microseconds (one hour); larger values are clamped.
const MAX_MICROS: u64 = 3_600_000_000;

/// An empty histogram from 1 µs to [`MAX_MICROS`], 3 significant digits.
// Cannot fail: new_with_bounds only errs when low < 1, high < 2 * low or sigfig > 5, and the
// bounds here are constants that satisfy all three (the hist tests build one).
#[allow(clippy::expect_used)]
pub(crate) fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant, valid histogram bounds")
}

/// Percentiles of a latency distribution, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Lat {
    pub(crate) count: u64,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
}

impl Lat {
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Lat::default();
        }
        let ms = |micros: u64| round3(micros as f64 / 1000.0);
        Lat {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: round3(h.mean() / 1000.0),
        }
    }

    /// "p50/p99/max" for tables.
    pub(crate) fn short(&self) -> String {
        format!("{:.2}/{:.2}/{:.2}", self.p50, self.p99, self.max)
    }
}

/// A histogram many tasks record into: sharded so that concurrent sessions rarely contend.
pub(crate) struct Recorder {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Recorder {
    pub(crate) fn new(shards: usize) -> Self {
        Recorder {
            shards: (0..shards.max(1)).map(|_| Mutex::new(new_hist())).collect(),
        }
    }

    pub(crate) fn record_micros(&self, shard: usize, micros: u64) {
        let mut h = self.shards[shard % self.shards.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        h.saturating_record(micros.clamp(1, MAX_MICROS));
    }

    /// All shards merged; with `reset` the shards start empty again (phase boundaries).
    pub(crate) fn merged(&self, reset: bool) -> Histogram<u64> {
        let mut out = new_hist();
        for s in &self.shards {
            let mut h = s.lock().unwrap_or_else(|e| e.into_inner());
            // Same bounds everywhere, so adding cannot fail.
            let _ = out.add(&*h);
            if reset {
                h.reset();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_zero_and_percentiles_are_ordered() {
        assert_eq!(Lat::of(&new_hist()).max, 0.0);
        let r = Recorder::new(4);
        for v in 1..=1000u64 {
            r.record_micros(v as usize, v * 1000);
        }
        let l = Lat::of(&r.merged(true));
        assert_eq!(l.count, 1000);
        assert!((l.p50 - 500.0).abs() < 1.0, "{l:?}");
        assert!(l.p50 <= l.p99 && l.p99 <= l.max);
        assert!((l.max - 1000.0).abs() < 1.0);
        assert_eq!(r.merged(false).len(), 0);
    }
}
