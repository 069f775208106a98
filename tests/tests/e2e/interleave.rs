//! Handler-tier interleavings: the worker's job functions (`create::apply`,
//! `convert::apply`, `deadletter::record_failure`) called directly against real PostgreSQL
//! on separate connections, driven step by step. Each step waits until the other session
//! is really blocked on a lock (read from `pg_stat_activity`) or done, so the order of
//! events is the one the test states, never a matter of timing. The step helpers and
//! [`batch`] are shared with `handlers.rs`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkops_shared::batch::BatchKind;
use bulkops_shared::db::stmt;
use bulkops_shared::ids::{AgencyId, BatchId, UserId};
use bulkops_shared::messages::{Op, WorkMessage};
use bulkops_tests::TestEnv;
use bulkops_tests::fixture::{self, World, insert, rows};
use bulkops_worker::meta::BatchMeta;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, TransactionTrait};
use serde_json::json;

/// Longest a step may wait for another session (only keeps a broken run from hanging).
pub(crate) const STEP: Duration = Duration::from_secs(30);

/// A pool of exactly one connection, and that connection's backend pid.
pub(crate) async fn session(env: &TestEnv) -> (DatabaseConnection, i32) {
    let mut opts = sea_orm::ConnectOptions::new(env.db_url.clone());
    opts.max_connections(1)
        .min_connections(1)
        .sqlx_logging(false);
    let db = Database::connect(opts).await.expect("connect");
    let pid: i32 = db
        .query_one_raw(stmt("SELECT pg_backend_pid() AS pid", []))
        .await
        .expect("pid")
        .expect("row")
        .try_get("", "pid")
        .expect("pid");
    (db, pid)
}

/// Whether backend `pid` is waiting for a lock now.
async fn blocked(env: &TestEnv, pid: i32) -> bool {
    env.db
        .query_one_raw(stmt(
            "SELECT (wait_event_type = 'Lock') AS b FROM pg_stat_activity WHERE pid = $1",
            [pid.into()],
        ))
        .await
        .ok()
        .flatten()
        .and_then(|r| r.try_get::<Option<bool>>("", "b").ok().flatten())
        .unwrap_or(false)
}

/// Waits until backend `pid` waits for a lock, or `task` has finished.
pub(crate) async fn until_blocked_or_done<T>(
    env: &TestEnv,
    pid: i32,
    task: &tokio::task::JoinHandle<T>,
) {
    let started = Instant::now();
    while started.elapsed() < STEP {
        if task.is_finished() || blocked(env, pid).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("backend {pid} neither blocked nor finished");
}

/// A batch of `kind` with the given targets as items 1.., all pending, inserted directly.
pub(crate) async fn batch(
    env: &TestEnv,
    w: &World,
    kind: BatchKind,
    targets: &[i64],
) -> Arc<BatchMeta> {
    let id = insert(
        &env.db,
        "bulk_batches",
        &json!({"agency_id": w.agency, "kind": kind.as_str(), "lane": "bulk", "requested_by": w.admin,
                "record_type_id": if kind == BatchKind::CreateSalesRecords { Some(w.record_type) } else { None },
                "total": targets.len(), "split_done_at": "2026-01-01T00:00:00Z"}),
    )
    .await;
    for (n, t) in targets.iter().enumerate() {
        fixture::insert_plain(
            &env.db,
            "bulk_items",
            &json!({"batch_id": id, "seq": n + 1, "target_id": t}),
        )
        .await;
    }
    Arc::new(BatchMeta {
        id: BatchId(id),
        agency_id: AgencyId(w.agency),
        kind,
        requested_by: UserId(w.admin),
        record_type_id: Some(w.record_type),
        convertible_types: HashSet::from([w.record_type]),
    })
}

/// Runs `items` of a create batch the way a worker's chunk does (rules, counters, commit).
async fn create_chunk(db: DatabaseConnection, meta: Arc<BatchMeta>, items: Vec<(i64, i64)>) {
    let tx = db.begin().await.expect("begin");
    let delta = bulkops_worker::create::apply(&tx, &meta, &items)
        .await
        .expect("create");
    bulkops_shared::progress::record_outcomes(&tx, meta.id, delta)
        .await
        .expect("counters");
    tx.commit().await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_cannot_fail_an_item_whose_sales_record_the_chunk_creates() {
    let env = crate::env("interleave_create_dlq").await;
    let w = World::new(&env.db, "Interleave Agency").await;
    let x = insert(
        &env.db,
        "individuals",
        &json!({"agency_id": w.agency, "first_name": "X"}),
    )
    .await;
    let y = insert(
        &env.db,
        "individuals",
        &json!({"agency_id": w.agency, "first_name": "Y"}),
    )
    .await;
    let meta = batch(&env, &w, BatchKind::CreateSalesRecords, &[x, y]).await;
    let (a, a_pid) = session(&env).await;
    let (b, b_pid) = session(&env).await;
    let (c, _) = session(&env).await;

    // 1. Another session holds an uncommitted Sales Record for Y: the chunk's insert will
    //    wait for it, after the chunk decided which items it works on.
    let c_tx = c.begin().await.expect("begin");
    c_tx.execute_raw(stmt(
        "INSERT INTO sales_records (agency_id, record_type_id, individual_id) VALUES ($1, $2, $3)",
        [w.agency.into(), w.record_type.into(), y.into()],
    ))
    .await
    .expect("blocker");
    // 2. The chunk runs items 1 (X) and 2 (Y) and blocks on Y.
    let chunk = tokio::spawn(create_chunk(a, meta.clone(), vec![(1, x), (2, y)]));
    until_blocked_or_done(&env, a_pid, &chunk).await;
    assert!(!chunk.is_finished(), "the chunk waits for the blocker");
    // 3. A duplicate delivery of item 1 is dead-lettered meanwhile.
    let msg = WorkMessage::new(Op::CreateSalesRecord, meta.id, 1, x);
    let dead = tokio::spawn(async move {
        bulkops_worker::deadletter::record_failure(&b, &msg, "retries_exhausted")
            .await
            .expect("record failure")
    });
    until_blocked_or_done(&env, b_pid, &dead).await;
    // 4. The blocker goes away; the chunk creates both records and commits.
    c_tx.rollback().await.expect("rollback");
    tokio::time::timeout(STEP, chunk)
        .await
        .expect("chunk finishes")
        .expect("chunk");
    let changed = tokio::time::timeout(STEP, dead)
        .await
        .expect("dead letter finishes")
        .expect("dead letter");

    // The ledger matches the records: both items created, naming their Sales Records.
    let items = rows(
        &env.db,
        "SELECT jsonb_build_object('seq', it.seq, 'status', it.status, 'result', it.result_id, 'sr', sr.id) AS j
           FROM bulk_items it LEFT JOIN sales_records sr ON sr.individual_id = it.target_id
          WHERE it.batch_id = $1 ORDER BY it.seq",
        vec![meta.id.0.into()],
    )
    .await;
    for it in &items {
        assert!(!it["sr"].is_null(), "a Sales Record exists: {it}");
        assert_eq!(it["status"], "created", "the ledger says so too: {it}");
        assert_eq!(it["result"], it["sr"], "{it}");
    }
    assert!(!changed, "the dead letter found its item decided");
    assert_eq!(
        env.count(&format!(
            "SELECT n_created * 10 + n_failed FROM bulk_batches WHERE id = {}",
            meta.id.0
        ))
        .await,
        20,
        "counters: two created, none failed"
    );
    env.finish().await;
}

/// Converts items of a conversion batch the way a worker's chunk does, in `tx`.
async fn convert_chunk(tx: &sea_orm::DatabaseTransaction, meta: &BatchMeta, seqs: &[i64]) {
    let delta = bulkops_worker::convert::apply(tx, meta, seqs)
        .await
        .expect("convert");
    bulkops_shared::progress::record_outcomes(tx, meta.id, delta)
        .await
        .expect("counters");
}

/// Rows anywhere that point at Sales Record `sr` or at one of its sales policies `sps`.
async fn owned_by(env: &TestEnv, sr: i64, sps: &[i64]) -> i64 {
    let mut n = 0;
    for t in bulkops_tests::check::CHILD_TABLES {
        n += env
            .count(&format!(
                "SELECT count(*) FROM {t} WHERE owner_type = 'sales_record' AND owner_id = {sr}"
            ))
            .await;
    }
    n += env
        .count(&format!(
            "SELECT count(*) FROM sales_policies WHERE sales_record_id = {sr}"
        ))
        .await;
    n += env
        .count(&format!(
            "SELECT count(*) FROM custom_field_values v JOIN custom_field_definitions d ON d.id = v.definition_id
              WHERE (d.entity = 'sales_record' AND v.record_id = {sr})
                 OR (d.entity = 'sales_policy' AND v.record_id = ANY('{{{}}}'::bigint[]))",
            sps.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
        ))
        .await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_row_written_during_a_conversion_is_moved_or_refused_never_orphaned() {
    let env = crate::env("interleave_orphans").await;
    let w = World::new(&env.db, "Orphan Agency").await;
    let sr_def = fixture::custom_field(&env.db, w.agency, "sales_record", "Pref", "text").await;
    fixture::custom_field(&env.db, w.agency, "individual", "Pref", "text").await;
    let sp_def = fixture::custom_field(&env.db, w.agency, "sales_policy", "Premium", "text").await;
    let lead =
        |n: &str| json!({"agency_id": w.agency, "record_type_id": w.record_type, "first_name": n});
    let late = insert(&env.db, "sales_records", &lead("Late")).await;
    let early = insert(&env.db, "sales_records", &lead("Early")).await;
    let late_sp = insert(
        &env.db,
        "sales_policies",
        &json!({"agency_id": w.agency, "sales_record_id": late, "status": "Quoted"}),
    )
    .await;
    let meta = batch(&env, &w, BatchKind::ConvertSalesRecords, &[late, early]).await;

    // Rows written *after* the conversion did its work, before it commits: the note, SMS,
    // custom field value and sales policy of the Sales Record, and a custom field value of
    // its sales policy. Each writer is its own session.
    let (a, _) = session(&env).await;
    let a_tx = a.begin().await.expect("begin");
    convert_chunk(&a_tx, &meta, &[1]).await;
    let writes: Vec<(&str, String)> = vec![
        (
            "note",
            format!(
                "INSERT INTO notes (agency_id, owner_type, owner_id, subject) VALUES ({}, 'sales_record', {late}, 'late')",
                w.agency
            ),
        ),
        (
            "sms",
            format!(
                "INSERT INTO sms_messages (agency_id, owner_type, owner_id, direction, body) VALUES ({}, 'sales_record', {late}, 'in', 'hi')",
                w.agency
            ),
        ),
        (
            "custom value",
            format!(
                "INSERT INTO custom_field_values (definition_id, record_id, value) VALUES ({sr_def}, {late}, '\"x\"')"
            ),
        ),
        (
            "sales policy",
            format!(
                "INSERT INTO sales_policies (agency_id, sales_record_id, status) VALUES ({}, {late}, 'Conversion')",
                w.agency
            ),
        ),
        (
            "sales policy value",
            format!(
                "INSERT INTO custom_field_values (definition_id, record_id, value) VALUES ({sp_def}, {late_sp}, '\"9\"')"
            ),
        ),
    ];
    let mut writers = Vec::new();
    for (what, sql) in writes {
        let (db, pid) = session(&env).await;
        let task = tokio::spawn(async move { db.execute_unprepared(&sql).await.map(|_| ()) });
        until_blocked_or_done(&env, pid, &task).await;
        writers.push((what, task));
    }
    a_tx.commit().await.expect("commit");
    for (what, task) in writers {
        let result = tokio::time::timeout(STEP, task)
            .await
            .expect("writer finishes")
            .expect("writer");
        let err = result.expect_err(&format!("the {what} written mid-conversion must fail"));
        assert_eq!(
            bulkops_shared::db::sqlstate(&err).as_deref(),
            Some("23503"),
            "{what}: {err}"
        );
    }
    assert_eq!(
        owned_by(&env, late, &[late_sp]).await,
        0,
        "nothing owned by the converted record"
    );

    // Rows written *before* the conversion locks, committed while it waits: moved with it.
    let (d, _) = session(&env).await;
    let d_tx = d.begin().await.expect("begin");
    d_tx.execute_unprepared(&format!(
        "INSERT INTO notes (agency_id, owner_type, owner_id, subject, contains_soa) VALUES ({}, 'sales_record', {early}, 'SOA', true)",
        w.agency
    ))
    .await
    .expect("note");
    d_tx.execute_unprepared(&format!(
        "INSERT INTO custom_field_values (definition_id, record_id, value) VALUES ({sr_def}, {early}, '\"y\"')"
    ))
    .await
    .expect("value");
    let (a, a_pid) = session(&env).await;
    let m = meta.clone();
    let chunk = tokio::spawn(async move {
        let tx = a.begin().await.expect("begin");
        convert_chunk(&tx, &m, &[2]).await;
        tx.commit().await.expect("commit");
    });
    until_blocked_or_done(&env, a_pid, &chunk).await;
    d_tx.commit().await.expect("commit");
    tokio::time::timeout(STEP, chunk)
        .await
        .expect("conversion finishes")
        .expect("conversion");
    assert_eq!(
        owned_by(&env, early, &[]).await,
        0,
        "nothing owned by the converted record"
    );
    let ind = env
        .count(&format!(
            "SELECT result_id FROM bulk_items WHERE batch_id = {} AND seq = 2 AND status = 'converted'",
            meta.id.0
        ))
        .await;
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM notes WHERE owner_type = 'individual' AND owner_id = {ind} AND contains_soa"
        ))
        .await,
        1,
        "the SOA note moved to the Individual"
    );
    assert_eq!(
        fixture::custom_values(&env.db, "individual", ind)
            .await
            .get("Pref"),
        Some(&json!("y")),
        "the custom value moved to the Individual"
    );
    env.finish().await;
}
