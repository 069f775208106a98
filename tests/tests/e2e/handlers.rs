//! The handler tier: the worker's jobs called directly (`Job::apply` in a transaction of
//! the test's own), against real PostgreSQL, with no process and no queue. It checks the
//! database guards the pipeline relies on when Redis locks are lost or a message comes
//! twice:
//!
//! - create: a duplicate delivery records nothing again, two workers running the same
//!   items at once (their locks lost) create one Sales Record each, and a Sales Record the
//!   CRM created meanwhile (the unique index) makes the item `skipped`;
//! - convert: chunks of two batches over the same records at once (locks lost) convert
//!   each record once, into one Individual, and the batch that lost the race skips it
//!   naming that Individual; redeliveries and a later batch over converted records decide
//!   nothing twice; and a custom field value the CRM writes on the merge target meanwhile
//!   (the `custom_field_values` primary key) is overwritten, not a failed conversion.
//!
//! The step-by-step helpers (one-connection sessions, waiting until a session is blocked
//! on a lock) are `interleave.rs`'s.

use std::collections::HashSet;

use bulkops_shared::batch::BatchKind;
use bulkops_shared::db::stmt;
use bulkops_shared::ids::{AgencyId, BatchId, UserId};
use bulkops_shared::progress::OutcomeDelta;
use bulkops_tests::TestEnv;
use bulkops_tests::check::owned_rows;
use bulkops_tests::fixture::{self, World, insert};
use bulkops_tests::scenario::create_world;
use bulkops_worker::job::for_kind;
use bulkops_worker::meta::BatchMeta;
use sea_orm::{ConnectionTrait, TransactionTrait};
use serde_json::json;

use crate::interleave::{STEP, batch, session, until_blocked_or_done};

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

/// A lead's world for the conversion job: `n` Sales Records of the admin's record type,
/// every other one created from an Individual (it merges into it) and the rest stand-alone
/// leads (each becomes a new Individual); each owns a plain note and an activity.
async fn leads(env: &TestEnv, w: &World, n: usize) -> Vec<i64> {
    let mut records = Vec::with_capacity(n);
    for k in 0..n {
        let individual = if k % 2 == 0 {
            Some(
                insert(
                    &env.db,
                    "individuals",
                    &json!({"agency_id": w.agency, "first_name": "Ind"}),
                )
                .await,
            )
        } else {
            None
        };
        let sr = insert(
            &env.db,
            "sales_records",
            &json!({"agency_id": w.agency, "record_type_id": w.record_type,
                    "individual_id": individual, "first_name": "Lead"}),
        )
        .await;
        insert(
            &env.db,
            "notes",
            &json!({"agency_id": w.agency, "owner_type": "sales_record", "owner_id": sr, "subject": "call"}),
        )
        .await;
        insert(
            &env.db,
            "activities",
            &json!({"agency_id": w.agency, "owner_type": "sales_record", "owner_id": sr, "kind": "task"}),
        )
        .await;
        records.push(sr);
    }
    records
}

/// The agency's Individuals.
async fn individuals(env: &TestEnv, w: &World) -> i64 {
    env.count(&format!(
        "SELECT count(*) FROM individuals WHERE agency_id = {}",
        w.agency
    ))
    .await
}

/// A batch's items (seq, target), in order.
fn items_of(targets: &[i64]) -> Vec<(i64, i64)> {
    targets
        .iter()
        .enumerate()
        .map(|(n, t)| (n as i64 + 1, *t))
        .collect()
}

/// An id list as a SQL array literal.
fn array(ids: &[i64]) -> String {
    format!(
        "'{{{}}}'::bigint[]",
        ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversions_hold_without_locks_and_decide_nothing_twice() {
    let env = crate::env("handlers_convert").await;
    let w = World::new(&env.db, "Convert Agency").await;
    let records = leads(&env, &w, 12).await;
    let all = array(&records);
    let before = individuals(&env, &w).await;
    assert_eq!(before, 6);
    // The Bulk Update's batch, and another batch converting half of the same records at
    // once (a workflow's "Convert to Individual" on each).
    let bulk = batch(&env, &w, BatchKind::ConvertSalesRecords, &records).await;
    let (_, second_half) = records.split_at(6);
    let other = batch(&env, &w, BatchKind::ConvertSalesRecords, second_half).await;
    let bulk_items = items_of(&records);
    let other_items = items_of(second_half);

    // Three chunks at once, as when the Redis locks were lost: the bulk batch's chunk, a
    // second worker holding the first half of the same chunk, and the other batch's. The
    // row locks, the pending guard and the conversion log make each record convert once.
    let (a, b, c) = tokio::join!(
        apply(&env, &bulk, &bulk_items),
        apply(&env, &bulk, &bulk_items[..6]),
        apply(&env, &other, &other_items),
    );
    assert_eq!(
        a.total() + b.total(),
        12,
        "every bulk item decided once: {a:?} + {b:?}"
    );
    assert_eq!(c.total(), 6, "every other item decided: {c:?}");
    assert_eq!(
        a.converted + b.converted + c.converted,
        12,
        "each record converted once: {a:?} {b:?} {c:?}"
    );
    assert_eq!(
        a.skipped + b.skipped + c.skipped,
        6,
        "the batch that lost the race skips: {a:?} {b:?} {c:?}"
    );
    assert_eq!(a.failed + b.failed + c.failed, 0);

    // Every record is gone, logged once, into one Individual; the stand-alone ones made
    // one new Individual each; every item names the Individual its record became.
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM sales_records WHERE id = ANY({all})"
        ))
        .await,
        0
    );
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM conversion_log WHERE sales_record_id = ANY({all})"
        ))
        .await,
        12
    );
    assert_eq!(
        individuals(&env, &w).await,
        before + 6,
        "one new Individual per lead"
    );
    let named = |batch: &BatchMeta, status: &str| {
        format!(
            "SELECT count(*) FROM bulk_items it
               JOIN conversion_log cl ON cl.sales_record_id = it.target_id AND cl.individual_id = it.result_id
              WHERE it.batch_id = {} AND it.status = '{status}'",
            batch.id.0
        )
    };
    let converted =
        env.count(&named(&bulk, "converted")).await + env.count(&named(&other, "converted")).await;
    let skipped =
        env.count(&named(&bulk, "skipped")).await + env.count(&named(&other, "skipped")).await;
    assert_eq!(
        (converted, skipped),
        (12, 6),
        "items name their Individuals"
    );
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM bulk_items WHERE batch_id IN ({}, {}) AND status = 'skipped'
                AND reason IS DISTINCT FROM 'already_converted'",
            bulk.id.0, other.id.0
        ))
        .await,
        0,
        "a skip says why"
    );
    // Each record's history moved once: one Conversion note and one activity per
    // Individual, nothing left on the records, one event per conversion.
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM notes n JOIN conversion_log cl ON cl.individual_id = n.owner_id
              WHERE cl.sales_record_id = ANY({all}) AND n.owner_type = 'individual' AND n.subject = 'Conversion'"
        ))
        .await,
        12
    );
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM activities a JOIN conversion_log cl ON cl.individual_id = a.owner_id
              WHERE cl.sales_record_id = ANY({all}) AND a.owner_type = 'individual'"
        ))
        .await,
        12
    );
    let owned: i64 = owned_rows(&env, &records).await.values().sum();
    assert_eq!(owned, 0, "nothing left owned by a converted record");
    let events = format!(
        "SELECT count(DISTINCT e->>'sales_record_id') * 1000 + count(*) FROM outbox o
          CROSS JOIN LATERAL jsonb_array_elements(o.events) e
         WHERE o.routing_key = 'sales_record.converted' AND (e->>'sales_record_id')::bigint = ANY({all})"
    );
    assert_eq!(env.count(&events).await, 12_012, "one event per conversion");

    // Duplicate deliveries of both batches' chunks: nothing is decided again.
    assert_eq!(
        apply(&env, &bulk, &bulk_items).await,
        OutcomeDelta::default()
    );
    assert_eq!(
        apply(&env, &other, &other_items).await,
        OutcomeDelta::default()
    );
    // A later batch over the same records (the button clicked again after the Bulk
    // Update, processed with the records already gone): skipped, naming the Individuals,
    // and nothing converts twice.
    let late = batch(&env, &w, BatchKind::ConvertSalesRecords, &records).await;
    let d = apply(&env, &late, &items_of(&records)).await;
    assert_eq!(
        d,
        OutcomeDelta {
            skipped: 12,
            ..OutcomeDelta::default()
        }
    );
    assert_eq!(env.count(&named(&late, "skipped")).await, 12);
    assert_eq!(
        individuals(&env, &w).await,
        before + 6,
        "no second Individual"
    );
    assert_eq!(env.count(&events).await, 12_012, "no second event");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_value_the_crm_writes_during_a_merge_is_overwritten_not_duplicated() {
    let env = crate::env("handlers_convert_unique").await;
    let w = World::new(&env.db, "Merge Agency").await;
    let sr_pref = fixture::custom_field(&env.db, w.agency, "sales_record", "Pref", "text").await;
    let ind_pref = fixture::custom_field(&env.db, w.agency, "individual", "Pref", "text").await;
    let ind = insert(
        &env.db,
        "individuals",
        &json!({"agency_id": w.agency, "first_name": "Ind"}),
    )
    .await;
    let sr = insert(
        &env.db,
        "sales_records",
        &json!({"agency_id": w.agency, "record_type_id": w.record_type, "individual_id": ind}),
    )
    .await;
    fixture::custom_value(&env.db, sr_pref, sr, json!("lead")).await;
    let meta = batch(&env, &w, BatchKind::ConvertSalesRecords, &[sr]).await;

    // The CRM writes the Individual's own Pref (uncommitted) while the conversion runs: the
    // conversion's upsert of the same (definition, record) key waits for it on the primary
    // key, then overwrites it instead of failing the conversion with a unique violation.
    let (crm, _) = session(&env).await;
    let crm_tx = crm.begin().await.expect("begin");
    crm_tx
        .execute_unprepared(&format!(
            "INSERT INTO custom_field_values (definition_id, record_id, value) VALUES ({ind_pref}, {ind}, '\"crm\"')"
        ))
        .await
        .expect("the CRM's value");
    let (worker, pid) = session(&env).await;
    let m = meta.clone();
    let chunk = tokio::spawn(async move {
        let tx = worker.begin().await.expect("begin");
        let delta = for_kind(m.kind)
            .apply(&tx, &m, &[(1, sr)])
            .await
            .expect("the conversion");
        tx.commit().await.expect("commit");
        delta
    });
    until_blocked_or_done(&env, pid, &chunk).await;
    assert!(
        !chunk.is_finished(),
        "the conversion waits for the CRM's value"
    );
    crm_tx.commit().await.expect("the CRM commits");
    let delta = tokio::time::timeout(STEP, chunk)
        .await
        .expect("the conversion finishes")
        .expect("the conversion");
    assert_eq!(
        delta,
        OutcomeDelta {
            converted: 1,
            ..OutcomeDelta::default()
        }
    );
    assert_eq!(
        env.count(&format!(
            "SELECT result_id FROM bulk_items WHERE batch_id = {} AND status = 'converted'",
            meta.id.0
        ))
        .await,
        ind,
        "merged into the Individual"
    );
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM custom_field_values WHERE definition_id = {ind_pref} AND record_id = {ind}"
        ))
        .await,
        1,
        "one value per field and record"
    );
    assert_eq!(
        fixture::custom_values(&env.db, "individual", ind)
            .await
            .get("Pref"),
        Some(&json!("lead")),
        "rule 6: the Sales Record's value wins"
    );
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM custom_field_values WHERE definition_id = {sr_pref}"
        ))
        .await,
        0,
        "nothing left on the deleted record"
    );
    env.finish().await;
}
