//! `billsync replay`: rebuilds the mirror from the stored inbox alone (no vendor calls) and
//! reports where it differs from the mirror as it stands; unless told to only report, it then
//! writes the rebuilt states.

use std::collections::BTreeMap;

use serde_json::Value;

use super::applier::{object_state, state_of_row};
use crate::error::WorkError;
use crate::store::{Db, ObjectState, now_ms};
use crate::stripe::ObjectKind;

/// One difference between the rebuilt and the stored mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub object_type: String,
    pub object_id: String,
    /// `missing` (rebuilt, not stored), `extra` (stored, not rebuilt) or `differs`.
    pub kind: &'static str,
}

#[derive(Debug, Default, Clone)]
pub struct ReplayReport {
    pub rows_read: usize,
    pub objects_rebuilt: usize,
    /// Rows whose state cannot be known without the vendor (e.g. a refund event without refetch).
    pub unreplayable: usize,
    pub differences: Vec<Difference>,
    pub written: usize,
}

const PAGE: u32 = 1000;

/// The mirror each object would have from its applied inbox rows alone.
type Rebuilt = BTreeMap<(String, String), ObjectState>;

pub async fn run(db: &Db, write: bool) -> Result<ReplayReport, WorkError> {
    let mut report = ReplayReport::default();
    let rebuilt = rebuild(db, &mut report).await?;
    report.objects_rebuilt = rebuilt.len();
    compare(db, &rebuilt, &mut report).await?;
    if write {
        for difference in report.differences.iter().filter(|d| d.kind != "extra") {
            let key = (difference.object_type.clone(), difference.object_id.clone());
            if let Some(state) = rebuilt.get(&key) {
                db.mirror().overwrite(state, now_ms()).await?;
                report.written += 1;
            }
        }
    }
    Ok(report)
}

/// Replays every applied inbox row in order, keeping per object the state with the highest
/// version by the same rule as the applier.
async fn rebuild(db: &Db, report: &mut ReplayReport) -> Result<Rebuilt, WorkError> {
    let mut rebuilt = Rebuilt::new();
    let mut after = None;
    loop {
        let rows = db.inbox().applied_in_order(after.clone(), PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = Some((last.event_created, last.event_id.clone()));
        report.rows_read += rows.len();
        for row in &rows {
            let (Some(kind), Some(id)) = (
                row.object_type.as_deref().and_then(ObjectKind::parse),
                &row.object_id,
            ) else {
                continue;
            };
            let Ok((object, version, deleted)) = state_of_row(row, kind) else {
                report.unreplayable += 1;
                continue;
            };
            let state = object_state(kind, id, &object, version, deleted);
            let key = (state.object_type.clone(), state.object_id.clone());
            // A state only gives way to one at least as new.
            if (rebuilt.get(&key)).is_none_or(|held| held.version <= state.version) {
                rebuilt.insert(key, state);
            }
        }
    }
    Ok(rebuilt)
}

/// The differences between the stored mirror and the rebuilt one: objects only the mirror
/// has (`extra`), only the rebuild has (`missing`), or both with other states (`differs`).
async fn compare(db: &Db, rebuilt: &Rebuilt, report: &mut ReplayReport) -> Result<(), WorkError> {
    let mut stored_keys = std::collections::BTreeSet::new();
    let mut after = None;
    let difference = |object_type, object_id, kind| Difference {
        object_type,
        object_id,
        kind,
    };
    loop {
        let rows = db.mirror().all_after(after.clone(), PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = Some((last.object_type.clone(), last.object_id.clone()));
        for row in rows {
            let key = (row.object_type.clone(), row.object_id.clone());
            stored_keys.insert(key.clone());
            let kind = match rebuilt.get(&key) {
                None => "extra",
                Some(state) => {
                    let same_payload = serde_json::from_str::<Value>(&row.payload).ok()
                        == serde_json::from_str::<Value>(&state.payload).ok();
                    if same_payload && row.deleted == state.deleted {
                        continue;
                    }
                    "differs"
                }
            };
            report
                .differences
                .push(difference(row.object_type, row.object_id, kind));
        }
    }
    for key in rebuilt.keys().filter(|key| !stored_keys.contains(*key)) {
        report
            .differences
            .push(difference(key.0.clone(), key.1.clone(), "missing"));
    }
    Ok(())
}
