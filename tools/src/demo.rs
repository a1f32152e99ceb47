//! `quiver demo`: the first thing a new user runs. Starts an embedded server on a temp
//! directory and a loopback port, applies an example registry, writes hourly synthetic events
//! for thousands of users, then runs online lookups and a point-in-time join, printing what it
//! did and how long it took.

use std::time::{Duration, Instant};

use quiver_proto::v1 as pb;
use quiver_server::daemon::{serve, Listeners, ServeConfig};
use tonic::transport::Channel;

use crate::common::{cell_text, grpc, now_us, Conn, Result};
use crate::registry_file;

const HOUR_US: i64 = 3_600_000_000;
/// Rows per write request while loading.
const ROWS_PER_REQUEST: u32 = 2000;
const DEMO_USERS_MAX: u32 = 1_000_000;
const DEMO_HOURS_MAX: u32 = 24 * 366;
const COUNTRIES: [&str; 5] = ["DE", "FR", "IN", "US", "BR"];

fn user(i: u32) -> pb::EntityKey {
    pb::EntityKey { parts: vec![pb::KeyPart { kind: Some(pb::key_part::Kind::StringValue(format!("user-{i:06}"))) }] }
}

fn value(kind: pb::value::Kind) -> pb::Value {
    pb::Value { kind: Some(kind) }
}

pub async fn run(users: u32, hours: u32) -> Result<()> {
    if users == 0 || hours == 0 || users > DEMO_USERS_MAX || hours > DEMO_HOURS_MAX {
        return Err(format!("--users must be 1..={DEMO_USERS_MAX} and --hours 1..={DEMO_HOURS_MAX}"));
    }
    let tmp = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("listen: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let cfg = ServeConfig {
        data_dir: tmp.path().to_path_buf(),
        durability: quiver_storage::Durability::Sync,
        memory_budget_bytes: 256 << 20,
        io_backend: quiver_storage::sstable::IoBackend::Auto,
        table_compression: quiver_storage::Options::default().compression,
        direct_reads: true,
        cluster: Default::default(),
        shard: None,
        replication_log_bytes: 0,
        join_threads: None,
        auth: quiver_server::auth::AuthMode::None,
        peer_token: Default::default(),
        tls: None,
        checkpoint_root: None,
        max_concurrent_requests: quiver_server::admission::REQUESTS_IN_FLIGHT_MAX_DEFAULT,
        max_connections: quiver_server::conn::CONNECTIONS_MAX_DEFAULT,
        shutdown_timeout: quiver_server::daemon::SHUTDOWN_TIMEOUT_DEFAULT,
        log_sample_rate: 0.0,
        log_retention: quiver_server::servedlog::LOG_RETENTION_DEFAULT,
        shadow: Vec::new(),
        shadow_sample_rate: quiver_server::shadow::SHADOW_SAMPLE_RATE_DEFAULT,
    };
    let server = tokio::spawn(serve(cfg, Listeners::api(listener), async { stopped.await.unwrap_or(()) }, |_| {}));
    println!("demo: embedded quiverd on {addr}, data in {}", tmp.path().display());
    let ch = connect(&format!("http://{addr}")).await?;
    let mut registry = pb::registry_service_client::RegistryServiceClient::new(ch.clone());
    let mut features = pb::feature_service_client::FeatureServiceClient::new(ch.clone());

    // 1. Registry.
    let req = registry_file::parse(registry_file::EXAMPLE)?;
    let changes = registry.apply_registry(req).await.map_err(grpc)?.into_inner().changes;
    for c in &changes {
        println!("registry: {} v{} ({} details)", c.object, c.version, c.details.len());
    }

    // 2. Ingest hourly events for every user, ending now.
    let now = now_us();
    let start = now - i64::from(hours - 1) * HOUR_US;
    let t = Instant::now();
    let mut values = 0u64;
    let mut batch = Vec::new();
    for h in 0..hours {
        for u in 0..users {
            let clicks = i64::from((u * 7 + h * 13) % 50);
            let mut row = pb::WriteRow {
                entity: Some(user(u)),
                group: "user_activity".into(),
                event_time: Some(quiver_server::convert::timestamp(start + i64::from(h) * HOUR_US)),
                ..Default::default()
            };
            row.values.insert("clicks_1h".into(), value(pb::value::Kind::Int64Value(clicks)));
            row.values.insert("spend_1h".into(), value(pb::value::Kind::Float64Value(clicks as f64 * 1.25)));
            row.values
                .insert("country".into(), value(pb::value::Kind::StringValue(COUNTRIES[(u % 5) as usize].into())));
            batch.push(row);
            if batch.len() as u32 == ROWS_PER_REQUEST {
                values += write(&mut features, std::mem::take(&mut batch)).await?;
            }
        }
    }
    if !batch.is_empty() {
        values += write(&mut features, batch).await?;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "ingest: {values} feature values ({users} users x 3 features x {hours} hours) in {secs:.2} s = {:.0} values/s",
        values as f64 / secs
    );

    // 3. Online lookups: 100 users x 3 features, repeated to time them.
    let lookup = pb::GetOnlineFeaturesRequest {
        entity_type: "user".into(),
        entities: (0..100.min(users)).map(|i| user(i * 37 % users)).collect(),
        features: vec![
            "user_activity:clicks_1h".into(),
            "user_activity:spend_1h".into(),
            "user_activity:country".into(),
        ],
        as_of: None,
        ..Default::default()
    };
    let mut times = Vec::new();
    let mut resp = pb::GetOnlineFeaturesResponse::default();
    for _ in 0..50 {
        let t = Instant::now();
        resp = features.get_online_features(lookup.clone()).await.map_err(grpc)?.into_inner();
        times.push(t.elapsed());
    }
    times.sort();
    let present =
        resp.columns.iter().flat_map(|c| &c.statuses).filter(|&&s| s == pb::FeatureStatus::Present as i32).count();
    println!(
        "online lookup: {} users x 3 features, {present} values present, {} us per request (median of {}, fastest {} us)",
        lookup.entities.len(),
        times[times.len() / 2].as_micros(),
        times.len(),
        times[0].as_micros()
    );
    for i in 0..3.min(lookup.entities.len()) {
        let cells: Vec<String> = resp
            .columns
            .iter()
            .map(|c| format!("{}={}", c.feature_ref.trim_start_matches("user_activity:"), cell_text(c, i)))
            .collect();
        println!("  user-{:06}: {}", (i as u32) * 37 % users, cells.join("  "));
    }

    // 4. Point-in-time join: a training spine of (user, timestamp) rows.
    let spine_rows = 10_000u32;
    let spine: Vec<pb::SpineRow> = (0..spine_rows)
        .map(|i| pb::SpineRow {
            entity: Some(user(i * 7919 % users)),
            timestamp: Some(quiver_server::convert::timestamp(
                start + i64::from(i % (hours * 60)) * 60_000_000 + 30_000_000,
            )),
        })
        .collect();
    let t = Instant::now();
    let mut stream = features
        .get_historical_features(pb::GetHistoricalFeaturesRequest {
            entity_type: "user".into(),
            spine,
            features: vec!["user_activity:clicks_1h".into(), "user_activity:spend_1h".into()],
            known_at: None,
            strict_availability: false,
            use_defaults: false,
        })
        .await
        .map_err(grpc)?
        .into_inner();
    let (mut rows, mut with_value, mut first) = (0usize, 0usize, None);
    while let Some(chunk) = stream.message().await.map_err(grpc)? {
        let col = &chunk.columns[0];
        rows += col.statuses.len();
        with_value += col.statuses.iter().filter(|&&s| s == pb::FeatureStatus::Present as i32).count();
        if first.is_none() {
            first = Some(chunk);
        }
    }
    println!(
        "point-in-time join: {rows} spine rows -> {rows} output rows, {with_value} with clicks_1h within the 2 h TTL, {} ms",
        t.elapsed().as_millis()
    );
    if let Some(chunk) = first {
        for i in 0..3.min(chunk.columns[0].statuses.len()) {
            let cells: Vec<String> = chunk
                .columns
                .iter()
                .map(|c| format!("{}={}", c.feature_ref.trim_start_matches("user_activity:"), cell_text(c, i)))
                .collect();
            println!("  row {i}: {}", cells.join("  "));
        }
    }

    let stats = pb::admin_service_client::AdminServiceClient::new(ch)
        .get_stats(pb::GetStatsRequest {})
        .await
        .map_err(grpc)?
        .into_inner();
    println!(
        "engine: {} flushes, {} compactions, {} write groups, {} WAL fsyncs",
        stats.flushes, stats.compactions, stats.write_groups, stats.wal_syncs
    );
    let _ = stop.send(());
    server.await.map_err(|e| format!("server task: {e}"))??;
    println!("demo: done (server stopped, temp data removed)");
    Ok(())
}

async fn write(c: &mut pb::feature_service_client::FeatureServiceClient<Conn>, rows: Vec<pb::WriteRow>) -> Result<u64> {
    let r = c
        .write_features(pb::WriteFeaturesRequest {
            rows,
            durability: pb::Durability::Async as i32,
            ..Default::default()
        })
        .await
        .map_err(grpc)?;
    Ok(r.into_inner().values_written)
}

async fn connect(addr: &str) -> Result<Conn> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Channel::from_shared(addr.to_string()).map_err(|e| e.to_string())?.connect().await {
            Ok(c) => return Ok(Conn::new(c, Default::default())),
            Err(e) if Instant::now() > deadline => return Err(format!("embedded server did not come up: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
