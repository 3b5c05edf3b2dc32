//! Stripe's billing meters as the simulation needs them: meter events kept once per
//! identifier, faults the simulation schedules, and what a meter bills for a period.

use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::sync::Mutex;

use async_trait::async_trait;
use billsync::stripe::{
    BillingVendor, CustomerWrite, Fetched, ListFilter, MeterEvent, ObjectKind, Page,
    PreviewRequest, SubscriptionWrite, VendorError,
};
use rust_decimal::Decimal;
use serde_json::Value;
use tokio::sync::Notify;

/// What the next meter event call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails before Stripe keeps anything (a 5xx, a timeout).
    FailBefore,
    /// Stripe keeps the event, then the answer is lost (a 5xx after the write).
    FailAfter,
    /// Stripe keeps the event, then the calling process dies before it hears the answer.
    Crash,
    /// A repeated identifier is refused as a duplicate instead of replayed.
    RefuseDuplicate,
}

/// A meter event Stripe kept.
#[derive(Debug, Clone)]
pub struct Held {
    pub event_name: String,
    pub customer: String,
    pub value: Decimal,
    /// Unix milliseconds (Stripe keeps seconds).
    pub at_ms: i64,
    /// Arrival order, which breaks ties between equal timestamps.
    pub order: usize,
}

#[derive(Default)]
struct State {
    held: HashMap<String, Held>,
    faults: VecDeque<Fault>,
    calls: usize,
}

#[derive(Default)]
pub struct FakeStripe {
    state: Mutex<State>,
    /// Notified when a [`Fault::Crash`] hits: the simulation drops the caller.
    pub crashed: Notify,
}

impl FakeStripe {
    /// The next calls' faults, in order (calls beyond them succeed).
    pub fn schedule(&self, faults: Vec<Fault>) {
        self.state.lock().unwrap().faults = faults.into();
    }

    /// What the meter bills the customer for `[start_ms, end_ms)`: the sum of the events inside
    /// it, or (`last`) the value of the latest one (the later arrival among equal times).
    pub fn billed(
        &self,
        event_name: &str,
        customer: &str,
        period: (i64, i64),
        last: bool,
    ) -> Decimal {
        let state = self.state.lock().unwrap();
        let mut inside: Vec<&Held> = state
            .held
            .values()
            .filter(|h| h.event_name == event_name && h.customer == customer)
            .filter(|h| (period.0..period.1).contains(&h.at_ms))
            .collect();
        inside.sort_by_key(|h| (h.at_ms, h.order));
        if last {
            inside.last().map(|h| h.value).unwrap_or_default()
        } else {
            inside.iter().map(|h| h.value).sum()
        }
    }

    /// Keeps the event (once per identifier); whether it was kept before.
    fn keep(&self, event: &MeterEvent) -> bool {
        let mut state = self.state.lock().unwrap();
        state.calls += 1;
        let order = state.calls;
        if state.held.contains_key(&event.identifier) {
            return true;
        }
        let held = Held {
            event_name: event.event_name.clone(),
            customer: event.customer_id.clone(),
            value: Decimal::from_str(&event.value).expect("pushed values are decimals"),
            at_ms: event.timestamp * 1000,
            order,
        };
        state.held.insert(event.identifier.clone(), held);
        false
    }
}

fn absent() -> VendorError {
    VendorError::Unavailable("not part of the simulation".to_owned())
}

#[async_trait]
impl BillingVendor for FakeStripe {
    async fn report_usage(&self, event: &MeterEvent) -> Result<(), VendorError> {
        let fault = self.state.lock().unwrap().faults.pop_front();
        let unavailable = || VendorError::Unavailable("simulated 503".to_owned());
        if fault == Some(Fault::FailBefore) {
            return Err(unavailable());
        }
        let repeated = self.keep(event);
        match fault {
            Some(Fault::FailAfter) => Err(unavailable()),
            Some(Fault::Crash) => {
                self.crashed.notify_one();
                std::future::pending().await
            }
            Some(Fault::RefuseDuplicate) if repeated => Err(VendorError::Rejected {
                status: 400,
                code: Some("resource_already_exists".to_owned()),
                message: format!(
                    "An event with identifier {} already exists.",
                    event.identifier
                ),
            }),
            _ => Ok(()),
        }
    }

    async fn fetch(&self, _: ObjectKind, _: &str) -> Result<Fetched, VendorError> {
        Err(absent())
    }

    async fn list(
        &self,
        _: ObjectKind,
        _: &ListFilter,
        _: Option<&str>,
    ) -> Result<Page, VendorError> {
        Err(absent())
    }

    async fn list_events_since(&self, _: i64, _: Option<&str>) -> Result<Page, VendorError> {
        Err(absent())
    }

    async fn write_customer(
        &self,
        _: Option<&str>,
        _: &CustomerWrite<'_>,
        _: &str,
    ) -> Result<Value, VendorError> {
        Err(absent())
    }

    async fn write_subscription(
        &self,
        _: &SubscriptionWrite<'_>,
        _: &str,
    ) -> Result<Value, VendorError> {
        Err(absent())
    }

    async fn preview(&self, _: &PreviewRequest<'_>) -> Result<Value, VendorError> {
        Err(absent())
    }

    async fn meter_usage(
        &self,
        _: &str,
        _: &str,
        _: i64,
        _: i64,
    ) -> Result<Option<Decimal>, VendorError> {
        Err(absent())
    }
}
