//! The network between regions, on loopback: one fault-injecting TCP proxy per directed
//! replication link (a puller in one region reading its peer's log). Faults act on the link:
//!
//! - **blocked**: open connections are cut and new ones are closed at once (a partition; block
//!   one direction only for a one-way partition);
//! - **delay**: every chunk forwarded waits this long (latency);
//! - **rate**: chunks are paced to this many bytes per second (a bandwidth cap);
//! - **loss**: each chunk cuts its connection with this probability, in parts per million
//!   (TCP hides packet loss as retransmission delay; a cut is the loss a stream can see).
//!
//! Duplication and reordering of replication *messages* happen above TCP, in the pullers'
//! test-only chaos mode (`QUIVER_TEST_REPLICATION_CHAOS`), since a byte stream cannot carry
//! them without breaking its framing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a link does to its traffic now.
#[derive(Debug, Default)]
pub struct LinkFaults {
    blocked: AtomicBool,
    delay_us: AtomicU64,
    rate_bytes_per_s: AtomicU64,
    loss_ppm: AtomicU64,
    /// Bumped to cut every open connection.
    epoch: AtomicU64,
    rng: Mutex<quiver_testkit::Rng>,
}

impl LinkFaults {
    /// Partitions (or heals) the link; blocking cuts open connections.
    pub fn set_blocked(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::SeqCst);
        if blocked {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Latency per forwarded chunk.
    pub fn set_delay(&self, d: Duration) {
        self.delay_us.store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// Bandwidth cap (0: none).
    pub fn set_rate(&self, bytes_per_s: u64) {
        self.rate_bytes_per_s.store(bytes_per_s, Ordering::SeqCst);
    }

    /// Probability, in parts per million, that a chunk cuts its connection.
    pub fn set_loss_ppm(&self, ppm: u64) {
        self.loss_ppm.store(ppm, Ordering::SeqCst);
    }

    /// Back to a healthy link.
    pub fn heal(&self) {
        self.set_blocked(false);
        self.set_delay(Duration::ZERO);
        self.set_rate(0);
        self.set_loss_ppm(0);
    }

    fn blocked(&self) -> bool {
        self.blocked.load(Ordering::SeqCst)
    }

    fn roll(&self) -> u64 {
        // Shared by the link's connections: their interleaving only perturbs the sequence.
        self.rng.lock().unwrap_or_else(|p| p.into_inner()).below(1_000_000)
    }
}

/// A running proxy: connections to `addr` are forwarded to the target.
#[derive(Debug)]
pub struct Link {
    /// Where the puller connects.
    pub addr: SocketAddr,
    /// Its faults.
    pub faults: Arc<LinkFaults>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Link {
    /// Starts a proxy on a free loopback port forwarding to `target`.
    pub async fn start(target: SocketAddr, seed: u64) -> std::io::Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let faults = Arc::new(LinkFaults::default());
        *faults.rng.lock().unwrap_or_else(|p| p.into_inner()) = quiver_testkit::Rng::new(seed);
        let f = faults.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { continue };
                if f.blocked() {
                    drop(inbound);
                    continue;
                }
                let f = f.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else { return };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let epoch = f.epoch.load(Ordering::SeqCst);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::select! {
                        _ = pipe(ri, wo, f.clone(), epoch) => {}
                        _ = pipe(ro, wi, f.clone(), epoch) => {}
                    }
                });
            }
        });
        Ok(Link { addr, faults, task })
    }
}

/// Forwards one direction until EOF, an error, or a fault cuts it.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    f: Arc<LinkFaults>,
    epoch: u64,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        // Wake up now and then to notice a partition on an idle connection.
        let n = match tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await {
            Err(_) => {
                if f.epoch.load(Ordering::SeqCst) != epoch {
                    return;
                }
                continue;
            }
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        if f.epoch.load(Ordering::SeqCst) != epoch || f.blocked() {
            return;
        }
        let loss = f.loss_ppm.load(Ordering::SeqCst);
        if loss > 0 && f.roll() < loss {
            return;
        }
        let delay = f.delay_us.load(Ordering::SeqCst);
        let rate = f.rate_bytes_per_s.load(Ordering::SeqCst);
        let pace = (n as u64 * 1_000_000).checked_div(rate).unwrap_or(0);
        if delay + pace > 0 {
            tokio::time::sleep(Duration::from_micros(delay + pace)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
