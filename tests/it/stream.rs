//! `GET /v1/entitlements/stream` over real HTTP: a snapshot, then each change; resuming from a
//! cursor (on another replica too); a cursor too old; scoped keys; a consumer that stops
//! reading is let go.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{
    API_KEY, Backend, TestApp, customer, event, on_both_backends, take_webhooks, use_test_catalog,
    wait_for,
};

on_both_backends!(
    a_stream_sends_a_snapshot_then_each_change,
    a_stream_resumes_from_its_cursor_with_only_what_it_missed,
    a_cursor_too_old_gets_a_fresh_snapshot_and_a_bad_one_a_400,
    a_scoped_key_streams_its_tenants_only,
    a_consumer_that_stops_reading_is_let_go_with_its_cursor,
);

/// One server-sent event.
#[derive(Debug, Clone)]
struct Frame {
    event: String,
    id: Option<String>,
    data: Value,
}

/// A stream being read.
struct Stream {
    response: reqwest::Response,
    buffer: String,
}

impl Stream {
    async fn open(app: &TestApp, key: &str, cursor: Option<&str>) -> Self {
        let mut request = app
            .client
            .get(app.url("/v1/entitlements/stream"))
            .bearer_auth(key);
        if let Some(cursor) = cursor {
            request = request.query(&[("cursor", cursor)]);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        let kind = response.headers()["content-type"].to_str().unwrap();
        assert!(kind.starts_with("text/event-stream"), "{kind}");
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (comments skipped); `None` when the stream ended.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(frame) = parse(&block) {
                    return Some(frame);
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(20), self.response.chunk())
                .await
                .expect("an event within 20 s")
                .unwrap()?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The events up to and including the first `kind`.
    async fn until(&mut self, kind: &str) -> Vec<Frame> {
        let mut frames = Vec::new();
        loop {
            let frame = self.next().await.expect("the stream to go on");
            let done = frame.event == kind;
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }
}

fn parse(block: &str) -> Option<Frame> {
    let (mut kind, mut id, mut data) = (None, None, String::new());
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            kind = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
    Some(Frame {
        event: kind?,
        id,
        data: serde_json::from_str(&data).unwrap(),
    })
}

/// The tenants of the `tenant` events among `frames`.
fn tenants(frames: &[Frame]) -> Vec<String> {
    (frames.iter().filter(|f| f.event == "tenant"))
        .map(|f| f.data["tenant_id"].as_str().unwrap().to_owned())
        .collect()
}

pub(crate) async fn service(
    backend: Backend,
    adjust: impl FnOnce(&mut billsync::config::Settings),
) -> TestApp {
    TestApp::spawn_with(backend, |s| {
        use_test_catalog(s);
        take_webhooks(s);
        s.stripe.refetch = false;
        adjust(s);
    })
    .await
}

async fn usage(app: &TestApp, tenant: &str, quantity: i64) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let events = json!({"events": [{"id": id, "tenant_id": tenant, "meter": "calls",
        "quantity": quantity}]});
    let response = app
        .v1(reqwest::Method::POST, "/v1/usage")
        .json(&events)
        .send()
        .await;
    assert_eq!(response.unwrap().status(), 200);
}

/// A customer of `tenant` with a `price_pro` subscription (api_calls 1000, sso), by webhooks.
pub(crate) async fn subscribe(app: &TestApp, tenant: &str, price: &str) {
    let cus = format!("cus_{tenant}");
    let now = chrono::Utc::now().timestamp();
    let stamp = uuid::Uuid::new_v4().simple();
    app.deliver(&event(
        &format!("evt_c_{stamp}"),
        "customer.updated",
        now,
        customer(&cus, tenant),
    ))
    .await;
    let subscription = json!({"id": format!("sub_{tenant}"), "object": "subscription",
        "customer": cus, "status": "active", "created": now - 86_400,
        "cancel_at_period_end": false, "items": {"data": [{"id": format!("si_{tenant}"),
        "quantity": 1, "price": {"id": price, "object": "price"},
        "current_period_start": now - 86_400, "current_period_end": now + 29 * 86_400}]}});
    let kind = "customer.subscription.updated";
    app.deliver(&event(&format!("evt_s_{stamp}"), kind, now, subscription))
        .await;
}

/// The snapshot lists every tenant with its plan, features and `used`, then `ready` with a
/// cursor; a subscription changed by webhook arrives as the tenant's new state with a newer
/// cursor, and usage as a coalesced `usage` event.
async fn a_stream_sends_a_snapshot_then_each_change(backend: Backend) {
    let app = service(backend, |_| {}).await;
    for tenant in ["acme", "globex"] {
        assert_eq!(app.put_tenant(tenant, json!({})).await.status(), 201);
    }
    usage(&app, "acme", 3).await;
    let mut stream = Stream::open(&app, crate::helpers::API_KEY, None).await;
    let frames = stream.until("ready").await;
    assert_eq!(frames[0].event, "hello");
    assert_eq!(frames[0].data["protocol"], 1);
    assert_eq!(frames[0].data["fail_open"], json!(["beta"]));
    assert_eq!(tenants(&frames), ["acme", "globex"]);
    let acme = &frames[1].data;
    assert_eq!(
        (acme["plan"].as_str(), acme["standing"].as_str()),
        (Some("free"), Some("free"))
    );
    let calls = &acme["features"]["api_calls"];
    assert_eq!(
        calls,
        &json!({"kind": "quota", "limit": 10, "meter": "calls", "used": "3"})
    );
    let ready = frames.last().unwrap();
    let cursor = ready.id.clone().unwrap();
    assert_eq!(ready.data["cursor"], cursor.as_str());
    assert_eq!(ready.data["resumed"], false);

    subscribe(&app, "acme", "price_pro").await;
    let changed = loop {
        let frame = stream.next().await.unwrap();
        if frame.event == "tenant" && frame.data["plan"] == "price_pro" {
            break frame;
        }
    };
    assert_eq!(
        changed.data["features"]["sso"],
        json!({"kind": "boolean", "enabled": true})
    );
    assert_eq!(changed.data["features"]["api_calls"]["limit"], 1000);
    let seq = |c: &str| c.split_once('-').unwrap().0.parse::<i64>().unwrap();
    assert!(
        seq(changed.id.as_deref().unwrap()) > seq(&cursor),
        "{changed:?}"
    );

    usage(&app, "globex", 2).await;
    usage(&app, "globex", 4).await;
    let used = loop {
        let frame = stream.next().await.unwrap();
        if frame.event == "usage" && frame.data["used"] == "6" {
            break frame;
        }
    };
    assert_eq!(
        (used.data["tenant_id"].as_str(), used.data["meter"].as_str()),
        (Some("globex"), Some("calls"))
    );
    app.stop().await;
}

/// A client that reconnects with its cursor gets hello, the tenants changed (or with usage)
/// since, and `ready` (resumed): nothing else. On PostgreSQL it reconnects to another replica.
async fn a_stream_resumes_from_its_cursor_with_only_what_it_missed(backend: Backend) {
    let app = service(backend, |_| {}).await;
    for tenant in ["a", "b", "c"] {
        assert_eq!(app.put_tenant(tenant, json!({})).await.status(), 201);
    }
    let mut stream = Stream::open(&app, API_KEY, None).await;
    let cursor = stream
        .until("ready")
        .await
        .last()
        .unwrap()
        .id
        .clone()
        .unwrap();
    drop(stream);

    subscribe(&app, "a", "plan_basic").await;
    usage(&app, "b", 5).await;
    wait_for("the subscription", || async {
        app.get_json("/v1/tenants/a/entitlements").await["plan"] == "plan_basic"
    })
    .await;
    let other = match backend {
        Backend::Postgres => Some(app.replica().await),
        Backend::Sqlite => None,
    };
    let target = other.as_ref().unwrap_or(&app);
    let mut resumed = Stream::open(target, API_KEY, Some(&cursor)).await;
    let frames = resumed.until("ready").await;
    assert_eq!(frames[0].event, "hello");
    assert!(!frames.iter().any(|f| f.event == "reset"), "{frames:?}");
    let mut sent = tenants(&frames);
    sent.sort();
    sent.dedup();
    assert_eq!(sent, ["a", "b"], "{frames:?}");
    let a = frames
        .iter()
        .rev()
        .find(|f| f.data["tenant_id"] == "a")
        .unwrap();
    assert_eq!(a.data["plan"], "plan_basic");
    let b = frames.iter().find(|f| f.data["tenant_id"] == "b").unwrap();
    assert_eq!(b.data["features"]["api_calls"]["used"], "5");
    assert_eq!(frames.last().unwrap().data["resumed"], true);
    if let Some(other) = other {
        other.stop().await;
    }
    app.stop().await;
}

/// A cursor beyond the change log, or whose usage time is older than the retention, gets a
/// `reset` and a full snapshot; a cursor that is not one is a 400.
async fn a_cursor_too_old_gets_a_fresh_snapshot_and_a_bad_one_a_400(backend: Backend) {
    let app = service(backend, |s| {
        s.entitlements.stream_retention = Duration::from_secs(1);
    })
    .await;
    assert_eq!(app.put_tenant("solo", json!({})).await.status(), 201);
    let mut stream = Stream::open(&app, API_KEY, None).await;
    let cursor = stream
        .until("ready")
        .await
        .last()
        .unwrap()
        .id
        .clone()
        .unwrap();
    drop(stream);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let future = format!("999999999-{}", chrono::Utc::now().timestamp_millis());
    for stale in [cursor.as_str(), future.as_str()] {
        let mut again = Stream::open(&app, API_KEY, Some(stale)).await;
        let frames = again.until("ready").await;
        let kinds: Vec<&str> = frames.iter().map(|f| f.event.as_str()).collect();
        assert_eq!(kinds, ["hello", "reset", "tenant", "ready"], "{stale}");
        assert_eq!(frames[1].data["reason"], "cursor_too_old");
        assert_eq!(frames[3].data["resumed"], false);
    }
    for bad in ["junk", "12", "-1-5"] {
        let response = app
            .v1(reqwest::Method::GET, "/v1/entitlements/stream")
            .query(&[("cursor", bad)])
            .send()
            .await
            .unwrap();
        let (status, code, field) = crate::helpers::error_of(response).await;
        assert_eq!(
            (status, code.as_str(), field.as_deref()),
            (400, "invalid_cursor", Some("cursor"))
        );
    }
    app.stop().await;
}

/// A key scoped to one tenant streams that tenant only: in the snapshot and in the changes.
async fn a_scoped_key_streams_its_tenants_only(backend: Backend) {
    const SCOPED: &str = "scoped-key-for-stream-a-0000";
    let app = service(backend, |s| {
        s.api.tenant_keys = vec![(
            billsync::config::key_digest(SCOPED).unwrap(),
            vec!["mine".to_owned()],
        )];
    })
    .await;
    for tenant in ["mine", "theirs"] {
        assert_eq!(app.put_tenant(tenant, json!({})).await.status(), 201);
    }
    let mut stream = Stream::open(&app, SCOPED, None).await;
    assert_eq!(tenants(&stream.until("ready").await), ["mine"]);
    usage(&app, "theirs", 1).await;
    usage(&app, "mine", 2).await;
    let frame = loop {
        let frame = stream.next().await.unwrap();
        if frame.event == "usage" {
            break frame;
        }
    };
    assert_eq!(frame.data["tenant_id"], "mine");
    app.stop().await;
}

/// A consumer that stops reading while changes pile up gets `bye` (`slow_consumer`, with its
/// cursor) and the stream ends; the server holds at most `stream_buffer` events for it.
async fn a_consumer_that_stops_reading_is_let_go_with_its_cursor(backend: Backend) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = service(backend, |s| s.entitlements.stream_buffer = 16).await;
    let address: std::net::SocketAddr = app
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut connection = socket.connect(address).await.unwrap();
    let request = format!(
        "GET /v1/entitlements/stream HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {API_KEY}\r\nConnection: close\r\n\r\n"
    );
    connection.write_all(request.as_bytes()).await.unwrap();
    // Read the (empty) snapshot to `ready`, then stop reading.
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("event: ready") {
        let mut chunk = [0u8; 1024];
        let n = connection.read(&mut chunk).await.unwrap();
        seen.extend_from_slice(&chunk[..n]);
    }
    // Many tenants at once (their change rows come from the triggers): far more than the
    // socket and the server's buffers hold.
    let many = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 16000) \
                INSERT INTO tenants (tenant_id, created_at, updated_at) \
                SELECT 'bulk-' || i, 0, 0 FROM n";
    let db = billsync::store::Db::connect(&app.settings.database)
        .await
        .unwrap();
    match &db {
        billsync::store::Db::Sqlite(pool) => sqlx::query(many).execute(pool).await.map(drop),
        billsync::store::Db::Postgres(pool) => sqlx::query(many).execute(pool).await.map(drop),
    }
    .unwrap();
    db.close().await;
    wait_for("the stream to be let go", || async {
        let metrics = app.metrics().await;
        metrics.contains("billsync_stream_disconnects_total{reason=\"slow_consumer\"} 1")
    })
    .await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), connection.read_to_end(&mut rest))
        .await
        .expect("the server to close the stream")
        .unwrap();
    let text = String::from_utf8_lossy(&rest);
    let bye = text.rfind("event: bye").expect("a bye at the end");
    assert!(text[bye..].contains("slow_consumer"), "{}", &text[bye..]);
    assert!(text[bye..].contains("\"cursor\":\""), "{}", &text[bye..]);
    app.stop().await;
}
