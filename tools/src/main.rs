//! `quiver`: the command line for users and operators. Every error is one line on stderr and a
//! non-zero exit.

mod admin;
mod auth;
mod backfill;
mod cluster;
mod common;
mod demo;
mod drift;
mod features;
mod ingest;
mod join;
mod logs;
mod monitor;
mod offline;
mod registry;
mod registry_file;
mod skew;
mod tabular;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::common::Result;

#[derive(Debug, Parser)]
#[command(name = "quiver", version, about = "The Quiver feature store command line")]
struct Cli {
    /// Server address.
    #[arg(long, global = true, env = "QUIVER_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// The bearer token sent with every call (a `quiver auth create` token).
    #[arg(long, global = true, env = "QUIVER_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    token: Option<String>,
    /// A file holding the token (its first line), to keep it off the command line.
    #[arg(long, global = true, env = "QUIVER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the server's, for an `https://` address.
    #[arg(long, global = true, env = "QUIVER_CA_CERT")]
    ca_cert: Option<PathBuf>,
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
    /// Apply a registry file (TOML) and print what changed. A changed group gets a new,
    /// staged version (serving is unchanged) unless --promote is given.
    Apply {
        file: PathBuf,
        /// Only show what would change.
        #[arg(long)]
        dry_run: bool,
        /// Make each new version serve at once (no release gate).
        #[arg(long)]
        promote: bool,
    },
    /// Make a group version serve ("group@N"), in one registry write, if the release gate
    /// passes (exit 2 with its report when it refuses).
    Promote {
        /// "group@N".
        version: String,
        /// Skip the release gate (recorded in the history).
        #[arg(long)]
        force: bool,
        /// Only run the release gate and print its report.
        #[arg(long)]
        dry_run: bool,
        /// Why, kept in the history.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Serve the version that served before the current one was promoted.
    Rollback {
        group: String,
        /// Why, kept in the history.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// A group's versions (serving, staged, inactive, retired) and the history of its serving
    /// version.
    Versions { group: String },
    /// Retire a version that does not serve ("group@N"): read-only for good, never served
    /// again, its own data dropped by compaction after the retention.
    Retire {
        /// "group@N".
        version: String,
        /// Hours before compaction may drop its data (default 168: 7 days).
        #[arg(long)]
        retention_hours: Option<u64>,
        /// Why, kept with the retirement.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Fill a staged version with history, resumably: rows from a file, or features copied
    /// from another version inside the engine.
    Backfill {
        /// "group@N": the version to fill (not the serving one).
        #[arg(long)]
        group: String,
        /// Rows to load (.csv or .parquet; columns as for `quiver ingest`).
        #[arg(long)]
        from: Option<PathBuf>,
        /// Copy history from this version of the group instead.
        #[arg(long)]
        copy_from: Option<u32>,
        /// With --copy-from: a feature to copy (repeat; default every feature both versions
        /// have with the same type whose data is not already shared).
        #[arg(long = "feature")]
        features: Vec<String>,
        /// Rows per atomic batch (--from).
        #[arg(long, default_value_t = 1000)]
        batch_rows: usize,
        /// Where progress is kept (default: beside the file, or in the current directory for
        /// a copy).
        #[arg(long)]
        progress_file: Option<PathBuf>,
        /// Start over, ignoring saved progress.
        #[arg(long)]
        restart: bool,
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
        /// Serve registered defaults (or zero values) where nothing is within the TTL.
        #[arg(long)]
        default_missing: bool,
        /// The call's deadline in milliseconds: features not read by then are "(unavailable)".
        #[arg(long)]
        timeout_ms: Option<u64>,
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
    /// Manage the token file quiverd reads (--auth-tokens); `kill -HUP` quiverd to apply.
    Auth {
        #[command(subcommand)]
        cmd: AuthCmd,
    },
    /// Operate a running server.
    Admin {
        #[command(subcommand)]
        cmd: AdminCmd,
    },
    /// A sharded region (server/CLUSTER.md): its nodes and slot map, through any node.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
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
        /// The output file's Parquet compression.
        #[arg(long, value_enum, default_value_t = join::OutputCompression::Zstd)]
        compression: join::OutputCompression,
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
    /// The served-feature log (quiverd --log-sample-rate, or a group's log_sample_rate).
    Logs {
        #[command(subcommand)]
        cmd: LogsCmd,
    },
    /// Online against offline: replay the served-feature log in [--from, --to) through the
    /// point-in-time join and compare every served value; or, with --training-set, compare a
    /// training set built elsewhere with Quiver's join of its own spine. Exits with 2 on any
    /// mismatch.
    Skew {
        /// First served-at time: RFC 3339 or µs since the epoch.
        #[arg(long, required_unless_present = "training_set", conflicts_with = "training_set")]
        from: Option<String>,
        /// End of the range (exclusive), as --from.
        #[arg(long, required_unless_present = "training_set", conflicts_with = "training_set")]
        to: Option<String>,
        /// Only this group's features (served-log replays).
        #[arg(long, conflicts_with = "training_set")]
        group: Option<String>,
        /// Mismatches to show per feature (at most 100).
        #[arg(long, default_value_t = 5)]
        examples: u32,
        /// A training set (CSV or Parquet): the spine's key and time columns and one column per
        /// --feature, named as `quiver join` names them.
        #[arg(long, requires = "features")]
        training_set: Option<PathBuf>,
        /// With --training-set: the features its columns hold, group:feature (repeat).
        #[arg(long = "feature")]
        features: Vec<String>,
        /// With --training-set: the spine's time column.
        #[arg(long, default_value = "event_time")]
        time_column: String,
        /// With --training-set: join with this known-at time (µs), as `quiver join`.
        #[arg(long)]
        known_at_us: Option<i64>,
        /// With --training-set: fill registered defaults, as `quiver join --use-defaults`.
        #[arg(long)]
        use_defaults: bool,
    },
    /// Drift baselines: summaries of a group's features in a training set.
    Baseline {
        #[command(subcommand)]
        cmd: BaselineCmd,
    },
    /// The drift of a group's served values (from the served-feature log) against a baseline:
    /// PSI, Jensen-Shannon and KS per feature. Exits with 2 when a feature breaches its bounds.
    Drift {
        #[arg(long)]
        group: String,
        /// The baseline (default: the group's newest).
        #[arg(long)]
        baseline: Option<String>,
        /// First served-at time: RFC 3339 or µs since the epoch (default: an hour before --to).
        #[arg(long)]
        from: Option<String>,
        /// End of the range (exclusive; default: now).
        #[arg(long)]
        to: Option<String>,
        /// The values written to the group through the server over the last hour (sketched on
        /// the write path against the newest baseline) instead of the served ones.
        #[arg(long, conflicts_with_all = ["from", "to"])]
        ingested: bool,
    },
    /// Every feature group's health: freshness against its SLA, null rates against their
    /// bounds, drift against the newest baseline. Exits with 2 when something breaches (1 on errors).
    Monitor {
        /// Only this group.
        #[arg(long)]
        group: Option<String>,
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
enum AuthCmd {
    /// Create a token and print it (once: the file keeps only its hash).
    Create {
        /// The token file (created if missing).
        #[arg(long)]
        file: PathBuf,
        /// A unique name (letters, digits, '-', '_', '.').
        #[arg(long)]
        name: String,
        /// read, write, registry, admin or replication (repeat for several).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Limit read, write and registry to groups whose name starts with this (repeat).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// With the replication scope: the peer region the token speaks for.
        #[arg(long)]
        region: Option<u32>,
        /// Calls per second the token may make (default: no limit).
        #[arg(long)]
        requests_per_second: Option<u64>,
        /// Values per second it may read or write (default: no limit).
        #[arg(long)]
        values_per_second: Option<u64>,
    },
    /// List tokens: names, scopes, groups, regions (never secrets).
    List {
        #[arg(long)]
        file: PathBuf,
    },
    /// Revoke a token.
    Revoke {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum BaselineCmd {
    /// Summarise the group's features in a training file (CSV or Parquet, as `quiver join`
    /// writes) and store the summary as baseline --name (replacing one of that name).
    Capture {
        /// The training file.
        #[arg(long = "from")]
        file: PathBuf,
        /// [a-z0-9][a-z0-9_.-]{0,62}
        #[arg(long)]
        name: String,
        /// The feature group whose features the file's columns hold.
        #[arg(long)]
        group: String,
    },
    /// The stored baselines, newest first.
    List {
        #[arg(long)]
        group: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum LogsCmd {
    /// Write the answers served in [--from, --to) as Parquet (one row per entity and lookup).
    Export {
        /// First served-at time: RFC 3339 (2026-11-26T18:00:00Z) or µs since the epoch.
        #[arg(long)]
        from: String,
        /// End of the range (exclusive), as --from.
        #[arg(long)]
        to: String,
        /// Output Parquet file.
        #[arg(short, long)]
        output: PathBuf,
        /// Only answers of this entity type (required when the range holds several).
        #[arg(long)]
        entity_type: Option<String>,
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
    /// Hard-link a consistent copy of the engine into a new directory under the server's
    /// checkpoint root (quiverd --checkpoint-root).
    Checkpoint {
        /// Relative to the checkpoint root (or absolute, under it).
        path: String,
    },
}

/// `quiver cluster ...`.
#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// The nodes (live in etcd or named by the map), their slots, the map's runs and epochs.
    Status,
    /// Create the slot map: every slot spread evenly over the nodes registered now.
    Init,
    /// Move slots to a node (server/CLUSTER.md §5): the target copies them and catches up from
    /// the owner's log, then the owner switches in one etcd transaction. Progress is printed
    /// until the switch; a move interrupted (this command stopped, a node restarted) stays in
    /// the map and is resumed by running the same command again, or rolled back with --abort.
    Move {
        /// The slots, `A..B` (both included) or one slot `A`; all owned by one node.
        #[arg(long)]
        slots: String,
        /// The target node's id.
        #[arg(long, required_unless_present = "abort")]
        to: Option<String>,
        /// Roll back the move of exactly these slots (it has not switched): the owner takes
        /// writes again.
        #[arg(long)]
        abort: bool,
        /// Times to resume the move after the target or the source was unreachable.
        #[arg(long, default_value_t = cluster::MOVE_RETRIES_DEFAULT)]
        retries: u32,
    },
    /// Even the slots out over the nodes registered now (each owns SLOTS / n, or one more),
    /// moving as few as it can, one move after another (as `quiver cluster move` does).
    Rebalance {
        /// Print the plan and move nothing.
        #[arg(long)]
        dry_run: bool,
        /// Times to resume each move after a node was unreachable.
        #[arg(long, default_value_t = cluster::MOVE_RETRIES_DEFAULT)]
        retries: u32,
    },
    /// Remove a running node from the region for good (server/CLUSTER.md §7): its slots move
    /// to the other live nodes (each to the one owning fewest), then, once every node of every
    /// peer region has pulled its stream to its head, it leaves etcd and its peers stop pulling
    /// from it. Stop it afterwards; its id never registers again.
    Remove {
        /// The node's id.
        node: String,
        /// Print the moves and remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Times to resume each move after a node was unreachable, and to ask the node to
        /// leave again while its peers still pull its stream or the map changed meanwhile.
        #[arg(long, default_value_t = cluster::MOVE_RETRIES_DEFAULT)]
        retries: u32,
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

async fn run(cli: Cli) -> Result<()> {
    let token = match (&cli.token, &cli.token_file) {
        (_, Some(f)) => quiver_server::auth::BearerToken::from_file(f)?,
        (t, None) => quiver_server::auth::BearerToken::new(t.as_deref())?,
    };
    let ca_pem = match &cli.ca_cert {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("--ca-cert {}: {e}", p.display()))?),
        None => None,
    };
    let server = &common::Server { addr: cli.addr.clone(), token, ca_pem };
    match cli.cmd {
        Cmd::Demo { users, hours } => demo::run(users, hours).await,
        Cmd::Apply { file, dry_run, promote } => registry::apply(server, cli.json, &file, dry_run, promote).await,
        Cmd::Promote { version, force, dry_run, reason } => {
            if !registry::promote(server, cli.json, &version, force, dry_run, reason).await? {
                std::process::exit(registry::EXIT_GATE_REFUSED);
            }
            Ok(())
        }
        Cmd::Rollback { group, reason } => registry::rollback(server, cli.json, group, reason).await,
        Cmd::Versions { group } => registry::versions(server, cli.json, group).await,
        Cmd::Retire { version, retention_hours, reason } => {
            registry::retire(server, cli.json, &version, retention_hours, reason).await
        }
        Cmd::Backfill { group, from, copy_from, features, batch_rows, progress_file, restart } => {
            let args = backfill::Args { group, from, copy_from, features, batch_rows, progress_file, restart };
            backfill::run(server, cli.json, args).await
        }
        Cmd::Get { entity_type, entities, features, default_missing, timeout_ms } => {
            let opts =
                features::GetOptions { default_missing, timeout: timeout_ms.map(std::time::Duration::from_millis) };
            features::get(server, cli.json, entity_type, entities, features, opts).await
        }
        Cmd::Put { group, entity, event_time_us, values } => {
            features::put(server, group, entity, event_time_us, values).await
        }
        Cmd::Replication { cmd } => admin::replication(server, cmd).await,
        Cmd::Cluster { cmd: ClusterCmd::Status } => cluster::status(server, cli.json).await,
        Cmd::Cluster { cmd: ClusterCmd::Init } => cluster::init(server, cli.json).await,
        Cmd::Cluster { cmd: ClusterCmd::Move { slots, to, abort, retries } } => {
            let (first, last) = cluster::parse_slots(&slots)?;
            match (abort, to) {
                (true, _) => cluster::abort(server, cli.json, first, last).await,
                (false, Some(to)) => cluster::move_slots(server, cli.json, first, last, &to, retries).await,
                (false, None) => Err("--to names the target node".into()),
            }
        }
        Cmd::Cluster { cmd: ClusterCmd::Rebalance { dry_run, retries } } => {
            cluster::rebalance(server, cli.json, dry_run, retries).await
        }
        Cmd::Cluster { cmd: ClusterCmd::Remove { node, dry_run, retries } } => {
            cluster::remove(server, cli.json, &node, dry_run, retries).await
        }
        Cmd::Admin { cmd } => admin::admin(server, cmd).await,
        Cmd::History { entity_type, entity, group, limit } => {
            features::history(server, entity_type, entity, group, limit).await
        }
        Cmd::Ingest { file, group, batch_rows } => ingest::run(server, &file, &group, batch_rows).await,
        Cmd::Join {
            spine,
            output,
            features,
            time_column,
            known_at_us,
            strict_availability,
            use_defaults,
            compression,
        } => {
            let args = join::JoinArgs {
                spine,
                output,
                features,
                time_column,
                known_at_us,
                strict_availability,
                use_defaults,
                compression,
            };
            join::run(server, cli.json, args).await
        }
        Cmd::Logs { cmd: LogsCmd::Export { from, to, output, entity_type } } => {
            logs::export(server, cli.json, logs::ExportArgs { from, to, output, entity_type }).await
        }
        Cmd::Skew { from, to, group, examples, training_set, features, time_column, known_at_us, use_defaults } => {
            let mismatched = match (training_set, from, to) {
                (Some(file), _, _) => {
                    let args = skew::TrainingArgs { file, features, time_column, known_at_us, use_defaults, examples };
                    skew::training(server, cli.json, args).await?
                }
                (None, Some(from), Some(to)) => skew::run(server, cli.json, &from, &to, group, examples).await?,
                _ => return Err("give --from and --to, or --training-set".into()),
            };
            if mismatched {
                std::process::exit(skew::EXIT_MISMATCHED);
            }
            Ok(())
        }
        Cmd::Baseline { cmd: BaselineCmd::Capture { file, name, group } } => {
            drift::capture(server, cli.json, &file, &group, &name).await
        }
        Cmd::Baseline { cmd: BaselineCmd::List { group } } => drift::list(server, cli.json, group).await,
        Cmd::Drift { group, baseline, from, to, ingested } => {
            if drift::run(server, cli.json, &group, baseline, from, to, ingested).await? {
                std::process::exit(drift::EXIT_DRIFTED);
            }
            Ok(())
        }
        Cmd::Monitor { group } => {
            if monitor::run(server, cli.json, group).await? {
                std::process::exit(monitor::EXIT_BREACHED);
            }
            Ok(())
        }
        Cmd::Sst { cmd: SstCmd::Dump { file, limit } } => offline::sst_dump(&file, limit),
        Cmd::Wal { cmd: WalCmd::Dump { file, limit } } => offline::wal_dump(&file, limit),
        Cmd::Verify { dir } => offline::verify(&dir, cli.json),
        Cmd::Auth { cmd } => match cmd {
            AuthCmd::Create { file, name, scopes, groups, region, requests_per_second, values_per_second } => {
                let rates = quiver_server::auth::Rates { requests_per_second, values_per_second };
                auth::create(&file, cli.json, &name, &scopes, groups, region, rates)
            }
            AuthCmd::List { file } => auth::list(&file, cli.json),
            AuthCmd::Revoke { file, name } => auth::revoke(&file, &name),
        },
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
