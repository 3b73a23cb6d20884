//! The `herald` binary: parses configuration, starts a node, serves until SIGTERM/SIGINT,
//! then drains.

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use herald::{Config, Node};

/// jemalloc rather than glibc malloc: memory a flood of connections made the node allocate
/// is given back to the system after it ends (Cargo.toml says what was measured).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let mut config = Config::parse();
    init_tracing(&config.log_format);
    if let Err(e) = config.load_secret_files().and_then(|()| config.validate()) {
        eprintln!("herald: refusing to start: {e}");
        tracing::error!("refusing to start: {e}");
        return std::process::ExitCode::from(2);
    }
    match herald::fdlimit::raise_and_fit(&mut config) {
        Ok(report) => log_fd_report(&report, &config),
        Err(e) => {
            eprintln!("herald: refusing to start: {e}");
            tracing::error!("refusing to start: {e}");
            return std::process::ExitCode::from(2);
        }
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = config.worker_threads {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e:#}");
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Says what the open-file limit is, and shouts when the connection caps were lowered to
/// fit under it: the node then refuses sessions sooner than its operator asked for.
fn log_fd_report(report: &herald::fdlimit::FdReport, config: &Config) {
    tracing::info!(
        soft_at_start = report.soft_before,
        soft = report.soft,
        hard = report.hard,
        max_connections = config.max_connections,
        max_pending_connections = config.max_pending_connections,
        "open-file limit"
    );
    if let Some((asked, now)) = report.clamped_connections {
        tracing::warn!(
            "--max-connections lowered from {asked} to {now}: the open-file limit is {} \
             (hard {}); raise it, or pass --fd-limit-policy refuse to make this an error",
            report.soft,
            report.hard
        );
    }
    if let Some((asked, now)) = report.clamped_pending {
        tracing::warn!(
            "--max-pending-connections lowered from {asked} to {now} to fit the open-file \
             limit {}",
            report.soft
        );
    }
}

fn init_tracing(format: &str) {
    let filter = EnvFilter::try_from_env("HERALD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    if config.dev {
        tracing::warn!("################################################################");
        tracing::warn!("# --dev: tokens are taken as user ids and the API needs no key. #");
        tracing::warn!("# Anyone can connect as anyone. Never run this in production.  #");
        tracing::warn!("################################################################");
    }
    let listen = config.listen;
    let mode = if !config.redis_cluster.is_empty() {
        "cluster (redis cluster)"
    } else if !config.redis_sentinel.is_empty() {
        "cluster (sentinel)"
    } else if config.redis_url.is_some() {
        "cluster"
    } else {
        "standalone"
    };
    let listener = bind(listen, config.listen_backlog)
        .with_context(|| format!("cannot listen on {listen}"))?;
    let metrics_addr = config.metrics_listen;
    let metrics_listener = match metrics_addr {
        Some(addr) => {
            Some(bind(addr, 128).with_context(|| format!("cannot listen on {addr} for metrics"))?)
        }
        None => None,
    };
    let node = Node::start(config).context("cannot start the node")?;
    tracing::info!(node = %node.node_id(), %listen, mode, "herald listening");

    let http_stop = CancellationToken::new();
    let server = tokio::spawn(herald::serve(node.clone(), listener, http_stop.clone()));
    let metrics_server = metrics_listener.map(|l| {
        tracing::info!(listen = ?metrics_addr, "metrics listening");
        tokio::spawn(herald::serve_metrics(node.clone(), l, http_stop.clone()))
    });

    shutdown_signal().await;
    tracing::info!("stop requested; draining");
    // HTTP keeps serving while draining so /readyz reports 503 and upgrades are refused.
    node.drain().await;
    http_stop.cancel();
    let _ = server.await;
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    tracing::info!("bye");
    Ok(())
}

/// Binds with an explicit backlog (tokio's `TcpListener::bind` uses 128).
fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGTERM handler; only Ctrl-C stops");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
