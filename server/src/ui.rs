//! The web UI (README "Web UI"): a few pages for the people who run the feature store, served
//! by quiverd over HTTP on `--ui-listen` (off unless given).
//!
//! # What it serves
//! - `GET /`, `/app.js`, `/style.css`: the pages, one HTML file with its script and style,
//!   embedded in the binary (`server/ui/`). No build step and no runtime Node.
//! - `GET /api/...`: JSON read by the pages. Every endpoint calls the gRPC service that answers
//!   the same question ([`RegistryService`], [`MonitorService`], [`AdminService`]) in process,
//!   so a page shows exactly what the API and the CLI show, under the same tokens, scopes,
//!   group limits and rate limits (one `/api` call is one request against a token's rate);
//!   - `/api/node`: the node (region, authentication, version, start time);
//!   - `/api/registry`: entity types, and every group's serving definition and versions;
//!   - `/api/group?name=G`: every version of a group, its promotions, and which one serves;
//!   - `/api/health`: `GetFeatureHealth`, plus each group's history from [`History`];
//!   - `/api/replication`: `GetReplicationStatus` (needs the `admin` scope);
//!   - `/api/drift?group=G`: the group's newest baseline, and `MeasureDrift` of the served and
//!     the ingested values against it (histograms side by side).
//!
//! # Security
//! - The UI only reads: every endpoint is a `GET` and calls read-only RPCs.
//! - Authentication is the API's: with tokens on, each `/api` call must carry
//!   `Authorization: Bearer qvt_...` (the page asks for a token once and keeps it in the tab's
//!   `sessionStorage`; no cookie, so no cross-site request can use it), with the scopes the RPC
//!   needs; a token limited to groups sees only those groups.
//! - It listens on loopback addresses only (quiverd refuses another): it speaks plain HTTP, so
//!   reach it through an SSH tunnel or a TLS-terminating proxy on the same host. Requests whose
//!   `Host` is not a loopback name are refused (`421`), which defeats DNS rebinding.
//! - Pages are sent with a `Content-Security-Policy` allowing only their own script and style.
//! - At most [`UI_CONNECTIONS_MAX`] connections are open at once; more are closed. At most
//!   [`UI_API_REQUESTS_MAX`] `/api` calls run at once (the UI's own bound: its calls do not
//!   pass through the gRPC services' admission); more are refused with `429`.
//!
//! # History
//! quiverd's counters are totals since start; charts need them over time. [`History`] samples
//! every group's freshness, values written and answers served every [`UI_SAMPLE_INTERVAL`] and
//! keeps the last [`UI_SAMPLES`] (an hour), one record per group per sample; `/api/health`
//! adds the report it answers with as the last sample. The history is in memory only: it
//! starts again with quiverd.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use parking_lot::Mutex;
use quiver_proto::v1 as pb;
use quiver_proto::v1::admin_service_server::AdminService;
use quiver_proto::v1::monitor_service_server::MonitorService;
use quiver_proto::v1::registry_service_server::RegistryService;
use serde_json::{json, Value as Json};
use tonic::{Request, Status};

use crate::auth::{AuthMode, Authenticator, Principal, Scope};
use crate::health::{Health, ServedCounts, STATUSES};
use crate::service::{AdminApi, MonitorApi, RegistryApi};

/// How often [`History`] samples the counters.
pub const UI_SAMPLE_INTERVAL: Duration = Duration::from_secs(10);
/// Samples kept: an hour at [`UI_SAMPLE_INTERVAL`].
pub const UI_SAMPLES: usize = 360;
/// UI connections open at once; more are closed as they are accepted.
pub const UI_CONNECTIONS_MAX: usize = 64;
/// `/api` requests served at once (each may scan the served-feature log for drift); more are
/// refused with `429`.
pub const UI_API_REQUESTS_MAX: usize = 8;
/// How long a connection may take to send a request's headers.
pub const UI_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const STYLE_CSS: &str = include_str!("../ui/style.css");

/// What the pages may load: their own script, style and inline SVG images, nothing else.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
     base-uri 'none'; frame-ancestors 'none'; form-action 'none'";

/// One group at one sample.
#[derive(Debug, Clone, Copy)]
struct GroupSample {
    freshness_s: Option<f64>,
    written: u64,
    served: ServedCounts,
}

/// One sample of every group.
#[derive(Debug, Clone)]
struct Sample {
    at_ms: i64,
    groups: HashMap<Arc<str>, GroupSample>,
}

/// The counters over the last hour (see the module docs).
#[derive(Debug)]
pub struct History {
    health: Arc<Health>,
    interval: Duration,
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// An empty history of `health`'s figures, sampled every `interval` ([`UI_SAMPLE_INTERVAL`]
    /// but in tests).
    pub fn new(health: Arc<Health>, interval: Duration) -> Arc<History> {
        let interval = interval.max(Duration::from_millis(1));
        Arc::new(History { health, interval, samples: Mutex::new(VecDeque::with_capacity(UI_SAMPLES)) })
    }

    /// Every group's figures now (reads the stored watermarks: call off the async threads).
    fn take(&self) -> Result<Sample, quiver_storage::Error> {
        let now_us = crate::service::now_us();
        Ok(self.sample_of(&self.health.report(now_us, None, |_| true)?, now_us))
    }

    /// A sample from a health report made at `now_us` (the groups it holds).
    fn sample_of(&self, report: &[pb::GroupHealth], now_us: i64) -> Sample {
        let served = self.health.served_totals();
        let groups = report
            .iter()
            .map(|g| {
                let freshness_s = g.freshness.as_ref().map(dur_s);
                let served = served.get(&g.group).copied().unwrap_or_default();
                (Arc::from(g.group.as_str()), GroupSample { freshness_s, written: g.values_written, served })
            })
            .collect();
        Sample { at_ms: now_us.div_euclid(1000), groups }
    }

    fn record(&self, s: Sample) {
        let mut samples = self.samples.lock();
        if samples.len() == UI_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(s);
    }

    /// Samples every interval, forever (the task is aborted when quiverd stops).
    pub async fn sample_every_interval(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let h = self.clone();
            match tokio::task::spawn_blocking(move || h.take()).await {
                Ok(Ok(s)) => self.record(s),
                Ok(Err(e)) => tracing::warn!(error = %e, "UI history: reading the watermarks failed"),
                Err(e) => tracing::warn!(error = %e, "UI history: sampling failed"),
            }
        }
    }

    /// One group's series: the kept samples and `live`, as columns.
    fn series(&self, group: &str, live: &Sample) -> Json {
        let samples = self.samples.lock();
        let (mut t, mut fresh, mut written, mut served, mut nulls) = (vec![], vec![], vec![], vec![], vec![]);
        for s in samples.iter().chain([live]) {
            let Some(g) = s.groups.get(group) else { continue };
            t.push(s.at_ms);
            fresh.push(g.freshness_s);
            written.push(g.written);
            served.push(g.served.iter().sum::<u64>());
            // NOT_FOUND, STALE and DEFAULTED: the null answers of the null rate.
            nulls.push(g.served[1] + g.served[2] + g.served[3]);
        }
        json!({ "t_ms": t, "freshness_s": fresh, "written": written, "served": served, "served_null": nulls })
    }
}

/// The UI's state: the services it calls and the history it charts.
#[derive(Debug, Clone)]
pub struct Ui {
    auth: Arc<Authenticator>,
    registry: RegistryApi,
    monitor: MonitorApi,
    admin: AdminApi,
    history: Arc<History>,
    region: u32,
    started_ms: i64,
    api_slots: Arc<tokio::sync::Semaphore>,
}

/// An answer to one `/api` call.
type Answer = Result<Json, Status>;

impl Ui {
    /// The UI of a node whose services are these.
    pub fn new(
        auth: Arc<Authenticator>,
        registry: RegistryApi,
        monitor: MonitorApi,
        admin: AdminApi,
        history: Arc<History>,
        region: u32,
    ) -> Ui {
        let started_ms = crate::service::now_us().div_euclid(1000);
        let api_slots = Arc::new(tokio::sync::Semaphore::new(UI_API_REQUESTS_MAX));
        Ui { auth, registry, monitor, admin, history, region, started_ms, api_slots }
    }

    /// A request to a service from `p` (authenticated and charged once for the whole `/api`
    /// call by [`Ui::api`]: one page load is one request against the token's rate limit).
    fn request<T>(p: &Arc<Principal>, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.extensions_mut().insert(p.clone());
        req
    }

    /// Who sent `headers`, as the gRPC interceptor decides it (crate::auth).
    fn principal(&self, headers: &hyper::HeaderMap) -> Result<Arc<Principal>, Status> {
        let mut md = tonic::metadata::MetadataMap::new();
        if let Some(v) = headers.get(hyper::header::AUTHORIZATION) {
            let v = v.to_str().ok().and_then(|s| s.parse().ok()).ok_or_else(|| {
                Status::unauthenticated("the Authorization header is not \"Bearer qvt_...\" in ASCII")
            })?;
            md.insert("authorization", v);
        }
        self.auth.authenticate(&md)
    }

    /// The node, and who is asking. Answered without a token too (the page learns from it
    /// whether to ask for one): then it says only whether tokens are needed.
    async fn node(&self, h: &hyper::HeaderMap) -> Answer {
        let auth = match self.auth.mode() {
            AuthMode::None => "none",
            AuthMode::Tokens(_) => "tokens",
        };
        if !h.contains_key(hyper::header::AUTHORIZATION) && auth == "tokens" {
            return Ok(json!({ "auth": auth, "signed_in": false }));
        }
        let p = self.principal(h)?;
        p.take_request()?;
        let scopes: Vec<&str> = Scope::ALL.iter().filter(|s| p.has(**s)).map(|s| s.name()).collect();
        Ok(json!({
            "auth": auth,
            "signed_in": true,
            "token": p.name,
            "scopes": scopes,
            "region": self.region,
            "version": env!("CARGO_PKG_VERSION"),
            "started_ms": self.started_ms,
            "now_ms": crate::service::now_us().div_euclid(1000),
            "sample_interval_ms": self.history.interval.as_millis() as u64,
        }))
    }

    async fn registry(&self, p: &Arc<Principal>) -> Answer {
        let types = self.registry.list_entity_types(Self::request(p, pb::ListEntityTypesRequest {})).await?;
        let groups = self.registry.list_feature_groups(Self::request(p, pb::ListFeatureGroupsRequest {})).await?;
        let mut out = Vec::new();
        for g in groups.into_inner().feature_groups {
            let req = pb::ListGroupVersionsRequest { group: g.name.clone() };
            let versions = self.registry.list_group_versions(Self::request(p, req)).await?.into_inner();
            let mut j = group_json(&g);
            j["serving_version"] = json!(versions.serving_version);
            j["versions"] = versions.versions.iter().map(version_json).collect();
            out.push(j);
        }
        Ok(json!({
            "entity_types": types.into_inner().entity_types.iter().map(entity_type_json).collect::<Vec<_>>(),
            "groups": out,
        }))
    }

    async fn group(&self, p: &Arc<Principal>, query: &HashMap<String, String>) -> Answer {
        let name = required(query, "name")?;
        let req = pb::ListGroupVersionsRequest { group: name.to_string() };
        let versions = self.registry.list_group_versions(Self::request(p, req)).await?.into_inner();
        let mut defs = Vec::new();
        for v in &versions.versions {
            let req = pb::GetFeatureGroupRequest { name: name.to_string(), version: v.version };
            let def = self.registry.get_feature_group(Self::request(p, req)).await?.into_inner();
            let mut j = group_json(&def);
            j["state"] = json!(version_json(v));
            defs.push(j);
        }
        Ok(json!({
            "name": name,
            "serving_version": versions.serving_version,
            "versions": defs,
            "promotions": versions.promotions.iter().map(promotion_json).collect::<Vec<_>>(),
        }))
    }

    async fn health(&self, p: &Arc<Principal>) -> Answer {
        let req = Self::request(p, pb::GetFeatureHealthRequest { group: String::new() });
        let report = self.monitor.get_feature_health(req).await?.into_inner();
        // The live sample is the report itself (no second read of the watermarks).
        let now_us = report
            .now
            .as_ref()
            .and_then(|t| crate::convert::micros(t, "now").ok())
            .unwrap_or_else(crate::service::now_us);
        let live = self.history.sample_of(&report.groups, now_us);
        let groups: Vec<Json> = report
            .groups
            .iter()
            .map(|g| {
                let mut j = group_health_json(g);
                j["series"] = self.history.series(&g.group, &live);
                j
            })
            .collect();
        Ok(json!({
            "now_ms": ts_ms(report.now.as_ref()),
            "window_s": report.window.as_ref().map(dur_s),
            "statuses": STATUSES.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
            "log_answers_written": report.log_answers_written,
            "log_answers_dropped": report.log_answers_dropped,
            "groups": groups,
        }))
    }

    async fn replication(&self, p: &Arc<Principal>) -> Answer {
        p.require(Scope::Admin)?;
        let req = Self::request(p, pb::GetReplicationStatusRequest {});
        let r = self.admin.get_replication_status(req).await?.into_inner();
        let peers: Vec<Json> = r
            .peers
            .iter()
            .map(|p| {
                json!({
                    "region": p.region,
                    "address": p.address,
                    "state": pb::PeerState::try_from(p.state).map_or("UNKNOWN", |s| s.as_str_name()),
                    "cursor": p.cursor,
                    "lag_seqnos": p.lag_seqnos,
                    "lag_seconds": finite(p.lag_seconds),
                    "caught_up": p.caught_up,
                    "last_error": p.last_error,
                    "last_contact_ms": (p.last_contact_us > 0).then(|| p.last_contact_us.div_euclid(1000)),
                    "batches_applied": p.batches_applied,
                    "bootstraps": p.bootstraps,
                    "peer_acknowledged": p.peer_acknowledged,
                })
            })
            .collect();
        let knowledge: Vec<Json> = r
            .knowledge
            .iter()
            .flat_map(|k| &k.entries)
            .map(|e| json!({ "region": e.region, "counter": e.counter }))
            .collect();
        Ok(json!({
            "region": r.region,
            "peers": peers,
            "knowledge": knowledge,
            "conflicts": r.conflicts,
            "last_seqno": r.last_seqno,
        }))
    }

    async fn drift(&self, p: &Arc<Principal>, query: &HashMap<String, String>) -> Answer {
        let group = required(query, "group")?;
        let req = pb::ListBaselinesRequest { group: group.to_string() };
        let baselines = self.monitor.list_baselines(Self::request(p, req)).await?.into_inner().baselines;
        let Some(base) = baselines.into_iter().next() else {
            return Ok(json!({ "group": group, "baseline": null }));
        };
        let mut measured = serde_json::Map::new();
        for (name, source) in [("served", pb::DriftSource::Served), ("ingested", pb::DriftSource::Ingested)] {
            let req = pb::MeasureDriftRequest {
                group: group.to_string(),
                baseline: base.name.clone(),
                source: source as i32,
                ..Default::default()
            };
            let r = self.monitor.measure_drift(Self::request(p, req)).await?.into_inner();
            measured.insert(name.into(), drift_json(&r));
        }
        Ok(json!({ "group": group, "baseline": baseline_json(&base), "drift": measured }))
    }

    /// One `/api` call: authenticated and charged against the token's rate limit once, within
    /// [`UI_API_REQUESTS_MAX`] at once.
    async fn api(&self, path: &str, h: &hyper::HeaderMap, query: &HashMap<String, String>) -> Answer {
        let p = self.principal(h)?;
        let Ok(_slot) = self.api_slots.try_acquire() else {
            return Err(Status::resource_exhausted(format!(
                "the UI serves {UI_API_REQUESTS_MAX} API requests at once; retry"
            )));
        };
        p.take_request()?;
        match path {
            "/api/registry" => self.registry(&p).await,
            "/api/group" => self.group(&p, query).await,
            "/api/health" => self.health(&p).await,
            "/api/replication" => self.replication(&p).await,
            _ => self.drift(&p, query).await,
        }
    }

    /// Answers one HTTP request.
    async fn answer(&self, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Full<Bytes>> {
        if !loopback_host(req.headers()) {
            return plain(
                StatusCode::MISDIRECTED_REQUEST,
                "the UI answers only to a loopback Host (localhost, 127.0.0.1, [::1])\n",
            );
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "the UI only reads: GET\n");
        }
        let path = req.uri().path();
        let asset =
            |body: &'static str, kind: &str| response(StatusCode::OK, kind, Bytes::from_static(body.as_bytes()));
        match path {
            "/" | "/index.html" => return asset(INDEX_HTML, "text/html; charset=utf-8"),
            "/app.js" => return asset(APP_JS, "text/javascript; charset=utf-8"),
            "/style.css" => return asset(STYLE_CSS, "text/css; charset=utf-8"),
            _ => {}
        }
        let query: HashMap<String, String> =
            form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).into_owned().collect();
        let answer = match path {
            "/api/node" => self.node(req.headers()).await,
            "/api/registry" | "/api/group" | "/api/health" | "/api/replication" | "/api/drift" => {
                self.api(path, req.headers(), &query).await
            }
            _ => return plain(StatusCode::NOT_FOUND, "not found\n"),
        };
        let (status, body) = match answer {
            Ok(j) => (StatusCode::OK, j),
            Err(s) => (http_status(s.code()), json!({ "code": code_name(s.code()), "message": s.message() })),
        };
        response(status, "application/json", Bytes::from(body.to_string()))
    }
}

/// Serves the UI on `listener` until `shutdown` completes.
pub async fn serve(ui: Ui, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(UI_CONNECTIONS_MAX));
    // Open connections end with the server: a browser keeps its connection alive, and each
    // holds the services (and through them the engine, which quiverd closes next).
    let mut open = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            _ = &mut shutdown => {
                open.shutdown().await;
                return;
            }
            c = listener.accept() => c,
        };
        while open.try_join_next().is_some() {}
        let stream = match conn {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: do not spin.
                tracing::debug!(error = %e, "UI accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!("UI connection closed: {UI_CONNECTIONS_MAX} are open");
            continue;
        };
        let ui = ui.clone();
        open.spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let ui = ui.clone();
                async move { Ok::<_, Infallible>(ui.answer(req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(UI_HEADER_READ_TIMEOUT)
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(error = %e, "UI connection");
            }
        });
    }
}

/// Whether the UI may listen on `addr` (see the module docs).
pub fn check_listen(addr: SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "the UI listens on loopback addresses only ({addr} is not): it speaks plain HTTP; reach it through an SSH \
             tunnel or a TLS-terminating proxy on this host"
        ))
    }
}

fn loopback_host(headers: &hyper::HeaderMap) -> bool {
    let Some(host) = headers.get(hyper::header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    // Strip the port: after the bracket of an IPv6 literal, else after the last colon.
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn response(status: StatusCode, kind: &str, body: Bytes) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", kind)
        .header("content-security-policy", CSP)
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "no-referrer")
        .header("cache-control", "no-store")
        .body(Full::new(body))
        .unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new())))
}

fn plain(status: StatusCode, text: &'static str) -> hyper::Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", Bytes::from_static(text.as_bytes()))
}

fn required<'a>(query: &'a HashMap<String, String>, name: &str) -> Result<&'a str, Status> {
    query
        .get(name)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Status::invalid_argument(format!("the query parameter {name:?} is required")))
}

/// The HTTP status of a gRPC code, as gRPC's HTTP mapping gives it.
fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code as C;
    match code {
        C::Ok => StatusCode::OK,
        C::InvalidArgument | C::FailedPrecondition | C::OutOfRange => StatusCode::BAD_REQUEST,
        C::Unauthenticated => StatusCode::UNAUTHORIZED,
        C::PermissionDenied => StatusCode::FORBIDDEN,
        C::NotFound => StatusCode::NOT_FOUND,
        C::AlreadyExists | C::Aborted => StatusCode::CONFLICT,
        C::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        C::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        C::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        C::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub(crate) fn code_name(code: tonic::Code) -> String {
    // "NotFound" -> "NOT_FOUND", as the CLI and the SDK name codes.
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn ts_ms(t: Option<&prost_types::Timestamp>) -> Option<i64> {
    t.map(|t| t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos) / 1_000_000))
}

fn dur_s(d: &prost_types::Duration) -> f64 {
    d.seconds as f64 + f64::from(d.nanos) / 1e9
}

/// A number JSON can carry (NaN and infinities become null).
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn type_name(t: i32) -> String {
    pb::ValueType::try_from(t).map_or_else(
        |_| format!("type {t}"),
        |t| t.as_str_name().trim_start_matches("VALUE_TYPE_").to_ascii_lowercase(),
    )
}

fn entity_type_json(e: &pb::EntityType) -> Json {
    let keys: Vec<Json> = e
        .join_keys
        .iter()
        .map(|k| {
            let t = pb::JoinKeyType::try_from(k.r#type).map_or("unknown".to_string(), |t| {
                t.as_str_name().trim_start_matches("JOIN_KEY_TYPE_").to_ascii_lowercase()
            });
            json!({ "name": k.name, "type": t })
        })
        .collect();
    json!({ "name": e.name, "join_keys": keys, "description": e.description })
}

fn group_json(g: &pb::FeatureGroup) -> Json {
    let features: Vec<Json> = g
        .features
        .iter()
        .map(|f| {
            json!({
                "name": f.name,
                "type": type_name(f.r#type),
                "dim": (f.dim > 0).then_some(f.dim),
                "default": f.default_value.as_ref().map(crate::convert::value_text),
                "description": f.description,
                "max_null_rate": f.max_null_rate,
                "max_psi": f.max_psi,
                "max_ks": f.max_ks,
            })
        })
        .collect();
    let mut tags: Vec<(&String, &String)> = g.tags.iter().collect();
    tags.sort();
    json!({
        "name": g.name,
        "version": g.version,
        "entity_type": g.entity_type,
        "owner": g.owner,
        "description": g.description,
        "tags": tags.into_iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
        "ttl_s": g.ttl.as_ref().map(dur_s),
        "source": g.source,
        "transformation": g.transformation,
        "code_hash": g.code_hash,
        "created_ms": ts_ms(g.created_at.as_ref()),
        "freshness_sla_s": g.freshness_sla.as_ref().map(dur_s),
        "log_sample_rate": g.log_sample_rate,
        "features": features,
    })
}

fn version_json(v: &pb::GroupVersion) -> Json {
    let state = pb::group_version::State::try_from(v.state)
        .map_or("unknown".to_string(), |s| s.as_str_name().trim_start_matches("STATE_").to_ascii_lowercase());
    json!({
        "version": v.version,
        "state": state,
        "created_ms": ts_ms(v.created_at.as_ref()),
        "details": v.details,
        "shared_features": v.shared_features,
        "own_features": v.own_features,
        "retirement": v.retirement.as_ref().map(|r| json!({
            "by": r.by,
            "at_ms": ts_ms(r.at.as_ref()),
            "drop_after_ms": ts_ms(r.drop_after.as_ref()),
            "reason": r.reason,
        })),
    })
}

fn promotion_json(p: &pb::GroupPromotion) -> Json {
    let kind = pb::group_promotion::Kind::try_from(p.kind)
        .map_or("unknown".to_string(), |k| k.as_str_name().trim_start_matches("KIND_").to_ascii_lowercase());
    json!({
        "kind": kind,
        "from_version": p.from_version,
        "to_version": p.to_version,
        "by": p.by,
        "at_ms": ts_ms(p.at.as_ref()),
        "reason": p.reason,
        "forced": p.forced,
    })
}

fn group_health_json(g: &pb::GroupHealth) -> Json {
    let features: Vec<Json> = g
        .features
        .iter()
        .map(|f| {
            json!({
                "feature": f.feature,
                "counts": [f.present, f.not_found, f.stale, f.defaulted, f.unavailable],
                "null_rate": f.null_rate.and_then(finite),
                "max_null_rate": f.max_null_rate,
                "null_rate_breached": f.null_rate_breached,
            })
        })
        .collect();
    let drift_breached =
        [&g.drift, &g.ingested_drift].into_iter().flatten().any(|d| d.features.iter().any(|f| f.breached));
    json!({
        "group": g.group,
        "version": g.version,
        "newest_event_ms": ts_ms(g.newest_event_time.as_ref()),
        "newest_system_ms": ts_ms(g.newest_system_time.as_ref()),
        "freshness_s": g.freshness.as_ref().map(dur_s),
        "freshness_sla_s": g.freshness_sla.as_ref().map(dur_s),
        "sla_breached": g.sla_breached,
        "values_written": g.values_written,
        "features": features,
        "drift_breached": drift_breached,
    })
}

fn baseline_json(b: &pb::Baseline) -> Json {
    use pb::feature_baseline::Summary;
    let features: Vec<Json> = b
        .features
        .iter()
        .map(|f| {
            let (kind, buckets, counts): (&str, Vec<String>, Vec<u64>) = match &f.summary {
                Some(Summary::Numeric(n)) => ("numeric", bin_labels(&n.edges), n.counts.clone()),
                Some(Summary::Categorical(c)) => (
                    "categorical",
                    c.categories.iter().cloned().chain(["(other)".to_string()]).collect(),
                    c.counts.iter().copied().chain([c.other]).collect(),
                ),
                None => ("none", vec![], vec![]),
            };
            json!({
                "feature": f.feature,
                "type": type_name(f.r#type),
                "rows": f.rows,
                "nulls": f.nulls,
                "kind": kind,
                "buckets": buckets,
                "counts": counts,
            })
        })
        .collect();
    json!({
        "name": b.name,
        "captured_ms": ts_ms(b.captured_at.as_ref()),
        "source": b.source,
        "features": features,
    })
}

/// Labels of the bins `edges` make (see NumericSummary).
fn bin_labels(edges: &[f64]) -> Vec<String> {
    // About three significant digits: labels are for reading, the edges are in the baseline.
    let short = |x: f64| {
        let digits = match x.abs() {
            a if a >= 100.0 || a == 0.0 => 0,
            a if a >= 10.0 => 1,
            a if a >= 1.0 => 2,
            _ => 3,
        };
        let s = format!("{x:.digits$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    let mut out = Vec::with_capacity(edges.len() + 1);
    if let Some(first) = edges.first() {
        out.push(format!("< {}", short(*first)));
    }
    for w in edges.windows(2) {
        out.push(format!("[{}, {})", short(w[0]), short(w[1])));
    }
    if let Some(last) = edges.last() {
        out.push(format!("≥ {}", short(*last)));
    }
    if edges.is_empty() {
        out.push("all".into());
    }
    out
}

fn drift_json(r: &pb::MeasureDriftResponse) -> Json {
    let features: Vec<Json> = r
        .features
        .iter()
        .map(|f| {
            json!({
                "feature": f.feature,
                "values": f.values,
                "nulls": f.nulls,
                "psi": f.psi.and_then(finite),
                "js": f.js.and_then(finite),
                "ks": f.ks.and_then(finite),
                "max_psi": finite(f.max_psi),
                "max_ks": finite(f.max_ks),
                "breached": f.breached,
                "counts": f.counts,
            })
        })
        .collect();
    json!({
        "from_ms": ts_ms(r.from.as_ref()),
        "to_ms": ts_ms(r.to.as_ref()),
        "answers": r.answers,
        "features": features,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str) -> hyper::HeaderMap {
        let mut m = hyper::HeaderMap::new();
        m.insert(hyper::header::HOST, h.parse().expect("header"));
        m
    }

    #[test]
    fn only_loopback_hosts_are_answered() {
        for ok in ["localhost", "localhost:8080", "LOCALHOST:1", "127.0.0.1:9", "127.1.2.3", "[::1]:80", "[::1]"] {
            assert!(loopback_host(&host(ok)), "{ok}");
        }
        for bad in ["evil.example:80", "10.0.0.1:80", "localhost.evil.example", "[::2]:80", "", "127.0.0.1.nip.io"] {
            assert!(!loopback_host(&host(bad)), "{bad}");
        }
        assert!(!loopback_host(&hyper::HeaderMap::new()), "no Host");
    }

    #[test]
    fn the_ui_refuses_non_loopback_addresses() {
        assert!(check_listen("127.0.0.1:0".parse().expect("addr")).is_ok());
        assert!(check_listen("[::1]:0".parse().expect("addr")).is_ok());
        let e = check_listen("0.0.0.0:8080".parse().expect("addr")).expect_err("refused");
        assert!(e.contains("loopback"), "{e}");
    }

    #[test]
    fn codes_and_bins_read_as_people_expect() {
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(http_status(tonic::Code::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(bin_labels(&[1.0, 2.5]), ["< 1", "[1, 2.5)", "≥ 2.5"]);
        assert_eq!(bin_labels(&[13.4781, 150.0, 0.012345]), ["< 13.5", "[13.5, 150)", "[150, 0.012)", "≥ 0.012"]);
        assert_eq!(bin_labels(&[]), ["all"]);
        let v = pb::Value { kind: Some(pb::value::Kind::Int64Value(i64::MIN)) };
        assert_eq!(crate::convert::value_text(&v), "-9223372036854775808");
        let v = pb::Value { kind: Some(pb::value::Kind::BytesValue(vec![0, 255])) };
        assert_eq!(crate::convert::value_text(&v), "0x00ff");
    }
}
