//! The clock that stamps system time.
//!
//! A stamp is microseconds since the Unix epoch, made strictly increasing: `max(wall clock,
//! last + 1)`. Stamps stay comparable with wall-clock `known_at` values, survive a wall clock
//! that steps backwards, and stay monotonic across restarts because recovery observes the
//! highest stamp in the manifest and the WAL before issuing new ones. Stamps from other nodes
//! (replication) are observed the same way, which makes this a hybrid logical clock whose
//! logical part is folded into the microseconds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A source of wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Microseconds since the Unix epoch.
    fn now_us(&self) -> u64;
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
    }
}

/// A clock tests move by hand. Cloning shares the time.
#[derive(Debug, Default, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock at `t` microseconds.
    pub fn new(t: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(t)))
    }
    /// Sets the time.
    pub fn set(&self, t: u64) {
        self.0.store(t, Ordering::SeqCst);
    }
    /// Moves the time forward.
    pub fn advance(&self, d: u64) {
        self.0.fetch_add(d, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_us(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The hybrid logical clock.
#[derive(Debug)]
pub struct Hlc {
    clock: Arc<dyn Clock>,
    last: AtomicU64,
}

impl Hlc {
    /// A clock that has issued nothing above `high_water`.
    pub fn new(clock: Arc<dyn Clock>, high_water: u64) -> Self {
        Hlc { clock, last: AtomicU64::new(high_water) }
    }

    /// Issues a new stamp, greater than every stamp issued or observed.
    pub fn stamp(&self) -> u64 {
        let now = self.clock.now_us();
        let mut last = self.last.load(Ordering::Acquire);
        loop {
            let next = now.max(last.saturating_add(1));
            match self.last.compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    debug_assert!(next > last || last == u64::MAX, "stamps strictly increase");
                    return next;
                }
                Err(l) => last = l,
            }
        }
    }

    /// Records a stamp seen elsewhere (WAL replay, a peer).
    pub fn observe(&self, t: u64) {
        self.last.fetch_max(t, Ordering::AcqRel);
    }

    /// The greatest stamp issued or observed.
    pub fn high_water(&self) -> u64 {
        self.last.load(Ordering::Acquire)
    }

    /// The wall clock now.
    pub fn wall_us(&self) -> u64 {
        self.clock.now_us()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increasing_even_if_wall_clock_steps_back() {
        let c = ManualClock::new(1000);
        let h = Hlc::new(Arc::new(c.clone()), 0);
        assert_eq!(h.stamp(), 1000);
        assert_eq!(h.stamp(), 1001);
        c.set(500);
        assert_eq!(h.stamp(), 1002);
        h.observe(5000);
        assert_eq!(h.stamp(), 5001);
        c.set(9000);
        assert_eq!(h.stamp(), 9000);
    }
}
