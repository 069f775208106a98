//! The batch counters' shards, against real PostgreSQL (no process, no queue): chunks of
//! one batch committed on two backends add to two shard rows and leave the batch row
//! alone; folds, however many run at once, complete the batch exactly once with one
//! `bulk_batch.completed`; a shard nobody folded is picked up by the producers' sweep;
//! and the dead-letter watcher's direct write folds the shards before it decides
//! whether the batch is complete.

use std::time::Duration;

use bulkops_shared::batch::BatchKind;
use bulkops_shared::db::stmt;
use bulkops_shared::ids::BatchId;
use bulkops_shared::messages::{Op, WorkMessage};
use bulkops_shared::progress::{self, OutcomeDelta};
use bulkops_tests::TestEnv;
use bulkops_tests::scenario::create_world;
use bulkops_worker::meta::BatchMeta;
use sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};

use crate::interleave::{batch, session};

/// Runs a create chunk over `items` on `db` the way the worker does: the rules, then the
/// outcomes into this backend's shard, in one transaction.
async fn chunk(db: &DatabaseConnection, meta: &BatchMeta, items: &[(i64, i64)]) -> OutcomeDelta {
    let tx = db.begin().await.expect("begin");
    let delta = bulkops_worker::create::apply(&tx, meta, items)
        .await
        .expect("create");
    progress::add_to_shard(&tx, meta.id, delta)
        .await
        .expect("shard");
    tx.commit().await.expect("commit");
    delta
}

/// The items a batch over `targets` has: (seq, target), seq from 1.
fn items_of(targets: &[i64]) -> Vec<(i64, i64)> {
    (1..).zip(targets.iter().copied()).collect()
}

/// Individuals of the world with no Sales Record yet, by id.
async fn free_individuals(env: &TestEnv, agency: i64) -> Vec<i64> {
    env.db
        .query_all_raw(stmt(
            "SELECT i.id FROM individuals i
              WHERE i.agency_id = $1
                AND NOT EXISTS (SELECT 1 FROM sales_records sr WHERE sr.individual_id = i.id)
              ORDER BY i.id",
            [agency.into()],
        ))
        .await
        .expect("individuals")
        .iter()
        .map(|r| r.try_get::<i64>("", "id").expect("id"))
        .collect()
}

async fn count(env: &TestEnv, sql: String) -> i64 {
    env.count(&sql).await
}

/// The batch row's counters agree with its items, it is completed, it has no shard left
/// and exactly one completion event.
async fn completed_once(env: &TestEnv, batch: BatchId) {
    let b = batch.0;
    assert_eq!(
        count(
            env,
            format!(
                "SELECT count(*) FROM bulk_batches bb WHERE id = {b} AND state = 'completed'
                   AND completed_at IS NOT NULL
                   AND n_created = (SELECT count(*) FROM bulk_items WHERE batch_id = {b} AND status = 'created')
                   AND n_failed = (SELECT count(*) FROM bulk_items WHERE batch_id = {b} AND status = 'failed')
                   AND n_created + n_converted + n_skipped + n_failed = total"
            )
        )
        .await,
        1,
        "batch {b}: completed, with counters equal to its items"
    );
    assert_eq!(
        count(
            env,
            format!("SELECT count(*) FROM bulk_batch_counts WHERE batch_id = {b}")
        )
        .await,
        0,
        "batch {b}: no shard left"
    );
    assert_eq!(
        count(
            env,
            format!(
                "SELECT count(*) FROM outbox
                  WHERE routing_key = 'bulk_batch.completed' AND (events->0->>'batch_id')::bigint = {b}"
            )
        )
        .await,
        1,
        "batch {b}: one completion event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_shards_fold_into_exactly_one_completion() {
    let env = TestEnv::new("counters").await.expect("env");
    let w = create_world(&env, 60).await;
    let free = free_individuals(&env, w.agency).await;
    assert!(free.len() >= 40, "the world has Individuals to create for");

    // 1. Two backends decide halves of one batch: two shards, the batch row untouched.
    let first = &free[..30];
    let meta = batch(&env, &w, BatchKind::CreateSalesRecords, first).await;
    let items = items_of(first);
    let (a, pid_a) = session(&env).await;
    let (b, pid_b) = session(&env).await;
    assert_ne!(pid_a, pid_b);
    let (left, right) = items.split_at(items.len() / 2);
    let (da, db) = tokio::join!(chunk(&a, &meta, left), chunk(&b, &meta, right));
    assert_eq!(da.created + db.created, 30);
    let id = meta.id.0;
    assert_eq!(
        count(
            &env,
            format!("SELECT count(*) FROM bulk_batch_counts WHERE batch_id = {id}")
        )
        .await,
        2,
        "one shard per backend"
    );
    assert_eq!(
        count(
            &env,
            format!("SELECT n_created + n_skipped + n_failed FROM bulk_batches WHERE id = {id}")
        )
        .await,
        0,
        "the chunks left the batch row alone"
    );
    assert_eq!(
        count(
            &env,
            format!("SELECT n_created FROM bulk_batch_live_counts WHERE batch_id = {id}")
        )
        .await,
        30,
        "the live view sums the shards"
    );
    assert!(
        progress::ready_to_complete(&env.db, meta.id)
            .await
            .expect("ready")
    );

    // 2. Three folds at once: exactly one completes the batch.
    let (f1, f2, f3) = tokio::join!(
        progress::fold(&a, meta.id, None),
        progress::fold(&b, meta.id, None),
        progress::fold(&env.db, meta.id, None),
    );
    let completions = [f1, f2, f3]
        .into_iter()
        .map(|r| r.expect("fold"))
        .filter(|c| *c)
        .count();
    assert_eq!(completions, 1, "one fold completes the batch");
    completed_once(&env, meta.id).await;
    assert!(
        !progress::ready_to_complete(&env.db, meta.id)
            .await
            .expect("ready"),
        "a completed batch is not ready again"
    );

    // 3. A shard its worker never folded (it died after the commit): the sweep folds it.
    let second = &free[30..34];
    let stale = batch(&env, &w, BatchKind::CreateSalesRecords, second).await;
    let stale_items = items_of(second);
    chunk(&a, &stale, &stale_items).await;
    assert!(
        progress::fold_stale(&env.db, Duration::from_secs(2))
            .await
            .expect("sweep")
            .is_empty(),
        "a fresh shard is left to its worker"
    );
    env.db
        .execute_unprepared(&format!(
            "UPDATE bulk_batch_counts SET updated_at = clock_timestamp() - interval '10 seconds'
              WHERE batch_id = {}",
            stale.id.0
        ))
        .await
        .expect("age the shard");
    let swept = progress::fold_stale(&env.db, Duration::from_secs(2))
        .await
        .expect("sweep");
    assert_eq!(swept, vec![stale.id], "the sweep completes the batch");
    completed_once(&env, stale.id).await;

    // 4. The dead-letter watcher decides the last item while the others sit in a shard:
    //    its direct write folds them and completes the batch.
    let third = &free[34..37];
    let mixed = batch(&env, &w, BatchKind::CreateSalesRecords, third).await;
    let mixed_items = items_of(third);
    chunk(&b, &mixed, &mixed_items[..2]).await;
    let (seq, target) = mixed_items[2];
    let msg = WorkMessage {
        v: bulkops_shared::messages::VERSION,
        op: Op::CreateSalesRecord,
        batch_id: mixed.id,
        seq,
        target_id: target,
    };
    assert!(
        bulkops_worker::deadletter::record_failure(&env.db, &msg, "error")
            .await
            .expect("record the failure")
    );
    completed_once(&env, mixed.id).await;
    assert_eq!(
        count(
            &env,
            format!(
                "SELECT n_created * 10 + n_failed FROM bulk_batches WHERE id = {}",
                mixed.id.0
            )
        )
        .await,
        21,
        "two created from the shard, one failed by the watcher"
    );
    env.finish().await;
}
