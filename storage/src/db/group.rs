//! Group commit: a leader/follower queue.
//!
//! Each writer queues its item and waits. A writer that finds itself at the head of the queue
//! while no group is being committed becomes the *leader*: it takes the queued items (its own
//! first, in queue order, at least one and then while they fit a weight budget), commits them
//! with the lock released — so new writers queue up behind and form the next group — and hands
//! every item of the group its result. Items are committed exactly once, in queue order, and
//! groups never overlap.
//!
//! The protocol is hand-written on a mutex and a condition variable, so it is model-checked with
//! `loom` (`RUSTFLAGS="--cfg loom" cargo test -p quiver-storage --release --lib db::group::`).

use std::collections::{HashMap, VecDeque};

#[cfg(loom)]
use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
use std::sync::{Condvar, Mutex, MutexGuard};

#[derive(Debug)]
struct State<T, R> {
    pending: VecDeque<(u64, T)>,
    done: HashMap<u64, R>,
    next_ticket: u64,
    leader: bool,
}

/// The queue. `T` is what writers submit, `R` what each gets back.
#[derive(Debug)]
pub(crate) struct GroupQueue<T, R> {
    state: Mutex<State<T, R>>,
    cv: Condvar,
}

impl<T, R> GroupQueue<T, R> {
    pub(crate) fn new() -> Self {
        GroupQueue {
            state: Mutex::new(State { pending: VecDeque::new(), done: HashMap::new(), next_ticket: 0, leader: false }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T, R>> {
        // Nothing panics while the lock is held, so poisoning carries no meaning here.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item` and returns its result. If this caller becomes the leader, `commit` runs
    /// on its group (without the lock held) and must return one result per item, in order;
    /// otherwise `commit` is dropped unused.
    pub(crate) fn submit(
        &self,
        item: T,
        weight: impl Fn(&T) -> usize,
        max_weight: usize,
        commit: impl FnOnce(&[T]) -> Vec<R>,
    ) -> R {
        let mut st = self.lock();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.pending.push_back((ticket, item));
        loop {
            if let Some(r) = st.done.remove(&ticket) {
                return r;
            }
            if !st.leader && st.pending.front().map(|p| p.0) == Some(ticket) {
                break;
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.leader = true;
        let mut tickets = Vec::new();
        let mut group = Vec::new();
        let mut total = 0;
        while let Some((_, next)) = st.pending.front() {
            let w = weight(next);
            if !group.is_empty() && total + w > max_weight {
                break;
            }
            total += w;
            if let Some((t, it)) = st.pending.pop_front() {
                tickets.push(t);
                group.push(it);
            }
        }
        drop(st);
        let results = commit(&group);
        assert_eq!(results.len(), group.len(), "group commit must return one result per item");
        let mut st = self.lock();
        st.leader = false;
        for (t, r) in tickets.into_iter().zip(results) {
            st.done.insert(t, r);
        }
        let mine = st.done.remove(&ticket);
        self.cv.notify_all();
        drop(st);
        match mine {
            Some(r) => r,
            None => unreachable!("the leader's own item is the first of its group"),
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::GroupQueue;
    use loom::sync::atomic::{AtomicBool, Ordering};
    use loom::sync::{Arc, Mutex};

    /// Three writers: every item is committed exactly once, groups never overlap, and each
    /// writer gets back the result of its own item. (Preemption bound 3 keeps the search to
    /// seconds; the bugs this protocol can have need at most two preemptions.)
    #[test]
    fn every_item_committed_once_and_groups_never_overlap() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let q = Arc::new(GroupQueue::<u32, u32>::new());
            let log = Arc::new(Mutex::new(Vec::new()));
            let committing = Arc::new(AtomicBool::new(false));
            let handles: Vec<_> = (0..3u32)
                .map(|i| {
                    let q = q.clone();
                    let log = log.clone();
                    let committing = committing.clone();
                    loom::thread::spawn(move || {
                        let r = q.submit(
                            i,
                            |_| 1,
                            2,
                            |group| {
                                assert!(!committing.swap(true, Ordering::SeqCst), "two groups commit at once");
                                log.lock().expect("log").extend_from_slice(group);
                                committing.store(false, Ordering::SeqCst);
                                group.iter().map(|x| x * 10).collect()
                            },
                        );
                        assert_eq!(r, i * 10);
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("writer");
            }
            let mut seen = log.lock().expect("log").clone();
            assert_eq!(seen.len(), 3, "each item committed exactly once: {seen:?}");
            seen.sort_unstable();
            assert_eq!(seen, vec![0, 1, 2]);
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::GroupQueue;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn concurrent_writers_form_groups_and_get_their_own_results() {
        let q = Arc::new(GroupQueue::<u64, u64>::new());
        let groups = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..8u64)
            .map(|t| {
                let q = q.clone();
                let groups = groups.clone();
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        let item = t * 1000 + i;
                        let r = q.submit(
                            item,
                            |_| 1,
                            16,
                            |g| {
                                groups.fetch_add(1, Ordering::Relaxed);
                                g.iter().map(|x| x + 1).collect()
                            },
                        );
                        assert_eq!(r, item + 1);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("writer");
        }
        assert!(groups.load(Ordering::Relaxed) <= 1600);
    }
}
