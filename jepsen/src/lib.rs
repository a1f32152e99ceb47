//! `quiver-jepsen`: fault-injection tests of real `quiverd` processes, on the ideas of Jepsen.
//!
//! A run starts one `quiverd` per region ([`cluster`]), every replication link behind a
//! fault-injecting proxy ([`proxy`]) or in network namespaces ([`netns`]); or, in the sharded
//! mode, two regions of two nodes each, sharing each region's slots through one etcd
//! (`server/CLUSTER.md`). Clients in every region run a workload of unique-value
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
//! re-requested replication messages. The sharded mode adds slot moves under the workload,
//! and a node (the move's source or target) killed mid-move, its move resumed after the
//! restart; its kills, pauses and partitions hit single nodes, or a region's nodes at once.
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
/// Bulk batches the lagging-peer fault writes per node of a region (alternating between the
/// other regions): about 2 MiB of log per node, past the 1 MiB each retains.
pub const BULK_ROUNDS: usize = 160;
/// Entity of the replication-lag probe.
pub const PROBE_ENTITY: u32 = 2000;
/// How long the healed cluster may take to converge.
pub const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(90);

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Regions (3; 2 in the sharded mode).
    pub regions: u32,
    /// Nodes per region: 1, or 2 in the sharded mode (slots in etcd, moves as faults).
    pub shards: u32,
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
            shards: 1,
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

impl Config {
    /// The sharded run CI does (about 85 s): two regions of two nodes, in network
    /// namespaces.
    pub fn sharded(out: PathBuf) -> Config {
        Config { regions: 2, shards: 2, clients: 4, network: Network::Netns, ..Config::short(out) }
    }
}

/// What a run found.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// How regions were connected.
    pub network: String,
    /// Nodes per region.
    pub shards: u32,
    /// How nodes and clients authenticated.
    pub security: &'static str,
    /// Operations by kind and outcome.
    pub ops: BTreeMap<String, u64>,
    /// Faults injected, in order.
    pub faults: Vec<history::Fault>,
    /// Slot moves by how they ended: "switched" (first call), "resumed" (switched after a
    /// failed call or a kill), "aborted" (never switched; removed from the map), and "killed
    /// source" / "killed target" for the kills that landed mid-move.
    pub moves: BTreeMap<String, u64>,
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
    /// The group's serving version on each node at the end, by node name.
    pub serving_versions: BTreeMap<String, u32>,
    /// What the checker found.
    pub violations: Vec<Violation>,
}

/// Every node's (serving version, serving history length) of the workload's group, by node
/// name.
async fn serving_versions(nodes: &[(String, Node)]) -> BTreeMap<String, (u32, usize)> {
    let mut out = BTreeMap::new();
    for (id, n) in nodes {
        if let Ok((v, _, h)) = n.clone().serving().await {
            out.insert(id.clone(), (v, h));
        }
    }
    out
}

/// What must be the same on every node at the end: the serving version and the length of its
/// history; in a sharded run the version alone. (Each node of a sharded region writes its own
/// serving cells when the registry is applied to it, and the peer regions receive every node's,
/// so their histories are longer than the nodes' own: `server/CLUSTER.md` §7.)
fn same_serving_key(serving: BTreeMap<String, (u32, usize)>, shards: u32) -> BTreeMap<String, (u32, usize)> {
    serving.into_iter().map(|(id, (v, h))| (id, (v, if shards > 1 { 0 } else { h }))).collect()
}

/// Waits until `done` holds for every node, or `deadline` passes (then the error names `what`).
async fn until_all<F, Fut>(nodes: &[(String, Node)], deadline: Instant, what: &str, done: F) -> Result<(), String>
where
    F: Fn(Node) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for (id, n) in nodes {
        while !done(n.clone()).await {
            if Instant::now() > deadline {
                return Err(format!("{what} never reached {id}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// A sharded run's regions: every node registered, the slots spread over them, and the map
/// known to every node.
async fn init_slots(by_region: &[Vec<Node>], all: &[(String, Node)], deadline: Instant) -> Result<(), String> {
    for (r, nodes) in by_region.iter().enumerate() {
        let mut seed = nodes[0].clone();
        loop {
            let live = seed.cluster_status().await.map(|s| s.nodes.iter().filter(|n| n.live).count());
            if live.as_ref().is_ok_and(|&l| l == nodes.len()) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("region {}'s nodes never all registered: {live:?}", r + 1));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Err(e) = seed.init_slots().await {
            return Err(format!("region {}: InitSlots: {e}", r + 1));
        }
    }
    until_all(all, deadline, "the slot map", |mut n| async move {
        n.cluster_status().await.is_ok_and(|s| s.map.is_some_and(|m| m.revision > 0))
    })
    .await
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

/// One fault of the schedule, on region `x` (and the other regions).
#[derive(Debug, Clone, Copy)]
enum Fault {
    Partition,
    OneWay,
    Kill,
    Pause,
    Flaky,
    Lagging,
    /// A run of slots holding workload cells moves to another node of `x`.
    Move,
    /// As `Move`, with the move's source or target killed mid-move and restarted, then the
    /// move resumed.
    MoveKill,
    /// etcd frozen (SIGSTOP) for longer than a node's lease: the nodes serve from their last
    /// known map; then SIGCONT.
    EtcdPause,
}

const SCHEDULE: [Fault; 6] = [Fault::Partition, Fault::Lagging, Fault::Kill, Fault::OneWay, Fault::Pause, Fault::Flaky];

/// The sharded mode's schedule: every fault of [`SCHEDULE`], slot moves between them, and
/// etcd frozen.
const SHARDED_SCHEDULE: [Fault; 11] = [
    Fault::Move,
    Fault::Partition,
    Fault::MoveKill,
    Fault::Lagging,
    Fault::Kill,
    Fault::Move,
    Fault::OneWay,
    Fault::MoveKill,
    Fault::Pause,
    Fault::Flaky,
    Fault::EtcdPause,
];

/// How many holds etcd stays frozen: past a node's lease (`NODE_LEASE_TTL`, 10 s, with holds
/// of 3 s).
pub const ETCD_PAUSE_HOLDS: u32 = 4;

/// Slots moved at once: up to this many around one workload cell's slot (within its run).
pub const MOVE_SPAN: u32 = 256;
/// How long the nemesis asks a region for its map and nodes before it gives up planning a
/// move.
pub const MOVE_PLAN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the nemesis keeps resuming a move (a call every 500 ms) before aborting it.
pub const MOVE_RESUME_TIMEOUT: Duration = Duration::from_secs(30);
/// The phases of a move in order, as `MoveProgress.phase` names them; a kill lands at the
/// first progress message at or past the chosen one.
const MOVE_PHASES: [&str; 5] = ["copy", "backfill", "catch-up", "fence", "switch"];

/// The slot of the workload entity `e`.
fn slot_of_entity(e: u32) -> u32 {
    let key = quiver_storage::encode_entity_key(&[quiver_storage::KeyPart::Int(i64::from(e))]);
    u32::from(quiver_storage::slot::slot_of(&key))
}

/// What a fault acts on: the cluster, and clients of each region's nodes.
struct Target<'a> {
    cluster: &'a mut Cluster,
    /// Clients of each region's nodes, by region - 1 (in shard order).
    regions: &'a [Vec<Node>],
    rng: &'a mut Rng,
    moves: &'a mut BTreeMap<String, u64>,
    hold: Duration,
}

impl Target<'_> {
    /// Node `x`'s shard to hit: any, at random (no draw with one node per region, so an
    /// unsharded run's seed picks the faults it always did).
    fn pick(&mut self, x: u32) -> (usize, String) {
        let shards = self.cluster.shards();
        let shard = if shards > 1 { self.rng.below(u64::from(shards)) as u32 } else { 0 };
        let i = self.cluster.index(x, shard);
        (i, self.cluster.nodes[i].id.clone())
    }

    /// The client of the node named `id`.
    fn client(&self, id: &str) -> Result<(usize, Node), String> {
        let i = self.cluster.nodes.iter().position(|n| n.id == id).ok_or_else(|| format!("no node {id}"))?;
        let n = &self.cluster.nodes[i];
        Ok((i, self.regions[(n.region - 1) as usize][n.shard as usize].clone()))
    }

    /// A move to make in region `x`: a move the map still holds (to resume), or up to
    /// [`MOVE_SPAN`] slots of the run holding a random workload cell, to another node.
    async fn plan_move(&mut self, x: u32) -> Result<(u32, u32, String, String), String> {
        let mut seed = self.regions[(x - 1) as usize][0].clone();
        let status = seed.cluster_status().await.map_err(|e| format!("cluster status of region {x}: {e}"))?;
        let map = status.map.filter(|m| m.revision > 0).ok_or_else(|| format!("region {x} has no map"))?;
        if let Some(m) = map.moves.first() {
            return Ok((m.first, m.last, m.from.clone(), m.to.clone()));
        }
        let entities: Vec<u32> =
            (0..SHARED_ENTITIES).chain([CAS_ENTITY_BASE + x, CAS_SHARED_ENTITY, PROBE_ENTITY]).collect();
        let slot = slot_of_entity(entities[self.rng.below(entities.len() as u64) as usize]);
        let run = map
            .runs
            .iter()
            .find(|r| r.first <= slot && slot <= r.last)
            .ok_or_else(|| format!("region {x}'s map has no run holding slot {slot}"))?;
        let others: Vec<&str> =
            status.nodes.iter().filter(|n| n.node != run.owner && n.live).map(|n| n.node.as_str()).collect();
        if others.is_empty() {
            return Err(format!("region {x} has no live node but {}", run.owner));
        }
        let to = others[self.rng.below(others.len() as u64) as usize].to_string();
        let (first, last) = (run.first.max(slot.saturating_sub(MOVE_SPAN / 2)), run.last.min(slot + MOVE_SPAN / 2));
        Ok((first, last, run.owner.clone(), to))
    }

    /// Calls `MoveSlots` on `to` until the move switches or [`MOVE_RESUME_TIMEOUT`] passes,
    /// then aborts it; counts how it ended.
    async fn finish_move(&mut self, first: u32, last: u32, to: &str, resumed: bool) -> Result<String, String> {
        let (_, mut target) = self.client(to)?;
        let deadline = Instant::now() + MOVE_RESUME_TIMEOUT;
        let mut calls = 0;
        let mut last_error = String::new();
        while Instant::now() < deadline {
            calls += 1;
            match target.move_slots(first, last, to, deadline).await {
                Ok(mut stream) => loop {
                    match stream.message().await {
                        Ok(Some(p)) if p.phase == "done" => {
                            let how = if resumed || calls > 1 { "resumed" } else { "switched" };
                            *self.moves.entry(how.into()).or_default() += 1;
                            return Ok(format!("{how} after {calls} call(s)"));
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => {
                            last_error = format!("{:?}: {}", e.code(), e.message());
                            break;
                        }
                    }
                },
                Err(e) => last_error = format!("{:?}: {}", e.code(), e.message()),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        *self.moves.entry("aborted".into()).or_default() += 1;
        let region = self.cluster.nodes[self.client(to)?.0].region;
        for n in &self.regions[(region - 1) as usize] {
            if n.clone().abort_move(first, last).await.is_ok() {
                return Ok(format!("aborted after {calls} call(s) ({last_error})"));
            }
        }
        Err(format!("move {first}..={last} to {to} neither switched nor could be aborted: {last_error}"))
    }

    /// A move of slots in region `x`; with `kill`, its source or target is killed at a random
    /// phase, restarted after the hold, and the move resumed.
    async fn slot_move(&mut self, x: u32, kill: bool) -> Result<String, String> {
        // A node restarted by the last heal may not know the map yet: ask again for a while.
        let deadline = Instant::now() + MOVE_PLAN_TIMEOUT;
        let (first, last, from, to) = loop {
            match self.plan_move(x).await {
                Ok(planned) => break planned,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        };
        let what = format!("move slots {first}..={last} {from} -> {to}");
        if !kill {
            let how = self.finish_move(first, last, &to, false).await?;
            return Ok(format!("{what}: {how}"));
        }
        let at = self.rng.below(MOVE_PHASES.len() as u64) as usize;
        let victim = if self.rng.below(2) == 0 { from.clone() } else { to.clone() };
        let side = if victim == from { "source" } else { "target" };
        let (_, mut target) = self.client(&to)?;
        let mut landed = None;
        if let Ok(mut stream) = target.move_slots(first, last, &to, Instant::now() + MOVE_RESUME_TIMEOUT).await {
            while let Ok(Some(p)) = stream.message().await {
                if p.phase == "done" {
                    break;
                }
                if MOVE_PHASES.iter().position(|&ph| ph == p.phase).is_some_and(|i| i >= at) {
                    landed = Some(p.phase);
                    break;
                }
            }
        }
        let Some(phase) = landed else {
            let how = self.finish_move(first, last, &to, false).await?;
            return Ok(format!("{what}: over before the kill at {}; {how}", MOVE_PHASES[at]));
        };
        let (i, _) = self.client(&victim)?;
        self.cluster.kill(i);
        // Mid-move only if the map still holds the move (a kill at "switch" may come after
        // the switch), as the other node of the region sees it.
        let (region, shard) = (self.cluster.nodes[i].region, self.cluster.nodes[i].shard as usize);
        let mut mid_move = false;
        for (_, n) in self.regions[(region - 1) as usize].iter().enumerate().filter(|(k, _)| *k != shard) {
            if let Ok(s) = n.clone().cluster_status().await {
                mid_move = s.map.is_some_and(|m| m.moves.iter().any(|m| m.first == first && m.last == last));
                break;
            }
        }
        let landed = if mid_move { format!("killed {side}") } else { format!("killed {side} after the switch") };
        *self.moves.entry(landed).or_default() += 1;
        tokio::time::sleep(self.hold).await;
        self.cluster.start_node(i)?;
        let how = self.finish_move(first, last, &to, true).await?;
        Ok(format!("{what}: SIGKILL the {side} {victim} at {phase}, restart; {how}"))
    }
}

async fn inject(t: &mut Target<'_>, fault: Fault, x: u32) -> Result<String, String> {
    let regions = t.regions.len() as u32;
    let hold = t.hold;
    let others: Vec<u32> = (1..=regions).filter(|&r| r != x).collect();
    match fault {
        Fault::Partition => {
            for &o in &others {
                t.cluster.block(x, o)?;
                t.cluster.block(o, x)?;
            }
            tokio::time::sleep(hold).await;
            Ok(format!("partition {x} | rest (both ways)"))
        }
        Fault::OneWay => {
            for &o in &others {
                t.cluster.block(x, o)?;
            }
            tokio::time::sleep(hold).await;
            Ok(format!("one-way partition: {x} hears nobody, others hear {x}"))
        }
        Fault::Kill => {
            let (i, id) = t.pick(x);
            t.cluster.kill(i);
            tokio::time::sleep(hold).await;
            t.cluster.start_node(i)?;
            Ok(format!("SIGKILL {id}, restart"))
        }
        Fault::Pause => {
            let (i, id) = t.pick(x);
            t.cluster.pause(i);
            tokio::time::sleep(hold).await;
            t.cluster.resume(i);
            Ok(format!("SIGSTOP {id}, SIGCONT"))
        }
        Fault::Flaky => {
            let name = t.cluster.flaky()?;
            tokio::time::sleep(hold).await;
            Ok(name.into())
        }
        Fault::Lagging => {
            for &o in &others {
                t.cluster.block(x, o)?;
            }
            // The others write and flush past their retained log (1 MiB per node, and a sharded
            // region's nodes share the writes), so `x`'s nodes must bootstrap.
            let start = Instant::now();
            let rounds = BULK_ROUNDS * t.regions[0].len();
            for (round, &o) in others.iter().cycle().take(rounds).enumerate() {
                let region = &t.regions[(o - 1) as usize];
                let _ = region[0].clone().write_bulk(BULK_ENTITIES, round as i64).await;
                if round % 16 >= 14 {
                    for n in region {
                        let _ = n.clone().flush().await;
                    }
                }
            }
            for n in others.iter().flat_map(|&o| &t.regions[(o - 1) as usize]) {
                let _ = n.clone().flush().await;
            }
            if let Some(rest) = hold.checked_sub(start.elapsed()) {
                tokio::time::sleep(rest).await;
            }
            Ok(format!("lagging peer: {x} cut off while the others write and flush past their retained log"))
        }
        Fault::EtcdPause => {
            let etcd = t.cluster.etcd.as_ref().ok_or("etcd paused in a run without etcd")?;
            etcd.signal("STOP")?;
            tokio::time::sleep(hold * ETCD_PAUSE_HOLDS).await;
            etcd.signal("CONT")?;
            Ok(format!("etcd frozen (SIGSTOP) for {} s, SIGCONT", (hold * ETCD_PAUSE_HOLDS).as_secs()))
        }
        Fault::Move => t.slot_move(x, false).await,
        Fault::MoveKill => t.slot_move(x, true).await,
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
        shards: cfg.shards.max(1),
        // One region's clock runs 1.5 s ahead: it wins concurrent writes more often, and
        // every region must still converge.
        skew_ms: if cfg.chaos { [(2, 1500)].into_iter().collect() } else { BTreeMap::new() },
        chaos_seed: cfg.chaos.then_some(cfg.seed),
        replication_log_mb: 1,
        // A sharded region's reads are admitted twice (at the node asked and at the owner),
        // each scan holding 4 MiB of the budget's in-flight eighth.
        memory_budget_mb: if cfg.shards > 1 { 128 } else { 64 },
    };
    let netns = match cfg.network {
        Network::Auto => netns::available(),
        Network::Netns => true,
        Network::Proxy => false,
    };
    let mut cluster = match Cluster::start(spec.clone(), &data, netns).await {
        Ok(c) => c,
        Err(e) if netns && cfg.network == Network::Auto && spec.shards == 1 => {
            eprintln!("quiver-jepsen: network namespaces failed ({e}); using loopback proxies");
            let _ = std::fs::remove_dir_all(&data);
            Cluster::start(spec, &data, false).await?
        }
        Err(e) => return Err(e),
    };
    let (ca, token) = (cluster.security.ca_pem.clone(), cluster.security.token.clone());
    let mut all: Vec<(String, Node)> = Vec::new();
    for n in &cluster.nodes {
        all.push((n.id.clone(), Node::connect(n.addr, &ca, &token)?));
    }
    let shards = cluster.shards();
    let by_region: Vec<Vec<Node>> =
        (1..=cfg.regions).map(|r| (0..shards).map(|k| all[cluster.index(r, k)].1.clone()).collect()).collect();
    // Each region's first node: the probe's and the final states' way in (a sharded node
    // forwards what it does not own).
    let nodes: Vec<Node> = by_region.iter().map(|r| r[0].clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    if shards > 1 {
        init_slots(&by_region, &all, deadline).await?;
    }
    // The registry, applied to region 1's nodes (each node of a sharded region holds it
    // whole, in the same order), must reach every node.
    for n in &by_region[0] {
        let mut n = n.clone();
        while n.apply_registry().await.is_err() {
            if Instant::now() > deadline {
                return Err("region 1 never accepted the registry".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    until_all(&all, deadline, "the registry", |mut n| async move { n.has_registry().await }).await?;
    // Version 2, staged in region 1, must reach every node before promotions start.
    for n in &by_region[0] {
        let mut n = n.clone();
        while n.stage_v2().await.is_err() {
            if Instant::now() > deadline {
                return Err("region 1 never staged version 2".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    until_all(&all, deadline, "version 2", |mut n| async move { matches!(n.serving().await, Ok((_, 2, _))) }).await?;
    let history = Arc::new(History::new());
    let stop = Arc::new(AtomicBool::new(false));
    let calm = Arc::new(AtomicBool::new(true));
    let lags = Arc::new(parking_lag::Lags::default());
    let mut tasks = Vec::new();
    for (i, region) in by_region.iter().enumerate() {
        for c in 0..cfg.clients {
            let seed = cfg.seed * 1000 + (i as u64) * 10 + u64::from(c);
            // A sharded region's clients spread over its nodes, which forward.
            let n = region[c as usize % region.len()].clone();
            tasks.push(tokio::spawn(client_loop(history.clone(), n, i as u32 + 1, c, stop.clone(), seed)));
        }
    }
    tasks.push(tokio::spawn(probe_loop(nodes.clone(), stop.clone(), calm.clone(), lags.clone())));
    let promotions = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    // Promotions are applied node by node (each node holds the registry), so a sharded
    // region's nodes would serve different versions between two of them: the sharded mode
    // leaves them out.
    if shards == 1 {
        tasks.push(tokio::spawn(promotion_loop(nodes.clone(), stop.clone(), promotions.clone(), cfg.seed)));
    }
    // The nemesis.
    let started = Instant::now();
    let mut rng = Rng::new(cfg.seed);
    let mut moves = BTreeMap::new();
    let schedule: &[Fault] = if shards > 1 { &SHARDED_SCHEDULE } else { &SCHEDULE };
    let mut pass = 0;
    let fault_counter = AtomicU64::new(0);
    while !cfg.faults && started.elapsed() < cfg.duration.max(cfg.hold * 6) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if cfg.faults {
        loop {
            for &fault in schedule {
                tokio::time::sleep(cfg.calm).await;
                let x = if pass == 0 {
                    1 + (fault_counter.load(Ordering::Relaxed) % u64::from(cfg.regions)) as u32
                } else {
                    1 + rng.below(u64::from(cfg.regions)) as u32
                };
                fault_counter.fetch_add(1, Ordering::Relaxed);
                calm.store(false, Ordering::Release);
                let t = history.now_us();
                let mut target = Target {
                    cluster: &mut cluster,
                    regions: &by_region,
                    rng: &mut rng,
                    moves: &mut moves,
                    hold: cfg.hold,
                };
                let name = inject(&mut target, fault, x).await?;
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
    // Convergence: every peer caught up everywhere, then identical final states: every node
    // of a region answers for the whole region (forwarding what it does not own), and each
    // region's first node's answers are its final state.
    let healed = Instant::now();
    let mut finals: BTreeMap<u32, State>;
    let read_states = |all: Vec<(String, Node)>| async move {
        let mut states = Vec::new();
        for (id, n) in all {
            states.push((id, final_state(&mut n.clone(), cfg.regions).await.ok()));
        }
        states
    };
    let first_of_region = |states: &[(String, Option<State>)]| -> BTreeMap<u32, State> {
        (1..=cfg.regions).filter_map(|r| states[cluster.index(r, 0)].1.clone().map(|s| (r, s))).collect()
    };
    let mut disagreeing: Vec<String>;
    loop {
        let mut all_caught_up = true;
        for (_, n) in &all {
            match n.clone().replication().await {
                Ok(s) => all_caught_up &= s.peers.iter().all(|p| p.caught_up),
                Err(_) => all_caught_up = false,
            }
        }
        let timed_out = healed.elapsed() > CONVERGENCE_TIMEOUT;
        if all_caught_up || timed_out {
            let states = read_states(all.clone()).await;
            finals = first_of_region(&states);
            let winners = |s: &State| -> BTreeMap<Cell, Option<history::Seen>> {
                s.iter().map(|(c, v)| (*c, v.first().cloned())).collect()
            };
            let reference = states.first().and_then(|(_, s)| s.as_ref()).map(winners);
            disagreeing = states
                .iter()
                .filter(|(_, s)| s.as_ref().map(winners) != reference || s.is_none())
                .map(|(id, _)| id.clone())
                .collect();
            let serving = same_serving_key(serving_versions(&all).await, shards);
            let same_serving =
                serving.len() == all.len() && serving.values().collect::<Vec<_>>().windows(2).all(|w| w[0] == w[1]);
            if timed_out || (disagreeing.is_empty() && same_serving) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let convergence_seconds = healed.elapsed().as_secs_f64();
    let mut bootstraps = BTreeMap::new();
    let mut conflicts = BTreeMap::new();
    for (i, (_, n)) in all.iter().enumerate() {
        if let Ok(s) = n.clone().replication().await {
            let region = cluster.nodes[i].region;
            *bootstraps.entry(region).or_insert(0) += s.peers.iter().map(|p| p.bootstraps).sum::<u64>();
            *conflicts.entry(region).or_insert(0) += s.conflicts;
        }
    }
    // Promotions and rollbacks replicate like data: every node ends on the same serving
    // version, with the same history.
    let serving = same_serving_key(serving_versions(&all).await, shards);
    let network = cluster.network();
    cluster.stop(Duration::from_secs(5));
    drop(cluster);
    let ops = history.ops();
    let check::Report { mut violations, shared_cas } = check::report(&ops, &finals, cfg.regions);
    if convergence_seconds >= CONVERGENCE_TIMEOUT.as_secs_f64() {
        violations.push(Violation {
            check: "convergence",
            detail: format!(
                "not converged {} s after the heal (nodes that disagree with the first, or could not be read: \
                 {disagreeing:?})",
                CONVERGENCE_TIMEOUT.as_secs()
            ),
        });
    }
    let distinct: std::collections::BTreeSet<_> = serving.values().collect();
    if serving.len() != all.len() || distinct.len() != 1 {
        violations.push(Violation {
            check: "serving version",
            detail: format!("nodes end on different serving versions or histories: {serving:?}"),
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
        shards,
        security: "TLS on every connection; regions by certificate (mutual TLS); clients by bearer token",
        ops: counts,
        faults: history.faults(),
        moves,
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
