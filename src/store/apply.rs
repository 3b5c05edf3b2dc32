//! Applying vendor states to the mirror: the one write path. For each state, in one
//! transaction: store it unless a newer one is there, record the billing periods it states, link
//! or unlink the tenant a customer names, and mark the inbox rows it settles applied; for an
//! outbox command's answer, also store its inbox row and end the command.

use super::commands::settle_command;
use super::inbox::insert_event;
use super::link::{link_tenants, tenants_of};
use super::periods::upsert_periods;
use super::{CommandRow, Mirror, NewEvent, ObjectState, Settlement, StoreError, on_pool};

/// A customer's claim to belong to a tenant (its `metadata.tenant_id`).
#[derive(Debug, Clone)]
pub struct TenantClaim {
    pub tenant_id: String,
    pub name: Option<String>,
    pub email: Option<String>,
}

/// What [`Mirror::apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// False when the mirror already held a newer state.
    pub written: bool,
    /// The tenant the object belongs to, if any.
    pub tenant_id: Option<String>,
    /// Set when a customer claims a tenant already linked to another customer.
    pub conflict: Option<String>,
}

/// One object state to apply, and the inbox rows it settles.
#[derive(Debug, Clone)]
pub struct Apply {
    pub state: ObjectState,
    /// For a customer: the tenant its metadata names.
    pub claim: Option<TenantClaim>,
    pub event_ids: Vec<String>,
    /// The state was refetched: it is recorded on the last row so that replay can rebuild it.
    pub refetched: bool,
}

/// A command's end, applied with the vendor state it confirmed: the state's inbox row is stored,
/// the state applied and the command ended in one transaction.
#[derive(Debug, Clone, Copy)]
pub struct Confirmed<'a> {
    pub record: &'a NewEvent,
    pub command: &'a CommandRow,
    pub settlement: &'a Settlement<'a>,
    /// When set, a state the mirror already holds a later observation of ends nothing: the
    /// transaction is rolled back and `apply_with` answers `None`, for the caller to observe
    /// the object again (see docs/architecture.md, "Versions of mirror rows").
    pub unless_superseded: bool,
}

/// Inbox rows to mark applied, each with the tenant and conflict to record on it.
type Settled<'a> = Vec<(&'a str, Option<String>, Option<String>)>;

/// The conflict clause of a mirror write: a state replaces the stored one unless that is newer.
macro_rules! upsert_state {
    () => {
        "ON CONFLICT (object_type, object_id) DO UPDATE SET customer_id = excluded.customer_id, \
         status = excluded.status, created = excluded.created, version = excluded.version, \
         deleted = excluded.deleted, payload = excluded.payload, \
         synced_at = CASE WHEN mirror_objects.payload = excluded.payload \
         AND mirror_objects.deleted = excluded.deleted \
         THEN mirror_objects.synced_at ELSE excluded.synced_at END \
         WHERE mirror_objects.version <= excluded.version"
    };
}

/// Stores states of distinct objects unless the stored ones are newer, a statement per 200;
/// evaluates to the keys of those written.
macro_rules! write_states {
    ($tx:expr, $states:expr, $now_ms:expr) => {{
        let states: &[&ObjectState] = $states;
        let mut written = std::collections::HashSet::new();
        for chunk in states.chunks(200) {
            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO mirror_objects (object_type, object_id, customer_id, status, created, \
                 version, deleted, payload, synced_at) ",
            );
            insert.push_values(chunk, |mut row, state| {
                row.push_bind(&state.object_type)
                    .push_bind(&state.object_id)
                    .push_bind(&state.customer_id)
                    .push_bind(&state.status)
                    .push_bind(state.created)
                    .push_bind(state.version)
                    .push_bind(state.deleted)
                    .push_bind(&state.payload)
                    .push_bind($now_ms);
            });
            insert.push(concat!(
                " ",
                upsert_state!(),
                " RETURNING object_type, object_id"
            ));
            let rows: Vec<(String, String)> = insert.build_query_as().fetch_all(&mut *$tx).await?;
            written.extend(rows);
        }
        written
    }};
}

/// Marks the inbox row that brought a refetched state applied, recording that state and its
/// version on it, for replay.
macro_rules! settle_refetched {
    ($tx:expr, $event_id:expr, $outcome:expr, $state:expr, $now_ms:expr) => {{
        let (outcome, state): (&ApplyOutcome, &ObjectState) = ($outcome, $state);
        sqlx::query(
            "UPDATE inbox_events SET status = 'applied', applied_at = $2, tenant_id = $3, \
             last_error = $4, attempts = attempts + 1, applied_payload = $5, \
             applied_version = $6 WHERE event_id = $1",
        )
        .bind($event_id)
        .bind($now_ms)
        .bind(&outcome.tenant_id)
        .bind(&outcome.conflict)
        .bind(state.payload.as_str())
        .bind(state.version)
        .execute($tx)
        .await?;
    }};
}

/// Marks inbox rows applied, a statement per 500 rows, each row with its tenant and conflict.
macro_rules! settle_rows {
    ($tx:expr, $settled:expr, $now_ms:expr) => {{
        let settled: &Settled = $settled;
        for chunk in settled.chunks(500) {
            let mut update = sqlx::QueryBuilder::new(
                "UPDATE inbox_events SET status = 'applied', applied_at = ",
            );
            update.push_bind($now_ms);
            update.push(
                ", tenant_id = settled.column2, last_error = settled.column3, \
                 attempts = attempts + 1 FROM (",
            );
            update.push_values(chunk, |mut row, (event_id, tenant_id, conflict)| {
                row.push_bind(*event_id)
                    .push_bind(tenant_id)
                    .push_bind(conflict);
            });
            update.push(") AS settled WHERE inbox_events.event_id = settled.column1");
            update.build().execute(&mut *$tx).await?;
        }
    }};
}

/// Applies a round of items (states of distinct objects) on any transaction: their states in
/// one statement per 200, the periods of those written, the tenant links of the customers
/// among them and the tenants of the rest in a few statements for the round. The inbox rows to
/// mark applied afterwards (all but a refetched state's own row) join `settled`. Evaluates to
/// the items' outcomes, in order.
macro_rules! apply_round {
    ($tx:expr, $round:expr, $settled:expr, $now_ms:expr) => {{
        let round: &[&Apply] = $round;
        let states: Vec<&ObjectState> = round.iter().map(|item| &item.state).collect();
        let stored = write_states!(&mut *$tx, &states, $now_ms);
        let written: Vec<bool> = states
            .iter()
            .map(|s| stored.contains(&(s.object_type.clone(), s.object_id.clone())))
            .collect();
        for state in states
            .iter()
            .zip(&written)
            .filter(|(_, w)| **w)
            .map(|(s, _)| *s)
        {
            upsert_periods!(&mut *$tx, state);
        }
        // A deleted customer claims no tenant: it lets go of its own.
        let customers: Vec<(&str, Option<&TenantClaim>)> = round
            .iter()
            .zip(&written)
            .filter(|(item, w)| **w && item.state.object_type == "customer")
            .map(|(item, _)| {
                let claim = item.claim.as_ref().filter(|_| !item.state.deleted);
                (item.state.object_id.as_str(), claim)
            })
            .collect();
        let conflicts = if customers.is_empty() {
            std::collections::HashMap::new()
        } else {
            link_tenants!($tx, &customers, $now_ms)
        };
        // A customer that just took the tenant it claims belongs to it; the others are read.
        let took: Vec<Option<String>> = round
            .iter()
            .zip(&written)
            .map(|(item, w)| match &item.claim {
                Some(claim)
                    if *w
                        && item.state.object_type == "customer"
                        && !item.state.deleted
                        && !conflicts.contains_key(&item.state.object_id) =>
                {
                    Some(claim.tenant_id.clone())
                }
                _ => None,
            })
            .collect();
        let unknown: Vec<&str> = (round.iter().zip(&took))
            .filter(|(_, took)| took.is_none())
            .filter_map(|(item, _)| item.state.customer_id.as_deref())
            .collect();
        let tenants = if unknown.is_empty() {
            std::collections::HashMap::new()
        } else {
            tenants_of!($tx, &unknown)
        };
        let mut outcomes = Vec::with_capacity(round.len());
        for ((item, written), took) in round.iter().zip(written).zip(took) {
            let state = &item.state;
            let tenant_id = took.or_else(|| {
                let customer = state.customer_id.as_ref()?;
                tenants.get(customer).cloned()
            });
            let conflict = conflicts
                .get(&state.object_id)
                .filter(|_| written && state.object_type == "customer");
            let outcome = ApplyOutcome {
                written,
                tenant_id,
                conflict: conflict.cloned(),
            };
            for (i, event_id) in item.event_ids.iter().enumerate() {
                if item.refetched && i + 1 == item.event_ids.len() {
                    settle_refetched!(&mut *$tx, event_id, &outcome, state, $now_ms);
                } else {
                    let settled = (outcome.tenant_id.clone(), outcome.conflict.clone());
                    $settled.push((event_id.as_str(), settled.0, settled.1));
                }
            }
            outcomes.push(outcome);
        }
        outcomes
    }};
}

/// The items in rounds of distinct objects: round k holds the k-th state of each object, in
/// order. Several states of one object are so written one after another.
fn rounds(items: &[Apply]) -> Vec<Vec<usize>> {
    let mut seen: std::collections::HashMap<(&str, &str), usize> = Default::default();
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let key = (
            item.state.object_type.as_str(),
            item.state.object_id.as_str(),
        );
        let round = seen.entry(key).or_insert(0);
        if *round == rounds.len() {
            rounds.push(Vec::new());
        }
        rounds[*round].push(i);
        *round += 1;
    }
    rounds
}

impl Mirror<'_> {
    /// In one transaction, for each item: stores its state unless a newer one is there, links or
    /// unlinks the tenant of a customer, and marks its inbox rows applied.
    pub async fn apply(
        &self,
        items: &[Apply],
        now_ms: i64,
    ) -> Result<Vec<ApplyOutcome>, StoreError> {
        let outcomes = self.apply_with(items, None, now_ms).await?;
        Ok(outcomes.unwrap_or_default())
    }

    /// [`Mirror::apply`], storing a command's confirmed state (the first item) and ending the
    /// command in the same transaction; `None` when that was refused as superseded.
    pub async fn apply_with(
        &self,
        items: &[Apply],
        confirmed: Option<Confirmed<'_>>,
        now_ms: i64,
    ) -> Result<Option<Vec<ApplyOutcome>>, StoreError> {
        let outcomes = on_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            if let Some(c) = &confirmed {
                insert_event!(&mut *tx, c.record, "pending", now_ms).await?;
                settle_command!(&mut *tx, c.command, c.settlement, now_ms);
            }
            let mut settled: Settled = Vec::with_capacity(items.len());
            let mut outcomes = vec![ApplyOutcome::default(); items.len()];
            for round in rounds(items) {
                let members: Vec<&Apply> = round.iter().map(|&i| &items[i]).collect();
                let applied = apply_round!(tx, &members, settled, now_ms);
                for (i, outcome) in round.into_iter().zip(applied) {
                    outcomes[i] = outcome;
                }
            }
            if confirmed.is_some_and(|c| c.unless_superseded)
                && outcomes.first().is_some_and(|o| !o.written)
            {
                tx.rollback().await?;
                return Ok(None);
            }
            // The other rows are settled together, a statement for many rows.
            settle_rows!(tx, &settled, now_ms);
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Some(outcomes))
        })?;
        Ok(outcomes)
    }
}
