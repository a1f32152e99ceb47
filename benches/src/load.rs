//! The `quiver-bench` load generator: one client harness for Quiver (gRPC) and Redis, so both
//! systems are measured with the same request mix, concurrency and clock.
//!
//! - **Data set**: entity `i` is `u{i}` with [`FEATURES`](crate::FEATURES)-style float64
//!   features `f0..f{F-1}` whose value is [`value_of`]`(i, f)`; in Quiver it is the group
//!   [`GROUP`] of entity type [`ENTITY_TYPE`], in Redis the hash `u{i}`.
//! - **Closed loop**: `concurrency` workers each send a request, wait for the answer, repeat:
//!   maximum throughput.
//! - **Open loop**: the workers share a fixed rate; request `k` of a worker is *due* at
//!   `start + k / rate_per_worker` and its latency counts from that due time, so a stalled
//!   server shows up as latency instead of as fewer requests (no coordinated omission, like
//!   wrk2).
//!
//! Latencies go into HDR histograms (µs, 3 significant digits), merged across workers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use quiver_proto::v1 as pb;
use tonic::transport::Channel;

use crate::Rng;

/// The benchmark's entity type in Quiver.
pub const ENTITY_TYPE: &str = "bench_user";
/// The benchmark's feature group in Quiver.
pub const GROUP: &str = "bench";
/// Highest latency the histograms record (60 s, in µs); longer requests count as this.
const LATENCY_MAX_US: u64 = 60_000_000;

/// The value of feature `f` of entity `i` at its event `j` (exact in float64, in Redis' text
/// form and in DuckDB's SQL: `((i * 31 + j * 17 + f) % 1000000) * 0.5`).
pub fn value_at_event(i: u64, j: u64, f: u32) -> f64 {
    ((i * 31 + j * 17 + u64::from(f)) % 1_000_000) as f64 * 0.5
}

/// The value of feature `f` of entity `i` in the online data set (one event).
pub fn value_of(i: u64, f: u32) -> f64 {
    value_at_event(i, 0, f)
}

/// Event time (µs) of entity `i`'s event `j`: hourly events, each entity offset by whole
/// seconds (`1000000 + j * 3600000000 + (i % 3600) * 1000000` in SQL).
pub fn event_time_us(i: u64, j: u64) -> i64 {
    (1_000_000 + j * 3_600_000_000 + (i % 3600) * 1_000_000) as i64
}

/// The entity key text of entity `i`.
pub fn entity_name(i: u64) -> String {
    format!("u{i}")
}

/// Feature names `f0..f{n-1}`.
pub fn feature_names(n: u32) -> Vec<String> {
    (0..n).map(|f| format!("f{f}")).collect()
}

/// The registry the benchmark applies: group `group` with float64 features `f0..`, no TTL,
/// its online answers logged for `log_sample_rate` of entities (`None`: the server's default);
/// applied with `promote`, so a changed share serves at once.
pub fn registry(group: &str, features: u32, log_sample_rate: Option<f64>) -> pb::ApplyRegistryRequest {
    pb::ApplyRegistryRequest {
        entity_types: vec![pb::EntityType {
            name: ENTITY_TYPE.into(),
            join_keys: vec![pb::JoinKey { name: "user_id".into(), r#type: pb::JoinKeyType::String as i32 }],
            ..Default::default()
        }],
        feature_groups: vec![pb::FeatureGroup {
            name: group.into(),
            entity_type: ENTITY_TYPE.into(),
            features: feature_names(features)
                .into_iter()
                .map(|name| pb::FeatureDef { name, r#type: pb::ValueType::Float64 as i32, ..Default::default() })
                .collect(),
            log_sample_rate,
            ..Default::default()
        }],
        // A changed share is a new version over the same data: it serves at once.
        promote: true,
        ..Default::default()
    }
}

/// A Quiver entity key.
pub fn entity_key(i: u64) -> pb::EntityKey {
    pb::EntityKey { parts: vec![pb::KeyPart { kind: Some(pb::key_part::Kind::StringValue(entity_name(i))) }] }
}

/// One write row: every feature of entity `i` at its event `j`, into `group`.
pub fn write_row(group: &str, i: u64, j: u64, features: u32) -> pb::WriteRow {
    let us = event_time_us(i, j);
    let t = quiver_testkit::micros_to_timestamp(us);
    pb::WriteRow {
        entity: Some(entity_key(i)),
        group: group.into(),
        event_time: Some(t),
        values: (0..features)
            .map(|f| {
                (format!("f{f}"), pb::Value { kind: Some(pb::value::Kind::Float64Value(value_at_event(i, j, f))) })
            })
            .collect(),
        ..Default::default()
    }
}

/// How to drive load.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Entities in the data set (requests pick them uniformly).
    pub entities: u64,
    /// Features per request.
    pub features: u32,
    /// Entities per request.
    pub batch: usize,
    /// Concurrent workers.
    pub concurrency: usize,
    /// How long to measure (after `warmup`).
    pub duration: Duration,
    /// Unmeasured time first.
    pub warmup: Duration,
    /// Open loop at this many requests per second; `None`: closed loop.
    pub rate: Option<f64>,
    /// The server's processes (on this machine; several for a sharded region): their CPU time
    /// over the measured window, summed, is reported per request.
    pub server_pids: Vec<u32>,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub requests: u64,
    pub errors: u64,
    pub values: u64,
    pub seconds: f64,
    pub latency: Histogram<u64>,
    pub first_error: Option<String>,
    /// The server's CPU time (µs) over the measured window, if its pid was given.
    pub server_cpu_us: Option<u64>,
}

impl Report {
    /// The report as one JSON object.
    pub fn json(&self, target: &str, spec: &LoadSpec) -> serde_json::Value {
        let q = |p: f64| self.latency.value_at_quantile(p);
        serde_json::json!({
            "target": target,
            "mode": if spec.rate.is_some() { "open" } else { "closed" },
            "rate": spec.rate,
            "entities": spec.entities,
            "features": spec.features,
            "batch": spec.batch,
            "concurrency": spec.concurrency,
            "seconds": self.seconds,
            "requests": self.requests,
            "errors": self.errors,
            "first_error": self.first_error,
            "requests_per_s": self.requests as f64 / self.seconds,
            "server_cpu_us_per_request": self.server_cpu_us.filter(|_| self.requests > 0).map(|c| c as f64 / self.requests as f64),
            "server_cpu_share": self.server_cpu_us.map(|c| c as f64 / 1e6 / self.seconds),
            "values_per_s": self.values as f64 / self.seconds,
            "latency_us": { "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": self.latency.max() },
        })
    }
}

/// A system under test: answers a lookup of some entities' features and returns how many
/// values came back.
#[derive(Clone)]
pub enum Target {
    /// Quiver over gRPC; one client per connection.
    Quiver { clients: Vec<pb::feature_service_client::FeatureServiceClient<Channel>>, refs: Vec<String> },
    /// Quiver's sharded region through the routing client: each entity sent to its owner.
    Routed { router: Arc<quiver_tools::route::Router>, refs: Vec<String> },
    /// Redis HMGET (pipelined for batches); one multiplexed connection per connection.
    Redis { conns: Vec<redis::aio::MultiplexedConnection>, fields: Vec<String> },
}

impl Target {
    /// Connects `connections` clients to Quiver at `addr`.
    pub async fn quiver(addr: &str, connections: usize, features: u32) -> Result<Target, String> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            let ch = Channel::from_shared(addr.to_string())
                .map_err(|e| format!("bad address {addr}: {e}"))?
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(|e| format!("cannot reach {addr}: {e}"))?;
            clients.push(
                pb::feature_service_client::FeatureServiceClient::new(ch)
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(usize::MAX),
            );
        }
        Ok(Target::Quiver { clients, refs: feature_names(features).iter().map(|f| format!("{GROUP}:{f}")).collect() })
    }

    /// A routing client of the sharded region whose map `seed` serves.
    pub async fn routed(seed: &str, features: u32) -> Result<Target, String> {
        let router = quiver_tools::route::Router::connect(seed, Default::default(), None)
            .await
            .map_err(|s| format!("cannot read the slot map at {seed}: {:?}: {}", s.code(), s.message()))?;
        let refs = feature_names(features).iter().map(|f| format!("{GROUP}:{f}")).collect();
        Ok(Target::Routed { router: Arc::new(router), refs })
    }

    /// Connects `connections` multiplexed connections to Redis at `url`.
    pub async fn redis(url: &str, connections: usize, features: u32) -> Result<Target, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis {url}: {e}"))?;
        let mut conns = Vec::new();
        for _ in 0..connections.max(1) {
            conns.push(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| format!("cannot reach redis {url}: {e}"))?,
            );
        }
        Ok(Target::Redis { conns, fields: feature_names(features) })
    }

    /// One lookup of `entities` by worker `worker`; the values returned, in row-major order
    /// (`None`: missing), for checking.
    pub async fn lookup(&self, worker: usize, entities: &[u64]) -> Result<Vec<Option<f64>>, String> {
        match self {
            Target::Quiver { clients, refs } => {
                let mut c = clients[worker % clients.len()].clone();
                let resp = c.get_online_features(lookup_request(entities, refs)).await;
                let resp = resp.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?.into_inner();
                Ok(values_of(&resp, entities.len(), refs.len()))
            }
            Target::Routed { router, refs } => {
                let resp = router.get_online_features(lookup_request(entities, refs)).await;
                let resp = resp.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
                Ok(values_of(&resp, entities.len(), refs.len()))
            }
            Target::Redis { conns, fields } => {
                let mut c = conns[worker % conns.len()].clone();
                let mut pipe = redis::pipe();
                for &i in entities {
                    pipe.cmd("HMGET").arg(entity_name(i)).arg(fields);
                }
                let rows: Vec<Vec<Option<f64>>> = pipe.query_async(&mut c).await.map_err(|e| e.to_string())?;
                Ok(rows.into_iter().flatten().collect())
            }
        }
    }
}

/// The benchmark's lookup of `entities`' features `refs`.
fn lookup_request(entities: &[u64], refs: &[String]) -> pb::GetOnlineFeaturesRequest {
    pb::GetOnlineFeaturesRequest {
        entity_type: ENTITY_TYPE.into(),
        entities: entities.iter().map(|&i| entity_key(i)).collect(),
        features: refs.to_vec(),
        ..Default::default()
    }
}

/// An answer's values in row-major order (`None`: not present).
fn values_of(resp: &pb::GetOnlineFeaturesResponse, rows: usize, features: usize) -> Vec<Option<f64>> {
    let mut out = vec![None; rows * features];
    for (j, col) in resp.columns.iter().enumerate() {
        for (i, v) in col.float64_values.iter().enumerate() {
            if col.statuses.get(i) == Some(&(pb::FeatureStatus::Present as i32)) {
                if let Some(slot) = out.get_mut(i * features + j) {
                    *slot = Some(*v);
                }
            }
        }
    }
    out
}

/// Runs a lookup load against `target`.
pub async fn run_lookups(target: &Target, spec: &LoadSpec) -> Report {
    let per_worker_rate = spec.rate.map(|r| r / spec.concurrency.max(1) as f64);
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    // The server's CPU time at the start and the end of the measured window.
    let cpu = (!spec.server_pids.is_empty()).then(|| {
        let pids = spec.server_pids.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let a = processes_cpu_us(&pids);
            tokio::time::sleep_until(end.into()).await;
            let b = processes_cpu_us(&pids);
            a.zip(b).map(|(a, b)| b.saturating_sub(a))
        })
    });
    let mut tasks = Vec::new();
    for w in 0..spec.concurrency.max(1) {
        let target = target.clone();
        let spec = spec.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(0x9e37_79b9 ^ ((w as u64 + 1) * 0x1000_0001));
            let mut hist = Histogram::<u64>::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid histogram bounds");
            let (mut requests, mut errors, mut values) = (0u64, 0u64, 0u64);
            let mut first_error = None;
            let mut k = 0u64;
            let mut keys = vec![0u64; spec.batch];
            loop {
                let due = match per_worker_rate {
                    Some(r) => {
                        // Spread the workers' phases so they do not fire together.
                        let at = start + Duration::from_secs_f64((k as f64 + w as f64 / spec.concurrency as f64) / r);
                        tokio::time::sleep_until(at.into()).await;
                        at
                    }
                    None => Instant::now(),
                };
                if due >= end {
                    break;
                }
                k += 1;
                for key in keys.iter_mut() {
                    *key = rng.below(spec.entities);
                }
                let r = target.lookup(w, &keys).await;
                let done = Instant::now();
                if due >= measure_from {
                    let us = u64::try_from(done.duration_since(due).as_micros()).unwrap_or(u64::MAX);
                    hist.saturating_record(us.clamp(1, LATENCY_MAX_US));
                    requests += 1;
                    match r {
                        Ok(v) => values += v.iter().filter(|x| x.is_some()).count() as u64,
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
            (hist, requests, errors, values, first_error)
        }));
    }
    let mut report = Report {
        requests: 0,
        errors: 0,
        values: 0,
        seconds: spec.duration.as_secs_f64(),
        latency: Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid histogram bounds"),
        first_error: None,
        server_cpu_us: None,
    };
    for t in tasks {
        match t.await {
            Ok((h, r, e, v, fe)) => {
                let _ = report.latency.add(&h);
                report.requests += r;
                report.errors += e;
                report.values += v;
                if report.first_error.is_none() {
                    report.first_error = fe;
                }
            }
            Err(e) => {
                report.errors += 1;
                report.first_error.get_or_insert(format!("worker failed: {e}"));
            }
        }
    }
    if let Some(cpu) = cpu {
        report.server_cpu_us = cpu.await.ok().flatten();
    }
    report
}

/// Compares both targets' answers for `sample` random entities, all features; returns the
/// number of values compared or the first disagreement.
pub async fn check_agreement(a: &Target, b: &Target, entities: u64, sample: u64) -> Result<u64, String> {
    let mut rng = Rng::new(42);
    let mut compared = 0u64;
    for _ in 0..sample {
        let i = rng.below(entities);
        let (x, y) = (a.lookup(0, &[i]).await?, b.lookup(0, &[i]).await?);
        if x != y {
            return Err(format!("entity {i}: answers differ: {x:?} vs {y:?}"));
        }
        if x.iter().any(Option::is_none) {
            return Err(format!("entity {i}: values missing: {x:?}"));
        }
        compared += x.len() as u64;
    }
    Ok(compared)
}

/// CPU time (user + system, µs) a process has used so far, from `/proc/PID/stat`; `None` if
/// the process is gone or the file is unreadable.
pub fn process_cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (comm) is in parentheses and may hold spaces: parse after its closing one.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the file, 12 and 13 after comm and state.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 1_000_000 / clock_ticks_per_second())
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`, asked once; 100 on every Linux we
/// run on, and the fallback).
fn clock_ticks_per_second() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// The summed CPU time (µs) of `pids` (`None` if there are none, or one is unreadable).
pub fn processes_cpu_us(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| process_cpu_us(p)).sum()
}

/// The summed resident set size (MiB) of `pids` (`None` if there are none, or one is unreadable).
pub fn processes_rss_mib(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| process_rss_mib(p)).sum()
}

/// Resident memory of a process (MiB), from `/proc/PID/status`.
pub fn process_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
