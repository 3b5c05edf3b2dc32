//! The form bodies of Stripe's writes (`application/x-www-form-urlencoded`, fields in the
//! order they are sent), and path-safe ids.

use super::{CustomerWrite, PreviewRequest, Proration, SubscriptionWrite};

/// Form fields in the order they are sent.
#[derive(Default)]
pub struct Form(pub Vec<(String, String)>);

impl Form {
    fn push(&mut self, key: &str, value: &str) {
        self.0.push((key.to_owned(), value.to_owned()));
    }

    fn metadata(&mut self, pairs: &[(&str, &str)]) {
        for (key, value) in pairs {
            self.push(&format!("metadata[{key}]"), value);
        }
    }
}

/// A customer's name, email and tenant (under `tenant_key` in its metadata). An empty value
/// clears the field at Stripe.
pub fn customer(tenant_key: &str, customer: &CustomerWrite<'_>) -> Form {
    let mut form = Form::default();
    form.push("name", customer.name.unwrap_or_default());
    form.push("email", customer.email.unwrap_or_default());
    form.push(&format!("metadata[{tenant_key}]"), customer.tenant_id);
    form
}

/// The method, path and form of a subscription write. `legacy_plans`: `plan` instead of
/// `price`, and the 2017 API's `prorate` instead of `proration_behavior`.
pub fn subscription(
    write: &SubscriptionWrite<'_>,
    legacy_plans: bool,
) -> (reqwest::Method, String, Form) {
    let price_field = if legacy_plans { "plan" } else { "price" };
    let mut form = Form::default();
    let post = reqwest::Method::POST;
    let one = |id: &str| format!("/v1/subscriptions/{}", urlencode(id));
    match *write {
        SubscriptionWrite::Create {
            customer,
            price,
            quantity,
            trial_days,
            metadata,
        } => {
            form.push("customer", customer);
            form.push(&format!("items[0][{price_field}]"), price);
            form.push("items[0][quantity]", &quantity.to_string());
            // A declined card fails the command instead of leaving an incomplete subscription.
            form.push("payment_behavior", "error_if_incomplete");
            if let Some(days) = trial_days {
                form.push("trial_period_days", &days.to_string());
            }
            form.metadata(metadata);
            (post, "/v1/subscriptions".to_owned(), form)
        }
        SubscriptionWrite::Change {
            subscription,
            item,
            price,
            quantity,
            proration,
            trial_end,
            metadata,
        } => {
            form.push("items[0][id]", item);
            form.push(&format!("items[0][{price_field}]"), price);
            form.push("items[0][quantity]", &quantity.to_string());
            if legacy_plans {
                let prorate = proration != Proration::None;
                form.push("prorate", if prorate { "true" } else { "false" });
            } else {
                form.push("proration_behavior", proration.as_str());
                form.push("payment_behavior", "error_if_incomplete");
            }
            if let Some(end) = trial_end {
                form.push("trial_end", &end.to_string());
            }
            form.metadata(metadata);
            (post, one(subscription), form)
        }
        SubscriptionWrite::CancelAtPeriodEnd {
            subscription,
            cancel,
            metadata,
        } => {
            form.push(
                "cancel_at_period_end",
                if cancel { "true" } else { "false" },
            );
            form.metadata(metadata);
            (post, one(subscription), form)
        }
        SubscriptionWrite::CancelNow { subscription } => {
            (reqwest::Method::DELETE, one(subscription), form)
        }
    }
}

/// The form of an upcoming-invoice preview for a change (or a new subscription).
pub fn preview(request: &PreviewRequest<'_>, legacy_plans: bool) -> Form {
    let price_field = if legacy_plans { "plan" } else { "price" };
    let mut form = Form::default();
    form.push("customer", request.customer);
    if let Some((subscription, item)) = request.current {
        form.push("subscription", subscription);
        form.push("subscription_details[items][0][id]", item);
        let proration = request.proration.as_str();
        form.push("subscription_details[proration_behavior]", proration);
    }
    form.push(
        &format!("subscription_details[items][0][{price_field}]"),
        request.price,
    );
    let quantity = request.quantity.to_string();
    form.push("subscription_details[items][0][quantity]", &quantity);
    form
}

/// An id as one path segment.
pub fn urlencode(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_path_safe() {
        assert_eq!(urlencode("cus_123"), "cus_123");
        assert_eq!(urlencode("a/b c"), "a%2Fb%20c");
    }
}
