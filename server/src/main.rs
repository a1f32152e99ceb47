//! `quiverd`: the Quiver daemon. One data directory, the gRPC API (feature, registry and admin
//! services, plus standard health checking and reflection), graceful shutdown on SIGTERM.
//!
//! Configuration, highest precedence first: command-line flags, `QUIVER_*` environment
//! variables, the TOML file given by `--config`, defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use quiver_server::admission::{REQUESTS_IN_FLIGHT_MAX, REQUESTS_IN_FLIGHT_MAX_DEFAULT};
use quiver_server::auth::{AuthMode, BearerToken};
use quiver_server::cluster::{ShardConfig, CLUSTER_NAME_DEFAULT};
use quiver_server::conn::{CONNECTIONS_MAX, CONNECTIONS_MAX_DEFAULT};
use quiver_server::daemon::{serve, Listeners, ServeConfig, SHUTDOWN_TIMEOUT_DEFAULT};
use quiver_server::features::JOIN_THREADS_MAX;
use quiver_server::replication::{ClusterConfig, Peer};
use quiver_server::tls::TlsConfig;
use quiver_storage::sstable::IoBackend;
use quiver_storage::{Compression, Durability};
use serde::Deserialize;

/// Default memory budget: memtables plus block cache.
const MEMORY_BUDGET_MB_DEFAULT: u64 = 512;
/// Largest memory budget accepted (1 TiB).
const MEMORY_BUDGET_MB_MAX: u64 = 1 << 20;
/// Smallest memory budget accepted.
const MEMORY_BUDGET_MB_MIN: u64 = 16;

/// Flushed WAL kept for peers that have not applied it, by default (MiB); past it, a peer
/// that needs older batches is bootstrapped from a snapshot.
const REPLICATION_LOG_MB_DEFAULT: u64 = 1024;
/// Largest replication log bound accepted (MiB).
const REPLICATION_LOG_MB_MAX: u64 = 1 << 20;

/// Whether data blocks bypass the page cache unless configured otherwise.
const DIRECT_READS_DEFAULT: bool = true;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "quiverd", version, about = "The Quiver feature store daemon")]
struct Args {
    /// Data directory (created if missing).
    #[arg(long, env = "QUIVER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC listen address (port 0 picks a free port; the address is printed at start).
    #[arg(long, env = "QUIVER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Durability of writes that do not ask for one: "sync" or "async".
    #[arg(long, env = "QUIVER_DURABILITY")]
    durability: Option<String>,
    /// The web UI's address (loopback only; off unless given), e.g. 127.0.0.1:8080.
    #[arg(long, env = "QUIVER_UI_LISTEN")]
    ui_listen: Option<SocketAddr>,
    /// Prometheus metrics address (`GET /metrics`), or "off".
    #[arg(long, env = "QUIVER_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Memory budget in MiB for memtables, the hot tier and the block cache.
    #[arg(long, env = "QUIVER_MEMORY_BUDGET_MB")]
    memory_budget_mb: Option<u64>,
    /// How data blocks are read: "auto" (io_uring when the kernel offers it, else pread),
    /// "io_uring" (refuse to start without it) or "pread".
    #[arg(long, env = "QUIVER_IO_BACKEND")]
    io_backend: Option<String>,
    /// Read data blocks with O_DIRECT, so the block cache is their only cache (true), or
    /// through the page cache (false).
    #[arg(long, env = "QUIVER_DIRECT_READS")]
    direct_reads: Option<bool>,
    /// How new tables' data blocks are compressed: "lz4" (default; fastest to read), "zstd"
    /// (level 1; half the disk of lz4 on the join benchmark's tables) or "zstd:LEVEL" (-7 to
    /// 22), or "none". Tables already written keep theirs.
    #[arg(long, env = "QUIVER_TABLE_COMPRESSION")]
    table_compression: Option<String>,
    /// This node's region (0 to 63): stamped on every write's version vector.
    #[arg(long, env = "QUIVER_REGION")]
    region: Option<u32>,
    /// A peer region to replicate with, as REGION=HOST:PORT (repeat for each peer).
    #[arg(long = "peer", env = "QUIVER_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// etcd endpoints (http://host:port, comma-separated): this node is a shard of a sharded
    /// region (server/CLUSTER.md) and serves only the slots the map in etcd gives it.
    #[arg(long, env = "QUIVER_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// This node's id in its sharded region (letters, digits, '-', '_', '.'; at most 64 bytes).
    #[arg(long, env = "QUIVER_NODE_ID")]
    node_id: Option<String>,
    /// The sharded region's name: its keys in etcd live under /quiver/NAME/. Default "quiver".
    #[arg(long = "cluster", env = "QUIVER_CLUSTER")]
    cluster_name: Option<String>,
    /// The address clients and other nodes reach this node at (host:port). Default: the
    /// listen address, which must then not be unspecified (0.0.0.0).
    #[arg(long, env = "QUIVER_ADVERTISE")]
    advertise: Option<String>,
    /// In a sharded region, refuse what this node does not own (FAILED_PRECONDITION naming the
    /// owner) instead of forwarding it to the owner (server/CLUSTER.md §4).
    #[arg(long, env = "QUIVER_NO_FORWARD")]
    no_forward: bool,
    /// MiB of flushed WAL kept for peers that have not applied it yet (with peers only).
    #[arg(long, env = "QUIVER_REPLICATION_LOG_MB")]
    replication_log_mb: Option<u64>,
    /// Threads one point-in-time join reads and answers with (1 to 8; default: one per core,
    /// at most 8).
    #[arg(long, env = "QUIVER_JOIN_THREADS")]
    join_threads: Option<usize>,
    /// How clients authenticate: "tokens" (bearer tokens from --auth-tokens) or "none" (local
    /// development only; on a non-loopback address it must be asked for). Default: "tokens"
    /// when a token file is given, else "none" on loopback.
    #[arg(long, env = "QUIVER_AUTH")]
    auth: Option<String>,
    /// The token file (`quiver auth create` writes it; SIGHUP rereads it).
    #[arg(long, env = "QUIVER_AUTH_TOKENS")]
    auth_tokens: Option<PathBuf>,
    /// A file holding the token this node presents to its peers (a replication token for its
    /// region, created on each peer).
    #[arg(long, env = "QUIVER_PEER_TOKEN_FILE")]
    peer_token_file: Option<PathBuf>,
    /// The node's TLS certificate chain (PEM): with --tls-key, every gRPC connection is TLS.
    #[arg(long, env = "QUIVER_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The node's TLS private key (PEM).
    #[arg(long, env = "QUIVER_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// The deployment's CA (PEM): verifies client certificates (optional for clients; a peer's
    /// names its region) and peers' server certificates.
    #[arg(long, env = "QUIVER_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// The directory checkpoints may be written under (created if missing; without it the
    /// Checkpoint RPC is refused).
    #[arg(long, env = "QUIVER_CHECKPOINT_ROOT")]
    checkpoint_root: Option<PathBuf>,
    /// Data requests (lookups, writes, joins, scans) served at once; more are refused with
    /// RESOURCE_EXHAUSTED and retry advice.
    #[arg(long, env = "QUIVER_MAX_CONCURRENT_REQUESTS")]
    max_concurrent_requests: Option<usize>,
    /// Connections open at once; more are closed as they are accepted.
    #[arg(long, env = "QUIVER_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Milliseconds a stop waits for requests in flight (open streams end with UNAVAILABLE)
    /// before it closes the connections still open.
    #[arg(long, env = "QUIVER_SHUTDOWN_TIMEOUT_MS")]
    shutdown_timeout_ms: Option<u64>,
    /// The share (0 to 1) of entities whose online answers are logged, by a stable hash of the
    /// entity key; a group's log_sample_rate overrides it. Default 0: no logging.
    #[arg(long, env = "QUIVER_LOG_SAMPLE_RATE")]
    log_sample_rate: Option<f64>,
    /// Hours logged answers are kept (compaction drops older ones). Default 168 (7 days).
    #[arg(long, env = "QUIVER_LOG_RETENTION_HOURS")]
    log_retention_hours: Option<u64>,
    /// Shadow a staged version ("group@N", repeatable): a sample of online lookups of the
    /// group's serving version is read again from version N and compared (quiver monitor).
    #[arg(long = "shadow")]
    shadow: Vec<String>,
    /// The share (above 0, at most 1) of eligible lookups shadowed. Default 0.01.
    #[arg(long, env = "QUIVER_SHADOW_SAMPLE_RATE")]
    shadow_sample_rate: Option<f64>,
    /// A TOML file with any of: data_dir, listen, durability, memory_budget_mb, metrics_listen,
    /// ui_listen, io_backend, direct_reads, table_compression, region, peers (a list of "REGION=HOST:PORT"),
    /// etcd (a list of endpoints), node_id, cluster, advertise, forward (a bool),
    /// replication_log_mb, join_threads, auth, auth_tokens, peer_token_file, tls_cert, tls_key,
    /// tls_ca, checkpoint_root, max_concurrent_requests, max_connections, shutdown_timeout_ms,
    /// log_sample_rate, log_retention_hours, shadow (a list of "group@N"), shadow_sample_rate.
    #[arg(long, env = "QUIVER_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    durability: Option<String>,
    memory_budget_mb: Option<u64>,
    metrics_listen: Option<String>,
    ui_listen: Option<SocketAddr>,
    io_backend: Option<String>,
    direct_reads: Option<bool>,
    table_compression: Option<String>,
    region: Option<u32>,
    peers: Option<Vec<String>>,
    etcd: Option<Vec<String>>,
    node_id: Option<String>,
    cluster: Option<String>,
    advertise: Option<String>,
    forward: Option<bool>,
    replication_log_mb: Option<u64>,
    join_threads: Option<usize>,
    auth: Option<String>,
    auth_tokens: Option<PathBuf>,
    peer_token_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    checkpoint_root: Option<PathBuf>,
    max_concurrent_requests: Option<usize>,
    max_connections: Option<usize>,
    shutdown_timeout_ms: Option<u64>,
    log_sample_rate: Option<f64>,
    log_retention_hours: Option<u64>,
    shadow: Option<Vec<String>>,
    shadow_sample_rate: Option<f64>,
}

#[derive(Debug)]
struct Config {
    data_dir: PathBuf,
    listen: SocketAddr,
    durability: Durability,
    memory_budget_mb: u64,
    metrics_listen: Option<SocketAddr>,
    ui_listen: Option<SocketAddr>,
    io_backend: IoBackend,
    direct_reads: bool,
    table_compression: Compression,
    cluster: ClusterConfig,
    shard: Option<ShardConfig>,
    replication_log_mb: u64,
    join_threads: Option<usize>,
    auth: AuthMode,
    peer_token: BearerToken,
    tls: Option<TlsConfig>,
    checkpoint_root: Option<PathBuf>,
    max_concurrent_requests: usize,
    max_connections: usize,
    shutdown_timeout: std::time::Duration,
    log_sample_rate: f64,
    log_retention: std::time::Duration,
    shadow: Vec<String>,
    shadow_sample_rate: f64,
}

/// Longest `--log-retention-hours` (ten years).
const LOG_RETENTION_HOURS_MAX: u64 = 10 * 366 * 24;

/// Longest `--shutdown-timeout-ms` (an hour).
const SHUTDOWN_TIMEOUT_MS_MAX: u64 = 3_600_000;

fn config(args: Args) -> Result<Config, String> {
    let file = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("config {}: {e}", p.display()))?;
            toml::from_str::<FileConfig>(&text).map_err(|e| format!("config {}: {e}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .ok_or("--data-dir (or QUIVER_DATA_DIR, or data_dir in the config) is required")?;
    let listen = args.listen.or(file.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051)));
    let durability = match args.durability.or(file.durability).as_deref() {
        None | Some("sync") => Durability::Sync,
        Some("async") => Durability::Async,
        Some(other) => return Err(format!("durability must be \"sync\" or \"async\", not {other:?}")),
    };
    let memory_budget_mb = args.memory_budget_mb.or(file.memory_budget_mb).unwrap_or(MEMORY_BUDGET_MB_DEFAULT);
    if !(MEMORY_BUDGET_MB_MIN..=MEMORY_BUDGET_MB_MAX).contains(&memory_budget_mb) {
        return Err(format!("memory budget must be {MEMORY_BUDGET_MB_MIN} to {MEMORY_BUDGET_MB_MAX} MiB"));
    }
    let metrics_listen = match args.metrics_listen.or(file.metrics_listen).as_deref() {
        None => Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        Some("off") => None,
        Some(a) => Some(a.parse().map_err(|_| format!("metrics address {a:?} is not host:port or \"off\""))?),
    };
    let ui_listen = args.ui_listen.or(file.ui_listen);
    if let Some(a) = ui_listen {
        quiver_server::ui::check_listen(a)?;
    }
    let io_backend = match args.io_backend.or(file.io_backend) {
        None => IoBackend::Auto,
        Some(b) => b.parse()?,
    };
    let direct_reads = args.direct_reads.or(file.direct_reads).unwrap_or(DIRECT_READS_DEFAULT);
    let table_compression = match args.table_compression.or(file.table_compression) {
        None => quiver_storage::Options::default().compression,
        Some(c) => c.parse()?,
    };
    let peers = if args.peers.is_empty() { file.peers.unwrap_or_default() } else { args.peers };
    let cluster = ClusterConfig {
        region: args.region.or(file.region).unwrap_or(0),
        peers: peers.iter().map(|p| p.parse::<Peer>()).collect::<Result<_, _>>()?,
    };
    cluster.check()?;
    let etcd = if args.etcd.is_empty() { file.etcd.unwrap_or_default() } else { args.etcd };
    let node_id = args.node_id.or(file.node_id);
    let cluster_name = args.cluster_name.or(file.cluster);
    let advertise = args.advertise.or(file.advertise);
    let forward = if args.no_forward { Some(false) } else { file.forward };
    let shard = match (etcd.is_empty(), node_id) {
        (true, None) if cluster_name.is_none() && advertise.is_none() && forward.is_none() => None,
        (true, _) => return Err("node_id, cluster, advertise and forward need etcd endpoints (--etcd)".into()),
        (false, None) => return Err("a sharded node (--etcd) needs its id (--node-id)".into()),
        (false, Some(node)) => {
            if advertise.is_none() && listen.ip().is_unspecified() {
                return Err(format!("listening on {listen}: say where clients reach this node (--advertise)"));
            }
            let shard = ShardConfig {
                node,
                cluster: cluster_name.unwrap_or_else(|| CLUSTER_NAME_DEFAULT.to_string()),
                etcd,
                advertise: advertise.unwrap_or_default(),
                region: cluster.region,
                forward: forward.unwrap_or(true),
                instance: String::new(),
            };
            quiver_server::cluster::check_name("node id", &shard.node)?;
            quiver_server::cluster::check_name("cluster name", &shard.cluster)?;
            Some(shard)
        }
    };
    let replication_log_mb = args.replication_log_mb.or(file.replication_log_mb).unwrap_or(REPLICATION_LOG_MB_DEFAULT);
    if replication_log_mb > REPLICATION_LOG_MB_MAX {
        return Err(format!("replication log must be at most {REPLICATION_LOG_MB_MAX} MiB"));
    }
    let join_threads = args.join_threads.or(file.join_threads);
    if join_threads.is_some_and(|n| !(1..=JOIN_THREADS_MAX).contains(&n)) {
        return Err(format!("join threads must be 1 to {JOIN_THREADS_MAX}"));
    }
    let auth = match (args.auth.or(file.auth).as_deref(), args.auth_tokens.or(file.auth_tokens)) {
        (None | Some("tokens"), Some(path)) => AuthMode::Tokens(path),
        (Some("tokens"), None) => return Err("auth \"tokens\" needs a token file (--auth-tokens)".into()),
        (Some("none"), Some(_)) => return Err("auth \"none\" and a token file exclude each other".into()),
        (Some("none"), None) => AuthMode::None,
        (None, None) if listen.ip().is_loopback() => AuthMode::None,
        (None, None) => {
            return Err(format!(
                "listening on {listen} without authentication: give a token file (--auth-tokens), or --auth none \
                 to serve everyone who can reach it"
            ))
        }
        (Some(other), _) => return Err(format!("auth must be \"tokens\" or \"none\", not {other:?}")),
    };
    let peer_token = match args.peer_token_file.or(file.peer_token_file) {
        Some(p) => BearerToken::from_file(&p)?,
        None => BearerToken::default(),
    };
    let tls = match (args.tls_cert.or(file.tls_cert), args.tls_key.or(file.tls_key), args.tls_ca.or(file.tls_ca)) {
        (Some(cert), Some(key), ca) => Some(TlsConfig::load(&cert, &key, ca.as_deref())?),
        (None, None, None) => None,
        (None, None, Some(_)) => {
            return Err("tls_ca needs the node's own certificate and key (tls_cert, tls_key)".into())
        }
        _ => return Err("tls_cert and tls_key go together".into()),
    };
    if tls.as_ref().is_some_and(|t| t.peer_client().is_none()) && !cluster.peers.is_empty() {
        return Err("a node with TLS and peers needs tls_ca to verify them".into());
    }
    let max_concurrent_requests =
        args.max_concurrent_requests.or(file.max_concurrent_requests).unwrap_or(REQUESTS_IN_FLIGHT_MAX_DEFAULT);
    if !(1..=REQUESTS_IN_FLIGHT_MAX).contains(&max_concurrent_requests) {
        return Err(format!("max concurrent requests must be 1 to {REQUESTS_IN_FLIGHT_MAX}"));
    }
    let max_connections = args.max_connections.or(file.max_connections).unwrap_or(CONNECTIONS_MAX_DEFAULT);
    if !(1..=CONNECTIONS_MAX).contains(&max_connections) {
        return Err(format!("max connections must be 1 to {CONNECTIONS_MAX}"));
    }
    let shutdown_timeout = match args.shutdown_timeout_ms.or(file.shutdown_timeout_ms) {
        None => SHUTDOWN_TIMEOUT_DEFAULT,
        Some(ms) if ms <= SHUTDOWN_TIMEOUT_MS_MAX => std::time::Duration::from_millis(ms),
        Some(_) => return Err(format!("shutdown timeout must be at most {SHUTDOWN_TIMEOUT_MS_MAX} ms")),
    };
    let log_sample_rate = args.log_sample_rate.or(file.log_sample_rate).unwrap_or(0.0);
    if !(0.0..=1.0).contains(&log_sample_rate) {
        return Err(format!("log sample rate must be between 0 and 1, not {log_sample_rate}"));
    }
    let log_retention = match args.log_retention_hours.or(file.log_retention_hours) {
        None => quiver_server::servedlog::LOG_RETENTION_DEFAULT,
        Some(h) if (1..=LOG_RETENTION_HOURS_MAX).contains(&h) => std::time::Duration::from_secs(h * 3600),
        Some(_) => return Err(format!("log retention must be 1 to {LOG_RETENTION_HOURS_MAX} hours")),
    };
    let shadow = if args.shadow.is_empty() { file.shadow.unwrap_or_default() } else { args.shadow };
    let shadow_sample_rate = args
        .shadow_sample_rate
        .or(file.shadow_sample_rate)
        .unwrap_or(quiver_server::shadow::SHADOW_SAMPLE_RATE_DEFAULT);
    // Checked here so that a bad value is refused before anything starts.
    quiver_server::shadow::Shadow::new(&shadow, shadow_sample_rate)?;
    Ok(Config {
        shadow,
        shadow_sample_rate,
        log_sample_rate,
        log_retention,
        max_connections,
        shutdown_timeout,
        max_concurrent_requests,
        checkpoint_root: args.checkpoint_root.or(file.checkpoint_root),
        tls,
        auth,
        peer_token,
        join_threads,
        data_dir,
        listen,
        durability,
        memory_budget_mb,
        metrics_listen,
        ui_listen,
        io_backend,
        direct_reads,
        table_compression,
        cluster,
        shard,
        replication_log_mb,
    })
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

async fn run(cfg: Config) -> Result<(), String> {
    let listener =
        tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| format!("listening on {}: {e}", cfg.listen))?;
    let metrics_listener = match cfg.metrics_listen {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(|e| format!("metrics listening on {a}: {e}"))?),
        None => None,
    };
    let ui_listener = match cfg.ui_listen {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(|e| format!("UI listening on {a}: {e}"))?),
        None => None,
    };
    let data_dir = cfg.data_dir.clone();
    let serve_cfg = ServeConfig {
        data_dir: cfg.data_dir,
        durability: cfg.durability,
        memory_budget_bytes: (cfg.memory_budget_mb << 20) as usize,
        io_backend: cfg.io_backend,
        direct_reads: cfg.direct_reads,
        table_compression: cfg.table_compression,
        cluster: cfg.cluster,
        shard: cfg.shard,
        replication_log_bytes: cfg.replication_log_mb << 20,
        join_threads: cfg.join_threads,
        auth: cfg.auth,
        peer_token: cfg.peer_token,
        tls: cfg.tls,
        checkpoint_root: cfg.checkpoint_root,
        max_concurrent_requests: cfg.max_concurrent_requests,
        max_connections: cfg.max_connections,
        shutdown_timeout: cfg.shutdown_timeout,
        log_sample_rate: cfg.log_sample_rate,
        log_retention: cfg.log_retention,
        shadow: cfg.shadow,
        shadow_sample_rate: cfg.shadow_sample_rate,
    };
    let listeners = Listeners { api: listener, metrics: metrics_listener, ui: ui_listener };
    serve(serve_cfg, listeners, shutdown_signal(), |bound| {
        let metrics = bound.metrics.map_or("off".to_string(), |m| format!("http://{m}/metrics"));
        let ui = bound.ui.map_or("off".to_string(), |u| format!("http://{u}/"));
        println!(
            "quiverd listening on {}, data directory {}, metrics {metrics}, ui {ui}",
            bound.api,
            data_dir.display()
        );
    })
    .await
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = config(Args::parse()).and_then(|cfg| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?
            .block_on(run(cfg))
    });
    if let Err(e) = result {
        eprintln!("quiverd: {e}");
        std::process::exit(1);
    }
}
