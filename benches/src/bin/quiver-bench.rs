//! `quiver-bench`: load generator for Quiver (gRPC) and, with the same harness, Redis.
//!
//! ```text
//! quiver-bench setup   --addr http://127.0.0.1:50051 --features 50
//! quiver-bench ingest  --addr ... --entities 1000000 --features 50 [--rows-per-request 500] [--streams 2] [--durability sync]
//! quiver-bench ingest  --redis redis://127.0.0.1:6390 --entities 1000000 --features 50
//! quiver-bench online  --addr ... | --redis ... --entities N --features 50 --batch 1 --concurrency 64
//!                      [--connections 4] [--duration 10] [--warmup 2] [--rate R] [--json]
//! quiver-bench check   --addr ... --redis ... --entities N --sample 200
//! ```
//!
//! `online` is closed loop unless `--rate` sets an open-loop request rate (latency counted from
//! each request's due time). Every command prints one line of JSON with `--json`.

use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use quiver_bench::load::{self, LoadSpec, Target};
use quiver_proto::v1 as pb;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(name = "quiver-bench", about = "Load generator for Quiver and Redis")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// One JSON object per result instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// The server's process id (same machine; comma-separated for the nodes of a sharded
    /// region): `online` and `ingest` report their CPU time per request or value, read from
    /// `/proc/PID/stat` over the measured window and summed, and their RSS.
    #[arg(long, global = true, value_delimiter = ',')]
    server_pid: Vec<u32>,
}

#[derive(Debug, Args, Clone)]
struct Endpoint {
    /// Quiver's gRPC address.
    #[arg(long)]
    addr: Option<String>,
    /// Redis URL (the same harness against Redis).
    #[arg(long, conflicts_with = "addr")]
    redis: Option<String>,
    /// Send each entity to its slot's owner (the routing client) instead of everything to
    /// --addr, which gives the sharded region's map (`online` only).
    #[arg(long, requires = "addr")]
    route: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Apply the benchmark registry to Quiver.
    Setup {
        #[arg(long)]
        addr: String,
        #[arg(long, default_value_t = 50)]
        features: u32,
        /// Feature group to create.
        #[arg(long, default_value = load::GROUP)]
        group: String,
        /// Share of entities whose online answers the group logs (re-applying with another
        /// share makes a new group version over the same data).
        #[arg(long)]
        log_sample_rate: Option<f64>,
    },
    /// Load entities x features (one event each).
    Ingest {
        #[command(flatten)]
        to: Endpoint,
        #[arg(long)]
        entities: u64,
        #[arg(long, default_value_t = 50)]
        features: u32,
        /// Events per entity (hourly; Quiver only beyond 1).
        #[arg(long, default_value_t = 1)]
        events: u64,
        /// Feature group to write (Quiver).
        #[arg(long, default_value = load::GROUP)]
        group: String,
        /// Rows per write request (Quiver) or per pipeline (Redis).
        #[arg(long, default_value_t = 200)]
        rows_per_request: usize,
        /// Concurrent write streams.
        #[arg(long, default_value_t = 2)]
        streams: usize,
        /// Quiver durability: sync or async.
        #[arg(long, default_value = "sync")]
        durability: String,
    },
    /// Online lookups.
    Online {
        #[command(flatten)]
        to: Endpoint,
        #[arg(long)]
        entities: u64,
        #[arg(long, default_value_t = 50)]
        features: u32,
        /// Entities per request.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Client connections (HTTP/2 connections or Redis multiplexed connections).
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Measured seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Unmeasured seconds first.
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        /// Open loop at this many requests per second.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Check that Quiver and Redis give the same answers on a sample of entities.
    Check {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        redis: String,
        #[arg(long)]
        entities: u64,
        #[arg(long, default_value_t = 50)]
        features: u32,
        #[arg(long, default_value_t = 200)]
        sample: u64,
    },
}

type Result<T> = std::result::Result<T, String>;

async fn channel(addr: &str) -> Result<Channel> {
    Channel::from_shared(addr.to_string())
        .map_err(|e| format!("bad address {addr}: {e}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("cannot reach {addr}: {e}"))
}

fn status(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// What an ingest writes.
#[derive(Debug, Clone)]
struct IngestSpec {
    group: String,
    entities: u64,
    events: u64,
    features: u32,
    rows: usize,
    streams: usize,
    durability: pb::Durability,
}

async fn ingest_quiver(addr: &str, spec: IngestSpec) -> Result<u64> {
    let IngestSpec { group, entities, events, features, rows, streams, durability } = spec;
    let streams = streams.max(1) as u64;
    let mut tasks = Vec::new();
    for s in 0..streams {
        let mut client = pb::feature_service_client::FeatureServiceClient::new(channel(addr).await?)
            .max_encoding_message_size(usize::MAX);
        let group = group.clone();
        tasks.push(tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::WriteFeaturesRequest>(4);
            let call = tokio::spawn(async move {
                client.write_features_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await
            });
            let mut batch = Vec::with_capacity(rows);
            // Event by event, so the stream's order resembles a live feed.
            let total = entities * events;
            let mut n = s;
            while n < total {
                let (j, i) = (n / entities, n % entities);
                batch.push(load::write_row(&group, i, j, features));
                if batch.len() == rows || n + streams >= total {
                    let req = pb::WriteFeaturesRequest {
                        rows: std::mem::take(&mut batch),
                        durability: durability as i32,
                        ..Default::default()
                    };
                    if tx.send(req).await.is_err() {
                        break;
                    }
                }
                n += streams;
            }
            drop(tx);
            let r = call.await.map_err(|e| e.to_string())?.map_err(status)?.into_inner();
            Ok::<u64, String>(r.values_written)
        }));
    }
    let mut values = 0;
    for t in tasks {
        values += t.await.map_err(|e| e.to_string())??;
    }
    Ok(values)
}

async fn ingest_redis(url: &str, entities: u64, features: u32, rows: usize, streams: usize) -> Result<u64> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let streams = streams.max(1) as u64;
    let mut tasks = Vec::new();
    for s in 0..streams {
        let mut conn = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
        tasks.push(tokio::spawn(async move {
            let mut pipe = redis::pipe();
            let mut n = 0;
            let mut i = s;
            while i < entities {
                let fields: Vec<(String, f64)> =
                    (0..features).map(|f| (format!("f{f}"), load::value_of(i, f))).collect();
                pipe.hset_multiple(load::entity_name(i), &fields).ignore();
                n += 1;
                if n == rows || i + streams >= entities {
                    pipe.query_async::<()>(&mut conn).await.map_err(|e| e.to_string())?;
                    pipe = redis::pipe();
                    n = 0;
                }
                i += streams;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(entities * u64::from(features))
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Setup { addr, features, group, log_sample_rate } => {
            let mut c = pb::registry_service_client::RegistryServiceClient::new(channel(&addr).await?);
            c.apply_registry(load::registry(&group, features, log_sample_rate)).await.map_err(status)?;
            println!("{}", if cli.json { "{\"setup\":\"ok\"}" } else { "registry applied" });
        }
        Cmd::Ingest { to, entities, features, events, group, rows_per_request, streams, durability } => {
            let cpu_before = load::processes_cpu_us(&cli.server_pid);
            let started = Instant::now();
            let (target, values) = match (&to.addr, &to.redis) {
                (Some(addr), _) => {
                    let d = match durability.as_str() {
                        "sync" => pb::Durability::Sync,
                        "async" => pb::Durability::Async,
                        other => return Err(format!("--durability must be sync or async, not {other:?}")),
                    };
                    let spec = IngestSpec {
                        group: group.clone(),
                        entities,
                        events: events.max(1),
                        features,
                        rows: rows_per_request,
                        streams,
                        durability: d,
                    };
                    ("quiver", ingest_quiver(addr, spec).await?)
                }
                (None, Some(url)) => ("redis", ingest_redis(url, entities, features, rows_per_request, streams).await?),
                (None, None) => return Err("give --addr or --redis".into()),
            };
            let secs = started.elapsed().as_secs_f64();
            let cpu_us = load::processes_cpu_us(&cli.server_pid).zip(cpu_before).map(|(b, a)| b.saturating_sub(a));
            let cpu_per_value = cpu_us.filter(|_| values > 0).map(|c| c as f64 / values as f64);
            let rss = load::processes_rss_mib(&cli.server_pid);
            if cli.json {
                let line = serde_json::json!({
                    "target": target, "mode": "ingest", "durability": durability, "values": values,
                    "seconds": secs, "values_per_s": values as f64 / secs,
                    "server_cpu_us_per_value": cpu_per_value, "server_rss_mib": rss,
                });
                println!("{line}");
            } else {
                println!(
                    "{target}: ingested {values} values in {secs:.2} s: {:.0} values/s{}",
                    values as f64 / secs,
                    cpu_per_value.map(|c| format!(", server CPU {c:.2} µs/value")).unwrap_or_default()
                );
            }
        }
        Cmd::Online { to, entities, features, batch, concurrency, connections, duration, warmup, rate } => {
            if entities == 0 || batch == 0 || concurrency == 0 {
                return Err("--entities, --batch and --concurrency must be positive".into());
            }
            let (name, target) = match (&to.addr, &to.redis) {
                (Some(addr), _) if to.route => ("quiver-routed", Target::routed(addr, features).await?),
                (Some(addr), _) => ("quiver", Target::quiver(addr, connections, features).await?),
                (None, Some(url)) => ("redis", Target::redis(url, connections, features).await?),
                (None, None) => return Err("give --addr or --redis".into()),
            };
            let spec = LoadSpec {
                entities,
                features,
                batch,
                concurrency,
                duration: Duration::from_secs_f64(duration),
                warmup: Duration::from_secs_f64(warmup),
                rate,
                server_pids: cli.server_pid.clone(),
            };
            let r = load::run_lookups(&target, &spec).await;
            if cli.json {
                println!("{}", r.json(name, &spec));
            } else {
                let q = |p: f64| r.latency.value_at_quantile(p);
                println!(
                    "{name}: {} requests ({} errors) in {:.1} s: {:.0} req/s, {:.0} values/s; latency µs p50 {} p99 {} p99.9 {} max {}{}{}",
                    r.requests,
                    r.errors,
                    r.seconds,
                    r.requests as f64 / r.seconds,
                    r.values as f64 / r.seconds,
                    q(0.5),
                    q(0.99),
                    q(0.999),
                    r.latency.max(),
                    r.server_cpu_us
                        .filter(|_| r.requests > 0)
                        .map(|c| format!("; server CPU {:.1} µs/request", c as f64 / r.requests as f64))
                        .unwrap_or_default(),
                    r.first_error.as_ref().map(|e| format!("; first error: {e}")).unwrap_or_default()
                );
            }
            if r.errors > 0 {
                return Err(format!("{} requests failed", r.errors));
            }
        }
        Cmd::Check { addr, redis, entities, features, sample } => {
            let q = Target::quiver(&addr, 1, features).await?;
            let r = Target::redis(&redis, 1, features).await?;
            let n = load::check_agreement(&q, &r, entities, sample).await?;
            if cli.json {
                println!("{}", serde_json::json!({ "check": "agree", "values": n }));
            } else {
                println!("quiver and redis agree on {n} values of {sample} sampled entities");
            }
        }
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))
        .and_then(|rt| rt.block_on(run(cli)));
    if let Err(e) = result {
        eprintln!("quiver-bench: {e}");
        std::process::exit(1);
    }
}
