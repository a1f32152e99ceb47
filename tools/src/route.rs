//! The routing client (`server/CLUSTER.md` §4): it keeps the slot map of a sharded region and
//! sends each entity straight to its slot's owner, splitting a batch lookup or a write by owner,
//! sending the parts at once and merging the answers in request order. It saves the hop a
//! forwarding node would add.
//!
//! - The map and the nodes' addresses come from `GetClusterStatus` at the seed address; entity
//!   types and groups from the seed's registry (cached for the router's life: an entity type's
//!   join keys never change).
//! - Against a node that is not sharded, or with a token that may not read the map (no `read`
//!   scope), everything goes to the seed.
//! - An entity whose slot has no owner with a known address goes to the seed, which forwards it
//!   or refuses it with a status the caller can act on.
//! - A part refused for a slot its node no longer owns (`SlotNotOwned`, from nodes started with
//!   `--no-forward`) makes the router re-read the map and resend that part, at most
//!   [`ROUTE_RETRIES`] times. Forwarding nodes answer a stale router correctly, one hop later.
//! - A write's parts are each applied atomically on their shard, as with forwarding; a failed
//!   part fails the write, whose message names the nodes that applied theirs.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use prost::Message;
use quiver_proto::v1 as pb;
use quiver_server::auth::AuthChannel;
pub use quiver_server::auth::BearerToken;
use quiver_server::forward::{merge_online, merge_writes, subset};
use quiver_storage::slot::{slot_of, SLOTS};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

/// How many times a part refused for a moved slot is resent after re-reading the map.
pub const ROUTE_RETRIES: usize = 1;

type FeatureClient = pb::feature_service_client::FeatureServiceClient<AuthChannel>;

/// Which node owns each slot, as last read.
#[derive(Debug, Default)]
struct View {
    /// The map's revision (0: none, or not sharded).
    revision: i64,
    /// Per slot, an index into `addrs` (`None`: no owner with a known address).
    owners: Vec<Option<usize>>,
    /// The owners' addresses, with the seed's scheme (`http://host:port`).
    addrs: Vec<String>,
}

/// A client of a (possibly sharded) region that sends each entity to its owner.
pub struct Router {
    seed: String,
    /// A channel to the seed (for the map and the registry), opened with the first call.
    seed_channel: AuthChannel,
    token: BearerToken,
    tls: Option<ClientTlsConfig>,
    view: RwLock<Arc<View>>,
    clients: Mutex<HashMap<String, FeatureClient>>,
    entity_types: Mutex<HashMap<String, pb::EntityType>>,
    /// Each call's deadline.
    timeout: Option<std::time::Duration>,
    /// A write's group reference (`group` or `group@N`) -> its entity type's name.
    groups: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("seed", &self.seed).field("revision", &self.view.read().revision).finish()
    }
}

/// A channel to `addr` that connects on its first call and sends `token` with every call.
fn lazy_channel(addr: &str, tls: Option<&ClientTlsConfig>, token: &BearerToken) -> Result<AuthChannel, Status> {
    let mut endpoint = Endpoint::from_shared(addr.to_string())
        .map_err(|e| Status::invalid_argument(format!("bad address {addr:?}: {e}")))?
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone()).map_err(|e| Status::invalid_argument(format!("TLS: {e}")))?;
    }
    Ok(AuthChannel::new(endpoint.connect_lazy(), token.clone()))
}

/// Whether `s` is a refusal for a slot its node does not own.
fn not_owned(s: &Status) -> bool {
    s.code() == Code::FailedPrecondition && pb::SlotNotOwned::decode(s.details()).is_ok_and(|d| !d.owner.is_empty())
}

impl Router {
    /// A router reading the region's map from `seed` (`http://host:port`, or `https://` with
    /// the CA in `ca_pem`), sending `token` with every call.
    pub async fn connect(seed: &str, token: BearerToken, ca_pem: Option<Vec<u8>>) -> Result<Router, Status> {
        let tls = match (seed.starts_with("https://"), ca_pem) {
            (true, Some(ca)) => Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca))),
            (true, None) => return Err(Status::invalid_argument(format!("{seed} is TLS: the router needs its CA"))),
            (false, Some(_)) => {
                return Err(Status::invalid_argument(format!("a CA is for https:// addresses, not {seed}")))
            }
            (false, None) => None,
        };
        let router = Router {
            seed_channel: lazy_channel(seed, tls.as_ref(), &token)?,
            seed: seed.trim_end_matches('/').to_string(),
            token,
            tls,
            view: RwLock::new(Arc::new(View::default())),
            clients: Mutex::new(HashMap::new()),
            entity_types: Mutex::new(HashMap::new()),
            timeout: None,
            groups: Mutex::new(HashMap::new()),
        };
        match router.refresh().await {
            // A token without the read scope cannot see the map: everything goes to the seed,
            // which forwards it (or refuses it, naming the owner).
            Err(s) if s.code() == Code::PermissionDenied => Ok(router),
            r => r.map(|()| router),
        }
    }

    /// The same router giving every call `timeout` as its deadline.
    pub fn with_timeout(mut self, timeout: Option<std::time::Duration>) -> Router {
        self.timeout = timeout;
        self
    }

    /// `msg` as a call, with the router's deadline.
    fn call<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = self.timeout {
            req.set_timeout(t);
        }
        req
    }

    /// The feature service at `addr` (one lazily connected channel per address).
    fn client(&self, addr: &str) -> Result<FeatureClient, Status> {
        let mut clients = self.clients.lock();
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let c =
            pb::feature_service_client::FeatureServiceClient::new(lazy_channel(addr, self.tls.as_ref(), &self.token)?)
                .max_decoding_message_size(quiver_server::daemon::MESSAGE_BYTES_MAX)
                .max_encoding_message_size(quiver_server::daemon::MESSAGE_BYTES_MAX);
        clients.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// The map's revision the router routes by (0: no map, or not sharded).
    pub fn revision(&self) -> i64 {
        self.view.read().revision
    }

    /// Re-reads the map and the nodes from the seed (an older map never replaces a newer one).
    pub async fn refresh(&self) -> Result<(), Status> {
        let mut c = pb::cluster_service_client::ClusterServiceClient::new(self.seed_channel.clone());
        let st = c.get_cluster_status(pb::GetClusterStatusRequest {}).await?.into_inner();
        let scheme = if self.seed.starts_with("https://") { "https" } else { "http" };
        let mut view = View { owners: vec![None; usize::from(SLOTS)], ..Default::default() };
        if let Some(map) = st.map.filter(|_| st.sharded) {
            let mut index: HashMap<&str, usize> = HashMap::new();
            for n in st.nodes.iter().filter(|n| !n.addr.is_empty()) {
                index.insert(n.node.as_str(), view.addrs.len());
                view.addrs.push(format!("{scheme}://{}", n.addr));
            }
            for run in &map.runs {
                let owner = index.get(run.owner.as_str()).copied();
                for slot in run.first..=run.last.min(u32::from(SLOTS) - 1) {
                    view.owners[slot as usize] = owner;
                }
            }
            view.revision = map.revision;
        }
        let mut cur = self.view.write();
        if view.revision >= cur.revision {
            *cur = Arc::new(view);
        }
        Ok(())
    }

    /// Where each of `rows` (positions in `keys`) goes: by address, positions ascending.
    fn split(&self, keys: &[Vec<u8>], rows: &[usize]) -> Vec<(String, Vec<usize>)> {
        let view = self.view.read().clone();
        let mut parts: Vec<(String, Vec<usize>)> = Vec::new();
        let mut at: HashMap<usize, usize> = HashMap::new();
        for &i in rows {
            let owner = keys.get(i).and_then(|k| view.owners.get(usize::from(slot_of(k))).copied().flatten());
            // No owner known: the seed forwards it, or refuses it for a reason the caller sees.
            let node = owner.unwrap_or(usize::MAX);
            let k = *at.entry(node).or_insert_with(|| {
                let addr = owner.and_then(|o| view.addrs.get(o)).cloned().unwrap_or_else(|| self.seed.clone());
                parts.push((addr, Vec::new()));
                parts.len() - 1
            });
            parts[k].1.push(i);
        }
        parts
    }

    /// An entity type from the seed's registry (fetched once).
    pub async fn entity_type(&self, name: &str) -> Result<pb::EntityType, Status> {
        if let Some(et) = self.entity_types.lock().get(name) {
            return Ok(et.clone());
        }
        let mut reg = pb::registry_service_client::RegistryServiceClient::new(self.seed_channel.clone());
        let et = reg.get_entity_type(pb::GetEntityTypeRequest { name: name.to_string() }).await?.into_inner();
        self.entity_types.lock().insert(name.to_string(), et.clone());
        Ok(et)
    }

    async fn group_entity_type(&self, group: &str) -> Result<pb::EntityType, Status> {
        let known = self.groups.lock().get(group).cloned();
        let name = match known {
            Some(name) => name,
            None => {
                let (name, version) = quiver_server::registry::parse_group_ref(group)
                    .ok_or_else(|| Status::invalid_argument(format!("bad group reference {group:?}")))?;
                let mut reg = pb::registry_service_client::RegistryServiceClient::new(self.seed_channel.clone());
                let req = pb::GetFeatureGroupRequest { name: name.to_string(), version };
                let def = reg.get_feature_group(req).await?.into_inner();
                self.groups.lock().insert(group.to_string(), def.entity_type.clone());
                def.entity_type
            }
        };
        self.entity_type(&name).await
    }

    /// Sends `rows` of a request (its entity keys `keys`) to their owners with `send`, resending
    /// a part refused for a moved slot after re-reading the map. The answers, with the positions
    /// each covers.
    async fn fan_out<T, F, Fut>(&self, keys: &[Vec<u8>], send: F) -> Result<Vec<(Vec<usize>, T)>, Status>
    where
        F: Fn(FeatureClient, Vec<usize>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        // Parts still to send: to the address given, or (None) by the map. An empty request
        // goes to the seed whole, which answers it (or refuses it) as it would anyone's.
        let mut pending: Vec<(Option<String>, Vec<usize>)> = if keys.is_empty() {
            vec![(Some(self.seed.clone()), vec![])]
        } else {
            vec![(None, (0..keys.len()).collect())]
        };
        let mut answers: Vec<(String, Vec<usize>, T)> = Vec::new();
        for attempt in 0..=ROUTE_RETRIES {
            let mut parts = Vec::new();
            for (to, rows) in pending.drain(..) {
                match to {
                    Some(addr) => parts.push((addr, rows)),
                    None => parts.extend(self.split(keys, &rows)),
                }
            }
            let sends = parts.into_iter().map(|(addr, rows)| {
                let client = self.client(&addr);
                let send = &send;
                async move {
                    let r = match client {
                        Ok(c) => send(c, rows.clone()).await,
                        Err(e) => Err(e),
                    };
                    (addr, rows, r)
                }
            });
            // Parts refused for a slot their node does not own, with the owner it names.
            let mut refused: Vec<(Option<String>, Vec<usize>)> = Vec::new();
            let mut failed = None;
            for (addr, rows, r) in futures::future::join_all(sends).await {
                match r {
                    Ok(a) => answers.push((addr, rows, a)),
                    Err(s) if attempt < ROUTE_RETRIES && not_owned(&s) => refused.push((self.owner_named(&s), rows)),
                    Err(s) => failed = failed.or(Some((addr, rows, s))),
                }
            }
            let failure = |addr: String, rows: Vec<usize>, status: Status, answers: &[(String, Vec<usize>, T)]| {
                let applied = answers.iter().map(|(a, r, _)| (a.clone(), r.len())).collect();
                Failed { addr, rows, status, applied }.into_status()
            };
            if let Some((addr, rows, s)) = failed {
                return Err(failure(addr, rows, s, &answers));
            }
            if refused.is_empty() {
                break;
            }
            match self.refresh().await {
                Ok(()) => pending = refused.into_iter().map(|(_, rows)| (None, rows)).collect(),
                // A token that may not read the map: each refused part goes to the owner its
                // refusal names.
                Err(e) if e.code() == Code::PermissionDenied => pending = refused,
                Err(e) => {
                    let rows = refused.into_iter().flat_map(|(_, rows)| rows).collect();
                    return Err(failure(self.seed.clone(), rows, e, &answers));
                }
            }
        }
        Ok(answers.into_iter().map(|(_, rows, a)| (rows, a)).collect())
    }

    /// The address (with the seed's scheme) of the owner a `SlotNotOwned` refusal names.
    fn owner_named(&self, s: &Status) -> Option<String> {
        let d = pb::SlotNotOwned::decode(s.details()).ok()?;
        let scheme = if self.seed.starts_with("https://") { "https" } else { "http" };
        (!d.owner_addr.is_empty()).then(|| format!("{scheme}://{}", d.owner_addr))
    }

    /// `GetOnlineFeatures`, each entity read at its owner; columns in request order.
    pub async fn get_online_features(
        &self,
        req: pb::GetOnlineFeaturesRequest,
    ) -> Result<pb::GetOnlineFeaturesResponse, Status> {
        let et = self.entity_type(&req.entity_type).await?;
        let keys = req
            .entities
            .iter()
            .map(|k| quiver_server::convert::entity_key(&et, k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let n = keys.len();
        let mut answers = self
            .fan_out(&keys, |mut c, rows| {
                let part =
                    self.call(pb::GetOnlineFeaturesRequest { entities: subset(&req.entities, &rows), ..req.clone() });
                async move { c.get_online_features(part).await.map(tonic::Response::into_inner) }
            })
            .await?;
        if let [(_, one)] = answers.as_mut_slice() {
            return Ok(std::mem::take(one));
        }
        merge_online(n, answers.iter_mut().map(|(rows, a)| (rows.as_slice(), std::mem::take(a))).collect())
    }

    /// `WriteFeatures`, each row written at its owner (atomically per shard, not across shards).
    pub async fn write_features(&self, req: pb::WriteFeaturesRequest) -> Result<pb::WriteFeaturesResponse, Status> {
        let mut keys = Vec::with_capacity(req.rows.len());
        for (i, row) in req.rows.iter().enumerate() {
            let et = self.group_entity_type(&row.group).await?;
            let entity = row.entity.as_ref().ok_or_else(|| Status::invalid_argument(format!("row {i}: no entity")))?;
            keys.push(
                quiver_server::convert::entity_key(&et, entity)
                    .map_err(|e| Status::invalid_argument(format!("row {i}: {e}")))?,
            );
        }
        let answers = self
            .fan_out(&keys, |mut c, rows| {
                let part = self.call(pb::WriteFeaturesRequest { rows: subset(&req.rows, &rows), ..req.clone() });
                async move { c.write_features(part).await.map(tonic::Response::into_inner) }
            })
            .await?;
        let answers: Vec<pb::WriteFeaturesResponse> = answers.into_iter().map(|(_, a)| a).collect();
        Ok(merge_writes(&answers))
    }
}

/// A part that failed, and the parts that did not (their node, and how many entities each).
struct Failed {
    addr: String,
    rows: Vec<usize>,
    status: Status,
    applied: Vec<(String, usize)>,
}

impl Failed {
    fn into_status(self) -> Status {
        let done: Vec<String> = self.applied.iter().map(|(a, n)| format!("{a} ({n} entities)")).collect();
        let done = if done.is_empty() { "none".to_string() } else { done.join(", ") };
        let message = format!(
            "{} of the request's entities sent to {} failed: {}; parts answered (a write's: applied): {done}",
            self.rows.len(),
            self.addr,
            self.status.message()
        );
        // A refusal for a moved slot after other parts were applied must not invite a resend
        // of the whole request.
        let details = match (self.status.code(), self.applied.is_empty()) {
            (Code::FailedPrecondition, false) => Vec::new(),
            _ => self.status.details().to_vec(),
        };
        Status::with_details(self.status.code(), message, details.into())
    }
}
