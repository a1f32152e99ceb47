//! The gRPC endpoints: thin async wrappers that run the blocking engine work on tokio's
//! blocking pool and map errors to gRPC codes a client can act on.

use std::pin::Pin;
use std::sync::Arc;

use prost::Message;
use quiver_proto::v1 as pb;
use quiver_storage::Db;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::admission::{Admission, HeldTicket, ONLINE_ANSWER_BYTES_MAX, ONLINE_ANSWER_SHARE_DIVISOR};
use crate::auth::{self, Scope};
use crate::cluster::NotServed;
use crate::convert;
use crate::features::{
    Features, ServiceError, FEATURES_PER_REQUEST_MAX, ONLINE_CELLS_MAX, ONLINE_INLINE_CELLS_MAX, SPINE_ROWS_MAX,
    WRITE_VALUES_MAX,
};
use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryError};

/// Maps a service error to a status (the error codes of the README, "The API").
pub fn status(e: ServiceError) -> Status {
    match e {
        ServiceError::Invalid(m) => Status::invalid_argument(m),
        ServiceError::NotFound(m) => Status::not_found(m),
        ServiceError::TooLarge(m) => Status::resource_exhausted(m),
        ServiceError::Overloaded(m) => crate::admission::shed_status(m),
        ServiceError::Refused(m) => Status::failed_precondition(m),
        ServiceError::NotServed(e) => match &e {
            crate::cluster::NotServed::NotOwner(d) => {
                Status::with_details(tonic::Code::FailedPrecondition, e.to_string(), d.encode_to_vec().into())
            }
            crate::cluster::NotServed::NoMap | crate::cluster::NotServed::Fenced { .. } => {
                Status::unavailable(e.to_string())
            }
        },
        ServiceError::Aborted { message, current } => {
            let details = pb::CasConflict {
                cells: current
                    .into_iter()
                    .map(|(feature_ref, current)| pb::cas_conflict::Cell { feature_ref, current: Some(current) })
                    .collect(),
            };
            Status::with_details(tonic::Code::Aborted, message, details.encode_to_vec().into())
        }
        ServiceError::Storage(e) => storage_status(&e),
    }
}

/// Maps an engine error to a status.
pub(crate) fn storage_status(e: &quiver_storage::Error) -> Status {
    use quiver_storage::Error as E;
    match e {
        E::InvalidArgument(m) => Status::invalid_argument(m.clone()),
        E::OverBudget(m) => crate::admission::shed_status(m.clone()),
        // The replication log no longer reaches back far enough: the peer must bootstrap.
        E::LogTruncated { .. } => Status::out_of_range(e.to_string()),
        E::Corruption { .. } => Status::data_loss(e.to_string()),
        // Nothing was written; reads still work.
        E::NoSpace { read_only: false, .. } => Status::resource_exhausted(format!(
            "{e} (nothing was written; reads still work, and writes resume by themselves once space is freed)"
        )),
        E::NoSpace { read_only: true, .. } => Status::resource_exhausted(format!(
            "{e} (nothing was written; reads still work; restart the server once space is freed)"
        )),
        E::PreviousError(_) | E::Closed => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn registry_status(e: RegistryError) -> Status {
    status(ServiceError::from(e))
}

/// The caller, if it holds `scope` for every group `refs` name (group or feature references;
/// no references: the scope alone); `PERMISSION_DENIED` otherwise.
pub(crate) fn authorize<'a, T>(
    req: &Request<T>,
    scope: Scope,
    refs: impl IntoIterator<Item = &'a str>,
) -> Result<Arc<auth::Principal>, Status> {
    let p = auth::principal(req)?;
    p.require(scope)?;
    if p.limited() {
        for r in refs {
            p.require_group_visible(auth::group_of(r))?;
        }
    }
    Ok(p)
}

/// Values and deletes in a write: what it costs against a token's `values_per_second` (at
/// most the most a write may hold: a bigger one is refused whole).
fn values_in(req: &pb::WriteFeaturesRequest) -> u64 {
    let n: u64 = req.rows.iter().map(|r| (r.values.len() + r.deletes.len()) as u64).sum();
    n.min(WRITE_VALUES_MAX as u64)
}

/// Runs engine work on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(format!("worker failed: {e}")))?
}

/// The wall clock, in microseconds since the epoch.
pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Runs a chunk producer on the blocking pool and streams its chunks to the client through a
/// bounded channel; the producer stops when the client goes away (`emit` returns false), and
/// an error after some chunks ends the stream with that error.
/// A server that is stopping (`stopping` true) ends the stream with `UNAVAILABLE` after the
/// chunks already made.
pub(crate) fn stream_blocking<T: Send + 'static>(
    stopping: Option<Stopping>,
    produce: impl FnOnce(&mut dyn FnMut(T) -> bool) -> Result<(), ServiceError> + Send + 'static,
) -> BoxStream<T> {
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER_CHUNKS);
    tokio::task::spawn_blocking(move || {
        let mut stopped = false;
        let result = produce(&mut |chunk| {
            if stopping.as_ref().is_some_and(|s| *s.borrow()) {
                stopped = true;
                return false;
            }
            tx.blocking_send(Ok(chunk)).is_ok()
        });
        if stopped {
            let _ = tx.blocking_send(Err(Status::unavailable("the server is stopping; the stream was cut short")));
        } else if let Err(e) = result {
            let _ = tx.blocking_send(Err(status(e)));
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// Turns true when the server starts to stop.
pub type Stopping = tokio::sync::watch::Receiver<bool>;

/// Chunks in flight between a streaming RPC's producer and the client. (For streaming RPCs the
/// latency metric covers the call up to the start of the stream.)
const STREAM_BUFFER_CHUNKS: usize = 4;

/// `quiver.v1.FeatureService`.
#[derive(Debug, Clone)]
pub struct FeatureApi {
    pub(crate) features: Arc<Features>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) admission: Arc<Admission>,
    pub(crate) stopping: Option<Stopping>,
    /// Sends what this node does not own to its owner (a sharded node that forwards).
    forwarder: Option<Arc<Forwarder>>,
}

impl FeatureApi {
    /// The endpoints over `features`; every call is admitted by `admission` first.
    pub fn new(features: Arc<Features>, metrics: Arc<Metrics>, admission: Arc<Admission>) -> Self {
        FeatureApi { features, metrics, admission, stopping: None, forwarder: None }
    }

    /// The same endpoints forwarding what this node does not own through `forwarder`
    /// (`crate::forward`), when its features say it forwards.
    pub fn with_forwarder(mut self, forwarder: Arc<Forwarder>) -> Self {
        self.forwarder = self.features.forwards().then_some(forwarder);
        self
    }

    /// The forwarder, unless the request was itself forwarded (one hop at most).
    pub(crate) fn forwarding(&self, metadata: &tonic::metadata::MetadataMap) -> Option<Arc<Forwarder>> {
        self.forwarder.clone().filter(|_| !crate::forward::is_forwarded(metadata))
    }

    /// A join whose spine `split` spreads over several owners: each part sent to its owner
    /// (the local one joined here) at once, their streams merged back into spine order as
    /// they arrive (`server/CLUSTER.md` §6). gRPC joins and Flight `DoGet` alike.
    pub(crate) fn join_split(
        &self,
        fw: &Arc<Forwarder>,
        caller: &tonic::metadata::MetadataMap,
        mut req: pb::GetHistoricalFeaturesRequest,
        split: crate::cluster::Split,
    ) -> Result<ReceiverStream<Result<pb::GetHistoricalFeaturesResponse, Status>>, Status> {
        use futures::StreamExt as _;
        let deadline = deadline_of(caller, std::time::Instant::now())?;
        let n = req.spine.len();
        let spine = std::mem::take(&mut req.spine);
        let part_of = |rows: &[usize]| pb::GetHistoricalFeaturesRequest {
            spine: crate::forward::subset(&spine, rows),
            ..req.clone()
        };
        let mut parts: Vec<(Vec<usize>, crate::forward::JoinPart)> = Vec::new();
        if !split.local.is_empty() {
            let (f, local) = (self.features.clone(), part_of(&split.local));
            parts.push((
                split.local.clone(),
                stream_blocking(self.stopping.clone(), move |emit| f.historical(&local, emit)),
            ));
        }
        for to in split.remote {
            self.metrics.forwarded.with_label_values(&["GetHistoricalFeatures"]).inc_by(to.rows.len() as u64);
            let (fw, caller, part, rows) = (fw.clone(), caller.clone(), part_of(&to.rows), to.rows.clone());
            // Every part is sent now and read as it comes (one chunk ahead), not when the merge
            // first needs it: the owners join their parts at the same time.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(async move {
                // A slot that moved meanwhile: the caller retries (the map has changed).
                let retryable = |s: Status| {
                    if crate::forward::is_not_owned(&s) {
                        Status::unavailable(format!("{} (the slot map changed during the join; retry)", s.message()))
                    } else {
                        s
                    }
                };
                match fw.join(&caller, deadline, &to, part).await {
                    Ok(mut stream) => loop {
                        let next = tokio::select! {
                            next = stream.next() => next,
                            _ = tx.closed() => return,
                        };
                        let Some(chunk) = next else { return };
                        if tx.send(chunk.map_err(retryable)).await.is_err() {
                            return;
                        }
                    },
                    Err(e) => {
                        let _ = tx.send(Err(retryable(e))).await;
                    }
                }
            });
            parts.push((rows, Box::pin(ReceiverStream::new(rx))));
        }
        Ok(ReceiverStream::new(crate::forward::merge_join(n, parts, crate::features::HISTORICAL_CHUNK_ROWS)))
    }

    /// An online lookup whose entities `split` spreads over several owners: each part sent to
    /// its owner (the local one answered here) at once, the answers merged in request order.
    #[allow(clippy::too_many_arguments)]
    async fn online_split(
        &self,
        fw: &Arc<Forwarder>,
        caller: &tonic::metadata::MetadataMap,
        mut req: pb::GetOnlineFeaturesRequest,
        split: crate::cluster::Split,
        deadline: Option<std::time::Instant>,
        request_id: Option<String>,
        answer_max: usize,
        mut ticket: crate::admission::Ticket,
    ) -> Result<Response<pb::GetOnlineFeaturesResponse>, Status> {
        let n = req.entities.len();
        // All of it at one other node: its answer is the answer.
        if let ([to], true) = (split.remote.as_slice(), split.local.is_empty()) {
            self.metrics.forwarded.with_label_values(&["GetOnlineFeatures"]).inc_by(n as u64);
            // Kept to answer UNAVAILABLE cells if the owner does not answer in time.
            let unread = deadline.map(|_| req.clone());
            let answer = match (fw.online(caller, deadline, to, req, answer_max).await, unread) {
                (Err(s), Some(req)) if crate::forward::timed_out(&s) => {
                    self.features.unread_answer(&req).map_err(status)?
                }
                (answer, _) => answer?,
            };
            hold_owners_answer(&mut ticket, &mut 0, answer_max, &answer)?;
            let mut resp = Response::new(answer);
            resp.extensions_mut().insert(HeldTicket(Arc::new(ticket)));
            return Ok(resp);
        }
        let entities = std::mem::take(&mut req.entities);
        let part = |at: &[usize]| pb::GetOnlineFeaturesRequest {
            entities: crate::forward::subset(&entities, at),
            ..req.clone()
        };
        let mut sends = tokio::task::JoinSet::new();
        for (k, to) in split.remote.iter().enumerate() {
            let (fw, caller, to, part) = (fw.clone(), caller.clone(), to.clone(), part(&to.rows));
            self.metrics.forwarded.with_label_values(&["GetOnlineFeatures"]).inc_by(to.rows.len() as u64);
            sends.spawn(async move { (k, fw.online(&caller, deadline, &to, part, answer_max).await) });
        }
        let mut parts: Vec<(&[usize], pb::GetOnlineFeaturesResponse)> = Vec::with_capacity(split.remote.len() + 1);
        // Encoded bytes of the parts' answers: together they are held to one answer's limit.
        let mut answered = 0usize;
        if !split.local.is_empty() {
            let (f, local) = (self.features.clone(), part(&split.local));
            let (answer, back) = blocking(move || {
                let a = f.get_online_charged(
                    &local,
                    now_us(),
                    answer_max,
                    &mut |b| ticket.charge(b),
                    deadline,
                    request_id.as_deref(),
                );
                Ok((a.map_err(status), ticket))
            })
            .await?;
            ticket = back;
            let answer = answer?;
            answered += answer.encoded_len();
            parts.push((&split.local, answer));
        }
        let mut remote: Vec<Option<pb::GetOnlineFeaturesResponse>> = vec![None; split.remote.len()];
        while let Some(done) = sends.join_next().await {
            let (k, answer) = done.map_err(|e| Status::internal(format!("forwarding failed: {e}")))?;
            // An owner that did not answer by the deadline: its cells are UNAVAILABLE (or
            // DEFAULTED), as they would be on one node, not an error for the whole lookup.
            let answer = match answer {
                Err(s) if deadline.is_some() && crate::forward::timed_out(&s) => {
                    self.features.unread_answer(&part(&split.remote[k].rows)).map_err(status)?
                }
                answer => answer?,
            };
            hold_owners_answer(&mut ticket, &mut answered, answer_max, &answer)?;
            remote[k] = Some(answer);
        }
        for (to, answer) in split.remote.iter().zip(remote) {
            let answer = answer.ok_or_else(|| Status::internal("a forwarded part has no answer"))?;
            parts.push((&to.rows, answer));
        }
        let mut resp = Response::new(crate::forward::merge_online(n, parts)?);
        resp.extensions_mut().insert(HeldTicket(Arc::new(ticket)));
        Ok(resp)
    }

    /// A write, its rows forwarded to their owners when this node forwards (`crate::forward`):
    /// `WriteFeatures`, its stream and Flight `DoPut`. Counts what this node applied in its
    /// metrics.
    pub(crate) async fn write_routed(
        &self,
        caller: &tonic::metadata::MetadataMap,
        req: pb::WriteFeaturesRequest,
    ) -> Result<pb::WriteFeaturesResponse, Status> {
        let deadline = deadline_of(caller, std::time::Instant::now())?;
        let f = self.features.clone();
        let forwarder = self.forwarding(caller);
        let forwards = forwarder.is_some();
        let bytes = req.encoded_len() as u64;
        let routed = blocking(move || {
            // Without an idempotency key, a write this node owns whole is simply written: one
            // it does not is refused before anything is written, and split below. (With a key
            // the split is decided first: each shard's record is of its own part, and the
            // whole request's digest would not match this node's.)
            if !forwards || req.idempotency_key.is_empty() {
                match f.write(&req) {
                    Err(ServiceError::NotServed(NotServed::NotOwner(_))) if forwards => {}
                    r => return r.map(Ok).map_err(status),
                }
            }
            // The whole write is checked here first, so that one refused anywhere is refused
            // whole, with nothing written.
            let keys = f.write_keys(&req).map_err(status)?;
            match f.route(&keys).map_err(status)? {
                Some(split) => Ok(Err((req, split))),
                // This node owns it all (the map changed in between, or the write has a key).
                None => f.write(&req).map(Ok).map_err(status),
            }
        })
        .await?;
        let (mut req, split) = match routed {
            Ok(resp) => {
                self.count_written(&resp, bytes);
                return Ok(resp);
            }
            Err(routed) => routed,
        };
        let Some(fw) = forwarder else {
            return Err(Status::internal("a write was split on a node that does not forward"));
        };
        let rows = std::mem::take(&mut req.rows);
        let part = |at: &[usize]| pb::WriteFeaturesRequest { rows: crate::forward::subset(&rows, at), ..req.clone() };
        let mut sends = tokio::task::JoinSet::new();
        for (k, to) in split.remote.iter().enumerate() {
            let (fw, caller, to, part) = (fw.clone(), caller.clone(), to.clone(), part(&to.rows));
            self.metrics.forwarded.with_label_values(&["WriteFeatures"]).inc_by(to.rows.len() as u64);
            sends.spawn(async move { (k, fw.write(&caller, deadline, &to, part).await) });
        }
        // Each part's outcome, with who applied it and how many rows.
        let mut outcomes: Vec<(String, &[usize], Result<pb::WriteFeaturesResponse, Status>)> = Vec::new();
        if !split.local.is_empty() {
            let (f, local) = (self.features.clone(), part(&split.local));
            let here = self.features.node_id().unwrap_or_default();
            let bytes = local.encoded_len() as u64;
            let r = blocking(move || f.write(&local).map_err(status)).await;
            if let Ok(resp) = &r {
                // Each owner counts what it wrote itself.
                self.count_written(resp, bytes);
            }
            outcomes.push((here, &split.local, r));
        }
        let mut remote: Vec<Option<Result<pb::WriteFeaturesResponse, Status>>> = vec![None; split.remote.len()];
        while let Some(done) = sends.join_next().await {
            let (k, r) = done.map_err(|e| Status::internal(format!("forwarding failed: {e}")))?;
            remote[k] = Some(r);
        }
        for (to, r) in split.remote.iter().zip(remote) {
            let r = r.unwrap_or_else(|| Err(Status::internal("a forwarded part has no outcome")));
            outcomes.push((to.node.clone(), &to.rows, r));
        }
        let applied: Vec<String> = outcomes
            .iter()
            .filter(|(_, _, r)| r.is_ok())
            .map(|(node, rows, _)| format!("{node} ({} rows)", rows.len()))
            .collect();
        let mut answers = Vec::with_capacity(outcomes.len());
        for (node, rows, r) in outcomes {
            match r {
                Ok(a) => answers.push(a),
                Err(s) => {
                    let applied = if applied.is_empty() { "none".to_string() } else { applied.join(", ") };
                    // The shard numbers the rows of its own part: say which rows of the request
                    // those are.
                    let shown: Vec<String> = rows.iter().take(ROWS_NAMED_MAX).map(usize::to_string).collect();
                    let more = if rows.len() > ROWS_NAMED_MAX { ", ..." } else { "" };
                    let message = format!(
                        "the write spans {} shards and was not applied on node {node} (its part holds rows {}{more} \
                         of the request): {}; shards that applied their rows: {applied}",
                        split.remote.len() + usize::from(!split.local.is_empty()),
                        shown.join(", "),
                        s.message()
                    );
                    // A refusal for a slot the owner no longer holds must not tell the caller to
                    // resend the write once other shards applied theirs.
                    let details = match (s.code(), applied == "none") {
                        (tonic::Code::FailedPrecondition, false) => Vec::new(),
                        _ => s.details().to_vec(),
                    };
                    return Err(Status::with_details(s.code(), message, details.into()));
                }
            }
        }
        Ok(crate::forward::merge_writes(&answers))
    }

    /// The owner's stream of a history scan of an entity another node owns, when this node
    /// forwards (`None`: this node answers it, or refuses it, itself). `ScanHistory` and
    /// Flight's scan ticket alike.
    pub(crate) async fn scan_elsewhere(
        &self,
        caller: &tonic::metadata::MetadataMap,
        req: &pb::ScanHistoryRequest,
    ) -> Result<Option<BoxStream<pb::ScanHistoryResponse>>, Status> {
        let Some(fw) = self.forwarding(caller) else { return Ok(None) };
        let key = self.features.scan_key(req).map_err(status)?;
        let Some(to) = self.features.route(&[key]).map_err(status)?.and_then(|s| s.remote.into_iter().next()) else {
            return Ok(None);
        };
        self.metrics.forwarded.with_label_values(&["ScanHistory"]).inc();
        let deadline = deadline_of(caller, std::time::Instant::now())?;
        let stream = fw.scan(caller, deadline, &to, req.clone()).await?;
        Ok(Some(Box::pin(stream)))
    }

    /// Counts a write this node applied in its metrics (a replayed one writes nothing).
    fn count_written(&self, resp: &pb::WriteFeaturesResponse, bytes: u64) {
        if !resp.deduplicated {
            self.metrics.values_written.inc_by(resp.values_written);
            self.metrics.write_bytes.inc_by(bytes);
        }
    }

    /// The same endpoints ending their streams with `UNAVAILABLE` once `stopping` turns true.
    pub fn with_stopping(mut self, stopping: Stopping) -> Self {
        self.stopping = Some(stopping);
        self
    }
}

/// Holds an owner's answer to a forwarded part until it is sent: `answered` (the encoded bytes
/// of the request's parts so far) must stay within `answer_max`, and its memory is charged to
/// the request's ticket.
fn hold_owners_answer(
    ticket: &mut crate::admission::Ticket,
    answered: &mut usize,
    answer_max: usize,
    answer: &pb::GetOnlineFeaturesResponse,
) -> Result<(), Status> {
    *answered += answer.encoded_len();
    if *answered > answer_max {
        return Err(Status::resource_exhausted(format!(
            "the answer is over {answer_max} bytes; ask for fewer entities or features"
        )));
    }
    if !ticket.charge(answer.encoded_len() * DECODED_BYTES_PER_ENCODED) {
        return Err(crate::admission::shed_status(
            "overloaded: requests in flight hold the memory the owners' answers need; retry shortly".into(),
        ));
    }
    Ok(())
}

/// Most row numbers an error of a write split across shards names (of the part that failed).
pub const ROWS_NAMED_MAX: usize = 10;

/// Of an online lookup's gRPC deadline, the time kept to encode and send the answer: reads
/// that would end later are skipped (at most half the timeout).
pub const DEADLINE_RESERVE: std::time::Duration = std::time::Duration::from_millis(1);

/// When a request that arrived at `arrived` must have its answer ready: its `grpc-timeout`
/// less [`DEADLINE_RESERVE`] (`None`: no deadline). A malformed header is `INVALID_ARGUMENT`.
fn deadline_of(
    metadata: &tonic::metadata::MetadataMap,
    arrived: std::time::Instant,
) -> Result<Option<std::time::Instant>, Status> {
    let Some(v) = metadata.get("grpc-timeout") else { return Ok(None) };
    let timeout = v.to_str().ok().and_then(parse_grpc_timeout).ok_or_else(|| {
        Status::invalid_argument(format!("grpc-timeout {v:?} is not 1 to 8 digits and a unit (H, M, S, m, u, n)"))
    })?;
    let reserve = DEADLINE_RESERVE.min(timeout / 2);
    Ok(arrived.checked_add(timeout - reserve))
}

/// The caller's `x-request-id` (logged with its answers), if it sent one: printable ASCII of
/// at most `REQUEST_ID_BYTES_MAX` bytes, else `INVALID_ARGUMENT`.
fn request_id_of(metadata: &tonic::metadata::MetadataMap) -> Result<Option<String>, Status> {
    use crate::servedlog::REQUEST_ID_BYTES_MAX;
    let Some(v) = metadata.get("x-request-id") else { return Ok(None) };
    match v.to_str() {
        Ok(s) if !s.is_empty() && s.len() <= REQUEST_ID_BYTES_MAX => Ok(Some(s.to_string())),
        _ => Err(Status::invalid_argument(format!(
            "x-request-id must be 1 to {REQUEST_ID_BYTES_MAX} printable ASCII characters"
        ))),
    }
}

/// A `grpc-timeout` value (the gRPC over HTTP/2 spec: `TimeoutValue TimeoutUnit`).
fn parse_grpc_timeout(s: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (digits, unit) = s.split_at(s.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Memory a decoded request holds, about, per byte of its encoding (owned strings and
/// vectors, each with its header).
pub(crate) const DECODED_BYTES_PER_ENCODED: usize = 2;

#[tonic::async_trait]
impl pb::feature_service_server::FeatureService for FeatureApi {
    async fn get_online_features(
        &self,
        req: Request<pb::GetOnlineFeaturesRequest>,
    ) -> Result<Response<pb::GetOnlineFeaturesResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("GetOnlineFeatures", async move {
                let deadline = deadline_of(req.metadata(), std::time::Instant::now())?;
                let request_id = request_id_of(req.metadata())?;
                let p = authorize(&req, Scope::Read, req.get_ref().features.iter().map(String::as_str))?;
                let mut ticket = self.admission.admit(req.get_ref().encoded_len() * DECODED_BYTES_PER_ENCODED)?;
                let r = req.get_ref();
                p.take_values((r.entities.len() as u64 * r.features.len() as u64).min(ONLINE_CELLS_MAX as u64))?;
                // One answer may take a quarter of the requests' memory at most, so that a few
                // huge requests cannot starve the rest.
                let answer_max = ONLINE_ANSWER_BYTES_MAX.min(self.admission.bytes_max() / ONLINE_ANSWER_SHARE_DIVISOR);
                if let Some(fw) = self.forwarding(req.metadata()) {
                    let keys = self.features.online_keys(r).map_err(status)?;
                    if let Some(split) = self.features.route(&keys).map_err(status)? {
                        let caller = req.metadata().clone();
                        let answer = self
                            .online_split(
                                &fw,
                                &caller,
                                req.into_inner(),
                                split,
                                deadline,
                                request_id,
                                answer_max,
                                ticket,
                            )
                            .await?;
                        return Ok(answer);
                    }
                }
                let f = self.features.clone();
                let req = req.into_inner();
                let inline = req.entities.len().saturating_mul(req.features.len()) <= ONLINE_INLINE_CELLS_MAX;
                // The ticket stays with the response until it has been sent (HoldTickets).
                let answer = move || {
                    let answer = f.get_online_charged(
                        &req,
                        now_us(),
                        answer_max,
                        &mut |b| ticket.charge(b),
                        deadline,
                        request_id.as_deref(),
                    );
                    answer.map_err(status).map(|a| {
                        let mut resp = Response::new(a);
                        resp.extensions_mut().insert(HeldTicket(Arc::new(ticket)));
                        resp
                    })
                };
                if inline {
                    return answer();
                }
                blocking(answer).await
            })
            .await
    }

    async fn write_features(
        &self,
        req: Request<pb::WriteFeaturesRequest>,
    ) -> Result<Response<pb::WriteFeaturesResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("WriteFeatures", async move {
                let p = authorize(&req, Scope::Write, req.get_ref().rows.iter().map(|r| r.group.as_str()))?;
                let caller = req.metadata().clone();
                let req = req.into_inner();
                let bytes = req.encoded_len() as u64;
                // The decoded request, and the engine batch made of it.
                let ticket = self.admission.admit(bytes as usize * (DECODED_BYTES_PER_ENCODED + 1))?;
                p.take_values(values_in(&req))?;
                let resp = self.write_routed(&caller, req).await;
                drop(ticket);
                Ok(Response::new(resp?))
            })
            .await
    }

    async fn write_features_stream(
        &self,
        req: Request<Streaming<pb::WriteFeaturesRequest>>,
    ) -> Result<Response<pb::WriteFeaturesStreamResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("WriteFeaturesStream", async move {
                let principal = authorize(&req, Scope::Write, [])?;
                // One slot for the whole stream; each message's bytes are reserved while it is
                // written.
                let mut ticket = self.admission.admit(0)?;
                // An error of message `n`, keeping its details (retry advice, CAS conflicts).
                let in_message = |n: u64, s: Status| {
                    let message = format!("stream message {n} (earlier messages were applied): {}", s.message());
                    Status::with_details(s.code(), message, s.details().to_vec().into())
                };
                let caller = req.metadata().clone();
                let mut stream = req.into_inner();
                let mut summary = pb::WriteFeaturesStreamResponse::default();
                let mut stopping = self.stopping.clone();
                loop {
                    let next = match stopping.as_mut() {
                        Some(s) => tokio::select! {
                            m = stream.message() => m,
                            Ok(_) = s.wait_for(|stop| *stop) => return Err(Status::unavailable(format!(
                                "the server is stopping; the stream's first {} messages were applied",
                                summary.requests
                            ))),
                        },
                        None => stream.message().await,
                    };
                    let Some(msg) = next? else { break };
                    let n = summary.requests;
                    for row in &msg.rows {
                        principal.require_group(Scope::Write, &row.group).map_err(|s| in_message(n, s))?;
                    }
                    // Each message after the first is a request of its own for the rate limit
                    // (the first was counted when the call came in).
                    if n > 0 {
                        principal.take_request().map_err(|s| in_message(n, s))?;
                    }
                    let rows = msg.rows.len() as u64;
                    let bytes = msg.encoded_len() as u64;
                    let reserved = bytes as usize * (DECODED_BYTES_PER_ENCODED + 1);
                    if !ticket.charge(reserved) {
                        let shed = crate::admission::shed_status(
                            "overloaded: requests in flight hold the memory this message needs; retry shortly".into(),
                        );
                        return Err(in_message(n, shed));
                    }
                    principal.take_values(values_in(&msg)).map_err(|s| in_message(n, s))?;
                    let resp = self.write_routed(&caller, msg).await.map_err(|s| in_message(n, s))?;
                    ticket.refund(reserved);
                    summary.requests += 1;
                    summary.rows += rows;
                    summary.values_written += resp.values_written;
                }
                Ok(Response::new(summary))
            })
            .await
    }

    type GetHistoricalFeaturesStream = BoxStream<pb::GetHistoricalFeaturesResponse>;

    async fn get_historical_features(
        &self,
        req: Request<pb::GetHistoricalFeaturesRequest>,
    ) -> Result<Response<Self::GetHistoricalFeaturesStream>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("GetHistoricalFeatures", async move {
                let p = authorize(&req, Scope::Read, req.get_ref().features.iter().map(String::as_str))?;
                // The spine, and the answers the join holds in memory before it spills.
                let r = req.get_ref();
                let answers = self.features.join_answer_bytes(r.spine.len(), r.features.len());
                let ticket = self.admission.admit(r.encoded_len() * DECODED_BYTES_PER_ENCODED + answers)?;
                let cells =
                    r.spine.len().min(SPINE_ROWS_MAX) as u64 * r.features.len().min(FEATURES_PER_REQUEST_MAX) as u64;
                p.take_values(cells)?;
                let f = self.features.clone();
                if let Some(fw) = self.forwarding(req.metadata()) {
                    // Checking and routing a spine of millions of rows is CPU work: off the
                    // async runtime. The request comes back with the split (`None`: all here).
                    let caller = req.metadata().clone();
                    let g = f.clone();
                    let (join, split) = blocking(move || {
                        let join = req.into_inner();
                        let keys = g.join_keys(&join).map_err(status)?;
                        let split = g.route(&keys).map_err(status)?;
                        Ok((join, split))
                    })
                    .await?;
                    if let Some(split) = split {
                        use futures::StreamExt as _;
                        let stream = self.join_split(&fw, &caller, join, split)?;
                        let stream: BoxStream<pb::GetHistoricalFeaturesResponse> = Box::pin(stream.map(move |chunk| {
                            let _held = &ticket;
                            chunk
                        }));
                        return Ok(Response::new(stream));
                    }
                    return Ok(Response::new(stream_blocking(self.stopping.clone(), move |emit| {
                        let _ticket = ticket;
                        f.historical(&join, emit)
                    })));
                }
                let req = req.into_inner();
                Ok(Response::new(stream_blocking(self.stopping.clone(), move |emit| {
                    let _ticket = ticket;
                    f.historical(&req, emit)
                })))
            })
            .await
    }

    type ScanHistoryStream = BoxStream<pb::ScanHistoryResponse>;
    type CopyFeatureHistoryStream = BoxStream<pb::CopyFeatureHistoryProgress>;

    async fn copy_feature_history(
        &self,
        req: Request<pb::CopyFeatureHistoryRequest>,
    ) -> Result<Response<Self::CopyFeatureHistoryStream>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("CopyFeatureHistory", async move {
                authorize(&req, Scope::Write, Some(req.get_ref().group.as_str()))?;
                let f = self.features.clone();
                let req = req.into_inner();
                Ok(Response::new(stream_blocking(self.stopping.clone(), move |emit| {
                    crate::backfill::copy_history(f.db(), f.registry(), &req, f.is_sharded().then_some(&*f), emit)
                })))
            })
            .await
    }

    async fn scan_history(
        &self,
        req: Request<pb::ScanHistoryRequest>,
    ) -> Result<Response<Self::ScanHistoryStream>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("ScanHistory", async move {
                let r = req.get_ref();
                authorize(&req, Scope::Read, r.features.iter().map(String::as_str).chain([r.group.as_str()]))?;
                let ticket = self.admission.admit(r.encoded_len() * DECODED_BYTES_PER_ENCODED + SCAN_RESERVE_BYTES)?;
                if let Some(stream) = self.scan_elsewhere(req.metadata(), r).await? {
                    // The ticket is held until the owner's stream has been passed through.
                    let stream = tokio_stream::StreamExt::map(stream, move |chunk| {
                        let _held = &ticket;
                        chunk
                    });
                    return Ok(Response::new(Box::pin(stream) as Self::ScanHistoryStream));
                }
                let f = self.features.clone();
                let req = req.into_inner();
                Ok(Response::new(stream_blocking(self.stopping.clone(), move |emit| {
                    let _ticket = ticket;
                    f.scan_history(&req, emit)
                })))
            })
            .await
    }
}

/// Memory reserved for a history scan's chunks in flight (its request aside).
pub(crate) const SCAN_RESERVE_BYTES: usize = 4 << 20;

/// `quiver.v1.RegistryService`.
#[derive(Debug, Clone)]
pub struct RegistryApi {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Shadow reads, whose mismatch rates the release gate checks.
    shadow: Option<Arc<crate::shadow::Shadow>>,
}

impl RegistryApi {
    /// The endpoints over `registry`.
    pub fn new(registry: Arc<Registry>, metrics: Arc<Metrics>) -> Self {
        RegistryApi { registry, metrics, shadow: None }
    }

    /// The same endpoints, the release gate reading `shadow`'s comparisons.
    pub fn with_shadow(mut self, shadow: Arc<crate::shadow::Shadow>) -> Self {
        self.shadow = Some(shadow);
        self
    }
}

#[tonic::async_trait]
impl pb::registry_service_server::RegistryService for RegistryApi {
    async fn apply_registry(
        &self,
        req: Request<pb::ApplyRegistryRequest>,
    ) -> Result<Response<pb::ApplyRegistryResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("ApplyRegistry", async move {
                let p = authorize(&req, Scope::Registry, req.get_ref().feature_groups.iter().map(|g| g.name.as_str()))?;
                if p.limited() {
                    // Entity types are shared by every group: a token limited to some groups
                    // may send them only as they are.
                    for et in &req.get_ref().entity_types {
                        if self.registry.entity_type(&et.name).ok().as_ref() != Some(et) {
                            return Err(Status::permission_denied(format!(
                                "token {:?} is limited to some groups: it may not create or change entity type {:?}",
                                p.name, et.name
                            )));
                        }
                    }
                }
                let r = self.registry.clone();
                let req = req.into_inner();
                blocking(move || r.apply_as(&req, &p.name).map_err(registry_status))
                    .await
                    .map(|changes| Response::new(pb::ApplyRegistryResponse { changes }))
            })
            .await
    }

    async fn promote_group(
        &self,
        req: Request<pb::PromoteGroupRequest>,
    ) -> Result<Response<pb::PromoteGroupResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("PromoteGroup", async move {
                let p = authorize(&req, Scope::Registry, Some(req.get_ref().group.as_str()))?;
                let r = self.registry.clone();
                let shadow = self.shadow.clone();
                let req = req.into_inner();
                if req.version == 0 {
                    return Err(Status::invalid_argument(format!(
                        "promote {}: the version must be at least 1",
                        req.group
                    )));
                }
                if req.reason.len() > crate::registry::TEXT_BYTES_MAX {
                    return Err(Status::invalid_argument(format!(
                        "the reason is longer than {} bytes",
                        crate::registry::TEXT_BYTES_MAX
                    )));
                }
                blocking(move || {
                    // The gate reads outside the registry's lock; the promotion is one write.
                    let serving = r.group(&req.group, 0).map_err(registry_status)?.version;
                    r.group(&req.group, req.version).map_err(registry_status)?;
                    if r.is_retired(&req.group, req.version) {
                        return Err(Status::failed_precondition(format!(
                            "{}@{} is retired: it can never serve again",
                            req.group, req.version
                        )));
                    }
                    let gate = if !req.dry_run && (req.force || serving == req.version) {
                        None
                    } else {
                        let counts = |f: &str| shadow.as_ref().and_then(|s| s.counts(&req.group, req.version, f));
                        let report = crate::gate::check(r.db(), &r, &req.group, req.version, counts).map_err(status)?;
                        if !report.passed && !req.dry_run {
                            let message = crate::gate::failures(&report);
                            return Err(Status::with_details(
                                tonic::Code::FailedPrecondition,
                                message,
                                report.encode_to_vec().into(),
                            ));
                        }
                        Some(report)
                    };
                    if req.dry_run {
                        return Ok(Response::new(pb::PromoteGroupResponse { promotion: None, changed: false, gate }));
                    }
                    let (promotion, changed) =
                        r.promote(&req.group, req.version, req.force, &req.reason, &p.name).map_err(registry_status)?;
                    Ok(Response::new(pb::PromoteGroupResponse { promotion: Some(promotion), changed, gate }))
                })
                .await
            })
            .await
    }

    async fn rollback_group(
        &self,
        req: Request<pb::RollbackGroupRequest>,
    ) -> Result<Response<pb::RollbackGroupResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("RollbackGroup", async move {
                let p = authorize(&req, Scope::Registry, Some(req.get_ref().group.as_str()))?;
                let r = self.registry.clone();
                let req = req.into_inner();
                blocking(move || {
                    let promotion = r.rollback(&req.group, &req.reason, &p.name).map_err(registry_status)?;
                    Ok(Response::new(pb::RollbackGroupResponse { promotion: Some(promotion) }))
                })
                .await
            })
            .await
    }

    async fn retire_group_version(
        &self,
        req: Request<pb::RetireGroupVersionRequest>,
    ) -> Result<Response<pb::RetireGroupVersionResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("RetireGroupVersion", async move {
                let p = authorize(&req, Scope::Registry, Some(req.get_ref().group.as_str()))?;
                let req = req.into_inner();
                let retention = match &req.retention {
                    None => crate::registry::RETIREMENT_RETENTION_DEFAULT,
                    Some(d) if d.seconds >= 0 && d.nanos == 0 => std::time::Duration::from_secs(d.seconds as u64),
                    Some(_) => {
                        return Err(Status::invalid_argument("retention must be whole, non-negative seconds"));
                    }
                };
                if req.version == 0 {
                    return Err(Status::invalid_argument("retire: the version must be at least 1"));
                }
                let r = self.registry.clone();
                blocking(move || {
                    let (retirement, changed) =
                        r.retire(&req.group, req.version, retention, &req.reason, &p.name).map_err(registry_status)?;
                    r.refresh_dropped_features();
                    Ok(Response::new(pb::RetireGroupVersionResponse { retirement: Some(retirement), changed }))
                })
                .await
            })
            .await
    }

    async fn list_group_versions(
        &self,
        req: Request<pb::ListGroupVersionsRequest>,
    ) -> Result<Response<pb::ListGroupVersionsResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("ListGroupVersions", async move {
                auth::principal(&req)?.require_group_visible(&req.get_ref().group)?;
                let r = self.registry.clone();
                let group = req.into_inner().group;
                blocking(move || r.versions(&group).map(Response::new).map_err(registry_status)).await
            })
            .await
    }

    async fn get_feature_group(
        &self,
        req: Request<pb::GetFeatureGroupRequest>,
    ) -> Result<Response<pb::FeatureGroup>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("GetFeatureGroup", async move {
                auth::principal(&req)?.require_group_visible(&req.get_ref().name)?;
                let req = req.into_inner();
                let r = self.registry.clone();
                blocking(move || r.group(&req.name, req.version).map(Response::new).map_err(registry_status)).await
            })
            .await
    }

    async fn list_feature_groups(
        &self,
        req: Request<pb::ListFeatureGroupsRequest>,
    ) -> Result<Response<pb::ListFeatureGroupsResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("ListFeatureGroups", async move {
                let p = auth::principal(&req)?;
                let r = self.registry.clone();
                blocking(move || {
                    let mut feature_groups = r.groups();
                    feature_groups.retain(|g| p.may_see(&g.name));
                    Ok(Response::new(pb::ListFeatureGroupsResponse { feature_groups }))
                })
                .await
            })
            .await
    }

    async fn get_entity_type(
        &self,
        req: Request<pb::GetEntityTypeRequest>,
    ) -> Result<Response<pb::EntityType>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("GetEntityType", async move {
                auth::principal(&req)?;
                let r = self.registry.clone();
                let name = req.into_inner().name;
                blocking(move || r.entity_type(&name).map(Response::new).map_err(registry_status)).await
            })
            .await
    }

    async fn list_entity_types(
        &self,
        req: Request<pb::ListEntityTypesRequest>,
    ) -> Result<Response<pb::ListEntityTypesResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("ListEntityTypes", async move {
                auth::principal(&req)?;
                let r = self.registry.clone();
                blocking(move || Ok(Response::new(pb::ListEntityTypesResponse { entity_types: r.entity_types() })))
                    .await
            })
            .await
    }
}

/// `quiver.v1.AdminService`.
#[derive(Debug, Clone)]
pub struct AdminApi {
    db: Arc<Db>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    replicator: Arc<crate::replication::Replicator>,
    test_clock: Option<quiver_storage::ManualClock>,
    checkpoint_root: Option<Arc<crate::checkpoint::CheckpointRoot>>,
}

impl AdminApi {
    /// The same endpoints with `SetTestClock` moving `clock` (the engine's clock); without one
    /// it answers `FAILED_PRECONDITION`.
    pub fn with_test_clock(mut self, clock: Option<quiver_storage::ManualClock>) -> Self {
        self.test_clock = clock;
        self
    }

    /// The same endpoints with `Checkpoint` confined to `root` (without one it answers
    /// `FAILED_PRECONDITION`).
    pub fn with_checkpoint_root(mut self, root: Option<crate::checkpoint::CheckpointRoot>) -> Self {
        self.checkpoint_root = root.map(Arc::new);
        self
    }

    /// The endpoints over `db`; entity keys in requests are checked against `registry`.
    pub fn new(
        db: Arc<Db>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        replicator: Arc<crate::replication::Replicator>,
    ) -> Self {
        AdminApi { db, registry, metrics, replicator, test_clock: None, checkpoint_root: None }
    }

    /// The encoded `[start, end)` of a compaction range, checked against its entity type.
    fn entity_range(&self, r: &pb::EntityRange) -> Result<(Vec<u8>, Option<Vec<u8>>), Status> {
        let et = self.registry.entity_type(&r.entity_type).map_err(registry_status)?;
        let start = r.start.as_ref().ok_or_else(|| Status::invalid_argument("range.start is required"))?;
        let start =
            convert::entity_key(&et, start).map_err(|e| Status::invalid_argument(format!("range.start: {e}")))?;
        let end = match &r.end {
            None => None,
            Some(k) => {
                Some(convert::entity_key(&et, k).map_err(|e| Status::invalid_argument(format!("range.end: {e}")))?)
            }
        };
        if end.as_ref().is_some_and(|e| *e <= start) {
            return Err(Status::invalid_argument("range.end must sort after range.start"));
        }
        Ok((start, end))
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn flush(&self, _req: Request<pb::FlushRequest>) -> Result<Response<pb::FlushResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("Flush", async move {
                let db = self.db.clone();
                blocking(move || db.flush().map_err(|e| storage_status(&e))).await?;
                Ok(Response::new(pb::FlushResponse {}))
            })
            .await
    }

    async fn compact(&self, req: Request<pb::CompactRequest>) -> Result<Response<pb::CompactResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("Compact", async move {
                let db = self.db.clone();
                let req = req.into_inner();
                let range = req.range.as_ref().map(|r| self.entity_range(r)).transpose()?;
                if req.full && range.is_some() {
                    return Err(Status::invalid_argument("compact: give either full or range, not both"));
                }
                blocking(move || {
                    match (req.full, range) {
                        (_, Some((start, end))) => db.compact_range(&start, end.as_deref()),
                        (true, None) => db.compact_all(),
                        (false, None) => db.compact_pending(),
                    }
                    .map_err(|e| storage_status(&e))
                })
                .await?;
                Ok(Response::new(pb::CompactResponse {}))
            })
            .await
    }

    async fn get_stats(&self, _req: Request<pb::GetStatsRequest>) -> Result<Response<pb::GetStatsResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("GetStats", async move {
                let s = self.db.stats();
                Ok(Response::new(pb::GetStatsResponse {
                    levels: s
                        .levels
                        .iter()
                        .enumerate()
                        .map(|(i, l)| pb::LevelStats {
                            level: i as u32,
                            tables: l.tables as u64,
                            bytes: l.bytes,
                            entries: l.entries,
                        })
                        .collect(),
                    memtable_bytes: s.memtable_bytes as u64,
                    immutable_memtables: s.immutable_memtables as u64,
                    last_sequence: s.last_seqno,
                    flushes: s.flushes,
                    compactions: s.compactions,
                    entries_dropped_by_retention: s.entries_dropped,
                    write_groups: s.write_groups,
                    wal_syncs: s.wal_syncs,
                    block_cache_hits: s.block_cache_hits,
                    block_cache_misses: s.block_cache_misses,
                    block_cache_bytes: s.block_cache_bytes,
                    hot_tier_hits: s.hot.hits,
                    hot_tier_misses: s.hot.misses,
                    hot_tier_fills: s.hot.fills,
                    hot_tier_evictions: s.hot.evictions,
                    hot_tier_entries: s.hot.entries,
                    hot_tier_bytes: s.hot.bytes,
                    io_backend: s.ssd.backend.to_string(),
                    direct_reads: s.ssd.direct,
                    ssd_block_reads: s.ssd.block_reads,
                    ssd_read_rounds: s.ssd.read_rounds,
                    ssd_bytes_read: s.ssd.bytes_read,
                    tile_hits: s.tiles.hits,
                    tile_misses: s.tiles.misses,
                    tile_invalidations: s.tiles.invalidations,
                    tile_entries: s.tiles.entries,
                    tile_bytes: s.tiles.bytes,
                }))
            })
            .await
    }

    async fn checkpoint(
        &self,
        req: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("Checkpoint", async move {
                let path = req.into_inner().path;
                let root = self.checkpoint_root.clone().ok_or_else(|| {
                    Status::failed_precondition("this node has no checkpoint root (--checkpoint-root)")
                })?;
                let db = self.db.clone();
                blocking(move || {
                    let target = root.target(&path).map_err(Status::invalid_argument)?;
                    db.checkpoint(&target.path).map_err(|e| {
                        target.clean_up();
                        storage_status(&e)
                    })?;
                    Ok(target.path)
                })
                .await?;
                Ok(Response::new(pb::CheckpointResponse {}))
            })
            .await
    }

    async fn verify(&self, _req: Request<pb::VerifyRequest>) -> Result<Response<pb::VerifyResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("Verify", async move {
                let db = self.db.clone();
                blocking(move || db.verify().map_err(|e| storage_status(&e))).await?;
                let s = self.db.stats();
                Ok(Response::new(pb::VerifyResponse {
                    tables: s.levels.iter().map(|l| l.tables as u64).sum(),
                    entries: s.levels.iter().map(|l| l.entries).sum(),
                }))
            })
            .await
    }

    async fn get_replication_status(
        &self,
        _req: Request<pb::GetReplicationStatusRequest>,
    ) -> Result<Response<pb::GetReplicationStatusResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics.timed("GetReplicationStatus", async move { Ok(Response::new(self.replicator.status())) }).await
    }

    async fn pause_replication(&self, req: Request<pb::PeerRequest>) -> Result<Response<pb::PeerResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("PauseReplication", async move {
                let peer = self.replicator.pause(req.into_inner().region)?;
                Ok(Response::new(pb::PeerResponse { peer: Some(peer) }))
            })
            .await
    }

    async fn resume_replication(&self, req: Request<pb::PeerRequest>) -> Result<Response<pb::PeerResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("ResumeReplication", async move {
                let peer = self.replicator.resume(req.into_inner().region)?;
                Ok(Response::new(pb::PeerResponse { peer: Some(peer) }))
            })
            .await
    }

    async fn set_test_clock(
        &self,
        req: Request<pb::SetTestClockRequest>,
    ) -> Result<Response<pb::SetTestClockResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("SetTestClock", async move {
                let Some(clock) = &self.test_clock else {
                    return Err(Status::failed_precondition(
                        "this node does not run the test clock (QUIVER_TEST_MANUAL_CLOCK_US, testing builds only)",
                    ));
                };
                let now = req.into_inner().now.ok_or_else(|| Status::invalid_argument("now is required"))?;
                let us = convert::system_time(&now, "now").map_err(|e| Status::invalid_argument(e.0))?;
                clock.set(us.0);
                let high_water = self.db.stats().system_time_high_water;
                Ok(Response::new(pb::SetTestClockResponse {
                    high_water: Some(convert::timestamp(high_water.min(i64::MAX as u64) as i64)),
                }))
            })
            .await
    }

    async fn rebootstrap_replication(
        &self,
        req: Request<pb::PeerRequest>,
    ) -> Result<Response<pb::PeerResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("RebootstrapReplication", async move {
                let peer = self.replicator.rebootstrap(req.into_inner().region)?;
                Ok(Response::new(pb::PeerResponse { peer: Some(peer) }))
            })
            .await
    }
}

/// `quiver.v1.MonitorService`.
#[derive(Debug, Clone)]
pub struct MonitorApi {
    features: Option<Arc<Features>>,
    health: Arc<crate::health::Health>,
    served_log: Arc<crate::servedlog::ServedLog>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    stopping: Option<Stopping>,
}

impl MonitorApi {
    /// The endpoints over `health` and `served_log`.
    pub fn new(
        health: Arc<crate::health::Health>,
        served_log: Arc<crate::servedlog::ServedLog>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Self {
        MonitorApi { features: None, health, served_log, registry, metrics, stopping: None }
    }

    /// The same endpoints replaying the log through `features` (`MeasureSkew`; without it the
    /// call is `FAILED_PRECONDITION`).
    pub fn with_features(mut self, features: Arc<Features>) -> Self {
        self.features = Some(features);
        self
    }

    /// The same endpoints ending their streams with `UNAVAILABLE` once `stopping` turns true.
    pub fn with_stopping(mut self, stopping: Stopping) -> Self {
        self.stopping = Some(stopping);
        self
    }
}

#[tonic::async_trait]
impl pb::monitor_service_server::MonitorService for MonitorApi {
    type ScanServedLogStream = BoxStream<pb::ScanServedLogResponse>;

    async fn measure_skew(
        &self,
        req: Request<pb::MeasureSkewRequest>,
    ) -> Result<Response<pb::MeasureSkewResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("MeasureSkew", async move {
                let group = req.get_ref().group.clone();
                let p = authorize(&req, Scope::Read, (!group.is_empty()).then_some(group.as_str()))?;
                if !group.is_empty() {
                    self.registry.group(&group, 0).map_err(registry_status)?;
                }
                let features =
                    self.features.clone().ok_or_else(|| Status::failed_precondition("skew is not measured here"))?;
                let (log, req, health) = (self.served_log.clone(), req.into_inner(), self.health.clone());
                // A replay is a join: admitted like one would be, on the blocking pool.
                blocking(move || {
                    let r = crate::skew::measure(&features, &log, &req, |g| p.may_see(g)).map_err(status)?;
                    health.record_skew(&r, &req, now_us());
                    Ok(Response::new(r))
                })
                .await
            })
            .await
    }

    async fn scan_served_log(
        &self,
        req: Request<pb::ScanServedLogRequest>,
    ) -> Result<Response<Self::ScanServedLogStream>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("ScanServedLog", async move {
                let p = authorize(&req, Scope::Read, std::iter::empty())?;
                let r = req.into_inner();
                let (from, to) =
                    crate::servedlog::served_range(r.from.as_ref(), r.to.as_ref()).map_err(|e| status(e.into()))?;
                let log = self.served_log.clone();
                Ok(Response::new(stream_blocking(self.stopping.clone(), move |emit| {
                    log.scan(from, to, &mut |mut answers| {
                        if p.limited() {
                            // A token limited to groups sees only their features.
                            for a in &mut answers {
                                a.features.retain(|f| p.may_see(auth::group_of(&f.feature_ref)));
                            }
                            answers.retain(|a| !a.features.is_empty());
                            if answers.is_empty() {
                                return true;
                            }
                        }
                        emit(pb::ScanServedLogResponse { answers })
                    })
                    .map_err(ServiceError::Storage)
                })))
            })
            .await
    }

    async fn put_baseline(
        &self,
        req: Request<pb::PutBaselineRequest>,
    ) -> Result<Response<pb::PutBaselineResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("PutBaseline", async move {
                let group = req.get_ref().baseline.as_ref().map(|b| b.group.clone()).unwrap_or_default();
                authorize(&req, Scope::Admin, Some(group.as_str()))?;
                let baseline = req
                    .into_inner()
                    .baseline
                    .ok_or_else(|| Status::invalid_argument("PutBaseline needs a baseline"))?;
                let (registry, health) = (self.registry.clone(), self.health.clone());
                blocking(move || {
                    let stored = crate::drift::put(&registry, baseline, now_us()).map_err(status)?;
                    // Written values are sketched against it from now on.
                    health.watch_group(&stored);
                    Ok(Response::new(pb::PutBaselineResponse { captured_at: stored.captured_at }))
                })
                .await
            })
            .await
    }

    async fn list_baselines(
        &self,
        req: Request<pb::ListBaselinesRequest>,
    ) -> Result<Response<pb::ListBaselinesResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("ListBaselines", async move {
                let group = req.get_ref().group.clone();
                let p = authorize(&req, Scope::Read, (!group.is_empty()).then_some(group.as_str()))?;
                if !group.is_empty() {
                    self.registry.group(&group, 0).map_err(registry_status)?;
                }
                let registry = self.registry.clone();
                blocking(move || {
                    let only = (!group.is_empty()).then_some(group.as_str());
                    let mut baselines = crate::drift::list(registry.db(), only).map_err(status)?;
                    baselines.retain(|b| p.may_see(&b.group));
                    Ok(Response::new(pb::ListBaselinesResponse { baselines }))
                })
                .await
            })
            .await
    }

    async fn measure_drift(
        &self,
        req: Request<pb::MeasureDriftRequest>,
    ) -> Result<Response<pb::MeasureDriftResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("MeasureDrift", async move {
                let group = req.get_ref().group.clone();
                authorize(&req, Scope::Read, Some(group.as_str()))?;
                let (registry, log, req) = (self.registry.clone(), self.served_log.clone(), req.into_inner());
                let health = self.health.clone();
                blocking(move || {
                    crate::drift::measure_one(&registry, &log, &health, &req, now_us())
                        .map(Response::new)
                        .map_err(status)
                })
                .await
            })
            .await
    }

    async fn get_feature_health(
        &self,
        req: Request<pb::GetFeatureHealthRequest>,
    ) -> Result<Response<pb::GetFeatureHealthResponse>, Status> {
        let metrics = self.metrics.clone();
        metrics
            .timed("GetFeatureHealth", async move {
                let group = req.get_ref().group.clone();
                let p = authorize(&req, Scope::Read, (!group.is_empty()).then_some(group.as_str()))?;
                if !group.is_empty() {
                    // An unknown group is NOT_FOUND, not an empty report.
                    self.registry.group(&group, 0).map_err(registry_status)?;
                }
                let health = self.health.clone();
                let (log_answers_written, log_answers_dropped) = self.served_log.counts();
                blocking(move || {
                    let now = now_us();
                    let only = (!group.is_empty()).then_some(group.as_str());
                    let groups = health.report(now, only, |g| p.may_see(g)).map_err(|e| storage_status(&e))?;
                    Ok(Response::new(pb::GetFeatureHealthResponse {
                        now: Some(convert::timestamp(now)),
                        window: Some(prost_types::Duration {
                            seconds: crate::health::HEALTH_WINDOW.as_secs() as i64,
                            nanos: 0,
                        }),
                        groups,
                        log_answers_written,
                        log_answers_dropped,
                    }))
                })
                .await
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn grpc_timeouts_parse_by_the_spec_and_keep_a_reserve() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "100", "123456789m", "1.5S", "-1S", "10x", "10 m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        let now = Instant::now();
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(deadline_of(&m, now).expect("none"), None);
        m.insert("grpc-timeout", "100m".parse().expect("ascii"));
        assert_eq!(deadline_of(&m, now).expect("deadline"), Some(now + Duration::from_millis(99)));
        // A tiny timeout keeps half of itself for the answer.
        m.insert("grpc-timeout", "1000u".parse().expect("ascii"));
        assert_eq!(deadline_of(&m, now).expect("deadline"), Some(now + Duration::from_micros(500)));
        m.insert("grpc-timeout", "soon".parse().expect("ascii"));
        assert_eq!(deadline_of(&m, now).expect_err("bad").code(), tonic::Code::InvalidArgument);
    }
}

/// `ClusterService`: the slot map and the nodes of a sharded region (`server/CLUSTER.md`).
#[derive(Debug, Clone)]
pub struct ClusterApi {
    /// `None`: this node is not sharded.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Moves of slots to and from this node (with `cluster`).
    mover: Option<Arc<crate::moving::Mover>>,
}

impl ClusterApi {
    /// The service of a node, sharded under `cluster` (moving slots with `mover`) or not
    /// (`None`).
    pub fn new(cluster: Option<Arc<crate::cluster::Cluster>>, mover: Option<Arc<crate::moving::Mover>>) -> Self {
        ClusterApi { cluster, mover }
    }

    fn cluster(&self) -> Result<(&Arc<crate::cluster::Cluster>, &Arc<crate::moving::Mover>), Status> {
        match (&self.cluster, &self.mover) {
            (Some(c), Some(m)) => Ok((c, m)),
            _ => Err(Status::failed_precondition("this node is not sharded (start it with --etcd and --node-id)")),
        }
    }
}

#[tonic::async_trait]
impl pb::cluster_service_server::ClusterService for ClusterApi {
    async fn get_cluster_status(
        &self,
        req: Request<pb::GetClusterStatusRequest>,
    ) -> Result<Response<pb::GetClusterStatusResponse>, Status> {
        authorize(&req, Scope::Read, std::iter::empty())?;
        let mut status = self.cluster.as_ref().map(|c| c.status()).unwrap_or_default();
        if let Some(m) = &self.mover {
            status.progress = m.progress();
        }
        Ok(Response::new(status))
    }

    async fn init_slots(&self, req: Request<pb::InitSlotsRequest>) -> Result<Response<pb::InitSlotsResponse>, Status> {
        authorize(&req, Scope::Admin, std::iter::empty())?;
        let (cluster, _) = self.cluster()?;
        let map = cluster.init_slots().await?;
        Ok(Response::new(pb::InitSlotsResponse { map: Some(map.to_pb()) }))
    }

    type MoveSlotsStream = BoxStream<pb::MoveProgress>;

    async fn move_slots(&self, req: Request<pb::MoveSlotsRequest>) -> Result<Response<Self::MoveSlotsStream>, Status> {
        authorize(&req, Scope::Admin, std::iter::empty())?;
        let (_, mover) = self.cluster()?;
        let caller = req.metadata().clone();
        let rx = mover.move_slots(req.get_ref(), caller).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn abort_move(&self, req: Request<pb::AbortMoveRequest>) -> Result<Response<pb::AbortMoveResponse>, Status> {
        authorize(&req, Scope::Admin, std::iter::empty())?;
        let (cluster, _) = self.cluster()?;
        let r = req.get_ref();
        if r.first > r.last || r.last >= u32::from(quiver_storage::slot::SLOTS) {
            return Err(Status::invalid_argument(format!("slots {}..={} are not a range of slots", r.first, r.last)));
        }
        // Both below SLOTS, a u16.
        let map = cluster.abort_move(r.first as u16, r.last as u16).await?;
        tracing::info!(first = r.first, last = r.last, revision = map.revision(), "move aborted");
        Ok(Response::new(pb::AbortMoveResponse { map: Some(map.to_pb()) }))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        authorize(&req, Scope::Admin, std::iter::empty())?;
        let (_, mover) = self.cluster()?;
        let r = mover.remove(req.get_ref()).await?;
        tracing::warn!(node = %req.get_ref().node, head = r.head, pullers = r.pullers, "node removed from the region");
        Ok(Response::new(r))
    }

    type CopySlotsStream = BoxStream<pb::CopySlotsPart>;

    async fn copy_slots(&self, req: Request<pb::CopySlotsRequest>) -> Result<Response<Self::CopySlotsStream>, Status> {
        authorize(&req, Scope::Admin, std::iter::empty())?;
        let (_, mover) = self.cluster()?;
        let rx = mover.copy(req.get_ref()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn slot_log(&self, req: Request<pb::SlotLogRequest>) -> Result<Response<pb::SlotLogResponse>, Status> {
        authorize(&req, Scope::Admin, std::iter::empty())?;
        let (_, mover) = self.cluster()?;
        Ok(Response::new(mover.slot_log(req.get_ref()).await?))
    }

    async fn fence_slots(
        &self,
        req: Request<pb::FenceSlotsRequest>,
    ) -> Result<Response<pb::FenceSlotsResponse>, Status> {
        authorize(&req, Scope::Admin, std::iter::empty())?;
        let (_, mover) = self.cluster()?;
        Ok(Response::new(mover.fence(req.get_ref()).await?))
    }
}
