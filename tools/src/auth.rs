//! `quiver auth ...`: the token file quiverd reads (`--auth-tokens`). Creating a token prints
//! it once; the file keeps only its hash. quiverd rereads the file on SIGHUP.

use std::path::Path;

use quiver_server::auth::{Rates, Scope, TokenFile};

use crate::common::Result;

/// `quiver auth create`: adds a token and prints it.
pub fn create(
    file: &Path,
    json: bool,
    name: &str,
    scopes: &[String],
    groups: Vec<String>,
    region: Option<u32>,
    rates: Rates,
) -> Result<()> {
    let scopes = scopes.iter().map(|s| s.parse::<Scope>()).collect::<Result<Vec<_>>>()?;
    let mut tokens = TokenFile::load_or_empty(file)?;
    let token = tokens.create(name, scopes, groups, region, rates)?;
    tokens.save(file)?;
    if json {
        println!("{}", serde_json::json!({ "name": name, "token": token }));
    } else {
        println!("{token}");
        eprintln!(
            "token {name:?} added to {} (only its hash is kept: store the token now); `kill -HUP` quiverd to use it",
            file.display()
        );
    }
    Ok(())
}

/// `quiver auth list`: names, scopes and limits (never secrets).
pub fn list(file: &Path, json: bool) -> Result<()> {
    let tokens = TokenFile::load(file)?;
    if json {
        let rows: Vec<_> = tokens
            .tokens
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "scopes": t.scopes.iter().map(|s| s.name()).collect::<Vec<_>>(),
                    "groups": t.groups,
                    "region": t.region,
                    "requests_per_second": t.requests_per_second,
                    "values_per_second": t.values_per_second,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<24} {:<36} {:<24} {:<7} {:>10} {:>12}",
        "name", "scopes", "groups", "region", "requests/s", "values/s"
    );
    let rate = |r: Option<u64>| r.map_or("-".to_string(), |r| r.to_string());
    for t in &tokens.tokens {
        let scopes: Vec<&str> = t.scopes.iter().map(|s| s.name()).collect();
        let groups = if t.groups.is_empty() { "(all)".to_string() } else { t.groups.join(",") };
        let region = t.region.map_or("-".to_string(), |r| r.to_string());
        println!(
            "{:<24} {:<36} {:<24} {region:<7} {:>10} {:>12}",
            t.name,
            scopes.join(","),
            groups,
            rate(t.requests_per_second),
            rate(t.values_per_second)
        );
    }
    Ok(())
}

/// `quiver auth revoke`: removes a token.
pub fn revoke(file: &Path, name: &str) -> Result<()> {
    let mut tokens = TokenFile::load(file)?;
    tokens.revoke(name)?;
    tokens.save(file)?;
    eprintln!("token {name:?} revoked in {}; `kill -HUP` quiverd to apply", file.display());
    Ok(())
}
