//! `POST /v1/usage` (ingestion) and `GET /v1/tenants/{tenant_id}/usage` (the ledger).

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, Query, State};
use chrono::DateTime;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::auth::KeyScope;
use super::error::ApiError;
use super::json::ApiJson;
use super::tenants::load;
use crate::catalog::{Aggregation, Meter};
use crate::domain::rfc3339;
use crate::metering::counters::{Bucket, HOUR_MS, Sample};
use crate::metering::{Ingested, billing_period};
use crate::state::AppState;
use crate::store::{UsageRow, now_ms};

/// Largest `POST /v1/usage` body: 10,000 events with room for their properties.
pub const MAX_BODY: usize = 32 * 1024 * 1024;
/// Longest range `GET .../usage` folds.
const MAX_RANGE_MS: i64 = 366 * 24 * HOUR_MS;
/// Events read from the database at a time while folding a range: the memory a request holds
/// is one page and the buckets, however many events the range has.
pub const FOLD_PAGE: u32 = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageIn {
    /// Each event is checked on its own; one bad event does not refuse the batch.
    pub events: Vec<Value>,
}

/// Stores the batch's valid events durably and counts them, or refuses the whole batch.
pub async fn post_usage(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    ApiJson(body): ApiJson<UsageIn>,
) -> Result<Json<Ingested>, ApiError> {
    let max = state.settings.metering.max_batch;
    if body.events.len() > max {
        return Err(ApiError::bad_request(
            "too_many_events",
            format!("at most {max} events per call"),
        )
        .with_field("events"));
    }
    let visible = |tenant: &str| scope.allows(tenant);
    Ok(Json(
        state
            .metering
            .ingest_visible(&body.events, now_ms(), &visible)
            .await?,
    ))
}

#[derive(Debug, Serialize)]
pub struct UsageOut {
    pub tenant_id: String,
    pub meter: String,
    pub aggregation: Aggregation,
    pub group_by: &'static str,
    pub from: String,
    pub to: String,
    /// Exact decimals, as strings.
    pub total: String,
    pub pushed: String,
    pub unpushed: String,
    pub buckets: Vec<BucketOut>,
}

#[derive(Debug, Serialize)]
pub struct BucketOut {
    pub start: String,
    pub end: String,
    pub events: usize,
    pub quantity: String,
    /// Carried by meter events Stripe acknowledged.
    pub pushed: String,
    /// Not (yet) acknowledged by Stripe: waiting, being retried, refused or too old to send.
    pub unpushed: String,
}

#[derive(Default)]
struct Split {
    events: usize,
    all: Option<Bucket>,
    pushed: Option<Bucket>,
    unpushed: Option<Bucket>,
}

fn fold(into: &mut Option<Bucket>, bucket: &Bucket) {
    match into {
        Some(held) => held.merge(bucket),
        None => *into = Some(bucket.clone()),
    }
}

fn figure(bucket: &Option<Bucket>) -> String {
    bucket
        .as_ref()
        .map_or(Decimal::ZERO, Bucket::value)
        .normalize()
        .to_string()
}

/// A tenant's usage of one meter in `[from, to)` (default: the current billing period), by hour
/// or day, with the pushed and unpushed parts.
pub async fn get_usage(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(tenant_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<UsageOut>, ApiError> {
    let tenant = load(&state, &scope, &tenant_id).await?;
    let meter_name = query.get("meter").ok_or_else(|| {
        ApiError::bad_request("missing_field", "meter is required").with_field("meter")
    })?;
    let meter = state
        .metering
        .catalog
        .meters
        .get(meter_name)
        .ok_or_else(|| invalid("meter", format!("no meter `{meter_name}` in the catalog")))?;
    let (period_start, period_end) = billing_period(&state.db, &tenant.tenant_id, now_ms()).await?;
    let from = time(&query, "from")?.unwrap_or(period_start);
    let to = time(&query, "to")?.unwrap_or(period_end);
    if to <= from || to - from > MAX_RANGE_MS {
        return Err(invalid(
            "to",
            "to must be after from, at most 366 days later".to_owned(),
        ));
    }
    let (group_by, step) = match query.get("group_by").map(String::as_str) {
        None | Some("day") => ("day", 24 * HOUR_MS),
        Some("hour") => ("hour", HOUR_MS),
        Some(other) => {
            return Err(invalid(
                "group_by",
                format!("group_by must be hour or day, not `{other}`"),
            ));
        }
    };
    let (spans, whole) = fold_pages(&state, (&tenant.tenant_id, meter), (from, to), step).await?;
    let buckets = spans
        .into_iter()
        .map(|(start, split)| BucketOut {
            start: rfc3339(start),
            end: rfc3339((start + step).min(to)),
            events: split.events,
            quantity: figure(&split.all),
            pushed: figure(&split.pushed),
            unpushed: figure(&split.unpushed),
        })
        .collect();
    Ok(Json(UsageOut {
        tenant_id: tenant.tenant_id,
        meter: meter.name.clone(),
        aggregation: meter.aggregation,
        group_by,
        from: rfc3339(from),
        to: rfc3339(to),
        total: figure(&whole.all),
        pushed: figure(&whole.pushed),
        unpushed: figure(&whole.unpushed),
        buckets,
    }))
}

fn invalid(field: &str, message: String) -> ApiError {
    ApiError::bad_request("invalid_value", message).with_field(field)
}

/// An optional RFC 3339 time from the query, in Unix ms.
fn time(query: &HashMap<String, String>, field: &str) -> Result<Option<i64>, ApiError> {
    query
        .get(field)
        .map(|raw| {
            DateTime::parse_from_rfc3339(raw)
                .map(|t| t.timestamp_millis())
                .map_err(|_| invalid(field, format!("{field} must be an RFC 3339 time")))
        })
        .transpose()
}

/// Folds the range's events a page at a time into spans of `step` from `from` on, and into
/// the whole range, each with its pushed and unpushed parts.
async fn fold_pages(
    state: &AppState,
    (tenant_id, meter): (&str, &Meter),
    (from, to): (i64, i64),
    step: i64,
) -> Result<(BTreeMap<i64, Split>, Split), ApiError> {
    let usage = state.db.usage();
    let mut spans: BTreeMap<i64, Split> = BTreeMap::new();
    let mut whole = Split::default();
    let mut after: Option<(i64, String)> = None;
    loop {
        let rows = usage
            .page_of_tenant(
                (tenant_id, &meter.name),
                (from, to),
                after.as_ref(),
                FOLD_PAGE,
            )
            .await?;
        split_by_span(meter, &rows, (from, step), (&mut spans, &mut whole));
        if rows.len() < FOLD_PAGE as usize {
            return Ok((spans, whole));
        }
        after = rows
            .last()
            .map(|(r, _)| (r.occurred_at, r.event_id.clone()));
    }
}

/// Folds the rows into spans of `step` from `from` on, and into the whole range.
fn split_by_span(
    meter: &Meter,
    rows: &[(UsageRow, Option<String>)],
    (from, step): (i64, i64),
    (spans, whole): (&mut BTreeMap<i64, Split>, &mut Split),
) {
    for (row, push_status) in rows {
        let sample = Sample {
            quantity: Decimal::from_str(&row.quantity).unwrap_or_default(),
            at_ms: row.occurred_at,
            event_id: &row.event_id,
            unique_value: row.unique_value.as_deref(),
        };
        let bucket = Bucket::of(meter.aggregation, sample);
        let start = from + (row.occurred_at - from).div_euclid(step) * step;
        for split in [spans.entry(start).or_default(), &mut *whole] {
            split.events += 1;
            fold(&mut split.all, &bucket);
            // A superseded push's events went out in the newer value of their period.
            if matches!(push_status.as_deref(), Some("sent" | "superseded")) {
                fold(&mut split.pushed, &bucket);
            } else {
                fold(&mut split.unpushed, &bucket);
            }
        }
    }
}
