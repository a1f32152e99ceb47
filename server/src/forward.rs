//! Forwarding (`server/CLUSTER.md` §4): a node of a sharded region accepts any request and
//! sends the entities it does not own to their owners, so that a plain gRPC client works
//! against any node.
//!
//! - An online lookup is split by owner under one map; each part goes to its owner (the local
//!   part is answered here) at the same time, and the answers are merged back into request order.
//! - A write is split by owner the same way. Each part is applied atomically on its shard; the
//!   parts together are not (there is no transaction across shards). A failed part fails the
//!   request, whose message says which shards applied their rows. A retry with the same
//!   idempotency key is applied once per shard as long as the map has not changed (each shard
//!   keeps its own records, of its own part).
//! - A history scan names one entity: it is forwarded whole and its stream passed through.
//! - Joins are refused as before (they split by shard in a later step, §6).
//!
//! **One hop at most.** A forwarded request carries [`FORWARDED_HEADER`] and is never forwarded
//! again: if the map changed on the way, the owner refuses it (`FAILED_PRECONDITION` with
//! `SlotNotOwned`), and that refusal is the caller's answer to retry.
//!
//! A forwarded part carries the caller's `authorization` and `x-request-id`, and the time left
//! of its deadline; the owner authenticates and rate-limits it again (every node of a region
//! holds the same tokens). Channels to other nodes are opened lazily, one per address, kept
//! for the life of the process, and speak TLS when the node does (verifying the others against
//! its CA, `--tls-ca`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quiver_proto::v1 as pb;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::cluster::Remote;

/// The metadata key that marks a forwarded request (its value is `1`).
pub const FORWARDED_HEADER: &str = "quiver-forwarded";
/// Longest wait to connect to another node of the region.
pub const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an idle connection to another node is pinged, and how long its answer may take
/// before the connection is dropped (its calls fail with `UNAVAILABLE`): a stalled owner does
/// not hold a forwarded call for ever when the caller set no deadline.
pub const FORWARD_KEEPALIVE: Duration = Duration::from_secs(10);
/// Metadata of the caller's request that a forwarded part carries.
const CARRIED_HEADERS: [&str; 2] = ["authorization", "x-request-id"];

/// Whether a request was forwarded to this node by another (and so must not be forwarded again).
pub fn is_forwarded(metadata: &MetadataMap) -> bool {
    metadata.contains_key(FORWARDED_HEADER)
}

/// Channels to the other nodes of the region.
#[derive(Debug)]
pub struct Forwarder {
    tls: Option<ClientTlsConfig>,
    message_bytes_max: usize,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Forwarder {
    /// Forwards over TLS with `tls` (verifying other nodes), or in plain text without it;
    /// messages up to `message_bytes_max` bytes each way.
    pub fn new(tls: Option<ClientTlsConfig>, message_bytes_max: usize) -> Forwarder {
        Forwarder { tls, message_bytes_max, channels: Mutex::new(HashMap::new()) }
    }

    fn client(&self, to: &Remote) -> Result<pb::feature_service_client::FeatureServiceClient<Channel>, Status> {
        let channel = self.channel(&to.node, &to.address)?;
        Ok(pb::feature_service_client::FeatureServiceClient::new(channel)
            .max_decoding_message_size(self.message_bytes_max)
            .max_encoding_message_size(self.message_bytes_max))
    }

    /// The channel to node `node` at `address`, opened lazily and kept.
    pub fn channel(&self, node: &str, address: &str) -> Result<Channel, Status> {
        let mut channels = self.channels.lock();
        let channel = match channels.get(address) {
            Some(c) => c.clone(),
            None => {
                let c = self.endpoint(node, address)?.connect_lazy();
                channels.insert(address.to_string(), c.clone());
                c
            }
        };
        Ok(channel)
    }

    /// How this node reaches node `node` at `address`.
    fn endpoint(&self, node: &str, address: &str) -> Result<Endpoint, Status> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|e| Status::unavailable(format!("node {node} has a bad address {address:?}: {e}")))?
            .connect_timeout(FORWARD_CONNECT_TIMEOUT)
            .http2_keep_alive_interval(FORWARD_KEEPALIVE)
            .keep_alive_timeout(FORWARD_KEEPALIVE)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| Status::unavailable(format!("TLS toward node {node}: {e}")))?;
        }
        Ok(endpoint)
    }

    /// Sends an online lookup's part to its owner; an answer over `answer_max` bytes is
    /// refused as it arrives.
    pub async fn online(
        &self,
        caller: &MetadataMap,
        deadline: Option<Instant>,
        to: &Remote,
        part: pb::GetOnlineFeaturesRequest,
        answer_max: usize,
    ) -> Result<pb::GetOnlineFeaturesResponse, Status> {
        let mut client = self.client(to)?.max_decoding_message_size(answer_max.min(self.message_bytes_max));
        let r = client.get_online_features(outgoing(caller, deadline, part)).await;
        r.map(tonic::Response::into_inner).map_err(|s| from_owner(to, s))
    }

    /// Sends a write's part to its owner.
    pub async fn write(
        &self,
        caller: &MetadataMap,
        deadline: Option<Instant>,
        to: &Remote,
        part: pb::WriteFeaturesRequest,
    ) -> Result<pb::WriteFeaturesResponse, Status> {
        let mut client = self.client(to)?;
        let r = client.write_features(outgoing(caller, deadline, part)).await;
        r.map(tonic::Response::into_inner).map_err(|s| from_owner(to, s))
    }

    /// Sends a join's part (its spine rows) to their owner; its stream of chunks, in the
    /// part's order.
    pub async fn join(
        &self,
        caller: &MetadataMap,
        deadline: Option<Instant>,
        to: &Remote,
        part: pb::GetHistoricalFeaturesRequest,
    ) -> Result<tonic::Streaming<pb::GetHistoricalFeaturesResponse>, Status> {
        // A connection of its own: a part read slowly (its rows come later in the spine) holds
        // its flow-control window, which on the shared connection would stall every lookup
        // and write this node forwards to the owner.
        let channel = self.endpoint(&to.node, &to.address)?.connect_lazy();
        let mut client = pb::feature_service_client::FeatureServiceClient::new(channel)
            .max_decoding_message_size(self.message_bytes_max)
            .max_encoding_message_size(self.message_bytes_max);
        let r = client.get_historical_features(outgoing(caller, deadline, part)).await;
        r.map(tonic::Response::into_inner).map_err(|s| from_owner(to, s))
    }

    /// Sends a history scan to its owner; its stream, as the owner sends it.
    pub async fn scan(
        &self,
        caller: &MetadataMap,
        deadline: Option<Instant>,
        to: &Remote,
        req: pb::ScanHistoryRequest,
    ) -> Result<tonic::Streaming<pb::ScanHistoryResponse>, Status> {
        let mut client = self.client(to)?;
        let r = client.scan_history(outgoing(caller, deadline, req)).await;
        r.map(tonic::Response::into_inner).map_err(|s| from_owner(to, s))
    }
}

/// A request made on behalf of the caller (a move's calls to its source): the caller's
/// credentials and request id go with it.
pub fn carried<T>(caller: &MetadataMap, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    for key in CARRIED_HEADERS {
        if let Some(v) = caller.get(key) {
            req.metadata_mut().insert(key, v.clone());
        }
    }
    req
}

/// A part of the caller's request, as sent to its owner.
fn outgoing<T>(caller: &MetadataMap, deadline: Option<Instant>, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    for key in CARRIED_HEADERS {
        if let Some(v) = caller.get(key) {
            req.metadata_mut().insert(key, v.clone());
        }
    }
    req.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
    if let Some(d) = deadline {
        // The time left (at least 1 µs): the owner plans its reads by it, and the call ends
        // with it, `DEADLINE_EXCEEDED` or `CANCELLED` if the owner has not answered by then.
        req.set_timeout(d.saturating_duration_since(Instant::now()).max(Duration::from_micros(1)));
    }
    req
}

/// The owner's refusal or failure, saying which node it came from, its code and details kept.
fn from_owner(to: &Remote, s: Status) -> Status {
    let message = format!("forwarded to node {} at {}: {}", to.node, to.address, s.message());
    Status::with_details(s.code(), message, s.details().to_vec().into())
}

/// The items of `all` at `rows` (positions a split made of `all`, so all within it).
pub fn subset<T: Clone>(all: &[T], rows: &[usize]) -> Vec<T> {
    rows.iter().map(|&i| all[i].clone()).collect()
}

/// Whether a forwarded part failed only because its deadline passed (the caller's deadline,
/// carried to the owner, ran out on the way or at the owner).
pub fn timed_out(s: &Status) -> bool {
    matches!(s.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled)
}

/// Whether `s` refuses a slot its node does not own (`SlotNotOwned` details).
pub fn is_not_owned(s: &Status) -> bool {
    use prost::Message;
    s.code() == tonic::Code::FailedPrecondition
        && s.message().starts_with("slot ")
        && pb::SlotNotOwned::decode(s.details()).is_ok_and(|d| !d.owner.is_empty())
}

/// Calls the macro `$apply` with every typed value list of a `FeatureColumn` (the one list of
/// them for the merges here).
macro_rules! value_fields {
    ($apply:ident) => {
        $apply!(
            bool_values,
            int64_values,
            float32_values,
            float64_values,
            string_values,
            bytes_values,
            float32_vector_values,
            int64_list_values,
            string_list_values
        )
    };
}

/// Puts the answers of a lookup's parts back into request order: `parts` holds each part's
/// positions in the request (of `n` entities) and its answer.
pub fn merge_online(
    n: usize,
    parts: Vec<(&[usize], pb::GetOnlineFeaturesResponse)>,
) -> Result<pb::GetOnlineFeaturesResponse, Status> {
    let mut merged: Vec<pb::FeatureColumn> = Vec::new();
    for (k, (rows, answer)) in parts.into_iter().enumerate() {
        if k == 0 {
            merged = answer
                .columns
                .iter()
                .map(|c| pb::FeatureColumn {
                    feature_ref: c.feature_ref.clone(),
                    group_version: c.group_version,
                    r#type: c.r#type,
                    statuses: vec![0; n],
                    event_times_us: vec![0; n],
                    ..Default::default()
                })
                .collect();
        }
        if answer.columns.len() != merged.len() {
            return Err(Status::internal(format!(
                "a shard answered {} features where another answered {}",
                answer.columns.len(),
                merged.len()
            )));
        }
        for (out, mut col) in merged.iter_mut().zip(answer.columns) {
            if col.group_version != out.group_version || col.r#type != out.r#type {
                return Err(Status::unavailable(format!(
                    "shards serve different versions of {} ({} and {}): a promotion is reaching them; retry",
                    out.feature_ref, out.group_version, col.group_version
                )));
            }
            if col.statuses.len() != rows.len() || col.event_times_us.len() != rows.len() {
                return Err(Status::internal(format!(
                    "a shard answered {} rows of {} for {} entities",
                    col.statuses.len(),
                    out.feature_ref,
                    rows.len()
                )));
            }
            scatter(&mut out.statuses, n, rows, std::mem::take(&mut col.statuses))?;
            scatter(&mut out.event_times_us, n, rows, std::mem::take(&mut col.event_times_us))?;
            macro_rules! values {
                ($($field:ident),*) => {$(
                    if !col.$field.is_empty() {
                        scatter(&mut out.$field, n, rows, std::mem::take(&mut col.$field))?;
                    }
                )*};
            }
            value_fields!(values);
        }
    }
    Ok(pb::GetOnlineFeaturesResponse { columns: merged })
}

/// Writes a part's `values` (one per position of `rows`) at those positions of `out`, a column
/// of `n` rows (sized on first use).
fn scatter<T: Clone + Default>(out: &mut Vec<T>, n: usize, rows: &[usize], values: Vec<T>) -> Result<(), Status> {
    if values.len() != rows.len() {
        return Err(Status::internal(format!("a shard answered {} values for {} entities", values.len(), rows.len())));
    }
    if out.is_empty() {
        *out = vec![T::default(); n];
    }
    for (v, &i) in values.into_iter().zip(rows) {
        let slot = out.get_mut(i).ok_or_else(|| Status::internal(format!("row {i} is past the request's {n}")))?;
        *slot = v;
    }
    Ok(())
}

/// The chunks of one part of a join, in the part's order.
pub type JoinPart =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::GetHistoricalFeaturesResponse, Status>> + Send>>;

/// A part of a join being merged: its stream and the chunk it is in.
struct PartCursor {
    stream: JoinPart,
    columns: Vec<pb::FeatureColumn>,
    /// The next row of `columns` to take, and how many rows they hold.
    pos: usize,
    len: usize,
    /// Rows of the part received so far (the next chunk's `first_row`).
    received: u64,
}

/// Merges the streams of a join's parts back into spine order, as they arrive: `parts` holds
/// each part's positions in the spine (of `n` rows, ascending) and its stream; chunks of
/// `chunk_rows` rows go out in order. Only the chunk each part is in, and the one being built,
/// are held. A part's failure ends the merged stream with it; parts that disagree on the
/// answer's shape (a promotion reaching the owners at different moments) end it with
/// `UNAVAILABLE`.
pub fn merge_join(
    n: usize,
    parts: Vec<(Vec<usize>, JoinPart)>,
    chunk_rows: usize,
) -> tokio::sync::mpsc::Receiver<Result<pb::GetHistoricalFeaturesResponse, Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        if let Err(e) = merge_join_into(n, parts, chunk_rows.max(1), &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    rx
}

async fn merge_join_into(
    n: usize,
    parts: Vec<(Vec<usize>, JoinPart)>,
    chunk_rows: usize,
    tx: &tokio::sync::mpsc::Sender<Result<pb::GetHistoricalFeaturesResponse, Status>>,
) -> Result<(), Status> {
    use futures::StreamExt;
    let mut owner = vec![usize::MAX; n];
    let mut cursors = Vec::with_capacity(parts.len());
    for (p, (rows, stream)) in parts.into_iter().enumerate() {
        for i in rows {
            let slot = owner.get_mut(i).ok_or_else(|| Status::internal(format!("row {i} is past the spine's {n}")))?;
            *slot = p;
        }
        cursors.push(PartCursor { stream, columns: Vec::new(), pos: 0, len: 0, received: 0 });
    }
    if let Some(i) = owner.iter().position(|&p| p == usize::MAX) {
        return Err(Status::internal(format!("spine row {i} is in no part")));
    }
    // The answer's shape, from the first chunk: (feature, group version, type) per column.
    let mut shape: Option<Vec<(String, u32, i32)>> = None;
    let mut out: Vec<pb::FeatureColumn> = Vec::new();
    let mut first_row = 0u64;
    for (i, &p) in owner.iter().enumerate() {
        let c = &mut cursors[p];
        while c.pos >= c.len {
            let chunk = match c.stream.next().await {
                Some(chunk) => chunk?,
                None => {
                    return Err(Status::unavailable(format!(
                        "a shard's part of the join ended early (before spine row {i})"
                    )))
                }
            };
            if chunk.first_row != c.received {
                return Err(Status::internal(format!(
                    "a shard sent rows from {} where {} came next",
                    chunk.first_row, c.received
                )));
            }
            let got: Vec<(String, u32, i32)> =
                chunk.columns.iter().map(|col| (col.feature_ref.clone(), col.group_version, col.r#type)).collect();
            match &shape {
                None => shape = Some(got),
                Some(want) if *want != got => {
                    return Err(Status::unavailable(
                        "shards answer the join with different versions of its features (a promotion is reaching them); retry",
                    ))
                }
                Some(_) => {}
            }
            c.len = chunk.columns.first().map_or(0, |col| col.statuses.len());
            if c.len == 0 {
                return Err(Status::internal("a shard sent a chunk of no rows"));
            }
            c.received += c.len as u64;
            c.columns = chunk.columns;
            c.pos = 0;
        }
        if out.is_empty() {
            out = shape
                .iter()
                .flatten()
                .map(|(feature_ref, group_version, r#type)| pb::FeatureColumn {
                    feature_ref: feature_ref.clone(),
                    group_version: *group_version,
                    r#type: *r#type,
                    ..Default::default()
                })
                .collect();
        }
        for (dst, src) in out.iter_mut().zip(&c.columns) {
            push_row(dst, src, c.pos)?;
        }
        c.pos += 1;
        let rows = out.first().map_or(0, |col| col.statuses.len());
        if rows == chunk_rows || i + 1 == n {
            let columns = std::mem::take(&mut out);
            if tx.send(Ok(pb::GetHistoricalFeaturesResponse { first_row, columns })).await.is_err() {
                return Ok(());
            }
            first_row += rows as u64;
        }
    }
    Ok(())
}

/// Appends row `pos` of `src` to `dst` (a column of the same feature).
fn push_row(dst: &mut pb::FeatureColumn, src: &pb::FeatureColumn, pos: usize) -> Result<(), Status> {
    let r = dst.statuses.len();
    let bad = || Status::internal(format!("a shard's chunk of {} has no row {pos}", src.feature_ref));
    dst.statuses.push(*src.statuses.get(pos).ok_or_else(bad)?);
    dst.event_times_us.push(*src.event_times_us.get(pos).ok_or_else(bad)?);
    macro_rules! values {
        ($($field:ident),*) => {$(
            if let Some(v) = src.$field.get(pos) {
                if dst.$field.len() < r {
                    dst.$field.resize(r, Default::default());
                }
                dst.$field.push(v.clone());
            } else if !dst.$field.is_empty() {
                dst.$field.push(Default::default());
            }
        )*};
    }
    value_fields!(values);
    Ok(())
}

/// One answer for a write whose parts were applied on several shards: the values written
/// summed, the latest system time, deduplicated only if every part was. `version` is left
/// empty: each shard stamped its own (read the cells back for a compare-and-swap).
pub fn merge_writes(parts: &[pb::WriteFeaturesResponse]) -> pb::WriteFeaturesResponse {
    if let [one] = parts {
        return one.clone();
    }
    let system_time = parts.iter().filter_map(|p| p.system_time).max_by_key(|t| (t.seconds, t.nanos));
    pb::WriteFeaturesResponse {
        values_written: parts.iter().map(|p| p.values_written).sum(),
        system_time,
        deduplicated: !parts.is_empty() && parts.iter().all(|p| p.deduplicated),
        version: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(version: u32, statuses: Vec<i32>, ints: Vec<i64>) -> pb::FeatureColumn {
        pb::FeatureColumn {
            feature_ref: "g:f".into(),
            group_version: version,
            r#type: pb::ValueType::Int64 as i32,
            event_times_us: ints.iter().map(|v| v * 10).collect(),
            statuses,
            int64_values: ints,
            ..Default::default()
        }
    }

    #[test]
    fn parts_merge_back_into_request_order() {
        let a = pb::GetOnlineFeaturesResponse { columns: vec![col(1, vec![1, 2], vec![5, 7])] };
        let b = pb::GetOnlineFeaturesResponse { columns: vec![col(1, vec![1, 1, 3], vec![4, 6, 9])] };
        let merged = merge_online(5, vec![(&[1, 3][..], a), (&[0, 2, 4][..], b)]).expect("merges");
        assert_eq!(merged.columns, vec![col(1, vec![1, 1, 1, 2, 3], vec![4, 5, 6, 7, 9])]);
    }

    #[test]
    fn parts_that_disagree_are_refused() {
        let a = pb::GetOnlineFeaturesResponse { columns: vec![col(1, vec![1], vec![5])] };
        let b = pb::GetOnlineFeaturesResponse { columns: vec![col(2, vec![1], vec![4])] };
        let e = merge_online(2, vec![(&[0][..], a.clone()), (&[1][..], b)]).expect_err("versions differ");
        assert_eq!(e.code(), tonic::Code::Unavailable);
        let short = pb::GetOnlineFeaturesResponse { columns: vec![col(1, vec![1], vec![4])] };
        let e = merge_online(3, vec![(&[0][..], a.clone()), (&[1, 2][..], short)]).expect_err("a row is missing");
        assert_eq!(e.code(), tonic::Code::Internal);
        let none = pb::GetOnlineFeaturesResponse { columns: vec![] };
        let e = merge_online(2, vec![(&[0][..], a), (&[1][..], none)]).expect_err("a column is missing");
        assert_eq!(e.code(), tonic::Code::Internal);
    }

    #[test]
    fn writes_merge_their_counts_and_latest_stamp() {
        let at = |s| Some(prost_types::Timestamp { seconds: s, nanos: 0 });
        let one =
            pb::WriteFeaturesResponse { values_written: 3, system_time: at(5), deduplicated: true, version: None };
        let two = pb::WriteFeaturesResponse { values_written: 4, system_time: at(9), ..Default::default() };
        let m = merge_writes(&[one.clone(), two]);
        assert_eq!((m.values_written, m.system_time, m.deduplicated, m.version), (7, at(9), false, None));
        assert_eq!(merge_writes(std::slice::from_ref(&one)), one);
    }

    #[test]
    fn a_part_carries_the_callers_credentials_and_the_mark() {
        let mut caller = MetadataMap::new();
        caller.insert("authorization", "Bearer qvt_x".parse().expect("ascii"));
        caller.insert("x-request-id", "r-1".parse().expect("ascii"));
        caller.insert("other", "no".parse().expect("ascii"));
        let req = outgoing(&caller, None, ());
        assert!(is_forwarded(req.metadata()));
        assert_eq!(req.metadata().get("authorization").map(|v| v.as_bytes()), Some(&b"Bearer qvt_x"[..]));
        assert_eq!(req.metadata().get("x-request-id").map(|v| v.as_bytes()), Some(&b"r-1"[..]));
        assert!(req.metadata().get("other").is_none());
        assert!(!is_forwarded(&caller));
    }
}
