//! `quiver cluster ...`: a sharded region's slot map and nodes (`server/CLUSTER.md`), through
//! any node's `ClusterService`.

use std::time::Duration;

use quiver_proto::v1 as pb;

use crate::common::{grpc, Result, Server};

/// How many times `quiver cluster move` resumes a move after the target or the source was
/// unreachable, unless `--retries` says otherwise.
pub const MOVE_RETRIES_DEFAULT: u32 = 10;
/// The wait before resuming a move the first time; it doubles up to [`MOVE_RETRY_WAIT_MAX`].
pub const MOVE_RETRY_WAIT_MIN: Duration = Duration::from_millis(500);
/// The longest wait before resuming a move.
pub const MOVE_RETRY_WAIT_MAX: Duration = Duration::from_secs(8);

/// `quiver cluster status`: the nodes, how many slots each owns, and the map's runs.
pub async fn status(server: &Server, json: bool) -> Result<()> {
    let mut c = pb::cluster_service_client::ClusterServiceClient::new(server.channel().await?);
    let s = c.get_cluster_status(pb::GetClusterStatusRequest {}).await.map_err(grpc)?.into_inner();
    let map = s.map.unwrap_or_default();
    if json {
        let line = serde_json::json!({
            "sharded": s.sharded,
            "node": s.node,
            "cluster": s.cluster,
            "etcd_connected": s.etcd_connected,
            "etcd_error": s.etcd_error,
            "map_revision": map.revision,
            "nodes": s.nodes.iter().map(|n| serde_json::json!({
                "node": n.node, "addr": n.addr, "region": n.region, "live": n.live, "slots": n.slots,
            })).collect::<Vec<_>>(),
            "runs": map.runs.iter().map(|r| serde_json::json!({
                "first": r.first, "last": r.last, "owner": r.owner, "epoch": r.epoch,
            })).collect::<Vec<_>>(),
            "moves": map.moves.iter().map(move_json).collect::<Vec<_>>(),
            "progress": s.progress.iter().map(progress_json).collect::<Vec<_>>(),
            "removed": s.removed,
        });
        println!("{line}");
        return Ok(());
    }
    if !s.sharded {
        println!("not sharded: this node owns every entity");
        return Ok(());
    }
    let etcd = if s.etcd_connected { "connected".to_string() } else { format!("NOT connected ({})", s.etcd_error) };
    let revision =
        if map.revision == 0 { "none yet (quiver cluster init)".to_string() } else { map.revision.to_string() };
    println!("cluster {}; asked node {}; etcd {etcd}; map revision {revision}", s.cluster, s.node);
    println!("{:<20} {:<24} {:>6} {:>5} {:>6}", "node", "address", "region", "live", "slots");
    for n in &s.nodes {
        let live = if n.live { "yes" } else { "no" };
        println!("{:<20} {:<24} {:>6} {:>5} {:>6}", n.node, n.addr, n.region, live, n.slots);
    }
    if !map.runs.is_empty() {
        println!("{:<12} {:<20} {:>6}", "slots", "owner", "epoch");
        for r in &map.runs {
            println!("{:<12} {:<20} {:>6}", format!("{}..={}", r.first, r.last), r.owner, r.epoch);
        }
    }
    for m in &map.moves {
        println!("moving slots {}..={} from {} to {}: {}", m.first, m.last, m.from, m.to, state_name(m.state));
    }
    for p in &s.progress {
        println!("{}", progress_line(p));
    }
    if !s.removed.is_empty() {
        println!("removed from the region: {}", s.removed.join(", "));
    }
    Ok(())
}

fn state_name(state: i32) -> &'static str {
    match pb::MoveState::try_from(state) {
        Ok(pb::MoveState::Copying) => "copying",
        Ok(pb::MoveState::Fenced) => "fenced (writes to these slots wait for the switch)",
        _ => "unknown",
    }
}

fn move_json(m: &pb::SlotMove) -> serde_json::Value {
    serde_json::json!({
        "first": m.first, "last": m.last, "from": m.from, "to": m.to,
        "state": match pb::MoveState::try_from(m.state) {
            Ok(pb::MoveState::Copying) => "copying",
            Ok(pb::MoveState::Fenced) => "fenced",
            _ => "unknown",
        },
    })
}

fn progress_json(p: &pb::MoveProgress) -> serde_json::Value {
    serde_json::json!({
        "move": p.moving.as_ref().map(move_json),
        "phase": p.phase,
        "versions_copied": p.versions_copied,
        "versions_caught_up": p.versions_caught_up,
        "source_cursor": p.source_cursor,
        "lag_batches": p.lag_batches,
        "copies": p.copies,
        "switched_revision": p.switched_revision,
        "error": p.error,
    })
}

fn progress_line(p: &pb::MoveProgress) -> String {
    let m = p.moving.clone().unwrap_or_default();
    let mut line = format!(
        "move of slots {}..={} from {} to {}: {}; {} versions copied, {} caught up; source log at {}, {} batches behind",
        m.first, m.last, m.from, m.to, p.phase, p.versions_copied, p.versions_caught_up, p.source_cursor, p.lag_batches
    );
    if p.switched_revision != 0 {
        line.push_str(&format!("; switched at map revision {}", p.switched_revision));
    }
    if !p.error.is_empty() {
        line.push_str(&format!("; error: {}", p.error));
    }
    line
}

/// Parses `A..B` (both included), `A..=B` or `A` into slots.
pub fn parse_slots(s: &str) -> Result<(u32, u32)> {
    let bad =
        || format!("--slots {s:?}: give A..B (both included) or one slot A, below {}", quiver_storage::slot::SLOTS);
    let num = |t: &str| t.trim().parse::<u32>().map_err(|_| bad());
    let (first, last) = match s.split_once("..") {
        Some((a, b)) => (num(a)?, num(b.strip_prefix('=').unwrap_or(b))?),
        None => (num(s)?, num(s)?),
    };
    if first > last || last >= u32::from(quiver_storage::slot::SLOTS) {
        return Err(bad());
    }
    Ok((first, last))
}

/// The server at another node's advertised address, with the same credentials.
fn node_at(server: &Server, addr: &str) -> Server {
    let scheme = if server.addr.starts_with("https://") { "https" } else { "http" };
    Server { addr: format!("{scheme}://{addr}"), ..server.clone() }
}

/// `quiver cluster move --abort`: removes a move that has not switched.
pub async fn abort(server: &Server, json: bool, first: u32, last: u32) -> Result<()> {
    let mut c = pb::cluster_service_client::ClusterServiceClient::new(server.channel().await?);
    let r = c.abort_move(pb::AbortMoveRequest { first, last }).await.map_err(grpc)?.into_inner();
    let revision = r.map.map_or(0, |m| m.revision);
    if json {
        println!("{}", serde_json::json!({ "aborted": { "first": first, "last": last }, "map_revision": revision }));
    } else {
        println!("move of slots {first}..={last} aborted at map revision {revision}; the owner takes writes again");
    }
    Ok(())
}

/// `quiver cluster move`: asks the target to run the move, printing its progress, and
/// resumes it (up to `retries` times) when the target or the source was out of reach.
pub async fn move_slots(server: &Server, json: bool, first: u32, last: u32, to: &str, retries: u32) -> Result<()> {
    let mut wait = MOVE_RETRY_WAIT_MIN;
    let mut attempt = 0;
    loop {
        match move_once(server, json, first, last, to).await {
            Ok(()) => return Ok(()),
            Err((code, e)) if attempt < retries && matches!(code, tonic::Code::Unavailable | tonic::Code::Unknown) => {
                attempt += 1;
                eprintln!("quiver: {e}; resuming the move in {} ms ({attempt}/{retries})", wait.as_millis());
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MOVE_RETRY_WAIT_MAX);
            }
            Err((_, e)) => return Err(e),
        }
    }
}

/// One `MoveSlots` call to the target; a failure with its code (`UNAVAILABLE` also when a
/// node cannot be reached at all).
async fn move_once(
    server: &Server,
    json: bool,
    first: u32,
    last: u32,
    to: &str,
) -> std::result::Result<(), (tonic::Code, String)> {
    let unreachable = |e: String| (tonic::Code::Unavailable, e);
    let status = |e: tonic::Status| (e.code(), grpc(e));
    let mut c = pb::cluster_service_client::ClusterServiceClient::new(server.channel().await.map_err(unreachable)?);
    let s = c.get_cluster_status(pb::GetClusterStatusRequest {}).await.map_err(status)?.into_inner();
    let Some(target) = s.nodes.iter().find(|n| n.node == to) else {
        return Err((tonic::Code::FailedPrecondition, format!("no node {to:?} in the cluster")));
    };
    if target.addr.is_empty() || !target.live {
        return Err(unreachable(format!("node {to:?} is not registered in etcd now (is it running?)")));
    }
    let target = node_at(server, &target.addr);
    let mut c = pb::cluster_service_client::ClusterServiceClient::new(target.channel().await.map_err(unreachable)?);
    let req = pb::MoveSlotsRequest { first, last, to: to.to_string() };
    let mut stream = c.move_slots(req).await.map_err(status)?.into_inner();
    let mut last_phase = String::new();
    while let Some(p) = stream.message().await.map_err(status)? {
        if json {
            println!("{}", progress_json(&p));
        } else if p.phase != last_phase || p.phase == "catch-up" {
            println!("{}", progress_line(&p));
        }
        last_phase = p.phase.clone();
        if p.phase == "done" {
            return Ok(());
        }
    }
    Err(unreachable(format!("node {to:?} ended the move's stream before the switch")))
}

/// `quiver cluster init`: spread every slot over the nodes registered now.
pub async fn init(server: &Server, json: bool) -> Result<()> {
    let mut c = pb::cluster_service_client::ClusterServiceClient::new(server.channel().await?);
    let r = c.init_slots(pb::InitSlotsRequest {}).await.map_err(grpc)?.into_inner();
    let map = r.map.unwrap_or_default();
    if json {
        println!("{}", serde_json::json!({ "map_revision": map.revision, "runs": map.runs.len() }));
    } else {
        println!("slot map created at revision {}: {} runs", map.revision, map.runs.len());
        for r in &map.runs {
            println!("  slots {}..={} -> {} (epoch {})", r.first, r.last, r.owner, r.epoch);
        }
    }
    Ok(())
}

/// Prints a plan's moves, one line (or JSON object) each.
fn print_plan(plan: &[quiver_server::cluster::PlannedMove], json: bool) {
    for m in plan {
        if json {
            let line = serde_json::json!({ "plan": { "first": m.first, "last": m.last, "from": m.from, "to": m.to } });
            println!("{line}");
        } else {
            println!("plan: slots {}..={} from {} to {}", m.first, m.last, m.from, m.to);
        }
    }
}

/// `quiver cluster rebalance`: plans the moves that even the slots out over the live nodes
/// (`quiver_server::cluster::plan_rebalance`) and runs them one after another.
pub async fn rebalance(server: &Server, json: bool, dry_run: bool, retries: u32) -> Result<()> {
    let mut c = pb::cluster_service_client::ClusterServiceClient::new(server.channel().await?);
    let s = c.get_cluster_status(pb::GetClusterStatusRequest {}).await.map_err(grpc)?.into_inner();
    if !s.sharded {
        return Err("this node is not sharded: there is nothing to rebalance".into());
    }
    let map = quiver_server::cluster::SlotMap::from_pb(&s.map.unwrap_or_default())?;
    let live: Vec<String> = s.nodes.iter().filter(|n| n.live).map(|n| n.node.clone()).collect();
    let plan = quiver_server::cluster::plan_rebalance(&map, &live)?;
    print_plan(&plan, json);
    if plan.is_empty() && !json {
        println!("the slots are even over {} nodes: nothing to move", live.len());
    }
    if dry_run {
        return Ok(());
    }
    for m in &plan {
        move_slots(server, json, u32::from(m.first), u32::from(m.last), &m.to, retries).await?;
    }
    if !json && !plan.is_empty() {
        println!("rebalanced over {} nodes: {} moves", live.len(), plan.len());
    }
    Ok(())
}

/// `quiver cluster remove`: moves every slot of `node` to the other live nodes
/// (`quiver_server::cluster::plan_removal`), one move after another, then asks `node` to
/// leave the region (`RemoveNode`: it waits until every peer node has pulled its stream).
pub async fn remove(server: &Server, json: bool, node: &str, dry_run: bool, retries: u32) -> Result<()> {
    let mut c = pb::cluster_service_client::ClusterServiceClient::new(server.channel().await?);
    let s = c.get_cluster_status(pb::GetClusterStatusRequest {}).await.map_err(grpc)?.into_inner();
    if !s.sharded {
        return Err("this node is not sharded: there is no region to remove a node from".into());
    }
    if s.removed.iter().any(|r| r == node) {
        return Err(format!("node {node:?} was removed already"));
    }
    let Some(leaving) = s.nodes.iter().find(|n| n.node == node) else {
        return Err(format!("no node {node:?} in the cluster"));
    };
    if leaving.addr.is_empty() || !leaving.live {
        return Err(format!(
            "node {node:?} is not registered in etcd now: a node is removed while it runs, so that its peers can \
             pull the rest of its stream (start it again)"
        ));
    }
    let address = leaving.addr.clone();
    let map = quiver_server::cluster::SlotMap::from_pb(&s.map.unwrap_or_default())?;
    let live: Vec<String> = s.nodes.iter().filter(|n| n.live).map(|n| n.node.clone()).collect();
    let plan = quiver_server::cluster::plan_removal(&map, &live, node)?;
    print_plan(&plan, json);
    if dry_run {
        return Ok(());
    }
    for m in &plan {
        move_slots(server, json, u32::from(m.first), u32::from(m.last), &m.to, retries).await?;
    }
    if !json {
        println!("{node} owns no slot: waiting for every peer node to pull its stream");
    }
    // Asked again (as a move is resumed) while the peers are still pulling its stream
    // (`UNAVAILABLE`) or the map changed meanwhile (`ABORTED`).
    let target = node_at(server, &address);
    let mut c = pb::cluster_service_client::ClusterServiceClient::new(target.channel().await?);
    let (mut wait, mut attempt) = (MOVE_RETRY_WAIT_MIN, 0);
    let r = loop {
        match c.remove_node(pb::RemoveNodeRequest { node: node.to_string() }).await {
            Ok(r) => break r.into_inner(),
            // An earlier call removed it, and its answer was lost.
            Err(e)
                if attempt > 0
                    && e.code() == tonic::Code::FailedPrecondition
                    && e.message().contains("removed already") =>
            {
                if !json {
                    println!("node {node} removed (by the call before, whose answer was lost); stop its process now");
                }
                return Ok(());
            }
            Err(e) if attempt < retries && matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Aborted) => {
                attempt += 1;
                eprintln!("quiver: {}; asking again in {} ms ({attempt}/{retries})", grpc(e), wait.as_millis());
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MOVE_RETRY_WAIT_MAX);
            }
            Err(e) => return Err(grpc(e)),
        }
    };
    if json {
        println!("{}", serde_json::json!({ "removed": node, "head": r.head, "pullers": r.pullers }));
    } else {
        println!(
            "node {node} removed: {} peer nodes had pulled its stream through batch {}; stop its process now",
            r.pullers, r.head
        );
    }
    Ok(())
}
