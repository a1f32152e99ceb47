//! Operating a running server: `quiver admin ...` and `quiver replication ...`.

use quiver_proto::v1 as pb;

use crate::common::{entity_key, fetch_entity_type, grpc, Result, Server};
use crate::{AdminCmd, ReplicationCmd};

/// `quiver admin ...`.
pub async fn admin(server: &Server, cmd: AdminCmd) -> Result<()> {
    let mut c = pb::admin_service_client::AdminServiceClient::new(server.channel().await?);
    match cmd {
        AdminCmd::Stats => {
            let s = c.get_stats(pb::GetStatsRequest {}).await.map_err(grpc)?.into_inner();
            for l in &s.levels {
                println!("L{}: {} tables, {} bytes, {} entries", l.level, l.tables, l.bytes, l.entries);
            }
            println!(
                "memtable {} bytes, {} immutable; last sequence {}; {} flushes, {} compactions; {} write groups, {} WAL syncs; block cache {} hits / {} misses, {} bytes",
                s.memtable_bytes, s.immutable_memtables, s.last_sequence, s.flushes, s.compactions, s.write_groups, s.wal_syncs,
                s.block_cache_hits, s.block_cache_misses, s.block_cache_bytes
            );
            println!(
                "hot tier {} hits / {} misses (pairs), {} fills, {} evictions; {} entities, {} bytes",
                s.hot_tier_hits,
                s.hot_tier_misses,
                s.hot_tier_fills,
                s.hot_tier_evictions,
                s.hot_tier_entries,
                s.hot_tier_bytes
            );
            println!(
                "tiles {} hits / {} misses, {} removed by writes; {} tiles, {} bytes",
                s.tile_hits, s.tile_misses, s.tile_invalidations, s.tile_entries, s.tile_bytes
            );
            println!(
                "ssd tier: {}{}; {} block reads in {} rounds, {} bytes",
                s.io_backend,
                if s.direct_reads { " (O_DIRECT)" } else { "" },
                s.ssd_block_reads,
                s.ssd_read_rounds,
                s.ssd_bytes_read
            );
        }
        AdminCmd::Flush => {
            c.flush(pb::FlushRequest {}).await.map_err(grpc)?;
            println!("flushed");
        }
        AdminCmd::Compact { full, entity_type, from, to } => {
            let range = match (entity_type, from) {
                (Some(entity_type), Some(from)) => {
                    let et = fetch_entity_type(&server.channel().await?, &entity_type).await?;
                    let start = Some(entity_key(&et, &from)?);
                    let end = to.map(|t| entity_key(&et, &t)).transpose()?;
                    Some(pb::EntityRange { entity_type, start, end })
                }
                _ => None,
            };
            c.compact(pb::CompactRequest { full, range }).await.map_err(grpc)?;
            println!("compacted");
        }
        AdminCmd::Verify => {
            let v = c.verify(pb::VerifyRequest {}).await.map_err(grpc)?.into_inner();
            println!("ok: {} tables, {} entries verified", v.tables, v.entries);
        }
        AdminCmd::Checkpoint { path } => {
            c.checkpoint(pb::CheckpointRequest { path: path.clone() }).await.map_err(grpc)?;
            println!("checkpoint written to {path}");
        }
    }
    Ok(())
}

/// `quiver replication ...`: the server's replication status, or one peer's after pausing,
/// resuming or re-bootstrapping it.
pub async fn replication(server: &Server, cmd: ReplicationCmd) -> Result<()> {
    let mut c = pb::admin_service_client::AdminServiceClient::new(server.channel().await?);
    let peer = match cmd {
        ReplicationCmd::Status => {
            let s = c.get_replication_status(pb::GetReplicationStatusRequest {}).await.map_err(grpc)?;
            let s = s.into_inner();
            let k: Vec<String> = s
                .knowledge
                .map(|k| k.entries.iter().map(|e| format!("{}:{}", e.region, e.counter)).collect())
                .unwrap_or_default();
            println!(
                "region {}; last sequence {}; {} conflicts; knows [{}]",
                s.region,
                s.last_seqno,
                s.conflicts,
                k.join(", ")
            );
            if s.peers.is_empty() {
                println!("no peers: replication is off");
            } else {
                println!("{PEER_HEADER}");
                for p in &s.peers {
                    print_peer(p);
                }
            }
            None
        }
        ReplicationCmd::Pause { region } => {
            Some(c.pause_replication(pb::PeerRequest { region }).await.map_err(grpc)?.into_inner())
        }
        ReplicationCmd::Resume { region } => {
            Some(c.resume_replication(pb::PeerRequest { region }).await.map_err(grpc)?.into_inner())
        }
        ReplicationCmd::Rebootstrap { region } => {
            Some(c.rebootstrap_replication(pb::PeerRequest { region }).await.map_err(grpc)?.into_inner())
        }
    };
    if let Some(p) = peer.and_then(|r| r.peer) {
        println!("{PEER_HEADER}");
        print_peer(&p);
    }
    Ok(())
}

fn peer_state(s: i32) -> &'static str {
    match pb::PeerState::try_from(s) {
        Ok(pb::PeerState::Connecting) => "connecting",
        Ok(pb::PeerState::Streaming) => "streaming",
        Ok(pb::PeerState::Bootstrapping) => "bootstrapping",
        Ok(pb::PeerState::Paused) => "paused",
        _ => "unknown",
    }
}

fn print_peer(p: &pb::PeerStatus) {
    let error = if p.last_error.is_empty() { "-".to_string() } else { p.last_error.clone() };
    // A sharded peer region is pulled from each of its nodes: name the node.
    let at = if p.node.is_empty() { p.address.clone() } else { format!("{} {}", p.node, p.address) };
    println!(
        "{:>6}  {:<24} {:<13} {:>10} {:>10} {:>9.3} {:>9} {:>10} {:>4}  {}",
        p.region,
        at,
        peer_state(p.state),
        p.cursor,
        p.lag_seqnos,
        p.lag_seconds,
        if p.caught_up { "yes" } else { "no" },
        p.batches_applied,
        p.bootstraps,
        error
    );
}

const PEER_HEADER: &str =
    "  peer  address                  state             cursor  lag(seq)   lag(s) caught-up    batches boot  last error";
