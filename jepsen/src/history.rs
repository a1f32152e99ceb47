//! The history: every operation as an invocation and its completion (`ok`, `fail`: certainly
//! not applied, `info`: indeterminate), with times relative to the start of the run.

use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// A version vector as the API returns it: sorted `(region, counter)` pairs.
pub type Vector = Vec<(u32, u64)>;

/// A cell of the workload: entity and event time (one feature).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cell {
    /// Entity id.
    pub entity: u32,
    /// Event time slot (0 is the newest; larger ones are backfill corrections).
    pub slot: u32,
}

/// A cell version as read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// Value (`None`: a tombstone).
    pub value: Option<i64>,
    /// System time stamped by its origin.
    pub stamp: u64,
    /// Its version vector.
    pub vector: Vector,
}

/// What an operation asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "snake_case")]
pub enum Invoke {
    /// A plain write of a unique value.
    Write {
        /// The cell.
        cell: Cell,
        /// The value.
        value: i64,
    },
    /// A compare-and-swap: on the region's own CAS register, or on the cell every region
    /// CASes (`CAS_SHARED_ENTITY`).
    Cas {
        /// The cell.
        cell: Cell,
        /// The version vector the write expects (empty: no version yet).
        expected: Vector,
        /// The value.
        value: i64,
    },
    /// A read of a cell's winner.
    Read {
        /// The cell.
        cell: Cell,
    },
}

/// How an operation ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outcome {
    /// Done: a write's stamp, or what a read saw (`None`: nothing).
    Ok {
        /// The write's system time.
        stamp: Option<u64>,
        /// A read's result.
        read: Option<Seen>,
        /// A CAS write's version vector as its node answered it (`WriteFeaturesResponse.version`:
        /// the vector every cell version of the write carries). `None`: not a CAS, or a server
        /// that does not return it. Left out of the JSON when `None`, so histories without it
        /// read the same.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        written: Option<Vector>,
    },
    /// Certainly not applied.
    Fail {
        /// Why.
        error: String,
    },
    /// Maybe applied.
    Info {
        /// Why it is unknown.
        error: String,
    },
}

/// One completed operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op {
    /// Sequence number in the history.
    pub id: u64,
    /// The region whose node served it.
    pub region: u32,
    /// The client (within its region).
    pub client: u32,
    /// What it asked.
    pub invoke: Invoke,
    /// Microseconds from the start of the run to the invocation.
    pub invoked_us: u64,
    /// Microseconds from the start of the run to the completion.
    pub completed_us: u64,
    /// How it ended.
    pub outcome: Outcome,
}

/// A fault the nemesis injected (and when it was healed).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fault {
    /// What.
    pub name: String,
    /// Microseconds from the start of the run.
    pub start_us: u64,
    /// When it was healed.
    pub end_us: u64,
    /// Operations acknowledged while it held (invoked and completed inside it): what stayed
    /// available under it.
    #[serde(default)]
    pub acknowledged: u64,
}

/// The shared, append-only history.
#[derive(Debug)]
pub struct History {
    start: Instant,
    ops: Mutex<Vec<Op>>,
    faults: Mutex<Vec<Fault>>,
}

impl History {
    /// An empty history starting now.
    pub fn new() -> History {
        History { start: Instant::now(), ops: Mutex::new(Vec::new()), faults: Mutex::new(Vec::new()) }
    }

    /// Microseconds since the start.
    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// Records a completed operation.
    pub fn record(&self, region: u32, client: u32, invoke: Invoke, invoked_us: u64, outcome: Outcome) {
        let completed_us = self.now_us();
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let id = ops.len() as u64;
        ops.push(Op { id, region, client, invoke, invoked_us, completed_us, outcome });
    }

    /// Records a fault.
    pub fn fault(&self, name: String, start_us: u64) {
        let end_us = self.now_us();
        self.faults.lock().unwrap_or_else(|p| p.into_inner()).push(Fault { name, start_us, end_us, acknowledged: 0 });
    }

    /// Every operation so far.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every fault so far.
    pub fn faults(&self) -> Vec<Fault> {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let ops = self.ops();
        for f in &mut faults {
            f.acknowledged = ops
                .iter()
                .filter(|o| matches!(o.outcome, Outcome::Ok { .. }))
                .filter(|o| o.invoked_us >= f.start_us && o.completed_us <= f.end_us)
                .count() as u64;
        }
        faults
    }
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}
