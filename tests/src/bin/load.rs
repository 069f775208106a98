//! `bulkops-load` (`make load`): HTTP load figures for the producer under the CRM's
//! request mix, on this machine's PostgreSQL, RabbitMQ and Redis, with the release binaries.
//!
//! Two agencies (`--individuals` each, with policies, custom fields and about 10 % already
//! linked; ~20 Individuals per county; `--leads` stand-alone leads with a history each) and
//! one producer with two workers. For each `--clients` level, that many closed-loop clients
//! (no think time: every client sends its next request when the last one is answered, as
//! fast as the API allows) run `--secs` seconds of this mix, each as a user of one of the
//! agencies:
//!
//! | share | request |
//! |---:|---|
//! | 30 % | `POST /v1/individuals/search` (one of five filters, 100 a page) |
//! | 15 % | `POST /v1/bulk/sales-records/preview` |
//! | 20 % | `GET /v1/batches/{id}` (polling one of the client's batches) |
//! | 5 % | `GET /v1/batches` |
//! | 5 % | `GET /v1/batches/{id}/items` |
//! | 5 % | `POST /v1/bulk/sales-records` for one county (~20 Individuals), with an Idempotency-Key |
//! | 10 % | `POST /v1/bulk/conversions` of one lead (the "Convert to Individual" button) |
//! | 7 % | `POST /v1/individuals/search.csv` for one county |
//! | 3 % | `GET /v1/batches/{id}/items.csv` |
//!
//! It reports requests/s and p50/p95/p99 per endpoint, every status, the producer's CPU
//! (cores used on average) and RSS; then waits for every accepted batch to complete and
//! checks their history (counts that add up, one outcome per item, one Sales Record per
//! Individual, one event per change and per completed batch). It writes docs/PERFORMANCE.md's
//! load section. It is a benchmark, not a test: nothing here asserts a speed.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bulkops_shared::db::stmt;
use bulkops_tests::TestEnv;
use bulkops_tests::api::token;
use bulkops_tests::process::workspace_root;
use reqwest::Method;
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};
use tokio::sync::Mutex;

struct Args {
    secs: u64,
    clients: Vec<usize>,
    individuals: i64,
    leads: i64,
    out: String,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        secs: 60,
        clients: vec![50, 200],
        individuals: 20_000,
        leads: 8_000,
        out: "docs/PERFORMANCE.md".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--secs" => a.secs = value.parse()?,
            "--clients" => {
                a.clients = value
                    .split(',')
                    .map(|c| c.trim().parse())
                    .collect::<Result<_, _>>()?
            }
            "--individuals" => a.individuals = value.parse()?,
            "--leads" => a.leads = value.parse()?,
            "--out" => a.out = value,
            _ => bail!("unknown flag {flag}"),
        }
    }
    Ok(a)
}

/// A small, fast PRNG (xorshift64*): each client its own, so no lock and no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the clients of one agency share: its admin's token, its record type, and the leads
/// not yet converted.
struct Agency {
    token: String,
    record_type: i64,
    leads: Mutex<Vec<i64>>,
}

/// One answered (or failed) request.
struct Sample {
    endpoint: &'static str,
    status: u16,
    secs: f64,
}

const FILTERS: [&str; 5] = [
    r#"{"individual": {"state": ["TX"]}}"#,
    r#"{"individual": {"status": ["Active"], "state": ["TX", "OK"]}}"#,
    r#"{"policy": {"coverage_type": ["Medicare Supplement"]}}"#,
    r#"{"policy": {"coverage_type": ["Medicare Advantage"], "status": ["Active"]}}"#,
    r#"{"individual": {"dob": {"from": "1950-01-01", "to": "1955-12-31"}}}"#,
];

/// Runs one client until `stop`; returns its samples and the batches it had accepted.
async fn client(
    n: usize,
    base: Arc<String>,
    http: reqwest::Client,
    agency: Arc<Agency>,
    stop: Arc<AtomicBool>,
) -> (Vec<Sample>, Vec<i64>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((n as u64 + 1) * 0x1000_0000_01B3));
    let mut samples = Vec::new();
    let mut mine: Vec<i64> = Vec::new();
    let mut seq = 0_u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let dice = rng.below(100);
        let county = format!("County-{}", rng.below(1000));
        let some_batch = if mine.is_empty() {
            None
        } else {
            Some(mine[rng.below(mine.len() as u64) as usize])
        };
        let filter: Value = serde_json::from_str(FILTERS[rng.below(FILTERS.len() as u64) as usize])
            .unwrap_or(Value::Null);
        let (endpoint, method, path, body, key): (
            &'static str,
            Method,
            String,
            Option<Value>,
            Option<String>,
        ) = match (dice, some_batch) {
            (0..30, _) => (
                "POST /v1/individuals/search",
                Method::POST,
                "/v1/individuals/search".into(),
                Some(json!({"filter": filter, "limit": 100})),
                None,
            ),
            (30..45, _) => (
                "POST /v1/bulk/sales-records/preview",
                Method::POST,
                "/v1/bulk/sales-records/preview".into(),
                Some(json!({"filter": filter, "record_type_id": agency.record_type})),
                None,
            ),
            (45..65, Some(b)) => (
                "GET /v1/batches/{id}",
                Method::GET,
                format!("/v1/batches/{b}"),
                None,
                None,
            ),
            (45..65, None) | (65..70, _) => (
                "GET /v1/batches",
                Method::GET,
                "/v1/batches?limit=20".into(),
                None,
                None,
            ),
            (70..75, Some(b)) => (
                "GET /v1/batches/{id}/items",
                Method::GET,
                format!("/v1/batches/{b}/items?limit=100"),
                None,
                None,
            ),
            (70..80, _) => (
                "POST /v1/bulk/sales-records",
                Method::POST,
                "/v1/bulk/sales-records".into(),
                Some(
                    json!({"filter": {"individual": {"county": [county]}}, "record_type_id": agency.record_type}),
                ),
                Some(format!("load-{n}-{seq}")),
            ),
            (80..90, _) => {
                let lead = agency.leads.lock().await.pop().unwrap_or(1);
                (
                    "POST /v1/bulk/conversions",
                    Method::POST,
                    "/v1/bulk/conversions".into(),
                    Some(json!({"sales_record_ids": [lead]})),
                    None,
                )
            }
            (90..97, _) | (97.., None) => (
                "POST /v1/individuals/search.csv",
                Method::POST,
                "/v1/individuals/search.csv".into(),
                Some(json!({"filter": {"individual": {"county": [county]}}})),
                None,
            ),
            (97.., Some(b)) => (
                "GET /v1/batches/{id}/items.csv",
                Method::GET,
                format!("/v1/batches/{b}/items.csv"),
                None,
                None,
            ),
        };
        let mut req = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(&agency.token);
        if let Some(b) = &body {
            req = req.json(b);
        }
        if let Some(k) = &key {
            req = req.header("Idempotency-Key", k);
        }
        let started = Instant::now();
        let (status, reply) = match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                // Read the whole body: a CSV is only downloaded once it has all arrived.
                match resp.bytes().await {
                    Ok(bytes) => (status, bytes),
                    Err(_) => (599, bytes::Bytes::new()),
                }
            }
            // A transport error or client timeout counts as a failure of its own.
            Err(_) => (599, bytes::Bytes::new()),
        };
        samples.push(Sample {
            endpoint,
            status,
            secs: started.elapsed().as_secs_f64(),
        });
        if status == 202
            && let Ok(v) = serde_json::from_slice::<Value>(&reply)
            && let Some(id) = v["batch_id"].as_i64()
        {
            mine.push(id);
        }
    }
    (samples, mine)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// `utime + stime` (seconds) and VmRSS / VmHWM (kB) of a process.
fn usage(pid: u32) -> (f64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    ((ticks(11) + ticks(12)) / 100.0, kb("VmRSS:"), kb("VmHWM:"))
}

/// What one load level measured.
struct Level {
    clients: usize,
    secs: f64,
    by_endpoint: BTreeMap<&'static str, Vec<(u16, f64)>>,
    cpu_cores: f64,
    rss_mb: f64,
    peak_rss_mb: f64,
    batches: Vec<i64>,
}

async fn run_level(
    base: &str,
    producer_pid: u32,
    agencies: &[Arc<Agency>],
    clients: usize,
    secs: u64,
) -> anyhow::Result<Level> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(clients)
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let base = Arc::new(base.to_owned());
    let (cpu0, _, _) = usage(producer_pid);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..clients {
        tasks.push(tokio::spawn(client(
            n,
            base.clone(),
            http.clone(),
            agencies[n % agencies.len()].clone(),
            stop.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut by_endpoint: BTreeMap<&'static str, Vec<(u16, f64)>> = BTreeMap::new();
    let mut batches = Vec::new();
    for t in tasks {
        let (samples, mine) = t.await?;
        for s in samples {
            by_endpoint
                .entry(s.endpoint)
                .or_default()
                .push((s.status, s.secs));
        }
        batches.extend(mine);
    }
    let wall = started.elapsed().as_secs_f64();
    let (cpu1, rss, hwm) = usage(producer_pid);
    Ok(Level {
        clients,
        secs: wall,
        by_endpoint,
        cpu_cores: (cpu1 - cpu0) / wall,
        rss_mb: rss as f64 / 1024.0,
        peak_rss_mb: hwm as f64 / 1024.0,
        batches,
    })
}

fn report(level: &Level) -> (String, u64) {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "**{} clients**, {:.0} s: producer {:.2} cores on average, RSS {:.0} MB (peak {:.0} MB).\n",
        level.clients, level.secs, level.cpu_cores, level.rss_mb, level.peak_rss_mb
    );
    let _ = writeln!(
        t,
        "| endpoint | requests | req/s | p50 ms | p95 ms | p99 ms | statuses |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---|");
    let mut total = 0;
    let mut five = 0;
    for (endpoint, samples) in &level.by_endpoint {
        let mut lat: Vec<f64> = samples.iter().map(|(_, s)| *s * 1000.0).collect();
        lat.sort_by(f64::total_cmp);
        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        for (st, _) in samples {
            *statuses.entry(*st).or_default() += 1;
            if *st >= 500 {
                five += 1;
            }
        }
        total += samples.len();
        let _ = writeln!(
            t,
            "| `{endpoint}` | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
            samples.len(),
            samples.len() as f64 / level.secs,
            percentile(&lat, 0.50),
            percentile(&lat, 0.95),
            percentile(&lat, 0.99),
            statuses
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(
        t,
        "| **all** | {total} | {:.0} | | | | {five} answers ≥ 500 |",
        total as f64 / level.secs
    );
    (t, five)
}

/// Waits for every batch to complete, then checks the whole run's history in a few
/// set-based queries and the captured events.
async fn check_history(env: &TestEnv, batches: &[i64]) -> anyhow::Result<String> {
    let started = Instant::now();
    loop {
        let open = env
            .count("SELECT count(*) FROM bulk_batches WHERE state <> 'completed'")
            .await;
        if open == 0 {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(900),
            "{open} batches did not complete within 15 minutes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let accepted: HashSet<i64> = batches.iter().copied().collect();
    let all = env.count("SELECT count(*) FROM bulk_batches").await;
    ensure!(
        all as usize == accepted.len(),
        "{all} batches in the database, {} accepted",
        accepted.len()
    );
    let bad_counts = env
        .count(
            "SELECT count(*) FROM bulk_batches b
              LEFT JOIN LATERAL (
                SELECT count(*) AS n,
                       count(*) FILTER (WHERE status = 'created') AS created,
                       count(*) FILTER (WHERE status = 'converted') AS converted,
                       count(*) FILTER (WHERE status = 'skipped') AS skipped,
                       count(*) FILTER (WHERE status = 'failed') AS failed,
                       count(*) FILTER (WHERE status = 'pending') AS pending
                  FROM bulk_items i WHERE i.batch_id = b.id) c ON true
              WHERE c.n <> b.total OR c.pending <> 0 OR c.created <> b.n_created
                 OR c.converted <> b.n_converted OR c.skipped <> b.n_skipped
                 OR c.failed <> b.n_failed OR b.completed_at IS NULL",
        )
        .await;
    ensure!(
        bad_counts == 0,
        "{bad_counts} batches whose items and counters disagree"
    );
    let dups = env
        .count(
            "SELECT count(*) FROM (SELECT individual_id FROM sales_records WHERE individual_id IS NOT NULL
               GROUP BY individual_id HAVING count(*) > 1) d",
        )
        .await;
    ensure!(dups == 0, "{dups} Individuals with two Sales Records");
    let bad_conversions = env
        .count(
            "SELECT count(*) FROM bulk_items i JOIN bulk_batches b ON b.id = i.batch_id
              WHERE i.status = 'converted'
                AND (EXISTS (SELECT 1 FROM sales_records s WHERE s.id = i.target_id)
                     OR NOT EXISTS (SELECT 1 FROM conversion_log l
                                     WHERE l.sales_record_id = i.target_id AND l.individual_id = i.result_id))",
        )
        .await;
    ensure!(
        bad_conversions == 0,
        "{bad_conversions} converted items whose Sales Record survived or is not logged"
    );
    let created: HashSet<i64> = ids(
        env,
        "SELECT result_id AS n FROM bulk_items WHERE status = 'created'",
    )
    .await?;
    let converted: HashSet<i64> = ids(
        env,
        "SELECT target_id AS n FROM bulk_items WHERE status = 'converted'",
    )
    .await?;
    // Every event, once: the relay may still be catching up.
    let want_events = accepted.len() + created.len() + converted.len();
    env.events
        .wait_until(Duration::from_secs(300), |evs| {
            evs.iter()
                .map(|e| e.body["event_id"].as_str().unwrap_or_default())
                .collect::<HashSet<_>>()
                .len()
                >= want_events
        })
        .await;
    let events = env.events.all().await;
    let mut per: HashMap<(&str, i64), HashSet<&str>> = HashMap::new();
    for e in &events {
        let key = match e.routing_key.as_str() {
            "bulk_batch.completed" => ("batch", e.body["batch_id"].as_i64().unwrap_or(0)),
            "sales_record.created" => ("created", e.body["sales_record_id"].as_i64().unwrap_or(0)),
            "sales_record.converted" => {
                ("converted", e.body["sales_record_id"].as_i64().unwrap_or(0))
            }
            _ => continue,
        };
        per.entry(key)
            .or_default()
            .insert(e.body["event_id"].as_str().unwrap_or_default());
    }
    for (kind, set) in [
        ("batch", &accepted),
        ("created", &created),
        ("converted", &converted),
    ] {
        for id in set {
            let n = per.get(&(kind, *id)).map_or(0, HashSet::len);
            ensure!(n == 1, "{kind} {id} has {n} distinct events");
        }
        let extra = per
            .keys()
            .filter(|(k, id)| *k == kind && !set.contains(id))
            .count();
        ensure!(
            extra == 0,
            "{extra} {kind} events for changes that did not happen"
        );
    }
    Ok(format!(
        "All {} accepted batches completed; their history checked: items and counters agree, one Sales Record per Individual, every conversion whole and logged, exactly one event per completed batch ({}), per created Sales Record ({}) and per conversion ({}), none for anything else.",
        accepted.len(),
        accepted.len(),
        created.len(),
        converted.len()
    ))
}

async fn ids(env: &TestEnv, sql: &str) -> anyhow::Result<HashSet<i64>> {
    let rows = env.db.query_all_raw(stmt(sql, [])).await?;
    rows.iter()
        .map(|r| r.try_get::<i64>("", "n").map_err(Into::into))
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let bin = bulkops_tests::process::bin_dir();
    println!("bulkops-load: binaries from {}", bin.display());
    let env = TestEnv::new("load").await?;
    println!(
        "seeding two agencies of {} Individuals and {} leads each …",
        a.individuals, a.leads
    );
    let mut agencies = Vec::new();
    for (name, seed) in [("Load Agency North", 0.21), ("Load Agency South", 0.73)] {
        use bulkops_cli::seed;
        let s = seed::seed_agency(
            &env.db,
            &seed::AgencySpec {
                name: name.into(),
                individuals: a.individuals,
                linked_share: 0.1,
                seed,
            },
        )
        .await?;
        env.db
            .execute_raw(stmt(
                "UPDATE individuals SET county = 'County-' || (id % 1000) WHERE agency_id = $1",
                [s.agency_id.into()],
            ))
            .await?;
        let leads = seed::create_leads(&env.db, s.agency_id, a.leads, seed).await?;
        seed::enrich_leads(&env.db, s.agency_id, &leads, seed::LeadProfile::BENCH).await?;
        agencies.push(Arc::new(Agency {
            token: token(s.admin_user_id, s.agency_id),
            record_type: s.record_type_id,
            leads: Mutex::new(leads),
        }));
    }
    env.db.execute_unprepared("VACUUM ANALYZE").await?;
    // Production settings, not the end-to-end tests' quick ones: the producer's pool, the
    // retry tiers and log level are the defaults. The quota stays at its default (1,000,000
    // undecided items per agency): this mix's small batches never come near it, so a 429
    // would be a finding, not load shedding.
    for (k, v) in [
        ("BULKOPS__DATABASE__MAX_CONNECTIONS", "10"),
        ("BULKOPS__WORKER__RETRY_DELAYS_MS", "1000,5000,30000"),
        ("BULKOPS__WORKER__MAX_ATTEMPTS", "5"),
        ("BULKOPS__WORKER__LOCK_TTL_MS", "15000"),
        ("BULKOPS__SPLIT__POLL_INTERVAL_MS", "500"),
        ("BULKOPS__SPLIT__LEASE_SECS", "10"),
        ("RUST_LOG", "warn,bulkops_producer=info,bulkops_worker=info"),
    ] {
        env.set(k, v).await;
    }
    let (producer, api) = env.start_producer().await?;
    let pid = producer.lock().await.pid;
    for _ in 0..2 {
        env.start_worker().await?;
    }
    let mut sections = Vec::new();
    let mut batches = Vec::new();
    let mut failures = 0;
    for clients in &a.clients {
        println!("{clients} clients for {} s …", a.secs);
        let level = run_level(&api.base, pid, &agencies, *clients, a.secs).await?;
        let (table, five) = report(&level);
        println!("{table}");
        failures += five;
        sections.push(table);
        batches.extend(level.batches);
    }
    println!("waiting for every accepted batch to complete …");
    let history = check_history(&env, &batches).await;
    let history = match history {
        Ok(h) => h,
        Err(e) => format!("HISTORY CHECK FAILED: {e:#}"),
    };
    println!("{history}");
    let stamp = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC");
    let body = format!(
        "Measured {stamp} on this 2-core machine with `make load` (one producer, two workers, release builds; two agencies of {} Individuals; closed-loop clients without think time, {} s per level):\n\n{}\n{history}\n\n",
        a.individuals,
        a.secs,
        sections.join("\n")
    );
    let out = workspace_root().join(&a.out);
    let doc = std::fs::read_to_string(&out).unwrap_or_default();
    let (start, end) = ("<!-- load:start -->", "<!-- load:end -->");
    let section = format!("{start}\n{body}{end}");
    let new_doc = match (doc.find(start), doc.find(end)) {
        (Some(s), Some(e)) => format!("{}{}{}", &doc[..s], section, &doc[e + end.len()..]),
        _ => format!("{doc}\n{section}\n"),
    };
    std::fs::write(&out, new_doc)?;
    println!("wrote {}", out.display());
    env.finish().await;
    if failures > 0 || history.starts_with("HISTORY CHECK FAILED") {
        bail!("{failures} answers ≥ 500, or the history check failed: see above");
    }
    Ok(())
}
