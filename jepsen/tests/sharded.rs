//! The sharded run (about 85 s): two regions of two `quiverd` nodes each, every
//! region's slots in one etcd, in network namespaces. Its nemesis moves slots holding workload
//! cells under the workload, kills a move's source or target mid-move (the move is resumed
//! after the restart), and partitions, kills, pauses and lags nodes and regions. The checker
//! must find nothing: every acknowledged write present once, at its region and in the
//! converged state every node of both regions answers.
//!
//! It needs root (network namespaces, nftables, tc) and etcd, which `.ci/run` installs and
//! requires (`QUIVER_JEPSEN_SHARDED=require`). Elsewhere (a developer's machine without root)
//! it says why and does not run.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_regions_of_two_shards_survive_slot_moves_and_faults() {
    if !quiver_jepsen::netns::available() {
        let required = std::env::var("QUIVER_JEPSEN_SHARDED").is_ok_and(|v| v == "require");
        assert!(!required, "QUIVER_JEPSEN_SHARDED=require, but network namespaces are not available here");
        eprintln!("the sharded jepsen run needs root with ip, nft and tc (network namespaces): not run");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let out = std::env::var_os("QUIVER_JEPSEN_OUT").map_or_else(|| dir.path().to_path_buf(), Into::into);
    let cfg = quiver_jepsen::Config::sharded(out.clone());
    let s = quiver_jepsen::run(&cfg).await.expect("the run completes");
    println!("{}", serde_json::to_string_pretty(&s).expect("summary"));
    assert!(s.violations.is_empty(), "violations (history in {}): {:#?}", out.display(), s.violations);
    assert_eq!(s.shards, 2);
    assert_eq!(s.faults.len(), 11, "every fault ran once");
    // With etcd frozen past the nodes' leases, they served from their last known map.
    let frozen = s.faults.iter().find(|f| f.name.starts_with("etcd frozen")).expect("the etcd fault ran");
    assert!(frozen.acknowledged > 50, "operations went on while etcd was frozen: {frozen:?}");
    // Four moves ran: each switched, on its first call or resumed after its kill, and none
    // was aborted. At least one kill landed mid-move.
    let moved = ["switched", "resumed"].iter().map(|k| s.moves.get(*k).copied().unwrap_or(0)).sum::<u64>();
    assert_eq!(moved, 4, "every move switched: {:?}", s.moves);
    assert_eq!(s.moves.get("aborted"), None, "{:?}", s.moves);
    // Counted only when the map still held the move after the kill.
    let kills = ["killed source", "killed target"].iter().map(|k| s.moves.get(*k).copied().unwrap_or(0)).sum::<u64>();
    assert!(kills >= 1, "a kill landed mid-move: {:?}", s.moves);
    assert!(s.ops.get("write ok").copied().unwrap_or(0) > 100, "writes were acknowledged: {:?}", s.ops);
    assert!(s.ops.get("cas ok").copied().unwrap_or(0) > 10, "CAS writes were acknowledged: {:?}", s.ops);
    let shared = &s.shared_cas;
    assert!(shared.checked > 0 && shared.unchecked == 0, "every acknowledged shared CAS was checked: {shared}");
    assert!(s.bootstraps.values().sum::<u64>() >= 1, "the lagging nodes bootstrapped: {:?}", s.bootstraps);
    assert!(s.cells > 400, "the final states were compared: {} cells", s.cells);
    assert_eq!(s.serving_versions.len(), 4, "{:?}", s.serving_versions);
}
