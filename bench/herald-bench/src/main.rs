//! `herald-bench`: the load generator for herald nodes (and, with `--protocol socketio`, for
//! a Socket.IO server publishing the same payloads, for comparison).
//!
//! Each scenario is a subcommand; every one prints one summary table and, with `--json`,
//! writes a report whose top-level fields are the same for all (see [`report::Report`]).
//!
//! - `idle`: N sessions (WebSocket, or SSE with `--transport sse`) held idle; node RSS per
//!   session and CPU at rest.
//! - `connect`: N sessions with bounded handshakes in flight; handshakes/s and latency.
//! - `fanout` / `broadcast` / `topic`: N sessions, a paced producer (Redis, HTTP or
//!   external); end-to-end latency, loss, duplicates, reordering, CPU per 100k deliveries.
//! - `slow`: like fanout, while a share of sessions never reads and is flooded.
//! - `churn`: connect/disconnect loops; node RSS and Redis keys over time, back to baseline.
//! - `durable`: PUBLISH vs `FCALL herald_notify` cost (plain and idempotent), and replay
//!   time of 100 messages.
//! - `catchup`: time to catch N live sessions up on the durable messages stored while the
//!   node's subscription was cut.
//! - `flood`: N connections each sending an unfinished request head; node RSS before, at
//!   the peak, while held, after the close and after a settle time.
//!
//! Module map: [`dial`] opens sessions, [`wire`] is the protocol-specific part, [`sse`] the
//! client side of herald's SSE transport, [`recv`]
//! tracks what sessions receive, [`producer`] publishes, [`probe`] reads /proc, Redis and
//! metrics, [`node_http`] makes the HTTP requests to nodes (reqwest), [`report`] prints and
//! serialises, [`hist`] holds latency histograms.

// The bench's output is its summary tables on stdout (progress and errors go to stderr).
#![allow(clippy::print_stdout)]

mod catchup;
mod churn;
mod connect;
mod dial;
mod durable;
mod fanout;
mod flood;
mod hist;
mod idle;
mod node_http;
mod probe;
mod producer;
mod pusher;
mod recv;
mod report;
mod sse;
mod util;
mod wire;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "herald-bench",
    version,
    about = "Load generator and benchmarks for herald nodes",
    long_about = "Load generator and benchmarks for herald nodes. Traffic goes to loopback \
                  addresses only. Every scenario prints one summary table and writes JSON \
                  with --json; see BENCHMARKS.md for the commands behind each number."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open N authenticated sessions (WebSocket, or SSE with --transport sse), hold them
    /// idle, and report node RSS per session and node CPU at rest.
    Idle(idle::IdleArgs),
    /// Open N sessions with a bounded number of handshakes in flight; report handshakes/s
    /// and connect latency.
    Connect(connect::ConnectArgs),
    /// N sessions (one per user); the producer sends each message to one random user.
    Fanout(fanout::FanoutArgs),
    /// N sessions; the producer sends every message to <prefix>:broadcast.
    Broadcast(fanout::FanoutArgs),
    /// N sessions in --topics topics (session i joins t<i % K>); messages go to a random topic.
    Topic(fanout::TopicArgs),
    /// Like fanout, while --slow-share of the sessions never read and are flooded.
    Slow(fanout::SlowArgs),
    /// Connect/disconnect loops (clean close, drop, TCP RST); node RSS and Redis keys over
    /// time, and whether they return to baseline after --settle.
    Churn(churn::ChurnArgs),
    /// Cost of a durable publish (FCALL herald_notify) against PUBLISH, and replay time of
    /// pending durable messages on connect (herald only).
    Durable(durable::DurableArgs),
    /// A pre-authentication flood: N connections each send M KiB of a request head that
    /// never ends; node RSS before, at the peak, held, after close and after --settle.
    Flood(flood::FloodArgs),
    /// Catch-up of N live sessions after the node's subscription was cut and healed: per
    /// session and total time, missing/duplicated messages, node and Redis CPU (herald
    /// only; changes the ACL of the Redis it is given: use a private one).
    Catchup(catchup::CatchupArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald-bench: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Idle(a) => idle::run(a).await,
            Command::Connect(a) => connect::run(a).await,
            Command::Fanout(a) => fanout::run(fanout::Mode::Fanout, a).await,
            Command::Broadcast(a) => fanout::run(fanout::Mode::Broadcast, a).await,
            Command::Topic(a) => fanout::run_topic(a).await,
            Command::Slow(a) => fanout::run_slow(a).await,
            Command::Churn(a) => churn::run(a).await,
            Command::Durable(a) => durable::run(a).await,
            Command::Flood(a) => flood::run(a).await,
            Command::Catchup(a) => catchup::run(a).await,
        }
    });
    // Dropping thousands of held sessions is quick; do not wait for their tasks.
    runtime.shutdown_background();
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("herald-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn contract_flags_parse() {
        let cli = Cli::try_parse_from([
            "herald-bench",
            "fanout",
            "--target",
            "ws://127.0.0.1:1",
            "--target",
            "ws://127.0.0.1:2",
            "--sessions",
            "10",
            "--first-user",
            "8000",
            "--protocol",
            "socketio",
            "--secret",
            "s",
            "--source-ips",
            "127.0.0.2-127.0.0.3",
            "--concurrency",
            "4",
            "--pids",
            "1,2",
            "--redis-pid",
            "3",
            "--json",
            "x.json",
            "--ready-file",
            "r.json",
            "--hold",
            "0",
            "--producer",
            "external",
            "--redis-url",
            "redis://127.0.0.1:1",
            "--prefix",
            "p",
            "--api-key",
            "k",
            "--rate",
            "10",
            "--duration",
            "1",
            "--payload-bytes",
            "10",
            "--expect-file",
            "e.json",
            "--drain",
            "1",
        ]);
        assert!(cli.is_ok(), "{:?}", cli.err());
        for sub in ["idle", "connect", "broadcast", "churn", "durable"] {
            let redis: &[&str] = if sub == "durable" {
                &["--redis-url", "redis://127.0.0.1:1"]
            } else {
                &[]
            };
            let r = Cli::try_parse_from(
                [
                    "herald-bench",
                    sub,
                    "--target",
                    "ws://127.0.0.1:1",
                    "--dev",
                    "--hold",
                    "1",
                    "--pids",
                    "1",
                    "--redis-pid",
                    "2",
                ]
                .iter()
                .chain(redis),
            );
            assert!(r.is_ok(), "{sub}: {:?}", r.err());
        }
        let r = Cli::try_parse_from([
            "herald-bench",
            "catchup",
            "--target",
            "ws://127.0.0.1:1",
            "--dev",
            "--pids",
            "1",
            "--redis-pid",
            "2",
            "--redis-url",
            "redis://127.0.0.1:1",
            "--messages-per-user",
            "3",
            "--cut",
            "2",
            "--timeout",
            "60",
        ]);
        assert!(r.is_ok(), "{:?}", r.err());
        let r = Cli::try_parse_from([
            "herald-bench",
            "idle",
            "--target",
            "ws://127.0.0.1:1",
            "--dev",
            "--transport",
            "sse",
        ]);
        assert!(r.is_ok(), "{:?}", r.err());
        let r = Cli::try_parse_from([
            "herald-bench",
            "durable",
            "--target",
            "ws://127.0.0.1:1",
            "--dev",
            "--redis-url",
            "redis://127.0.0.1:1",
            "--idempotency",
        ]);
        assert!(r.is_ok(), "{:?}", r.err());
        let r = Cli::try_parse_from([
            "herald-bench",
            "topic",
            "--target",
            "ws://127.0.0.1:1",
            "--dev",
            "--topics",
            "5",
        ]);
        assert!(r.is_ok(), "{:?}", r.err());
        let r = Cli::try_parse_from([
            "herald-bench",
            "slow",
            "--target",
            "ws://127.0.0.1:1",
            "--dev",
            "--slow-share",
            "0.1",
            "--metrics-url",
            "http://127.0.0.1:1/metrics",
        ]);
        assert!(r.is_ok(), "{:?}", r.err());
    }
}
