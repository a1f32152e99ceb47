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

/// `quiver promote group@N`.
pub async fn promote(server: &Server, json: bool, reference: &str, force: bool, reason: String) -> Result<()> {
    let bad = || format!("{reference:?} is not group@N (N >= 1)");
    let (group, version) = reference.split_once('@').ok_or_else(bad)?;
    let version: u32 = version.parse().ok().filter(|v| *v > 0).ok_or_else(bad)?;
    let mut c = pb::registry_service_client::RegistryServiceClient::new(server.channel().await?);
    let req = pb::PromoteGroupRequest { group: group.to_string(), version, force, reason };
    let r = c.promote_group(req).await.map_err(grpc)?.into_inner();
    let p = r.promotion.unwrap_or_default();
    if json {
        println!("{}", serde_json::json!({ "group": group, "changed": r.changed, "promotion": promotion_json(&p) }));
    } else if r.changed {
        print_promotion(group, &p);
    } else {
        println!("{group} v{version} already serves");
    }
    Ok(())
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
