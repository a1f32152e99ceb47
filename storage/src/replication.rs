//! The rule that applies a replicated cell version (`REPLICATION.md` §3), kept apart from the
//! engine so it can be checked on its own: a compare-and-swap of the incoming version's vector
//! against the vector of the cell's current winner.
//!
//! Invariants (checked by the model test below over random schedules of three regions):
//! - Convergence: replicas that applied the same versions, in any order and any number of times,
//!   hold the same winner `(stamp, region, value, vector)` for every cell.
//! - Nothing acknowledged is lost: each version's vector is at or below the final winner's.
//! - No rollback: a replica's winning vector for a cell only grows.
//! - The winner is the greatest `(stamp, region)` among all versions of the cell.

use crate::types::{Causality, RegionId, SystemTime, VersionVector};

/// A version of one cell as the rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct Stamped<'a> {
    /// Its system time.
    pub system_time: SystemTime,
    /// The region it was written in.
    pub region: RegionId,
    /// Its version vector.
    pub vector: &'a VersionVector,
}

impl Stamped<'_> {
    fn rank(&self) -> (SystemTime, RegionId) {
        (self.system_time, self.region)
    }
}

/// What to do with an incoming replicated version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Nothing: the version is a duplicate, or the cell already holds a version that came
    /// after it.
    Drop,
    /// Insert it as it is: it came after the current winner (or the cell has none).
    Apply,
    /// The two are concurrent: insert the incoming version; the winner (the greater
    /// `(system time, region)`) takes the merged vector, and a conflict is counted.
    Conflict {
        /// True if the incoming version wins.
        incoming_wins: bool,
        /// The winner's vector from now on.
        merged: VersionVector,
    },
}

/// Decides how `incoming` applies to a cell whose winner is `current`.
pub fn resolve(current: Option<Stamped<'_>>, incoming: Stamped<'_>) -> Resolution {
    let Some(current) = current else { return Resolution::Apply };
    match incoming.vector.compare(current.vector) {
        Causality::Equal | Causality::Before => Resolution::Drop,
        Causality::After => Resolution::Apply,
        Causality::Concurrent => Resolution::Conflict {
            incoming_wins: incoming.rank() > current.rank(),
            merged: incoming.vector.merge(current.vector),
        },
    }
}

/// The region a version was written in, from its vector and stamp: a version written at
/// region `r` with stamp `t` carries `r: t`, and every other entry is below `t` (the clock
/// that issued `t` had observed them), until a concurrent loser's entry is merged in; a loser's
/// stamp is at most the winner's, and on a tie the greater region wins. So: the greatest
/// region whose entry equals the stamp.
pub fn origin(vector: &VersionVector, system_time: SystemTime) -> Option<RegionId> {
    vector.entries().iter().rev().find(|&&(_, c)| c == system_time.0).map(|&(r, _)| r)
}

/// [`origin`], or for a vector that breaks its rule (one written through
/// `WriteBatch::put_with_version`) the region of its greatest entry, ties to the greater
/// region, and 0 for an empty vector: the same answer on every node.
pub fn origin_or_guess(vector: &VersionVector, system_time: SystemTime) -> RegionId {
    origin(vector, system_time)
        .or_else(|| vector.entries().iter().max_by_key(|&&(r, c)| (c, r)).map(|&(r, _)| r))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn vv(entries: &[(RegionId, u64)]) -> VersionVector {
        VersionVector::from_entries(entries.to_vec()).expect("vector")
    }

    #[test]
    fn the_four_cases() {
        let (a, b) = (vv(&[(0, 10)]), vv(&[(0, 10), (1, 12)]));
        fn s(t: u64, r: RegionId, v: &VersionVector) -> Stamped<'_> {
            Stamped { system_time: SystemTime(t), region: r, vector: v }
        }
        let c = vv(&[(0, 10)]);
        assert_eq!(resolve(None, s(10, 0, &a)), Resolution::Apply);
        assert_eq!(resolve(Some(s(10, 0, &a)), s(10, 0, &c)), Resolution::Drop, "equal: a duplicate");
        assert_eq!(resolve(Some(s(12, 1, &b)), s(10, 0, &a)), Resolution::Drop, "dominated");
        assert_eq!(resolve(Some(s(10, 0, &a)), s(12, 1, &b)), Resolution::Apply, "dominates");
        let d = vv(&[(2, 11)]);
        assert_eq!(
            resolve(Some(s(12, 1, &b)), s(11, 2, &d)),
            Resolution::Conflict { incoming_wins: false, merged: vv(&[(0, 10), (1, 12), (2, 11)]) }
        );
        // Equal stamps: the greater region wins.
        let (e, f) = (vv(&[(1, 20)]), vv(&[(2, 20)]));
        assert_eq!(
            resolve(Some(s(20, 1, &e)), s(20, 2, &f)),
            Resolution::Conflict { incoming_wins: true, merged: vv(&[(1, 20), (2, 20)]) }
        );
        assert_eq!(origin(&vv(&[(1, 20), (2, 20)]), SystemTime(20)), Some(2));
        assert_eq!(origin(&vv(&[(0, 10), (1, 12)]), SystemTime(12)), Some(1));
    }

    proptest! {
        #[test]
        fn compare_and_merge_are_a_partial_order_and_its_join(
            a in prop::collection::btree_map(0u32..4, 0u64..4, 0..4),
            b in prop::collection::btree_map(0u32..4, 0u64..4, 0..4),
            c in prop::collection::btree_map(0u32..4, 0u64..4, 0..4),
        ) {
            let to = |m: &BTreeMap<u32, u64>| vv(&m.iter().map(|(&r, &c)| (r, c)).collect::<Vec<_>>());
            let (a, b, c) = (to(&a), to(&b), to(&c));
            let le = |x: &VersionVector, y: &VersionVector| matches!(x.compare(y), Causality::Equal | Causality::Before);
            // The order is the entry-wise one, and compare is antisymmetric.
            let entrywise = (0..4).all(|r| a.get(r) <= b.get(r));
            prop_assert_eq!(le(&a, &b), entrywise);
            let flipped = match a.compare(&b) {
                Causality::Before => Causality::After,
                Causality::After => Causality::Before,
                x => x,
            };
            prop_assert_eq!(b.compare(&a), flipped);
            // merge is the least upper bound: above both, below any common upper bound, and
            // commutative, associative and idempotent.
            let m = a.merge(&b);
            prop_assert!(le(&a, &m) && le(&b, &m));
            if le(&a, &c) && le(&b, &c) {
                prop_assert!(le(&m, &c));
            }
            prop_assert_eq!(m.clone(), b.merge(&a));
            prop_assert_eq!(m.merge(&c), a.merge(&b.merge(&c)));
            prop_assert_eq!(a.merge(&a), a.clone());
            prop_assert!(m.len() <= a.len() + b.len());
        }
    }

    /// A version in the model: value, stamp, region, vector.
    #[derive(Debug, Clone, PartialEq)]
    struct Version {
        value: u64,
        stamp: u64,
        region: RegionId,
        vector: VersionVector,
    }

    /// One region of the model: a hybrid logical clock, a knowledge vector, and per cell the
    /// winning version (the engine keeps losers too; only winners matter to the invariants).
    #[derive(Debug, Default)]
    struct Replica {
        last: u64,
        knowledge: VersionVector,
        cells: BTreeMap<u8, Version>,
    }

    impl Replica {
        fn apply(&mut self, cell: u8, x: &Version) -> Result<(), TestCaseError> {
            self.last = self.last.max(x.stamp);
            self.knowledge = self.knowledge.merge(&x.vector);
            fn st(v: &Version) -> Stamped<'_> {
                Stamped { system_time: SystemTime(v.stamp), region: v.region, vector: &v.vector }
            }
            let current = self.cells.get(&cell);
            let before = current.map(|c| c.vector.clone());
            let next = match resolve(current.map(st), st(x)) {
                Resolution::Drop => return Ok(()),
                Resolution::Apply => x.clone(),
                Resolution::Conflict { incoming_wins, merged } => {
                    let winner = if incoming_wins { x } else { current.expect("a conflict has a current version") };
                    Version { vector: merged, ..winner.clone() }
                }
            };
            if let Some(b) = before {
                prop_assert!(matches!(b.compare(&next.vector), Causality::Before | Causality::Equal), "rollback");
            }
            prop_assert_eq!(origin(&next.vector, SystemTime(next.stamp)), Some(next.region));
            self.cells.insert(cell, next);
            Ok(())
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Region `r` writes `cell`; its wall clock reads `wall`.
        Write { r: usize, cell: u8, wall: u64 },
        /// Region `to` receives the `nth` version written elsewhere (modulo how many exist).
        Deliver { to: usize, nth: usize },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            // Coarse, skewed wall clocks, so equal stamps in two regions happen.
            (0..3usize, 0u8..3, 0u64..6).prop_map(|(r, cell, wall)| Step::Write { r, cell, wall }),
            (0..3usize, any::<usize>()).prop_map(|(to, nth)| Step::Deliver { to, nth }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        #[test]
        fn three_regions_converge_under_any_delivery_order(
            steps in prop::collection::vec(step(), 1..60),
            finale in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let mut replicas: Vec<Replica> = (0..3).map(|_| Replica::default()).collect();
            let mut written: Vec<(usize, u8, Version)> = Vec::new();
            for s in steps {
                match s {
                    Step::Write { r, cell, wall } => {
                        let rep = &mut replicas[r];
                        let stamp = wall.max(rep.last + 1);
                        rep.last = stamp;
                        let vector = rep.knowledge.merge(&VersionVector::single(r as RegionId, stamp));
                        let v = Version { value: written.len() as u64, stamp, region: r as RegionId, vector };
                        // A local write comes after everything its region has seen.
                        if let Some(cur) = rep.cells.get(&cell) {
                            prop_assert_eq!(v.vector.compare(&cur.vector), Causality::After);
                        }
                        rep.apply(cell, &v)?;
                        written.push((r, cell, v));
                    }
                    Step::Deliver { to, nth } => {
                        let others: Vec<_> = written.iter().filter(|w| w.0 != to).collect();
                        if !others.is_empty() {
                            let (_, cell, v) = others[nth % others.len()].clone();
                            replicas[to].apply(cell, &v)?;
                        }
                    }
                }
            }
            // Heal: some redeliveries in random order, then everything everywhere.
            for i in finale {
                if !written.is_empty() {
                    let (_, cell, v) = i.get(&written).clone();
                    for rep in replicas.iter_mut() {
                        rep.apply(cell, &v)?;
                    }
                }
            }
            for (_, cell, v) in &written {
                for rep in replicas.iter_mut() {
                    rep.apply(*cell, v)?;
                }
            }
            prop_assert_eq!(&replicas[0].cells, &replicas[1].cells);
            prop_assert_eq!(&replicas[1].cells, &replicas[2].cells);
            for (_, cell, v) in &written {
                let w = &replicas[0].cells[cell];
                prop_assert!(matches!(v.vector.compare(&w.vector), Causality::Before | Causality::Equal), "lost {v:?}");
                prop_assert!((v.stamp, v.region) <= (w.stamp, w.region));
                prop_assert!(w.vector.len() <= 3);
            }
        }
    }
}
