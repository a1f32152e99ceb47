//! A puller's reassembly of one Pull stream's chain. Each shipped batch names its predecessor
//! in the stream (`prev_seqno`); batches may arrive reordered or duplicated (a proxy, a
//! retried stream, the test-only chaos), and are applied strictly in chain order, each right
//! after its predecessor, so a batch above a gap is never applied.

use std::collections::BTreeMap;

use quiver_storage::ShippedBatch;

use super::PULL_BATCHES_PER_MESSAGE_MAX;

/// Most batches held while they wait for their predecessor; more are dropped (asked for again
/// by the next stream, which starts from the cursor).
pub const CHAIN_WAITING_MAX: usize = PULL_BATCHES_PER_MESSAGE_MAX * 4;

/// The chain of one stream: the last batch followed (applied or skipped), the cursor (the
/// greatest sequence number applied), and the batches waiting for their predecessor.
#[derive(Debug)]
pub struct Chain {
    tip: u64,
    cursor: u64,
    waiting: BTreeMap<u64, ShippedBatch>,
}

/// What one message made of the chain.
#[derive(Debug, Default)]
pub struct Accepted {
    /// Batches to apply now, in chain order, each above the cursor.
    pub ready: Vec<ShippedBatch>,
    /// Batches at or below what was already followed or applied (redelivered).
    pub redelivered: Vec<ShippedBatch>,
}

impl Chain {
    /// A stream that asked for the batches after `after`, on a node whose cursor is `cursor`
    /// (`after <= cursor`: a stream may ask again for batches already applied).
    pub fn new(after: u64, cursor: u64) -> Chain {
        debug_assert!(after <= cursor, "a pull never starts above the cursor");
        Chain { tip: after, cursor, waiting: BTreeMap::new() }
    }

    /// Takes one message's batches `(prev_seqno, batch)`, in any order.
    pub fn accept(&mut self, arrived: Vec<(u64, ShippedBatch)>) -> Accepted {
        let mut out = Accepted::default();
        for (prev, b) in arrived {
            if b.seqno <= self.tip {
                out.redelivered.push(b);
            } else if self.waiting.len() < CHAIN_WAITING_MAX {
                self.waiting.insert(prev, b);
            }
        }
        while let Some(b) = self.waiting.remove(&self.tip) {
            self.tip = b.seqno;
            if b.seqno > self.cursor {
                self.cursor = b.seqno;
                out.ready.push(b);
            } else {
                out.redelivered.push(b);
            }
        }
        let tip = self.tip;
        self.waiting.retain(|_, b| b.seqno > tip);
        out
    }

    /// The greatest sequence number handed out as ready (or the starting cursor).
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// True if batches wait for a predecessor that has not arrived.
    pub fn has_gap(&self) -> bool {
        !self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_storage::SystemTime;

    fn b(prev: u64, seqno: u64) -> (u64, ShippedBatch) {
        (prev, ShippedBatch { origin: 2, seqno, system_time: SystemTime(seqno), ops: Vec::new() })
    }

    fn seqnos(v: &[ShippedBatch]) -> Vec<u64> {
        v.iter().map(|b| b.seqno).collect()
    }

    #[test]
    fn batches_are_handed_out_in_chain_order_only() {
        // The origin's own batches are 3, 5, 9 (4, 6-8 were replicated ones, not shipped).
        let mut c = Chain::new(0, 0);
        let a = c.accept(vec![b(5, 9), b(3, 5)]);
        assert!(a.ready.is_empty() && c.has_gap(), "nothing before the first link");
        let a = c.accept(vec![b(0, 3)]);
        assert_eq!(seqnos(&a.ready), [3, 5, 9]);
        assert_eq!(c.cursor(), 9);
        assert!(!c.has_gap());
        // Duplicates and old batches are redelivered, never ready again.
        let a = c.accept(vec![b(3, 5), b(9, 12), b(9, 12)]);
        assert_eq!(seqnos(&a.ready), [12]);
        assert_eq!(seqnos(&a.redelivered), [5]);
        let a = c.accept(vec![b(9, 12)]);
        assert!(a.ready.is_empty());
        assert_eq!(seqnos(&a.redelivered), [12]);
    }

    #[test]
    fn a_stream_asking_again_follows_but_does_not_reapply() {
        // Applied through 10; the stream re-asks from 6.
        let mut c = Chain::new(6, 10);
        let a = c.accept(vec![b(8, 10), b(6, 8), b(10, 11)]);
        assert_eq!(seqnos(&a.ready), [11]);
        let mut again = seqnos(&a.redelivered);
        again.sort_unstable();
        assert_eq!(again, [8, 10]);
        assert_eq!(c.cursor(), 11);
    }

    #[test]
    fn waiting_batches_are_bounded() {
        let mut c = Chain::new(0, 0);
        let far: Vec<_> = (0..CHAIN_WAITING_MAX as u64 + 10).map(|i| b(1000 + i, 1001 + i)).collect();
        let a = c.accept(far);
        assert!(a.ready.is_empty());
        assert!(c.waiting.len() <= CHAIN_WAITING_MAX);
    }
}
