//! The checker: what must hold of a history and the healed cluster's final state.
//!
//! The documented rule (README "Consistency"; `storage/REPLICATION.md` §1): a cell's winner is
//! its version with the greatest `(system time, region)`; a version's region is the greatest
//! region whose vector entry equals its stamp.

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
    // CAS: each region's CAS cell is a register only CAS writes; every version in it was
    // written by an operation that expected the version right before it, and real-time order
    // among acknowledged CAS writes is stamp order.
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
        let region = cops.first().map_or(0, |o| o.region);
        let Some(versions) = finals.get(&region).and_then(|s| s.get(cell)) else { continue };
        let mut chain: Vec<&Seen> = versions.iter().collect();
        chain.sort_by_key(|s| s.stamp);
        let mut prev: Vector = Vec::new();
        for s in chain {
            let Some(value) = s.value else { continue };
            match by_value.get(&value).map(|o| &o.invoke) {
                Some(Invoke::Cas { expected, .. }) if *expected == prev => {}
                Some(Invoke::Cas { expected, .. }) => {
                    bad("cas", format!("cell {cell:?}: {value} expected {expected:?} but was written over {prev:?}"))
                }
                _ => bad("cas", format!("cell {cell:?}: version {value} was written by no CAS operation")),
            }
            if let Some(o) = by_value.get(&value) {
                if matches!(o.outcome, Outcome::Fail { .. }) {
                    bad("cas", format!("cell {cell:?}: op {} failed but its value {value} is there", o.id));
                }
            }
            prev = s.vector.clone();
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
                if a.completed_us < b.invoked_us && sa >= sb {
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
            op(id, region, Invoke::Write { cell, value }, (0, 1), Outcome::Ok { stamp: Some(stamp), read: None })
        };
        let read = |id, region, t, s: Option<Seen>| {
            op(id, region, Invoke::Read { cell }, t, Outcome::Ok { stamp: None, read: s })
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
            op(id, 1, Invoke::Cas { cell, expected, value }, (0, 1), Outcome::Ok { stamp: None, read: None })
        };
        let good_cas = vec![cas(0, 10, vec![]), cas(1, 20, vec![(1, 100)])];
        assert!(check(&good_cas, &finals, 2).is_empty());
        let lost_update = vec![cas(0, 10, vec![]), cas(1, 20, vec![])];
        assert!(check(&lost_update, &finals, 2).iter().any(|v| v.check == "cas"));
        // Vector size.
        assert!(check(&ops, &finals, 1).iter().any(|v| v.check == "vector size"));
    }
}
