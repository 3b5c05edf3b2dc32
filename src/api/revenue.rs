//! Revenue: `GET /v1/revenue` (every tenant, or one) and `GET /v1/tenants/{t}/revenue` (one
//! tenant, with the invoice lines behind the figures). The schedule comes from the revenue
//! cache: built from the mirror again only when what it reads changed.

use std::collections::HashMap;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::auth::KeyScope;
use super::error::ApiError;
use super::tenants::load;
use crate::domain::{TenantId, parse_time};
use crate::revenue::report::date;
use crate::revenue::{Day, Group, Schedule, day_of, report};
use crate::state::AppState;

/// Longest window, in days (ten years).
const MAX_DAYS: i64 = 3660;

/// The window and grouping a request asks for.
pub struct Window {
    pub from: Day,
    pub to: Day,
    pub group: Group,
    pub currency: Option<String>,
}

impl Window {
    pub fn from_query(query: &HashMap<String, String>) -> Result<Self, ApiError> {
        let day = |field: &'static str| -> Result<Day, ApiError> {
            let text = query.get(field).ok_or_else(|| {
                ApiError::bad_request("missing_value", format!("{field} is required"))
                    .with_field(field)
            })?;
            parse_time(text)
                .map(|ms| day_of(ms.div_euclid(1000)))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_value",
                        format!("{field} must be a YYYY-MM-DD date or an RFC 3339 time"),
                    )
                    .with_field(field)
                })
        };
        let (from, to) = (day("from")?, day("to")?);
        if to <= from || to - from > MAX_DAYS {
            return Err(ApiError::bad_request(
                "invalid_value",
                format!("to must be after from, at most {MAX_DAYS} days later"),
            )
            .with_field("to"));
        }
        let group = match query.get("group_by") {
            None => Group::Month,
            Some(g) => Group::parse(g).ok_or_else(|| {
                ApiError::bad_request("invalid_value", "group_by must be day or month")
                    .with_field("group_by")
            })?,
        };
        let currency = match query.get("currency") {
            None => None,
            Some(c) if c.len() == 3 && c.chars().all(|ch| ch.is_ascii_alphabetic()) => {
                Some(c.to_ascii_lowercase())
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    "currency must be a three-letter ISO code",
                )
                .with_field("currency"));
            }
        };
        Ok(Self {
            from,
            to,
            group,
            currency,
        })
    }
}

/// The report as JSON: the window and one row per period and currency.
pub fn render(schedule: &Schedule, window: &Window, tenant: Option<&str>) -> Value {
    let r = report(
        schedule,
        window.from,
        window.to,
        window.group,
        window.currency.as_deref(),
    );
    json!({
        "from": date(window.from),
        "to": date(window.to),
        "group_by": match window.group { Group::Day => "day", Group::Month => "month" },
        "tenant_id": tenant,
        "currency": window.currency,
        "periods": r.rows.iter().map(|row| row.to_json()).collect::<Vec<_>>(),
    })
}

/// The schedule of one tenant or every tenant, from the cache when nothing changed.
async fn schedule(
    state: &AppState,
    tenant: Option<&str>,
) -> Result<std::sync::Arc<Schedule>, ApiError> {
    let metering = &state.metering;
    let inputs = (&state.db, &*metering.catalog, &*state.metrics);
    Ok(metering.revenue.schedule(inputs, tenant).await?)
}

pub async fn revenue(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let window = Window::from_query(&query)?;
    let tenant = match query.get("tenant") {
        Some(t) => {
            let tenant = TenantId::parse(t)?;
            if !scope.allows(tenant.as_str()) {
                return Err(ApiError::not_found(
                    "tenant_not_found",
                    format!("no tenant `{tenant}`"),
                ));
            }
            Some(tenant.as_str().to_owned())
        }
        None if scope.is_limited() => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "a tenant-scoped key must name its tenant (tenant=...)",
            ));
        }
        None => None,
    };
    let schedule = schedule(&state, tenant.as_deref()).await?;
    Ok(Json(render(&schedule, &window, tenant.as_deref())))
}

pub async fn tenant_revenue(
    State(state): State<AppState>,
    Extension(scope): Extension<KeyScope>,
    Path(tenant_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let tenant = load(&state, &scope, &tenant_id).await?;
    let window = Window::from_query(&query)?;
    let schedule = schedule(&state, Some(&tenant.tenant_id)).await?;
    let mut out = render(&schedule, &window, Some(&tenant.tenant_id));
    let in_window = |entries: &[(Day, i64)]| -> i64 {
        entries
            .iter()
            .filter(|(d, _)| *d >= window.from && *d < window.to)
            .map(|(_, a)| a)
            .sum()
    };
    let wanted = |c: &str| window.currency.as_deref().is_none_or(|w| w == c);
    // The lines behind the window's figures: billed in it, or earning (or taken back) in it.
    let touches = |entries: &[(Day, i64)], billed: Day| {
        (billed >= window.from && billed < window.to)
            || entries
                .iter()
                .any(|(d, _)| *d >= window.from && *d < window.to)
    };
    let lines: Vec<Value> = schedule
        .lines
        .iter()
        .filter(|l| wanted(&l.currency))
        .filter(|l| {
            touches(&l.entries, l.billed_day)
                || schedule.adjustments.iter().any(|a| {
                    a.invoice_id == l.invoice_id && a.line_id == l.line_id && touches(&a.entries, a.day)
                })
        })
        .map(|l| {
            let adjustments: Vec<Value> = schedule
                .adjustments
                .iter()
                .filter(|a| a.invoice_id == l.invoice_id && a.line_id == l.line_id)
                .map(|a| {
                    json!({"source": a.source, "cause": a.cause, "date": date(a.day),
                        "amount": a.amount, "recognised_in_window": in_window(&a.entries)})
                })
                .collect();
            json!({
                "invoice": l.invoice_id,
                "line": l.line_id,
                "kind": l.kind.as_str(),
                "currency": l.currency,
                "amount": l.amount,
                "billed_on": date(l.billed_day),
                "service_start": l.service_start.map(date),
                "service_end": l.service_end.map(date),
                "uncollectible": l.uncollectible,
                "recognised_in_window": in_window(&l.entries),
                "recognised_by_end": l.entries.iter().filter(|(d, _)| *d < window.to).map(|(_, a)| a).sum::<i64>(),
                "adjustments": adjustments,
            })
        })
        .collect();
    out["lines"] = json!(lines);
    Ok(Json(out))
}
