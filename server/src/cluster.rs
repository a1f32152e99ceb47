//! A node of a sharded region (`server/CLUSTER.md` §2–§3): its registration in etcd, the slot
//! map it watches there, and the ownership check every request that names entities passes.
//!
//! etcd is the source of truth. Under the prefix `/quiver/<cluster>/`, `nodes/<id>` holds each
//! live node (attached to its lease) and `map` holds the slot map, changed only by transactions
//! that compare its revision. A node keeps the last valid map it saw and serves from it while
//! etcd is unreachable; every change is refused then.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp};
use parking_lot::{Mutex, RwLock};
use quiver_proto::v1 as pb;
use quiver_storage::slot::{slot_of, Slot, SLOTS};
use serde::{Deserialize, Serialize};

/// How long a node's registration outlives its last keep-alive. Keep-alives go every quarter
/// of it; a node that has had no answer for two thirds of it starts a new session (so it knows
/// it may be unregistered before etcd drops it).
pub const NODE_LEASE_TTL: Duration = Duration::from_secs(10);
/// First wait before reconnecting to etcd after a failure; it doubles up to [`ETCD_RETRY_MAX`].
pub const ETCD_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnections to etcd.
pub const ETCD_RETRY_MAX: Duration = Duration::from_secs(5);
/// Longest wait for one etcd call (and for connecting).
pub const ETCD_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The cluster name when none is given: keys under `/quiver/quiver/`.
pub const CLUSTER_NAME_DEFAULT: &str = "quiver";
/// Most tries of one change of the map when other changes keep winning the compare-and-swap.
pub const MAP_CHANGE_ATTEMPTS: usize = 8;
/// Longest node id and cluster name, in bytes.
pub const NAME_BYTES_MAX: usize = 64;

/// Where a sharded node registers and what it calls itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardConfig {
    /// Its id, unique in the cluster ([`check_name`]).
    pub node: String,
    /// The cluster's name: the etcd prefix `/quiver/<cluster>/`.
    pub cluster: String,
    /// etcd endpoints (`http://host:port`).
    pub etcd: Vec<String>,
    /// The address other nodes and clients reach it at (`host:port`).
    pub advertise: String,
    /// Its region.
    pub region: u32,
    /// Whether it forwards what it does not own to the owner (§4) instead of refusing it.
    pub forward: bool,
    /// Its data directory's instance id ([`instance_id`]), in its registration: a process
    /// started on the directory of a dead one takes over its registration at once (§2).
    /// Empty: it waits for the dead one's lease to expire.
    pub instance: String,
}

/// The file in a sharded node's data directory holding its instance id.
pub const INSTANCE_FILE: &str = "NODE_INSTANCE";

/// The instance id of the data directory `dir`: 32 random hex digits, made and synced the
/// first time. Only one process at a time opens a data directory (the engine's `LOCK`), so a
/// registration carrying this id whose process is not this one belongs to a dead process.
pub fn instance_id(dir: &std::path::Path) -> Result<String, String> {
    let path = dir.join(INSTANCE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() == 32 && s.trim().bytes().all(|b| b.is_ascii_hexdigit()) => {
            return Ok(s.trim().to_string())
        }
        Ok(s) => return Err(format!("{}: not an instance id: {:?}", path.display(), s.trim())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness: {e}"))?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join(format!("{INSTANCE_FILE}.tmp"));
    let io = |e: std::io::Error| format!("{}: {e}", tmp.display());
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(format!("{id}\n").as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(id)
}

/// Refuses a node id or cluster name that is empty, longer than [`NAME_BYTES_MAX`], or holds
/// anything but ASCII letters, digits, `-`, `_` and `.` (they are etcd key segments).
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(format!("{what} must be 1 to {NAME_BYTES_MAX} bytes, got {}", name.len()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("{what} {name:?}: {c:?} is not allowed (letters, digits, '-', '_', '.')"));
    }
    Ok(())
}

/// One run of the stored map: slots `first..=last`, one owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// First slot of the run.
    pub first: Slot,
    /// Last slot of the run (inclusive).
    pub last: Slot,
    /// The owner's node id.
    pub owner: String,
    /// How many times these slots' owner has changed (1 when first assigned).
    pub epoch: u64,
}

/// Where a move stands (§5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MoveState {
    /// The target copies and catches up; the source serves the slots.
    Copying,
    /// The source refuses writes to the slots until the switch.
    Fenced,
}

/// A move of slots `first..=last` from `from` (their one owner) to `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// First slot.
    pub first: Slot,
    /// Last slot (inclusive).
    pub last: Slot,
    /// The source: the slots' owner.
    pub from: String,
    /// The target.
    pub to: String,
    /// Where it stands.
    pub state: MoveState,
}

impl Move {
    /// Whether it moves `slot`.
    pub fn holds(&self, slot: Slot) -> bool {
        (self.first..=self.last).contains(&slot)
    }

    /// The API's form.
    pub fn to_pb(&self) -> pb::SlotMove {
        pb::SlotMove {
            first: u32::from(self.first),
            last: u32::from(self.last),
            from: self.from.clone(),
            to: self.to.clone(),
            state: match self.state {
                MoveState::Copying => pb::MoveState::Copying,
                MoveState::Fenced => pb::MoveState::Fenced,
            } as i32,
        }
    }
}

/// The stored form of the map (JSON in etcd).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredMap {
    runs: Vec<Run>,
    /// Moves under way (absent in maps written before moves existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    moves: Vec<Move>,
}

/// A node's registration (JSON in etcd).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredNode {
    node: String,
    addr: String,
    region: u32,
    /// Its data directory's instance id (absent from registrations of older nodes).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    instance: String,
}

/// A node removed from the region (JSON in etcd, under `removed/`; written once, never
/// deleted): its id never registers again (§7, "Removing a node").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredRemoved {
    node: String,
    region: u32,
    /// The last batch of its stream, which every peer node had pulled when it was removed.
    head: u64,
}

/// The slot map at one etcd revision: runs that cover every slot exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    revision: i64,
    runs: Vec<Run>,
    /// Index into `runs` of each slot's run (empty: no map).
    run_of: Vec<u16>,
    /// Moves under way, in slot order, disjoint.
    moves: Vec<Move>,
}

impl SlotMap {
    /// No map yet (revision 0).
    pub fn empty() -> Self {
        SlotMap { revision: 0, runs: Vec::new(), run_of: Vec::new(), moves: Vec::new() }
    }

    /// A map from its runs, refused unless they cover `0..SLOTS` exactly once, in order, with
    /// valid owners and epochs of at least 1.
    pub fn from_runs(revision: i64, runs: Vec<Run>) -> Result<Self, String> {
        let mut next: u32 = 0;
        for (i, r) in runs.iter().enumerate() {
            if u32::from(r.first) != next || r.last < r.first {
                return Err(format!("run {i} is slots {}..={}, expected one starting at {next}", r.first, r.last));
            }
            if r.last >= SLOTS {
                return Err(format!("run {i} ends at slot {}, past the last slot {}", r.last, SLOTS - 1));
            }
            check_name(&format!("run {i}: owner"), &r.owner)?;
            if r.epoch == 0 {
                return Err(format!("run {i}: epoch 0 (epochs start at 1)"));
            }
            next = u32::from(r.last) + 1;
        }
        if next != u32::from(SLOTS) {
            return Err(format!("the runs cover slots 0..{next}, not all {SLOTS}"));
        }
        let mut run_of = Vec::with_capacity(usize::from(SLOTS));
        for (i, r) in runs.iter().enumerate() {
            let i = u16::try_from(i).map_err(|_| "more runs than slots".to_string())?;
            run_of.extend(std::iter::repeat_n(i, usize::from(r.last - r.first) + 1));
        }
        Ok(SlotMap { revision, runs, run_of, moves: Vec::new() })
    }

    /// A map from its runs and its moves, refused unless the runs are valid
    /// ([`SlotMap::from_runs`]) and each move covers slots of its source alone, to another
    /// node, in slot order, no two sharing a slot.
    pub fn with_moves(revision: i64, runs: Vec<Run>, moves: Vec<Move>) -> Result<Self, String> {
        let mut map = SlotMap::from_runs(revision, runs)?;
        let mut next: u32 = 0;
        for (i, m) in moves.iter().enumerate() {
            if u32::from(m.first) < next || m.last < m.first || m.last >= SLOTS {
                return Err(format!("move {i} (slots {}..={}) overlaps another or is out of order", m.first, m.last));
            }
            check_name(&format!("move {i}: from"), &m.from)?;
            check_name(&format!("move {i}: to"), &m.to)?;
            if m.from == m.to {
                return Err(format!("move {i} is from {:?} to itself", m.from));
            }
            if let Some(s) = (m.first..=m.last).find(|&s| map.run(s).is_none_or(|r| r.owner != m.from)) {
                return Err(format!("move {i}: slot {s} is not owned by its source {:?}", m.from));
            }
            next = u32::from(m.last) + 1;
        }
        map.moves = moves;
        Ok(map)
    }

    /// Parses the stored map (the value of the `map` key at `revision`).
    fn parse(value: &[u8], revision: i64) -> Result<Self, String> {
        let stored: StoredMap = serde_json::from_slice(value).map_err(|e| format!("the slot map is not valid: {e}"))?;
        SlotMap::with_moves(revision, stored.runs, stored.moves).map_err(|e| format!("the slot map is not valid: {e}"))
    }

    /// The moves under way.
    pub fn moves(&self) -> &[Move] {
        &self.moves
    }

    /// The move holding `slot`, if any.
    pub fn move_of(&self, slot: Slot) -> Option<&Move> {
        self.moves.iter().find(|m| m.holds(slot))
    }

    /// The runs with slots `first..=last` given to `to` at the next epoch of each, merging
    /// neighbours with one owner and epoch.
    fn runs_switched(&self, first: Slot, last: Slot, to: &str) -> Vec<Run> {
        let mut out: Vec<Run> = Vec::new();
        let mut push = |r: Run| match out.last_mut() {
            Some(p) if p.owner == r.owner && p.epoch == r.epoch && u32::from(p.last) + 1 == u32::from(r.first) => {
                p.last = r.last
            }
            _ => out.push(r),
        };
        for r in &self.runs {
            if r.last < first || r.first > last {
                push(r.clone());
                continue;
            }
            if r.first < first {
                push(Run { last: first - 1, ..r.clone() });
            }
            let (a, b) = (r.first.max(first), r.last.min(last));
            push(Run { first: a, last: b, owner: to.to_string(), epoch: r.epoch + 1 });
            if r.last > last {
                push(Run { first: last + 1, ..r.clone() });
            }
        }
        out
    }

    /// Every slot spread over `nodes` in contiguous runs as even as can be (the first
    /// `SLOTS % n` nodes get one slot more), epoch 1.
    pub fn spread(nodes: &[String]) -> Vec<Run> {
        let n = nodes.len().max(1);
        let (base, extra) = (usize::from(SLOTS) / n, usize::from(SLOTS) % n);
        let mut first = 0usize;
        let mut runs = Vec::with_capacity(nodes.len());
        for (i, node) in nodes.iter().enumerate() {
            let len = base + usize::from(i < extra);
            if len == 0 {
                continue;
            }
            // Both below SLOTS (a u16).
            runs.push(Run { first: first as Slot, last: (first + len - 1) as Slot, owner: node.clone(), epoch: 1 });
            first += len;
        }
        runs
    }

    /// A map as the API gives it ([`SlotMap::to_pb`]), checked as a stored one is.
    pub fn from_pb(map: &pb::SlotMap) -> Result<Self, String> {
        if map.runs.is_empty() {
            return Ok(SlotMap::empty());
        }
        let slot = |s: u32| Slot::try_from(s).map_err(|_| format!("slot {s} is out of range"));
        let runs = map
            .runs
            .iter()
            .map(|r| Ok(Run { first: slot(r.first)?, last: slot(r.last)?, owner: r.owner.clone(), epoch: r.epoch }))
            .collect::<Result<Vec<_>, String>>()?;
        let moves = map
            .moves
            .iter()
            .map(|m| {
                let state = match pb::MoveState::try_from(m.state) {
                    Ok(pb::MoveState::Copying) => MoveState::Copying,
                    Ok(pb::MoveState::Fenced) => MoveState::Fenced,
                    _ => return Err(format!("move state {} is not one", m.state)),
                };
                Ok(Move { first: slot(m.first)?, last: slot(m.last)?, from: m.from.clone(), to: m.to.clone(), state })
            })
            .collect::<Result<Vec<_>, String>>()?;
        SlotMap::with_moves(map.revision, runs, moves)
    }

    /// The etcd revision it was read at (0: no map).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Whether a map exists.
    pub fn is_set(&self) -> bool {
        !self.runs.is_empty()
    }

    /// The run holding `slot` (`None`: no map).
    pub fn run(&self, slot: Slot) -> Option<&Run> {
        self.run_of.get(usize::from(slot)).map(|&i| &self.runs[usize::from(i)])
    }

    /// Its runs, in slot order.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// The API's form.
    pub fn to_pb(&self) -> pb::SlotMap {
        pb::SlotMap {
            revision: self.revision,
            runs: self
                .runs
                .iter()
                .map(|r| pb::SlotRun {
                    first: u32::from(r.first),
                    last: u32::from(r.last),
                    owner: r.owner.clone(),
                    epoch: r.epoch,
                })
                .collect(),
            moves: self.moves.iter().map(Move::to_pb).collect(),
        }
    }
}

/// Why a request naming an entity is refused by this node.
#[derive(Debug, Clone, PartialEq)]
pub enum NotServed {
    /// The map names another owner (`FAILED_PRECONDITION` with these details).
    NotOwner(Box<pb::SlotNotOwned>),
    /// No map exists yet (`UNAVAILABLE`).
    NoMap,
    /// A write to a slot whose move is fenced (`UNAVAILABLE`: retry once it has switched).
    Fenced {
        /// The slot.
        slot: Slot,
        /// The move's target.
        to: String,
    },
}

impl std::fmt::Display for NotServed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotServed::NotOwner(d) => write!(
                f,
                "slot {} is owned by node {:?} at {} (epoch {}, map revision {}); send it there, or re-read the map",
                d.slot, d.owner, d.owner_addr, d.epoch, d.map_revision
            ),
            NotServed::NoMap => {
                f.write_str("this node is sharded and the slot map is not initialised (quiver cluster init)")
            }
            NotServed::Fenced { slot, to } => {
                write!(f, "slot {slot} is moving to node {to:?} and takes no writes until the switch (moments); retry")
            }
        }
    }
}

/// Where a request's entities go ([`Cluster::split`]), as positions in the request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    /// The positions this node owns, ascending.
    pub local: Vec<usize>,
    /// The others, by owner (in the order owners first appear), each ascending.
    pub remote: Vec<Remote>,
}

/// The part of a request one other node owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// The owner's node id.
    pub node: String,
    /// Its address (`host:port`).
    pub address: String,
    /// The positions it owns, ascending.
    pub rows: Vec<usize>,
}

/// One move of a rebalancing plan: slots `first..=last` from `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMove {
    /// First slot.
    pub first: Slot,
    /// Last slot (inclusive).
    pub last: Slot,
    /// Their owner now.
    pub from: String,
    /// Where they go.
    pub to: String,
}

/// The moves that leave every node of `nodes` owning `SLOTS / n` or one more slots (the extra
/// ones stay with the nodes that own the most now, so as little moves as can), taking each
/// donor's slots from the end of its runs. Refused if the map gives slots to a node not in
/// `nodes` (it must be live to give them away) or a move is under way.
pub fn plan_rebalance(map: &SlotMap, nodes: &[String]) -> Result<Vec<PlannedMove>, String> {
    plan(map, nodes, None)
}

/// The moves that give every slot of `leaving` to the other nodes of `nodes` (live, with
/// `leaving` among them or not), each slot to whichever of them owns the fewest then (so an
/// even map stays even); no other node's slots move. What `quiver cluster remove` runs
/// before it removes a node (§7, "Removing a node").
pub fn plan_removal(map: &SlotMap, nodes: &[String], leaving: &str) -> Result<Vec<PlannedMove>, String> {
    let mut nodes = nodes.to_vec();
    if !nodes.iter().any(|n| n == leaving) {
        nodes.push(leaving.to_string());
    }
    if nodes.len() < 2 {
        return Err(format!("{leaving} is the only node registered: there is no node to give its slots to"));
    }
    plan(map, &nodes, Some(leaving))
}

/// A rebalancing plan over `nodes`, where `leaving` (one of them) ends with no slot.
fn plan(map: &SlotMap, nodes: &[String], leaving: Option<&str>) -> Result<Vec<PlannedMove>, String> {
    if !map.is_set() {
        return Err("the slot map is not initialised (quiver cluster init)".into());
    }
    if let Some(m) = map.moves().first() {
        return Err(format!(
            "slots {}..={} are moving from {} to {}: finish or abort that move first",
            m.first, m.last, m.from, m.to
        ));
    }
    if nodes.is_empty() {
        return Err("no node is registered".into());
    }
    let mut owned: BTreeMap<&str, usize> = nodes.iter().map(|n| (n.as_str(), 0)).collect();
    for r in map.runs() {
        match owned.get_mut(r.owner.as_str()) {
            Some(c) => *c += usize::from(r.last - r.first) + 1,
            None => return Err(format!("node {} owns slots but is not registered now: bring it back first", r.owner)),
        }
    }
    let mut order: Vec<&str> = owned.keys().copied().filter(|id| Some(*id) != leaving).collect();
    order.sort_by_key(|id| (std::cmp::Reverse(owned[id]), *id));
    let target: BTreeMap<&str, usize> = match leaving {
        // The leaving node's slots go one by one to the node that owns the fewest.
        Some(l) => {
            let mut target: BTreeMap<&str, usize> = order.iter().map(|id| (*id, owned[id])).collect();
            for _ in 0..owned.get(l).copied().unwrap_or(0) {
                let fewest = target.iter().min_by_key(|(id, c)| (**c, **id)).map(|(id, _)| *id);
                if let Some(c) = fewest.and_then(|id| target.get_mut(id)) {
                    *c += 1;
                }
            }
            target.insert(l, 0);
            target
        }
        None => {
            let n = nodes.len();
            let (base, extra) = (usize::from(SLOTS) / n, usize::from(SLOTS) % n);
            order.iter().enumerate().map(|(i, id)| (*id, base + usize::from(i < extra))).collect()
        }
    };
    let mut deficit: Vec<(&str, usize)> =
        order.iter().rev().filter(|id| owned[*id] < target[*id]).map(|id| (*id, target[id] - owned[id])).collect();
    deficit.sort_by_key(|(id, _)| *id);
    let mut plan = Vec::new();
    let mut want = deficit.into_iter();
    let mut current = want.next();
    for (donor, &count) in &owned {
        let mut surplus = count.saturating_sub(target[donor]);
        for r in map.runs().iter().rev().filter(|r| r.owner == *donor) {
            let mut last = r.last;
            while surplus > 0 {
                let Some((to, need)) = current.as_mut() else { break };
                let room = usize::from(last - r.first) + 1;
                let take = surplus.min(*need).min(room);
                // `take` >= 1 and at most the run's slots from `r.first` to `last`.
                let first = last - (take - 1) as Slot;
                plan.push(PlannedMove { first, last, from: donor.to_string(), to: to.to_string() });
                surplus -= take;
                *need -= take;
                if *need == 0 {
                    current = want.next();
                }
                if first == r.first {
                    break;
                }
                last = first - 1;
            }
        }
    }
    plan.sort_by_key(|m| m.first);
    Ok(plan)
}

/// The position of `mv` (same slots, source and target) among the map's moves, or
/// `FAILED_PRECONDITION`: it was aborted (or switched).
fn find_move(map: &SlotMap, mv: &Move) -> Result<usize, tonic::Status> {
    map.moves
        .iter()
        .position(|m| m.first == mv.first && m.last == mv.last && m.from == mv.from && m.to == mv.to)
        .ok_or_else(|| {
            tonic::Status::aborted(format!(
                "the move of slots {}..={} to {:?} is no longer in the map (aborted)",
                mv.first, mv.last, mv.to
            ))
        })
}

/// What the node knows of etcd now.
#[derive(Debug, Clone, Default)]
struct EtcdState {
    connected: bool,
    error: String,
}

/// A sharded node's view of its cluster, kept current by [`Cluster::run`].
pub struct Cluster {
    cfg: ShardConfig,
    map: RwLock<Arc<SlotMap>>,
    nodes: RwLock<BTreeMap<String, StoredNode>>,
    /// Nodes removed from the region, by id.
    removed: RwLock<BTreeMap<String, StoredRemoved>>,
    state: Mutex<EtcdState>,
    client: Mutex<Option<Client>>,
    /// The lease of this node's registration (revoked before registering again, and at stop).
    lease: Mutex<Option<i64>>,
    /// Whether this process has registered yet (a takeover is only for its first time).
    registered_once: std::sync::atomic::AtomicBool,
    /// Held shared by every write from its ownership check to its commit, and exclusively by a
    /// move's fence (§5): once the fence holds it, every write checked under an older map has
    /// committed.
    fence: RwLock<()>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("cfg", &self.cfg).field("revision", &self.map.read().revision).finish()
    }
}

impl Cluster {
    /// A node with no map yet; [`Cluster::run`] connects it.
    pub fn new(cfg: ShardConfig) -> Result<Arc<Self>, String> {
        check_name("--node-id", &cfg.node)?;
        check_name("--cluster", &cfg.cluster)?;
        if cfg.etcd.is_empty() {
            return Err("--etcd needs at least one endpoint".into());
        }
        Ok(Arc::new(Cluster {
            cfg,
            map: RwLock::new(Arc::new(SlotMap::empty())),
            nodes: RwLock::new(BTreeMap::new()),
            removed: RwLock::new(BTreeMap::new()),
            state: Mutex::new(EtcdState::default()),
            client: Mutex::new(None),
            lease: Mutex::new(None),
            registered_once: std::sync::atomic::AtomicBool::new(false),
            fence: RwLock::new(()),
        }))
    }

    /// Its configuration.
    pub fn config(&self) -> &ShardConfig {
        &self.cfg
    }

    fn prefix(&self) -> String {
        format!("/quiver/{}/", self.cfg.cluster)
    }

    fn map_key(&self) -> String {
        format!("{}map", self.prefix())
    }

    fn nodes_prefix(&self) -> String {
        format!("{}nodes/", self.prefix())
    }

    fn removed_key(&self, node: &str) -> String {
        format!("{}removed/{node}", self.prefix())
    }

    /// The ids of the nodes removed from the region (as last seen from etcd), sorted.
    pub fn removed(&self) -> Vec<String> {
        self.removed.read().keys().cloned().collect()
    }

    /// The nodes removed from the region with the heads their peers had pulled, sorted by id.
    pub fn removed_heads(&self) -> Vec<(String, u64)> {
        self.removed.read().iter().map(|(id, r)| (id.clone(), r.head)).collect()
    }

    /// Whether `node` was removed from the region (as last seen from etcd).
    pub fn is_removed(&self, node: &str) -> bool {
        self.removed.read().contains_key(node)
    }

    /// The map as this node knows it.
    pub fn map(&self) -> Arc<SlotMap> {
        self.map.read().clone()
    }

    /// Installs `map` unless this node already has a newer one.
    fn install(&self, map: SlotMap) {
        let mut cur = self.map.write();
        if map.revision > cur.revision {
            tracing::info!(revision = map.revision, runs = map.runs.len(), "slot map");
            *cur = Arc::new(map);
        }
    }

    /// Whether this node serves `entity_key` under `map` (one map for a whole request).
    pub fn check(&self, map: &SlotMap, entity_key: &[u8]) -> Result<(), NotServed> {
        let slot = slot_of(entity_key);
        let Some(run) = map.run(slot) else { return Err(NotServed::NoMap) };
        if run.owner == self.cfg.node {
            return Ok(());
        }
        let owner_addr = self.nodes.read().get(&run.owner).map(|n| n.addr.clone()).unwrap_or_default();
        Err(NotServed::NotOwner(Box::new(pb::SlotNotOwned {
            slot: u32::from(slot),
            owner: run.owner.clone(),
            owner_addr,
            epoch: run.epoch,
            map_revision: map.revision,
        })))
    }

    /// Checks that this node may write `keys` now (it owns them, and no fenced move holds
    /// them), under one map, and returns the guard a write holds until it has committed (§5).
    /// A write must not take a second guard while holding one.
    pub fn write_guard<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<parking_lot::RwLockReadGuard<'_, ()>, NotServed> {
        let guard = self.fence.read();
        let map = self.map();
        let fenced = map.moves.iter().any(|m| m.state == MoveState::Fenced);
        for key in keys {
            self.check(&map, key)?;
            if !fenced {
                continue;
            }
            let slot = slot_of(key);
            if let Some(m) = map.move_of(slot).filter(|m| m.state == MoveState::Fenced) {
                return Err(NotServed::Fenced { slot, to: m.to.clone() });
            }
        }
        Ok(guard)
    }

    /// Fences writes to a move's slots on its source (§5 step 3): waits, up to `wait`, until
    /// every write that checked ownership before the map showed the fence has committed
    /// (false: they had not). The caller checked that this node's map shows it. Writes of
    /// every slot wait while it waits.
    pub fn drain_writes(&self, wait: Duration) -> bool {
        self.fence.try_write_for(wait).is_some()
    }

    /// Where the entities of one request go, under one map (§4): the positions of `keys` this
    /// node owns, and those of each other owner. A key whose owner is not registered (so has no
    /// address to forward to) refuses the whole request, as [`Cluster::check`] does.
    pub fn split<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) -> Result<Split, NotServed> {
        let map = self.map();
        let mut split = Split::default();
        let mut at: BTreeMap<String, usize> = BTreeMap::new();
        for (i, key) in keys.into_iter().enumerate() {
            match self.check(&map, key) {
                Ok(()) => split.local.push(i),
                Err(NotServed::NotOwner(d)) if !d.owner_addr.is_empty() => {
                    let k = *at.entry(d.owner.clone()).or_insert_with(|| {
                        split.remote.push(Remote {
                            node: d.owner.clone(),
                            address: d.owner_addr.clone(),
                            rows: vec![],
                        });
                        split.remote.len() - 1
                    });
                    split.remote[k].rows.push(i);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(split)
    }

    /// The address node `node` registered, if it is registered.
    pub fn address_of(&self, node: &str) -> Option<String> {
        self.nodes.read().get(node).map(|n| n.addr.clone())
    }

    /// The map, the nodes and this node's view of etcd.
    pub fn status(&self) -> pb::GetClusterStatusResponse {
        let map = self.map();
        let mut slots: BTreeMap<&str, u32> = BTreeMap::new();
        for r in map.runs() {
            *slots.entry(r.owner.as_str()).or_default() += u32::from(r.last - r.first) + 1;
        }
        let state = self.state.lock().clone();
        // Registrations as last seen; none is known to be live while etcd is out of reach.
        let mut nodes: BTreeMap<String, pb::ClusterNode> = self
            .nodes
            .read()
            .values()
            .map(|n| {
                let node = pb::ClusterNode {
                    node: n.node.clone(),
                    addr: n.addr.clone(),
                    region: n.region,
                    live: state.connected,
                    slots: 0,
                };
                (n.node.clone(), node)
            })
            .collect();
        for (owner, count) in slots {
            nodes
                .entry(owner.to_string())
                .or_insert_with(|| pb::ClusterNode { node: owner.to_string(), ..Default::default() })
                .slots = count;
        }
        pb::GetClusterStatusResponse {
            sharded: true,
            node: self.cfg.node.clone(),
            cluster: self.cfg.cluster.clone(),
            map: Some(map.to_pb()),
            nodes: nodes.into_values().collect(),
            etcd_connected: state.connected,
            etcd_error: state.error,
            progress: Vec::new(),
            removed: self.removed(),
        }
    }

    fn connected_client(&self) -> Result<Client, tonic::Status> {
        self.client.lock().clone().ok_or_else(|| {
            let error = self.state.lock().error.clone();
            tonic::Status::unavailable(format!("etcd is not reachable from this node ({error}); the map cannot change"))
        })
    }

    /// Creates the map: every slot spread over the nodes registered now, sorted by id.
    pub async fn init_slots(&self) -> Result<Arc<SlotMap>, tonic::Status> {
        let mut client = self.connected_client()?;
        let unavailable = |e: etcd_client::Error| tonic::Status::unavailable(format!("etcd: {e}"));
        let got = client.get(self.nodes_prefix(), Some(GetOptions::new().with_prefix())).await.map_err(unavailable)?;
        let mut ids: Vec<String> = got
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice::<StoredNode>(kv.value()).ok())
            .map(|n| n.node)
            .collect();
        ids.sort();
        if ids.is_empty() {
            return Err(tonic::Status::failed_precondition("no node is registered"));
        }
        let runs = SlotMap::spread(&ids);
        let value = serde_json::to_vec(&StoredMap { runs: runs.clone(), moves: Vec::new() })
            .map_err(|e| tonic::Status::internal(format!("encoding the map: {e}")))?;
        let key = self.map_key();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        let done = client.txn(txn).await.map_err(unavailable)?;
        if !done.succeeded() {
            return Err(tonic::Status::already_exists("the slot map exists already"));
        }
        let revision = done.header().map_or(0, |h| h.revision());
        let map = SlotMap::from_runs(revision, runs).map_err(tonic::Status::internal)?;
        tracing::info!(revision, nodes = ?ids, "slot map created");
        self.install(map.clone());
        Ok(Arc::new(map))
    }

    /// Reads the map from etcd now (not from the watch), installs it if newer, and returns
    /// it with its `mod_revision` (0: no map).
    pub async fn read_map(&self) -> Result<(Arc<SlotMap>, i64), tonic::Status> {
        let mut client = self.connected_client()?;
        let got =
            client.get(self.map_key(), None).await.map_err(|e| tonic::Status::unavailable(format!("etcd: {e}")))?;
        let Some(kv) = got.kvs().first() else { return Ok((Arc::new(SlotMap::empty()), 0)) };
        let map = SlotMap::parse(kv.value(), kv.mod_revision()).map_err(tonic::Status::internal)?;
        self.install(map);
        let current = self.map();
        Ok((current, kv.mod_revision()))
    }

    /// Changes the map by compare-and-swap (§2): reads it, asks `change` for the new one
    /// (`Ok(None)`: nothing to change), and commits it only if the map is still the one read,
    /// retrying from a fresh read when another change won, at most [`MAP_CHANGE_ATTEMPTS`]
    /// times. Returns the map now in force.
    pub async fn change_map<F>(&self, change: F) -> Result<Arc<SlotMap>, tonic::Status>
    where
        F: Fn(&SlotMap) -> Result<Option<(Vec<Run>, Vec<Move>)>, tonic::Status>,
    {
        self.change_map_when(Vec::new(), change).await
    }

    /// [`Cluster::change_map`], committed only if `when` also holds.
    async fn change_map_when<F>(&self, when: Vec<Compare>, change: F) -> Result<Arc<SlotMap>, tonic::Status>
    where
        F: Fn(&SlotMap) -> Result<Option<(Vec<Run>, Vec<Move>)>, tonic::Status>,
    {
        for _ in 0..MAP_CHANGE_ATTEMPTS {
            let (map, mod_revision) = self.read_map().await?;
            if !map.is_set() {
                return Err(tonic::Status::failed_precondition(
                    "the slot map is not initialised (quiver cluster init)",
                ));
            }
            let Some((runs, moves)) = change(&map)? else { return Ok(map) };
            // Checked as every reader will check it.
            SlotMap::with_moves(mod_revision, runs.clone(), moves.clone()).map_err(tonic::Status::internal)?;
            let value = serde_json::to_vec(&StoredMap { runs: runs.clone(), moves: moves.clone() })
                .map_err(|e| tonic::Status::internal(format!("encoding the map: {e}")))?;
            let key = self.map_key();
            let mut compares = vec![Compare::mod_revision(key.clone(), CompareOp::Equal, mod_revision)];
            compares.extend(when.iter().cloned());
            let txn = Txn::new().when(compares).and_then([TxnOp::put(key, value, None)]);
            let mut client = self.connected_client()?;
            let done = client.txn(txn).await.map_err(|e| tonic::Status::unavailable(format!("etcd: {e}")))?;
            if done.succeeded() {
                let revision = done.header().map_or(0, |h| h.revision());
                let map = SlotMap::with_moves(revision, runs, moves).map_err(tonic::Status::internal)?;
                self.install(map);
                return Ok(self.map());
            }
        }
        Err(tonic::Status::aborted(format!(
            "the slot map kept changing under this change ({MAP_CHANGE_ATTEMPTS} attempts); try again"
        )))
    }

    /// Records a move of `first..=last` to `to`, or finds it recorded (§5): the map after,
    /// and the move. Refused if the slots have more than one owner, belong to `to` already
    /// (with no move: nothing to do, `Ok` with no move), or overlap another move.
    pub async fn begin_move(
        &self,
        first: Slot,
        last: Slot,
        to: &str,
    ) -> Result<(Arc<SlotMap>, Option<Move>), tonic::Status> {
        // Read from etcd, not the watch; the transaction below also requires it absent, so a
        // removal that lands meanwhile fails the move (`ABORTED`).
        let removed_key = self.removed_key(to);
        let mut client = self.connected_client()?;
        let got = client
            .get(removed_key.clone(), None)
            .await
            .map_err(|e| tonic::Status::unavailable(format!("etcd: {e}")))?;
        if self.is_removed(to) || !got.kvs().is_empty() {
            return Err(tonic::Status::failed_precondition(format!("node {to:?} was removed from the region")));
        }
        let absent = Compare::create_revision(removed_key.clone(), CompareOp::Equal, 0);
        let to = to.to_string();
        let changed = self
            .change_map_when(vec![absent], |map| {
                if map.moves.iter().any(|m| m.first == first && m.last == last && m.to == to) {
                    return Ok(None);
                }
                if let Some(m) = map.moves.iter().find(|m| m.first <= last && first <= m.last) {
                    return Err(tonic::Status::failed_precondition(format!(
                        "slots {}..={} are moving from {:?} to {:?} already (abort that move, or move exactly those slots to {:?})",
                        m.first, m.last, m.from, m.to, m.to
                    )));
                }
                let owners: std::collections::BTreeSet<&str> =
                    (first..=last).filter_map(|s| map.run(s)).map(|r| r.owner.as_str()).collect();
                let from = match owners.into_iter().collect::<Vec<_>>()[..] {
                    [one] => one.to_string(),
                    ref many => {
                        return Err(tonic::Status::failed_precondition(format!(
                            "slots {first}..={last} have {} owners ({}); a move takes slots of one owner",
                            many.len(),
                            many.join(", ")
                        )))
                    }
                };
                if from == to {
                    return Ok(None);
                }
                let mut moves = map.moves.clone();
                moves.push(Move { first, last, from, to: to.clone(), state: MoveState::Copying });
                moves.sort_by_key(|m| m.first);
                Ok(Some((map.runs.clone(), moves)))
            })
            .await;
        let map = match changed {
            // A removal that landed after the check fails every attempt: say so.
            Err(e) if e.code() == tonic::Code::Aborted => {
                let got = client
                    .get(removed_key, None)
                    .await
                    .map_err(|e| tonic::Status::unavailable(format!("etcd: {e}")))?;
                if got.kvs().is_empty() {
                    return Err(e);
                }
                return Err(tonic::Status::failed_precondition(format!("node {to:?} was removed from the region")));
            }
            r => r?,
        };
        let m = map.moves.iter().find(|m| m.first == first && m.last == last && m.to == to).cloned();
        Ok((map, m))
    }

    /// Sets a recorded move's state: `Fenced` (§5 step 3), or back to `Copying` (a fenced move
    /// run again). `ABORTED` if it is no longer in the map.
    pub async fn set_move_state(&self, mv: &Move, state: MoveState) -> Result<Arc<SlotMap>, tonic::Status> {
        self.change_map(|map| {
            let i = find_move(map, mv)?;
            if map.moves[i].state == state {
                return Ok(None);
            }
            let mut moves = map.moves.clone();
            moves[i].state = state;
            Ok(Some((map.runs.clone(), moves)))
        })
        .await
    }

    /// Switches a fenced move (§5 step 4): the target owns the slots at the next epoch and the
    /// move leaves the map, in one transaction.
    pub async fn switch_move(&self, mv: &Move) -> Result<Arc<SlotMap>, tonic::Status> {
        self.change_map(|map| {
            let i = find_move(map, mv)?;
            if map.moves[i].state != MoveState::Fenced {
                return Err(tonic::Status::failed_precondition("the move is not fenced"));
            }
            let mut moves = map.moves.clone();
            moves.remove(i);
            Ok(Some((map.runs_switched(mv.first, mv.last, &mv.to), moves)))
        })
        .await
    }

    /// Removes the move of exactly `first..=last` that has not switched (`NOT_FOUND`: none).
    pub async fn abort_move(&self, first: Slot, last: Slot) -> Result<Arc<SlotMap>, tonic::Status> {
        self.change_map(|map| {
            let Some(i) = map.moves.iter().position(|m| m.first == first && m.last == last) else {
                return Err(tonic::Status::not_found(format!("no move of slots {first}..={last} is in the map")));
            };
            let mut moves = map.moves.clone();
            moves.remove(i);
            Ok(Some((map.runs.clone(), moves)))
        })
        .await
    }

    /// Removes this node from the region (§7, "Removing a node"), in one transaction: if the
    /// map is still the one of `map_revision` (read when this node was found to own nothing),
    /// records the removal with the stream's drained `head` and deletes the registration.
    /// `ABORTED` if the map changed (or the node was removed already).
    pub async fn remove_self(&self, map_revision: i64, head: u64) -> Result<(), tonic::Status> {
        let mut client = self.connected_client()?;
        let record = StoredRemoved { node: self.cfg.node.clone(), region: self.cfg.region, head };
        let value = serde_json::to_vec(&record).map_err(|e| tonic::Status::internal(format!("encoding: {e}")))?;
        let removed_key = self.removed_key(&self.cfg.node);
        let my_key = format!("{}{}", self.nodes_prefix(), self.cfg.node);
        let txn = Txn::new()
            .when([
                Compare::mod_revision(self.map_key(), CompareOp::Equal, map_revision),
                Compare::create_revision(removed_key.clone(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(removed_key, value, None), TxnOp::delete(my_key, None)]);
        let done = client.txn(txn).await.map_err(|e| tonic::Status::unavailable(format!("etcd: {e}")))?;
        if !done.succeeded() {
            return Err(tonic::Status::aborted(
                "the slot map changed while the node drained (or it was removed already): call again",
            ));
        }
        self.removed.write().insert(record.node.clone(), record);
        tracing::warn!(node = %self.cfg.node, head, "removed from the region: stop this process");
        Ok(())
    }

    /// Keeps the node registered and its map current, reconnecting with backoff after every
    /// failure, until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = ETCD_RETRY_MIN;
        loop {
            let started = Instant::now();
            let ended = tokio::select! {
                r = self.session() => Some(r),
                _ = stop.wait_for(|s| *s) => None,
            };
            let Some(ended) = ended else {
                self.unregister().await;
                return;
            };
            *self.client.lock() = None;
            let error = match ended {
                Ok(()) => "the session ended".to_string(),
                Err(e) => e,
            };
            tracing::warn!(%error, "etcd: serving from the last known slot map while reconnecting");
            *self.state.lock() = EtcdState { connected: false, error };
            if started.elapsed() > ETCD_RETRY_MAX {
                backoff = ETCD_RETRY_MIN;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            backoff = (backoff * 2).min(ETCD_RETRY_MAX);
        }
    }

    /// At stop: revokes the registration's lease, so the node leaves `nodes/` at once (and can
    /// register again at once when it restarts).
    async fn unregister(&self) {
        let (client, lease) = (self.client.lock().take(), self.lease.lock().take());
        if let (Some(mut client), Some(lease)) = (client, lease) {
            let _ = tokio::time::timeout(ETCD_CALL_TIMEOUT, client.lease_revoke(lease)).await;
        }
    }

    /// Takes over the registration at `key` if it is this data directory's dead process's
    /// (its instance id is this node's): in one transaction, if the key is still that
    /// registration, it becomes `me` with `lease`; the dead lease is then revoked. Only before
    /// this process has first registered: a process whose registration was taken later (a
    /// copied data directory running beside its original) waits instead of taking it back.
    async fn take_over(
        &self,
        client: &mut Client,
        key: &str,
        me: &[u8],
        lease: i64,
    ) -> Result<bool, etcd_client::Error> {
        if self.cfg.instance.is_empty() || self.registered_once.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(false);
        }
        let got = client.get(key, None).await?;
        let Some(kv) = got.kvs().first() else { return Ok(false) };
        let theirs: Option<StoredNode> = serde_json::from_slice(kv.value()).ok();
        if theirs.is_none_or(|t| t.instance != self.cfg.instance) {
            return Ok(false);
        }
        let take = Txn::new()
            .when([
                Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision()),
                Compare::create_revision(self.removed_key(&self.cfg.node), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(key, me, Some(PutOptions::new().with_lease(lease)))]);
        if !client.txn(take).await?.succeeded() {
            return Ok(false);
        }
        if kv.lease() != 0 {
            // Best effort: it would expire anyway, and it held nothing else.
            let _ = client.lease_revoke(kv.lease()).await;
        }
        tracing::info!(node = %self.cfg.node, "took over the registration of this data directory's previous process");
        Ok(true)
    }

    /// One connection: register, read the map and the nodes, then keep the lease alive and
    /// follow every change until something fails.
    async fn session(&self) -> Result<(), String> {
        // Require a leader: a member cut off from the others would keep a watch open and
        // silent.
        let opts = ConnectOptions::new()
            .with_connect_timeout(ETCD_CALL_TIMEOUT)
            .with_timeout(ETCD_CALL_TIMEOUT)
            .with_require_leader(true);
        let e = |what: &str| {
            let what = what.to_string();
            move |err: etcd_client::Error| format!("{what}: {err}")
        };
        let mut client = Client::connect(&self.cfg.etcd, Some(opts)).await.map_err(e("connecting"))?;
        let ttl = i64::try_from(NODE_LEASE_TTL.as_secs()).unwrap_or(10);
        // This node's previous registration (an earlier session's) goes first, so that the
        // check below only ever finds another process's.
        let previous = *self.lease.lock();
        if let Some(old) = previous {
            let _ = client.lease_revoke(old).await;
        }
        let lease = client.lease_grant(ttl, None).await.map_err(e("granting a lease"))?.id();
        *self.lease.lock() = Some(lease);
        let me = StoredNode {
            node: self.cfg.node.clone(),
            addr: self.cfg.advertise.clone(),
            region: self.cfg.region,
            instance: self.cfg.instance.clone(),
        };
        let me = serde_json::to_vec(&me).map_err(|err| format!("encoding the registration: {err}"))?;
        let my_key = format!("{}{}", self.nodes_prefix(), self.cfg.node);
        let removed_key = self.removed_key(&self.cfg.node);
        // Registered only if no live process holds the id (two processes with one id would
        // both serve its slots), and the id was never removed (peers no longer pull from it).
        let register = Txn::new()
            .when([
                Compare::create_revision(my_key.clone(), CompareOp::Equal, 0),
                Compare::create_revision(removed_key.clone(), CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(my_key.clone(), me.clone(), Some(PutOptions::new().with_lease(lease)))]);
        let mut registered = client.txn(register).await.map_err(e("registering"))?.succeeded();
        if !registered {
            registered = self.take_over(&mut client, &my_key, &me, lease).await.map_err(e("taking over"))?;
        }
        let removed = if registered {
            None
        } else {
            let got = client.get(removed_key, None).await.map_err(e("reading"))?;
            got.kvs().first().and_then(|kv| serde_json::from_slice::<StoredRemoved>(kv.value()).ok())
        };
        if !registered {
            let _ = client.lease_revoke(lease).await;
            *self.lease.lock() = None;
            if let Some(record) = removed {
                // Known as removed here too: `Members` then never offers this node to peers.
                self.removed.write().insert(record.node.clone(), record);
                *self.map.write() = Arc::new(SlotMap::empty());
                return Err(format!(
                    "node id {:?} was removed from the region (quiver cluster remove): peers no longer pull from \
                     it, so it never serves again; start a node under a new --node-id with an empty data directory",
                    self.cfg.node
                ));
            }
            // Etcd answered, so this is no outage: the id is someone else's now.
            *self.map.write() = Arc::new(SlotMap::empty());
            return Err(format!(
                "node id {:?} is registered by another live process (or by this one before a crash, until its \
                 lease of {} s expires); not serving any slot under it until it is free",
                self.cfg.node,
                NODE_LEASE_TTL.as_secs()
            ));
        }
        self.registered_once.store(true, std::sync::atomic::Ordering::Release);
        let (mut keeper, mut acks) = client.lease_keep_alive(lease).await.map_err(e("keeping the lease"))?;
        let prefix = self.prefix();
        let got = client.get(prefix.clone(), Some(GetOptions::new().with_prefix())).await.map_err(e("reading"))?;
        let revision = got.header().map_or(0, |h| h.revision());
        let (mut nodes, mut removed) = (BTreeMap::new(), BTreeMap::new());
        for kv in got.kvs() {
            self.take(kv.key(), Some((kv.value(), kv.mod_revision())), &mut nodes, &mut removed);
        }
        *self.nodes.write() = nodes;
        *self.removed.write() = removed;
        let mut watch = client
            .watch(prefix, Some(etcd_client::WatchOptions::new().with_prefix().with_start_revision(revision + 1)))
            .await
            .map_err(e("watching"))?;
        *self.client.lock() = Some(client);
        *self.state.lock() = EtcdState { connected: true, error: String::new() };
        tracing::info!(node = %self.cfg.node, revision, "registered in etcd");
        let mut tick = tokio::time::interval(NODE_LEASE_TTL / 4);
        let mut last_ack = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if last_ack.elapsed() > NODE_LEASE_TTL * 2 / 3 {
                        return Err("no lease keep-alive answer for two thirds of the lease's TTL".into());
                    }
                    keeper.keep_alive().await.map_err(e("keeping the lease"))?;
                }
                ack = acks.message() => match ack.map_err(e("keeping the lease"))? {
                    Some(a) if a.ttl() > 0 => last_ack = Instant::now(),
                    Some(_) => return Err("the lease expired".into()),
                    None => return Err("the lease's keep-alive stream ended".into()),
                },
                msg = watch.message() => {
                    let Some(resp) = msg.map_err(e("watching"))? else {
                        return Err("the watch ended".into());
                    };
                    if resp.canceled() {
                        return Err(format!("the watch was cancelled: {}", resp.cancel_reason()));
                    }
                    let mut nodes = self.nodes.read().clone();
                    let mut removed = self.removed.read().clone();
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let put = matches!(ev.event_type(), EventType::Put).then(|| (kv.value(), kv.mod_revision()));
                        self.take(kv.key(), put, &mut nodes, &mut removed);
                    }
                    *self.nodes.write() = nodes;
                    *self.removed.write() = removed;
                }
            }
        }
    }

    /// Takes one key of the prefix: the map (installed if valid and newer), a node, or a
    /// removed node (`put`: its value and revision; `None`: deleted).
    fn take(
        &self,
        key: &[u8],
        put: Option<(&[u8], i64)>,
        nodes: &mut BTreeMap<String, StoredNode>,
        removed: &mut BTreeMap<String, StoredRemoved>,
    ) {
        let Some(rest) = key.strip_prefix(self.prefix().as_bytes()) else { return };
        if rest == b"map" {
            match put {
                Some((value, revision)) => match SlotMap::parse(value, revision) {
                    Ok(map) => self.install(map),
                    Err(error) => tracing::error!(%error, revision, "keeping the last valid slot map"),
                },
                None => tracing::error!("the slot map was deleted from etcd; keeping the last one"),
            }
        } else if let Some(id) = rest.strip_prefix(b"nodes/") {
            let id = String::from_utf8_lossy(id).into_owned();
            match put.map(|(v, _)| serde_json::from_slice::<StoredNode>(v)) {
                Some(Ok(n)) => {
                    nodes.insert(id, n);
                }
                Some(Err(error)) => tracing::warn!(%error, node = %id, "ignoring a node registration"),
                None => {
                    nodes.remove(&id);
                }
            }
        } else if let Some(id) = rest.strip_prefix(b"removed/") {
            let id = String::from_utf8_lossy(id).into_owned();
            match put.map(|(v, _)| serde_json::from_slice::<StoredRemoved>(v)) {
                Some(Ok(r)) => {
                    removed.insert(id, r);
                }
                Some(Err(error)) => tracing::warn!(%error, node = %id, "ignoring a removal record"),
                // Never deleted by Quiver; an operator's delete is taken as it is.
                None => {
                    removed.remove(&id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i}")).collect()
    }

    #[test]
    fn spread_covers_every_slot_evenly() {
        for n in [1, 2, 3, 7, 4096, 5000] {
            let runs = SlotMap::spread(&nodes(n));
            let map = SlotMap::from_runs(5, runs.clone()).expect("a spread map is valid");
            let sizes: Vec<u32> = runs.iter().map(|r| u32::from(r.last - r.first) + 1).collect();
            let (min, max) = (sizes.iter().min().copied(), sizes.iter().max().copied());
            assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "n={n}: {min:?}..{max:?}");
            assert_eq!(sizes.iter().sum::<u32>(), u32::from(SLOTS));
            assert_eq!(runs.len(), n.min(usize::from(SLOTS)));
            assert_eq!(map.run(0).map(|r| r.owner.as_str()), Some("n0"));
            assert!(map.run(SLOTS - 1).is_some());
        }
    }

    #[test]
    fn maps_that_do_not_cover_every_slot_once_are_refused() {
        let run = |first, last, owner: &str, epoch| Run { first, last, owner: owner.into(), epoch };
        let bad = [
            (vec![], "cover"),
            (vec![run(0, 100, "a", 1)], "cover"),
            (vec![run(0, 100, "a", 1), run(100, SLOTS - 1, "b", 1)], "starting at 101"),
            (vec![run(0, 100, "a", 1), run(102, SLOTS - 1, "b", 1)], "starting at 101"),
            (vec![run(1, SLOTS - 1, "a", 1)], "starting at 0"),
            (vec![run(0, SLOTS - 1, "a", 0)], "epoch 0"),
            (vec![run(0, SLOTS - 1, "a/b", 1)], "not allowed"),
            (vec![run(0, SLOTS - 1, "", 1)], "1 to 64"),
            (vec![run(0, SLOTS - 1, "a", 1), run(SLOTS, SLOTS, "b", 1)], "past the last slot"),
            (vec![run(0, 10, "a", 1), run(20, 11, "b", 1)], "starting at 11"),
        ];
        for (runs, want) in bad {
            let err = SlotMap::from_runs(1, runs.clone()).expect_err("refused");
            assert!(err.contains(want), "{runs:?}: {err}");
        }
        for value in [&b"{"[..], b"{\"runs\": 3}", b"[]"] {
            assert!(SlotMap::parse(value, 1).is_err());
        }
        let good = serde_json::to_vec(&StoredMap { runs: SlotMap::spread(&nodes(3)), moves: vec![] }).expect("encodes");
        assert_eq!(SlotMap::parse(&good, 9).map(|m| m.revision()), Ok(9));
    }

    #[test]
    fn the_owner_serves_and_others_name_it() {
        let cfg = ShardConfig {
            node: "n1".into(),
            cluster: "c".into(),
            etcd: vec!["http://127.0.0.1:1".into()],
            advertise: "127.0.0.1:7".into(),
            region: 0,
            forward: true,
            instance: String::new(),
        };
        let cluster = Cluster::new(cfg).expect("valid");
        let key = quiver_storage::encode_entity_key(&[quiver_storage::KeyPart::Str("u1")]);
        assert_eq!(cluster.check(&cluster.map(), &key), Err(NotServed::NoMap));
        let slot = slot_of(&key);
        let mut nodes = BTreeMap::new();
        let reg = serde_json::to_vec(&StoredNode {
            node: "n0".into(),
            addr: "10.0.0.1:5".into(),
            region: 0,
            instance: String::new(),
        })
        .expect("encodes");
        cluster.take(b"/quiver/c/nodes/n0", Some((&reg, 3)), &mut nodes, &mut BTreeMap::new());
        *cluster.nodes.write() = nodes;
        // Removal records: one read, a damaged one ignored.
        let mut removed = BTreeMap::new();
        let rec = serde_json::to_vec(&StoredRemoved { node: "n9".into(), region: 0, head: 7 }).expect("encodes");
        cluster.take(b"/quiver/c/removed/n9", Some((&rec, 4)), &mut BTreeMap::new(), &mut removed);
        cluster.take(b"/quiver/c/removed/bad", Some((b"{", 5)), &mut BTreeMap::new(), &mut removed);
        assert_eq!(removed.keys().collect::<Vec<_>>(), ["n9"]);
        *cluster.removed.write() = removed;
        assert!(cluster.is_removed("n9") && !cluster.is_removed("n0"));
        assert_eq!(cluster.status().removed, ["n9"]);
        // Everything below `slot` to n0, the rest to n1.
        let split = |owner_low: &str, revision| {
            let mut runs = vec![];
            if slot > 0 {
                runs.push(Run { first: 0, last: slot - 1, owner: "n1".into(), epoch: 1 });
            }
            runs.push(Run { first: slot, last: SLOTS - 1, owner: owner_low.into(), epoch: 2 });
            serde_json::to_vec(&StoredMap { runs, moves: vec![] }).map(|v| (v, revision)).expect("encodes")
        };
        let (v, r) = split("n0", 10);
        cluster.take(b"/quiver/c/map", Some((&v, r)), &mut BTreeMap::new(), &mut BTreeMap::new());
        let Err(NotServed::NotOwner(d)) = cluster.check(&cluster.map(), &key) else { panic!("n0 owns it") };
        // A request splits by owner, positions kept.
        let keys: Vec<Vec<u8>> = (0..200)
            .map(|i| quiver_storage::encode_entity_key(&[quiver_storage::KeyPart::Str(&format!("u{i}"))]))
            .collect();
        let (low, high): (Vec<usize>, Vec<usize>) = (0..keys.len()).partition(|&i| slot_of(&keys[i]) < slot);
        let got = cluster.split(keys.iter().map(Vec::as_slice)).expect("every owner is known");
        let remote = Remote { node: "n0".into(), address: "10.0.0.1:5".into(), rows: high };
        assert_eq!(got, Split { local: low, remote: vec![remote] });
        // An owner with no registration has no address to forward to: refused as a check is.
        let registered = std::mem::take(&mut *cluster.nodes.write());
        assert!(matches!(cluster.split([key.as_slice()]), Err(NotServed::NotOwner(_))));
        *cluster.nodes.write() = registered;
        assert_eq!(
            *d,
            pb::SlotNotOwned {
                slot: u32::from(slot),
                owner: "n0".into(),
                owner_addr: "10.0.0.1:5".into(),
                epoch: 2,
                map_revision: 10
            }
        );
        // An older revision never replaces a newer map; a newer one does.
        let (v, _) = split("n1", 0);
        cluster.take(b"/quiver/c/map", Some((&v, 9)), &mut BTreeMap::new(), &mut BTreeMap::new());
        assert!(cluster.check(&cluster.map(), &key).is_err());
        cluster.take(b"/quiver/c/map", Some((&v, 11)), &mut BTreeMap::new(), &mut BTreeMap::new());
        assert_eq!(cluster.check(&cluster.map(), &key), Ok(()));
        // An invalid map, or a deleted one, leaves the last valid map in place.
        cluster.take(b"/quiver/c/map", Some((b"{}", 12)), &mut BTreeMap::new(), &mut BTreeMap::new());
        cluster.take(b"/quiver/c/map", None, &mut BTreeMap::new(), &mut BTreeMap::new());
        assert_eq!(cluster.map().revision(), 11);
        // Keys of other clusters are not taken.
        let (v, _) = split("n0", 0);
        cluster.take(b"/quiver/other/map", Some((&v, 20)), &mut BTreeMap::new(), &mut BTreeMap::new());
        assert_eq!(cluster.map().revision(), 11);
    }

    #[test]
    fn moves_are_checked_switched_and_fence_writes() {
        let run = |first, last, owner: &str, epoch| Run { first, last, owner: owner.into(), epoch };
        let runs = vec![run(0, 99, "a", 1), run(100, SLOTS - 1, "b", 3)];
        let mv = |first, last, from: &str, to: &str| Move {
            first,
            last,
            from: from.into(),
            to: to.into(),
            state: MoveState::Copying,
        };
        let bad = [
            (vec![mv(90, 110, "a", "c")], "not owned by its source"),
            (vec![mv(0, 10, "a", "a")], "to itself"),
            (vec![mv(0, 10, "a", "c"), mv(5, 20, "a", "d")], "overlaps"),
            (vec![mv(20, 30, "a", "c"), mv(0, 10, "a", "d")], "out of order"),
            (vec![mv(10, 5, "a", "c")], "out of order"),
            (vec![mv(0, 10, "a", "c/d")], "not allowed"),
        ];
        for (moves, want) in bad {
            let err = SlotMap::with_moves(1, runs.clone(), moves.clone()).expect_err("refused");
            assert!(err.contains(want), "{moves:?}: {err}");
        }
        let map = SlotMap::with_moves(1, runs.clone(), vec![mv(10, 19, "a", "c"), mv(100, 200, "b", "a")])
            .expect("valid moves");
        assert_eq!(map.move_of(15).map(|m| m.to.as_str()), Some("c"));
        assert!(map.move_of(20).is_none());
        // A switch gives the slots to the target at the next epoch, splitting runs as needed
        // and merging neighbours of one owner and epoch.
        assert_eq!(
            map.runs_switched(10, 19, "c"),
            vec![run(0, 9, "a", 1), run(10, 19, "c", 2), run(20, 99, "a", 1), run(100, SLOTS - 1, "b", 3)]
        );
        assert_eq!(map.runs_switched(0, 99, "b"), vec![run(0, 99, "b", 2), run(100, SLOTS - 1, "b", 3)]);
        let back = SlotMap::from_runs(2, vec![run(0, 9, "a", 2), run(10, 19, "a", 2), run(20, SLOTS - 1, "b", 1)])
            .expect("valid");
        assert_eq!(back.runs_switched(20, SLOTS - 1, "a"), vec![run(0, SLOTS - 1, "a", 2)]);
        // Stored maps from before moves read as maps with none.
        let old = br#"{"runs":[{"first":0,"last":4095,"owner":"a","epoch":1}]}"#;
        assert!(SlotMap::parse(old, 3).expect("an old map").moves().is_empty());

        // A fenced move refuses writes of its slots at its source; a copying one does not.
        let cfg = ShardConfig {
            node: "a".into(),
            cluster: "c".into(),
            etcd: vec!["http://127.0.0.1:1".into()],
            advertise: "127.0.0.1:7".into(),
            region: 0,
            forward: true,
            instance: String::new(),
        };
        let cluster = Cluster::new(cfg).expect("valid");
        let key = (0..)
            .map(|i| quiver_storage::encode_entity_key(&[quiver_storage::KeyPart::Str(&format!("u{i}"))]))
            .find(|k| slot_of(k) < 100)
            .expect("a key of a's slots");
        let slot = slot_of(&key);
        let stored = |state| {
            let m = Move { first: slot, last: slot, from: "a".into(), to: "c".into(), state };
            serde_json::to_vec(&StoredMap { runs: runs.clone(), moves: vec![m] }).expect("encodes")
        };
        cluster.take(
            b"/quiver/c/map",
            Some((&stored(MoveState::Copying), 5)),
            &mut BTreeMap::new(),
            &mut BTreeMap::new(),
        );
        assert!(cluster.write_guard([key.as_slice()]).is_ok());
        cluster.take(
            b"/quiver/c/map",
            Some((&stored(MoveState::Fenced), 6)),
            &mut BTreeMap::new(),
            &mut BTreeMap::new(),
        );
        let refused = cluster.write_guard([key.as_slice()]).map(|_| ()).expect_err("fenced");
        assert_eq!(refused, NotServed::Fenced { slot, to: "c".into() });
        // Reads still pass the ownership check; the fence waits for no one here, and for a
        // write in flight until it commits.
        assert_eq!(cluster.check(&cluster.map(), &key), Ok(()));
        assert!(cluster.drain_writes(Duration::from_millis(10)));
        let other = (0..)
            .map(|i| quiver_storage::encode_entity_key(&[quiver_storage::KeyPart::Str(&format!("v{i}"))]))
            .find(|k| slot_of(k) < 100 && slot_of(k) != slot)
            .expect("another key of a's slots");
        let in_flight = cluster.write_guard([other.as_slice()]).expect("not fenced");
        assert!(!cluster.drain_writes(Duration::from_millis(10)), "a write in flight holds the fence off");
        drop(in_flight);
        assert!(cluster.drain_writes(Duration::from_millis(10)));
    }

    #[test]
    fn a_rebalance_evens_the_slots_out_moving_as_little_as_it_can() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let map = SlotMap::from_runs(1, SlotMap::spread(&ids(&["a", "b"]))).expect("valid");
        // A third node joins: a third of each run's end goes to it.
        let plan = plan_rebalance(&map, &ids(&["a", "b", "c"])).expect("a plan");
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for r in map.runs() {
            *counts.entry(r.owner.clone()).or_default() += usize::from(r.last - r.first) + 1;
        }
        for m in &plan {
            assert!((m.first..=m.last).all(|s| map.run(s).is_some_and(|r| r.owner == m.from)), "{m:?}");
            let n = usize::from(m.last - m.first) + 1;
            *counts.get_mut(&m.from).expect("a donor") -= n;
            *counts.entry(m.to.clone()).or_default() += n;
        }
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), [1366, 1365, 1365], "{plan:?}");
        assert!(plan.iter().all(|m| m.to == "c"), "{plan:?}");
        assert_eq!(plan.iter().map(|m| usize::from(m.last - m.first) + 1).sum::<usize>(), 1365, "{plan:?}");
        // An even map needs nothing; an owner that is not live, or a move under way, refuses.
        let even = SlotMap::from_runs(1, SlotMap::spread(&ids(&["a", "b", "c"]))).expect("valid");
        assert_eq!(plan_rebalance(&even, &ids(&["a", "b", "c"])), Ok(vec![]));
        assert!(plan_rebalance(&even, &ids(&["a", "b"])).expect_err("c is gone").contains("not registered"));
        let mv = Move { first: 0, last: 0, from: "a".into(), to: "b".into(), state: MoveState::Copying };
        let moving = SlotMap::with_moves(2, even.runs().to_vec(), vec![mv]).expect("valid");
        assert!(plan_rebalance(&moving, &ids(&["a", "b", "c"])).expect_err("a move").contains("moving"));
        // Many nodes, one holding everything: every move is of one owner's run, and the result
        // is even.
        let one = SlotMap::from_runs(1, SlotMap::spread(&ids(&["a"]))).expect("valid");
        let all = ids(&["a", "b", "c", "d", "e", "f", "g"]);
        let plan = plan_rebalance(&one, &all).expect("a plan");
        let moved: usize = plan.iter().map(|m| usize::from(m.last - m.first) + 1).sum();
        assert_eq!(moved, usize::from(SLOTS) - (usize::from(SLOTS) / 7 + 1));
        let mut counts: BTreeMap<&str, usize> = all.iter().map(|n| (n.as_str(), 0)).collect();
        *counts.get_mut("a").expect("a") = usize::from(SLOTS);
        for m in &plan {
            assert!((m.first..=m.last).all(|s| one.run(s).is_some_and(|r| r.owner == m.from)), "{m:?}");
            let n = usize::from(m.last - m.first) + 1;
            *counts.get_mut(m.from.as_str()).expect("a donor") -= n;
            *counts.get_mut(m.to.as_str()).expect("a node") += n;
        }
        let (lo, hi) = (counts.values().min().copied(), counts.values().max().copied());
        assert_eq!((lo, hi), (Some(usize::from(SLOTS) / 7), Some(usize::from(SLOTS) / 7 + 1)), "{counts:?}");
    }

    #[test]
    fn a_removal_gives_every_slot_of_the_leaving_node_to_the_others_evenly() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let map = SlotMap::from_runs(1, SlotMap::spread(&ids(&["a", "b", "c"]))).expect("valid");
        // With the leaving node among the live ones or not: the same plan.
        let plan = plan_removal(&map, &ids(&["a", "b", "c"]), "b").expect("a plan");
        assert_eq!(plan_removal(&map, &ids(&["a", "c"]), "b").expect("a plan"), plan);
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for r in map.runs() {
            *counts.entry(r.owner.clone()).or_default() += usize::from(r.last - r.first) + 1;
        }
        for m in &plan {
            assert_eq!(m.from, "b", "{m:?}");
            assert!((m.first..=m.last).all(|s| map.run(s).is_some_and(|r| r.owner == "b")), "{m:?}");
            let n = usize::from(m.last - m.first) + 1;
            *counts.get_mut("b").expect("b") -= n;
            *counts.get_mut(&m.to).expect("a live node") += n;
        }
        assert_eq!(counts["b"], 0, "{plan:?}");
        assert_eq!((counts["a"], counts["c"]), (usize::from(SLOTS) / 2, usize::from(SLOTS) / 2), "{plan:?}");
        // An uneven map: only the leaving node's slots move, to the node owning fewest.
        let uneven = SlotMap::from_runs(1, SlotMap::spread(&ids(&["a", "b"]))).expect("valid");
        let plan = plan_removal(&uneven, &ids(&["a", "b", "c"]), "b").expect("a plan");
        assert!(plan.iter().all(|m| m.from == "b" && m.to == "c"), "{plan:?}");
        assert_eq!(plan.iter().map(|m| usize::from(m.last - m.first) + 1).sum::<usize>(), 2048, "{plan:?}");
        // A node owning nothing leaves with no move; the last node cannot leave.
        let two = SlotMap::from_runs(1, SlotMap::spread(&ids(&["a", "c"]))).expect("valid");
        assert_eq!(plan_removal(&two, &ids(&["a", "b", "c"]), "b"), Ok(vec![]));
        let one = SlotMap::from_runs(1, SlotMap::spread(&ids(&["a"]))).expect("valid");
        assert!(plan_removal(&one, &ids(&["a"]), "a").expect_err("alone").contains("only node"));
    }

    #[test]
    fn names_are_checked() {
        for ok in ["a", "node-1", "n_2.x", &"x".repeat(NAME_BYTES_MAX)] {
            assert_eq!(check_name("id", ok), Ok(()));
        }
        for bad in ["", "a/b", "a b", "é", &"x".repeat(NAME_BYTES_MAX + 1)] {
            assert!(check_name("id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_data_directory_keeps_one_instance_id_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let id = instance_id(dir.path()).expect("made");
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        assert_eq!(instance_id(dir.path()).expect("read"), id, "the same directory keeps its id");
        let other = tempfile::tempdir().expect("temp dir");
        assert_ne!(instance_id(other.path()).expect("made"), id, "another directory gets another id");
        std::fs::write(dir.path().join(INSTANCE_FILE), "not hex\n").expect("write");
        let e = instance_id(dir.path()).expect_err("damaged");
        assert!(e.contains("not an instance id"), "{e}");
    }
}
