//! Applying vendor states to the mirror: the one write path. For each state, in one
//! transaction: store it unless a newer one is there, record the billing periods it states, link
//! or unlink the tenant a customer names, and mark the inbox rows it settles applied; for an
//! outbox command's answer, also store its inbox row and end the command.

use super::commands::settle_command;
use super::inbox::insert_event;
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

/// Stores a state unless the stored one is newer, on any transaction; evaluates to whether it
/// was written. The same state again (an own command's echo, a refetch that found nothing new)
/// only moves the version on: `synced_at` stays when the state last changed.
macro_rules! write_state {
    ($tx:expr, $state:expr, $now_ms:expr) => {{
        let state: &ObjectState = $state;
        !write_states!($tx, &[state], $now_ms).is_empty()
    }};
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

/// Links the tenant a customer's state names to it (only if that tenant has no customer yet)
/// and lets go of any tenant it no longer names, on any transaction; evaluates to the conflict
/// when the tenant already belongs to another customer.
macro_rules! link_tenant {
    ($tx:expr, $state:expr, $claim:expr, $now_ms:expr) => {{
        let state: &ObjectState = $state;
        let customer = &state.object_id;
        let claim: Option<&TenantClaim> = $claim.filter(|_| !state.deleted);
        // A deleted customer, or one whose tenant id was removed or changed, lets go.
        sqlx::query(
            "UPDATE tenants SET customer_id = NULL, updated_at = $3 \
             WHERE customer_id = $1 AND ($2 IS NULL OR tenant_id <> $2)",
        )
        .bind(customer)
        .bind(claim.map(|c| c.tenant_id.as_str()))
        .bind($now_ms)
        .execute(&mut *$tx)
        .await?;
        let mut conflict = None;
        if let Some(claim) = claim {
            // A row comes back when the tenant is linked now; otherwise it is read.
            let linked_now: Option<(Option<String>,)> = sqlx::query_as(
                "INSERT INTO tenants (tenant_id, name, email, customer_id, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (tenant_id) DO UPDATE \
                 SET customer_id = excluded.customer_id, updated_at = excluded.updated_at \
                 WHERE tenants.customer_id IS NULL RETURNING customer_id",
            )
            .bind(&claim.tenant_id)
            .bind(&claim.name)
            .bind(&claim.email)
            .bind(customer)
            .bind($now_ms)
            .fetch_optional(&mut *$tx)
            .await?;
            let (linked,): (Option<String>,) = match linked_now {
                Some(row) => row,
                None => {
                    sqlx::query_as("SELECT customer_id FROM tenants WHERE tenant_id = $1")
                        .bind(&claim.tenant_id)
                        .fetch_one(&mut *$tx)
                        .await?
                }
            };
            if linked.as_deref() != Some(customer.as_str()) {
                conflict = Some(format!(
                    "customer {customer} names tenant {} which already belongs to customer {}",
                    claim.tenant_id,
                    linked.unwrap_or_default()
                ));
            }
        }
        conflict
    }};
}

/// The tenant linked to a customer, on any transaction.
macro_rules! tenant_of {
    ($tx:expr, $customer:expr) => {{
        match $customer {
            Some(customer) => sqlx::query_as::<_, (String,)>(
                "SELECT tenant_id FROM tenants WHERE customer_id = $1",
            )
            .bind(customer)
            .fetch_optional($tx)
            .await?
            .map(|(t,)| t),
            None => None,
        }
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

/// Applies one item on any transaction; the inbox rows to mark applied afterwards (all but a
/// refetched state's own row) join `settled`. Evaluates to its outcome.
macro_rules! apply_item {
    ($tx:expr, $item:expr, $written:expr, $settled:expr, $now_ms:expr) => {{
        let Apply {
            state,
            claim,
            event_ids,
            refetched,
        }: &Apply = $item;
        let written: Option<bool> = $written;
        let written = match written {
            Some(written) => written,
            None => write_state!(&mut *$tx, state, $now_ms),
        };
        if written {
            upsert_periods!(&mut *$tx, state);
        }
        let customer = written && state.object_type == "customer";
        let conflict = if customer {
            link_tenant!($tx, state, claim.as_ref(), $now_ms)
        } else {
            None
        };
        // A customer that just took the tenant it claims belongs to it; else it is read.
        let tenant_id = match claim {
            Some(claim) if customer && !state.deleted && conflict.is_none() => {
                Some(claim.tenant_id.clone())
            }
            _ => tenant_of!(&mut *$tx, &state.customer_id),
        };
        let outcome = ApplyOutcome {
            written,
            tenant_id,
            conflict,
        };
        for (i, event_id) in event_ids.iter().enumerate() {
            if *refetched && i + 1 == event_ids.len() {
                settle_refetched!(&mut *$tx, event_id, &outcome, state, $now_ms);
            } else {
                let settled = (outcome.tenant_id.clone(), outcome.conflict.clone());
                $settled.push((event_id.as_str(), settled.0, settled.1));
            }
        }
        outcome
    }};
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
            let mut outcomes = Vec::with_capacity(items.len());
            // States of distinct objects are written together; several states of one object,
            // one after another.
            let mut keys = std::collections::HashSet::new();
            let distinct = items
                .iter()
                .all(|i| keys.insert((&i.state.object_type, &i.state.object_id)));
            let written = if distinct && items.len() > 1 {
                let states: Vec<&ObjectState> = items.iter().map(|i| &i.state).collect();
                Some(write_states!(&mut *tx, &states, now_ms))
            } else {
                None
            };
            for item in items {
                let key = (item.state.object_type.clone(), item.state.object_id.clone());
                let was = written.as_ref().map(|w| w.contains(&key));
                outcomes.push(apply_item!(tx, item, was, settled, now_ms));
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
