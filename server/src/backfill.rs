//! Backfilling a group version inside the engine: `CopyFeatureHistory` copies the history of
//! features from one version of a group into another (README "Group versions").
//!
//! A version whose group's code changed gives every feature a keyspace of its own (module docs
//! of [`crate::registry`]); the features whose computation did not change need their history
//! copied rather than recomputed. The copy reads one snapshot of the engine, in key order
//! (entity, feature, event time descending, system time descending), and writes, for every
//! source `(entity, feature, event time)`, its winning version — the first in that order: the
//! greatest system time — under the target feature id at the same event time (a tombstone as a
//! tombstone). So `value_at` of the target at `known_at = now` answers what the source
//! answered when the copy read it; the copied versions carry the copy's system time (they
//! became known when copied).
//!
//! Batches are cut at entity boundaries once they hold [`COPY_BATCH_CELLS`] cells, each
//! written synced; after each, the progress message names the next entity, before which
//! everything is durable, and a call started there resumes the copy. An entity with more than
//! [`COPY_BATCH_CELLS_MAX`] cells is split across batches: a copy resumed inside it writes its
//! first cells again (the same values at the same event times: no answer changes).

use std::collections::HashMap;

use quiver_proto::v1 as pb;
use quiver_storage::{Db, Durability, FeatureId, ScanRange, WriteBatch};

use crate::features::ServiceError;
use crate::registry::{Registry, ResolvedFeature};

/// Cells after which a copy batch is written at the next entity boundary.
pub const COPY_BATCH_CELLS: usize = 10_000;
/// Cells (or a quarter of the engine's batch bytes) after which a batch is written even inside
/// one entity.
pub const COPY_BATCH_CELLS_MAX: usize = 50_000;

type Result<T> = std::result::Result<T, ServiceError>;

/// The first key of the user keyspace: every encoded entity key starts with a type tag of at
/// least 1; reserved keys (registry, logs) start with 0 and are never copied.
const USER_KEYS_START: &[u8] = &[1];

/// `CopyFeatureHistory`: copies, sending progress to `emit` after each durable batch (it
/// returns false to stop: the client went away). On a sharded node (`shard`), only the
/// entities it owns now are copied (it may hold others' versions from before a move), and each
/// batch is written as a write is: refused while a move of its slots is fenced (CLUSTER.md §5).
pub fn copy_history(
    db: &Db,
    registry: &Registry,
    req: &pb::CopyFeatureHistoryRequest,
    shard: Option<&crate::features::Features>,
    mut emit: impl FnMut(pb::CopyFeatureHistoryProgress) -> bool,
) -> Result<()> {
    if req.from_version == 0 || req.to_version == 0 || req.from_version == req.to_version {
        return Err(ServiceError::Invalid(format!(
            "copy {}: from_version ({}) and to_version ({}) must be two versions, each at least 1",
            req.group, req.from_version, req.to_version
        )));
    }
    let from = registry.resolve_group(&format!("{}@{}", req.group, req.from_version))?;
    let to = registry.resolve_group(&format!("{}@{}", req.group, req.to_version))?;
    let serving = registry.group(&req.group, 0)?.version;
    if registry.is_retired(&req.group, req.to_version) {
        return Err(ServiceError::Refused(format!("{}@{} is retired: it takes no writes", req.group, req.to_version)));
    }
    if serving == req.to_version {
        return Err(ServiceError::Refused(format!(
            "{}@{} is the serving version: a copy into it would change what is served; copy into a staged version",
            req.group, req.to_version
        )));
    }
    let (pairs, copying, already_shared) = plan(&from, &to, &req.features, &req.group)?;
    // A target feature whose data the serving version shares (a later version keeping the id
    // of a serving one) would change what is served.
    let serving_ids: Vec<FeatureId> =
        registry.resolve_group(&format!("{}@{serving}", req.group))?.iter().map(|f| f.id).collect();
    let touching: Vec<&str> = to
        .iter()
        .filter(|t| pairs.iter().any(|(_, id)| *id == t.id) && serving_ids.contains(&t.id))
        .map(|t| t.feature.as_str())
        .collect();
    if !touching.is_empty() {
        return Err(ServiceError::Refused(format!(
            "{}@{}: {} share their data with the serving version v{serving}; a copy into them would change what is served",
            req.group,
            req.to_version,
            touching.join(", ")
        )));
    }
    let mut progress = pb::CopyFeatureHistoryProgress {
        copying,
        already_shared,
        next_entity: req.start_entity.clone(),
        ..Default::default()
    };
    if pairs.is_empty() {
        progress.done = true;
        emit(progress);
        return Ok(());
    }
    let target: HashMap<u32, FeatureId> = pairs.iter().map(|(s, t)| (s.0, *t)).collect();
    let lo = pairs.iter().map(|(s, _)| *s).min().unwrap_or(FeatureId(0));
    let hi = pairs.iter().map(|(s, _)| *s).max().unwrap_or(FeatureId(0));
    let mut range = ScanRange::all();
    range.entity_start =
        if req.start_entity.as_slice() > USER_KEYS_START { req.start_entity.clone() } else { USER_KEYS_START.to_vec() };
    range.features = Some((lo, hi));

    let mut batch = WriteBatch::new();
    // The last source cell written: (entity, feature, event time).
    let mut last: Option<(Vec<u8>, u32, i64)> = None;
    // The entities of the batch being built (for the fence).
    let mut entities: Vec<Vec<u8>> = Vec::new();
    let write = |batch: WriteBatch, entities: &mut Vec<Vec<u8>>| {
        let _fence = match shard {
            Some(f) => f.write_guard(entities)?,
            None => None,
        };
        entities.clear();
        db.write(batch, Durability::Sync)?;
        Ok::<(), ServiceError>(())
    };
    let mut flush = |batch: &mut WriteBatch,
                     entities: &mut Vec<Vec<u8>>,
                     next: &[u8],
                     progress: &mut pb::CopyFeatureHistoryProgress| {
        let cells = batch.len() as u64;
        write(std::mem::take(batch), entities)?;
        progress.cells_copied += cells;
        progress.next_entity = next.to_vec();
        Ok::<bool, ServiceError>(emit(progress.clone()))
    };
    for item in db.scan(range)? {
        let item = item?;
        let Some(&t) = target.get(&item.feature.0) else { continue };
        if shard.is_some_and(|f| !f.owns(&item.entity)) {
            continue;
        }
        let e = item.version.event_time.0;
        let new_entity = last.as_ref().is_none_or(|(le, _, _)| *le != item.entity);
        if !new_entity && last.as_ref().is_some_and(|(_, lf, le)| *lf == item.feature.0 && *le == e) {
            continue; // an older version of a cell already copied
        }
        if new_entity {
            progress.entities += 1;
            // Cut at the entity boundary: everything before this entity is in the batch.
            if batch.len() >= COPY_BATCH_CELLS && !flush(&mut batch, &mut entities, &item.entity, &mut progress)? {
                return Ok(());
            }
        } else if (batch.len() >= COPY_BATCH_CELLS_MAX
            || batch.size_bytes() >= quiver_storage::limits::BATCH_BYTES_MAX / 4)
            && !flush(&mut batch, &mut entities, &item.entity, &mut progress)?
        {
            // One entity too large for a batch is split; a copy resumed restarts at it.
            return Ok(());
        }
        if entities.last() != Some(&item.entity) {
            entities.push(item.entity.clone());
        }
        match item.version.value {
            Some(v) => batch.put(&item.entity, t, item.version.event_time, v)?,
            None => batch.delete(&item.entity, t, item.version.event_time)?,
        }
        last = Some((item.entity, item.feature.0, e));
    }
    if !batch.is_empty() {
        let cells = batch.len() as u64;
        write(batch, &mut entities)?;
        progress.cells_copied += cells;
    }
    progress.next_entity = Vec::new();
    progress.done = true;
    emit(progress);
    Ok(())
}

/// Which source feature id feeds which target id: the named features (or, with none named,
/// every feature of `to` also in `from`), with the names copied and those already sharing
/// their data.
#[allow(clippy::type_complexity)]
fn plan(
    from: &[ResolvedFeature],
    to: &[ResolvedFeature],
    names: &[String],
    group: &str,
) -> Result<(Vec<(FeatureId, FeatureId)>, Vec<String>, Vec<String>)> {
    let compatible = |t: &ResolvedFeature| {
        from.iter().find(|s| s.feature == t.feature && s.value_type == t.value_type && s.dim == t.dim)
    };
    let mut chosen: Vec<&ResolvedFeature> = Vec::new();
    if names.is_empty() {
        chosen.extend(to.iter().filter(|t| compatible(t).is_some()));
    } else {
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(ServiceError::Invalid(format!("feature {n:?} is named twice")));
            }
            let t = to.iter().find(|t| &t.feature == n).ok_or_else(|| {
                ServiceError::NotFound(format!("{group}@{} has no feature {n:?}", to.first().map_or(0, |t| t.version)))
            })?;
            if compatible(t).is_none() {
                return Err(ServiceError::Invalid(format!(
                    "{group}:{n}: v{} has no feature of that name with the same type and dim to copy from",
                    from.first().map_or(0, |f| f.version)
                )));
            }
            chosen.push(t);
        }
    }
    let (mut pairs, mut copying, mut shared) = (Vec::new(), Vec::new(), Vec::new());
    for t in chosen {
        let Some(s) = compatible(t) else { continue };
        if s.id == t.id {
            shared.push(t.feature.clone());
        } else {
            pairs.push((s.id, t.id));
            copying.push(t.feature.clone());
        }
    }
    Ok((pairs, copying, shared))
}
