//! The short fault-injection run (about a minute): every fault of the schedule once, on three
//! real `quiverd` processes; the checker must find nothing, and the faults must have had their
//! effect (a lagging peer bootstrapped, writes were acknowledged in every region, the cell every
//! region CASes saw successes in several regions and refusals, all of them checked).

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_regions_survive_every_fault_and_converge() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = std::env::var_os("QUIVER_JEPSEN_OUT").map_or_else(|| dir.path().to_path_buf(), Into::into);
    let cfg = quiver_jepsen::Config::short(out.clone());
    let s = quiver_jepsen::run(&cfg).await.expect("the run completes");
    println!("{}", serde_json::to_string_pretty(&s).expect("summary"));
    assert!(s.violations.is_empty(), "violations (history in {}): {:#?}", out.display(), s.violations);
    assert_eq!(s.faults.len(), 6, "every fault ran once");
    assert!(s.ops.get("write ok").copied().unwrap_or(0) > 100, "writes were acknowledged: {:?}", s.ops);
    assert!(s.ops.get("cas ok").copied().unwrap_or(0) > 10, "CAS writes were acknowledged: {:?}", s.ops);
    // The cell every region CASes: local CAS writes raced peers' replicated versions (successes
    // in more than one region, refusals), and every acknowledged one was checked against the
    // vector it wrote (which needs a server returning `WriteFeaturesResponse.version`).
    let shared = &s.shared_cas;
    println!("{shared}");
    assert!(shared.ok.values().filter(|&&n| n > 0).count() >= 2, "shared CAS acknowledged in 2+ regions: {shared}");
    assert!(shared.aborted > 0, "some shared CAS writes were refused as ABORTED: {shared}");
    assert!(shared.checked > 0 && shared.unchecked == 0, "every acknowledged shared CAS was checked: {shared}");
    assert!(s.bootstraps.values().sum::<u64>() >= 1, "the lagging peer bootstrapped: {:?}", s.bootstraps);
    assert!(s.cells > 400, "the final states were compared: {} cells", s.cells);
    // Promotions and rollbacks ran in several regions through the faults; every region ended
    // on the same serving version (the checker's "serving version" check).
    assert!(
        s.ops.get("promote ok").copied().unwrap_or(0) > 0 && s.ops.get("rollback ok").copied().unwrap_or(0) > 0,
        "{:?}",
        s.ops
    );
    assert_eq!(s.serving_versions.len(), 3, "{:?}", s.serving_versions);
}
