//! Check-and-record on PostgreSQL: a batch of records, each stored only when its meter's figure
//! allows it, under one lock per tenant and meter, in one transaction.

use std::collections::HashSet;

use super::DistinctDelta;
use super::usage::{
    CHUNK, Inserted, Payloads, figure_select, insert_usage, notify_usage, usage_columns,
};
use super::{StoreError, Usage, UsageRow};
use crate::credits::burn::{Burn, CreditCheck};
use crate::domain::Ceiling;

/// The figure after a check's record, when it follows from the figure before (sums, counts,
/// maxima); `None` when it must be read again.
fn after_of(check: &RecordCheck, before: Option<&str>) -> Option<String> {
    use crate::catalog::Aggregation;
    use rust_decimal::Decimal;
    use std::str::FromStr;
    let before = before.map_or(Ok(Decimal::ZERO), Decimal::from_str).ok()?;
    let quantity = Decimal::from_str(&check.row.quantity).ok()?;
    let after = match check.aggregation {
        Aggregation::Sum => before.checked_add(quantity)?,
        Aggregation::Count => before + Decimal::ONE,
        Aggregation::Max if before.is_zero() && quantity.is_sign_negative() => return None,
        Aggregation::Max => before.max(quantity),
        Aggregation::Last | Aggregation::UniqueCount => return None,
    };
    Some(after.normalize().to_string())
}

/// For each check, whether its event is stored and its meter's figure over its period, read on
/// a transaction in one statement per aggregation.
async fn figures_in(
    tx: &mut sqlx::PgConnection,
    checks: &[RecordCheck],
) -> Result<Vec<(bool, Option<String>)>, sqlx::Error> {
    let mut figures = vec![(false, None); checks.len()];
    let mut aggregations: Vec<crate::catalog::Aggregation> =
        checks.iter().map(|c| c.aggregation).collect();
    aggregations.dedup();
    for aggregation in aggregations {
        let of: Vec<usize> = (0..checks.len())
            .filter(|&i| checks[i].aggregation == aggregation)
            .collect();
        let column = |f: fn(&RecordCheck) -> String| -> Vec<String> {
            of.iter().map(|&i| f(&checks[i])).collect()
        };
        let sql = format!(
            // A scalar subquery, not EXISTS: PostgreSQL may turn EXISTS into a hash of the
            // whole table, built for every batch.
            "SELECT c.n, (SELECT TRUE FROM usage_events e WHERE e.tenant_id = c.tenant \
             AND e.event_id = c.eid) IS NOT NULL, ({} FROM usage_events e WHERE e.tenant_id = c.tenant \
             AND e.meter = c.meter AND e.occurred_at >= c.from_ms AND e.occurred_at < c.to_ms) \
             FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[]) \
             WITH ORDINALITY AS c (tenant, meter, from_ms, to_ms, eid, n)",
            figure_select(aggregation)
        );
        let found: Vec<(i64, bool, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(column(|c| c.row.tenant_id.clone()))
            .bind(column(|c| c.row.meter.clone()))
            .bind(of.iter().map(|&i| checks[i].period.0).collect::<Vec<_>>())
            .bind(of.iter().map(|&i| checks[i].period.1).collect::<Vec<_>>())
            .bind(column(|c| c.row.event_id.clone()))
            .fetch_all(&mut *tx)
            .await?;
        for (n, existed, figure) in found {
            figures[of[(n - 1) as usize]] = (existed, figure);
        }
    }
    Ok(figures)
}

/// One check-and-record of a [`Usage::record_checked`] batch.
pub struct RecordCheck {
    pub row: UsageRow,
    pub aggregation: crate::catalog::Aggregation,
    pub period: (i64, i64),
    /// The transaction lock of its tenant and meter.
    pub lock_key: i64,
    /// The most the figure may be for the record to be stored.
    pub ceiling: Ceiling,
    /// For a credit-priced feature: stored only when the tenant's credits cover it.
    pub credit: Option<CreditCheck>,
}

/// What [`Usage::record_checked`] found and did. Figures are exact decimals as text (`None`:
/// no usage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedRecord {
    /// The event id was stored before: nothing written.
    pub existed: bool,
    /// The event was stored now.
    pub stored: bool,
    pub before: Option<String>,
    pub after: Option<String>,
    /// For a credit check: the balance before, and with the event (what it is after, if stored).
    pub burn: Option<Burn>,
}

/// Judges every credit check of a batch on its transaction, from the tenants' grants (kept in
/// the checks' book while their version, read here, is current) and running totals (recomputed
/// here, under the tenant's credit lock, if a grant moved their cuts): a statement or two
/// whatever the batch's size and the tenants' usage histories.
async fn burns_in(
    tx: &mut sqlx::PgConnection,
    checks: &[RecordCheck],
) -> Result<(Vec<Option<Burn>>, HashSet<String>), sqlx::Error> {
    use super::credit_totals::{grant_rows_pg, recompute_pg, states_pg};
    use crate::credits::book::{TenantGrants, segment_usage};
    let credit: Vec<(usize, &CreditCheck)> = (checks.iter().enumerate())
        .filter_map(|(i, c)| c.credit.as_ref().map(|credit| (i, credit)))
        .collect();
    let mut burns = vec![None; checks.len()];
    if credit.is_empty() {
        return Ok((burns, HashSet::new()));
    }
    let tenant = |i: usize| checks[i].row.tenant_id.as_str();
    let tenants: Vec<String> = credit.iter().map(|(i, _)| tenant(*i).to_owned()).collect();
    let mut states = states_pg(&mut *tx, &tenants).await?;
    let state_of = |states: &std::collections::HashMap<String, super::CreditState>, t: &str| {
        states.get(t).cloned().unwrap_or_default()
    };
    let missing: Vec<String> = (credit.iter())
        .filter(|(i, c)| {
            c.book
                .cached(tenant(*i), &state_of(&states, tenant(*i)))
                .is_none()
        })
        .map(|(i, _)| tenant(*i).to_owned())
        .collect();
    let mut read = match missing.is_empty() {
        true => Default::default(),
        false => grant_rows_pg(&mut *tx, &missing).await?,
    };
    for (i, c) in credit {
        let t = tenant(i);
        let mut state = state_of(&states, t);
        let grants = match read.remove(t) {
            Some(rows) => c.book.keep(t, TenantGrants::read(rows)),
            None => match c.book.cached(t, &state) {
                Some(grants) => grants,
                None => c.book.keep(t, TenantGrants::read(Default::default())),
            },
        };
        if !c.book.totals_current(&state, &grants) {
            let cuts = c.book.cuts_for(&grants);
            state.totals = recompute_pg(&mut *tx, t, &cuts).await?;
            state.cuts = Some(cuts);
            states.insert(t.to_owned(), state.clone());
        }
        let usage = segment_usage(&grants.points, &state.totals);
        burns[i] = Some(c.judge_with(&grants, usage, &checks[i].row));
    }
    let alarmed = (states.into_iter())
        .filter_map(|(tenant, state)| state.alarmed.then_some(tenant))
        .collect();
    Ok((burns, alarmed))
}

/// The locks of a batch, each with whether it is taken shared: every check's own (exclusive),
/// and the credit lock (shared) of each tenant whose row a credit-priced meter's totals keep.
fn locks_of(checks: &[RecordCheck], credits: super::CreditWrite<'_>) -> (Vec<i64>, Vec<bool>) {
    let mut locks: std::collections::BTreeMap<i64, bool> = std::collections::BTreeMap::new();
    for check in checks {
        locks.insert(check.lock_key, false);
    }
    for check in checks.iter().filter(|c| credits.keeps(&c.row.meter)) {
        let key = super::lease_key(&super::credit_lock(&check.row.tenant_id));
        locks.entry(key).or_insert(true);
    }
    locks.into_iter().unzip()
}

impl Usage<'_> {
    /// Check-and-records on PostgreSQL, a batch in one transaction on one pooled connection,
    /// in a handful of statements whatever its size: takes every check's transaction lock (one
    /// per tenant and meter, or per tenant for credits, across replicas; with the credit locks
    /// of the rows the running totals keep, shared; all in key order, so that two batches
    /// never wait on each other in a cycle), reads whether each event is stored and each meter's figure,
    /// stores the rows whose figure is within their ceiling, notifies the other replicas, and
    /// reads the figures after. The checks' lock keys must differ (a batch holds one check
    /// per tenant and meter). One commit for the batch: a transaction that notifies commits
    /// alone database-wide, so a commit per record would bound every replica's records by one
    /// commit's latency.
    pub async fn record_checked(
        &self,
        checks: &[RecordCheck],
        payloads: &Payloads<'_>,
    ) -> Result<(Vec<CheckedRecord>, Vec<DistinctDelta>), StoreError> {
        let super::Db::Postgres(pool) = self.db else {
            return Err(StoreError::Setup(
                "check-and-record in one transaction is for PostgreSQL".to_owned(),
            ));
        };
        let mut tx = pool.begin().await?;
        let credits = super::CreditWrite {
            locked: true,
            alarms: false,
            ..self.credit_write()
        };
        let (keys, shared) = locks_of(checks, credits);
        sqlx::query(
            "SELECT CASE WHEN s THEN pg_advisory_xact_lock_shared(k) ELSE pg_advisory_xact_lock(k) END \
             FROM (SELECT k, s FROM unnest($1::bigint[], $2::bool[]) AS u (k, s) ORDER BY k) AS keys",
        )
        .bind(&keys)
        .bind(&shared)
        .execute(&mut *tx)
        .await?;
        let before = figures_in(&mut tx, checks).await?;
        let (burns, alarmed) = burns_in(&mut tx, checks).await?;
        let allowed: Vec<usize> = (0..checks.len())
            .filter(|&i| {
                let (existed, figure) = &before[i];
                let figure = figure.as_deref().and_then(|f| f.parse().ok());
                let covered = burns[i].as_ref().is_none_or(|b| b.covered);
                !existed && covered && checks[i].ceiling.admits(figure)
            })
            .collect();
        let rows: Vec<UsageRow> = allowed.iter().map(|&i| checks[i].row.clone()).collect();
        let Inserted { new, distinct } = insert_usage!(&mut *tx, &rows, payloads, true, credits);
        let stored: Vec<usize> = allowed
            .iter()
            .zip(&new)
            .filter_map(|(&i, new)| new.then_some(i))
            .collect();
        // Sums, counts and maxima after a record follow from before; the others are read again.
        let reread = stored
            .iter()
            .any(|&i| after_of(&checks[i], before[i].1.as_deref()).is_none());
        let after = if reread {
            figures_in(&mut tx, checks).await?
        } else {
            before.clone()
        };
        // A burn that takes the balance below its threshold: the crossing, in this transaction.
        // Of the tenants with low-balance settings only (most have none: no statement at all).
        let changes: Vec<_> = (stored.iter())
            .filter(|&&i| alarmed.contains(&checks[i].row.tenant_id))
            .filter_map(|&i| Some(burns[i].as_ref()?.change(&checks[i].row.tenant_id)))
            .collect();
        super::credit_alerts::balances_changed_in(&mut tx, &changes).await?;
        tx.commit().await?;
        let records = before
            .into_iter()
            .zip(after)
            .zip(burns)
            .enumerate()
            .map(|(i, (((existed, before), (_, after)), burn))| {
                let stored = stored.contains(&i);
                let after = match after_of(&checks[i], before.as_deref()) {
                    Some(figure) if stored => Some(figure),
                    _ if stored => after,
                    _ => before.clone(),
                };
                CheckedRecord {
                    // Allowed and not new: the same event id came in under another meter.
                    existed: existed || (allowed.contains(&i) && !stored),
                    stored,
                    after,
                    before,
                    burn,
                }
            })
            .collect();
        Ok((records, distinct))
    }
}
