//! Small helpers: clocks, rounding, dates, a tiny PRNG, loopback checks.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::bail;

/// CLOCK_MONOTONIC in nanoseconds. The clock is system-wide on Linux, so a timestamp taken
/// here can be compared with one taken by another process on the same machine (Node.js
/// `process.hrtime.bigint()` reads the same clock). rustix reads it through the vDSO, like
/// libc, without `unsafe` here.
pub(crate) fn mono_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

pub(crate) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn round3(v: f64) -> f64 {
    if !v.is_finite() {
        return 0.0;
    }
    (v * 1000.0).round() / 1000.0
}

/// "YYYY-MM-DDTHH:MM:SSZ" for a Unix time (civil-from-days, proleptic Gregorian).
pub(crate) fn utc_string(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// splitmix64: good enough to pick random targets, and needs no dependency.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub(crate) fn seeded() -> Self {
        Rng::new(mono_ns() ^ u64::from(std::process::id()).rotate_left(32))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0); the modulo bias is irrelevant for n far below 2^64.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }
}

/// The bench only ever sends traffic to this machine: refuses anything outside 127.0.0.0/8
/// and ::1.
pub(crate) fn require_loopback(ip: IpAddr, what: &str) -> anyhow::Result<()> {
    if ip.is_loopback() {
        Ok(())
    } else {
        bail!("{what} resolves to {ip}: herald-bench only sends traffic to loopback addresses (127.0.0.0/8, ::1)")
    }
}

/// Checks a positive, finite number of seconds.
pub(crate) fn check_secs(v: f64, flag: &str, allow_zero: bool) -> anyhow::Result<()> {
    let ok = v.is_finite() && (v > 0.0 || (allow_zero && v == 0.0));
    if !ok {
        bail!(
            "{flag} must be a {} number of seconds",
            if allow_zero {
                "non-negative"
            } else {
                "positive"
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_strings_are_civil_dates() {
        assert_eq!(utc_string(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_string(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_string(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = mono_ns();
        let b = mono_ns();
        assert!(a > 0 && b >= a);
    }

    #[test]
    fn monotonic_clock_counts_nanoseconds() {
        let a = mono_ns();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let d = mono_ns() - a;
        assert!((20_000_000..2_000_000_000).contains(&d), "{d} ns");
    }

    #[test]
    fn rng_stays_in_range() {
        let mut r = Rng::new(7);
        assert!((0..1000).all(|_| r.below(13) < 13));
        assert_eq!(r.below(0), 0);
    }

    #[test]
    fn only_loopback_is_allowed() {
        assert!(require_loopback("127.0.0.9".parse().unwrap(), "x").is_ok()); // safe: test
        assert!(require_loopback("::1".parse().unwrap(), "x").is_ok()); // safe: test
        assert!(require_loopback("10.0.0.1".parse().unwrap(), "x").is_err()); // safe: test
    }
}
