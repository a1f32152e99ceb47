//! Prometheus metrics over HTTP (`GET /metrics`): request counts by method and code, latency
//! histograms by method, values and bytes written, the engine's figures read at scrape time, and
//! feature health (`crate::health`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use quiver_storage::Db;

/// Latency buckets in seconds: 50 µs to 10 s.
const LATENCY_BUCKETS_S: [f64; 14] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 10.0];

/// Reads one engine figure from the engine's stats.
type Figure = fn(&quiver_storage::Stats) -> i64;

/// The node's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    /// Cell versions written through the API.
    pub values_written: IntCounter,
    /// Encoded bytes of accepted write requests.
    pub write_bytes: IntCounter,
    /// Entities (lookups, scans) and rows (writes) this node forwarded to their owner, by method
    /// (`server/CLUSTER.md` §4).
    pub forwarded: IntCounterVec,
    engine: Vec<(IntGauge, Figure)>,
    db: Arc<Db>,
    replicator: Arc<crate::replication::Replicator>,
    lag_seconds: GaugeVec,
    lag_seqnos: IntGaugeVec,
    peer_up: IntGaugeVec,
    peer_batches: IntGaugeVec,
    peer_bootstraps: IntGaugeVec,
    admission: Arc<crate::admission::Admission>,
    admission_figures: [IntGauge; 3],
    auth: Arc<crate::auth::Authenticator>,
    rate_limited: IntGauge,
    /// 1 while the engine refuses writes, by reason (`stopped`, `read_only`, `disk_full`).
    writes_refused: IntGaugeVec,
    /// 1 while flushes or compactions wait for space.
    background_disk_full: IntGaugeVec,
    conns: Arc<crate::conn::ConnStats>,
    conn_figures: [IntGauge; 4],
    health: Arc<crate::health::Health>,
    served_log: Arc<crate::servedlog::ServedLog>,
}

fn err(e: prometheus::Error) -> String {
    format!("metrics: {e}")
}

impl Metrics {
    /// Adds more metrics (a part of the node made after the registry).
    pub fn register(&self, collectors: Vec<Box<dyn prometheus::core::Collector>>) -> Result<(), String> {
        collectors.into_iter().try_for_each(|c| self.registry.register(c).map_err(err))
    }

    /// Metrics for a node serving `db`.
    pub fn new(
        db: Arc<Db>,
        replicator: Arc<crate::replication::Replicator>,
        admission: Arc<crate::admission::Admission>,
        conns: Arc<crate::conn::ConnStats>,
        auth: Arc<crate::auth::Authenticator>,
        health: Arc<crate::health::Health>,
        served_log: Arc<crate::servedlog::ServedLog>,
    ) -> Result<Arc<Metrics>, String> {
        let registry = Registry::new_custom(Some("quiver".into()), None).map_err(err)?;
        for c in health.collectors().into_iter().chain(served_log.collectors()) {
            registry.register(c).map_err(err)?;
        }
        let requests = IntCounterVec::new(
            Opts::new("grpc_requests_total", "gRPC requests by method and status code"),
            &["method", "code"],
        )
        .map_err(err)?;
        let latency = HistogramVec::new(
            HistogramOpts::new("grpc_request_seconds", "gRPC request latency by method")
                .buckets(LATENCY_BUCKETS_S.to_vec()),
            &["method"],
        )
        .map_err(err)?;
        let values_written =
            IntCounter::new("values_written_total", "cell versions written through the API").map_err(err)?;
        let write_bytes =
            IntCounter::new("write_request_bytes_total", "encoded bytes of accepted write requests").map_err(err)?;
        registry.register(Box::new(requests.clone())).map_err(err)?;
        registry.register(Box::new(latency.clone())).map_err(err)?;
        registry.register(Box::new(values_written.clone())).map_err(err)?;
        registry.register(Box::new(write_bytes.clone())).map_err(err)?;
        let forwarded = IntCounterVec::new(
            Opts::new("forwarded_total", "entities and write rows this node forwarded to their slot's owner"),
            &["method"],
        )
        .map_err(err)?;
        registry.register(Box::new(forwarded.clone())).map_err(err)?;
        let lag_seconds = GaugeVec::new(
            Opts::new(
                "replication_lag_seconds",
                "seconds this node is behind a peer's log (peer's clock minus the last applied batch's stamp)",
            ),
            &["peer"],
        )
        .map_err(err)?;
        let int_vec = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["peer"]).map_err(err);
        let lag_seqnos = int_vec("replication_lag_seqnos", "sequence numbers this node is behind a peer's log")?;
        let peer_up = int_vec("replication_peer_streaming", "1 while this node streams a peer's log without error")?;
        let peer_batches = int_vec("replication_batches_applied", "a peer's batches applied since start")?;
        let peer_bootstraps = int_vec("replication_bootstraps", "bootstraps from a peer's snapshot since start")?;
        for c in [&lag_seqnos, &peer_up, &peer_batches, &peer_bootstraps] {
            registry.register(Box::new(c.clone())).map_err(err)?;
        }
        registry.register(Box::new(lag_seconds.clone())).map_err(err)?;
        let figures: [(&str, &str, Figure); 30] = [
            ("replication_conflicts", "replicated versions concurrent with their cell's winner since start", |s| {
                s.replication_conflicts as i64
            }),
            ("engine_flushes", "memtable flushes since start", |s| s.flushes as i64),
            ("engine_compactions", "compactions since start", |s| s.compactions as i64),
            ("engine_entries_dropped", "versions dropped by retention since start", |s| s.entries_dropped as i64),
            ("engine_wal_syncs", "WAL fsyncs since start", |s| s.wal_syncs as i64),
            ("engine_write_groups", "group commits since start", |s| s.write_groups as i64),
            ("engine_memtable_bytes", "bytes in the active memtable", |s| s.memtable_bytes as i64),
            ("engine_immutable_memtables", "memtables waiting for flush", |s| s.immutable_memtables as i64),
            ("engine_immutable_memtable_bytes", "bytes in the memtables waiting for flush", |s| {
                s.immutable_memtable_bytes as i64
            }),
            ("engine_table_bytes", "bytes of all tables", |s| s.levels.iter().map(|l| l.bytes as i64).sum()),
            ("engine_table_memory_bytes", "bytes the open tables hold in memory (indexes and filters)", |s| {
                s.table_memory_bytes as i64
            }),
            ("engine_block_cache_bytes", "bytes held by the block cache", |s| s.block_cache_bytes as i64),
            (
                "engine_block_cache_capacity_bytes",
                "bytes the block cache may hold: its share less the open tables' indexes and filters",
                |s| s.block_cache_capacity as i64,
            ),
            ("engine_block_cache_hits", "block cache hits since start", |s| s.block_cache_hits as i64),
            ("engine_block_cache_misses", "block cache misses since start", |s| s.block_cache_misses as i64),
            ("engine_hot_tier_hits", "reads the hot tier answered since start", |s| s.hot.hits as i64),
            ("engine_hot_tier_misses", "reads the hot tier passed on since start", |s| s.hot.misses as i64),
            ("engine_hot_tier_evictions", "hot tier rows evicted since start", |s| s.hot.evictions as i64),
            ("engine_hot_tier_entries", "entity rows held by the hot tier", |s| s.hot.entries as i64),
            ("engine_hot_tier_bytes", "approximate bytes held by the hot tier", |s| s.hot.bytes as i64),
            ("engine_tile_hits", "aggregate tiles that answered a read since start", |s| s.tiles.hits as i64),
            ("engine_tile_misses", "aggregate tiles folded from raw versions since start", |s| s.tiles.misses as i64),
            ("engine_tile_invalidations", "aggregate tiles removed by writes since start", |s| {
                s.tiles.invalidations as i64
            }),
            ("engine_tile_entries", "aggregate tiles held", |s| s.tiles.entries as i64),
            ("engine_tile_bytes", "approximate bytes held by aggregate tiles", |s| s.tiles.bytes as i64),
            (
                "engine_hot_tier_complete",
                "1 while the hot tier holds every entity's newest states (online reads never touch tables)",
                |s| i64::from(s.hot.complete),
            ),
            ("engine_ssd_io_uring", "1 if data blocks are read with io_uring, 0 for pread", |s| {
                i64::from(s.ssd.backend == "io_uring")
            }),
            ("engine_ssd_block_reads", "data blocks read from files for point reads", |s| s.ssd.block_reads as i64),
            ("engine_ssd_read_rounds", "rounds of block reads (submissions or preads)", |s| s.ssd.read_rounds as i64),
            ("engine_ssd_bytes_read", "bytes read from files for point reads", |s| s.ssd.bytes_read as i64),
        ];
        let mut engine = Vec::new();
        for (name, help, f) in figures {
            let g = IntGauge::new(name, help).map_err(err)?;
            registry.register(Box::new(g.clone())).map_err(err)?;
            engine.push((g, f));
        }
        let gauge = |name: &str, help: &str| -> Result<IntGauge, String> {
            let g = IntGauge::new(name, help).map_err(err)?;
            registry.register(Box::new(g.clone())).map_err(err)?;
            Ok(g)
        };
        let admission_figures = [
            gauge("requests_in_flight", "data requests being served (lookups, writes, joins, scans)")?,
            gauge("request_bytes_in_flight", "bytes of memory reserved by data requests being served")?,
            gauge("requests_shed_total", "data requests refused with RESOURCE_EXHAUSTED for load since start")?,
        ];
        let writes_refused = IntGaugeVec::new(
            Opts::new(
                "writes_refused",
                "1 while the engine refuses writes: disk_full (resumes by itself), read_only (opened on a full \
                 disk), stopped (after an I/O error); reads keep working",
            ),
            &["reason"],
        )
        .map_err(err)?;
        registry.register(Box::new(writes_refused.clone())).map_err(err)?;
        let background_disk_full = IntGaugeVec::new(
            Opts::new(
                "background_disk_full",
                "1 while flushes or compactions wait for disk space (a compaction needs room for its outputs \
                 before its inputs go)",
            ),
            &["work"],
        )
        .map_err(err)?;
        registry.register(Box::new(background_disk_full.clone())).map_err(err)?;
        let rate_limited =
            gauge("requests_rate_limited_total", "calls refused by their token's rate limits since start")?;
        let conn_figures = [
            gauge("connections_open", "gRPC connections open")?,
            gauge("connections_refused_total", "connections closed at once because --max-connections were open")?,
            gauge("connections_silent_closed_total", "connections closed because they sent nothing in time")?,
            gauge("accept_errors_total", "failed accepts (out of file descriptors...) since start")?,
        ];
        Ok(Arc::new(Metrics {
            health,
            served_log,
            auth,
            rate_limited,
            writes_refused,
            background_disk_full,
            conns,
            conn_figures,
            admission,
            admission_figures,
            registry,
            requests,
            latency,
            values_written,
            write_bytes,
            forwarded,
            engine,
            db,
            replicator,
            lag_seconds,
            lag_seqnos,
            peer_up,
            peer_batches,
            peer_bootstraps,
        }))
    }

    /// Records one request.
    pub fn observe(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        self.requests.with_label_values(&[method, &format!("{code:?}")]).inc();
        self.latency.with_label_values(&[method]).observe(elapsed.as_secs_f64());
    }

    /// Times `f` and records it under `method`.
    pub async fn timed<T>(
        &self,
        method: &str,
        f: impl Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        let t = Instant::now();
        let r = f.await;
        self.observe(method, r.as_ref().err().map_or(tonic::Code::Ok, tonic::Status::code), t.elapsed());
        r
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let stats = self.db.stats();
        for (g, f) in &self.engine {
            g.set(f(&stats));
        }
        let a = &self.admission;
        let [requests, bytes, shed] = &self.admission_figures;
        requests.set(a.requests_in_flight() as i64);
        bytes.set(a.bytes_in_flight() as i64);
        shed.set(a.shed_total().min(i64::MAX as u64) as i64);
        let refused = self.db.writes_refused();
        for reason in quiver_storage::WritesRefused::REASONS {
            let on = refused.as_ref().is_some_and(|r| r.reason() == reason);
            self.writes_refused.with_label_values(&[reason]).set(i64::from(on));
        }
        let (flush, compaction) = self.db.background_waiting_for_space();
        self.background_disk_full.with_label_values(&["flush"]).set(i64::from(flush));
        self.background_disk_full.with_label_values(&["compaction"]).set(i64::from(compaction));
        self.rate_limited.set(self.auth.rate_limited_total().min(i64::MAX as u64) as i64);
        let c = &self.conns;
        let [open, refused, silent, errors] = &self.conn_figures;
        open.set(c.open.load(std::sync::atomic::Ordering::Relaxed) as i64);
        for (g, n) in [(refused, &c.refused), (silent, &c.silent), (errors, &c.accept_errors)] {
            g.set(n.load(std::sync::atomic::Ordering::Relaxed).min(i64::MAX as u64) as i64);
        }
        for (peer, lag_s, lag_n, batches, bootstraps, up) in self.replicator.peer_figures() {
            let peer = peer.to_string();
            self.lag_seconds.with_label_values(&[&peer]).set(lag_s);
            self.lag_seqnos.with_label_values(&[&peer]).set(lag_n as i64);
            self.peer_batches.with_label_values(&[&peer]).set(batches as i64);
            self.peer_bootstraps.with_label_values(&[&peer]).set(bootstraps as i64);
            self.peer_up.with_label_values(&[&peer]).set(i64::from(up));
        }
        self.health.refresh_gauges(crate::service::now_us());
        self.served_log.refresh_gauges();
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            return format!("# metrics encoding failed: {e}\n");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(metrics: Arc<Metrics>, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            _ = &mut shutdown => return,
            c = listener.accept() => c,
        };
        let stream = match conn {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: do not spin.
                tracing::debug!(error = %e, "metrics accept");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let m = m.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        hyper::Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(m.render())))
                    } else {
                        hyper::Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from_static(b"not found; try /metrics\n")))
                    };
                    Ok::<_, Infallible>(resp.unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new()))))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}
