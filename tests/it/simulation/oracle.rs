//! What billsync accepted, kept by the simulation on its own: the first version of each
//! (tenant, event id), and each meter's figure over a period folded here independently.

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::Value;

/// One accepted usage event.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub id: String,
    pub meter: String,
    pub quantity: Decimal,
    /// Unix milliseconds.
    pub at: i64,
    pub user: String,
}

#[derive(Default)]
pub struct Oracle {
    events: HashMap<String, Vec<Accepted>>,
    ids: HashMap<(String, String), ()>,
    next: u64,
}

impl Oracle {
    /// A fresh number for ids the simulation makes up.
    pub fn next_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Takes an event billsync was sent: the first one with its id counts, repeats do not.
    pub fn offer(&mut self, event: &Value) {
        let tenant = event["tenant_id"].as_str().unwrap().to_owned();
        let id = event["id"].as_str().unwrap().to_owned();
        if self.ids.insert((tenant.clone(), id.clone()), ()).is_some() {
            return;
        }
        let quantity = match &event["quantity"] {
            Value::String(text) => Decimal::from_str(text).unwrap(),
            number => Decimal::from_str(&number.to_string()).unwrap(),
        };
        let at = chrono::DateTime::parse_from_rfc3339(event["timestamp"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        let accepted = Accepted {
            id,
            meter: event["meter"].as_str().unwrap().to_owned(),
            quantity,
            at,
            user: event["properties"]["user_id"].as_str().unwrap().to_owned(),
        };
        self.events.entry(tenant).or_default().push(accepted);
    }

    /// One of the tenant's accepted events, if it has any.
    pub fn any_of(&self, tenant: &str, rng: &mut fastrand::Rng) -> Option<Accepted> {
        let events = self.events.get(tenant)?;
        (!events.is_empty()).then(|| events[rng.usize(..events.len())].clone())
    }

    /// The meter's figure over the tenant's events in `[start, end)`: zero without events.
    pub fn figure(&self, tenant: &str, meter: &str, (start, end): (i64, i64)) -> Decimal {
        let events: Vec<&Accepted> = self
            .events
            .get(tenant)
            .into_iter()
            .flatten()
            .filter(|e| e.meter == meter && start <= e.at && e.at < end)
            .collect();
        match meter {
            "calls" => events.iter().map(|e| e.quantity).sum(),
            "builds" => Decimal::from(events.len()),
            "storage" => events.iter().map(|e| e.quantity).max().unwrap_or_default(),
            "seats" => events
                .iter()
                .max_by(|a, b| (a.at, &a.id).cmp(&(b.at, &b.id)))
                .map(|e| e.quantity)
                .unwrap_or_default(),
            "users" => Decimal::from(
                events
                    .iter()
                    .map(|e| &e.user)
                    .collect::<BTreeSet<_>>()
                    .len(),
            ),
            other => panic!("no meter {other} in the simulation"),
        }
    }
}
