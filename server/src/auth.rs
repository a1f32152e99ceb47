//! Who may do what: bearer tokens with scopes, optionally limited to feature groups.
//!
//! # The model
//! A client sends `authorization: Bearer <token>` in its gRPC metadata. A token is
//! `qvt_` followed by 64 hex digits (32 random bytes); the server keeps only its SHA-256 (a
//! token is as random as a key, so a fast hash is as good as a slow one and costs nothing per
//! request). Tokens live in a TOML file named by the configuration (`auth_tokens`), reloaded on
//! SIGHUP, written by `quiver auth create|revoke` and read by `quiver auth list`:
//!
//! ```toml
//! [[token]]
//! name = "trainer"                 # unique, shown in logs, never secret
//! hash = "sha256:9f86d0..."
//! scopes = ["read"]
//! groups = ["fraud_", "ads_"]       # optional: group-name prefixes this token is limited to
//! requests_per_second = 100         # optional rate limits (see "Rate limits")
//! values_per_second = 1000000
//!
//! [[token]]
//! name = "region-2"
//! hash = "sha256:..."
//! scopes = ["replication"]
//! region = 2                        # required with `replication`: the peer it speaks for
//! ```
//!
//! Scopes and what they allow:
//! - `read`: `GetOnlineFeatures`, `GetHistoricalFeatures`, `ScanHistory`;
//! - `write`: `WriteFeatures`, `WriteFeaturesStream`, `CopyFeatureHistory`;
//! - `registry`: `ApplyRegistry`, `PromoteGroup`, `RollbackGroup`, `RetireGroupVersion`;
//! - `admin`: every `AdminService` RPC;
//! - `replication`: `ReplicationService` (`Pull`, `Snapshot`) for the token's own region only.
//!
//! Registry reads (`GetFeatureGroup`, `ListFeatureGroups`, `GetEntityType`, `ListEntityTypes`,
//! `ListGroupVersions`) need any valid token: clients must see the schema to form requests. A
//! token limited to groups sees only those groups, may name only those groups in `read`,
//! `write` and `registry` requests, and may send entity types to `ApplyRegistry` only unchanged (entity
//! types are shared by every group). `admin` and `replication` are node-wide: a token with
//! either and a group limit is refused when the file is loaded.
//!
//! The health service (`grpc.health.v1.Health`), reflection and the metrics endpoint need no
//! token: scrapers and load balancers must reach them, and they reveal no feature data.
//!
//! A missing, malformed or unknown token is `UNAUTHENTICATED`; a valid token without the scope
//! or the group is `PERMISSION_DENIED`. With `auth = "none"` every request may do everything; the
//! daemon logs that loudly and refuses it on a non-loopback address unless it was asked for
//! explicitly.
//!
//! # Rate limits
//! A token may carry `requests_per_second` (every call it makes, each message of a write
//! stream included) and `values_per_second` (cells asked of `GetOnlineFeatures`, entities x
//! features; values and deletes written; spine rows x features of a point-in-time join). Each
//! is a token bucket holding one second of its rate. A call is let in while the bucket holds
//! at least one unit, and then takes its whole cost, so one call bigger than a second's worth
//! still runs (when the bucket is full) and the bucket goes into debt: the average stays the
//! rate. Values are charged once the call is admitted (a shed call pays none) and at most
//! the request's own limit. A call over the limit is `RESOURCE_EXHAUSTED` with retry advice:
//! the time until the bucket holds a unit again. The
//! buckets live with the token in memory: a SIGHUP keeps a token's buckets when its limits
//! are unchanged.
//!
//! Between regions over mutual TLS, the peer's region comes from its certificate (see
//! [`crate::tls`]), never from the request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use crate::replication::REGION_ID_MAX;

/// Every token starts with this (so secret scanners can recognise a leaked one).
pub const TOKEN_PREFIX: &str = "qvt_";
/// Random bytes in a token (hex-encoded after the prefix).
pub const TOKEN_SECRET_BYTES: usize = 32;
/// Most tokens one file may hold.
pub const TOKENS_MAX: usize = 10_000;
/// Longest token name, in bytes.
pub const TOKEN_NAME_BYTES_MAX: usize = 64;
/// Most group prefixes one token may be limited to.
pub const TOKEN_GROUPS_MAX: usize = 64;
/// How a stored hash starts.
const HASH_PREFIX: &str = "sha256:";
/// Highest `requests_per_second` a token may be given.
pub const TOKEN_REQUESTS_PER_SECOND_MAX: u64 = 10_000_000;
/// Highest `values_per_second` a token may be given.
pub const TOKEN_VALUES_PER_SECOND_MAX: u64 = 10_000_000_000;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Online lookups, point-in-time joins, history scans.
    Read,
    /// Writes.
    Write,
    /// Changing the registry.
    Registry,
    /// Every admin RPC.
    Admin,
    /// Pulling this region's log and snapshots, as one peer region.
    Replication,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 5] = [Scope::Read, Scope::Write, Scope::Registry, Scope::Admin, Scope::Replication];

    /// Its name in the token file and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Registry => "registry",
            Scope::Admin => "admin",
            Scope::Replication => "replication",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Scope, String> {
        Scope::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| format!("unknown scope {s:?} (one of {})", Scope::ALL.map(Scope::name).join(", ")))
    }
}

/// One token in the file: its name, the hash of its secret, and what it may do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Unique name (logged; not secret).
    pub name: String,
    /// `sha256:` and the hex SHA-256 of the whole token text.
    pub hash: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// Group-name prefixes it is limited to (empty: every group).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// With `replication`: the region it speaks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<u32>,
    /// Calls per second it may make (none: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<u64>,
    /// Values per second it may read or write (none: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values_per_second: Option<u64>,
}

/// The rate limits of a token (`quiver auth create --requests-per-second/--values-per-second`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    /// Calls per second.
    pub requests_per_second: Option<u64>,
    /// Values per second.
    pub values_per_second: Option<u64>,
}

/// The token file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    /// Its tokens.
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenEntry>,
}

impl TokenFile {
    /// Reads and checks a token file.
    pub fn load(path: &Path) -> Result<TokenFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
        let file: TokenFile = toml::from_str(&text).map_err(|e| format!("token file {}: {e}", path.display()))?;
        file.check().map_err(|e| format!("token file {}: {e}", path.display()))?;
        Ok(file)
    }

    /// Reads a token file, or an empty one if `path` does not exist (for `quiver auth create`).
    pub fn load_or_empty(path: &Path) -> Result<TokenFile, String> {
        if path.exists() {
            TokenFile::load(path)
        } else {
            Ok(TokenFile::default())
        }
    }

    /// Writes the file atomically (a temporary file renamed over it), readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        self.check()?;
        let text = toml::to_string(self).map_err(|e| format!("encoding the token file: {e}"))?;
        let text = format!(
            "# Quiver tokens: names, scopes and SHA-256 hashes (never the tokens). Managed by `quiver auth`;\n\
             # quiverd rereads it on SIGHUP.\n{text}"
        );
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.tmp",
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "tokens".into())
        ));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("writing {}: {e}", path.display())
        })
    }

    /// Adds a token and returns its text (shown once; only its hash is kept).
    pub fn create(
        &mut self,
        name: &str,
        scopes: Vec<Scope>,
        groups: Vec<String>,
        region: Option<u32>,
        rates: Rates,
    ) -> Result<String, String> {
        if self.tokens.iter().any(|t| t.name == name) {
            return Err(format!("a token named {name:?} exists (revoke it first)"));
        }
        let mut secret = [0u8; TOKEN_SECRET_BYTES];
        getrandom::fill(&mut secret).map_err(|e| format!("no randomness: {e}"))?;
        let token = format!("{TOKEN_PREFIX}{}", hex(&secret));
        let mut scopes = scopes;
        scopes.sort();
        scopes.dedup();
        self.tokens.push(TokenEntry {
            name: name.to_string(),
            hash: hash_token(&token),
            scopes,
            groups,
            region,
            requests_per_second: rates.requests_per_second,
            values_per_second: rates.values_per_second,
        });
        if let Err(e) = self.check() {
            self.tokens.pop();
            return Err(e);
        }
        Ok(token)
    }

    /// Removes the token named `name`.
    pub fn revoke(&mut self, name: &str) -> Result<(), String> {
        let before = self.tokens.len();
        self.tokens.retain(|t| t.name != name);
        if self.tokens.len() == before {
            return Err(format!("no token named {name:?}"));
        }
        Ok(())
    }

    /// Every rule of the file format.
    fn check(&self) -> Result<(), String> {
        if self.tokens.len() > TOKENS_MAX {
            return Err(format!("{} tokens (at most {TOKENS_MAX})", self.tokens.len()));
        }
        let mut names = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for t in &self.tokens {
            let err = |m: String| format!("token {:?}: {m}", t.name);
            if t.name.is_empty() || t.name.len() > TOKEN_NAME_BYTES_MAX {
                return Err(err(format!("a name is 1 to {TOKEN_NAME_BYTES_MAX} bytes")));
            }
            if !t.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(err("a name is letters, digits, '-', '_' and '.'".into()));
            }
            if !names.insert(&t.name) {
                return Err(err("the name is used twice".into()));
            }
            if stored_digest(&t.hash).is_none() {
                return Err(err(format!("hash must be {HASH_PREFIX} and 64 lower-case hex digits")));
            }
            if !hashes.insert(&t.hash) {
                return Err(err("the same hash is used twice".into()));
            }
            if t.scopes.is_empty() {
                return Err(err("no scopes".into()));
            }
            if t.groups.len() > TOKEN_GROUPS_MAX {
                return Err(err(format!("at most {TOKEN_GROUPS_MAX} group prefixes")));
            }
            if t.groups.iter().any(String::is_empty) {
                return Err(err("an empty group prefix (leave `groups` out for every group)".into()));
            }
            let node_wide = t.scopes.iter().any(|s| matches!(s, Scope::Admin | Scope::Replication));
            if node_wide && !t.groups.is_empty() {
                return Err(err("admin and replication are node-wide: they cannot be limited to groups".into()));
            }
            match (t.scopes.contains(&Scope::Replication), t.region) {
                (true, None) => return Err(err("a replication token needs the region it speaks for".into())),
                (false, Some(_)) => return Err(err("only a replication token has a region".into())),
                (true, Some(r)) if r > REGION_ID_MAX => {
                    return Err(err(format!("region {r} is not 0 to {REGION_ID_MAX}")))
                }
                _ => {}
            }
            for (what, rate, max) in [
                ("requests_per_second", t.requests_per_second, TOKEN_REQUESTS_PER_SECOND_MAX),
                ("values_per_second", t.values_per_second, TOKEN_VALUES_PER_SECOND_MAX),
            ] {
                if rate.is_some_and(|r| r == 0 || r > max) {
                    return Err(err(format!("{what} is 1 to {max} (leave it out for no limit)")));
                }
            }
        }
        Ok(())
    }
}

/// A token bucket holding one second of `rate`, which may go into debt (see the module doc).
#[derive(Debug)]
struct Bucket {
    rate: f64,
    level: f64,
    at: std::time::Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        Bucket { rate: rate as f64, level: rate as f64, at: std::time::Instant::now() }
    }

    /// Takes `cost` if the bucket is out of debt (and holds a whole unit); otherwise how long
    /// until it will be.
    fn take(&mut self, cost: u64) -> Result<(), std::time::Duration> {
        let now = std::time::Instant::now();
        self.level = (self.level + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        let need = (cost as f64).min(self.rate).min(1.0);
        if self.level >= need {
            self.level -= cost as f64;
            return Ok(());
        }
        Err(std::time::Duration::from_secs_f64(((need - self.level) / self.rate).min(3600.0)))
    }
}

/// A token's buckets.
#[derive(Debug)]
pub struct RateLimiter {
    rates: Rates,
    requests: Option<parking_lot::Mutex<Bucket>>,
    values: Option<parking_lot::Mutex<Bucket>>,
    /// The server's count of calls refused by rate limits.
    limited: Arc<std::sync::atomic::AtomicU64>,
}

impl RateLimiter {
    fn new(rates: Rates, limited: &Arc<std::sync::atomic::AtomicU64>) -> Option<Arc<RateLimiter>> {
        (rates != Rates::default()).then(|| {
            Arc::new(RateLimiter {
                rates,
                requests: rates.requests_per_second.map(|r| parking_lot::Mutex::new(Bucket::new(r))),
                values: rates.values_per_second.map(|r| parking_lot::Mutex::new(Bucket::new(r))),
                limited: limited.clone(),
            })
        })
    }

    fn refuse(&self, name: &str, what: &str, rate: u64, wait: std::time::Duration) -> Status {
        use tonic_types::{ErrorDetails, StatusExt};
        self.limited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Status::with_error_details(
            tonic::Code::ResourceExhausted,
            format!("token {name:?} is over its rate limit of {rate} {what} per second; retry in {wait:?}"),
            ErrorDetails::with_retry_info(Some(wait)),
        )
    }
}

/// The SHA-256 of a token's text.
fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The stored form of a token: `sha256:` and the hex digest of its text.
pub fn hash_token(token: &str) -> String {
    format!("{HASH_PREFIX}{}", hex(&digest(token)))
}

/// The digest a stored hash names (`None` unless it is `sha256:` and 64 lower-case hex digits).
fn stored_digest(hash: &str) -> Option<[u8; 32]> {
    let hex = hash.strip_prefix(HASH_PREFIX)?.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Who sent a request and what it may do; the interceptors put one in every authenticated
/// request's extensions.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The token's name (`"anonymous"` without authentication).
    pub name: String,
    scopes: u8,
    groups: Vec<String>,
    /// The region a replication peer speaks for (`None`: any, without authentication).
    pub region: Option<u32>,
    limiter: Option<Arc<RateLimiter>>,
}

impl Principal {
    /// May do everything (`auth = "none"`).
    pub fn unrestricted() -> Principal {
        Principal { name: "anonymous".into(), scopes: u8::MAX, groups: Vec::new(), region: None, limiter: None }
    }

    /// The principal of token `t`, keeping `old`'s buckets if its rates are the same.
    fn of(t: &TokenEntry, old: Option<&Principal>, limited: &Arc<std::sync::atomic::AtomicU64>) -> Principal {
        let rates = Rates { requests_per_second: t.requests_per_second, values_per_second: t.values_per_second };
        let kept = old.and_then(|o| o.limiter.clone()).filter(|l| l.rates == rates);
        Principal {
            name: t.name.clone(),
            scopes: t.scopes.iter().fold(0, |b, s| b | s.bit()),
            groups: t.groups.clone(),
            region: t.region,
            limiter: kept.or_else(|| RateLimiter::new(rates, limited)),
        }
    }

    /// Counts one call against the token's `requests_per_second`.
    pub fn take_request(&self) -> Result<(), Status> {
        self.take(|l| l.requests.as_ref(), "requests", 1)
    }

    /// Counts `n` values against the token's `values_per_second`.
    pub fn take_values(&self, n: u64) -> Result<(), Status> {
        self.take(|l| l.values.as_ref(), "values", n)
    }

    /// Takes `cost` from the bucket `bucket` picks, if the token has it.
    fn take(
        &self,
        bucket: impl Fn(&RateLimiter) -> Option<&parking_lot::Mutex<Bucket>>,
        what: &str,
        cost: u64,
    ) -> Result<(), Status> {
        let Some(l) = &self.limiter else { return Ok(()) };
        let Some(b) = bucket(l) else { return Ok(()) };
        let mut b = b.lock();
        b.take(cost).map_err(|wait| l.refuse(&self.name, what, b.rate as u64, wait))
    }

    /// A peer region authenticated by its certificate: replication for that region only.
    pub fn peer(region: u32) -> Principal {
        Principal {
            name: format!("region-{region} (certificate)"),
            scopes: Scope::Replication.bit(),
            groups: Vec::new(),
            region: Some(region),
            limiter: None,
        }
    }

    /// Whether it holds `scope`.
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes & scope.bit() != 0
    }

    /// `PERMISSION_DENIED` unless it holds `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), Status> {
        if self.has(scope) {
            return Ok(());
        }
        Err(Status::permission_denied(format!("token {:?} lacks the {:?} scope", self.name, scope.name())))
    }

    /// Whether it is limited to some groups.
    pub fn limited(&self) -> bool {
        !self.groups.is_empty()
    }

    /// Whether it may see group `name`.
    pub fn may_see(&self, group: &str) -> bool {
        self.groups.is_empty() || self.groups.iter().any(|p| group.starts_with(p.as_str()))
    }

    /// `PERMISSION_DENIED` unless it may see group `name` (registry reads).
    pub fn require_group_visible(&self, name: &str) -> Result<(), Status> {
        if self.may_see(name) {
            return Ok(());
        }
        Err(Status::permission_denied(format!("token {:?} may not use feature group {name:?}", self.name)))
    }

    /// `PERMISSION_DENIED` unless it may act for peer region `region` (replication).
    pub fn require_region(&self, region: u32) -> Result<(), Status> {
        self.require(Scope::Replication)?;
        match self.region {
            Some(r) if r != region => Err(Status::permission_denied(format!(
                "{:?} speaks for region {r}, not for region {region}",
                self.name
            ))),
            _ => Ok(()),
        }
    }

    /// `PERMISSION_DENIED` unless it holds `scope` for `group` (a name, `name@N`, or a feature
    /// reference `name[@N]:feature`).
    pub fn require_group(&self, scope: Scope, reference: &str) -> Result<(), Status> {
        self.require(scope)?;
        self.require_group_visible(group_of(reference))
    }
}

/// The group name in `group`, `group@N`, `group:feature` or `group@N:feature`.
pub fn group_of(reference: &str) -> &str {
    let g = reference.split_once(':').map_or(reference, |(g, _)| g);
    g.split_once('@').map_or(g, |(g, _)| g)
}

/// The principal the interceptor attached to `req`; `UNAUTHENTICATED` if there is none (a
/// service mounted without its interceptor fails closed).
pub fn principal<T>(req: &Request<T>) -> Result<Arc<Principal>, Status> {
    req.extensions().get::<Arc<Principal>>().cloned().ok_or_else(|| Status::unauthenticated("no credentials"))
}

/// How requests are authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// Every request may do everything (local development).
    None,
    /// Bearer tokens from this file.
    Tokens(PathBuf),
}

/// Checks requests' tokens against the current token file.
#[derive(Debug)]
pub struct Authenticator {
    mode: AuthMode,
    /// Principals by the SHA-256 of their token (a lookup hashes and allocates nothing else).
    tokens: RwLock<Arc<HashMap<[u8; 32], Arc<Principal>>>>,
    anonymous: Arc<Principal>,
    rate_limited: Arc<std::sync::atomic::AtomicU64>,
}

impl Authenticator {
    /// An authenticator in `mode` (loading the token file now: a bad file stops the start).
    pub fn new(mode: AuthMode) -> Result<Arc<Authenticator>, String> {
        let a = Authenticator {
            mode,
            tokens: RwLock::new(Arc::new(HashMap::new())),
            anonymous: Arc::new(Principal::unrestricted()),
            rate_limited: Default::default(),
        };
        a.reload()?;
        Ok(Arc::new(a))
    }

    /// Calls refused by tokens' rate limits since start.
    pub fn rate_limited_total(&self) -> u64 {
        self.rate_limited.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether tokens are checked.
    pub fn mode(&self) -> &AuthMode {
        &self.mode
    }

    /// Rereads the token file (SIGHUP). On an error the tokens in force stay in force.
    /// Returns how many tokens are now in force.
    pub fn reload(&self) -> Result<usize, String> {
        let AuthMode::Tokens(path) = &self.mode else { return Ok(0) };
        let file = TokenFile::load(path)?;
        let old = self.tokens.read().clone();
        let old_by_name: HashMap<&str, &Principal> = old.values().map(|p| (p.name.as_str(), p.as_ref())).collect();
        // `load` checked every hash.
        let map: HashMap<[u8; 32], Arc<Principal>> = file
            .tokens
            .iter()
            .filter_map(|t| {
                let p = Principal::of(t, old_by_name.get(t.name.as_str()).copied(), &self.rate_limited);
                Some((stored_digest(&t.hash)?, Arc::new(p)))
            })
            .collect();
        let n = map.len();
        *self.tokens.write() = Arc::new(map);
        Ok(n)
    }

    /// Who sent a request with these headers, or why it is refused.
    pub fn authenticate(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Arc<Principal>, Status> {
        if self.mode == AuthMode::None {
            return Ok(self.anonymous.clone());
        }
        let header = metadata
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing authorization metadata (\"Bearer <token>\")"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| t.starts_with(TOKEN_PREFIX))
            .ok_or_else(|| Status::unauthenticated("authorization metadata is not \"Bearer qvt_...\""))?;
        self.tokens
            .read()
            .get(&digest(token))
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown or revoked token"))
    }

    /// The interceptor for one service: authenticates every call, attaches its [`Principal`],
    /// and, for a service whose every method needs one scope, checks it. A caller whose
    /// verified client certificate names a region ([`crate::tls`]) speaks for that region only;
    /// without a token it may replicate and nothing else.
    pub fn interceptor(self: &Arc<Self>, scope: Option<Scope>) -> AuthInterceptor {
        AuthInterceptor { auth: self.clone(), scope }
    }
}

/// See [`Authenticator::interceptor`].
#[derive(Debug, Clone)]
pub struct AuthInterceptor {
    auth: Arc<Authenticator>,
    scope: Option<Scope>,
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let cert_region = crate::tls::peer_region(&req)?;
        let has_token = req.metadata().contains_key("authorization");
        let principal = match cert_region {
            // A peer that proved its region and sends no token: replication for that region.
            Some(region) if !has_token && self.auth.mode != AuthMode::None => Arc::new(Principal::peer(region)),
            // Otherwise the token decides what it may do, and the certificate which region
            // it speaks for.
            Some(region) => {
                let p = self.auth.authenticate(req.metadata())?;
                if p.region.is_some_and(|r| r != region) {
                    return Err(Status::permission_denied(format!(
                        "token {:?} speaks for region {:?}, its certificate for region {region}",
                        p.name, p.region
                    )));
                }
                Arc::new(Principal { region: Some(region), ..(*p).clone() })
            }
            None => self.auth.authenticate(req.metadata())?,
        };
        if let Some(scope) = self.scope {
            principal.require(scope)?;
        }
        principal.take_request()?;
        req.extensions_mut().insert(principal);
        Ok(req)
    }
}

/// The client side: adds `authorization: Bearer <token>` to every call (nothing without a
/// token). Used by the CLI, the peers' pullers, the benchmarks and the tests.
#[derive(Debug, Clone, Default)]
pub struct BearerToken(Option<tonic::metadata::AsciiMetadataValue>);

impl BearerToken {
    /// Sends `token` (trimmed), or nothing.
    pub fn new(token: Option<&str>) -> Result<BearerToken, String> {
        match token.map(str::trim) {
            None => Ok(BearerToken(None)),
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| BearerToken(Some(v)))
                .map_err(|_| "a token is printable ASCII".to_string()),
        }
    }

    /// Reads the token from a file (its first line; for configuration that must not put a
    /// secret on a command line).
    pub fn from_file(path: &Path) -> Result<BearerToken, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
        let token = text.lines().next().map(str::trim).filter(|t| !t.is_empty());
        let token = token.ok_or_else(|| format!("token file {} is empty", path.display()))?;
        BearerToken::new(Some(token))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel that sends a token with every call.
pub type AuthChannel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>;

#[cfg(test)]
mod tests {
    #[test]
    fn a_bucket_admits_a_second_of_its_rate_then_runs_in_debt() {
        let mut b = Bucket::new(10);
        for _ in 0..10 {
            b.take(1).expect("a second's worth");
        }
        let wait = b.take(1).expect_err("empty");
        assert!(wait > std::time::Duration::ZERO && wait <= std::time::Duration::from_millis(100), "{wait:?}");
        // A call bigger than the bucket runs when it is full, and leaves it in debt.
        let mut b = Bucket::new(10);
        b.take(50).expect("full bucket: a big call runs");
        let wait = b.take(1).expect_err("in debt");
        assert!(wait > std::time::Duration::from_secs(4), "owes 41 of 10 per second: {wait:?}");
        // Time pays the debt back.
        b.at -= std::time::Duration::from_secs(5);
        b.take(1).expect("paid back");
    }

    use super::*;

    fn header(token: &str) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().expect("ascii"));
        m
    }

    #[test]
    fn tokens_are_checked_by_hash_and_scoped_by_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens.toml");
        let mut file = TokenFile::default();
        let reader =
            file.create("reader", vec![Scope::Read], vec!["fraud_".into()], None, Rates::default()).expect("create");
        let admin =
            file.create("ops", vec![Scope::Admin, Scope::Read], vec![], None, Rates::default()).expect("create");
        file.save(&path).expect("save");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(!text.contains(&reader) && !text.contains(&admin), "the file holds hashes only");
        assert_eq!(TokenFile::load(&path).expect("load"), file);

        let auth = Authenticator::new(AuthMode::Tokens(path.clone())).expect("auth");
        let p = auth.authenticate(&header(&reader)).expect("reader");
        assert_eq!(p.name, "reader");
        assert!(p.require_group(Scope::Read, "fraud_tx@2:amount").is_ok());
        assert_eq!(p.require_group(Scope::Read, "ads:ctr").map_err(|s| s.code()), Err(tonic::Code::PermissionDenied));
        assert_eq!(p.require(Scope::Write).map_err(|s| s.code()), Err(tonic::Code::PermissionDenied));
        let o = auth.authenticate(&header(&admin)).expect("ops");
        assert!(o.require(Scope::Admin).is_ok() && o.require_group(Scope::Read, "ads:ctr").is_ok());

        for bad in [
            tonic::metadata::MetadataMap::new(),
            header("qvt_0000"),
            header(&reader.replace("qvt_", "xyz_")),
            header(&format!("{reader}0")),
        ] {
            assert_eq!(auth.authenticate(&bad).map(|_| ()).map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
        }

        // Revoked and reloaded: refused; a bad file on reload keeps what is in force.
        file.revoke("reader").expect("revoke");
        file.save(&path).expect("save");
        assert_eq!(auth.reload(), Ok(1));
        assert!(auth.authenticate(&header(&reader)).is_err());
        std::fs::write(&path, "[[token]]\nname = 1\n").expect("write");
        assert!(auth.reload().is_err());
        assert!(auth.authenticate(&header(&admin)).is_ok());
    }

    #[test]
    fn bad_token_files_are_refused() {
        let mut f = TokenFile::default();
        assert!(
            f.create("a", vec![Scope::Admin], vec!["g".into()], None, Rates::default()).is_err(),
            "admin is node-wide"
        );
        assert!(
            f.create("b", vec![Scope::Replication], vec![], None, Rates::default()).is_err(),
            "replication needs a region"
        );
        assert!(
            f.create("c", vec![Scope::Read], vec![], Some(1), Rates::default()).is_err(),
            "only replication has a region"
        );
        assert!(f.create("d d", vec![Scope::Read], vec![], None, Rates::default()).is_err(), "names are plain");
        assert!(f.create("e", vec![], vec![], None, Rates::default()).is_err(), "no scopes");
        assert!(f.create("f", vec![Scope::Replication], vec![], Some(64), Rates::default()).is_err(), "no region 64");
        assert!(f.tokens.is_empty(), "a refused token is not kept");
        f.create("g", vec![Scope::Read], vec![], None, Rates::default()).expect("create");
        assert!(f.create("g", vec![Scope::Read], vec![], None, Rates::default()).is_err(), "names are unique");
        assert!(f.revoke("nobody").is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("t.toml");
        std::fs::write(&p, "[[token]]\nname = \"x\"\nhash = \"sha256:abc\"\nscopes = [\"read\"]\n").expect("write");
        assert!(TokenFile::load(&p).expect_err("short hash").contains("64 lower-case hex"));
        std::fs::write(&p, "[[token]]\nname = \"x\"\nhash = \"sha256:abc\"\nscopes = [\"sudo\"]\n").expect("write");
        assert!(TokenFile::load(&p).is_err());
        // Stored hashes decode to the digests requests are looked up by; upper case is refused.
        let h = hash_token("qvt_x");
        assert_eq!(stored_digest(&h), Some(digest("qvt_x")));
        assert_eq!(stored_digest(&h.to_uppercase().replace("SHA256:", "sha256:")), None);
        assert_eq!(stored_digest(&h[..h.len() - 1]), None);
    }

    #[test]
    fn group_of_strips_versions_and_features() {
        assert_eq!(group_of("g"), "g");
        assert_eq!(group_of("g@3"), "g");
        assert_eq!(group_of("g:f"), "g");
        assert_eq!(group_of("g@3:f"), "g");
    }
}
