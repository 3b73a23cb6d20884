//! A TCP proxy owned by a test, put between a node and Redis to simulate partitions: it can
//! forward, blackhole the pub/sub connection (keep it open but forward nothing, like a dead
//! link), or cut (reset every connection and refuse new ones).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const FORWARD: u8 = 0;
const CUT: u8 = 1;
const BLACKHOLE_PUBSUB: u8 = 2;

/// The proxy; dropping it stops it and closes every connection.
pub struct Proxy {
    pub port: u16,
    mode: Arc<AtomicU8>,
    generation: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let port = listener.local_addr().expect("proxy addr").port();
        let mode = Arc::new(AtomicU8::new(FORWARD));
        let (generation, gen_rx) = watch::channel(0u64);
        let m = mode.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                // Cut: a new connection is reset at once. A blackhole keeps it open and
                // silent instead (handled while piping).
                if m.load(Ordering::SeqCst) == CUT {
                    let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                    drop(client);
                    continue;
                }
                let m = m.clone();
                let gen_rx = gen_rx.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    pipe(client, server, m, gen_rx).await;
                });
            }
        });
        Proxy {
            port,
            mode,
            generation,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stops forwarding only on connections that issued SUBSCRIBE (the node's pub/sub
    /// connection), leaving command connections working: publishes succeed, nothing is
    /// delivered. The failure the canary exists for.
    pub fn blackhole_pubsub(&self) {
        self.mode.store(BLACKHOLE_PUBSUB, Ordering::SeqCst);
    }

    /// Resets every open connection and refuses new ones.
    pub fn cut(&self) {
        self.mode.store(CUT, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Forwards again (new connections work; blackholed ones resume).
    pub fn heal(&self) {
        self.mode.store(FORWARD, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.generation.send_modify(|g| *g += 1);
        self.task.abort();
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    mode: Arc<AtomicU8>,
    mut gen_rx: watch::Receiver<u64>,
) {
    let start_gen = *gen_rx.borrow();
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let mut a = [0u8; 16 * 1024];
    let mut b = [0u8; 16 * 1024];
    let mut pubsub = false;
    loop {
        tokio::select! {
            _ = gen_rx.changed() => {
                if *gen_rx.borrow() != start_gen {
                    return;
                }
            }
            r = cr.read(&mut a) => {
                let Ok(n) = r else { return };
                if n == 0 { return; }
                pubsub |= a[..n].windows(9).any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"));
                if !wait_forwarding(&mode, &mut gen_rx, start_gen, pubsub).await { return; }
                if sw.write_all(&a[..n]).await.is_err() { return; }
            }
            r = sr.read(&mut b) => {
                let Ok(n) = r else { return };
                if n == 0 { return; }
                if !wait_forwarding(&mode, &mut gen_rx, start_gen, pubsub).await { return; }
                if cw.write_all(&b[..n]).await.is_err() { return; }
            }
        }
    }
}

/// Holds bytes while blackholed; false when the connection must be dropped (cut).
async fn wait_forwarding(
    mode: &AtomicU8,
    gen_rx: &mut watch::Receiver<u64>,
    start_gen: u64,
    pubsub: bool,
) -> bool {
    loop {
        match mode.load(Ordering::SeqCst) {
            FORWARD => return true,
            CUT => return false,
            BLACKHOLE_PUBSUB if !pubsub => return true,
            _ => {}
        }
        if *gen_rx.borrow() != start_gen {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
