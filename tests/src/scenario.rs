//! The skeleton every fault and cluster scenario shares: build a world, wait for the
//! batch to be mid-work before injecting a fault, wait for it to complete, tally its history
//! and record the tally.
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
use std::time::{Duration, Instant};

use serde_json::json;

use crate::TestEnv;
use crate::check::{Tally, owned_rows, tally_convert, tally_create};
use crate::fixture::{self, World};

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

/// Appends a scenario's tally to `target/reliability/{results_file}` and asserts it is clean.
pub fn record_to(results_file: &str, fault: &str, tally: Tally) {
    let dir = crate::process::workspace_root()
        .join("target")
        .join("reliability");
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(results_file))
    {
        let line = json!({"fault": fault, "items": tally.items, "lost": tally.lost,
                          "duplicated": tally.duplicated, "partial": tally.partial});
        let _ = writeln!(f, "{line}");
    }
    assert_eq!(tally.lost, 0, "{fault}: lost {tally:?}");
    assert_eq!(tally.duplicated, 0, "{fault}: duplicated {tally:?}");
    assert_eq!(tally.partial, 0, "{fault}: partial {tally:?}");
    assert!(tally.items > 0, "{fault}: no items");
}

/// Waits until at least `n` items of the batch have an outcome.
pub async fn wait_done(env: &TestEnv, batch: i64, n: i64) {
    let started = Instant::now();
    while started.elapsed() < WAIT {
        let done = env
            .try_count(&format!(
                "SELECT n_created + n_converted + n_skipped + n_failed FROM bulk_batches WHERE id = {batch}"
            ))
            .await
            .unwrap_or(0);
        if done >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

/// Waits until the batch is completed, reading the database directly (the producer may
/// be the thing that was killed).
pub async fn wait_completed(env: &TestEnv, batch: i64) {
    let started = Instant::now();
    while started.elapsed() < WAIT {
        if env
            .try_count(&format!(
                "SELECT count(*) FROM bulk_batches WHERE id = {batch} AND state = 'completed'"
            ))
            .await
            == Some(1)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// A conversion world: `n` Sales Records (half created from Individuals, half stand-alone
/// leads), each with a lead's history. Returns the agency's admin and agency ids, the Sales
/// Record ids and how many rows each owns.
pub async fn convert_world(env: &TestEnv, n: i64) -> (i64, i64, Vec<i64>, HashMap<i64, i64>) {
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
    (s.admin_user_id, s.agency_id, ids, before)
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
