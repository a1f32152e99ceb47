//! Registry changes: `quiver apply` from a file (and `--dry-run` to only show them), and the
//! serving version of a group: `quiver promote`, `quiver rollback`, `quiver versions`.

use std::path::Path;

use quiver_proto::v1 as pb;

use crate::common::{grpc, Result, Server};
use crate::registry_file;

/// `quiver apply`: applies the registry file at `file` (or, with `dry_run`, only asks what
/// would change) and prints the changes.
pub async fn apply(server: &Server, json: bool, file: &Path, dry_run: bool, promote: bool) -> Result<()> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut req = registry_file::parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    req.dry_run = dry_run;
    req.promote = promote;
    let mut c = pb::registry_service_client::RegistryServiceClient::new(server.channel().await?);
    let changes = c.apply_registry(req).await.map_err(grpc)?.into_inner().changes;
    print_changes(&changes, json, dry_run);
    Ok(())
}

fn print_changes(changes: &[pb::RegistryChange], json: bool, dry_run: bool) {
    for c in changes {
        let kind = match c.kind() {
            pb::registry_change::Kind::Created => "create",
            pb::registry_change::Kind::NewVersion => "new version",
            pb::registry_change::Kind::Unchanged => "unchanged",
            pb::registry_change::Kind::Unspecified => "?",
        };
        if json {
            let line = serde_json::json!({
                "object": c.object, "change": kind, "version": c.version, "details": c.details, "dry_run": dry_run,
                "serving": c.serving,
            });
            println!("{line}");
        } else {
            let staged = c.object.starts_with("feature_group:") && !c.serving;
            println!(
                "{} {} (v{}){}{}",
                kind,
                c.object,
                c.version,
                if staged { " staged" } else { "" },
                if dry_run { " [dry run]" } else { "" }
            );
            for d in &c.details {
                println!("    {d}");
            }
        }
    }
}

fn kind_name(k: pb::group_promotion::Kind) -> &'static str {
    use pb::group_promotion::Kind as K;
    match k {
        K::Created => "created",
        K::Promoted => "promoted",
        K::RolledBack => "rolled back",
        K::Pinned => "pinned",
        K::Unspecified => "?",
    }
}

fn at(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref().map_or_else(String::new, ToString::to_string)
}

fn promotion_json(p: &pb::GroupPromotion) -> serde_json::Value {
    serde_json::json!({
        "kind": kind_name(p.kind()), "from": p.from_version, "to": p.to_version, "by": p.by,
        "at": at(&p.at), "reason": p.reason, "forced": p.forced,
    })
}

fn print_promotion(group: &str, p: &pb::GroupPromotion) {
    let forced = if p.forced { " (forced)" } else { "" };
    let reason = if p.reason.is_empty() { String::new() } else { format!(": {}", p.reason) };
    println!(
        "{} {group} v{} -> v{} by {} at {}{forced}{reason}",
        kind_name(p.kind()),
        p.from_version,
        p.to_version,
        p.by,
        at(&p.at)
    );
}

/// `group@N` (N >= 1), parsed as the registry parses references.
fn version_ref(reference: &str) -> Result<(&str, u32)> {
    match quiver_server::registry::parse_group_ref(reference) {
        Some((group, version)) if version > 0 => Ok((group, version)),
        _ => Err(format!("{reference:?} is not group@N (N >= 1)")),
    }
}

/// The exit code of `quiver promote` when the release gate refuses (or, with `--dry-run`,
/// would refuse).
pub const EXIT_GATE_REFUSED: i32 = 2;

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

fn opt(x: Option<f64>) -> String {
    x.map_or("-".to_string(), |v| format!("{v:.4}"))
}

/// Prints the release gate's report.
fn print_gate(r: &pb::GateReport, json: bool) {
    if json {
        let features: Vec<_> = r
            .features
            .iter()
            .map(|f| {
                let drift = |d: &Option<pb::FeatureDrift>| {
                    d.as_ref().map(
                        |d| serde_json::json!({ "psi": d.psi, "ks": d.ks, "max_psi": d.max_psi, "max_ks": d.max_ks }),
                    )
                };
                serde_json::json!({
                    "feature": f.feature, "coverage_serving": f.coverage_serving,
                    "coverage_candidate": f.coverage_candidate, "null_rate": f.null_rate,
                    "max_null_rate": f.max_null_rate, "versus_serving": drift(&f.versus_serving),
                    "versus_baseline": drift(&f.versus_baseline), "shadow_compared": f.shadow_compared,
                    "shadow_mismatch_rate": f.shadow_mismatch_rate, "failures": f.failures,
                })
            })
            .collect();
        let line = serde_json::json!({
            "group": r.group, "serving": r.serving_version, "candidate": r.candidate_version, "entities": r.entities,
            "truncated": r.truncated, "baseline": r.baseline, "passed": r.passed, "features": features,
        });
        println!("{line}");
        return;
    }
    println!(
        "release gate {}@{} against serving v{}: {} ({} entities{}{})",
        r.group,
        r.candidate_version,
        r.serving_version,
        if r.passed { "PASSED" } else { "REFUSED" },
        r.entities,
        if r.truncated { ", the first ones only" } else { "" },
        if r.baseline.is_empty() { String::new() } else { format!(", baseline {}", r.baseline) }
    );
    println!(
        "  {:<24} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "feature", "coverage", "serving", "nulls", "psi/serv", "ks/serv", "psi/base", "ks/base", "shadow"
    );
    for f in &r.features {
        let (ps, ks) = f.versus_serving.as_ref().map_or((None, None), |d| (d.psi, d.ks));
        let (pb_, kb) = f.versus_baseline.as_ref().map_or((None, None), |d| (d.psi, d.ks));
        println!(
            "  {:<24} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}",
            f.feature,
            pct(f.coverage_candidate),
            pct(f.coverage_serving),
            pct(f.null_rate),
            opt(ps),
            opt(ks),
            opt(pb_),
            opt(kb),
            f.shadow_mismatch_rate.map_or("-".to_string(), pct)
        );
        for x in &f.failures {
            println!("      FAIL {x}");
        }
    }
}

/// `quiver promote group@N`: false when the release gate refused (its report printed).
pub async fn promote(
    server: &Server,
    json: bool,
    reference: &str,
    force: bool,
    dry_run: bool,
    reason: String,
) -> Result<bool> {
    let (group, version) = version_ref(reference)?;
    let mut c = pb::registry_service_client::RegistryServiceClient::new(server.channel().await?);
    let req = pb::PromoteGroupRequest { group: group.to_string(), version, force, reason, dry_run };
    let r = match c.promote_group(req).await {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            use prost::Message;
            match pb::GateReport::decode(s.details()) {
                Ok(report) if !report.group.is_empty() => {
                    print_gate(&report, json);
                    if !json {
                        println!("not promoted; fix the version, or promote with --force");
                    }
                    return Ok(false);
                }
                _ => return Err(grpc(s)),
            }
        }
        Err(s) => return Err(grpc(s)),
    };
    if let Some(g) = &r.gate {
        print_gate(g, json);
        if dry_run {
            return Ok(g.passed);
        }
    }
    let p = r.promotion.unwrap_or_default();
    if json {
        println!("{}", serde_json::json!({ "group": group, "changed": r.changed, "promotion": promotion_json(&p) }));
    } else if r.changed {
        print_promotion(group, &p);
    } else {
        println!("{group} v{version} already serves");
    }
    Ok(true)
}

/// `quiver rollback group`.
pub async fn rollback(server: &Server, json: bool, group: String, reason: String) -> Result<()> {
    let mut c = pb::registry_service_client::RegistryServiceClient::new(server.channel().await?);
    let r = c.rollback_group(pb::RollbackGroupRequest { group: group.clone(), reason }).await.map_err(grpc)?;
    let p = r.into_inner().promotion.unwrap_or_default();
    if json {
        println!("{}", serde_json::json!({ "group": group, "promotion": promotion_json(&p) }));
    } else {
        print_promotion(&group, &p);
    }
    Ok(())
}

/// `quiver versions group`.
pub async fn versions(server: &Server, json: bool, group: String) -> Result<()> {
    let mut c = pb::registry_service_client::RegistryServiceClient::new(server.channel().await?);
    let r = c.list_group_versions(pb::ListGroupVersionsRequest { group: group.clone() }).await.map_err(grpc)?;
    let r = r.into_inner();
    let state = |v: &pb::GroupVersion| match v.state() {
        pb::group_version::State::Serving => "serving",
        pb::group_version::State::Staged => "staged",
        pb::group_version::State::Inactive => "inactive",
        pb::group_version::State::Retired => "retired",
        pb::group_version::State::Unspecified => "?",
    };
    if json {
        let versions: Vec<_> = r
            .versions
            .iter()
            .map(|v| {
                serde_json::json!({
                    "version": v.version, "state": state(v), "created_at": at(&v.created_at),
                    "shared_features": v.shared_features, "own_features": v.own_features, "details": v.details,
                })
            })
            .collect();
        let history: Vec<_> = r.promotions.iter().map(promotion_json).collect();
        println!(
            "{}",
            serde_json::json!({ "group": group, "serving": r.serving_version, "versions": versions, "history": history })
        );
        return Ok(());
    }
    println!("{group}: v{} serves", r.serving_version);
    for v in &r.versions {
        println!(
            "  v{:<4} {:<9} created {}  {} features own data, {} shared with v{}",
            v.version,
            state(v),
            at(&v.created_at),
            v.own_features,
            v.shared_features,
            v.version.saturating_sub(1)
        );
        if let Some(r) = &v.retirement {
            println!("        retired by {} at {}; data dropped after {}", r.by, at(&r.at), at(&r.drop_after));
        }
        for d in &v.details {
            println!("        {d}");
        }
    }
    println!("history:");
    for p in &r.promotions {
        print!("  ");
        print_promotion(&group, p);
    }
    Ok(())
}

/// The longest `--retention-hours` (ten years).
const RETENTION_HOURS_MAX: u64 = 10 * 366 * 24;

/// `quiver retire group@N`.
pub async fn retire(
    server: &Server,
    json: bool,
    reference: &str,
    retention_hours: Option<u64>,
    reason: String,
) -> Result<()> {
    let (group, version) = version_ref(reference)?;
    if retention_hours.is_some_and(|h| h > RETENTION_HOURS_MAX) {
        return Err(format!("--retention-hours must be at most {RETENTION_HOURS_MAX}"));
    }
    let retention = retention_hours.map(|h| prost_types::Duration { seconds: (h * 3600) as i64, nanos: 0 });
    let mut c = pb::registry_service_client::RegistryServiceClient::new(server.channel().await?);
    let req = pb::RetireGroupVersionRequest { group: group.to_string(), version, retention, reason };
    let r = c.retire_group_version(req).await.map_err(grpc)?.into_inner();
    let ret = r.retirement.unwrap_or_default();
    if json {
        let line = serde_json::json!({
            "group": group, "version": version, "changed": r.changed, "by": ret.by, "at": at(&ret.at),
            "drop_after": at(&ret.drop_after), "reason": ret.reason,
        });
        println!("{line}");
    } else if r.changed {
        println!("retired {group}@{version}; its own data is dropped by compaction after {}", at(&ret.drop_after));
    } else {
        println!("{group}@{version} was already retired (by {} at {})", ret.by, at(&ret.at));
    }
    Ok(())
}
