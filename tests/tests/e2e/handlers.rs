//! The handler tier: the worker's create job called directly (`Job::apply` in a
//! transaction of the test's own), against real PostgreSQL, with no process and no queue.
//! It checks the database guards the pipeline relies on when Redis locks are lost or a
//! message comes twice: a duplicate delivery records nothing again, two workers running
//! the same items at once (their locks lost) create one Sales Record each, and a Sales
//! Record the CRM created meanwhile (the unique index) makes the item `skipped`.

use std::collections::HashSet;

use bulkops_shared::batch::BatchKind;
use bulkops_shared::db::stmt;
use bulkops_shared::ids::{AgencyId, BatchId, UserId};
use bulkops_shared::progress::OutcomeDelta;
use bulkops_tests::TestEnv;
use bulkops_tests::fixture::insert;
use bulkops_tests::scenario::create_world;
use bulkops_worker::job::for_kind;
use bulkops_worker::meta::BatchMeta;
use sea_orm::{ConnectionTrait, TransactionTrait};
use serde_json::json;

/// Runs the create job over `items` in one transaction and commits. As the pipeline does,
/// a transaction the server aborts (two chunks over the same rows can deadlock) runs again.
async fn apply(env: &TestEnv, meta: &BatchMeta, items: &[(i64, i64)]) -> OutcomeDelta {
    let mut last = None;
    for _ in 0..5 {
        let tx = env.db.begin().await.expect("begin");
        match for_kind(meta.kind).apply(&tx, meta, items).await {
            Ok(delta) => {
                tx.commit().await.expect("commit");
                return delta;
            }
            Err(e) => {
                let _ = tx.rollback().await;
                last = Some(e);
            }
        }
    }
    panic!("apply failed five times: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_guards_hold_without_locks() {
    let env = TestEnv::new("handlers_create").await.expect("env");
    // 40 Individuals; every tenth already has a Sales Record (frozen as skipped, no item).
    let w = create_world(&env, 40).await;
    let batch = insert(
        &env.db,
        "bulk_batches",
        &json!({"agency_id": w.agency, "kind": "create_sales_records", "lane": "bulk",
                "requested_by": w.admin, "record_type_id": w.record_type}),
    )
    .await;
    env.db
        .execute_raw(stmt(
            "INSERT INTO bulk_items (batch_id, seq, target_id, status)
             SELECT $1, row_number() OVER (ORDER BY i.id), i.id, 'pending'
               FROM individuals i
              WHERE i.agency_id = $2
                AND NOT EXISTS (SELECT 1 FROM sales_records sr WHERE sr.individual_id = i.id)",
            [batch.into(), w.agency.into()],
        ))
        .await
        .expect("items");
    let items: Vec<(i64, i64)> = env
        .db
        .query_all_raw(stmt(
            "SELECT seq, target_id FROM bulk_items WHERE batch_id = $1 ORDER BY seq",
            [batch.into()],
        ))
        .await
        .expect("items")
        .iter()
        .map(|r| {
            (
                r.try_get::<i64>("", "seq").expect("seq"),
                r.try_get::<i64>("", "target_id").expect("target"),
            )
        })
        .collect();
    assert_eq!(items.len(), 36);
    let meta = BatchMeta {
        id: BatchId(batch),
        agency_id: AgencyId(w.agency),
        kind: BatchKind::CreateSalesRecords,
        requested_by: UserId(w.admin),
        record_type_id: Some(w.record_type),
        convertible_types: HashSet::new(),
    };

    // The CRM creates a Sales Record for the first item's Individual after the freeze.
    let (_, raced) = items[0];
    insert(
        &env.db,
        "sales_records",
        &json!({"agency_id": w.agency, "record_type_id": w.record_type, "individual_id": raced}),
    )
    .await;

    // Two workers hold the same chunk at once, as when their Redis locks were lost: the
    // row locks and the pending guard make one of them do each item.
    let (half, rest) = items.split_at(18);
    let (a, b) = tokio::join!(apply(&env, &meta, &items), apply(&env, &meta, half));
    let decided = a.total() + b.total();
    assert_eq!(decided, 36, "every item decided once: {a:?} + {b:?}");
    assert_eq!(a.skipped + b.skipped, 1, "the raced Individual is skipped");
    assert_eq!(a.created + b.created, 35);

    // A duplicate delivery of the rest: nothing is recorded again.
    let again = apply(&env, &meta, rest).await;
    assert_eq!(again, OutcomeDelta::default());

    // One Sales Record per Individual, and every item has its outcome.
    let doubled = env
        .count(&format!(
            "SELECT count(*) FROM (SELECT individual_id FROM sales_records
               WHERE agency_id = {} GROUP BY individual_id HAVING count(*) > 1) d",
            w.agency
        ))
        .await;
    assert_eq!(doubled, 0);
    let pending = env
        .count(&format!(
            "SELECT count(*) FROM bulk_items WHERE batch_id = {batch} AND status = 'pending'"
        ))
        .await;
    assert_eq!(pending, 0);
    let skipped_right = env
        .count(&format!(
            "SELECT count(*) FROM bulk_items bi JOIN sales_records sr ON sr.id = bi.result_id
              WHERE bi.batch_id = {batch} AND bi.status = 'skipped' AND sr.individual_id = {raced}"
        ))
        .await;
    assert_eq!(skipped_right, 1, "the skipped item names the CRM's record");
    env.finish().await;
}
