//! Side by side with the peer: the same signed `customer.created` webhooks, sent by wrk (a C load
//! generator) to `@supabase/stripe-sync-engine` 0.48.5 (the open-source Stripe → Postgres sync
//! engine, from npm) and to the real `billsync serve` binary, each on a database of its own.
//! Measured: from the first request until every event is acknowledged (every 200 received) and
//! applied (billsync: every inbox row applied to the mirror, refetch off; the peer: every
//! customer row stored). Prints each run and the median of the runs, and the ratio.
//!
//! ```sh
//! cargo bench --bench peer                      # peer, billsync on PostgreSQL and on SQLite
//! cargo bench --bench peer -- postgres sqlite   # some of them
//! BILLSYNC_BENCH_EVENTS=20000 BILLSYNC_BENCH_RUNS=5 cargo bench --bench peer
//! BILLSYNC_BENCH_PERF=target/peer/perf cargo bench --bench peer -- postgres
//! ```
//!
//! Needs node and npm (the peer is installed under target/peer, never committed), wrk (installed
//! with apt-get when missing) and PostgreSQL (BILLSYNC_BENCH_DATABASE_URL, an admin URL; default
//! postgres://postgres@127.0.0.1:5432/postgres). With BILLSYNC_BENCH_PERF set, `perf record -a -g`
//! samples the whole machine during each billsync run of the first round into `FILE.<target>`;
//! BILLSYNC_BENCH_BIN runs another billsync binary (an earlier build, to compare).
//!
//! The peer stores the webhook's own copy without calling Stripe (no `revalidateObjectsViaStripe
//! Api`), as billsync does with `stripe.refetch = false`; see benches/peer/server.cjs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::Connection;

mod common;

use common::{Backend, Database};

const PEER: &str = "@supabase/stripe-sync-engine@0.48.5";
/// The Stripe client the peer names as a peer dependency (`stripe > 18`).
const PEER_STRIPE: &str = "stripe@19";
const SECRET: &str = "whsec_bench_peer";
const WRK_THREADS: usize = 2;

/// The Lua script wrk runs: each thread sends its share of the pre-signed requests once (wrk's
/// Lua has no HMAC), then nothing (an empty request leaves the connection idle); at its last
/// answer it marks itself done in DONE_DIR and stops. wrk calls the first thread's `request`
/// once before it starts, to check the request: that call sends nothing.
const SCRIPT: &str = r#"
local threads = {}
local count = 0
function setup(thread)
  thread:set("id", count)
  count = count + 1
  table.insert(threads, thread)
end

function init(args)
  local n = tonumber(os.getenv("WRK_THREADS"))
  local path = os.getenv("WEBHOOK_PATH")
  requests = {}
  local i = 0
  for line in io.lines(os.getenv("EVENTS")) do
    if i % n == id then
      local tab = line:find("\t", 1, true)
      requests[#requests + 1] = wrk.format("POST", path, {
        ["Stripe-Signature"] = line:sub(1, tab - 1),
        ["Content-Type"] = "application/json",
      }, line:sub(tab + 1))
    end
    i = i + 1
  end
  sent = 0
  answered = 0
  failed = 0
  checking = id == 0
end

function request()
  if checking then
    checking = false
    return requests[1]
  end
  if sent < #requests then
    sent = sent + 1
    return requests[sent]
  end
  return ""
end

function response(status, headers, body)
  answered = answered + 1
  if status ~= 200 then
    failed = failed + 1
  end
  if answered == #requests then
    io.open(os.getenv("DONE_DIR") .. "/" .. id, "w"):close()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local answered, failed = 0, 0
  for _, t in ipairs(threads) do
    answered = answered + t:get("answered")
    failed = failed + t:get("failed")
  end
  io.write(string.format("RESULT %d %d\n", answered, failed))
end
"#;

/// What one run sends to.
#[derive(Clone, Copy, Debug)]
enum Target {
    Peer,
    Billsync(Backend),
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Self::Peer => "peer",
            Self::Billsync(Backend::Postgres) => "postgres",
            Self::Billsync(Backend::Sqlite) => "sqlite",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Peer => "stripe-sync-engine 0.48.5, PostgreSQL",
            Self::Billsync(Backend::Postgres) => "billsync serve, PostgreSQL",
            Self::Billsync(Backend::Sqlite) => "billsync serve, SQLite",
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn work_dir() -> PathBuf {
    root().join("target").join("peer")
}

fn run(command: &mut Command, what: &str) {
    let status = command.status().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(status.success(), "{what} failed: {status}");
}

/// Installs the peer from npm under target/peer (once) and puts its server there.
fn install_peer() -> PathBuf {
    let dir = work_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let installed = dir.join("node_modules/@supabase/stripe-sync-engine/package.json");
    let version = std::fs::read_to_string(&installed).unwrap_or_default();
    if !version.contains("\"version\": \"0.48.5\"") {
        std::fs::write(dir.join("package.json"), "{\"private\": true}\n").unwrap();
        run(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", PEER, PEER_STRIPE])
                .current_dir(&dir),
            "npm install",
        );
    }
    std::fs::copy(
        root().join("benches/peer/server.cjs"),
        dir.join("server.cjs"),
    )
    .unwrap();
    dir
}

fn install_wrk() {
    let found = Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if found.is_err() {
        run(
            Command::new("apt-get").args(["install", "-y", "wrk"]),
            "apt-get install wrk",
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `n` signed `customer.created` events of distinct customers, one `signature<TAB>body` a line.
fn write_events(path: &Path, n: usize, round: usize) {
    let now = chrono::Utc::now().timestamp();
    let mut lines = String::new();
    for i in 0..n {
        let body = json!({
            "id": format!("evt_peer_{round}_{i}"), "object": "event", "type": "customer.created",
            "api_version": "2025-03-31.basil", "created": now, "livemode": false,
            "pending_webhooks": 1, "request": {"id": null, "idempotency_key": null},
            "data": {"object": {
                "id": format!("cus_peer_{i}"), "object": "customer", "created": now,
                "email": format!("c{i}@example.test"), "name": format!("Customer {i}"),
                "livemode": false, "delinquent": false, "balance": 0, "currency": null,
                "description": null, "address": null, "phone": null, "shipping": null,
                "invoice_prefix": format!("P{i:07}"), "invoice_settings": {
                    "custom_fields": null, "default_payment_method": null, "footer": null,
                    "rendering_options": null},
                "preferred_locales": [], "tax_exempt": "none", "test_clock": null,
                "metadata": {"tenant_id": format!("peer-{i}")}}}
        })
        .to_string();
        let signature = billsync::webhook::signature::header(SECRET, now, body.as_bytes());
        lines.push_str(&signature);
        lines.push('\t');
        lines.push_str(&body);
        lines.push('\n');
    }
    std::fs::write(path, lines).unwrap();
}

/// A server under test, in a process of its own, on a database of its own.
struct Server {
    child: Child,
    port: u16,
    db: Database,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(target: Target, peer_dir: &Path) -> Self {
        let backend = match target {
            Target::Peer => Backend::Postgres,
            Target::Billsync(backend) => backend,
        };
        let db = Database::create(backend).await;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let (mut command, health) = match target {
            Target::Peer => {
                let mut command = Command::new("node");
                command
                    .arg("server.cjs")
                    .current_dir(peer_dir)
                    .env("DATABASE_URL", &db.url)
                    .env("STRIPE_WEBHOOK_SECRET", SECRET)
                    .env("PORT", port.to_string());
                (command, "/health")
            }
            Target::Billsync(_) => {
                let binary = std::env::var("BILLSYNC_BENCH_BIN")
                    .unwrap_or_else(|_| env!("CARGO_BIN_EXE_billsync").to_owned());
                let mut command = Command::new(binary);
                // The benchmark's own BILLSYNC_BENCH_* settings are not the server's.
                for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("BILLSYNC_")) {
                    command.env_remove(name);
                }
                command
                    .arg("serve")
                    .current_dir(dir.path())
                    .env("BILLSYNC_LISTEN", format!("127.0.0.1:{port}"))
                    .env("BILLSYNC_DATABASE__URL", &db.url)
                    .env("BILLSYNC_STRIPE__WEBHOOK_SECRETS", SECRET)
                    .env("BILLSYNC_STRIPE__REFETCH", "false")
                    .env("BILLSYNC_CATALOG__PATH", root().join("config/plans.toml"))
                    .env("RUST_LOG", "warn");
                (command, "/readyz")
            }
        };
        let mut child = command
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", target.name()));
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}{health}");
        while !http
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{} ended while starting: {status}", target.name());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            port,
            db,
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        self.db.drop_now().await;
    }
}

/// A connection that counts how many of the events the target has stored (billsync: applied).
enum Counter {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl Counter {
    async fn open(target: Target, url: &str) -> Self {
        match target {
            Target::Billsync(Backend::Sqlite) => {
                Self::Sqlite(sqlx::SqliteConnection::connect(url).await.unwrap())
            }
            _ => Self::Postgres(sqlx::PgConnection::connect(url).await.unwrap()),
        }
    }

    /// Asked once every event is acknowledged: then billsync's inbox holds all `n`, and those
    /// not waiting (pending or failed) are applied (none of these events is skipped). Counting
    /// the rows waiting reads an index of them alone; counting the applied rows read the whole
    /// inbox every 20 ms, a cost of the measurement that grew with the events sent.
    async fn stored(&mut self, target: Target, n: i64) -> i64 {
        let sql = match target {
            Target::Peer => "SELECT COUNT(*) FROM stripe.customers",
            Target::Billsync(_) => {
                "SELECT COUNT(*) FROM inbox_events WHERE status IN ('pending', 'failed')"
            }
        };
        let count: i64 = match self {
            Self::Sqlite(conn) => sqlx::query_scalar(sql).fetch_one(conn).await.unwrap(),
            Self::Postgres(conn) => sqlx::query_scalar(sql).fetch_one(conn).await.unwrap(),
        };
        match target {
            Target::Peer => count,
            Target::Billsync(_) => n - count,
        }
    }
}

/// Sends the events to a fresh server; returns events/s acknowledged and applied.
async fn measure(
    target: Target,
    peer_dir: &Path,
    events: &Path,
    n: usize,
    connections: usize,
    perf: Option<String>,
) -> Rate {
    let server = Server::start(target, peer_dir).await;
    let done = tempfile::tempdir().unwrap();
    let script = work_dir().join("send.lua");
    std::fs::write(&script, SCRIPT).unwrap();
    let path = match target {
        Target::Peer => "/webhooks",
        Target::Billsync(_) => "/webhooks/stripe",
    };
    let perf = perf.map(|file| {
        Command::new("perf")
            .args(["record", "-a", "-g", "-F", "499", "-o", &file])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("perf")
    });
    let mut counter = Counter::open(target, &server.db.url).await;
    let started = Instant::now();
    let wrk = Command::new("wrk")
        .args([
            &format!("-t{WRK_THREADS}"),
            &format!("-c{connections}"),
            "-d600s",
            "--timeout",
            "600s",
            "-s",
        ])
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}", server.port))
        .env("WRK_THREADS", WRK_THREADS.to_string())
        .env("WEBHOOK_PATH", path)
        .env("EVENTS", events)
        .env("DONE_DIR", done.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("wrk");
    let answered = || std::fs::read_dir(done.path()).unwrap().count() == WRK_THREADS;
    let deadline = started + Duration::from_secs(300);
    let mut acknowledged = None;
    loop {
        if acknowledged.is_none() && answered() {
            acknowledged = Some(started.elapsed());
        }
        if acknowledged.is_some() && counter.stored(target, n as i64).await >= n as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: not every event acknowledged and applied after 300 s",
            target.name()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    drop(counter);
    let _ = Command::new("kill")
        .args(["-INT", &wrk.id().to_string()])
        .status();
    let output = wrk.wait_with_output().unwrap();
    if let Some(mut perf) = perf {
        let _ = Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait();
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let result: Vec<usize> = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("wrk printed: {text}"))
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(result, [n, 0], "{}: answered, not 200", target.name());
    server.stop().await;
    let acknowledged = acknowledged.unwrap_or(elapsed);
    Rate {
        acknowledged: n as f64 / acknowledged.as_secs_f64(),
        applied: n as f64 / elapsed.as_secs_f64(),
    }
}

/// Events per second: all answered 200; all answered and applied (the figure compared).
struct Rate {
    acknowledged: f64,
    applied: f64,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    billsync::state::init_crypto();
    let n = env_usize("BILLSYNC_BENCH_EVENTS", 5000);
    let runs = env_usize("BILLSYNC_BENCH_RUNS", 3);
    let connections = env_usize("BILLSYNC_BENCH_CONNECTIONS", 64);
    let perf = std::env::var("BILLSYNC_BENCH_PERF").ok();
    let all = [
        Target::Peer,
        Target::Billsync(Backend::Postgres),
        Target::Billsync(Backend::Sqlite),
    ];
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let targets: Vec<Target> = all
        .into_iter()
        .filter(|t| named.is_empty() || named.iter().any(|a| a == t.name()))
        .collect();
    install_wrk();
    let peer_dir = if targets.iter().any(|t| matches!(t, Target::Peer)) {
        install_peer()
    } else {
        work_dir()
    };
    println!(
        "{n} signed customer.created webhooks (distinct customers), wrk -t{WRK_THREADS} \
         -c{connections}, {runs} runs, {} cores; events/s acknowledged and applied",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let events = work_dir().join("events.txt");
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for round in 0..runs {
        // Fresh timestamps each round (both check them against a 300 s tolerance).
        write_events(&events, n, round);
        for (i, target) in targets.iter().enumerate() {
            let profile = perf
                .as_ref()
                .filter(|_| round == 0 && !matches!(target, Target::Peer))
                .map(|file| format!("{file}.{}", target.name()));
            let rate = measure(*target, &peer_dir, &events, n, connections, profile).await;
            println!(
                "run {}: {:<38} {:>6.0} events/s acknowledged and applied ({:.0}/s acknowledged)",
                round + 1,
                target.label(),
                rate.applied,
                rate.acknowledged
            );
            rates[i].push(rate.applied);
        }
    }
    println!();
    println!("| target | runs (events/s) | median |");
    println!("|---|---|---|");
    for (target, rates) in targets.iter().zip(&rates) {
        let runs: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        println!(
            "| {} | {} | {:.0} |",
            target.label(),
            runs.join(", "),
            median(rates)
        );
    }
    let median_of = |t: Target| {
        targets
            .iter()
            .position(|x| x.name() == t.name())
            .map(|i| median(&rates[i]))
    };
    if let Some(peer) = median_of(Target::Peer) {
        for backend in [Backend::Postgres, Backend::Sqlite] {
            if let Some(ours) = median_of(Target::Billsync(backend)) {
                println!(
                    "billsync on {backend:?} / peer (medians): {:.2}x",
                    ours / peer
                );
            }
        }
    }
}
