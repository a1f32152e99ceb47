//! Test-only message faults for the pullers. Read only from builds with the server's
//! `testing` feature ([`crate::daemon::test_switch`]).

/// Test-only: when this environment variable holds a seed, pullers disorder what they receive
/// (shuffle and duplicate batches within a message, delay messages, and re-ask for batches
/// already applied), to check that applying stays exact under reordering and redelivery.
pub const CHAOS_ENV: &str = "QUIVER_TEST_REPLICATION_CHAOS";

/// The generator behind [`CHAOS_ENV`]: the shared test generator, in builds with `testing`.
#[cfg(feature = "testing")]
#[derive(Debug)]
pub(super) struct Chaos(quiver_testkit::Rng);

/// Without `testing` there is no chaos: the type has no value.
#[cfg(not(feature = "testing"))]
#[derive(Debug)]
pub(super) enum Chaos {}

impl Chaos {
    /// Chaos from `seed`; `None` in builds without `testing` (quiverd refuses the switch there).
    pub(super) fn from_seed(seed: u64) -> Option<Chaos> {
        #[cfg(feature = "testing")]
        return Some(Chaos(quiver_testkit::Rng::new(seed)));
        #[cfg(not(feature = "testing"))]
        {
            let _ = seed;
            None
        }
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        #[cfg(feature = "testing")]
        return self.0.below(n);
        #[cfg(not(feature = "testing"))]
        {
            let _ = n;
            match *self {}
        }
    }

    /// Shuffles and duplicates.
    pub(super) fn disorder<T: Clone>(&mut self, items: &mut Vec<T>) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
        if !items.is_empty() && self.below(4) == 0 {
            let i = self.below(items.len() as u64) as usize;
            let dup = items[i].clone();
            items.push(dup);
        }
    }
}
