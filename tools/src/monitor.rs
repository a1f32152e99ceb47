//! `quiver monitor`: one report of every feature group's health (README "Monitoring"), and an
//! exit status scripts and cron jobs can act on.

use quiver_proto::v1 as pb;

use crate::common::{grpc, Result, Server};

/// The exit status of `quiver monitor` when something breaches (errors exit with 1).
pub const EXIT_BREACHED: i32 = 2;

fn secs(d: &prost_types::Duration) -> f64 {
    d.seconds as f64 + f64::from(d.nanos) / 1e9
}

/// A duration for people: "42s", "3m 5s", "2h 0m", "4d 1h".
fn human(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Whether a group breaches anything: its SLA, a feature's null rate, its drift, or a mismatch
/// in the last skew measurement.
fn breached(g: &pb::GroupHealth) -> bool {
    g.sla_breached
        || g.features.iter().any(|f| f.null_rate_breached)
        || [&g.drift, &g.ingested_drift]
            .iter()
            .any(|d| d.as_ref().is_some_and(|d| d.features.iter().any(|f| f.breached)))
        || g.skew.as_ref().is_some_and(|s| s.features.iter().any(|f| f.mismatched > 0))
}

fn json_of(g: &pb::GroupHealth) -> serde_json::Value {
    serde_json::json!({
        "group": g.group,
        "version": g.version,
        "newest_event_time_us": g.newest_event_time.as_ref().and_then(|t| quiver_server::convert::micros(t, "time").ok()),
        "freshness_seconds": g.freshness.as_ref().map(secs),
        "freshness_sla_seconds": g.freshness_sla.as_ref().map(secs),
        "sla_breached": g.sla_breached,
        "values_written": g.values_written,
        "breached": breached(g),
        "features": g.features.iter().map(|f| serde_json::json!({
            "feature": f.feature,
            "present": f.present,
            "not_found": f.not_found,
            "stale": f.stale,
            "defaulted": f.defaulted,
            "null_rate": f.null_rate,
            "max_null_rate": f.max_null_rate,
            "null_rate_breached": f.null_rate_breached,
        })).collect::<Vec<_>>(),
        "drift": g.drift.as_ref().map(crate::drift::drift_json),
        "ingested_drift": g.ingested_drift.as_ref().map(crate::drift::drift_json),
        "skew": g.skew.as_ref().map(|s| serde_json::json!({
            "measured_at_us": s.measured_at.as_ref().and_then(|t| quiver_server::convert::micros(t, "time").ok()),
            "features": s.features.iter().map(|f| serde_json::json!({
                "feature": f.feature_ref, "compared": f.compared, "equal": f.equal,
                "mismatched": f.mismatched, "missing": f.missing,
            })).collect::<Vec<_>>(),
        })),
        "shadow": g.shadow.as_ref().map(|s| serde_json::json!({
            "staged_version": s.staged_version, "lookups": s.lookups, "dropped": s.dropped,
            "features": s.features.iter().map(|f| serde_json::json!({
                "feature": f.feature, "compared": f.compared, "mismatched": f.mismatched,
                "mismatch_rate": f.mismatch_rate, "abs_diff_quantiles": f.abs_diff_quantiles,
                "rel_diff_quantiles": f.rel_diff_quantiles, "psi": f.psi,
            })).collect::<Vec<_>>(),
        })),
    })
}

/// `quiver monitor`: prints the report (one JSON object with `json`); `Ok(true)` when
/// something breaches.
pub async fn run(server: &Server, json: bool, group: Option<String>) -> Result<bool> {
    let mut c = pb::monitor_service_client::MonitorServiceClient::new(server.channel().await?);
    let r = c
        .get_feature_health(pb::GetFeatureHealthRequest { group: group.unwrap_or_default() })
        .await
        .map_err(grpc)?
        .into_inner();
    let any = r.groups.iter().any(breached);
    if json {
        let out = serde_json::json!({
            "window_seconds": r.window.as_ref().map(secs),
            "breached": any,
            "log_answers_written": r.log_answers_written,
            "log_answers_dropped": r.log_answers_dropped,
            "groups": r.groups.iter().map(json_of).collect::<Vec<_>>(),
        });
        println!("{out}");
        return Ok(any);
    }
    let window = r.window.as_ref().map_or(0.0, secs);
    for g in &r.groups {
        let fresh = match (&g.freshness, &g.freshness_sla) {
            (Some(f), Some(s)) => format!("freshness {} (SLA {})", human(secs(f)), human(secs(s))),
            (Some(f), None) => format!("freshness {} (no SLA)", human(secs(f))),
            (None, Some(s)) => format!("never written (SLA {})", human(secs(s))),
            (None, None) => "never written (no SLA)".to_string(),
        };
        let mark = if breached(g) { "BREACHED" } else { "ok" };
        println!("{} v{}: {mark}: {fresh}; {} values written here since start", g.group, g.version, g.values_written);
        for f in &g.features {
            let answers = f.present + f.not_found + f.stale + f.defaulted;
            let rate = f.null_rate.map_or("-".to_string(), |r| format!("{:.1}%", r * 100.0));
            let max = f.max_null_rate.map_or("no bound".to_string(), |m| format!("max {:.1}%", m * 100.0));
            let mark = if f.null_rate_breached { "  BREACHED" } else { "" };
            println!(
                "    {}: null rate {rate} ({max}) of {answers} answers in the last {}{mark}",
                f.feature,
                human(window)
            );
        }
        match &g.drift {
            Some(d) => {
                println!("    drift against baseline {} ({} logged answers in the last hour):", d.baseline, d.answers);
                crate::drift::print_drift(d, "        ");
            }
            None => println!("    drift: no baseline (or not measured yet)"),
        }
        if let Some(sk) = &g.skew {
            let (compared, mismatched, missing) =
                sk.features.iter().fold((0, 0, 0), |a, f| (a.0 + f.compared, a.1 + f.mismatched, a.2 + f.missing));
            let mark = if mismatched > 0 { "  BREACHED" } else { "" };
            println!(
                "    skew (last measured here): {compared} compared, {mismatched} mismatched, {missing} missing{mark}"
            );
        }
        if let Some(d) = &g.ingested_drift {
            println!("    drift of the values written here in the last hour, against baseline {}:", d.baseline);
            crate::drift::print_drift(d, "        ");
        }
        if let Some(sh) = &g.shadow {
            println!(
                "    shadow reads of v{} since start: {} lookups sampled, {} dropped",
                sh.staged_version, sh.lookups, sh.dropped
            );
            for f in &sh.features {
                let q = |x: &[f64]| {
                    if x.is_empty() {
                        "-".to_string()
                    } else {
                        x.iter().map(|v| format!("{v:.4}")).collect::<Vec<_>>().join("/")
                    }
                };
                println!(
                    "        {:<24} {} compared, {} differ ({:.2}%), |diff| p50/p90/p99 {}, relative {}, psi {}",
                    f.feature,
                    f.compared,
                    f.mismatched,
                    f.mismatch_rate * 100.0,
                    q(&f.abs_diff_quantiles),
                    q(&f.rel_diff_quantiles),
                    f.psi.map_or("-".to_string(), |p| format!("{p:.4}"))
                );
            }
        }
    }
    if r.groups.is_empty() {
        println!("no feature groups");
    }
    println!(
        "served-feature log: {} answers written, {} dropped since the server started",
        r.log_answers_written, r.log_answers_dropped
    );
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mismatch_in_the_last_skew_measurement_is_a_breach() {
        let mut g = pb::GroupHealth::default();
        assert!(!breached(&g));
        let f = pb::FeatureSkew { feature_ref: "g:x".into(), compared: 3, equal: 3, ..Default::default() };
        g.skew = Some(pb::SkewCounts { features: vec![f.clone()], ..Default::default() });
        assert!(!breached(&g));
        g.skew = Some(pb::SkewCounts { features: vec![pb::FeatureSkew { mismatched: 1, ..f }], ..Default::default() });
        assert!(breached(&g));
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human(0.0), "0s");
        assert_eq!(human(59.9), "59s");
        assert_eq!(human(185.0), "3m 5s");
        assert_eq!(human(7200.0), "2h 0m");
        assert_eq!(human(4.0 * 86_400.0 + 3700.0), "4d 1h");
        assert_eq!(human(-5.0), "0s");
    }
}
