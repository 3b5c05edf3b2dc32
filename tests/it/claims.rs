//! Claims on queued work (inbox rows, commands, usage pushes): renewed while the work runs, so
//! that no second `due` hands the rows out again however long the work takes; once renewal
//! stops, they come back when the claim runs out. The replicas racing for a slow command are in
//! `commands.rs`.

use std::time::Duration;

use billsync::cluster::ClaimRenewal;
use billsync::store::{Db, NewCommand, NewEvent, PushRow, Queue, Source, StoreError, now_ms};

use crate::helpers::{Backend, on_both_backends, state, wait_for};

on_both_backends!(a_renewed_claim_is_not_handed_out_again_and_comes_back_once_renewal_stops);

/// Short, so that the test outlasts it.
const CLAIM: Duration = Duration::from_millis(900);

/// Claims what is due in `queue`: the ids and the end of the claim.
async fn claim(db: &Db, queue: Queue) -> (Vec<String>, i64) {
    let (now, ms) = (now_ms(), CLAIM.as_millis() as i64);
    let claimed = match queue {
        Queue::Inbox => keys(db.inbox().due(now, 10, ms).await, |r| {
            (r.event_id, r.next_attempt_at)
        }),
        Queue::Commands => keys(db.commands().due(now, 10, ms).await, |c| {
            (c.command_id, c.next_attempt_at)
        }),
        Queue::Pushes => keys(db.usage().due_pushes(now, 10, ms).await, |p| {
            (p.push_id, p.next_attempt_at)
        }),
    };
    let until = claimed.first().map_or(0, |(_, until)| *until);
    (claimed.into_iter().map(|(id, _)| id).collect(), until)
}

/// Each claimed row's id and claim.
fn keys<T>(rows: Result<Vec<T>, StoreError>, key: fn(T) -> (String, i64)) -> Vec<(String, i64)> {
    rows.expect("claim").into_iter().map(key).collect()
}

/// One due row in each queue.
async fn seed(db: &Db) {
    let now = now_ms();
    let event = NewEvent {
        event_id: "evt_1".into(),
        event_type: "customer.updated".into(),
        source: Source::Webhook,
        object_type: Some("customer".into()),
        object_id: Some("cus_1".into()),
        customer_id: Some("cus_1".into()),
        event_created: now,
        idempotency_key: None,
        payload: "{}".into(),
    };
    assert_eq!(db.inbox().insert(&[event], now).await.unwrap(), 1);
    let command = NewCommand {
        command_id: "cmd_1".into(),
        kind: "customer.sync".into(),
        request: "{}".into(),
        client_key: None,
        request_digest: "digest".into(),
        base: None,
    };
    db.commands()
        .enqueue("acme", &[command], now)
        .await
        .unwrap();
    let push = PushRow {
        push_id: "bsu_1".into(),
        tenant_id: "acme".into(),
        meter: "calls".into(),
        customer_id: "cus_1".into(),
        event_name: "calls".into(),
        window_start: 0,
        value: "1".into(),
        timestamp: now / 1000,
        event_count: 1,
        status: "pending".into(),
        attempts: 0,
        last_error: None,
        next_attempt_at: now,
        created_at: now,
        sent_at: None,
        period_start: None,
        period_end: None,
        kind: "usage".to_owned(),
        evidence: None,
    };
    let push = billsync::store::NewPush {
        row: push,
        events: Vec::new(),
        replaces_earlier: false,
    };
    assert!(db.usage().plan_pushes(&[push]).await.unwrap());
}

async fn a_renewed_claim_is_not_handed_out_again_and_comes_back_once_renewal_stops(
    backend: Backend,
) {
    let (state, _database) = state(backend, |_| {}).await;
    let db = &state.db;
    seed(db).await;
    for queue in [Queue::Inbox, Queue::Commands, Queue::Pushes] {
        let (ids, until) = claim(db, queue).await;
        assert_eq!(ids.len(), 1, "{queue:?}: one row due");
        let renewal = ClaimRenewal::start(
            db.clone(),
            queue,
            ids.clone(),
            until,
            CLAIM,
            state.metrics.clone(),
        );
        wait_for("the first claim time to pass", || async {
            now_ms() > until + 300
        })
        .await;
        assert_eq!(
            claim(db, queue).await.0,
            Vec::<String>::new(),
            "{queue:?}: handed out again while its claim was renewed"
        );
        renewal.finish().await;
        wait_for("the claim to run out once no longer renewed", || async {
            claim(db, queue).await.0 == ids
        })
        .await;
    }
    assert!(
        !state
            .metrics
            .render()
            .contains("billsync_claims_lost_total"),
        "no claim was lost"
    );
}
