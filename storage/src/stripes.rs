//! Stripes of entities: the guard that keeps in-memory state derived from reads (the hot
//! tier's newest states, `src/hot.rs`; the tiles of windowed aggregates, `src/tiles.rs`) from
//! missing a write.
//!
//! A reader takes a [`Ticket`] for an entity *before* it takes its read view, derives state
//! from that view, and offers it through [`Stripes::fill`], which refuses the insert when a
//! write of the entity may be missing from the view: the ticket saw a write in flight
//! (`pending > 0`), or a write began since (`gen` moved). A writer announces itself with
//! [`Stripes::write_begin`] (under the stripe lock, `pending` then `gen` move, and its own
//! update of the state runs) before its versions are published, and [`Stripes::write_end`]
//! after. A write that began before the ticket is either still pending (refused) or published
//! before the view (in the view); one that begins after the ticket either moves `gen` before
//! the fill (refused) or runs after it and updates what the fill inserted. Stripes are shared
//! by many entities, which only costs a few refused fills.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Stripes of entities sharing one fill/write guard.
pub(crate) const STRIPES: usize = 1024;

#[derive(Debug, Default)]
struct Stripe {
    lock: Mutex<()>,
    gen: AtomicU64,
    pending: AtomicU64,
}

/// What a reader saw of an entity's stripe before taking its view.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    stripe: usize,
    gen: u64,
    quiet: bool,
}

impl Ticket {
    /// Whether no write of the stripe was in flight when the ticket was taken (a ticket that
    /// is not quiet can never fill).
    pub fn quiet(&self) -> bool {
        self.quiet
    }
}

/// A write announced and not yet ended: its entity's stripe.
#[derive(Debug)]
#[must_use = "every write_begin needs its write_end, or fills of the stripe stay refused"]
pub(crate) struct WriteToken(usize);

/// The stripes of one derived state.
#[derive(Debug)]
pub(crate) struct Stripes(Box<[Stripe]>);

/// The hash of an entity key that picks its stripe (and, in the hot tier, its doorkeeper bit).
pub(crate) fn hash_of(entity: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(entity)
}

/// The stripe of an entity whose key hashes to `hash`.
pub(crate) fn stripe_of(hash: u64) -> usize {
    (hash % STRIPES as u64) as usize
}

impl Stripes {
    pub fn new() -> Stripes {
        Stripes((0..STRIPES).map(|_| Stripe::default()).collect())
    }

    /// A ticket for the entity hashing to `hash`; take it before the read view.
    pub fn ticket(&self, hash: u64) -> Ticket {
        let stripe = stripe_of(hash);
        let s = &self.0[stripe];
        let gen = s.gen.load(Ordering::SeqCst);
        let quiet = s.pending.load(Ordering::SeqCst) == 0;
        Ticket { stripe, gen, quiet }
    }

    /// Runs `insert` under the stripe lock if no write can be missing from a view taken after
    /// `ticket`; `None` (and nothing run) when refused.
    pub fn fill<R>(&self, ticket: Ticket, insert: impl FnOnce() -> R) -> Option<R> {
        if !ticket.quiet {
            return None;
        }
        let s = &self.0[ticket.stripe];
        let _g = s.lock.lock();
        (s.gen.load(Ordering::SeqCst) == ticket.gen).then(insert)
    }

    /// Announces a write of the entity hashing to `hash` and runs `update` under the stripe
    /// lock; hand the token to [`Stripes::write_end`] once the write is published.
    pub fn write_begin<R>(&self, hash: u64, update: impl FnOnce() -> R) -> (WriteToken, R) {
        let token = WriteToken(stripe_of(hash));
        let s = &self.0[token.0];
        let _g = s.lock.lock();
        s.pending.fetch_add(1, Ordering::SeqCst);
        s.gen.fetch_add(1, Ordering::SeqCst);
        (token, update())
    }

    /// The write announced by the [`Stripes::write_begin`] that returned `token` is published
    /// (or abandoned).
    pub fn write_end(&self, token: WriteToken) {
        self.0[token.0].pending.fetch_sub(1, Ordering::SeqCst);
    }

    /// Refuses every fill in flight (each stripe's `gen` moves) and runs `then` after.
    pub fn refuse_all<R>(&self, then: impl FnOnce() -> R) -> R {
        for s in self.0.iter() {
            let _g = s.lock.lock();
            s.gen.fetch_add(1, Ordering::SeqCst);
        }
        then()
    }
}
