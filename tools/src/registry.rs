//! Registry changes from a file: `quiver apply` (and `--dry-run` to only show them).

use std::path::Path;

use quiver_proto::v1 as pb;

use crate::common::{grpc, Result, Server};
use crate::registry_file;

/// `quiver apply`: applies the registry file at `file` (or, with `dry_run`, only asks what
/// would change) and prints the changes.
pub async fn apply(server: &Server, json: bool, file: &Path, dry_run: bool) -> Result<()> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut req = registry_file::parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    req.dry_run = dry_run;
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
            });
            println!("{line}");
        } else {
            println!("{} {} (v{}){}", kind, c.object, c.version, if dry_run { " [dry run]" } else { "" });
            for d in &c.details {
                println!("    {d}");
            }
        }
    }
}
