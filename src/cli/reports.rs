//! The reporting commands, `reconcile` and `revenue`: they open a database `migrate`
//! prepared and print a report on stdout as a table, JSON or CSV.

use super::{Failure, Format};
use crate::config::Settings;
use crate::state::{AppError, AppState};

pub(super) async fn reconcile(
    settings: Settings,
    from: &str,
    to: &str,
    tenant: Option<String>,
    format: Format,
    dry_run: bool,
) -> Result<(), Failure> {
    use crate::domain::parse_time;
    let time = |name: &str, text: &str| {
        parse_time(text).ok_or_else(|| {
            Failure::Invalid(format!("--{name} must be an RFC 3339 time or YYYY-MM-DD"))
        })
    };
    let params = crate::reconcile::Params {
        from_ms: time("from", from)?,
        to_ms: time("to", to)?,
        tenant,
        dry_run,
        invoice: None,
    };
    if params.to_ms <= params.from_ms {
        return Err(Failure::Invalid("--to must be after --from".to_owned()));
    }
    if let Some(tenant) = &params.tenant {
        crate::domain::TenantId::parse(tenant)
            .map_err(|e| Failure::Invalid(format!("--tenant: {}", e.message)))?;
    }
    let state = AppState::open_existing(settings)
        .await
        .map_err(|e| match e {
            AppError::Catalog(_) => Failure::Invalid(e.to_string()),
            _ => Failure::CouldNotRun(e.to_string()),
        })?;
    let (run_id, report) = state
        .reconciler()
        .run(&params, "cli")
        .await
        .map_err(|e| Failure::CouldNotRun(e.to_string()))?;
    state.db.close().await;
    let items: Vec<serde_json::Value> = report.items.iter().map(|i| i.to_json()).collect();
    print_reconciliation(&run_id, &report.summary, &items, format);
    if items.is_empty() {
        Ok(())
    } else {
        Err(Failure::Findings)
    }
}

/// Prints a reconciliation's report as a table, JSON (`{"id","summary","items"}`) or CSV.
fn print_reconciliation(
    run_id: &str,
    summary: &impl serde::Serialize,
    items: &[serde_json::Value],
    format: Format,
) {
    match format {
        Format::Json => {
            let out = serde_json::json!({"id": run_id, "summary": summary, "items": items});
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        }
        Format::Csv => {
            println!("area,finding,tenant_id,subject,cause,detail");
            for item in items {
                println!(
                    "{},{},{},{},{},{}",
                    csv(&item["area"]),
                    csv(&item["finding"]),
                    csv(&item["tenant_id"]),
                    csv(&subject(item)),
                    csv(&item["cause"]),
                    csv(&serde_json::Value::String(item.to_string()))
                );
            }
        }
        Format::Table => {
            println!("reconciliation {run_id}: {} finding(s)", items.len());
            println!(
                "{:<8} {:<22} {:<20} {:<40} cause",
                "area", "finding", "tenant", "subject"
            );
            for item in items {
                println!(
                    "{:<8} {:<22} {:<20} {:<40} {}",
                    item["area"].as_str().unwrap_or_default(),
                    item["finding"].as_str().unwrap_or_default(),
                    item["tenant_id"].as_str().unwrap_or("-"),
                    subject(item).as_str().unwrap_or_default(),
                    item["cause"].as_str().unwrap_or_default()
                );
            }
        }
    }
}

/// What an item is about, in a word: the invoice, the meter and period, or the object.
fn subject(item: &serde_json::Value) -> serde_json::Value {
    let text = match item["area"].as_str() {
        Some("money") => item["invoice"].as_str().unwrap_or_default().to_owned(),
        Some("usage") => format!(
            "{} {}..{}",
            item["meter"].as_str().unwrap_or_default(),
            item["period_start"].as_str().unwrap_or_default(),
            item["period_end"].as_str().unwrap_or_default()
        ),
        Some("credits") => format!(
            "{} burned {} debited {}",
            item["unit"].as_str().unwrap_or_default(),
            item["burned"].as_str().unwrap_or_default(),
            item["vendor_debited"].as_str().unwrap_or_default()
        ),
        _ => item["object_id"].as_str().unwrap_or_default().to_owned(),
    };
    serde_json::Value::String(text)
}

/// One CSV field, quoted when it needs to be.
fn csv(value: &serde_json::Value) -> String {
    let text = match value {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

pub(super) async fn revenue(
    settings: Settings,
    query: std::collections::HashMap<String, String>,
    tenant: Option<String>,
    format: Format,
) -> Result<(), String> {
    use crate::api::revenue::{Window, render};
    let window = Window::from_query(&query).map_err(|e| {
        format!(
            "--{}: {}",
            e.field.unwrap_or_default().replace('_', "-"),
            e.message
        )
    })?;
    let state = AppState::open_existing(settings)
        .await
        .map_err(|e| e.to_string())?;
    let schedule = crate::revenue::load(&state.db, &state.metering.catalog, tenant.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    state.db.close().await;
    let out = render(&schedule, &window, tenant.as_deref());
    let periods = out["periods"].as_array().cloned().unwrap_or_default();
    let kinds = ["subscription", "usage", "one_off", "reversal", "total"];
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default()),
        Format::Csv => {
            println!(
                "currency,start,end,subscription,usage,one_off,reversal,recognised,billed,deferred,uncollectible"
            );
            for p in &periods {
                let recognised: Vec<String> = kinds
                    .iter()
                    .map(|k| p["recognised"][k].to_string())
                    .collect();
                println!(
                    "{},{},{},{},{},{},{}",
                    p["currency"].as_str().unwrap_or_default(),
                    p["start"].as_str().unwrap_or_default(),
                    p["end"].as_str().unwrap_or_default(),
                    recognised.join(","),
                    p["billed"],
                    p["deferred"],
                    p["uncollectible"]
                );
            }
        }
        Format::Table => {
            println!(
                "{:<4} {:<10} {:<10} {:>14} {:>14} {:>14} {:>14} {:>14}",
                "cur",
                "start",
                "end",
                "recognised",
                "of which usage",
                "billed",
                "deferred",
                "uncollectible"
            );
            for p in &periods {
                println!(
                    "{:<4} {:<10} {:<10} {:>14} {:>14} {:>14} {:>14} {:>14}",
                    p["currency"].as_str().unwrap_or_default(),
                    p["start"].as_str().unwrap_or_default(),
                    p["end"].as_str().unwrap_or_default(),
                    p["recognised"]["total"],
                    p["recognised"]["usage"],
                    p["billed"],
                    p["deferred"],
                    p["uncollectible"]
                );
            }
        }
    }
    Ok(())
}
