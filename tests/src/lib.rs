//! Harness for end-to-end tests: starts a real `quiverd` on a loopback port with a temp data
//! directory and connects the generated clients.

pub mod shard;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use quiver_proto::v1 as pb;
use quiver_testkit::quiverd;
use tonic::transport::Channel;

/// The `quiverd` binary of this build (`cargo test --workspace` builds it with the server's
/// tests; `QUIVERD` overrides the path); panics when there is none.
pub fn quiverd_path() -> PathBuf {
    quiverd::path().unwrap_or_else(|e| panic!("{e}"))
}

/// A running daemon.
pub struct Daemon {
    child: Child,
    /// Its gRPC address.
    pub addr: String,
    /// Its metrics address (host:port), if metrics are on.
    pub metrics: Option<String>,
    /// Its data directory.
    pub data_dir: PathBuf,
}

impl Daemon {
    /// Starts `quiverd` on `data_dir` on a free loopback port and waits until it listens (with a
    /// 64 MiB memory budget unless `extra` gives one).
    pub fn start(data_dir: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_at(data_dir, "127.0.0.1:0", extra)
    }

    /// Starts `quiverd` on `data_dir` listening on `listen` and waits until it listens.
    pub fn start_at(data_dir: &Path, listen: &str, extra: &[&str]) -> Daemon {
        Daemon::start_with_env(data_dir, listen, extra, &[])
    }

    /// Like [`Daemon::start_at`], with extra environment variables (the test-only switches).
    pub fn start_with_env(data_dir: &Path, listen: &str, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let (child, listening) = quiverd::start(
            Command::new(quiverd_path())
                .arg("--data-dir")
                .arg(data_dir)
                .args(["--listen", listen, "--metrics-listen", "127.0.0.1:0"])
                .args(if extra.contains(&"--memory-budget-mb") { &[][..] } else { &["--memory-budget-mb", "64"][..] })
                .args(extra)
                .env("RUST_LOG", "warn")
                .envs(env.iter().copied()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Daemon {
            child,
            addr: format!("http://{}", listening.addr),
            metrics: listening.metrics,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// A channel to the daemon.
    pub async fn channel(&self) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Channel::from_shared(self.addr.clone()).expect("uri").connect().await {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("cannot connect to {}: {e}", self.addr),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// A plaintext channel that connects on first use (for a daemon that may refuse it).
    pub fn channel_lazy(&self) -> Channel {
        Channel::from_shared(self.addr.clone()).expect("uri").connect_lazy()
    }

    /// The metrics page (a plain HTTP/1.1 GET).
    pub fn scrape(&self) -> String {
        let addr = self.metrics.as_ref().expect("metrics are on");
        http_get(addr, "/metrics").unwrap_or_else(|e| panic!("GET http://{addr}/metrics: {e}"))
    }

    /// The value of the unlabelled metric `name` (e.g. `quiver_requests_shed_total`); panics if
    /// the page lacks it.
    pub fn metric(&self, name: &str) -> u64 {
        let page = self.scrape();
        let prefix = format!("{name} ");
        page.lines()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or_else(|| panic!("metric {name} missing from {page}"))
    }

    /// Its process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it with SIGTERM (graceful) and waits; returns whether it exited cleanly.
    pub fn stop(mut self) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// Kills it with SIGKILL and waits.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A channel that sends `authorization: Bearer <token>` with every call (nothing without one),
/// as any gRPC client of a quiverd with tokens does.
pub type TokenChannel = tonic::service::interceptor::InterceptedService<Channel, Token>;

/// The client side of bearer-token authentication.
#[derive(Debug, Clone, Default)]
pub struct Token(Option<tonic::metadata::AsciiMetadataValue>);

impl Token {
    /// Sends `token`.
    pub fn new(token: &str) -> Token {
        Token(Some(format!("Bearer {token}").parse().expect("a token is ASCII")))
    }
}

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Generated clients over one channel.
#[derive(Clone)]
pub struct Clients {
    /// FeatureService.
    pub features: pb::feature_service_client::FeatureServiceClient<TokenChannel>,
    /// RegistryService.
    pub registry: pb::registry_service_client::RegistryServiceClient<TokenChannel>,
    /// AdminService.
    pub admin: pb::admin_service_client::AdminServiceClient<TokenChannel>,
    /// MonitorService.
    pub monitor: pb::monitor_service_client::MonitorServiceClient<TokenChannel>,
}

impl Clients {
    /// Clients of a running daemon, without a token.
    pub async fn of(d: &Daemon) -> Clients {
        Clients::over(d.channel().await, Token::default())
    }

    /// Clients of a running daemon sending `token`.
    pub async fn with_token(d: &Daemon, token: &str) -> Clients {
        Clients::over(d.channel().await, Token::new(token))
    }

    /// Clients over `c`, sending `token`.
    pub fn over(c: Channel, token: Token) -> Clients {
        let c = TokenChannel::new(c, token);
        Clients {
            features: pb::feature_service_client::FeatureServiceClient::new(c.clone()),
            registry: pb::registry_service_client::RegistryServiceClient::new(c.clone()),
            admin: pb::admin_service_client::AdminServiceClient::new(c.clone()),
            monitor: pb::monitor_service_client::MonitorServiceClient::new(c),
        }
    }
}

/// The point-in-time join of `user_stats:clicks` (the example registry) for spine rows
/// `(user, time)`: per row `(status, event time, value)`, in spine order (checked chunk by
/// chunk).
pub async fn join_clicks(
    c: &mut Clients,
    spine: &[(String, i64)],
    known_at: Option<i64>,
    strict: bool,
) -> Vec<(i32, i64, i64)> {
    let req = pb::GetHistoricalFeaturesRequest {
        entity_type: "user".into(),
        spine: spine.iter().map(|(u, t)| pb::SpineRow { entity: Some(key(u)), timestamp: ts(*t) }).collect(),
        features: vec!["user_stats:clicks".into()],
        known_at: known_at.and_then(ts),
        strict_availability: strict,
        use_defaults: false,
    };
    let mut stream = c.features.get_historical_features(req).await.expect("join").into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.expect("chunk") {
        assert_eq!(chunk.first_row as usize, out.len(), "chunks arrive in spine order");
        let col = &chunk.columns[0];
        for i in 0..col.statuses.len() {
            out.push((col.statuses[i], col.event_times_us[i], col.int64_values[i]));
        }
    }
    out
}

/// Waits until `f` answers true, asking every 20 ms; panics naming `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free loopback port (bound, read, released: another process could take it meanwhile).
pub fn free_port() -> u16 {
    quiverd::free_port().unwrap_or_else(|e| panic!("{e}"))
}

/// A timestamp from microseconds since the epoch, as a message field.
pub fn ts(us: i64) -> Option<prost_types::Timestamp> {
    Some(quiver_testkit::micros_to_timestamp(us))
}

/// A single-part string entity key.
pub fn key(id: &str) -> pb::EntityKey {
    pb::EntityKey { parts: vec![pb::KeyPart { kind: Some(pb::key_part::Kind::StringValue(id.into())) }] }
}

/// A write of `user_stats:clicks` (the example registry) for `user` at `event_us`.
pub fn clicks_row(user: &str, event_us: i64, clicks: i64) -> pb::WriteRow {
    pb::WriteRow {
        entity: Some(key(user)),
        group: "user_stats".into(),
        event_time: ts(event_us),
        values: [("clicks".to_string(), int(clicks))].into_iter().collect(),
        ..Default::default()
    }
}

pub use quiver_testkit::etcd::http_get;

/// An int64 value.
pub fn int(v: i64) -> pb::Value {
    pb::Value { kind: Some(pb::value::Kind::Int64Value(v)) }
}

/// The registry the tests use: `user` and `user_stats` (ttl 1 h; clicks int64, spend float64
/// with default -1).
pub fn example_registry() -> pb::ApplyRegistryRequest {
    let feature = |name: &str, t: pb::ValueType, d: Option<pb::Value>| pb::FeatureDef {
        name: name.into(),
        r#type: t as i32,
        default_value: d,
        description: String::new(),
        ..Default::default()
    };
    pb::ApplyRegistryRequest {
        entity_types: vec![pb::EntityType {
            name: "user".into(),
            join_keys: vec![pb::JoinKey { name: "user_id".into(), r#type: pb::JoinKeyType::String as i32 }],
            description: "a customer".into(),
        }],
        feature_groups: vec![pb::FeatureGroup {
            name: "user_stats".into(),
            entity_type: "user".into(),
            owner: "ml@example.com".into(),
            ttl: Some(prost_types::Duration { seconds: 3600, nanos: 0 }),
            features: vec![
                feature("clicks", pb::ValueType::Int64, None),
                feature(
                    "spend",
                    pb::ValueType::Float64,
                    Some(pb::Value { kind: Some(pb::value::Kind::Float64Value(-1.0)) }),
                ),
            ],
            ..Default::default()
        }],
        dry_run: false,
        promote: false,
    }
}

/// A one-feature numeric drift baseline of `group:feature` (int64) with no bins: every value of
/// `sample` in one bin, for tests that need a baseline to exist.
pub fn int64_baseline(group: &str, feature: &str, sample: Vec<f64>) -> pb::PutBaselineRequest {
    pb::PutBaselineRequest {
        baseline: Some(pb::Baseline {
            group: group.into(),
            name: "b1".into(),
            features: vec![pb::FeatureBaseline {
                feature: feature.into(),
                r#type: pb::ValueType::Int64 as i32,
                rows: sample.len() as u64,
                nulls: 0,
                summary: Some(pb::feature_baseline::Summary::Numeric(pb::NumericSummary {
                    edges: vec![],
                    counts: vec![sample.len() as u64],
                    sample,
                })),
            }],
            ..Default::default()
        }),
    }
}

/// A single-member etcd on loopback, in its own temporary directory
/// ([`quiver_testkit::etcd::Etcd`]; `.ci/run` installs Debian's `etcd-server`).
pub struct Etcd {
    inner: quiver_testkit::etcd::Etcd,
    /// Its client URL (`http://127.0.0.1:PORT`).
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts it and waits until it answers on its client port; panics if there is no etcd.
    pub fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("temp dir");
        let localhost = std::net::IpAddr::from([127, 0, 0, 1]);
        let inner = quiver_testkit::etcd::Etcd::start_on(localhost, dir.path()).unwrap_or_else(|e| panic!("{e}"));
        Etcd { url: inner.url.clone(), inner, _dir: dir }
    }

    /// Whether `GET /health` answers `"health":"true"`.
    pub fn healthy(&self) -> bool {
        self.inner.healthy()
    }

    /// Kills it (SIGKILL) and waits.
    pub fn kill(self) {
        self.inner.kill()
    }
}
