//! `quiver`: the command line for users and operators. Every error is one line on stderr and a
//! non-zero exit.

mod demo;
mod ingest;
mod join;
mod offline;
mod registry_file;
mod tabular;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use quiver_proto::v1 as pb;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(name = "quiver", version, about = "The Quiver feature store command line")]
struct Cli {
    /// Server address.
    #[arg(long, global = true, env = "QUIVER_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start an embedded server on a temp dir, load synthetic data, serve lookups and a join.
    Demo {
        /// Users to simulate.
        #[arg(long, default_value_t = 5000)]
        users: u32,
        /// Hours of hourly events per user.
        #[arg(long, default_value_t = 72)]
        hours: u32,
    },
    /// Apply a registry file (TOML) and print what changed.
    Apply {
        file: PathBuf,
        /// Only show what would change.
        #[arg(long)]
        dry_run: bool,
    },
    /// Online lookup of features for entities.
    Get {
        #[arg(long)]
        entity_type: String,
        /// Entity keys; composite keys as comma-separated parts ("u1,7").
        #[arg(long = "entity", required = true)]
        entities: Vec<String>,
        /// Feature references ("group:feature" or "group@N:feature").
        #[arg(long = "feature", required = true)]
        features: Vec<String>,
    },
    /// Write one row: values of a group's features for one entity at one event time.
    Put {
        /// "group" or "group@N".
        #[arg(long)]
        group: String,
        #[arg(long)]
        entity: String,
        /// Event time in microseconds since the epoch (default: now).
        #[arg(long)]
        event_time_us: Option<i64>,
        /// feature=value pairs.
        #[arg(required = true)]
        values: Vec<String>,
    },
    /// Operate a running server.
    Admin {
        #[command(subcommand)]
        cmd: AdminCmd,
    },
    /// Replication with peer regions: status, pause, resume, re-bootstrap.
    Replication {
        #[command(subcommand)]
        cmd: ReplicationCmd,
    },
    /// Bulk-load a CSV or Parquet file into a group: columns named by the entity type's join
    /// keys, `event_time` (a Parquet timestamp, or microseconds since the Unix epoch) and
    /// features (an empty cell or null writes nothing). The whole file is checked first; rows
    /// are then sent in atomic batches over the streaming write.
    Ingest {
        file: PathBuf,
        /// "group" or "group@N".
        #[arg(long)]
        group: String,
        /// Rows per atomic batch.
        #[arg(long, default_value_t = 1000)]
        batch_rows: usize,
    },
    /// Point-in-time join of a spine (CSV or Parquet: join keys and a time column) with
    /// features, written as Parquet in the spine's order.
    Join {
        /// The spine file (.csv or .parquet).
        spine: PathBuf,
        /// Output Parquet file.
        #[arg(short, long)]
        output: PathBuf,
        /// Feature references ("group:feature" or "group@N:feature"), all of one entity type.
        #[arg(long = "feature", required = true)]
        features: Vec<String>,
        /// The spine's time column.
        #[arg(long, default_value = "event_time")]
        time_column: String,
        /// Only what the store knew at this system time (µs since the epoch): reproducible.
        #[arg(long)]
        known_at_us: Option<i64>,
        /// Only values the online path could have served at each row's time (no leakage from
        /// late or backfilled data).
        #[arg(long)]
        strict_availability: bool,
        /// Fill registered defaults where nothing is within the TTL.
        #[arg(long)]
        use_defaults: bool,
    },
    /// Every version of an entity's features (time travel), newest event first.
    History {
        #[arg(long)]
        entity_type: String,
        #[arg(long)]
        entity: String,
        /// "group" or "group@N": all its features.
        #[arg(long)]
        group: String,
        /// Most versions to print.
        #[arg(long, default_value_t = 1000)]
        limit: u64,
    },
    /// Check every file of a stopped engine's data directory (or a checkpoint), offline.
    Verify { dir: PathBuf },
    /// Offline inspection of table files.
    Sst {
        #[command(subcommand)]
        cmd: SstCmd,
    },
    /// Offline inspection of WAL segments.
    Wal {
        #[command(subcommand)]
        cmd: WalCmd,
    },
}

#[derive(Debug, Subcommand)]
enum SstCmd {
    /// Print a table's blocks and entries.
    Dump {
        file: PathBuf,
        /// Most entries to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
enum WalCmd {
    /// Print a WAL segment's batches.
    Dump {
        file: PathBuf,
        /// Most batches to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCmd {
    Stats,
    Flush,
    /// Run due compactions; `--full`: everything into the bottom level; `--entity-type T
    /// --from K [--to K]`: only the tables holding entities `K_from <= entity < K_to`.
    Compact {
        #[arg(long, conflicts_with = "from")]
        full: bool,
        #[arg(long, requires = "from")]
        entity_type: Option<String>,
        /// First entity of the range (join keys comma-separated).
        #[arg(long, requires = "entity_type")]
        from: Option<String>,
        /// End of the range (exclusive); default: to the last entity.
        #[arg(long, requires = "from")]
        to: Option<String>,
    },
    Verify,
    Checkpoint {
        path: String,
    },
}

/// `quiver replication ...`.
#[derive(Debug, Subcommand)]
enum ReplicationCmd {
    /// Per peer: state, cursor, lag in sequence numbers and seconds, last error.
    Status,
    /// Stop pulling from the peer region (its log is kept, within the retention bound).
    Pause {
        /// The peer's region.
        region: u32,
    },
    /// Resume pulling from the peer region.
    Resume {
        /// The peer's region.
        region: u32,
    },
    /// Apply the peer region's snapshot again, then continue from its log.
    Rebootstrap {
        /// The peer's region.
        region: u32,
    },
}

fn peer_state(s: i32) -> &'static str {
    match pb::PeerState::try_from(s) {
        Ok(pb::PeerState::Connecting) => "connecting",
        Ok(pb::PeerState::Streaming) => "streaming",
        Ok(pb::PeerState::Bootstrapping) => "bootstrapping",
        Ok(pb::PeerState::Paused) => "paused",
        _ => "unknown",
    }
}

fn print_peer(p: &pb::PeerStatus) {
    let error = if p.last_error.is_empty() { "-".to_string() } else { p.last_error.clone() };
    println!(
        "{:>6}  {:<24} {:<13} {:>10} {:>10} {:>9.3} {:>9} {:>10} {:>4}  {}",
        p.region,
        p.address,
        peer_state(p.state),
        p.cursor,
        p.lag_seqnos,
        p.lag_seconds,
        if p.caught_up { "yes" } else { "no" },
        p.batches_applied,
        p.bootstraps,
        error
    );
}

const PEER_HEADER: &str =
    "  peer  address                  state             cursor  lag(seq)   lag(s) caught-up    batches boot  last error";

type Result<T> = std::result::Result<T, String>;

fn grpc(e: tonic::Status) -> String {
    format!("{:?}: {}", e.code(), e.message())
}

/// A group's definition (`group` or `group@N`) and its entity type, from the registry.
pub(crate) async fn fetch_group(ch: &Channel, group: &str) -> Result<(pb::FeatureGroup, pb::EntityType)> {
    let (name, version) = quiver_server::registry::parse_group_ref(group)
        .ok_or_else(|| format!("bad group reference {group:?} (group or group@N)"))?;
    let mut reg = pb::registry_service_client::RegistryServiceClient::new(ch.clone());
    let def = reg
        .get_feature_group(pb::GetFeatureGroupRequest { name: name.to_string(), version })
        .await
        .map_err(grpc)?
        .into_inner();
    let et = fetch_entity_type(ch, &def.entity_type).await?;
    Ok((def, et))
}

/// An entity type from the registry.
pub(crate) async fn fetch_entity_type(ch: &Channel, name: &str) -> Result<pb::EntityType> {
    pb::registry_service_client::RegistryServiceClient::new(ch.clone())
        .get_entity_type(pb::GetEntityTypeRequest { name: name.to_string() })
        .await
        .map_err(grpc)
        .map(tonic::Response::into_inner)
}

pub(crate) async fn channel(addr: &str) -> Result<Channel> {
    Channel::from_shared(addr.to_string())
        .map_err(|e| format!("bad address {addr:?}: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("cannot reach {addr}: {e}"))
}

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

pub(crate) fn entity_key(et: &pb::EntityType, s: &str) -> Result<pb::EntityKey> {
    let parts: Vec<&str> = s.split(',').collect();
    if parts.len() != et.join_keys.len() {
        return Err(format!(
            "entity {s:?} has {} parts, entity type {} has {} join keys",
            parts.len(),
            et.name,
            et.join_keys.len()
        ));
    }
    let mut out = Vec::new();
    for (p, k) in parts.iter().zip(&et.join_keys) {
        let kind = match k.r#type() {
            pb::JoinKeyType::Int64 => pb::key_part::Kind::Int64Value(
                p.parse().map_err(|_| format!("join key {}: {p:?} is not an int64", k.name))?,
            ),
            _ => pb::key_part::Kind::StringValue(p.to_string()),
        };
        out.push(pb::KeyPart { kind: Some(kind) });
    }
    Ok(pb::EntityKey { parts: out })
}

pub(crate) fn parse_value(s: &str, t: pb::ValueType) -> Result<pb::Value> {
    use pb::value::Kind;
    let bad = || format!("{s:?} is not a {t:?}");
    let list =
        |s: &str| -> Vec<String> { s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect() };
    let kind = match t {
        pb::ValueType::Bool => Kind::BoolValue(s.parse().map_err(|_| bad())?),
        pb::ValueType::Int64 => Kind::Int64Value(s.parse().map_err(|_| bad())?),
        pb::ValueType::Float32 => Kind::Float32Value(s.parse().map_err(|_| bad())?),
        pb::ValueType::Float64 => Kind::Float64Value(s.parse().map_err(|_| bad())?),
        pb::ValueType::String => Kind::StringValue(s.to_string()),
        pb::ValueType::Bytes => Kind::BytesValue(s.as_bytes().to_vec()),
        pb::ValueType::Float32Vector => Kind::Float32Vector(pb::Float32List {
            values: list(s).iter().map(|x| x.parse().map_err(|_| bad())).collect::<Result<_>>()?,
        }),
        pb::ValueType::Int64List => Kind::Int64List(pb::Int64List {
            values: list(s).iter().map(|x| x.parse().map_err(|_| bad())).collect::<Result<_>>()?,
        }),
        pb::ValueType::StringList => Kind::StringList(pb::StringList { values: list(s) }),
        pb::ValueType::Unspecified => return Err(bad()),
    };
    Ok(pb::Value { kind: Some(kind) })
}

/// One cell of a column as text.
pub fn cell_text(col: &pb::FeatureColumn, i: usize) -> String {
    let status = pb::FeatureStatus::try_from(col.statuses.get(i).copied().unwrap_or(0))
        .unwrap_or(pb::FeatureStatus::Unspecified);
    if matches!(status, pb::FeatureStatus::NotFound | pb::FeatureStatus::Stale) {
        return format!("({})", status.as_str_name().trim_start_matches("FEATURE_STATUS_").to_lowercase());
    }
    let v = match col.r#type() {
        pb::ValueType::Bool => col.bool_values.get(i).map(|v| v.to_string()),
        pb::ValueType::Int64 => col.int64_values.get(i).map(|v| v.to_string()),
        pb::ValueType::Float32 => col.float32_values.get(i).map(|v| v.to_string()),
        pb::ValueType::Float64 => col.float64_values.get(i).map(|v| format!("{v:.2}")),
        pb::ValueType::String => col.string_values.get(i).cloned(),
        pb::ValueType::Bytes => col.bytes_values.get(i).map(|v| format!("{} bytes", v.len())),
        pb::ValueType::Float32Vector => col.float32_vector_values.get(i).map(|v| format!("{:?}", v.values)),
        pb::ValueType::Int64List => col.int64_list_values.get(i).map(|v| format!("{:?}", v.values)),
        pb::ValueType::StringList => col.string_list_values.get(i).map(|v| format!("{:?}", v.values)),
        pb::ValueType::Unspecified => None,
    };
    let v = v.unwrap_or_default();
    if status == pb::FeatureStatus::Defaulted {
        format!("{v} (default)")
    } else {
        v
    }
}

fn print_changes(changes: &[pb::RegistryChange], json: bool, dry_run: bool) {
    for c in changes {
        let kind = match c.kind() {
            pb::registry_change::Kind::Created => "create",
            pb::registry_change::Kind::NewVersion => "new version",
            pb::registry_change::Kind::Unchanged => "unchanged",
            pb::registry_change::Kind::Unspecified => "?",
        };
        if json {
            let line = serde_json::json!({
                "object": c.object, "change": kind, "version": c.version, "details": c.details, "dry_run": dry_run,
            });
            println!("{line}");
        } else {
            println!("{} {} (v{}){}", kind, c.object, c.version, if dry_run { " [dry run]" } else { "" });
            for d in &c.details {
                println!("    {d}");
            }
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Demo { users, hours } => demo::run(users, hours).await,
        Cmd::Apply { file, dry_run } => {
            let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let mut req = registry_file::parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
            req.dry_run = dry_run;
            let mut c = pb::registry_service_client::RegistryServiceClient::new(channel(&cli.addr).await?);
            let changes = c.apply_registry(req).await.map_err(grpc)?.into_inner().changes;
            print_changes(&changes, cli.json, dry_run);
            Ok(())
        }
        Cmd::Get { entity_type, entities, features } => {
            let ch = channel(&cli.addr).await?;
            let et = fetch_entity_type(&ch, &entity_type).await?;
            let keys = entities.iter().map(|e| entity_key(&et, e)).collect::<Result<Vec<_>>>()?;
            let resp = pb::feature_service_client::FeatureServiceClient::new(ch)
                .get_online_features(pb::GetOnlineFeaturesRequest {
                    entity_type,
                    entities: keys,
                    features,
                    as_of: None,
                })
                .await
                .map_err(grpc)?
                .into_inner();
            for (i, e) in entities.iter().enumerate() {
                let cells: Vec<String> =
                    resp.columns.iter().map(|c| format!("{}={}", c.feature_ref, cell_text(c, i))).collect();
                if cli.json {
                    let mut line = serde_json::Map::new();
                    line.insert("entity".into(), e.as_str().into());
                    for c in &resp.columns {
                        line.insert(c.feature_ref.clone(), cell_text(c, i).into());
                    }
                    println!("{}", serde_json::Value::Object(line));
                } else {
                    println!("{e}: {}", cells.join("  "));
                }
            }
            Ok(())
        }
        Cmd::Put { group, entity, event_time_us, values } => {
            let ch = channel(&cli.addr).await?;
            let (def, et) = fetch_group(&ch, &group).await?;
            let mut row = pb::WriteRow {
                entity: Some(entity_key(&et, &entity)?),
                group: group.clone(),
                event_time: Some(quiver_server::convert::timestamp(event_time_us.unwrap_or_else(now_us))),
                ..Default::default()
            };
            for kv in values {
                let (k, v) = kv.split_once('=').ok_or_else(|| format!("{kv:?} is not feature=value"))?;
                let f = def
                    .features
                    .iter()
                    .find(|f| f.name == k)
                    .ok_or_else(|| format!("group {group} has no feature {k:?}"))?;
                row.values.insert(k.to_string(), parse_value(v, f.r#type()).map_err(|e| format!("{k}: {e}"))?);
            }
            let resp = pb::feature_service_client::FeatureServiceClient::new(ch)
                .write_features(pb::WriteFeaturesRequest { rows: vec![row], ..Default::default() })
                .await
                .map_err(grpc)?
                .into_inner();
            println!("wrote {} values", resp.values_written);
            Ok(())
        }
        Cmd::Replication { cmd } => {
            let mut c = pb::admin_service_client::AdminServiceClient::new(channel(&cli.addr).await?);
            let peer = match cmd {
                ReplicationCmd::Status => {
                    let s = c.get_replication_status(pb::GetReplicationStatusRequest {}).await.map_err(grpc)?;
                    let s = s.into_inner();
                    let k: Vec<String> = s
                        .knowledge
                        .map(|k| k.entries.iter().map(|e| format!("{}:{}", e.region, e.counter)).collect())
                        .unwrap_or_default();
                    println!(
                        "region {}; last sequence {}; {} conflicts; knows [{}]",
                        s.region,
                        s.last_seqno,
                        s.conflicts,
                        k.join(", ")
                    );
                    if s.peers.is_empty() {
                        println!("no peers: replication is off");
                    } else {
                        println!("{PEER_HEADER}");
                        for p in &s.peers {
                            print_peer(p);
                        }
                    }
                    None
                }
                ReplicationCmd::Pause { region } => {
                    Some(c.pause_replication(pb::PeerRequest { region }).await.map_err(grpc)?.into_inner())
                }
                ReplicationCmd::Resume { region } => {
                    Some(c.resume_replication(pb::PeerRequest { region }).await.map_err(grpc)?.into_inner())
                }
                ReplicationCmd::Rebootstrap { region } => {
                    Some(c.rebootstrap_replication(pb::PeerRequest { region }).await.map_err(grpc)?.into_inner())
                }
            };
            if let Some(p) = peer.and_then(|r| r.peer) {
                println!("{PEER_HEADER}");
                print_peer(&p);
            }
            Ok(())
        }
        Cmd::Admin { cmd } => {
            let mut c = pb::admin_service_client::AdminServiceClient::new(channel(&cli.addr).await?);
            match cmd {
                AdminCmd::Stats => {
                    let s = c.get_stats(pb::GetStatsRequest {}).await.map_err(grpc)?.into_inner();
                    for l in &s.levels {
                        println!("L{}: {} tables, {} bytes, {} entries", l.level, l.tables, l.bytes, l.entries);
                    }
                    println!(
                        "memtable {} bytes, {} immutable; last sequence {}; {} flushes, {} compactions; {} write groups, {} WAL syncs; block cache {} hits / {} misses, {} bytes",
                        s.memtable_bytes, s.immutable_memtables, s.last_sequence, s.flushes, s.compactions, s.write_groups, s.wal_syncs,
                        s.block_cache_hits, s.block_cache_misses, s.block_cache_bytes
                    );
                    println!(
                        "hot tier {} hits / {} misses (pairs), {} fills, {} evictions; {} entities, {} bytes",
                        s.hot_tier_hits,
                        s.hot_tier_misses,
                        s.hot_tier_fills,
                        s.hot_tier_evictions,
                        s.hot_tier_entries,
                        s.hot_tier_bytes
                    );
                    println!(
                        "ssd tier: {}{}; {} block reads in {} rounds, {} bytes",
                        s.io_backend,
                        if s.direct_reads { " (O_DIRECT)" } else { "" },
                        s.ssd_block_reads,
                        s.ssd_read_rounds,
                        s.ssd_bytes_read
                    );
                }
                AdminCmd::Flush => {
                    c.flush(pb::FlushRequest {}).await.map_err(grpc)?;
                    println!("flushed");
                }
                AdminCmd::Compact { full, entity_type, from, to } => {
                    let range = match (entity_type, from) {
                        (Some(entity_type), Some(from)) => {
                            let et = fetch_entity_type(&channel(&cli.addr).await?, &entity_type).await?;
                            let start = Some(entity_key(&et, &from)?);
                            let end = to.map(|t| entity_key(&et, &t)).transpose()?;
                            Some(pb::EntityRange { entity_type, start, end })
                        }
                        _ => None,
                    };
                    c.compact(pb::CompactRequest { full, range }).await.map_err(grpc)?;
                    println!("compacted");
                }
                AdminCmd::Verify => {
                    let v = c.verify(pb::VerifyRequest {}).await.map_err(grpc)?.into_inner();
                    println!("ok: {} tables, {} entries verified", v.tables, v.entries);
                }
                AdminCmd::Checkpoint { path } => {
                    c.checkpoint(pb::CheckpointRequest { path: path.clone() }).await.map_err(grpc)?;
                    println!("checkpoint written to {path}");
                }
            }
            Ok(())
        }
        Cmd::History { entity_type, entity, group, limit } => {
            let ch = channel(&cli.addr).await?;
            let et = fetch_entity_type(&ch, &entity_type).await?;
            let req = pb::ScanHistoryRequest {
                entity_type,
                entity: Some(entity_key(&et, &entity)?),
                group,
                limit,
                ..Default::default()
            };
            let mut stream = pb::feature_service_client::FeatureServiceClient::new(ch)
                .scan_history(req)
                .await
                .map_err(grpc)?
                .into_inner();
            while let Some(chunk) = stream.message().await.map_err(grpc)? {
                for v in chunk.versions {
                    let us = |t: &Option<prost_types::Timestamp>| {
                        t.as_ref().map_or(0, |t| t.seconds * 1_000_000 + i64::from(t.nanos / 1000))
                    };
                    let value = v.value.as_ref().map_or("(deleted)".to_string(), |x| format!("{:?}", x.kind));
                    println!(
                        "{} event_time_us={} system_time_us={} {value}",
                        v.feature_ref,
                        us(&v.event_time),
                        us(&v.system_time)
                    );
                }
            }
            Ok(())
        }
        Cmd::Ingest { file, group, batch_rows } => ingest::run(&cli.addr, &file, &group, batch_rows).await,
        Cmd::Join { spine, output, features, time_column, known_at_us, strict_availability, use_defaults } => {
            let started = std::time::Instant::now();
            let args = join::JoinArgs {
                spine,
                output: output.clone(),
                features,
                time_column,
                known_at_us,
                strict_availability,
                use_defaults,
            };
            let s = join::run(&cli.addr, args).await?;
            let secs = started.elapsed().as_secs_f64();
            if cli.json {
                let filled: serde_json::Map<String, serde_json::Value> =
                    s.filled.iter().map(|(n, c)| (n.clone(), (*c).into())).collect();
                let line = serde_json::json!({
                    "rows": s.rows, "output": output.display().to_string(), "filled": filled, "seconds": secs,
                });
                println!("{line}");
            } else {
                let filled: Vec<String> = s.filled.iter().map(|(n, c)| format!("{n} {c}")).collect();
                println!(
                    "joined {} spine rows in {secs:.2} s -> {} (rows with a value: {})",
                    s.rows,
                    output.display(),
                    filled.join(", ")
                );
            }
            Ok(())
        }
        Cmd::Sst { cmd: SstCmd::Dump { file, limit } } => offline::sst_dump(&file, limit),
        Cmd::Wal { cmd: WalCmd::Dump { file, limit } } => offline::wal_dump(&file, limit),
        Cmd::Verify { dir } => {
            let r = quiver_storage::verify_dir(&quiver_storage::fs::RealFs, &dir).map_err(|e| e.to_string())?;
            if cli.json {
                println!(
                    "{{\"tables\":{},\"table_entries\":{},\"wal_segments\":{},\"wal_batches\":{},\"torn_tail\":{}}}",
                    r.tables,
                    r.table_entries,
                    r.wal_segments,
                    r.wal_batches,
                    r.torn_tail.is_some()
                );
            } else {
                println!(
                    "ok: {} tables ({} entries), {} WAL segments ({} batches to replay){}",
                    r.tables,
                    r.table_entries,
                    r.wal_segments,
                    r.wal_batches,
                    r.torn_tail
                        .map(|(p, o)| format!("; torn tail in {} at {o} (recovery truncates it)", p.display()))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))
        .and_then(|rt| rt.block_on(run(cli)));
    if let Err(e) = result {
        eprintln!("quiver: {e}");
        std::process::exit(1);
    }
}
