//! The in-process client (`crates/billsync-client`) against the real service: its replica
//! follows the change stream, usage it records reaches the server once, and it rides out a
//! restart of the server.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use billsync_client::{Client, Error, Metrics, Options, Staleness, UsageEvent};
use rust_decimal::Decimal;
use serde_json::json;

use crate::helpers::{API_KEY, Backend, TestApp, on_both_backends, wait_for};
use crate::stream::{service, subscribe};

on_both_backends!(
    a_subscription_delivered_by_webhook_changes_the_clients_answer,
    usage_recorded_by_one_client_shows_in_anothers_used,
    after_a_restart_checks_answer_from_memory_and_buffered_usage_arrives_once,
    a_full_buffer_refuses_usage_while_the_server_is_down,
    check_and_record_is_the_servers_atomic_step,
    refused_usage_is_dropped_counted_and_reported,
    a_stale_replica_asks_the_server_and_falls_back_to_memory,
);

/// A stable address in front of the service, so that a client keeps its URL across
/// [`TestApp::restart`] (which moves the service to a new port, as a deploy may); while down,
/// it cuts every connection and refuses new ones, as an unreachable server would. Its port is
/// never given up, so no other test's service can take it.
struct Proxy {
    addr: std::net::SocketAddr,
    target: tokio::sync::watch::Sender<Option<std::net::SocketAddr>>,
}

impl Proxy {
    async fn start(app: &TestApp) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (target, _) = tokio::sync::watch::channel(Some(app.addr));
        let watching = target.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut changed = watching.subscribe();
                let Some(to) = *changed.borrow_and_update() else {
                    continue; // down: dropped at once
                };
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = changed.changed() => {}
                    }
                });
            }
        });
        Self { addr, target }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn down(&self) {
        self.target.send_replace(None);
    }

    fn up(&self, app: &TestApp) {
        self.target.send_replace(Some(app.addr));
    }
}

/// Quick flushes and reconnects, so that tests wait little.
fn options() -> Options {
    Options {
        connect_timeout: Duration::from_secs(20),
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        flush_interval: Duration::from_millis(50),
        ..Options::default()
    }
}

async fn connect(app: &TestApp, options: Options) -> Client {
    Client::connect(&app.url(""), API_KEY, options)
        .await
        .expect("the client connects")
}

fn d(n: i64) -> Decimal {
    Decimal::from(n)
}

/// The tenant's `calls` usage in the period, from the server's ledger.
async fn ledger_total(app: &TestApp, tenant: &str) -> String {
    let usage = app
        .get_json(&format!("/v1/tenants/{tenant}/usage?meter=calls"))
        .await;
    usage["total"].as_str().unwrap().to_owned()
}

/// A bad key fails `connect`. The snapshot answers as the server does (the free plan; an unknown tenant); a subscription
/// delivered by webhook reaches the replica through the stream and changes the answer.
async fn a_subscription_delivered_by_webhook_changes_the_clients_answer(backend: Backend) {
    let app = service(backend, |_| {}).await;
    assert_eq!(app.put_tenant("acme", json!({})).await.status(), 201);
    let refused = Client::connect(&app.url(""), "not-the-key-0000000000", options()).await;
    assert!(
        matches!(refused, Err(Error::Status { status: 401, .. })),
        "a bad key fails at once"
    );
    let client = connect(&app, options()).await;

    let calls = client.check("acme", "api_calls", d(1)).await;
    assert!(calls.allowed, "{calls:?}");
    assert_eq!((calls.limit, calls.used), (Some(10), Some(d(0))));
    let server = app.check("acme", "api_calls").await;
    assert_eq!(server["remaining"], calls.remaining.unwrap().to_string());
    let sso = client.check("acme", "sso", d(1)).await;
    assert_eq!(
        (sso.allowed, sso.reason.as_ref()),
        (false, "feature_not_in_plan")
    );
    let nobody = client.check("nobody", "sso", d(1)).await;
    let server = app.check("nobody", "sso").await;
    assert_eq!(server["reason"], "unknown_tenant");
    assert_eq!(
        (nobody.allowed, nobody.reason.as_ref(), nobody.stale),
        (false, "unknown_tenant", server["stale"] == true)
    );

    subscribe(&app, "acme", "price_pro").await;
    wait_for("the subscription to reach the client", || async {
        client.check_in_memory("acme", "sso", d(1)).allowed
    })
    .await;
    let calls = client.check("acme", "api_calls", d(1)).await;
    assert_eq!(calls.limit, Some(1000));
    // Without a Stripe key the server calls every state stale: the client says what it says.
    let server = app.check("acme", "api_calls").await;
    assert_eq!(calls.stale, server["stale"] == true);
    assert!(!client.is_stale());
    let stats = client.stats();
    assert_eq!((stats.readies, stats.resumes, stats.tenants), (1, 0, 1));
    client.shutdown().await.unwrap();
    app.stop().await;
}

/// Usage recorded by client A counts in A's answers at once, reaches the server once, and shows
/// in client B's `used` through the stream; shutdown sends what is buffered.
async fn usage_recorded_by_one_client_shows_in_anothers_used(backend: Backend) {
    let app = service(backend, |_| {}).await;
    assert_eq!(app.put_tenant("acme", json!({})).await.status(), 201);
    let a = connect(&app, options()).await;
    let b = connect(&app, options()).await;

    a.record("acme", "calls", d(3), "a-1").unwrap();
    assert_eq!(
        a.check_in_memory("acme", "api_calls", d(0)).used,
        Some(d(3))
    );
    wait_for("A's usage to reach B", || async {
        b.check_in_memory("acme", "api_calls", d(0)).used == Some(d(3))
    })
    .await;
    wait_for("A's buffer to be sent", || async {
        a.stats().buffered == 0
    })
    .await;
    assert_eq!(a.stats().sent, 1);
    // Counted once in A's own answers, once the server's figure holds it.
    wait_for("A's figure to settle at 3", || async {
        a.check_in_memory("acme", "api_calls", d(0)).used == Some(d(3))
    })
    .await;
    let over = a.check("acme", "api_calls", d(8)).await;
    assert_eq!(
        (over.allowed, over.reason.as_ref()),
        (false, "limit_exceeded")
    );

    b.record("acme", "calls", d(2), "b-1").unwrap();
    b.shutdown().await.unwrap();
    assert!(matches!(
        b.record("acme", "calls", d(1), "b-2"),
        Err(Error::Closed)
    ));
    assert_eq!(ledger_total(&app, "acme").await, "5");
    wait_for("B's usage to reach A", || async {
        a.check_in_memory("acme", "api_calls", d(0)).used == Some(d(5))
    })
    .await;
    a.shutdown().await.unwrap();
    app.stop().await;
}

/// While the server is down the client answers from memory (stale once the stream has been
/// down longer than allowed) and buffers usage; when the server is back it resumes from its
/// cursor and the buffered usage arrives exactly once.
async fn after_a_restart_checks_answer_from_memory_and_buffered_usage_arrives_once(
    backend: Backend,
) {
    let app = service(backend, |_| {}).await;
    assert_eq!(app.put_tenant("acme", json!({})).await.status(), 201);
    let proxy = Proxy::start(&app).await;
    let options = Options {
        max_staleness: Some(Duration::from_millis(300)),
        ..options()
    };
    let client = Client::connect(&proxy.url(), API_KEY, options)
        .await
        .unwrap();
    client.record("acme", "calls", d(1), "before").unwrap();
    wait_for("the first event to be sent", || async {
        client.stats().sent == 1
    })
    .await;

    proxy.down();
    let app = app.restart().await;
    wait_for("the client to see the stream end", || async {
        !client.stats().connected
    })
    .await;
    let check = client.check("acme", "api_calls", d(1)).await;
    assert!(check.allowed, "{check:?}");
    client
        .record("acme", "calls", d(2), "while-down-1")
        .unwrap();
    client
        .record("acme", "calls", d(3), "while-down-2")
        .unwrap();
    assert_eq!(
        client.check_in_memory("acme", "api_calls", d(0)).used,
        Some(d(6))
    );
    assert!(!client.is_stale(), "down for less than max_staleness");
    wait_for("the replica to turn stale", || async { client.is_stale() }).await;
    assert!(client.check("acme", "api_calls", d(1)).await.stale);
    wait_for("a reconnect attempt", || async {
        client.stats().reconnects >= 1
    })
    .await;
    assert_eq!(client.stats().buffered, 2);

    proxy.up(&app);
    wait_for("the client to resume", || async {
        let stats = client.stats();
        stats.connected && stats.resumes >= 1
    })
    .await;
    wait_for("the buffer to be sent", || async {
        client.stats().buffered == 0
    })
    .await;
    assert_eq!(ledger_total(&app, "acme").await, "6");
    let entitlements = app.get_json("/v1/tenants/acme/entitlements").await;
    assert_eq!(entitlements["features"]["api_calls"]["used"], "6");
    wait_for("the client's figure to settle at 6", || async {
        client.check_in_memory("acme", "api_calls", d(0)).used == Some(d(6))
    })
    .await;
    assert!(!client.is_stale());
    let stats = client.stats();
    assert_eq!((stats.sent, stats.dropped), (3, 0));
    client.shutdown().await.unwrap();
    app.stop().await;
}

/// With the server down the buffer fills, and then `record` refuses with `BufferFull` rather
/// than dropping anything; once the server is back the buffer drains and takes events again.
async fn a_full_buffer_refuses_usage_while_the_server_is_down(backend: Backend) {
    let app = service(backend, |_| {}).await;
    assert_eq!(app.put_tenant("acme", json!({})).await.status(), 201);
    let proxy = Proxy::start(&app).await;
    let options = Options {
        buffer_capacity: 3,
        batch_size: 2,
        ..options()
    };
    let client = Client::connect(&proxy.url(), API_KEY, options)
        .await
        .unwrap();
    proxy.down();
    for i in 0..3 {
        client
            .record("acme", "calls", d(1), &format!("e-{i}"))
            .unwrap();
    }
    let full = client.record("acme", "calls", d(1), "e-3");
    assert!(
        matches!(full, Err(Error::BufferFull { capacity: 3 })),
        "{full:?}"
    );
    assert_eq!(client.stats().buffered, 3);

    proxy.up(&app);
    wait_for("the buffer to drain", || async {
        client.stats().buffered == 0
    })
    .await;
    client.record("acme", "calls", d(1), "e-3").unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(ledger_total(&app, "acme").await, "4");
    app.stop().await;
}

/// `check_and_record` records what it allows, once per id, and refuses beyond the quota; the
/// client's own figure follows at once.
async fn check_and_record_is_the_servers_atomic_step(backend: Backend) {
    let app = service(backend, |_| {}).await;
    assert_eq!(app.put_tenant("acme", json!({})).await.status(), 201);
    let client = connect(&app, options()).await;
    let first = (client
        .check_and_record("acme", "api_calls", d(4), "r-1")
        .await)
        .unwrap();
    assert_eq!(
        (first.allowed, first.recorded, first.used),
        (true, Some(true), Some(d(4)))
    );
    assert_eq!(
        client.check_in_memory("acme", "api_calls", d(0)).used,
        Some(d(4))
    );
    let again = (client
        .check_and_record("acme", "api_calls", d(4), "r-1")
        .await)
        .unwrap();
    assert_eq!((again.recorded, again.used), (Some(true), Some(d(4))));
    let over = (client
        .check_and_record("acme", "api_calls", d(7), "r-2")
        .await)
        .unwrap();
    assert_eq!(
        (over.allowed, over.reason.as_ref(), over.recorded),
        (false, "limit_exceeded", Some(false))
    );
    assert_eq!(ledger_total(&app, "acme").await, "4");
    client.shutdown().await.unwrap();
    app.stop().await;
}

/// Counts what the hooks report.
#[derive(Default)]
struct Counted {
    dropped: AtomicUsize,
    ready: AtomicUsize,
}

impl Metrics for Counted {
    fn ready(&self, _resumed: bool) {
        self.ready.fetch_add(1, Ordering::Relaxed);
    }

    fn dropped(&self, events: &[UsageEvent], _error: &Error) {
        self.dropped.fetch_add(events.len(), Ordering::Relaxed);
    }
}

/// An event the server rejects (a negative quantity on a meter that does not allow them) is
/// dropped, counted and given to the hook; its quantity no longer counts locally.
async fn refused_usage_is_dropped_counted_and_reported(backend: Backend) {
    let app = service(backend, |_| {}).await;
    assert_eq!(app.put_tenant("acme", json!({})).await.status(), 201);
    let hooks = Arc::new(Counted::default());
    let client = connect(
        &app,
        Options {
            metrics: hooks.clone(),
            ..options()
        },
    )
    .await;
    assert_eq!(hooks.ready.load(Ordering::Relaxed), 1);
    client.record("acme", "calls", d(-2), "bad").unwrap();
    client.record("acme", "calls", d(1), "good").unwrap();
    wait_for("the batch to be answered", || async {
        client.stats().buffered == 0
    })
    .await;
    let stats = client.stats();
    assert_eq!((stats.sent, stats.dropped), (1, 1));
    assert_eq!(hooks.dropped.load(Ordering::Relaxed), 1);
    wait_for("the figure to settle at 1", || async {
        client.check_in_memory("acme", "api_calls", d(0)).used == Some(d(1))
    })
    .await;
    assert_eq!(ledger_total(&app, "acme").await, "1");
    client.shutdown().await.unwrap();
    app.stop().await;
}

/// With `Staleness::AskServer`, a stale replica asks the server (which knows a tenant the
/// replica does not yet); when the server cannot be reached, the memory answer comes back
/// marked stale.
async fn a_stale_replica_asks_the_server_and_falls_back_to_memory(backend: Backend) {
    let app = service(backend, |_| {}).await;
    assert_eq!(app.put_tenant("acme", json!({})).await.status(), 201);
    let proxy = Proxy::start(&app).await;
    let options = Options {
        max_staleness: Some(Duration::ZERO),
        staleness: Staleness::AskServer,
        // The stream stays down for seconds after it ends: the server is back meanwhile.
        initial_backoff: Duration::from_secs(10),
        max_backoff: Duration::from_secs(10),
        ..options()
    };
    let client = Client::connect(&proxy.url(), API_KEY, options)
        .await
        .unwrap();
    proxy.down();
    wait_for("the replica to turn stale", || async { client.is_stale() }).await;
    let check = client.check("acme", "api_calls", d(1)).await;
    assert_eq!(
        (check.allowed, check.limit, check.stale),
        (true, Some(10), true)
    );

    proxy.up(&app);
    assert_eq!(app.put_tenant("late", json!({})).await.status(), 201);
    assert!(client.is_stale() && !client.stats().connected);
    let asked = client.check("late", "api_calls", d(1)).await;
    assert_eq!(
        (asked.allowed, asked.reason.as_ref(), asked.limit),
        (true, "ok", Some(10))
    );
    let memory = client.check_in_memory("late", "api_calls", d(1));
    assert_eq!(memory.reason, "unknown_tenant");
    client.shutdown().await.unwrap();
    app.stop().await;
}

/// Two replicas on one PostgreSQL. The replica the client streams from is killed; a change
/// made on the other meanwhile reaches the client when it resumes there from its cursor (no
/// second snapshot), and usage buffered while both were out of reach arrives exactly once.
/// Then every replica is gone at once and a new one starts: the client resumes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_client_resumes_on_another_replica_and_after_all_were_killed() {
    let first = service(Backend::Postgres, |_| {}).await;
    let second = first.replica().await;
    assert_eq!(first.put_tenant("acme", json!({})).await.status(), 201);
    let proxy = Proxy::start(&first).await;
    let client = Client::connect(&proxy.url(), API_KEY, options())
        .await
        .unwrap();
    client.record("acme", "calls", d(1), "on-first").unwrap();
    wait_for("the first event to be sent", || async {
        client.stats().sent == 1
    })
    .await;

    proxy.down();
    let _database = first.crash();
    subscribe(&second, "acme", "price_pro").await;
    client.record("acme", "calls", d(2), "while-away").unwrap();
    wait_for("a reconnect attempt", || async {
        client.stats().reconnects >= 1
    })
    .await;
    assert!(!client.check_in_memory("acme", "sso", d(1)).allowed);
    proxy.up(&second);
    wait_for("the client to resume on the second replica", || async {
        let stats = client.stats();
        stats.connected && stats.resumes == 1 && stats.buffered == 0
    })
    .await;
    wait_for("the change made meanwhile to arrive", || async {
        client.check_in_memory("acme", "sso", d(1)).allowed
    })
    .await;
    assert_eq!(ledger_total(&second, "acme").await, "3");

    proxy.down();
    let second = second.restart().await;
    client.record("acme", "calls", d(4), "all-down").unwrap();
    proxy.up(&second);
    wait_for("the client to resume on the restarted replica", || async {
        let stats = client.stats();
        stats.connected && stats.resumes == 2 && stats.buffered == 0
    })
    .await;
    assert_eq!(ledger_total(&second, "acme").await, "7");
    wait_for("the client's figure to settle at 7", || async {
        client.check_in_memory("acme", "api_calls", d(0)).used == Some(d(7))
    })
    .await;
    let stats = client.stats();
    assert_eq!(
        (stats.readies, stats.resumes, stats.sent, stats.dropped),
        (3, 2, 3, 0)
    );
    client.shutdown().await.unwrap();
    second.stop().await;
}
