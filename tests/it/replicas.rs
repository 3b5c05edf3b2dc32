//! Several replicas on one PostgreSQL: usage, entitlement changes and hard limits are shared;
//! singleton jobs run on one replica and move when it dies; claimed work stays with its
//! replica while it runs.

use serde_json::{Value, json};

use crate::helpers::*;

async fn replica_pair() -> (TestApp, TestApp) {
    let first = TestApp::spawn_with(Backend::Postgres, |s| {
        take_webhooks(s);
        use_test_catalog(s);
    })
    .await;
    let second = first.replica().await;
    (first, second)
}

async fn onboard(app: &TestApp, tenant: &str, customer_id: &str, status: &str) {
    let now = chrono::Utc::now().timestamp();
    // In its first day of a 30-day period.
    let mut live = subscription(
        &format!("sub_{tenant}"),
        customer_id,
        "price_pro",
        status,
        1,
    );
    live["created"] = json!(now - 3600);
    live["items"]["data"][0]["current_period_start"] = json!(now - 3600);
    live["items"]["data"][0]["current_period_end"] = json!(now - 3600 + 30 * 86_400);
    app.deliver(&event(
        &format!("evt_c_{}", uuid::Uuid::new_v4().simple()),
        "customer.updated",
        now,
        customer(customer_id, tenant),
    ))
    .await;
    app.deliver(&event(
        &format!("evt_s_{}", uuid::Uuid::new_v4().simple()),
        "customer.subscription.updated",
        now,
        live,
    ))
    .await;
}

async fn api_calls(app: &TestApp, tenant: &str) -> Value {
    app.check_body(tenant, json!({"feature": "api_calls"}))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_follow_each_others_usage_and_vendor_changes() {
    let (a, b) = replica_pair().await;
    onboard(&a, "shared", "cus_shared", "active").await;
    wait_for("the plan on the other replica", || async {
        api_calls(&b, "shared").await["limit"] == 1000
    })
    .await;
    // Both replicas hold a warm model now; usage recorded on one is counted on the other.
    let events: Vec<Value> = (0..7)
        .map(|i| json!({"id": format!("u{i}"), "tenant_id": "shared", "meter": "calls", "quantity": "1.5"}))
        .collect();
    let answer = a
        .v1(reqwest::Method::POST, "/v1/usage")
        .json(&json!({"events": events}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    wait_for("the usage on the other replica", || async {
        api_calls(&b, "shared").await["used"] == "10.5"
    })
    .await;
    // A vendor change applied by one replica drops the other's model.
    onboard(&a, "shared", "cus_shared", "canceled").await;
    wait_for("the cancellation on the other replica", || async {
        api_calls(&b, "shared").await["allowed"] == false
    })
    .await;
    // Both say the same.
    assert_eq!(
        api_calls(&a, "shared").await["reason"],
        api_calls(&b, "shared").await["reason"]
    );
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_hard_limits_hold_across_replicas() {
    let (a, b) = replica_pair().await;
    onboard(&a, "race", "cus_race", "active").await;
    for app in [&a, &b] {
        wait_for("the plan", || async {
            api_calls(app, "race").await["limit"] == 1000
        })
        .await;
    }
    // 1,000 allowed: exactly ten records of 100 fit, whichever replica takes them.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..24 {
        let app = if i % 2 == 0 { &a } else { &b };
        let request = app
            .v1(reqwest::Method::POST, "/v1/tenants/race/entitlements/check")
            .json(&json!({"feature": "api_calls", "quantity": 100, "record": {"id": format!("r{i}")}}));
        tasks.spawn(async move {
            let answer: Value = request.send().await.unwrap().json().await.unwrap();
            (answer["allowed"] == true, answer)
        });
    }
    let answers = tasks.join_all().await;
    let allowed = answers.iter().filter(|(allowed, _)| *allowed).count();
    assert_eq!(allowed, 10, "exactly the limit, never more: {answers:?}");
    for app in [&a, &b] {
        wait_for("both replicas to count all of it", || async {
            api_calls(app, "race").await["used"] == "1000"
        })
        .await;
    }
    b.stop().await;
    a.stop().await;
}

/// The replicas' `billsync_lease_held` for `lease`.
async fn holds(app: &TestApp, lease: &str) -> bool {
    app.metrics()
        .await
        .lines()
        .any(|l| l == format!("billsync_lease_held{{lease=\"{lease}\"}} 1"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_singleton_jobs_run_once_and_move_when_their_replica_dies() {
    let vendor = wiremock::MockServer::start().await;
    let a = TestApp::spawn_with(Backend::Postgres, |s| {
        use_vendor(s, &vendor.uri());
        s.reconcile.interval = Some(std::time::Duration::from_secs(3600));
    })
    .await;
    let b = a.replica().await;
    for lease in [
        "poller",
        "sweep",
        "pusher",
        "snapshot",
        "reconcile",
        "open_check",
    ] {
        wait_for(&format!("one holder of {lease}"), || async {
            holds(&a, lease).await || holds(&b, lease).await
        })
        .await;
        assert!(
            !(holds(&a, lease).await && holds(&b, lease).await),
            "{lease} is held twice"
        );
    }
    // Both replicas' sync status says which replica runs each job, the same for both.
    let (id_a, id_b) = (replica_id(&a).await, replica_id(&b).await);
    assert_ne!(id_a, id_b);
    for asked in [&a, &b] {
        let jobs = job_replicas(asked).await;
        for (job, replica) in &jobs {
            let expected = if holds(&a, job).await { &id_a } else { &id_b };
            assert_eq!(replica.as_ref(), Some(expected), "{job}: {jobs:?}");
        }
        assert_eq!(
            jobs.len(),
            billsync::cluster::SINGLETON_JOBS.len(),
            "{jobs:?}"
        );
    }
    // The holder of the poller dies without a word; the other takes over (well within 15 s).
    let (holder, other) = if holds(&a, "poller").await {
        (a, b)
    } else {
        (b, a)
    };
    let _database = holder.crash();
    wait_for("the other replica to take the poller", || async {
        holds(&other, "poller").await
    })
    .await;
    let id = replica_id(&other).await;
    wait_for("the status to name the survivor for every job", || async {
        let jobs = job_replicas(&other).await;
        jobs.values().all(|replica| replica.as_ref() == Some(&id))
    })
    .await;
    other.stop().await;
}

async fn replica_id(app: &TestApp) -> String {
    let status = app.get_json("/v1/sync/status").await;
    status["this_replica"]["id"].as_str().unwrap().to_owned()
}

/// `jobs` of the sync status: each job and the replica running it.
async fn job_replicas(app: &TestApp) -> std::collections::BTreeMap<String, Option<String>> {
    let status = app.get_json("/v1/sync/status").await;
    (status["jobs"].as_array().unwrap().iter())
        .map(|j| {
            let replica = j["replica"].as_str().map(str::to_owned);
            (j["job"].as_str().unwrap().to_owned(), replica)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_replica_that_lost_its_notifications_catches_up() {
    let (a, b) = replica_pair().await;
    onboard(&a, "lost", "cus_lost", "active").await;
    wait_for("the plan on both", || async {
        api_calls(&a, "lost").await["limit"] == 1000 && api_calls(&b, "lost").await["limit"] == 1000
    })
    .await;
    let post = |from: usize| {
        let events: Vec<Value> = (from..from + 10)
            .map(|i| json!({"id": format!("l{i}"), "tenant_id": "lost", "meter": "calls", "quantity": "1"}))
            .collect();
        a.v1(reqwest::Method::POST, "/v1/usage")
            .json(&json!({"events": events}))
            .send()
    };
    assert_eq!(post(0).await.unwrap().status(), 200);
    // Every replica's LISTEN connection is cut; usage keeps arriving meanwhile.
    let TestDatabase::Postgres { name, .. } = &a.db else {
        unreachable!("a PostgreSQL replica pair")
    };
    let mut url = reqwest::Url::parse(&postgres_admin_url()).unwrap();
    url.set_path(name);
    let pool = sqlx::PgPool::connect(url.as_str()).await.unwrap();
    let cut: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(cut.len(), 2, "one listener per replica");
    for batch in 1..6 {
        assert_eq!(post(batch * 10).await.unwrap().status(), 200);
    }
    wait_for("the other replica to count everything again", || async {
        api_calls(&b, "lost").await["used"] == "60"
    })
    .await;
    // It hears new usage again, too.
    assert_eq!(post(60).await.unwrap().status(), 200);
    wait_for("new usage heard", || async {
        api_calls(&b, "lost").await["used"] == "70"
    })
    .await;
    pool.close().await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_refetch_slower_than_the_claim_is_made_once() {
    let claim = std::time::Duration::from_secs(1);
    let vendor = wiremock::MockServer::start().await;
    let state = subscription("sub_slow", "cus_slow", "price_pro", "active", 1);
    wiremock::Mock::given(wiremock::matchers::path("/v1/subscriptions/sub_slow"))
        .respond_with(
            wiremock::ResponseTemplate::new(200)
                .set_body_json(&state)
                .set_delay(4 * claim),
        )
        .mount(&vendor)
        .await;
    let a = TestApp::spawn_with(Backend::Postgres, |s| {
        use_vendor(s, &vendor.uri());
        take_webhooks(s);
        s.claims.inbox = claim;
    })
    .await;
    let b = a.replica().await;
    let now = chrono::Utc::now().timestamp();
    a.deliver(&event(
        "evt_slow",
        "customer.subscription.updated",
        now,
        state,
    ))
    .await;
    wait_for("the event to be applied", || async {
        a.get_json("/v1/sync/status").await["inbox"]["applied"] == 1
    })
    .await;
    // Both replicas' appliers looked for work all along; the claim stayed with the one fetching.
    let fetches = vendor.received_requests().await.unwrap_or_default();
    let refetches = fetches
        .iter()
        .filter(|r| r.url.path() == "/v1/subscriptions/sub_slow")
        .count();
    assert_eq!(refetches, 1, "one refetch at the vendor");
    b.stop().await;
    a.stop().await;
}
