//! Test-only message faults for the pullers. Read only from builds with the server's
//! `testing` feature ([`crate::daemon::test_switch`]).

/// Test-only: when this environment variable holds a seed, pullers disorder what they receive
/// (shuffle and duplicate batches within a message, delay messages, and re-ask for batches
/// already applied), to check that applying stays exact under reordering and redelivery.
pub const CHAOS_ENV: &str = "QUIVER_TEST_REPLICATION_CHAOS";

/// A small deterministic generator for [`CHAOS_ENV`] (xorshift64*).
#[derive(Debug)]
pub(super) struct Chaos(pub(super) u64);

impl Chaos {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
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
