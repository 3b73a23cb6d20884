//! The report every scenario produces: common top-level fields (the contract scripts rely
//! on) plus a scenario-specific `result`, printed as one table and written as JSON.

use std::collections::BTreeMap;

use anyhow::Context;
use serde::Serialize;

use crate::dial::{ConnectStats, Dialer};
use crate::hist::Lat;
use crate::probe::{Machine, PhaseCpu};
use crate::recv::Tally;
use crate::util::{round3, unix_secs, utc_string};
use crate::wire::Protocol;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report<D: Serialize> {
    pub(crate) scenario: &'static str,
    pub(crate) protocol: Protocol,
    pub(crate) unix_time: u64,
    pub(crate) utc: String,
    pub(crate) machine: Machine,
    pub(crate) targets: Vec<String>,
    pub(crate) source_ips: usize,
    pub(crate) concurrency: usize,
    /// Sessions requested.
    pub(crate) sessions: usize,
    pub(crate) connected: usize,
    pub(crate) failed: usize,
    /// Distinct bench payloads received (over the measured sessions).
    pub(crate) delivered: u64,
    pub(crate) expected: u64,
    pub(crate) lost: u64,
    pub(crate) duplicated: u64,
    pub(crate) out_of_order: u64,
    /// `delivered` divided by the producer's active time.
    pub(crate) delivered_per_s: f64,
    /// End-to-end latency (delivery scenarios), or the scenario's main latency.
    pub(crate) latency_ms: Lat,
    /// CPU seconds per process over the measured phase (`server:<pid>`, `redis:<pid>`,
    /// `bench:<pid>`, `other:<pid>`).
    pub(crate) cpu_seconds: BTreeMap<String, f64>,
    /// Servers' (--pids) CPU seconds per 100,000 delivered messages.
    pub(crate) cpu_per_100k_delivered_server: Option<f64>,
    pub(crate) cpu_per_100k_delivered_redis: Option<f64>,
    pub(crate) cpu_per_100k_delivered_bench: Option<f64>,
    /// The machine did other work during the measured phase (see `cpu.noisy_reasons`).
    pub(crate) noisy: bool,
    pub(crate) cpu: PhaseCpu,
    /// Server RSS at the end of the measured phase.
    pub(crate) rss_kib: BTreeMap<String, u64>,
    pub(crate) connect: ConnectStats,
    pub(crate) result: D,
}

impl<D: Serialize> Report<D> {
    pub(crate) fn new(
        scenario: &'static str,
        dialer: &Dialer,
        concurrency: usize,
        connect: ConnectStats,
        result: D,
    ) -> Self {
        let now = unix_secs();
        Report {
            scenario,
            protocol: dialer.protocol,
            unix_time: now,
            utc: utc_string(now),
            machine: Machine::detect(),
            targets: dialer.targets.iter().map(|t| t.label.clone()).collect(),
            source_ips: dialer.source_ips.len(),
            concurrency,
            sessions: connect.requested,
            connected: connect.connected,
            failed: connect.failed,
            delivered: 0,
            expected: 0,
            lost: 0,
            duplicated: 0,
            out_of_order: 0,
            delivered_per_s: 0.0,
            latency_ms: Lat::default(),
            cpu_seconds: BTreeMap::new(),
            cpu_per_100k_delivered_server: None,
            cpu_per_100k_delivered_redis: None,
            cpu_per_100k_delivered_bench: None,
            noisy: false,
            cpu: PhaseCpu::default(),
            rss_kib: BTreeMap::new(),
            connect,
            result,
        }
    }

    /// Fills the delivery fields from a tally over `active_s` seconds of production.
    pub(crate) fn set_tally(&mut self, t: &Tally, active_s: f64) {
        self.delivered = t.delivered;
        self.expected = t.expected;
        self.lost = t.lost;
        self.duplicated = t.duplicated;
        self.out_of_order = t.out_of_order;
        self.delivered_per_s = round3(t.delivered as f64 / active_s.max(1e-9));
    }

    /// Fills the CPU fields from a measured phase (after the delivery fields).
    pub(crate) fn set_cpu(&mut self, cpu: PhaseCpu) {
        let per =
            |s: f64| (self.delivered > 0).then(|| round3(s * 100_000.0 / self.delivered as f64));
        self.cpu_per_100k_delivered_server = per(cpu.servers_s);
        self.cpu_per_100k_delivered_redis = per(cpu.redis_s);
        self.cpu_per_100k_delivered_bench = per(cpu.bench_s);
        self.cpu_seconds = cpu.cpu_seconds.clone();
        self.noisy = cpu.noisy;
        self.cpu = cpu;
    }

    pub(crate) fn write_json(&self, path: Option<&std::path::Path>) -> anyhow::Result<()> {
        let Some(path) = path else {
            return Ok(());
        };
        let text = serde_json::to_string_pretty(self).context("cannot serialise the report")?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("herald-bench: wrote {}", path.display());
        Ok(())
    }

    /// The header and the lines every scenario shares.
    pub(crate) fn print_head(&self) {
        println!();
        println!(
            "== herald-bench {} ({}, {}) ==",
            self.scenario,
            self.protocol.name(),
            self.utc
        );
        println!(
            "machine: {} cores, {}, Linux {}",
            self.machine.nproc, self.machine.cpu_model, self.machine.kernel
        );
        if self.noisy {
            println!("NOISY RUN: {}", self.cpu.noisy_reasons.join("; "));
        }
        row("targets", self.targets.join(" "));
        row(
            "sessions connected",
            format!("{} of {}", self.connected, self.sessions),
        );
        row(
            "connect: sess/s, ms p50/p99/max",
            format!(
                "{:.0}, {}",
                self.connect.sessions_per_s,
                self.connect.handshake_ms.short()
            ),
        );
        for (e, n) in &self.connect.errors {
            row("  connect failure", format!("x{n}: {e}"));
        }
    }

    /// Delivery lines (fanout-like scenarios).
    pub(crate) fn print_delivery(&self) {
        row(
            "delivered / expected",
            format!("{} / {}", self.delivered, self.expected),
        );
        row(
            "lost / duplicated / out of order",
            format!(
                "{} / {} / {}",
                self.lost, self.duplicated, self.out_of_order
            ),
        );
        row("delivered/s", format!("{:.0}", self.delivered_per_s));
        let l = &self.latency_ms;
        row(
            "latency ms p50/p90/p99/p99.9/max",
            format!(
                "{:.2}/{:.2}/{:.2}/{:.2}/{:.2}",
                l.p50, l.p90, l.p99, l.p999, l.max
            ),
        );
    }

    /// CPU lines.
    pub(crate) fn print_cpu(&self) {
        row("measured phase (s)", format!("{:.1}", self.cpu.wall_s));
        for (label, s) in &self.cpu_seconds {
            row(
                &format!("cpu s {label}"),
                format!(
                    "{s:.2} ({:.0}% of a core)",
                    100.0 * s / self.cpu.wall_s.max(1e-9)
                ),
            );
        }
        if let Some(v) = self.cpu_per_100k_delivered_server {
            row("server cpu s / 100k delivered", format!("{v:.3}"));
        }
        if let Some(v) = self.cpu_per_100k_delivered_redis {
            row("redis cpu s / 100k delivered", format!("{v:.3}"));
        }
        if let Some(v) = self.cpu_per_100k_delivered_bench {
            row("bench cpu s / 100k delivered", format!("{v:.3}"));
        }
        row(
            "machine busy / unexplained cores",
            format!(
                "{:.2} / {:.2}{}",
                self.cpu.machine_busy_cores,
                self.cpu.unexplained_cores,
                if self.noisy { "  (NOISY)" } else { "" }
            ),
        );
        for (label, kib) in &self.rss_kib {
            row(&format!("rss KiB {label}"), kib.to_string());
        }
    }
}

/// One "name   value" line of a summary table.
pub(crate) fn row(name: &str, value: impl std::fmt::Display) {
    println!("{name:<34} {value}");
}
