//! One applier batch of many objects: the tenant links of its customers (made for the whole
//! batch at once), the first claim of a tenant kept, and the entitlement change log.

use std::collections::HashMap;

use billsync::state::AppState;
use billsync::store::{InboxRow, NewEvent, Source};
use billsync::sync::events;
use serde_json::{Value, json};

use crate::helpers::{Backend, customer, event, on_both_backends, state, subscription};

on_both_backends!(
    one_batch_links_every_customer_and_keeps_the_first_claim_of_a_tenant,
    one_batch_logs_a_change_for_every_tenant_it_touches,
);

fn row(event: &Value) -> NewEvent {
    events::from_event(&event.to_string(), event, Source::Webhook).unwrap()
}

/// Stores the events, then applies them in one applier step (one batch).
async fn apply_in_one_batch(state: &AppState, events: &[Value]) {
    let rows: Vec<NewEvent> = events.iter().map(row).collect();
    assert_eq!(state.db.inbox().insert(&rows, 0).await.unwrap(), rows.len());
    let settled = state.applier().step().await.unwrap();
    assert_eq!(settled, rows.len(), "one batch settles every row");
}

async fn linked(state: &AppState) -> HashMap<String, String> {
    state
        .db
        .tenants()
        .linked(None)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

async fn applied_rows(state: &AppState) -> HashMap<String, InboxRow> {
    let rows = state.db.inbox().applied_in_order(None, 1000).await.unwrap();
    rows.into_iter().map(|r| (r.event_id.clone(), r)).collect()
}

fn created(id: &str, at: i64, customer_id: &str, tenant: &str) -> Value {
    event(id, "customer.created", at, customer(customer_id, tenant))
}

async fn one_batch_links_every_customer_and_keeps_the_first_claim_of_a_tenant(backend: Backend) {
    let (state, _db) = state(backend, |s| s.stripe.refetch = false).await;
    apply_in_one_batch(
        &state,
        &[
            created("evt_moves", 100, "cus_moves", "old-home"),
            created("evt_leaves", 100, "cus_leaves", "left-behind"),
            created("evt_holder", 100, "cus_holder", "taken"),
        ],
    )
    .await;

    let mut batch: Vec<Value> = (0..50)
        .map(|i| {
            created(
                &format!("evt_n{i}"),
                200,
                &format!("cus_n{i}"),
                &format!("n-{i}"),
            )
        })
        .collect();
    batch.push(created("evt_moves_2", 200, "cus_moves", "new-home"));
    let mut gone = customer("cus_leaves", "left-behind");
    gone["deleted"] = json!(true);
    batch.push(event("evt_leaves_2", "customer.deleted", 200, gone));
    batch.push(created("evt_late", 200, "cus_late", "taken"));
    batch.push(event(
        "evt_holder_2",
        "customer.updated",
        200,
        customer("cus_holder", "taken"),
    ));
    batch.push(created("evt_twin_a", 201, "cus_twin_a", "twins"));
    batch.push(created("evt_twin_b", 202, "cus_twin_b", "twins"));
    let sub = subscription("sub_n0", "cus_n0", "price_gold", "active", 1);
    batch.push(event("evt_sub", "customer.subscription.created", 203, sub));
    // The same customer twice in the batch: both states are applied, in order.
    batch.push(created("evt_again_1", 204, "cus_again", "again-1"));
    batch.push(event(
        "evt_again_2",
        "customer.updated",
        205,
        customer("cus_again", "again-2"),
    ));
    apply_in_one_batch(&state, &batch).await;

    let links = linked(&state).await;
    for i in 0..50 {
        assert_eq!(links[&format!("n-{i}")], format!("cus_n{i}"));
    }
    assert_eq!(
        links["new-home"], "cus_moves",
        "a customer that moves takes its new tenant"
    );
    assert!(
        !links.contains_key("old-home"),
        "and lets go of the old one"
    );
    assert!(
        !links.contains_key("left-behind"),
        "a deleted customer lets go"
    );
    assert_eq!(
        links["taken"], "cus_holder",
        "a linked tenant stays with its customer"
    );
    assert_eq!(
        links["twins"], "cus_twin_a",
        "the first claim of a tenant wins"
    );
    assert_eq!(links["again-2"], "cus_again");
    assert!(!links.contains_key("again-1"));

    let rows = applied_rows(&state).await;
    let error = |id: &str| rows[id].last_error.clone().unwrap_or_default();
    assert!(error("evt_late").contains("already belongs to customer cus_holder"));
    assert!(error("evt_twin_b").contains("already belongs to customer cus_twin_a"));
    for id in [
        "evt_holder_2",
        "evt_twin_a",
        "evt_moves_2",
        "evt_n7",
        "evt_again_2",
    ] {
        assert_eq!(rows[id].last_error, None, "{id}");
    }
    assert_eq!(rows["evt_sub"].tenant_id.as_deref(), Some("n-0"));
    assert_eq!(rows["evt_holder_2"].tenant_id.as_deref(), Some("taken"));
    assert_eq!(rows["evt_n7"].tenant_id.as_deref(), Some("n-7"));
    assert_eq!(rows["evt_late"].tenant_id, None);
    assert_eq!(rows["evt_again_1"].tenant_id.as_deref(), Some("again-1"));
    assert_eq!(rows["evt_again_2"].tenant_id.as_deref(), Some("again-2"));
}

async fn one_batch_logs_a_change_for_every_tenant_it_touches(backend: Backend) {
    let (state, _db) = state(backend, |s| s.stripe.refetch = false).await;
    let (_, before) = state.db.changes().bounds().await.unwrap();
    let batch: Vec<Value> = (0..40)
        .map(|i| {
            created(
                &format!("evt_c{i}"),
                100,
                &format!("cus_c{i}"),
                &format!("c-{i}"),
            )
        })
        .collect();
    apply_in_one_batch(&state, &batch).await;

    let changes = state
        .db
        .changes()
        .after(before.unwrap_or(0), 1000)
        .await
        .unwrap();
    let mut per_tenant: HashMap<String, usize> = HashMap::new();
    for change in &changes {
        *per_tenant
            .entry(change.tenant_id.clone().unwrap_or_default())
            .or_default() += 1;
    }
    for i in 0..40 {
        let logged = per_tenant.get(&format!("c-{i}")).copied().unwrap_or(0);
        assert!(logged >= 1, "tenant c-{i} changed and was not logged");
        // PostgreSQL logs a transaction's changes at its commit, once per tenant (the tenant
        // row and its customer's mirror row are one change).
        if backend == Backend::Postgres {
            assert_eq!(
                logged, 1,
                "tenant c-{i} logged {logged} times in one transaction"
            );
        }
    }
    assert!(
        !per_tenant.contains_key(""),
        "no customer change is logged for every tenant"
    );
}
