//! Online reads and writes of feature values: `quiver get`, `quiver put`, `quiver history`.

use quiver_proto::v1 as pb;

use crate::common::{cell_text, entity_key, fetch_entity_type, fetch_group, grpc, now_us, parse_value, Result, Server};

/// How `quiver get` asks: defaults for missing features, and a deadline.
#[derive(Debug, Clone, Copy, Default)]
pub struct GetOptions {
    /// Serve defaults (or zero values) for features with nothing within the TTL.
    pub default_missing: bool,
    /// The call's deadline: features not read by then come back unavailable.
    pub timeout: Option<std::time::Duration>,
}

/// `quiver get`: online lookup of `features` for `entities`, one line per entity.
pub async fn get(
    server: &Server,
    json: bool,
    entity_type: String,
    entities: Vec<String>,
    features: Vec<String>,
    opts: GetOptions,
) -> Result<()> {
    // One connection for the registry and the lookup: the router's, which caches the type.
    let router = server.router().await?.with_timeout(opts.timeout);
    let et = router.entity_type(&entity_type).await.map_err(grpc)?;
    let keys = entities.iter().map(|e| entity_key(&et, e)).collect::<Result<Vec<_>>>()?;
    let msg = pb::GetOnlineFeaturesRequest {
        entity_type,
        entities: keys,
        features,
        default_missing: opts.default_missing,
        ..Default::default()
    };
    let resp = router.get_online_features(msg).await.map_err(grpc)?;
    for (i, e) in entities.iter().enumerate() {
        let cells: Vec<String> =
            resp.columns.iter().map(|c| format!("{}={}", c.feature_ref, cell_text(c, i))).collect();
        if json {
            let mut line = serde_json::Map::new();
            line.insert("entity".into(), e.as_str().into());
            for c in &resp.columns {
                line.insert(c.feature_ref.clone(), cell_text(c, i).into());
            }
            println!("{}", serde_json::Value::Object(line));
        } else {
            println!("{e}: {}", cells.join("  "));
        }
    }
    Ok(())
}

/// `quiver put`: one row of `feature=value` pairs for one entity at one event time (default:
/// now).
pub async fn put(
    server: &Server,
    group: String,
    entity: String,
    event_time_us: Option<i64>,
    values: Vec<String>,
) -> Result<()> {
    let ch = server.channel().await?;
    let (def, et) = fetch_group(&ch, &group).await?;
    let mut row = pb::WriteRow {
        entity: Some(entity_key(&et, &entity)?),
        group: group.clone(),
        event_time: Some(quiver_server::convert::timestamp(event_time_us.unwrap_or_else(now_us))),
        ..Default::default()
    };
    for kv in values {
        let (k, v) = kv.split_once('=').ok_or_else(|| format!("{kv:?} is not feature=value"))?;
        let f =
            def.features.iter().find(|f| f.name == k).ok_or_else(|| format!("group {group} has no feature {k:?}"))?;
        row.values.insert(k.to_string(), parse_value(v, f.r#type()).map_err(|e| format!("{k}: {e}"))?);
    }
    let req = pb::WriteFeaturesRequest { rows: vec![row], ..Default::default() };
    let resp = server.router().await?.write_features(req).await.map_err(grpc)?;
    println!("wrote {} values", resp.values_written);
    Ok(())
}

/// `quiver history`: every version of an entity's features in `group`, newest event first.
pub async fn history(server: &Server, entity_type: String, entity: String, group: String, limit: u64) -> Result<()> {
    let ch = server.channel().await?;
    let et = fetch_entity_type(&ch, &entity_type).await?;
    let req = pb::ScanHistoryRequest {
        entity_type,
        entity: Some(entity_key(&et, &entity)?),
        group,
        limit,
        ..Default::default()
    };
    let mut stream =
        pb::feature_service_client::FeatureServiceClient::new(ch).scan_history(req).await.map_err(grpc)?.into_inner();
    while let Some(chunk) = stream.message().await.map_err(grpc)? {
        for v in chunk.versions {
            let us = |t: &Option<prost_types::Timestamp>, what: &str| -> Result<i64> {
                t.as_ref().map_or(Ok(0), |t| quiver_server::convert::micros(t, what).map_err(|e| e.to_string()))
            };
            let value = v.value.as_ref().map_or("(deleted)".to_string(), |x| format!("{:?}", x.kind));
            println!(
                "{} event_time_us={} system_time_us={} {value}",
                v.feature_ref,
                us(&v.event_time, "event_time")?,
                us(&v.system_time, "system_time")?
            );
        }
    }
    Ok(())
}
