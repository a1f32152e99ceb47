//! `quiver-jepsen`: fault-injection tests of real `quiverd` processes, on the ideas of Jepsen.
//!
//! A run starts one `quiverd` per region ([`cluster`]), every replication link behind a
//! fault-injecting proxy ([`proxy`]); clients in every region run a workload of unique-value
//! writes (to cells all regions write, including backfill corrections at older event times),
//! compare-and-swap writes (to the region's own register, and to one cell every region CASes)
//! and reads, recorded as a [`history`]; a nemesis injects faults on a
//! schedule; then the cluster is healed, the run waits for convergence, and the [`check`]er
//! checks the history and every region's final state. The history and a summary go to the
//! output directory.
//!
//! Faults: full and one-way partitions, flaky links (latency, a bandwidth cap, connections cut
//! at random), SIGKILL and restart, SIGSTOP/SIGCONT, a peer cut off while the others write
//! past their retained log (so it must bootstrap from a snapshot), a clock skewed ahead on one
//! region, and (in the pullers' test-only chaos mode) shuffled, duplicated, delayed and
//! re-requested replication messages.
#![warn(missing_docs)]

pub mod check;
pub mod client;
pub mod cluster;
pub mod history;
pub mod netns;
pub mod proxy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_testkit::Rng;
use serde::Serialize;

use crate::check::{State, Violation};
use crate::client::{Node, Written};
use crate::cluster::{Cluster, ClusterSpec};
use crate::history::{Cell, History, Invoke, Outcome};

/// Entities every region writes.
pub const SHARED_ENTITIES: u32 = 6;
/// Event-time slots per entity (slot 0 is current; others are backfill corrections).
pub const SLOTS: u32 = 3;
/// Entity of region `r`'s CAS register: `CAS_ENTITY_BASE + r`.
pub const CAS_ENTITY_BASE: u32 = 1000;
/// Entity of the cell every region CASes (slot 0): a region's compare-and-swap races the
/// versions its peers replicate into the cell (above every `CAS_ENTITY_BASE + r`, r <= 63).
pub const CAS_SHARED_ENTITY: u32 = 1100;
/// Entities the lagging-peer fault writes in bulk.
pub const BULK_ENTITIES: std::ops::Range<u32> = 10_000..10_400;
/// Bulk batches the lagging-peer fault writes (alternating between the other regions): about
/// 2 MiB of log per region, past the 1 MiB each retains.
pub const BULK_ROUNDS: usize = 160;
/// Entity of the replication-lag probe.
pub const PROBE_ENTITY: u32 = 2000;
/// How long the healed cluster may take to converge.
pub const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(90);

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Regions (3).
    pub regions: u32,
    /// Clients per region.
    pub clients: u32,
    /// How long each fault is held.
    pub hold: Duration,
    /// Healthy time between faults.
    pub calm: Duration,
    /// Total time of the faulty phase: the schedule repeats (with other regions) until it
    /// is over; at least one pass of every fault runs.
    pub duration: Duration,
    /// Seed for the pullers' chaos and the workload.
    pub seed: u64,
    /// Where the history, summary and node logs go.
    pub out: PathBuf,
    /// Inject faults (off: a healthy run, for measuring replication lag under the workload).
    pub faults: bool,
    /// The pullers' message chaos and the skewed clock.
    pub chaos: bool,
    /// How regions are connected.
    pub network: Network,
}

/// How regions are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// Network namespaces when running as root with `ip netns`, `nft` and `tc`; else proxies.
    Auto,
    /// Network namespaces (fails where they cannot be made).
    Netns,
    /// Loopback proxies.
    Proxy,
}

impl Config {
    /// The short run CI does (about a minute).
    pub fn short(out: PathBuf) -> Config {
        Config {
            regions: 3,
            clients: 2,
            hold: Duration::from_secs(3),
            calm: Duration::from_millis(1500),
            duration: Duration::ZERO,
            seed: 7,
            out,
            faults: true,
            chaos: true,
            network: Network::Auto,
        }
    }
}

/// What a run found.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// How regions were connected.
    pub network: String,
    /// How nodes and clients authenticated.
    pub security: &'static str,
    /// Operations by kind and outcome.
    pub ops: BTreeMap<String, u64>,
    /// Faults injected, in order.
    pub faults: Vec<history::Fault>,
    /// Seconds from the final heal until every region held the same state.
    pub convergence_seconds: f64,
    /// Replication lag probes in healthy periods: a write in region 1 until visible in every
    /// other region (milliseconds: median, p99, max, count).
    pub probe_lag_ms: (f64, f64, f64, usize),
    /// Bootstraps from a snapshot, per region (from replication status).
    pub bootstraps: BTreeMap<u32, u64>,
    /// Concurrent versions resolved, per region.
    pub conflicts: BTreeMap<u32, u64>,
    /// The cell every region CASes: acknowledged, refused (aborted) and indeterminate
    /// operations, and how many acknowledged ones the checker checked.
    pub shared_cas: check::SharedCas,
    /// Cells compared at the end.
    pub cells: usize,
    /// The group's serving version in each region at the end.
    pub serving_versions: BTreeMap<u32, u32>,
    /// What the checker found.
    pub violations: Vec<Violation>,
}

/// Every region's (serving version, serving history length) of the workload's group.
async fn serving_versions(nodes: &[Node]) -> BTreeMap<u32, (u32, usize)> {
    let mut out = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if let Ok((v, _, h)) = n.clone().serving().await {
            out.insert(i as u32 + 1, (v, h));
        }
    }
    out
}

/// Promotes version 2 or rolls back, in a random region every 200-600 ms, until `stop`;
/// counts the outcomes (refusals and faults included: a rollback with nothing to roll back
/// to, an unreachable region).
async fn promotion_loop(
    nodes: Vec<Node>,
    stop: Arc<AtomicBool>,
    counts: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    seed: u64,
) {
    let mut rng = Rng::new(seed ^ 0x7072_6f6d);
    while !stop.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(200 + rng.below(400))).await;
        let mut n = nodes[rng.below(nodes.len() as u64) as usize].clone();
        let (kind, r) =
            if rng.below(2) == 0 { ("promote", n.promote(2).await) } else { ("rollback", n.rollback().await) };
        let outcome = if r.is_ok() { "ok" } else { "fail" };
        *counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(format!("{kind} {outcome}"))
            .or_insert(0) += 1;
    }
}

async fn client_loop(
    history: Arc<History>,
    mut node: Node,
    region: u32,
    client: u32,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    let mut counter = 0i64;
    let done = |r: Result<Written, tonic::Status>, cas: bool| match r {
        Ok(w) => Outcome::Ok { stamp: Some(w.stamp), read: None, written: if cas { w.vector } else { None } },
        Err(e) if client::classify(&e) => Outcome::Fail { error: format!("{:?}: {}", e.code(), e.message()) },
        Err(e) => Outcome::Info { error: format!("{:?}: {}", e.code(), e.message()) },
    };
    while !stop.load(Ordering::Acquire) {
        counter += 1;
        let value = i64::from(region) * 1_000_000_000 + i64::from(client) * 10_000_000 + counter;
        let pick = rng.below(100);
        let cell =
            Cell { entity: rng.below(u64::from(SHARED_ENTITIES)) as u32, slot: rng.below(u64::from(SLOTS)) as u32 };
        let t = history.now_us();
        if pick < 45 {
            let outcome = done(node.write(cell, value, None).await, false);
            history.record(region, client, Invoke::Write { cell, value }, t, outcome);
        } else if pick < 72 {
            // The region's own register, or the cell every region CASes: read the current
            // version here, then write expecting it.
            let entity = if pick < 57 { CAS_ENTITY_BASE + region } else { CAS_SHARED_ENTITY };
            let cell = Cell { entity, slot: 0 };
            let expected = match node.read(cell).await {
                Ok(s) => s.map(|s| s.vector).unwrap_or_default(),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let t = history.now_us();
            let outcome = done(node.write(cell, value, Some(&expected)).await, true);
            history.record(region, client, Invoke::Cas { cell, expected, value }, t, outcome);
        } else {
            let outcome = match node.read(cell).await {
                Ok(read) => Outcome::Ok { stamp: None, read, written: None },
                Err(e) => Outcome::Fail { error: format!("{:?}: {}", e.code(), e.message()) },
            };
            history.record(region, client, Invoke::Read { cell }, t, outcome);
        }
        tokio::time::sleep(Duration::from_millis(5 + rng.below(10))).await;
    }
}

/// Writes a probe value in region 1 every 500 ms and times until every other region shows it.
async fn probe_loop(nodes: Vec<Node>, stop: Arc<AtomicBool>, calm: Arc<AtomicBool>, lags: Arc<parking_lag::Lags>) {
    let mut n = 0i64;
    let cell = Cell { entity: PROBE_ENTITY, slot: 0 };
    while !stop.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        n += 1;
        let healthy_at_start = calm.load(Ordering::Acquire);
        let mut origin = nodes[0].clone();
        let t = Instant::now();
        if origin.write(cell, n, None).await.is_err() {
            continue;
        }
        let mut seen_everywhere = true;
        for node in &nodes[1..] {
            let mut node = node.clone();
            loop {
                if matches!(node.read(cell).await, Ok(Some(s)) if s.value >= Some(n)) {
                    break;
                }
                if t.elapsed() > Duration::from_secs(5) || stop.load(Ordering::Acquire) {
                    seen_everywhere = false;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        if seen_everywhere && healthy_at_start && calm.load(Ordering::Acquire) {
            lags.push(t.elapsed());
        }
    }
}

/// Lag samples (a mutex-guarded list).
mod parking_lag {
    use std::sync::Mutex;
    use std::time::Duration;

    /// Samples.
    #[derive(Debug, Default)]
    pub struct Lags(Mutex<Vec<Duration>>);

    impl Lags {
        pub fn push(&self, d: Duration) {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(d);
        }
        pub fn summary(&self) -> (f64, f64, f64, usize) {
            let mut v: Vec<f64> =
                self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|d| d.as_secs_f64() * 1e3).collect();
            v.sort_by(f64::total_cmp);
            if v.is_empty() {
                return (0.0, 0.0, 0.0, 0);
            }
            let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
            (at(0.5), at(0.99), at(1.0), v.len())
        }
    }
}

/// One fault of the schedule, on region `x` (and `y`, another region).
#[derive(Debug, Clone, Copy)]
enum Fault {
    Partition,
    OneWay,
    Kill,
    Pause,
    Flaky,
    Lagging,
}

const SCHEDULE: [Fault; 6] = [Fault::Partition, Fault::Lagging, Fault::Kill, Fault::OneWay, Fault::Pause, Fault::Flaky];

async fn inject(cluster: &mut Cluster, nodes: &[Node], fault: Fault, x: u32, hold: Duration) -> Result<String, String> {
    let regions = nodes.len() as u32;
    let others: Vec<u32> = (1..=regions).filter(|&r| r != x).collect();
    match fault {
        Fault::Partition => {
            for &o in &others {
                cluster.block(x, o)?;
                cluster.block(o, x)?;
            }
            tokio::time::sleep(hold).await;
            Ok(format!("partition {x} | rest (both ways)"))
        }
        Fault::OneWay => {
            for &o in &others {
                cluster.block(x, o)?;
            }
            tokio::time::sleep(hold).await;
            Ok(format!("one-way partition: {x} hears nobody, others hear {x}"))
        }
        Fault::Kill => {
            cluster.kill(x);
            tokio::time::sleep(hold).await;
            cluster.start_node(x)?;
            Ok(format!("SIGKILL {x}, restart"))
        }
        Fault::Pause => {
            cluster.pause(x);
            tokio::time::sleep(hold).await;
            cluster.resume(x);
            Ok(format!("SIGSTOP {x}, SIGCONT"))
        }
        Fault::Flaky => {
            let name = cluster.flaky()?;
            tokio::time::sleep(hold).await;
            Ok(name.into())
        }
        Fault::Lagging => {
            for &o in &others {
                cluster.block(x, o)?;
            }
            // The others write and flush past their retained log (1 MiB), so `x` must bootstrap.
            let start = Instant::now();
            for (round, &o) in others.iter().cycle().take(BULK_ROUNDS).enumerate() {
                let mut n = nodes[(o - 1) as usize].clone();
                let _ = n.write_bulk(BULK_ENTITIES, round as i64).await;
                if round % 16 >= 14 {
                    let _ = n.flush().await;
                }
            }
            for &o in &others {
                let _ = nodes[(o - 1) as usize].clone().flush().await;
            }
            if let Some(rest) = hold.checked_sub(start.elapsed()) {
                tokio::time::sleep(rest).await;
            }
            Ok(format!("lagging peer: {x} cut off while the others write and flush past their retained log"))
        }
    }
}

/// Reads every workload cell from one region.
async fn final_state(node: &mut Node, regions: u32) -> Result<State, tonic::Status> {
    let mut state = State::new();
    let entities = (0..SHARED_ENTITIES)
        .chain((1..=regions).map(|r| CAS_ENTITY_BASE + r))
        .chain(std::iter::once(CAS_SHARED_ENTITY))
        .chain(std::iter::once(PROBE_ENTITY))
        .chain(BULK_ENTITIES);
    for e in entities {
        for (slot, versions) in node.history(e).await? {
            state.insert(Cell { entity: e, slot }, versions);
        }
    }
    Ok(state)
}

/// Runs the test; the summary is also written to `cfg.out`.
pub async fn run(cfg: &Config) -> Result<Summary, String> {
    std::fs::create_dir_all(&cfg.out).map_err(|e| format!("{}: {e}", cfg.out.display()))?;
    let data = cfg.out.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let spec = ClusterSpec {
        regions: cfg.regions,
        // One region's clock runs 1.5 s ahead: it wins concurrent writes more often, and
        // every region must still converge.
        skew_ms: if cfg.chaos { [(2, 1500)].into_iter().collect() } else { BTreeMap::new() },
        chaos_seed: cfg.chaos.then_some(cfg.seed),
        replication_log_mb: 1,
    };
    let netns = match cfg.network {
        Network::Auto => netns::available(),
        Network::Netns => true,
        Network::Proxy => false,
    };
    let mut cluster = match Cluster::start(spec.clone(), &data, netns).await {
        Ok(c) => c,
        Err(e) if netns && cfg.network == Network::Auto => {
            eprintln!("quiver-jepsen: network namespaces failed ({e}); using loopback proxies");
            let _ = std::fs::remove_dir_all(&data);
            Cluster::start(spec, &data, false).await?
        }
        Err(e) => return Err(e),
    };
    let (ca, token) = (cluster.security.ca_pem.clone(), cluster.security.token.clone());
    let nodes: Vec<Node> =
        cluster.nodes.iter().map(|n| Node::connect(n.addr, &ca, &token)).collect::<Result<_, _>>()?;
    // The registry, applied in region 1, must reach every region.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut first = nodes[0].clone();
    while first.apply_registry().await.is_err() {
        if Instant::now() > deadline {
            return Err("region 1 never accepted the registry".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, n) in nodes.iter().enumerate() {
        let mut n = n.clone();
        while !n.has_registry().await {
            if Instant::now() > deadline {
                return Err(format!("the registry never reached region {}", i + 1));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Version 2, staged in region 1, must reach every region before promotions start.
    while first.stage_v2().await.is_err() {
        if Instant::now() > deadline {
            return Err("region 1 never staged version 2".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, n) in nodes.iter().enumerate() {
        let mut n = n.clone();
        while !matches!(n.serving().await, Ok((_, 2, _))) {
            if Instant::now() > deadline {
                return Err(format!("version 2 never reached region {}", i + 1));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let history = Arc::new(History::new());
    let stop = Arc::new(AtomicBool::new(false));
    let calm = Arc::new(AtomicBool::new(true));
    let lags = Arc::new(parking_lag::Lags::default());
    let mut tasks = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for c in 0..cfg.clients {
            let seed = cfg.seed * 1000 + (i as u64) * 10 + u64::from(c);
            tasks.push(tokio::spawn(client_loop(history.clone(), n.clone(), i as u32 + 1, c, stop.clone(), seed)));
        }
    }
    tasks.push(tokio::spawn(probe_loop(nodes.clone(), stop.clone(), calm.clone(), lags.clone())));
    let promotions = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    tasks.push(tokio::spawn(promotion_loop(nodes.clone(), stop.clone(), promotions.clone(), cfg.seed)));
    // The nemesis.
    let started = Instant::now();
    let mut rng = Rng::new(cfg.seed);
    let mut pass = 0;
    let fault_counter = AtomicU64::new(0);
    while !cfg.faults && started.elapsed() < cfg.duration.max(cfg.hold * 6) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if cfg.faults {
        loop {
            for fault in SCHEDULE {
                tokio::time::sleep(cfg.calm).await;
                let x = if pass == 0 {
                    1 + (fault_counter.load(Ordering::Relaxed) % u64::from(cfg.regions)) as u32
                } else {
                    1 + rng.below(u64::from(cfg.regions)) as u32
                };
                fault_counter.fetch_add(1, Ordering::Relaxed);
                calm.store(false, Ordering::Release);
                let t = history.now_us();
                let name = inject(&mut cluster, &nodes, fault, x, cfg.hold).await?;
                cluster.heal()?;
                history.fault(name, t);
                tokio::time::sleep(Duration::from_millis(500)).await;
                calm.store(true, Ordering::Release);
            }
            pass += 1;
            if started.elapsed() >= cfg.duration {
                break;
            }
        }
    }

    // A last calm stretch of workload, then stop it.
    tokio::time::sleep(cfg.calm * 2).await;
    stop.store(true, Ordering::Release);
    for t in tasks {
        let _ = t.await;
    }
    // Convergence: every peer caught up everywhere, then identical final states.
    let healed = Instant::now();
    let mut finals: BTreeMap<u32, State>;
    loop {
        let mut all_caught_up = true;
        for n in &nodes {
            match n.clone().replication().await {
                Ok(s) => all_caught_up &= s.peers.iter().all(|p| p.caught_up),
                Err(_) => all_caught_up = false,
            }
        }
        if all_caught_up {
            finals = BTreeMap::new();
            for (i, n) in nodes.iter().enumerate() {
                if let Ok(s) = final_state(&mut n.clone(), cfg.regions).await {
                    finals.insert(i as u32 + 1, s);
                }
            }
            let winners: Vec<BTreeMap<&Cell, Option<&history::Seen>>> =
                finals.values().map(|s| s.iter().map(|(c, v)| (c, v.first())).collect()).collect();
            let serving = serving_versions(&nodes).await;
            let same_serving =
                serving.len() == nodes.len() && serving.values().collect::<Vec<_>>().windows(2).all(|w| w[0] == w[1]);
            if finals.len() == cfg.regions as usize && winners.windows(2).all(|w| w[0] == w[1]) && same_serving {
                break;
            }
        }
        if healed.elapsed() > CONVERGENCE_TIMEOUT {
            finals = BTreeMap::new();
            for (i, n) in nodes.iter().enumerate() {
                if let Ok(s) = final_state(&mut n.clone(), cfg.regions).await {
                    finals.insert(i as u32 + 1, s);
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let convergence_seconds = healed.elapsed().as_secs_f64();
    let mut bootstraps = BTreeMap::new();
    let mut conflicts = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if let Ok(s) = n.clone().replication().await {
            bootstraps.insert(i as u32 + 1, s.peers.iter().map(|p| p.bootstraps).sum());
            conflicts.insert(i as u32 + 1, s.conflicts);
        }
    }
    // Promotions and rollbacks replicate like data: every region ends on the same serving
    // version, with the same history.
    let serving = serving_versions(&nodes).await;
    let network = cluster.network();
    cluster.stop(Duration::from_secs(5));
    drop(cluster);
    let ops = history.ops();
    let check::Report { mut violations, shared_cas } = check::report(&ops, &finals, cfg.regions);
    if convergence_seconds >= CONVERGENCE_TIMEOUT.as_secs_f64() {
        violations.push(Violation {
            check: "convergence",
            detail: format!("not converged {} s after the heal", CONVERGENCE_TIMEOUT.as_secs()),
        });
    }
    let distinct: std::collections::BTreeSet<_> = serving.values().collect();
    if serving.len() != cfg.regions as usize || distinct.len() != 1 {
        violations.push(Violation {
            check: "serving version",
            detail: format!("regions end on different serving versions or histories: {serving:?}"),
        });
    }
    let mut counts = promotions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    for op in &ops {
        let kind = match op.invoke {
            Invoke::Write { .. } => "write",
            Invoke::Cas { cell, .. } if check::is_shared_cas(&cell) => "shared cas",
            Invoke::Cas { .. } => "cas",
            Invoke::Read { .. } => "read",
        };
        let outcome = match op.outcome {
            Outcome::Ok { .. } => "ok",
            Outcome::Fail { .. } => "fail",
            Outcome::Info { .. } => "info",
        };
        *counts.entry(format!("{kind} {outcome}")).or_insert(0) += 1;
    }
    let summary = Summary {
        network: network.to_string(),
        security: "TLS on every connection; regions by certificate (mutual TLS); clients by bearer token",
        ops: counts,
        faults: history.faults(),
        convergence_seconds,
        probe_lag_ms: lags.summary(),
        bootstraps,
        conflicts,
        shared_cas,
        cells: finals.values().next().map_or(0, |s| s.len()),
        serving_versions: serving.into_iter().map(|(r, (v, _))| (r, v)).collect(),
        violations,
    };
    write_out(&cfg.out, &ops, &summary)?;
    Ok(summary)
}

fn write_out(dir: &Path, ops: &[history::Op], summary: &Summary) -> Result<(), String> {
    use std::io::Write;
    let path = dir.join("history.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?);
    for op in ops {
        let line = serde_json::to_string(op).map_err(|e| e.to_string())?;
        writeln!(f, "{line}").map_err(|e| e.to_string())?;
    }
    f.flush().map_err(|e| e.to_string())?;
    let path = dir.join("summary.json");
    let text = serde_json::to_string_pretty(summary).map_err(|e| e.to_string())?;
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
}
