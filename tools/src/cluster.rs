//! `quiver cluster ...`: a sharded region's slot map and nodes (`server/CLUSTER.md`), through
//! any node's `ClusterService`.

use quiver_proto::v1 as pb;

use crate::common::{grpc, Result, Server};

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
    Ok(())
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
