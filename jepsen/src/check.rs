//! The checker: what must hold of a history and the healed cluster's final state.
//!
//! The documented rule (README "Consistency"; `storage/REPLICATION.md` §1): a cell's winner is
//! its version with the greatest `(system time, region)`; a version's region is the greatest
//! region whose vector entry equals its stamp.
//!
//! CAS (README "Consistency"): a compare-and-swap is checked and applied as one step on its
//! node. Each region CASes its own register (a single chain of versions) and every region CASes
//! one shared cell ([`crate::CAS_SHARED_ENTITY`]), where a local CAS races the versions peers
//! replicate into it. For every CAS, acknowledged in region `r` with the vector `E` it expected
//! and the vector `V` it wrote (`WriteFeaturesResponse.version`, `Outcome::Ok::written`): every
//! version `X` of the cell in `r`'s final state other than the CAS's own (same stamp, origin
//! `r`) with `X.vector <= V` must have `X.vector <= E`. `V` is the node's knowledge at the
//! commit joined with its own stamp, so every version the node held then is `<= V`, and all of
//! those were `<= E` if the cell's winner was `E` at the commit (a winner's vector covers every
//! version of its cell). A version that arrives later is `> V` or concurrent with it (one that
//! is `<= V` is dominated by the winner and dropped), and a version's vector changes only while
//! it is the winner (a conflict merges into it), which no version older than the CAS is again.
//! A peer's version applied between the check and the commit is `<= V` but not `<= E`: the
//! lost update of issue 11.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::history::{Cell, Invoke, Op, Outcome, Seen, Vector};

/// The final state of one region: every cell's versions, newest first.
pub type State = BTreeMap<Cell, Vec<Seen>>;

/// A broken promise.
#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    /// Which check.
    pub check: &'static str,
    /// What was seen.
    pub detail: String,
}

/// What the cell every region CASes saw: the evidence that the race between a local CAS and a
/// peer's replicated version was exercised, and how much of it was checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SharedCas {
    /// Acknowledged CAS writes, per region.
    pub ok: BTreeMap<u32, u64>,
    /// Refused ones (certainly not applied), per region.
    pub failed: BTreeMap<u32, u64>,
    /// Of the refused, those `ABORTED`: the cell's version was no longer the expected one.
    pub aborted: u64,
    /// Indeterminate ones (deadline passed, node down).
    pub info: u64,
    /// Acknowledged ones checked against their region's final state (the rule in the module
    /// docs).
    pub checked: u64,
    /// Acknowledged ones not checked: the server returned no written vector (an older
    /// server), or the region's final state could not be read.
    pub unchecked: u64,
}

impl SharedCas {
    /// Acknowledged, in every region.
    pub fn ok_total(&self) -> u64 {
        self.ok.values().sum()
    }

    /// Refused, in every region.
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }
}

impl std::fmt::Display for SharedCas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per = |m: &BTreeMap<u32, u64>| m.iter().map(|(r, n)| format!("{r}: {n}")).collect::<Vec<_>>().join(", ");
        write!(
            f,
            "shared CAS cell: {} ok (by region {}), {} failed ({} aborted; by region {}), {} indeterminate; \
             {} checked, {} unchecked (no written vector)",
            self.ok_total(),
            per(&self.ok),
            self.failed_total(),
            self.aborted,
            per(&self.failed),
            self.info,
            self.checked,
            self.unchecked
        )
    }
}

/// What the checker found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Broken promises (at most 200).
    pub violations: Vec<Violation>,
    /// The shared CAS cell's operations.
    pub shared_cas: SharedCas,
}

/// Whether `cell` is the one every region CASes.
pub fn is_shared_cas(cell: &Cell) -> bool {
    cell.entity == crate::CAS_SHARED_ENTITY
}

/// The region that wrote a version (see the module docs).
pub fn origin(s: &Seen) -> u32 {
    s.vector.iter().filter(|e| e.1 == s.stamp).map(|e| e.0).max().unwrap_or(0)
}

/// `a <= b` as version vectors.
pub fn dominated(a: &Vector, b: &Vector) -> bool {
    a.iter().all(|(r, c)| b.iter().any(|(r2, c2)| r2 == r && c2 >= c))
}

fn rank(s: &Seen) -> (u64, u32) {
    (s.stamp, origin(s))
}

/// Checks the history and the final states (one per region, after heal and convergence).
pub fn check(ops: &[Op], finals: &BTreeMap<u32, State>, regions: u32) -> Vec<Violation> {
    report(ops, finals, regions).violations
}

/// Counts the shared CAS cell's operations (`checked` and `unchecked` stay 0: [`report`] fills
/// them).
pub fn shared_cas_counts(ops: &[Op]) -> SharedCas {
    let mut c = SharedCas::default();
    for op in ops {
        let Invoke::Cas { cell, .. } = &op.invoke else { continue };
        if !is_shared_cas(cell) {
            continue;
        }
        match &op.outcome {
            Outcome::Ok { .. } => *c.ok.entry(op.region).or_default() += 1,
            Outcome::Fail { error } => {
                *c.failed.entry(op.region).or_default() += 1;
                if error.starts_with("Aborted") {
                    c.aborted += 1;
                }
            }
            Outcome::Info { .. } => c.info += 1,
        }
    }
    c
}

/// Checks the history and the final states (one per region, after heal and convergence), and
/// counts what the shared CAS cell saw.
pub fn report(ops: &[Op], finals: &BTreeMap<u32, State>, regions: u32) -> Report {
    let mut shared_cas = shared_cas_counts(ops);
    let violations = check_inner(ops, finals, regions, &mut shared_cas);
    Report { violations, shared_cas }
}

fn check_inner(ops: &[Op], finals: &BTreeMap<u32, State>, regions: u32, shared: &mut SharedCas) -> Vec<Violation> {
    let mut v = Vec::new();
    let mut bad = |check: &'static str, detail: String| {
        if v.len() < 200 {
            v.push(Violation { check, detail });
        }
    };
    // Convergence: identical winners (value, vector, stamp) everywhere.
    let winners = |s: &State| -> BTreeMap<Cell, Seen> {
        s.iter().filter_map(|(c, vs)| vs.first().map(|w| (*c, w.clone()))).collect()
    };
    let mut first: Option<(u32, BTreeMap<Cell, Seen>)> = None;
    for (&r, s) in finals {
        let w = winners(s);
        match &first {
            None => first = Some((r, w)),
            Some((r0, w0)) => {
                for c in w0.keys().chain(w.keys()).collect::<BTreeSet<_>>() {
                    if w0.get(c) != w.get(c) {
                        bad(
                            "convergence",
                            format!("cell {c:?}: region {r0} has {:?}, region {r} has {:?}", w0.get(c), w.get(c)),
                        );
                    }
                }
            }
        }
    }
    // Vector size.
    for (r, s) in finals {
        for (c, vs) in s {
            for x in vs {
                if x.vector.len() > regions as usize {
                    bad("vector size", format!("region {r} cell {c:?}: {:?}", x.vector));
                }
            }
        }
    }
    for op in ops {
        if let Outcome::Ok { read: Some(s), .. } = &op.outcome {
            if s.vector.len() > regions as usize {
                bad("vector size", format!("op {} read {:?}", op.id, s.vector));
            }
        }
    }
    let Some((_, final_winners)) = first else { return v };
    // No acknowledged write lost: present at its origin, and the final winner is it or beats it.
    for op in ops {
        let (cell, value) = match &op.invoke {
            Invoke::Write { cell, value } | Invoke::Cas { cell, value, .. } => (*cell, *value),
            Invoke::Read { .. } => continue,
        };
        let Outcome::Ok { stamp: Some(stamp), .. } = op.outcome else { continue };
        let mine = (stamp, op.region);
        match final_winners.get(&cell) {
            None => bad("lost write", format!("op {} wrote {value} to {cell:?}; the cell is empty", op.id)),
            Some(w) if rank(w) < mine => bad(
                "lost write",
                format!("op {} wrote {value} at {mine:?} to {cell:?}; winner {w:?} ranks lower", op.id),
            ),
            Some(w) if rank(w) == mine && w.value != Some(value) => {
                bad("lost write", format!("op {} wrote {value} at {mine:?} to {cell:?}; winner {w:?}", op.id))
            }
            _ => {}
        }
        let kept = finals.get(&op.region).and_then(|s| s.get(&cell)).is_some_and(|vs| {
            vs.iter().any(|x| x.stamp == stamp && x.value == Some(value))
                || vs.iter().any(|x| x.stamp == stamp && origin(x) > op.region)
        });
        if !kept {
            bad("lost write", format!("op {} ({value} at {stamp} to {cell:?}) is missing from its region", op.id));
        }
    }
    // Applied once: every write of the workload writes a value of its own, so no cell holds a
    // value in two versions (a write applied twice, as a slot move could: once before the
    // fence and again after it). The bulk cells are left out: each pass of the lagging fault
    // writes the same round numbers.
    for (r, s) in finals {
        for (c, vs) in s {
            if crate::BULK_ENTITIES.contains(&c.entity) {
                continue;
            }
            let mut stamps: BTreeMap<i64, u64> = BTreeMap::new();
            for x in vs {
                let Some(value) = x.value else { continue };
                if let Some(first) = stamps.insert(value, x.stamp) {
                    bad(
                        "applied twice",
                        format!("region {r} cell {c:?}: value {value} is in versions stamped {first} and {}", x.stamp),
                    );
                }
            }
        }
    }
    // Per region: no rollback, read-your-writes.
    let mut reads: BTreeMap<(u32, Cell), Vec<&Op>> = BTreeMap::new();
    let mut writes: BTreeMap<(u32, Cell), Vec<(&Op, u64)>> = BTreeMap::new();
    for op in ops {
        match (&op.invoke, &op.outcome) {
            (Invoke::Read { cell }, Outcome::Ok { .. }) => reads.entry((op.region, *cell)).or_default().push(op),
            (Invoke::Write { cell, .. } | Invoke::Cas { cell, .. }, Outcome::Ok { stamp: Some(s), .. }) => {
                writes.entry((op.region, *cell)).or_default().push((op, *s))
            }
            _ => {}
        }
    }
    let seen = |op: &Op| match &op.outcome {
        Outcome::Ok { read, .. } => read.clone(),
        _ => None,
    };
    for ((region, cell), rs) in &reads {
        for a in rs {
            for b in rs {
                if a.completed_us < b.invoked_us {
                    match (seen(a), seen(b)) {
                        (Some(x), Some(y)) if !dominated(&x.vector, &y.vector) => bad(
                            "rollback",
                            format!(
                                "region {region} cell {cell:?}: op {} saw {x:?}, later op {} saw {y:?}",
                                a.id, b.id
                            ),
                        ),
                        (Some(x), None) => bad(
                            "rollback",
                            format!(
                                "region {region} cell {cell:?}: op {} saw {x:?}, later op {} saw nothing",
                                a.id, b.id
                            ),
                        ),
                        _ => {}
                    }
                }
            }
        }
        for (w, stamp) in writes.get(&(*region, *cell)).map(Vec::as_slice).unwrap_or(&[]) {
            for b in rs {
                if w.completed_us < b.invoked_us {
                    let ok = seen(b).is_some_and(|y| rank(&y) >= (*stamp, *region));
                    if !ok {
                        bad(
                            "read your writes",
                            format!(
                                "region {region} cell {cell:?}: op {} wrote at {stamp}, later op {} saw {:?}",
                                w.id,
                                b.id,
                                seen(b)
                            ),
                        );
                    }
                }
            }
        }
    }
    // CAS, every CAS cell: applied over exactly the version it expected, on its own node (the
    // module docs).
    for op in ops {
        let Invoke::Cas { cell, expected, value } = &op.invoke else { continue };
        let Outcome::Ok { stamp: Some(stamp), written, .. } = &op.outcome else { continue };
        let (Some(w), Some(state)) = (written.as_ref().filter(|w| !w.is_empty()), finals.get(&op.region)) else {
            if is_shared_cas(cell) {
                shared.unchecked += 1;
            }
            continue;
        };
        if is_shared_cas(cell) {
            shared.checked += 1;
        }
        let (id, region, stamp) = (op.id, op.region, *stamp);
        if !w.contains(&(region, stamp)) || !dominated(expected, w) {
            bad(
                "cas",
                format!(
                    "op {id} ({value} to {cell:?} in region {region} at {stamp}) returned the vector {w:?}: it must \
                     carry ({region}, {stamp}) and cover the expected {expected:?}"
                ),
            );
        }
        let versions = state.get(cell).map(Vec::as_slice).unwrap_or(&[]);
        // A CAS that expects nothing also succeeds over a tombstone (the workload writes none):
        // the versions a tombstone present at the commit covers are allowed too.
        let under_tombstone = |x: &Seen| {
            expected.is_empty()
                && versions
                    .iter()
                    .any(|t| t.value.is_none() && dominated(&t.vector, w) && dominated(&x.vector, &t.vector))
        };
        for x in versions {
            if x.stamp == stamp && origin(x) == region {
                if !dominated(w, &x.vector) {
                    bad("cas", format!("op {id} wrote {w:?} to {cell:?} but its version in region {region} is {x:?}"));
                }
                continue;
            }
            if dominated(&x.vector, w) && !dominated(&x.vector, expected) && !under_tombstone(x) {
                bad(
                    "cas",
                    format!(
                        "op {id} expected {expected:?} but was applied over {x:?} (cell {cell:?}, region {region}, \
                         wrote {value} at {stamp} with {w:?})"
                    ),
                );
            }
        }
    }
    // CAS: each region's CAS register is a cell only its CAS writes; every version in it was
    // written by an operation that expected the version right before it. The shared cell holds
    // concurrent versions of several regions (no single chain): every version in it must be
    // some CAS's value and no refused one's. In both, real-time order among a region's
    // acknowledged CAS writes is stamp order.
    let mut cas_cells: BTreeMap<Cell, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        if let Invoke::Cas { cell, .. } = &op.invoke {
            cas_cells.entry(*cell).or_default().push(op);
        }
    }
    for (cell, cops) in &cas_cells {
        let by_value: BTreeMap<i64, &Op> = cops
            .iter()
            .filter_map(|o| match &o.invoke {
                Invoke::Cas { value, .. } => Some((*value, *o)),
                _ => None,
            })
            .collect();
        let failed_there = |o: &Op, value: i64| {
            matches!(o.outcome, Outcome::Fail { .. })
                .then(|| format!("cell {cell:?}: op {} failed but its value {value} is there", o.id))
        };
        if is_shared_cas(cell) {
            let values: BTreeSet<i64> =
                finals.values().filter_map(|s| s.get(cell)).flatten().filter_map(|x| x.value).collect();
            for value in values {
                match by_value.get(&value) {
                    None => bad("cas", format!("cell {cell:?}: version {value} was written by no CAS operation")),
                    Some(o) => {
                        if let Some(d) = failed_there(o, value) {
                            bad("cas", d);
                        }
                    }
                }
            }
        } else if let Some(versions) = finals.get(&cops.first().map_or(0, |o| o.region)).and_then(|s| s.get(cell)) {
            let mut chain: Vec<&Seen> = versions.iter().collect();
            chain.sort_by_key(|s| s.stamp);
            let mut prev: Vector = Vec::new();
            for s in chain {
                let Some(value) = s.value else { continue };
                match by_value.get(&value).map(|o| &o.invoke) {
                    Some(Invoke::Cas { expected, .. }) if *expected == prev => {}
                    Some(Invoke::Cas { expected, .. }) => bad(
                        "cas",
                        format!("cell {cell:?}: {value} expected {expected:?} but was written over {prev:?}"),
                    ),
                    _ => bad("cas", format!("cell {cell:?}: version {value} was written by no CAS operation")),
                }
                if let Some(d) = by_value.get(&value).and_then(|o| failed_there(o, value)) {
                    bad("cas", d);
                }
                prev = s.vector.clone();
            }
        }
        let acked: Vec<(&Op, u64)> = cops
            .iter()
            .filter_map(|o| match o.outcome {
                Outcome::Ok { stamp: Some(s), .. } => Some((*o, s)),
                _ => None,
            })
            .collect();
        for (a, sa) in &acked {
            for (b, sb) in &acked {
                if a.region == b.region && a.completed_us < b.invoked_us && sa >= sb {
                    bad(
                        "cas",
                        format!("cell {cell:?}: op {} finished before op {} began but is not older", a.id, b.id),
                    );
                }
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Invoke;

    fn seen(value: i64, stamp: u64, vector: Vector) -> Seen {
        Seen { value: Some(value), stamp, vector }
    }

    fn op(id: u64, region: u32, invoke: Invoke, t: (u64, u64), outcome: Outcome) -> Op {
        Op { id, region, client: 0, invoke, invoked_us: t.0, completed_us: t.1, outcome }
    }

    #[test]
    fn the_checker_catches_each_kind_of_violation() {
        let cell = Cell { entity: 1, slot: 0 };
        let w1 = seen(10, 100, vec![(1, 100)]);
        let w2 = seen(20, 200, vec![(1, 100), (2, 200)]);
        let state = |vs: Vec<Seen>| -> State { [(cell, vs)].into_iter().collect() };
        let write = |id, region, value, stamp| {
            op(
                id,
                region,
                Invoke::Write { cell, value },
                (0, 1),
                Outcome::Ok { stamp: Some(stamp), read: None, written: None },
            )
        };
        let read = |id, region, t, s: Option<Seen>| {
            op(id, region, Invoke::Read { cell }, t, Outcome::Ok { stamp: None, read: s, written: None })
        };
        // A good history.
        let ops = vec![write(0, 1, 10, 100), write(1, 2, 20, 200), read(2, 1, (5, 6), Some(w1.clone()))];
        let finals: BTreeMap<u32, State> =
            [(1, state(vec![w2.clone(), w1.clone()])), (2, state(vec![w2.clone(), w1.clone()]))].into_iter().collect();
        assert!(check(&ops, &finals, 2).is_empty(), "{:?}", check(&ops, &finals, 2));
        // Divergence.
        let diverged: BTreeMap<u32, State> =
            [(1, state(vec![w2.clone(), w1.clone()])), (2, state(vec![w1.clone()]))].into_iter().collect();
        assert!(check(&ops, &diverged, 2).iter().any(|v| v.check == "convergence"));
        // A lost write: the winner ranks below an acknowledged write.
        let lost = vec![write(0, 1, 10, 100), write(1, 2, 30, 300)];
        assert!(check(&lost, &finals, 2).iter().any(|v| v.check == "lost write"));
        // A rollback and a stale read after one's own write.
        let rolled =
            vec![write(0, 1, 10, 100), read(1, 1, (5, 6), Some(w2.clone())), read(2, 1, (7, 8), Some(w1.clone()))];
        assert!(check(&rolled, &finals, 2).iter().any(|v| v.check == "rollback"));
        let stale = vec![write(0, 2, 20, 200), read(1, 2, (5, 6), Some(w1.clone()))];
        assert!(check(&stale, &finals, 2).iter().any(|v| v.check == "read your writes"));
        // CAS: a version written over one its operation did not expect.
        let cas = |id, value, expected: Vector| {
            op(
                id,
                1,
                Invoke::Cas { cell, expected, value },
                (0, 1),
                Outcome::Ok { stamp: None, read: None, written: None },
            )
        };
        let good_cas = vec![cas(0, 10, vec![]), cas(1, 20, vec![(1, 100)])];
        assert!(check(&good_cas, &finals, 2).is_empty());
        let lost_update = vec![cas(0, 10, vec![]), cas(1, 20, vec![])];
        assert!(check(&lost_update, &finals, 2).iter().any(|v| v.check == "cas"));
        // Vector size.
        assert!(check(&ops, &finals, 1).iter().any(|v| v.check == "vector size"));
        // A write applied twice: its value in two versions of its cell.
        let again = seen(20, 250, vec![(1, 100), (2, 250)]);
        let twice: BTreeMap<u32, State> =
            [(1, state(vec![again.clone(), w2.clone(), w1.clone()])), (2, state(vec![again, w2.clone(), w1.clone()]))]
                .into_iter()
                .collect();
        assert!(check(&ops, &twice, 2).iter().any(|v| v.check == "applied twice"), "{:?}", check(&ops, &twice, 2));
    }

    /// The shared cell's history in two regions: A (region 1, over nothing), B (region 2, over
    /// A), then C (region 1, stamp 300) and D (region 2, stamp 250) concurrently over B. C wins
    /// the conflict and carries the merge of both vectors everywhere. `c_expected` is what C
    /// expected.
    fn shared_history(c_expected: Vector) -> (Vec<Op>, BTreeMap<u32, State>) {
        let cell = Cell { entity: crate::CAS_SHARED_ENTITY, slot: 0 };
        let cas = |id, region, value, expected: Vector, t, stamp, written: Vector| {
            let outcome = Outcome::Ok { stamp: Some(stamp), read: None, written: Some(written) };
            op(id, region, Invoke::Cas { cell, expected, value }, t, outcome)
        };
        let ops = vec![
            cas(0, 1, 10, vec![], (0, 10), 100, vec![(1, 100)]),
            cas(1, 2, 20, vec![(1, 100)], (20, 30), 200, vec![(1, 100), (2, 200)]),
            cas(2, 1, 30, c_expected, (40, 50), 300, vec![(1, 300), (2, 200)]),
            cas(3, 2, 40, vec![(1, 100), (2, 200)], (40, 50), 250, vec![(1, 100), (2, 250)]),
            // Refused: region 2 expected A while its cell held B.
            op(
                4,
                2,
                Invoke::Cas { cell, expected: vec![(1, 100)], value: 50 },
                (60, 70),
                Outcome::Fail { error: "Aborted: compare-and-swap failed for jepsen:v".into() },
            ),
        ];
        let versions = vec![
            seen(30, 300, vec![(1, 300), (2, 250)]),
            seen(40, 250, vec![(1, 100), (2, 250)]),
            seen(20, 200, vec![(1, 100), (2, 200)]),
            seen(10, 100, vec![(1, 100)]),
        ];
        let state: State = [(cell, versions)].into_iter().collect();
        (ops, [(1, state.clone()), (2, state)].into_iter().collect())
    }

    #[test]
    fn concurrent_cas_on_the_shared_cell_passes() {
        // Region 1 read B before its CAS: C was applied over exactly what it expected. D is a
        // concurrent version C's node received after C (not covered by C's written vector).
        // Neither the per-region chain (C was not written over D) nor real-time order across
        // regions applies to the shared cell.
        let (ops, finals) = shared_history(vec![(1, 100), (2, 200)]);
        let r = report(&ops, &finals, 2);
        assert!(r.violations.is_empty(), "{:#?}", r.violations);
        let expect = SharedCas {
            ok: [(1, 2), (2, 2)].into_iter().collect(),
            failed: [(2, 1)].into_iter().collect(),
            aborted: 1,
            info: 0,
            checked: 4,
            unchecked: 0,
        };
        assert_eq!(r.shared_cas, expect);
        assert!(r.shared_cas.to_string().contains("4 ok (by region 1: 2, 2: 2), 1 failed (1 aborted"));
    }

    #[test]
    fn a_peer_version_slipping_between_check_and_commit_is_a_lost_update() {
        // Region 1 checked C against A, then B was applied before C committed: B is covered by
        // C's written vector but not by what C expected. The same final states as a good run:
        // only the written vector gives it away.
        let (ops, finals) = shared_history(vec![(1, 100)]);
        let v = check(&ops, &finals, 2);
        assert_eq!(v.len(), 1, "{v:#?}");
        assert_eq!(v[0].check, "cas");
        assert!(v[0].detail.starts_with("op 2 expected [(1, 100)] but was applied over"), "{}", v[0].detail);
        assert!(v[0].detail.contains("[(1, 100), (2, 200)]"), "{}", v[0].detail);
        // Without the written vector (an older server) it cannot be told: skipped, and counted.
        let mut old = ops.clone();
        if let Outcome::Ok { written, .. } = &mut old[2].outcome {
            *written = None;
        }
        let r = report(&old, &finals, 2);
        assert!(r.violations.is_empty(), "{:#?}", r.violations);
        assert_eq!((r.shared_cas.checked, r.shared_cas.unchecked), (3, 1));
    }

    #[test]
    fn the_written_vector_must_be_the_writes_own() {
        let (mut ops, finals) = shared_history(vec![(1, 100), (2, 200)]);
        // Not carrying its own stamp, and not covering what it expected.
        if let Outcome::Ok { written, .. } = &mut ops[3].outcome {
            *written = Some(vec![(2, 250)]);
        }
        let v = check(&ops, &finals, 2);
        assert!(v.iter().any(|v| v.check == "cas" && v.detail.contains("returned the vector")), "{v:#?}");
        // The final version of a write is its written vector or a merge above it.
        let (mut ops, finals) = shared_history(vec![(1, 100), (2, 200)]);
        if let Outcome::Ok { written, .. } = &mut ops[3].outcome {
            *written = Some(vec![(1, 100), (2, 250), (3, 7)]);
        }
        let v = check(&ops, &finals, 3);
        assert!(v.iter().any(|v| v.check == "cas" && v.detail.contains("but its version")), "{v:#?}");
        // A refused CAS whose value is there after all.
        let (mut ops, mut finals) = shared_history(vec![(1, 100), (2, 200)]);
        ops[4].outcome = Outcome::Fail { error: "Aborted".into() };
        for s in finals.values_mut() {
            for vs in s.values_mut() {
                vs[0].value = Some(50);
            }
        }
        let v = check(&ops, &finals, 2);
        assert!(v.iter().any(|v| v.check == "cas" && v.detail.contains("failed but its value 50")), "{v:#?}");
    }

    #[test]
    fn histories_without_the_written_vector_still_read() {
        let old = r#"{"id":3,"region":1,"client":0,"invoke":{"f":"cas","cell":{"entity":1001,"slot":0},"expected":[[1,5]],"value":7},"invoked_us":1,"completed_us":2,"outcome":{"type":"ok","stamp":9,"read":null}}"#;
        let op: Op = serde_json::from_str(old).expect("an older history line");
        assert!(matches!(op.outcome, Outcome::Ok { stamp: Some(9), written: None, .. }));
        // Written back the same (no `written` key when there is none).
        assert_eq!(serde_json::to_string(&op).expect("json"), old);
        let new = Outcome::Ok { stamp: Some(9), read: None, written: Some(vec![(1, 9), (2, 4)]) };
        let line = serde_json::to_string(&new).expect("json");
        assert_eq!(line, r#"{"type":"ok","stamp":9,"read":null,"written":[[1,9],[2,4]]}"#);
        assert!(matches!(serde_json::from_str(&line), Ok(Outcome::Ok { written: Some(w), .. }) if w.len() == 2));
    }
}
