//! Credit top-ups and credit balance transactions at Stripe: the calls and the shapes, read
//! tolerantly (numbers or strings, fields missing on older versions and on fakes).
//!
//! A top-up is five calls, each with the command's idempotency key and a suffix naming the
//! step, so that a retry after a crash anywhere replays the steps already done (Stripe answers
//! a repeated key with the first answer) and makes only the missing ones:
//! `POST /v1/invoices` (a draft, excluding other pending items), `POST /v1/invoiceitems` on it,
//! `POST /v1/invoices/{id}/finalize`, `POST /v1/invoices/{id}/pay` (the default payment method),
//! then, once the invoice is paid, `POST /v1/billing/credit_grants` for the amount.

use rust_decimal::Decimal;
use serde_json::{Value, json};

use super::form::urlencode;
use super::http::StripeHttp;
use super::objects::id_of;
use super::{CreditTransaction, TopUpWrite, VendorError};

fn pairs(fields: &[(&str, String)]) -> Vec<(String, String)> {
    fields
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

impl StripeHttp {
    pub(super) async fn top_up_calls(
        &self,
        t: &TopUpWrite<'_>,
        key: &str,
    ) -> Result<Value, VendorError> {
        let post = reqwest::Method::POST;
        let meta = |k: &str, v: &str| (format!("metadata[{k}]"), v.to_owned());
        let mut invoice_form = pairs(&[
            ("customer", t.customer.to_owned()),
            ("currency", t.currency.to_owned()),
            ("collection_method", "charge_automatically".to_owned()),
            ("auto_advance", "false".to_owned()),
            ("pending_invoice_items_behavior", "exclude".to_owned()),
            ("description", t.description.to_owned()),
        ]);
        invoice_form.extend(t.metadata.iter().map(|(k, v)| meta(k, v)));
        let path = "/v1/invoices";
        let invoice = (self.write(
            "invoices",
            post.clone(),
            path,
            &invoice_form,
            &format!("{key}-invoice"),
        ))
        .await?;
        let invoice_id = id_of(&invoice["id"])
            .ok_or_else(|| VendorError::Malformed("invoices: no id".to_owned()))?;
        let mut item_form = pairs(&[
            ("customer", t.customer.to_owned()),
            ("invoice", invoice_id.clone()),
            ("amount", t.amount.to_string()),
            ("currency", t.currency.to_owned()),
            ("description", t.description.to_owned()),
        ]);
        item_form.extend(t.metadata.iter().map(|(k, v)| meta(k, v)));
        (self.write(
            "invoiceitems",
            post.clone(),
            "/v1/invoiceitems",
            &item_form,
            &format!("{key}-item"),
        ))
        .await?;
        let base = format!("/v1/invoices/{}", urlencode(&invoice_id));
        let finalize = format!("{base}/finalize");
        (self.write(
            "invoices/finalize",
            post.clone(),
            &finalize,
            &[],
            &format!("{key}-finalize"),
        ))
        .await?;
        let pay = format!("{base}/pay");
        let mut paid = (self.write(
            "invoices/pay",
            post.clone(),
            &pay,
            &[],
            &format!("{key}-pay"),
        ))
        .await?;
        if paid["status"].as_str() != Some("paid") {
            // A replayed answer is the first one: ask for the invoice as it is now.
            paid = self.fetch_value("invoices", &base).await?;
        }
        if paid["status"].as_str() != Some("paid") {
            let status = paid["status"].as_str().unwrap_or("unknown").to_owned();
            return Err(VendorError::Unavailable(format!(
                "top-up invoice {invoice_id} is {status}, not paid yet"
            )));
        }
        let mut grant_form = pairs(&[
            ("customer", t.customer.to_owned()),
            ("name", t.description.to_owned()),
            ("category", "paid".to_owned()),
            ("amount[type]", "monetary".to_owned()),
            ("amount[monetary][value]", t.amount.to_string()),
            ("amount[monetary][currency]", t.currency.to_owned()),
            (
                "applicability_config[scope][price_type]",
                "metered".to_owned(),
            ),
        ]);
        grant_form.extend(t.metadata.iter().map(|(k, v)| meta(k, v)));
        grant_form.push(meta("billsync_invoice", &invoice_id));
        let grants = "/v1/billing/credit_grants";
        let grant = (self.write(
            "billing/credit_grants",
            post,
            grants,
            &grant_form,
            &format!("{key}-grant"),
        ))
        .await?;
        Ok(json!({"invoice": paid, "credit_grant": grant}))
    }

    /// Every credit balance transaction of the customer effective in `[start, end)` (Unix
    /// seconds), newest first, each as billsync reads it; one without an amount it can read is
    /// kept with none, not dropped. `None` when the vendor has no such list (a 404: a fake or
    /// an account without billing credits).
    pub(super) async fn credit_transactions(
        &self,
        customer: &str,
        start: i64,
        end: i64,
    ) -> Result<Option<Vec<CreditTransaction>>, VendorError> {
        let endpoint = "billing/credit_balance_transactions";
        let mut found = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut query = vec![
                ("customer".to_owned(), customer.to_owned()),
                ("limit".to_owned(), "100".to_owned()),
            ];
            query.extend(
                after
                    .iter()
                    .map(|a| ("starting_after".to_owned(), a.clone())),
            );
            let path = "/v1/billing/credit_balance_transactions";
            let Some(body) = self.get(endpoint, path, &query).await? else {
                return Ok(None);
            };
            let page = super::objects::page(body)
                .ok_or_else(|| VendorError::Malformed(format!("{endpoint}: not a list")))?;
            after = page.data.last().and_then(|t| id_of(&t["id"]));
            let mut older = false;
            for raw in &page.data {
                let t = credit_transaction(raw);
                older |= t.effective_at < start;
                if (start..end).contains(&t.effective_at) {
                    found.push(t);
                }
            }
            // Newest first: a page reaching before `start` is the last one needed.
            if !page.has_more || after.is_none() || older {
                break;
            }
        }
        Ok(Some(found))
    }
}

/// One credit balance transaction: `type` credit or debit, the monetary amount of either side
/// (`credit.amount.monetary` / `debit.amount.monetary`, value as a number or a string),
/// `effective_at` (else `created`).
pub fn credit_transaction(raw: &Value) -> CreditTransaction {
    let kind = raw["type"].as_str().unwrap_or_default().to_owned();
    let side = &raw[kind.as_str()];
    let monetary = &side["amount"]["monetary"];
    let value = &monetary["value"];
    let amount = value
        .as_i64()
        .map(Decimal::from)
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
        .or_else(|| value.as_number().and_then(|n| n.to_string().parse().ok()));
    CreditTransaction {
        id: id_of(&raw["id"]).unwrap_or_default(),
        kind,
        amount,
        currency: monetary["currency"].as_str().map(str::to_ascii_lowercase),
        effective_at: raw["effective_at"]
            .as_i64()
            .or_else(|| raw["created"].as_i64())
            .unwrap_or_default(),
        credit_grant: id_of(&raw["credit_grant"]),
        raw: raw.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debits_are_read_from_numbers_strings_and_expanded_grants() {
        let t = credit_transaction(&json!({"id": "cbtxn_1", "type": "debit", "created": 5,
            "credit_grant": {"id": "credgr_1"},
            "debit": {"amount": {"type": "monetary", "monetary": {"value": "150", "currency": "USD"}}}}));
        assert_eq!(
            (t.kind.as_str(), t.amount, t.effective_at),
            ("debit", Some(Decimal::from(150)), 5)
        );
        assert_eq!(
            (t.currency.as_deref(), t.credit_grant.as_deref()),
            (Some("usd"), Some("credgr_1"))
        );
        let odd = credit_transaction(&json!({"id": "cbtxn_2", "type": "debit", "effective_at": 9}));
        assert_eq!((odd.amount, odd.effective_at), (None, 9));
    }
}
