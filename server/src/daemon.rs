//! Running the gRPC server: used by `quiverd` and by `quiver demo` (in-process, on a loopback
//! port).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use quiver_proto::v1 as pb;
use quiver_storage::sstable::IoBackend;
use quiver_storage::{Compression, Db, Durability, Options};

use tonic::service::interceptor::InterceptedService;

use crate::admission::{Admission, AdmitRequests, REQUEST_MEMORY_SHARE_DIVISOR};
use crate::auth::{AuthMode, Authenticator, BearerToken, Scope};
use crate::features::{Features, JOIN_MEMORY_SHARE_DIVISOR};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::replication::{ClusterConfig, Replicator};
use crate::service::{AdminApi, FeatureApi, RegistryApi};

/// Most bytes of the newest local batches kept in memory for peers that keep up.
pub const REPLICATION_TAIL_BYTES_MAX: usize = 32 << 20;

/// Largest gRPC message accepted or sent.
pub const MESSAGE_BYTES_MAX: usize = 256 << 20;
/// The health-check name whose status says whether the node takes writes.
pub const WRITES_HEALTH_SERVICE: &str = "quiver.v1.Writes";
/// How often the writes' health is checked.
pub const WRITES_HEALTH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Sets [`WRITES_HEALTH_SERVICE`] from why writes are refused (`None`: they are taken), and
/// logs it unless it is the start and writes are taken.
async fn report_writes(
    health: &tonic_health::server::HealthReporter,
    refused: &Option<quiver_storage::WritesRefused>,
    at_start: bool,
) {
    match refused {
        Some(why) => tracing::warn!(reason = %why, "writes are refused; health {WRITES_HEALTH_SERVICE} is NOT_SERVING"),
        None if !at_start => tracing::info!("writes are taken again; health {WRITES_HEALTH_SERVICE} is SERVING"),
        None => {}
    }
    let status =
        if refused.is_some() { tonic_health::ServingStatus::NotServing } else { tonic_health::ServingStatus::Serving };
    health.set_service_status(WRITES_HEALTH_SERVICE, status).await;
}

/// Keeps [`WRITES_HEALTH_SERVICE`] NOT_SERVING while the engine refuses writes (it was last
/// reported for `refused`).
async fn watch_writes(
    db: Arc<Db>,
    health: tonic_health::server::HealthReporter,
    mut refused: Option<quiver_storage::WritesRefused>,
) {
    loop {
        tokio::time::sleep(WRITES_HEALTH_INTERVAL).await;
        let now = db.writes_refused();
        if now != refused {
            report_writes(&health, &now, false).await;
            refused = now;
        }
    }
}

/// Test-only: milliseconds added to this node's wall clock (negative: behind), to test that
/// clock skew decides which concurrent write wins, never whether regions converge.
pub const CLOCK_SKEW_ENV: &str = "QUIVER_TEST_CLOCK_SKEW_MS";

/// Test-only: the node's clock starts at this time (microseconds since the epoch) and moves
/// only when `AdminService.SetTestClock` sets it, so end-to-end tests give writes exact system
/// times.
pub const MANUAL_CLOCK_ENV: &str = "QUIVER_TEST_MANUAL_CLOCK_US";

/// Test-only: how often changed feature-group watermarks are stored, in milliseconds, instead
/// of `health::WATERMARK_PERSIST_INTERVAL` (so tests see them replicate without waiting a minute).
pub const WATERMARK_INTERVAL_ENV: &str = "QUIVER_TEST_WATERMARK_INTERVAL_MS";

/// Test-only: how often drift is measured for the gauges and `GetFeatureHealth`, in
/// milliseconds, instead of `drift::DRIFT_INTERVAL`.
pub const DRIFT_INTERVAL_ENV: &str = "QUIVER_TEST_DRIFT_INTERVAL_MS";

/// Test-only: how often the web UI samples the counters it charts, in milliseconds, instead of
/// `ui::UI_SAMPLE_INTERVAL`.
pub const UI_SAMPLE_INTERVAL_ENV: &str = "QUIVER_TEST_UI_SAMPLE_MS";

/// Test-only: every round of data-block reads first sleeps this many milliseconds (a slow SSD),
/// to show that online lookups with a deadline still answer from the hot tier in time.
pub const SSD_READ_DELAY_ENV: &str = "QUIVER_TEST_SSD_READ_DELAY_MS";

/// The value of the test-only switch `name`. Builds without the `testing` cargo feature (every
/// release build) have no test switches: one set in the environment is refused, so a test
/// never runs believing it injects faults it does not.
pub fn test_switch(name: &str) -> Result<Option<String>, String> {
    let value = std::env::var(name).ok();
    if cfg!(feature = "testing") || value.is_none() {
        return Ok(value);
    }
    Err(format!("{name} is set, but this quiverd was built without the `testing` feature (test-only switches)"))
}

/// [`test_switch`], parsed; a value that does not parse is refused, not ignored.
fn test_switch_value<T: std::str::FromStr>(name: &str) -> Result<Option<T>, String>
where
    T::Err: std::fmt::Display,
{
    match test_switch(name)? {
        Some(s) => s.parse().map(Some).map_err(|e| format!("{name}={s:?}: {e}")),
        None => Ok(None),
    }
}

/// The system clock moved by a fixed offset.
#[derive(Debug)]
struct SkewedClock(i64);

impl quiver_storage::Clock for SkewedClock {
    fn now_us(&self) -> u64 {
        quiver_storage::SystemClock.now_us().saturating_add_signed(self.0)
    }
}

/// How the memory budget is shared, in sixteenths. Together they are the whole budget, so
/// quiverd's resident memory stays within it:
/// - the hot tier, [`HOT_TIER_SIXTEENTHS`] (online reads are served from it);
/// - the tiles of windowed aggregates, [`TILE_CACHE_SIXTEENTHS`];
/// - the block cache, [`BLOCK_CACHE_SIXTEENTHS`], which also holds the open tables' indexes
///   and filters (blocks get what those leave);
/// - memtables, [`MEMTABLE_SIXTEENTHS`] each: the active one and one being flushed (writers
///   wait for the flush rather than freeze a third);
/// - requests in flight, 1/[`REQUEST_MEMORY_SHARE_DIVISOR`];
/// - a join's answers before they spill, 1/[`JOIN_MEMORY_SHARE_DIVISOR`];
/// - [`PROCESS_SIXTEENTHS`] for the process itself: threads, connections, a flush's or
///   compaction's buffers, the allocator's slack.
pub const HOT_TIER_SIXTEENTHS: usize = 6;
/// See [`HOT_TIER_SIXTEENTHS`].
pub const TILE_CACHE_SIXTEENTHS: usize = 1;
/// See [`HOT_TIER_SIXTEENTHS`].
pub const BLOCK_CACHE_SIXTEENTHS: usize = 3;
/// See [`HOT_TIER_SIXTEENTHS`].
pub const MEMTABLE_SIXTEENTHS: usize = 1;
/// Memtables: the active one and at most this many being flushed.
pub const IMMUTABLE_MEMTABLES: usize = 1;
/// See [`HOT_TIER_SIXTEENTHS`].
pub const PROCESS_SIXTEENTHS: usize = 1;
const _: () = assert!(
    HOT_TIER_SIXTEENTHS
        + TILE_CACHE_SIXTEENTHS
        + BLOCK_CACHE_SIXTEENTHS
        + MEMTABLE_SIXTEENTHS * (1 + IMMUTABLE_MEMTABLES)
        + 16 / REQUEST_MEMORY_SHARE_DIVISOR
        + 16 / JOIN_MEMORY_SHARE_DIVISOR
        + PROCESS_SIXTEENTHS
        == 16
);

/// What a server needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Durability of writes that do not ask for one.
    pub durability: Durability,
    /// Memory budget, in bytes (shared as [`HOT_TIER_SIXTEENTHS`] says).
    pub memory_budget_bytes: usize,
    /// Which backend reads data blocks (`auto` picks io_uring when the kernel offers it).
    pub io_backend: IoBackend,
    /// Read data blocks with `O_DIRECT` (where the file system takes it).
    pub direct_reads: bool,
    /// How new tables' data blocks are compressed.
    pub table_compression: Compression,
    /// This node's region and peers.
    pub cluster: ClusterConfig,
    /// Where this node registers as a shard of its region (`None`: not sharded). An empty
    /// `advertise` is filled with the address the API is bound to.
    pub shard: Option<crate::cluster::ShardConfig>,
    /// Bytes of flushed WAL kept for peers that have not applied them (with peers only).
    pub replication_log_bytes: u64,
    /// Threads per point-in-time join (`None`: one per core, at most `JOIN_THREADS_MAX`).
    pub join_threads: Option<usize>,
    /// How clients are authenticated (the token file is reread on SIGHUP).
    pub auth: AuthMode,
    /// The token this node's pullers present to its peers.
    pub peer_token: BearerToken,
    /// TLS for every gRPC connection, and mutual TLS toward peers (`None`: plaintext).
    pub tls: Option<crate::tls::TlsConfig>,
    /// The directory `Checkpoint` may write under (`None`: checkpoints are refused).
    pub checkpoint_root: Option<PathBuf>,
    /// Data requests served at once; more are shed with `RESOURCE_EXHAUSTED`.
    pub max_concurrent_requests: usize,
    /// Connections open at once; more are closed as they are accepted.
    pub max_connections: usize,
    /// How long a stop waits for requests in flight before it closes their connections.
    pub shutdown_timeout: std::time::Duration,
    /// The share of entities whose online answers are logged, for groups that do not say.
    pub log_sample_rate: f64,
    /// How long logged answers are kept.
    pub log_retention: std::time::Duration,
    /// Staged versions to shadow ("group@N" each).
    pub shadow: Vec<String>,
    /// The share of eligible lookups shadowed.
    pub shadow_sample_rate: f64,
}

/// How often retired versions are checked for a passed retention.
pub const RETIREMENT_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a stop waits for requests in flight, unless configured otherwise.
pub const SHUTDOWN_TIMEOUT_DEFAULT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a stopping daemon waits for the last holders of the engine (streams to peers
/// ending) before it closes the engine through its drop.
pub const SHUTDOWN_ENGINE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Where a server listens: the API (gRPC and Arrow Flight), and optionally the metrics and the
/// web UI (crate::ui; loopback only).
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC port.
    pub api: tokio::net::TcpListener,
    /// `GET /metrics`.
    pub metrics: Option<tokio::net::TcpListener>,
    /// The web UI.
    pub ui: Option<tokio::net::TcpListener>,
}

impl Listeners {
    /// The API alone.
    pub fn api(api: tokio::net::TcpListener) -> Listeners {
        Listeners { api, metrics: None, ui: None }
    }
}

/// The addresses a server is bound to, as [`serve`] reports them when ready.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The gRPC port.
    pub api: std::net::SocketAddr,
    /// `GET /metrics`, when on.
    pub metrics: Option<std::net::SocketAddr>,
    /// The web UI, when on.
    pub ui: Option<std::net::SocketAddr>,
}

/// Opens the engine in `cfg.data_dir` and serves the API on `listeners` until `shutdown`
/// completes; then finishes in-flight requests and closes the engine (syncing the WAL).
/// `ready` is called with the bound addresses once the engine is open.
pub async fn serve(
    cfg: ServeConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
    ready: impl FnOnce(Bound),
) -> Result<(), String> {
    let Listeners { api: listener, metrics: metrics_listener, ui: ui_listener } = listeners;
    if let Some(l) = &ui_listener {
        crate::ui::check_listen(l.local_addr().map_err(|e| e.to_string())?)?;
    }
    let budget = cfg.memory_budget_bytes;
    let opts = Options {
        // Online lookups are served from the hot tier (complete on a fresh engine while the
        // online set fits): it gets the largest share.
        memtable_bytes: budget / 16 * MEMTABLE_SIXTEENTHS,
        immutable_memtables_max: IMMUTABLE_MEMTABLES,
        hot_tier_bytes: budget / 16 * HOT_TIER_SIXTEENTHS,
        tile_cache_bytes: budget / 16 * TILE_CACHE_SIXTEENTHS,
        block_cache_bytes: budget / 16 * BLOCK_CACHE_SIXTEENTHS,
        io_backend: cfg.io_backend,
        direct_reads: cfg.direct_reads,
        compression: cfg.table_compression,
        region: cfg.cluster.region,
        // Peers and moves of slots (a sharded node is a move's source) read the node's log.
        replication_log_bytes: if cfg.cluster.peers.is_empty() && cfg.shard.is_none() {
            0
        } else {
            cfg.replication_log_bytes
        },
        // The in-memory tail of the log is part of what is retained, within the same bound.
        replication_tail_bytes: REPLICATION_TAIL_BYTES_MAX.min(cfg.replication_log_bytes as usize),
        // The registry and the monitoring watermarks replicate with the data.
        replicated_prefixes: vec![crate::registry::PREFIX.to_vec(), quiver_storage::reserved::MONITOR.to_vec()],
        served_log_retention: Some(cfg.log_retention),
        ..Options::default()
    };
    let skew_ms: Option<i64> = test_switch_value(CLOCK_SKEW_ENV)?;
    let manual = test_switch_value::<u64>(MANUAL_CLOCK_ENV)?.map(quiver_storage::ManualClock::new);
    let chaos_seed: Option<u64> = test_switch_value(crate::replication::CHAOS_ENV)?;
    let opts = match (skew_ms, &manual) {
        (Some(_), Some(_)) => return Err(format!("{CLOCK_SKEW_ENV} and {MANUAL_CLOCK_ENV} exclude each other")),
        (Some(ms), None) => {
            tracing::warn!(skew_ms = ms, "test clock skew is on");
            Options { clock: Arc::new(SkewedClock(ms.saturating_mul(1000))), ..opts }
        }
        (None, Some(clock)) => {
            tracing::warn!("the manual test clock is on: system times move only when SetTestClock sets them");
            Options { clock: Arc::new(clock.clone()), ..opts }
        }
        (None, None) => opts,
    };
    cfg.cluster.check()?;
    let auth = Authenticator::new(cfg.auth.clone())?;
    match auth.mode() {
        AuthMode::None => tracing::warn!(
            "AUTHENTICATION IS OFF (auth = \"none\"): anyone who reaches {} may read, write and administer \
             everything; use a token file outside local development",
            listener.local_addr().map(|a| a.to_string()).unwrap_or_default()
        ),
        AuthMode::Tokens(path) => {
            tracing::info!(tokens = %path.display(), "clients authenticate with bearer tokens (SIGHUP rereads the file)")
        }
    }
    let db = Arc::new(Db::open(&cfg.data_dir, opts).map_err(|e| format!("opening {}: {e}", cfg.data_dir.display()))?);
    let ssd_read_delay_ms: Option<u64> = test_switch_value(SSD_READ_DELAY_ENV)?;
    #[cfg(feature = "testing")]
    if let Some(ms) = ssd_read_delay_ms {
        tracing::warn!(ms, "test switch: every round of SSD reads is delayed");
        db.set_ssd_read_delay(std::time::Duration::from_millis(ms));
    }
    #[cfg(not(feature = "testing"))]
    let _ = ssd_read_delay_ms; // Refused above: set without the `testing` feature.
    let checkpoint_root = match &cfg.checkpoint_root {
        Some(root) => Some(crate::checkpoint::CheckpointRoot::new(root, &cfg.data_dir)?),
        None => None,
    };
    let ssd = db.stats().ssd;
    tracing::info!(backend = ssd.backend, direct = ssd.direct, "data blocks are read with {}", ssd.backend);
    let clustered = (!cfg.cluster.peers.is_empty()).then_some(cfg.cluster.region);
    let registry =
        Arc::new(Registry::open_in_cluster(db.clone(), clustered).map_err(|e| format!("loading the registry: {e}"))?);
    let transport = crate::replication::Transport {
        chaos_seed,
        token: cfg.peer_token.clone(),
        tls: cfg.tls.as_ref().and_then(|t| t.peer_client()),
        ..Default::default()
    };
    let replicator = Replicator::with_transport(db.clone(), registry.clone(), &cfg.cluster, transport);
    let peer_regions: Vec<u32> = cfg.cluster.peers.iter().map(|p| p.region).collect();
    let shadow = Arc::new(crate::shadow::Shadow::new(&cfg.shadow, cfg.shadow_sample_rate)?);
    let mut feature_health = crate::health::Health::new(registry.clone(), cfg.cluster.region, &peer_regions)?;
    feature_health.set_shadow(shadow.clone());
    if let Some(ms) = test_switch_value::<u64>(WATERMARK_INTERVAL_ENV)? {
        feature_health.set_persist_interval(std::time::Duration::from_millis(ms.max(1)));
    }
    let feature_health = Arc::new(feature_health);
    // A join's answers stay in memory up to 1/16 of the budget, then spill.
    let served_log = Arc::new(crate::servedlog::ServedLog::start(db.clone(), cfg.cluster.region, cfg.log_sample_rate)?);
    let mut features = Features::new(registry.clone(), cfg.durability)
        .with_join_spill_bytes(budget / JOIN_MEMORY_SHARE_DIVISOR)
        .with_health(feature_health.clone())
        .with_served_log(served_log.clone())
        .with_shadow(shadow.clone());
    if let Some(n) = cfg.join_threads {
        features = features.with_join_threads(n);
    }
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let cluster = match cfg.shard.clone() {
        Some(mut shard) => {
            if shard.advertise.is_empty() {
                shard.advertise = addr.to_string();
            }
            shard.region = cfg.cluster.region;
            // Read (or made) now that the engine holds the directory's LOCK.
            shard.instance = crate::cluster::instance_id(&cfg.data_dir)?;
            let cluster = crate::cluster::Cluster::new(shard)?;
            features = features.with_cluster(cluster.clone());
            // Each node of a sharded region pulls its own slots from every node of its peers'
            // regions, under its own stream (server/CLUSTER.md §7).
            replicator.set_shard(cluster.clone());
            Some(cluster)
        }
        None => None,
    };
    let features = Arc::new(features);
    // Toward the other nodes of a sharded region: TLS when this node speaks it, verifying them
    // against its CA.
    let forward_tls = match &cfg.tls {
        Some(tls) if features.forwards() => Some(tls.peer_client().ok_or(
            "a sharded node with TLS forwards to the others over TLS: it needs the CA to verify them \
             (--tls-ca), or --no-forward",
        )?),
        _ => None,
    };
    let forwarder = Arc::new(crate::forward::Forwarder::new(forward_tls, MESSAGE_BYTES_MAX));
    if !shadow.is_empty() {
        shadow.start(Arc::downgrade(&features))?;
        tracing::info!(targets = ?cfg.shadow, rate = cfg.shadow_sample_rate, "shadow reads on");
    }
    let admission = Admission::new(cfg.max_concurrent_requests, budget / REQUEST_MEMORY_SHARE_DIVISOR);
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let conn_stats = Arc::new(crate::conn::ConnStats::default());
    let metrics = Metrics::new(
        db.clone(),
        replicator.clone(),
        admission.clone(),
        conn_stats.clone(),
        auth.clone(),
        feature_health.clone(),
        served_log.clone(),
    )?;
    let mover = match &cluster {
        Some(c) => {
            let m = Arc::new(
                crate::moving::Mover::new(c.clone(), db.clone(), forwarder.clone())?
                    .with_replicator(replicator.clone()),
            );
            metrics.register(m.collectors())?;
            Some(m)
        }
        None => None,
    };
    let persist_task = tokio::spawn(feature_health.clone().persist_every_interval());
    // Retired versions pass their retention with time alone: hand their ids to compaction.
    let retire_task = {
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RETIREMENT_CHECK_INTERVAL);
            loop {
                tick.tick().await;
                let r = registry.clone();
                let _ = tokio::task::spawn_blocking(move || r.refresh_dropped_features()).await;
            }
        })
    };
    let drift_interval = test_switch_value::<u64>(DRIFT_INTERVAL_ENV)?
        .map_or(crate::drift::DRIFT_INTERVAL, |ms| std::time::Duration::from_millis(ms.max(1)));
    let drift_task = tokio::spawn(crate::drift::measure_every_interval(
        registry.clone(),
        served_log.clone(),
        feature_health.clone(),
        drift_interval,
    ));
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr().map_err(|e| e.to_string())?),
        None => None,
    };
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = metrics_listener.map(|l| {
        tokio::spawn(crate::metrics::serve(metrics.clone(), l, async {
            let _ = metrics_stopped.await;
        }))
    });
    let (health_reporter, health) = tonic_health::server::health_reporter();
    for name in [
        "quiver.v1.FeatureService",
        "quiver.v1.RegistryService",
        "quiver.v1.AdminService",
        "quiver.v1.ReplicationService",
        "quiver.v1.MonitorService",
        "quiver.v1.ClusterService",
        "",
    ] {
        health_reporter.set_service_status(name, tonic_health::ServingStatus::Serving).await;
    }
    // Readiness for writes: NOT_SERVING while the engine refuses them (a full disk, a read-only
    // open, an I/O error); the rest stays SERVING while reads work.
    let refused = db.writes_refused();
    report_writes(&health_reporter, &refused, true).await;
    let write_health = tokio::spawn(watch_writes(db.clone(), health_reporter.clone(), refused));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(quiver_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))?;
    // Every service but health and reflection authenticates its calls (crate::auth).
    // Request messages are reserved against the requests' memory as they arrive, and refused
    // over their service's size limit, before tonic buffers them (crate::admission).
    let feature_api = FeatureApi::new(features.clone(), metrics.clone(), admission.clone())
        .with_stopping(stopping_rx.clone())
        .with_forwarder(forwarder.clone());
    let feature_svc = crate::admission::HoldTickets(AdmitRequests::new(
        InterceptedService::new(
            pb::feature_service_server::FeatureServiceServer::new(feature_api.clone())
                .max_decoding_message_size(MESSAGE_BYTES_MAX)
                .max_encoding_message_size(MESSAGE_BYTES_MAX),
            auth.interceptor(None),
        ),
        admission.clone(),
        MESSAGE_BYTES_MAX,
    ));
    // Arrow Flight (joins out, bulk writes in) behind the same tokens and admission.
    let flight_svc = AdmitRequests::new(
        InterceptedService::new(
            arrow_flight::flight_service_server::FlightServiceServer::new(crate::flight::FlightApi::new(feature_api))
                .max_decoding_message_size(MESSAGE_BYTES_MAX)
                .max_encoding_message_size(MESSAGE_BYTES_MAX),
            auth.interceptor(None),
        ),
        admission.clone(),
        MESSAGE_BYTES_MAX,
    );
    let registry_svc = AdmitRequests::new(
        InterceptedService::new(
            pb::registry_service_server::RegistryServiceServer::new(
                RegistryApi::new(registry.clone(), metrics.clone()).with_shadow(shadow.clone()),
            )
            .max_decoding_message_size(MESSAGE_BYTES_MAX),
            auth.interceptor(None),
        ),
        admission.clone(),
        MESSAGE_BYTES_MAX,
    );
    let monitor_svc = AdmitRequests::new(
        InterceptedService::new(
            pb::monitor_service_server::MonitorServiceServer::new(
                crate::service::MonitorApi::new(
                    feature_health.clone(),
                    served_log.clone(),
                    registry.clone(),
                    metrics.clone(),
                )
                .with_features(features.clone())
                .with_stopping(stopping_rx.clone()),
            )
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX),
            auth.interceptor(None),
        ),
        admission.clone(),
        MESSAGE_BYTES_MAX,
    );
    let admin_svc = AdmitRequests::new(
        InterceptedService::new(
            pb::admin_service_server::AdminServiceServer::new(
                AdminApi::new(db.clone(), registry.clone(), metrics.clone(), replicator.clone())
                    .with_test_clock(manual)
                    .with_checkpoint_root(checkpoint_root),
            )
            .max_decoding_message_size(MESSAGE_BYTES_MAX),
            auth.interceptor(Some(Scope::Admin)),
        ),
        admission.clone(),
        MESSAGE_BYTES_MAX,
    );
    let cluster_svc = AdmitRequests::new(
        InterceptedService::new(
            pb::cluster_service_server::ClusterServiceServer::new(crate::service::ClusterApi::new(
                cluster.clone(),
                mover.clone(),
            ))
            .max_decoding_message_size(crate::moving::MOVE_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(crate::moving::MOVE_MESSAGE_BYTES_MAX),
            auth.interceptor(None),
        ),
        admission.clone(),
        MESSAGE_BYTES_MAX,
    );
    let replication_svc = AdmitRequests::new(
        crate::replication::service(replicator.clone(), &auth),
        admission.clone(),
        crate::replication::REPLICATION_MESSAGE_BYTES_MAX,
    );
    let reload_task = matches!(auth.mode(), AuthMode::Tokens(_)).then(|| tokio::spawn(reload_on_hangup(auth.clone())));
    let incoming = crate::conn::incoming(listener, cfg.max_connections, conn_stats);
    // The web UI, last: nothing below returns early before the server runs.
    let ui_sample_interval = test_switch_value::<u64>(UI_SAMPLE_INTERVAL_ENV)?
        .map_or(crate::ui::UI_SAMPLE_INTERVAL, std::time::Duration::from_millis);
    let ui_addr = match &ui_listener {
        Some(l) => Some(l.local_addr().map_err(|e| e.to_string())?),
        None => None,
    };
    let (ui_stop, ui_stopped) = tokio::sync::oneshot::channel::<()>();
    let (ui_task, history_task) = match ui_listener {
        Some(l) => {
            let history = crate::ui::History::new(feature_health.clone(), ui_sample_interval);
            let monitor = crate::service::MonitorApi::new(
                feature_health.clone(),
                served_log.clone(),
                registry.clone(),
                metrics.clone(),
            )
            .with_features(features.clone())
            .with_stopping(stopping_rx.clone());
            let ui = crate::ui::Ui::new(
                auth.clone(),
                RegistryApi::new(registry.clone(), metrics.clone()).with_shadow(shadow.clone()),
                monitor,
                AdminApi::new(db.clone(), registry.clone(), metrics.clone(), replicator.clone()),
                history.clone(),
                cfg.cluster.region,
            );
            let serve_ui = crate::ui::serve(ui, l, async {
                let _ = ui_stopped.await;
            });
            (Some(tokio::spawn(serve_ui)), Some(tokio::spawn(history.sample_every_interval())))
        }
        None => (None, None),
    };
    ready(Bound { api: addr, metrics: metrics_addr, ui: ui_addr });
    let pullers = replicator.start();
    // A shard registers in etcd and follows the slot map until the server stops.
    let cluster_task = cluster.clone().map(|c| tokio::spawn(c.run(stopping_rx.clone())));
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), "serving");
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(crate::conn::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(crate::conn::KEEPALIVE_TIMEOUT));
    if let Some(tls) = &cfg.tls {
        builder = builder.tls_config(tls.server()).map_err(|e| format!("TLS: {e}"))?;
    }
    let mut server = Box::pin(
        builder
            .add_service(health)
            .add_service(reflection)
            .add_service(feature_svc)
            .add_service(flight_svc)
            .add_service(registry_svc)
            .add_service(admin_svc)
            .add_service(monitor_svc)
            .add_service(cluster_svc)
            .add_service(replication_svc)
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.await;
                tracing::info!("stopping: no new connections; open streams end with UNAVAILABLE");
                let _ = stopping_tx.send(true);
                // The UI stops with the API, so that its reads drain within the same deadline.
                let _ = ui_stop.send(());
            }),
    );
    // The stop has a deadline: past it the server stops waiting for open connections. Their
    // tasks (spawned by the server) end with the runtime when `main` returns, right after the
    // engine is closed below. (The signal's sender lives in the server future: the wait below
    // ends early only if the server has returned, and then the first branch has won.)
    let mut stopping = stopping_rx.clone();
    let deadline = cfg.shutdown_timeout;
    tokio::select! {
        r = &mut server => r.map_err(|e| format!("server: {e}"))?,
        _ = async move {
            let _ = stopping.wait_for(|s| *s).await;
            tokio::time::sleep(deadline).await;
        } => tracing::warn!(deadline_s = deadline.as_secs_f64(), "shutdown deadline passed: not waiting for the connections still open"),
    }
    drop(server);
    // The UI holds the services (and through them the engine); it was told to stop with the
    // server (its open connections are cut).
    if let Some(t) = ui_task {
        let _ = t.await;
    }
    if let Some(t) = history_task {
        t.abort();
        let _ = t.await;
    }
    if let Some(t) = reload_task {
        t.abort();
    }
    write_health.abort();
    if let Some(t) = cluster_task {
        let _ = t.await;
    }
    replicator.shutdown();
    for p in pullers.into_iter().chain(replicator.take_spawned()) {
        let _ = p.await;
    }
    drop(replicator);
    // The watermarks written since the last interval, so that a restart knows them.
    persist_task.abort();
    let _ = persist_task.await;
    retire_task.abort();
    let _ = retire_task.await;
    drift_task.abort();
    let _ = drift_task.await;
    if let Err(e) = feature_health.persist() {
        tracing::warn!(error = %e, "feature group watermarks not stored at stop");
    }
    drop(feature_health);
    // The answers still queued for the log are written before the engine closes.
    served_log.close();
    drop(served_log);
    // The feature service (kept here for the monitor's replays) and the registry (kept for the
    // UI's services) hold the engine too.
    drop(features);
    drop(registry);
    // The metrics endpoint holds the engine (and the replicator): stop it first, so that the
    // wait below only waits for what may really still run.
    let _ = metrics_stop.send(());
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    drop(metrics);
    // Streams to peers end within a poll once the server is gone; wait for them to let go of
    // the engine so it closes cleanly (at most SHUTDOWN_ENGINE_WAIT).
    let deadline = std::time::Instant::now() + SHUTDOWN_ENGINE_WAIT;
    while Arc::strong_count(&db) > 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Requests are finished; close the engine (stops background work, syncs the WAL).
    match Arc::try_unwrap(db) {
        Ok(db) => db.close().map_err(|e| format!("closing: {e}"))?,
        Err(db) => {
            tracing::warn!("engine still referenced at shutdown; syncing through drop");
            drop(db);
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Rereads the token file on every SIGHUP; a file that does not load leaves the tokens in force.
async fn reload_on_hangup(auth: Arc<Authenticator>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: the token file will not be reread");
        return;
    };
    while hup.recv().await.is_some() {
        match auth.reload() {
            Ok(n) => tracing::info!(tokens = n, "token file reread"),
            Err(e) => tracing::error!(error = %e, "token file not reread; the tokens in force stay"),
        }
    }
}
