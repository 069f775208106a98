//! The skeleton every fault and cluster scenario shares: build a world, start the
//! processes, submit the batch, wait for it to be mid-work before injecting a fault
//! ([`mid_batch`]), wait for it to complete, tally its history and record the tally.
//!
//! Scenarios append one JSON line per run to a results file under
//! `target/reliability/` (`results.jsonl` for the fault suite, `cluster.jsonl` for the
//! cluster suite); `scripts/reliability-table.sh` turns a file into a table of
//! `docs/RELIABILITY.md`.

#![allow(
    clippy::expect_used,
    reason = "scenario helpers run inside tests: a failed expectation is a failed test"
)]

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Mutex;

use crate::TestEnv;
use crate::api::Api;
use crate::check::{Tally, owned_rows, tally_convert, tally_create};
use crate::fixture::{self, World};
use crate::process::Proc;

/// Longest wait for a batch (only keeps a broken run from hanging).
pub const WAIT: Duration = Duration::from_secs(300);

/// How many times each scenario runs: the environment variable `var` (`FAULT_RUNS`,
/// `CLUSTER_RUNS`), default 1.
pub fn runs_from(var: &str) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// Appends `line` to `target/reliability/{file}` (best effort: the figures are a report,
/// the assertions are the test).
pub fn append_result(file: &str, line: &serde_json::Value) {
    let dir = crate::process::workspace_root()
        .join("target")
        .join("reliability");
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(file))
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Appends a scenario's tally to `target/reliability/{results_file}` and asserts it is clean.
pub fn record_to(results_file: &str, fault: &str, tally: Tally) {
    append_result(
        results_file,
        &json!({"fault": fault, "items": tally.items, "lost": tally.lost,
                "duplicated": tally.duplicated, "partial": tally.partial}),
    );
    assert_eq!(tally.lost, 0, "{fault}: lost {tally:?}");
    assert_eq!(tally.duplicated, 0, "{fault}: duplicated {tally:?}");
    assert_eq!(tally.partial, 0, "{fault}: partial {tally:?}");
    assert!(tally.items > 0, "{fault}: no items");
}

/// Waits until at least `n` items of the batch have an outcome. It reads the live counts
/// (shards included): the batch row's counters lag by what the workers have not folded yet,
/// which at this rate can be most of the batch.
pub async fn wait_done(env: &TestEnv, batch: i64, n: i64) {
    let started = Instant::now();
    while started.elapsed() < WAIT {
        let done = env
            .try_count(&format!(
                "SELECT n_created + n_converted + n_skipped + n_failed FROM bulk_batch_live_counts WHERE batch_id = {batch}"
            ))
            .await
            .unwrap_or(0);
        if done >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until at least `n` items of the batch have an outcome, then asserts the batch is
/// still running: the fault the scenario injects next lands mid-batch.
pub async fn mid_batch(env: &TestEnv, batch: i64, n: i64) {
    wait_done(env, batch, n).await;
    assert_mid_batch(env, batch).await;
}

/// Asserts the batch is still running: the fault about to be injected lands mid-batch.
pub async fn assert_mid_batch(env: &TestEnv, batch: i64) {
    let state = crate::fixture::rows(
        &env.db,
        "SELECT to_jsonb(state) AS j FROM bulk_batches WHERE id = $1",
        vec![batch.into()],
    )
    .await;
    assert_ne!(
        state.first().and_then(|s| s.as_str()),
        Some("completed"),
        "the fault must land mid-batch"
    );
}

/// Waits until `sql` counts 1, polling every `poll`, for `bound` at most; false when it
/// never did. It reads the database directly (the producer may be the thing that was
/// killed).
pub async fn counts_one_within(env: &TestEnv, sql: &str, bound: Duration, poll: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < bound {
        if env.try_count(sql).await == Some(1) {
            return true;
        }
        tokio::time::sleep(poll).await;
    }
    false
}

/// Says, for the test's output, that a batch did not complete within [`WAIT`] and how far
/// it got (its pending items then count as lost in the tally).
#[allow(
    clippy::print_stderr,
    reason = "the report of a failing test, in its output"
)]
async fn report_incomplete(env: &TestEnv, batch: i64) {
    let pending = env
        .try_count(&format!(
            "SELECT count(*) FROM bulk_items WHERE batch_id = {batch} AND status = 'pending'"
        ))
        .await;
    let published = env
        .try_count(&format!(
            "SELECT split_published FROM bulk_batches WHERE id = {batch}"
        ))
        .await;
    eprintln!(
        "batch {batch} not completed within {WAIT:?}: {pending:?} items pending, {published:?} published"
    );
}

/// Waits (for `bound` at most) until the count `sql` returns is 0; false when it did not.
pub async fn counts_zero_within(env: &TestEnv, sql: &str, bound: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < bound {
        if env.try_count(sql).await == Some(0) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Waits (for `bound` at most) until the batch is completed; false when it did not.
pub async fn completed_within(env: &TestEnv, batch: i64, bound: Duration) -> bool {
    counts_one_within(
        env,
        &format!("SELECT count(*) FROM bulk_batches WHERE id = {batch} AND state = 'completed'"),
        bound,
        Duration::from_millis(100),
    )
    .await
}

/// Waits until the batch is completed (for [`WAIT`] at most: the tally then shows what is
/// missing).
pub async fn wait_completed(env: &TestEnv, batch: i64) {
    if !completed_within(env, batch, WAIT).await {
        report_incomplete(env, batch).await;
    }
}

/// Submits a bulk create of a Sales Record for every Individual of the world's agency (an
/// empty filter); returns the batch id.
pub async fn bulk_create_all(api: &Api, w: &World) -> i64 {
    api.bulk_create(
        &w.token(),
        &json!({"filter": {}, "record_type_id": w.record_type}),
    )
    .await
    .expect("bulk create")
}

/// Keeps the producer splitting (reading and writing the database, publishing) while a
/// fault lands, not only the workers: at most `max_in_flight` messages of a batch wait in
/// the queues, topped up 100 at a time.
pub async fn keep_splitting(env: &TestEnv, max_in_flight: i64) {
    env.set("BULKOPS__SPLIT__MAX_IN_FLIGHT_PER_BATCH", max_in_flight)
        .await;
    env.set("BULKOPS__SPLIT__CHUNK_SIZE", 100).await;
}

/// An API client for a worker's own endpoint (`/metrics`, `/readyz`).
pub async fn worker_api(worker: &Arc<Mutex<Proc>>) -> Api {
    let addr = worker.lock().await.addr.clone().expect("metrics address");
    Api::new(&format!("http://{addr}"))
}

/// The producer and `workers` workers; returns the producer's API and every process's
/// health endpoint, the producer's first (its API serves /readyz too).
pub async fn start_processes(env: &TestEnv, workers: usize) -> (Api, Vec<Api>) {
    let (_, api) = env.start_producer().await.expect("producer");
    let mut probes = vec![api.clone()];
    for _ in 0..workers {
        let w = env.start_worker().await.expect("worker");
        probes.push(worker_api(&w).await);
    }
    (api, probes)
}

/// Waits until every process's /readyz says 200 (bounded: a process that never becomes
/// ready again fails the test).
pub async fn wait_all_ready(probes: &[Api]) {
    for probe in probes {
        let started = Instant::now();
        loop {
            let r = probe
                .send(reqwest::Method::GET, "/readyz", None, None, &[])
                .await;
            if matches!(&r, Ok(r) if r.status == reqwest::StatusCode::OK) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{} stays unready: {r:?}",
                probe.base
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A create world of `items` Individuals, the producer and `workers` workers all ready,
/// and a bulk create of every Individual; returns the batch and every process's health
/// endpoint.
pub async fn start_create_ready(env: &TestEnv, items: i64, workers: usize) -> (i64, Vec<Api>) {
    let w = create_world(env, items).await;
    let (api, probes) = start_processes(env, workers).await;
    wait_all_ready(&probes).await;
    let batch = bulk_create_all(&api, &w).await;
    (batch, probes)
}

/// A create world: an agency with `n` Individuals (a tenth already linked).
pub async fn create_world(env: &TestEnv, n: i64) -> World {
    let w = World::new(&env.db, "Fault Agency").await;
    let agent_user = fixture::user(&env.db, w.agency, "agent_crm_user").await;
    let agent = fixture::agent(&env.db, w.agency).await;
    fixture::link(&env.db, agent_user, agent, 1).await;
    let name = fixture::custom_field(&env.db, w.agency, "individual", "Pref", "text").await;
    fixture::custom_field(&env.db, w.agency, "sales_record", "Pref", "text").await;
    fixture::rows(
        &env.db,
        "WITH ins AS (
           INSERT INTO individuals (agency_id, first_name, last_name, ssn, dob, servicing_agent_id)
           SELECT $1, 'Fn' || g, 'Ln' || g, lpad(g::text, 9, '5'), date '1950-01-01' + (g % 3000)::int, $3
             FROM generate_series(1, $2::bigint) g RETURNING id
         ), cf AS (
           INSERT INTO custom_field_values (definition_id, record_id, value) SELECT $4, id, '\"x\"'::jsonb FROM ins
         ), linked AS (
           INSERT INTO sales_records (agency_id, record_type_id, individual_id)
           SELECT $1, $5, id FROM ins WHERE id % 10 = 0
         )
         SELECT to_jsonb(count(*)) AS j FROM ins",
        vec![w.agency.into(), n.into(), agent.into(), name.into(), w.record_type.into()],
    )
    .await;
    w
}

/// A conversion world: Sales Records of one agency, each with a lead's history.
#[derive(Debug, Clone)]
pub struct ConvertWorld {
    /// The agency's admin, who converts.
    pub admin: i64,
    /// The agency.
    pub agency: i64,
    /// The Sales Records.
    pub ids: Vec<i64>,
    /// How many rows each Sales Record owned before the conversion (the partial check).
    pub before: HashMap<i64, i64>,
}

impl ConvertWorld {
    /// How many Sales Records there are: the conversion's size.
    pub fn total(&self) -> i64 {
        i64::try_from(self.ids.len()).unwrap_or(0)
    }

    /// Submits a conversion of every Sales Record as the admin; returns the batch id.
    pub async fn convert_all(&self, api: &Api) -> i64 {
        api.convert(&crate::api::token(self.admin, self.agency), &self.ids)
            .await
            .expect("convert")
    }
}

/// A conversion world of `n` Sales Records (half created from Individuals, half
/// stand-alone leads), each with a lead's history.
pub async fn convert_world(env: &TestEnv, n: i64) -> ConvertWorld {
    use bulkops_cli::seed;
    let s = seed::seed_agency(
        &env.db,
        &seed::AgencySpec {
            name: "Fault Leads".into(),
            individuals: n,
            linked_share: 0.5,
            seed: 0.5,
        },
    )
    .await
    .expect("seed");
    let mut ids = seed::create_leads(&env.db, s.agency_id, n / 2, 0.6)
        .await
        .expect("leads");
    ids.extend(
        fixture::rows(
            &env.db,
            "SELECT to_jsonb(id) AS j FROM sales_records WHERE individual_id IS NOT NULL",
            vec![],
        )
        .await
        .iter()
        .filter_map(serde_json::Value::as_i64),
    );
    seed::enrich_leads(&env.db, s.agency_id, &ids, seed::LeadProfile::DEMO)
        .await
        .expect("enrich");
    let before = owned_rows(env, &ids).await;
    ConvertWorld {
        admin: s.admin_user_id,
        agency: s.agency_id,
        ids,
        before,
    }
}

/// Tallies a create batch.
pub async fn finish_create(env: &TestEnv, batch: i64) -> Tally {
    wait_completed(env, batch).await;
    tally_create(env, batch).await
}

/// Tallies a conversion batch.
pub async fn finish_convert(env: &TestEnv, batch: i64, before: &HashMap<i64, i64>) -> Tally {
    wait_completed(env, batch).await;
    tally_convert(env, batch, before).await
}
