//! Deterministic simulation of replication with turmoil: three regions, each an engine on an
//! in-memory file system with the server's real `Replicator` and `ReplicationService` (stock
//! tonic over turmoil's simulated network), a writer per region, and a seeded schedule of
//! partitions (both ways and one way), held links (messages delayed, then released at once) and
//! crashes that lose every unsynced byte a power loss could (the file system's crash image),
//! each followed by a restart. After the faults stop and the network heals, every region must
//! hold the same winner of every cell, and every acknowledged write must be there or be
//! outranked by the winner under the documented rule. Many seeds run; a failing seed replays
//! exactly (`SIM_SEED=n`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use quiver_server::auth::{AuthMode, Authenticator};
use quiver_server::registry::Registry;
use quiver_server::replication::{service, ClusterConfig, Peer, Replicator, Transport};
use quiver_storage::fs::MemFs;
use quiver_storage::{
    AsOf, Background, Clock, Db, Durability, EventTime, FeatureId, Options, SystemTime, Value, WriteBatch,
};
use quiver_testkit::Rng;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const REGIONS: u32 = 3;
const ENTITIES: u32 = 4;
const PORT: u16 = 7000;
/// Faults and writes happen in this first stretch of simulated time; then everything heals.
const FAULTY: Duration = Duration::from_secs(20);
/// Simulated time allowed for convergence after the heal.
const SETTLE: Duration = Duration::from_secs(25);

/// The simulation's clock, as the engine's wall clock (µs since the epoch).
#[derive(Debug)]
struct SimClock;

impl Clock for SimClock {
    fn now_us(&self) -> u64 {
        1_700_000_000_000_000 + turmoil::sim_elapsed().unwrap_or_default().as_micros() as u64
    }
}

/// A turmoil stream as tonic and hyper want it.
struct SimStream(turmoil::net::TcpStream);

impl tonic::transport::server::Connected for SimStream {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl hyper_util::client::legacy::connect::Connection for SimStream {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

impl AsyncRead for SimStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Connects tonic channels over the simulated network.
#[derive(Clone)]
struct SimConnector;

impl tower::Service<tonic::transport::Uri> for SimConnector {
    type Response = hyper_util::rt::TokioIo<SimStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::transport::Uri) -> Self::Future {
        Box::pin(async move {
            let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
            let s = turmoil::net::TcpStream::connect(authority).await?;
            Ok(hyper_util::rt::TokioIo::new(SimStream(s)))
        })
    }
}

fn host(r: u32) -> String {
    format!("region{r}")
}

/// What the test keeps across a region's restarts.
struct Shared {
    fs: Vec<Mutex<MemFs>>,
    dbs: Vec<Mutex<Option<Arc<Db>>>>,
    /// Acknowledged writes: (region, entity, value, stamp).
    acked: Mutex<Vec<(u32, u32, i64, u64)>>,
    writing: AtomicBool,
}

fn options(r: u32) -> Options {
    Options {
        region: r,
        memtable_bytes: 4096,
        block_bytes: 256,
        table_bytes: 8192,
        l0_compaction_trigger: 2,
        l1_bytes: 16 << 10,
        hot_tier_bytes: if r == 2 { 1 << 16 } else { 0 },
        // A small retained log, so a region cut off long enough must bootstrap.
        replication_log_bytes: 8 << 10,
        replication_tail_bytes: 2 << 10,
        background: Background::Inline,
        clock: Arc::new(SimClock),
        ..Options::default()
    }
}

fn entity(e: u32) -> Vec<u8> {
    vec![1, b'e', e as u8]
}

async fn region_main(r: u32, shared: Arc<Shared>, seed: u64) -> Result<(), Box<dyn std::error::Error>> {
    let fs = shared.fs[(r - 1) as usize].lock().map_err(|_| "poisoned")?.clone();
    let db = Arc::new(Db::open_with_fs(Arc::new(fs), Path::new("/db"), options(r))?);
    *shared.dbs[(r - 1) as usize].lock().map_err(|_| "poisoned")? = Some(db.clone());
    let registry = Arc::new(Registry::open_in_cluster(db.clone(), Some(r))?);
    let cluster = ClusterConfig {
        region: r,
        peers: (1..=REGIONS)
            .filter(|&o| o != r)
            .map(|o| Peer { region: o, address: format!("http://{}:{PORT}", host(o)) })
            .collect(),
    };
    let transport = Transport {
        connect: Some(Arc::new(|addr: String| {
            Box::pin(async move {
                tonic::transport::Endpoint::from_shared(addr)
                    .map_err(|e| e.to_string())?
                    .connect_timeout(Duration::from_secs(1))
                    .connect_with_connector(SimConnector)
                    .await
                    .map_err(|e| e.to_string())
            })
        })),
        inline_engine: true,
        chaos_seed: None,
        token: Default::default(),
        tls: None,
    };
    let replicator = Replicator::with_transport(db.clone(), registry, &cluster, transport);
    let _pullers = replicator.start();
    // The region's writer: unique values to cells every region writes, acknowledged once synced.
    let writer_db = db.clone();
    let writer_shared = shared.clone();
    tokio::spawn(async move {
        let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(u64::from(r)));
        let mut n = 0i64;
        while writer_shared.writing.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(20 + rng.below(60))).await;
            n += 1;
            let e = rng.below(u64::from(ENTITIES)) as u32;
            let value = i64::from(r) * 1_000_000 + n;
            let mut b = WriteBatch::new();
            if b.put(&entity(e), FeatureId(1), EventTime(0), Value::Int64(value)).is_err() {
                continue;
            }
            if let Ok(receipt) = writer_db.write(b, Durability::Sync) {
                if let Ok(mut acked) = writer_shared.acked.lock() {
                    acked.push((r, e, value, receipt.system_time.0));
                }
            }
        }
    });
    let listener = turmoil::net::TcpListener::bind((IpAddr::from(Ipv4Addr::UNSPECIFIED), PORT)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<SimStream>>(16);
    tokio::spawn(async move {
        loop {
            let accepted = listener.accept().await.map(|(s, _)| SimStream(s));
            if tx.send(accepted).await.is_err() {
                return;
            }
        }
    });
    tonic::transport::Server::builder()
        .add_service(service(replicator, &Authenticator::new(AuthMode::None)?))
        .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?;
    Ok(())
}

/// A cell's winner: stamp, value, vector.
type Winner = (u64, Option<Value>, quiver_storage::VersionVector);

fn run_seed(seed: u64) -> Result<(), String> {
    let shared = Arc::new(Shared {
        fs: (0..REGIONS).map(|_| Mutex::new(MemFs::new())).collect(),
        dbs: (0..REGIONS).map(|_| Mutex::new(None)).collect(),
        acked: Mutex::new(Vec::new()),
        writing: AtomicBool::new(true),
    });
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(FAULTY + SETTLE + Duration::from_secs(5))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(30))
        .build();
    for r in 1..=REGIONS {
        let shared = shared.clone();
        sim.host(host(r), move || region_main(r, shared.clone(), seed));
    }
    sim.client("clock", async {
        tokio::time::sleep(FAULTY + SETTLE).await;
        Ok(())
    });
    let mut rng = Rng::new(seed);
    let mut next_fault = Duration::from_millis(500);
    let mut heal_at: Option<(Duration, Vec<u32>)> = None;
    let mut healed = false;
    let mut faults = Vec::new();
    loop {
        let done = sim.step().map_err(|e| format!("seed {seed}: {e}"))?;
        let now = sim.elapsed();
        if let Some((at, crashed)) = heal_at.take() {
            if now >= at {
                for a in 1..=REGIONS {
                    for b in 1..=REGIONS {
                        if a != b {
                            sim.repair(host(a), host(b));
                            sim.release(host(a), host(b));
                        }
                    }
                }
                for r in crashed {
                    sim.bounce(host(r));
                }
            } else {
                heal_at = Some((at, crashed));
            }
        }
        if now >= FAULTY && !healed {
            shared.writing.store(false, Ordering::Release);
            healed = true;
        }
        if !healed && heal_at.is_none() && now >= next_fault {
            let a = 1 + rng.below(u64::from(REGIONS)) as u32;
            let b = 1 + (a + rng.below(2) as u32) % REGIONS;
            let mut crashed = Vec::new();
            match rng.below(4) {
                0 => {
                    sim.partition(host(a), host(b));
                    faults.push(format!("{now:?} partition {a}|{b}"));
                }
                1 => {
                    sim.partition_oneway(host(a), host(b));
                    faults.push(format!("{now:?} one-way {a}->{b}"));
                }
                2 => {
                    sim.hold(host(a), host(b));
                    faults.push(format!("{now:?} hold {a}-{b}"));
                }
                _ => {
                    sim.crash(host(a));
                    let mut fs = shared.fs[(a - 1) as usize].lock().map_err(|_| "poisoned")?;
                    *fs = fs.crash_image(seed ^ now.as_micros() as u64);
                    crashed.push(a);
                    faults.push(format!("{now:?} crash {a}"));
                }
            }
            let hold_for = Duration::from_millis(300 + rng.below(2500));
            heal_at = Some((now + hold_for, crashed));
            next_fault = now + hold_for + Duration::from_millis(200 + rng.below(1000));
        }
        if done {
            break;
        }
    }
    // Every region's winners, and the acknowledged writes against them.
    let mut winners: Vec<BTreeMap<u32, Winner>> = Vec::new();
    for slot in &shared.dbs {
        let db = slot.lock().map_err(|_| "poisoned")?.clone().ok_or("a region never opened")?;
        let mut w = BTreeMap::new();
        for e in 0..ENTITIES {
            let q = AsOf { as_of: EventTime(0), known_at: SystemTime::MAX, lookback_us: Some(0) };
            if let Some(v) = db.version_at(&entity(e), FeatureId(1), q).map_err(|e| e.to_string())? {
                w.insert(e, (v.system_time.0, v.value, v.version_vector));
            }
        }
        winners.push(w);
    }
    for (i, w) in winners.iter().enumerate().skip(1) {
        if *w != winners[0] {
            return Err(format!(
                "seed {seed}: region {} holds {w:?}, region 1 holds {:?} (faults: {faults:?})",
                i + 1,
                winners[0]
            ));
        }
    }
    let acked = shared.acked.lock().map_err(|_| "poisoned")?.clone();
    if acked.len() < 20 {
        return Err(format!("seed {seed}: only {} writes were acknowledged", acked.len()));
    }
    for (r, e, value, stamp) in acked {
        let Some((ws, wv, wvec)) = winners[0].get(&e) else {
            return Err(format!("seed {seed}: write {value} to entity {e} lost: the cell is empty"));
        };
        let rank = (*ws, quiver_storage::replication::origin_or_guess(wvec, SystemTime(*ws)));
        if rank < (stamp, r) || (rank == (stamp, r) && *wv != Some(Value::Int64(value))) {
            return Err(format!(
                "seed {seed}: write {value} at {stamp} by region {r} to entity {e} lost to {wv:?} at {rank:?} (faults: {faults:?})"
            ));
        }
    }
    Ok(())
}

#[test]
fn replication_converges_under_simulated_partitions_holds_and_crashes() {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED") {
        Ok(s) => vec![s.parse().expect("SIM_SEED is a number")],
        Err(_) => (1..=std::env::var("SIM_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(24)).collect(),
    };
    for seed in seeds {
        if let Err(e) = run_seed(seed) {
            panic!("{e}");
        }
    }
}
