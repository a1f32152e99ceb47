//! `quiver skew --from T --to T [--group G]`: online against offline, from the served-feature
//! log (README "Skew"). Exits with 2 when any served value differs from its replay.

use quiver_proto::v1 as pb;

use crate::common::{grpc, status_name, Result, Server};
use crate::logs::parse_time;

/// The exit status of `quiver skew` when a served value differs from its replay.
pub const EXIT_MISMATCHED: i32 = 2;

fn entity_text(e: &Option<pb::EntityKey>) -> String {
    use pb::key_part::Kind;
    let parts = e.as_ref().map(|e| e.parts.as_slice()).unwrap_or_default();
    parts
        .iter()
        .map(|p| match &p.kind {
            Some(Kind::StringValue(s)) => s.clone(),
            Some(Kind::Int64Value(i)) => i.to_string(),
            None => String::new(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn served_text(f: &Option<pb::LoggedFeature>) -> String {
    let Some(f) = f else { return "-".into() };
    let status = status_name(f.status).unwrap_or_else(|| "?".into());
    let value = f.value.as_ref().and_then(|v| v.kind.as_ref()).map_or(String::new(), |k| format!(" {k:?}"));
    format!("{status}{value} @ {} µs", f.event_time_us)
}

/// `quiver skew`: prints per feature what was compared; `Ok(true)` when anything mismatched.
pub async fn run(
    server: &Server,
    json: bool,
    from: &str,
    to: &str,
    group: Option<String>,
    examples: u32,
) -> Result<bool> {
    let req = pb::MeasureSkewRequest {
        from: Some(parse_time("--from", from)?),
        to: Some(parse_time("--to", to)?),
        group: group.unwrap_or_default(),
        examples,
    };
    let r = pb::monitor_service_client::MonitorServiceClient::new(server.channel().await?)
        .measure_skew(req)
        .await
        .map_err(grpc)?
        .into_inner();
    let any = r.features.iter().any(|f| f.mismatched > 0);
    if json {
        let features: Vec<serde_json::Value> = r
            .features
            .iter()
            .map(|f| {
                serde_json::json!({
                    "feature": f.feature_ref, "compared": f.compared, "equal": f.equal,
                    "mismatched": f.mismatched, "missing": f.missing,
                    "examples": f.examples.iter().map(|e| serde_json::json!({
                        "request_id": e.request_id, "entity": entity_text(&e.entity),
                        "served": served_text(&e.served), "replayed": served_text(&e.replayed),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "answers": r.answers, "mismatched": any, "features": features }));
        return Ok(any);
    }
    println!("{} logged answers replayed", r.answers);
    for f in &r.features {
        println!(
            "{}: {} compared, {} equal, {} mismatched, {} missing",
            f.feature_ref, f.compared, f.equal, f.mismatched, f.missing
        );
        for e in &f.examples {
            println!(
                "    request {} entity {}: served {}, replayed {}",
                e.request_id,
                entity_text(&e.entity),
                served_text(&e.served),
                served_text(&e.replayed)
            );
        }
    }
    Ok(any)
}
