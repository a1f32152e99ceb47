//! Served-feature logging (README "Served-feature logging"): online answers, as served, kept in
//! the engine itself so that they can be exported as training data and replayed to measure
//! skew.
//!
//! # Sampling
//! An entity is logged for a group when `sample_point(entity key) < rate`, with the group's
//! `log_sample_rate` (else quiverd's `--log-sample-rate`). The point is a fixed hash (FNV-1a,
//! 64 bits, then MurmurHash3's finaliser) of the encoded entity key mapped to [0, 1): the same
//! entities are logged on every request, on every node, across restarts and versions (a test
//! pins the values), so a logged entity's history is complete.
//!
//! # Never in the way of serving
//! The online path only encodes the sampled answers and offers them to a bounded queue
//! ([`SERVED_LOG_QUEUE_BYTES_MAX`] bytes of encoded answers); when it is full they are dropped
//! and counted (`quiver_served_log_dropped_total`), never waited for. One writer thread drains
//! the queue in batches of up to [`SERVED_LOG_BATCH_MAX`] answers, written with async
//! durability: a crash may lose the last moments of the log, never an answer's latency.
//!
//! # Storage
//! One record per (request, entity): entity [`quiver_storage::reserved::SERVED_LOG`] +
//! served-at time (µs, sign bit flipped, big endian) + a sequence number (big endian), feature
//! id 0, event time = served-at, value a `quiver.v1.LoggedAnswer`. Time ranges are key ranges.
//! The prefix is not replicated: each node logs what it served. Compaction drops records older
//! than the retention (`--log-retention-hours`, by system time; `storage/src/compaction.rs`
//! rule 4).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::core::Collector;
use prometheus::{IntCounter, IntGauge};
use prost::Message;
use quiver_proto::v1 as pb;
use quiver_storage::{Db, Durability, EventTime, FeatureId, ScanRange, Value, WriteBatch};

/// Bytes of encoded answers waiting to be written; past it new ones are dropped.
pub const SERVED_LOG_QUEUE_BYTES_MAX: usize = 32 << 20;
/// Most answers in one write of the log.
pub const SERVED_LOG_BATCH_MAX: usize = 1_000;
/// Most answers in one message of `ScanServedLog`.
pub const SERVED_LOG_CHUNK_ANSWERS: usize = 1_000;
/// How long logged answers are kept unless `--log-retention-hours` says otherwise (7 days).
pub const LOG_RETENTION_DEFAULT: Duration = Duration::from_secs(7 * 86_400);
/// Longest `x-request-id` a lookup may carry.
pub const REQUEST_ID_BYTES_MAX: usize = 128;

/// Where an entity key falls in [0, 1) for sampling (see the module docs).
pub fn sample_point(entity_key: &[u8]) -> f64 {
    let h = quiver_storage::hash::stable_hash64(entity_key);
    // The top 53 bits, as a fraction.
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// A `[from, to)` range of served-at times from a request: both required, `to` after `from`.
pub fn served_range(
    from: Option<&prost_types::Timestamp>,
    to: Option<&prost_types::Timestamp>,
) -> Result<(i64, i64), crate::convert::Invalid> {
    use crate::convert::{micros, Invalid};
    let from = micros(from.ok_or_else(|| Invalid("from is required".into()))?, "from")?;
    let to = micros(to.ok_or_else(|| Invalid("to is required".into()))?, "to")?;
    if to <= from {
        return Err(Invalid("to must be after from".into()));
    }
    Ok((from, to))
}

/// The key of the log record served at `served_us`, number `seq`.
fn record_key(served_us: i64, seq: Option<u64>) -> Vec<u8> {
    let mut k = quiver_storage::reserved::SERVED_LOG.to_vec();
    k.extend_from_slice(&((served_us as u64) ^ (1 << 63)).to_be_bytes());
    if let Some(seq) = seq {
        k.extend_from_slice(&seq.to_be_bytes());
    }
    k
}

struct Entry {
    key: Vec<u8>,
    served_us: i64,
    value: Vec<u8>,
}

/// This node's served-feature log.
#[derive(Debug)]
pub struct ServedLog {
    db: Arc<Db>,
    default_rate: f64,
    region: u32,
    seq: AtomicU64,
    tx: Mutex<Option<SyncSender<Entry>>>,
    queued: Arc<AtomicUsize>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    logged: IntCounter,
    dropped: IntCounter,
    queue_bytes: IntGauge,
}

fn err(e: prometheus::Error) -> String {
    format!("metrics: {e}")
}

impl ServedLog {
    /// The log of a node of `region` writing into `db`, sampling `default_rate` of entities for
    /// groups that do not say; starts its writer thread.
    pub fn start(db: Arc<Db>, region: u32, default_rate: f64) -> Result<ServedLog, String> {
        if !(0.0..=1.0).contains(&default_rate) {
            return Err(format!("log sample rate {default_rate} is not a share between 0 and 1"));
        }
        let logged =
            IntCounter::new("served_log_answers_total", "online answers (entity x request) logged since start")
                .map_err(err)?;
        let dropped = IntCounter::new(
            "served_log_dropped_total",
            "sampled online answers not logged because the log's queue was full (or its write failed)",
        )
        .map_err(err)?;
        let queue_bytes =
            IntGauge::new("served_log_queue_bytes", "encoded answers waiting to be written to the log").map_err(err)?;
        // Answers are bounded by bytes; the channel's own bound only needs to be no tighter.
        let (tx, rx) = std::sync::mpsc::sync_channel(SERVED_LOG_QUEUE_BYTES_MAX / 64);
        let queued = Arc::new(AtomicUsize::new(0));
        let writer = {
            let (db, queued, logged, dropped) = (db.clone(), queued.clone(), logged.clone(), dropped.clone());
            std::thread::Builder::new()
                .name("served-log".into())
                .spawn(move || write_loop(&db, &rx, &queued, &logged, &dropped))
                .map_err(|e| format!("starting the served-log writer: {e}"))?
        };
        let seq =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        Ok(ServedLog {
            db,
            default_rate,
            region,
            seq: AtomicU64::new(seq),
            tx: Mutex::new(Some(tx)),
            queued,
            writer: Mutex::new(Some(writer)),
            logged,
            dropped,
            queue_bytes,
        })
    }

    /// The share of entities logged for a group whose registry entry does not say.
    pub fn default_rate(&self) -> f64 {
        self.default_rate
    }

    /// The Prometheus collectors to register.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![Box::new(self.logged.clone()), Box::new(self.dropped.clone()), Box::new(self.queue_bytes.clone())]
    }

    /// Sets the queue gauge (at every scrape).
    pub fn refresh_gauges(&self) {
        self.queue_bytes.set(self.queued.load(Ordering::Relaxed) as i64);
    }

    /// Answers written and dropped since start.
    pub fn counts(&self) -> (u64, u64) {
        (self.logged.get(), self.dropped.get())
    }

    /// A request id for a lookup that brought none.
    pub fn next_request_id(&self) -> String {
        format!("{}-{}", self.region, self.seq.fetch_add(1, Ordering::Relaxed))
    }

    /// Offers one answer to the queue; drops (and counts) it when the queue is full.
    pub fn offer(&self, answer: &pb::LoggedAnswer, served_us: i64) {
        let value = answer.encode_to_vec();
        let bytes = value.len();
        if self.queued.fetch_add(bytes, Ordering::Relaxed) + bytes > SERVED_LOG_QUEUE_BYTES_MAX {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            self.dropped.inc();
            return;
        }
        let entry =
            Entry { key: record_key(served_us, Some(self.seq.fetch_add(1, Ordering::Relaxed))), served_us, value };
        let sent = match &*self.tx.lock() {
            Some(tx) => tx.try_send(entry),
            None => Err(TrySendError::Disconnected(entry)),
        };
        if sent.is_err() {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            self.dropped.inc();
        }
    }

    /// Waits until every answer offered so far is written (or `timeout` passes); true if so.
    pub fn wait_written(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.queued.load(Ordering::Acquire) > 0 {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Writes what is queued and stops the writer (at shutdown, before the engine closes).
    pub fn close(&self) {
        drop(self.tx.lock().take());
        if let Some(w) = self.writer.lock().take() {
            let _ = w.join();
        }
    }

    /// Answers served at `from_us <= served_at < to_us`, in order, to `emit` in chunks of up
    /// to [`SERVED_LOG_CHUNK_ANSWERS`]; `emit` returns false to stop.
    pub fn scan(
        &self,
        from_us: i64,
        to_us: i64,
        emit: &mut dyn FnMut(Vec<pb::LoggedAnswer>) -> bool,
    ) -> Result<(), quiver_storage::Error> {
        let mut range = ScanRange::all();
        range.entity_start = record_key(from_us, None);
        range.entity_end = Some(record_key(to_us, None));
        let mut chunk = Vec::new();
        for item in self.db.scan(range)? {
            let item = item?;
            let Some(Value::Bytes(b)) = &item.version.value else { continue };
            let answer = pb::LoggedAnswer::decode(b.as_slice())
                .map_err(|e| quiver_storage::Error::InvalidArgument(format!("a logged answer does not decode: {e}")))?;
            chunk.push(answer);
            if chunk.len() == SERVED_LOG_CHUNK_ANSWERS && !emit(std::mem::take(&mut chunk)) {
                return Ok(());
            }
        }
        if !chunk.is_empty() {
            emit(chunk);
        }
        Ok(())
    }
}

impl Drop for ServedLog {
    fn drop(&mut self) {
        self.close();
    }
}

fn write_loop(db: &Db, rx: &Receiver<Entry>, queued: &AtomicUsize, logged: &IntCounter, dropped: &IntCounter) {
    while let Ok(first) = rx.recv() {
        let mut entries = vec![first];
        while entries.len() < SERVED_LOG_BATCH_MAX {
            match rx.try_recv() {
                Ok(e) => entries.push(e),
                Err(_) => break,
            }
        }
        let bytes: usize = entries.iter().map(|e| e.value.len()).sum();
        let n = entries.len() as u64;
        let mut batch = WriteBatch::new();
        let mut built = Ok(());
        for e in entries {
            built = built.and(batch.put(&e.key, FeatureId(0), EventTime(e.served_us), Value::Bytes(e.value)));
        }
        match built.and_then(|()| db.write(batch, Durability::Async).map(|_| ())) {
            Ok(()) => logged.inc_by(n),
            Err(e) => {
                dropped.inc_by(n);
                tracing::warn!(error = %e, answers = n, "served answers not logged");
            }
        }
        queued.fetch_sub(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_stable_and_near_its_rate() {
        let keys: Vec<Vec<u8>> = (0..20_000).map(|i| format!("user-{i}").into_bytes()).collect();
        let picked = |rate: f64| keys.iter().filter(|k| sample_point(k) < rate).count();
        for rate in [0.01, 0.1, 0.5] {
            let share = picked(rate) as f64 / keys.len() as f64;
            assert!((share - rate).abs() < rate * 0.15 + 0.002, "rate {rate}: {share}");
        }
        assert_eq!(picked(0.0), 0);
        assert_eq!(picked(1.0), keys.len());
        // Fixed: the same key always falls at the same point (no per-process seed).
        assert_eq!(sample_point(b"user-1"), sample_point(b"user-1"));
        // Pinned: changing the hash would change which entities are logged.
        assert_eq!((sample_point(b"") * 1e9) as u64, 936_769_448);
        assert_eq!((sample_point(b"user-1") * 1e9) as u64, 256_393_232);
    }

    #[test]
    fn record_keys_sort_by_time_then_sequence() {
        let mut keys = vec![
            record_key(5, Some(1)),
            record_key(-5, Some(9)),
            record_key(5, Some(0)),
            record_key(0, Some(3)),
            record_key(1 << 40, Some(0)),
        ];
        keys.sort();
        let expect = vec![
            record_key(-5, Some(9)),
            record_key(0, Some(3)),
            record_key(5, Some(0)),
            record_key(5, Some(1)),
            record_key(1 << 40, Some(0)),
        ];
        assert_eq!(keys, expect);
        assert!(record_key(5, None) <= record_key(5, Some(0)) && record_key(6, None) > record_key(5, Some(u64::MAX)));
    }
}
