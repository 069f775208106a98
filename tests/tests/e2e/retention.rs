//! Retention: the pruner deletes finished batches' items, old idempotency keys, old
//! conversion log rows and outbox rows that could not be relayed, in small batches, under a
//! lease; a pruned batch keeps its counts and answers 410 for its items.

use std::time::{Duration, Instant};

use bulkops_tests::check;
use bulkops_tests::fixture::{World, insert_plain};
use reqwest::StatusCode;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

async fn exec(env: &bulkops_tests::TestEnv, sql: &str) {
    use sea_orm::ConnectionTrait;
    env.db
        .execute_unprepared(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruned_batches_keep_their_counts_and_answer_410_for_their_items() {
    let env = crate::env("retention").await;
    let w = World::new(&env.db, "Audited Agency").await;
    exec(
        &env,
        &format!(
            "INSERT INTO individuals (agency_id, first_name, state)
             SELECT {}, 'R' || g, CASE WHEN g <= 20 THEN 'TX' ELSE 'OK' END FROM generate_series(1, 25) g",
            w.agency
        ),
    )
    .await;
    // Rows of every kind, old and recent. The old outbox row is one the relay cannot publish
    // (no event_id): a leftover that blocks nothing once dropped.
    for (key, age) in [("old-key", "10 days"), ("new-key", "1 day")] {
        exec(
            &env,
            &format!(
                "INSERT INTO idempotency_keys (user_id, key, agency_id, endpoint, request_hash, status_code, response, created_at)
                 VALUES ({}, '{key}', {}, 'POST /v1/bulk/sales-records', 'h', 202, '{{}}', now() - interval '{age}')",
                w.admin, w.agency
            ),
        )
        .await;
    }
    for (sr, age) in [(900_000_001_i64, "4000 days"), (900_000_002, "30 days")] {
        insert_plain(
            &env.db,
            "conversion_log",
            &json!({"sales_record_id": sr, "agency_id": w.agency, "individual_id": 1, "merged": false}),
        )
        .await;
        exec(
            &env,
            &format!("UPDATE conversion_log SET converted_at = now() - interval '{age}' WHERE sales_record_id = {sr}"),
        )
        .await;
    }
    exec(
        &env,
        "INSERT INTO outbox (routing_key, events, created_at)
         VALUES ('sales_record.created', '[{\"not_an_event\": 1}]', now() - interval '40 days')",
    )
    .await;

    env.set("BULKOPS__RETENTION__INTERVAL_SECS", 1).await;
    env.set("BULKOPS__RETENTION__DELETE_CHUNK", 7).await;
    env.set("BULKOPS__RETENTION__PAUSE_MS", 0).await;
    let api = env.start(1).await.expect("start");
    let t = w.token();
    let old = api
        .bulk_create(
            &t,
            &json!({"filter": {"individual": {"state": ["TX"]}}, "record_type_id": w.record_type}),
        )
        .await
        .expect("create");
    let recent = api
        .bulk_create(
            &t,
            &json!({"filter": {"individual": {"state": ["OK"]}}, "record_type_id": w.record_type}),
        )
        .await
        .expect("create");
    for b in [old, recent] {
        api.wait_completed(&t, b, WAIT).await.expect("completed");
        check::create_batch(&env, b).await.expect("history");
    }
    let before = api
        .get(&format!("/v1/batches/{old}"), &t)
        .await
        .expect("get");
    assert!(before.json["items_pruned_at"].is_null(), "{}", before.text);
    // The old batch completed 91 days ago, as far as the pruner can tell.
    exec(
        &env,
        &format!(
            "UPDATE bulk_batches SET completed_at = now() - interval '91 days' WHERE id = {old}"
        ),
    )
    .await;

    let started = Instant::now();
    loop {
        let done = env
            .count(&format!(
                "SELECT count(*) FROM bulk_batches WHERE id = {old} AND items_prune_done"
            ))
            .await;
        let leftovers = env.count("SELECT count(*) FROM outbox").await
            + env
                .count("SELECT count(*) FROM idempotency_keys WHERE key = 'old-key'")
                .await
            + env
                .count("SELECT count(*) FROM conversion_log WHERE sales_record_id = 900000001")
                .await;
        if done == 1 && leftovers == 0 {
            break;
        }
        assert!(started.elapsed() < WAIT, "the pruner did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM bulk_items WHERE batch_id = {old}"
        ))
        .await,
        0
    );

    // The batch is still there with its counts, and says its items were pruned.
    let after = api
        .get(&format!("/v1/batches/{old}"), &t)
        .await
        .expect("get");
    assert_eq!(after.status, StatusCode::OK);
    assert_eq!(after.json["counts"], before.json["counts"]);
    assert_eq!(after.json["total"], 20);
    assert_eq!(after.json["state"], "completed");
    assert!(after.json["items_pruned_at"].is_string(), "{}", after.text);
    for path in [
        format!("/v1/batches/{old}/items"),
        format!("/v1/batches/{old}/items.csv"),
    ] {
        let r = api.get(&path, &t).await.expect("get");
        assert_eq!(r.status, StatusCode::GONE, "{path}: {}", r.text);
        assert!(r.content_type().starts_with("application/problem+json"));
        assert_eq!(r.json["status"], 410);
    }
    let (ok, _, err) = env
        .cli(&["batch", "items", &old.to_string()])
        .await
        .expect("cli");
    assert!(!ok.success() && err.contains("pruned"), "{err}");

    // What is not old enough stays.
    assert_eq!(api.items(&t, recent).await.expect("items").len(), 5);
    assert_eq!(
        env.count("SELECT count(*) FROM idempotency_keys WHERE key = 'new-key'")
            .await,
        1
    );
    assert_eq!(
        env.count("SELECT count(*) FROM conversion_log WHERE sales_record_id = 900000002")
            .await,
        1
    );
    // Counted: 20 items, 1 key, 1 log row, 1 outbox row, 1 batch.
    let metrics = reqwest::get(format!("{}/metrics", api.base))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    for line in [
        "bulkops_retention_pruned_rows_total{table=\"bulk_items\"} 20",
        "bulkops_retention_pruned_rows_total{table=\"idempotency_keys\"} 1",
        "bulkops_retention_pruned_rows_total{table=\"conversion_log\"} 1",
        "bulkops_retention_pruned_rows_total{table=\"outbox\"} 1",
        "bulkops_retention_batches_pruned_total 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}\n{metrics}");
    }
    // Events flow again once the leftover is gone.
    let again = api
        .bulk_create(
            &t,
            &json!({"filter": {"individual": {"state": ["TX"]}}, "record_type_id": w.record_type}),
        )
        .await
        .expect("create");
    api.wait_completed(&t, again, WAIT)
        .await
        .expect("completed");
    check::create_batch(&env, again).await.expect("history");
    env.finish().await;
}
