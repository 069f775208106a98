//! Batch counters and exactly-once completion.
//!
//! Items move from `pending` to one outcome exactly once (every writer updates only rows
//! still `pending`), and the transaction that records outcomes adds the number it newly
//! recorded to the batch's counts in the same transaction: a worker's chunk to its
//! backend's counter shard ([`add_to_shard`]), the other writers (acceptance, the
//! dead-letter watcher) to the batch row ([`record_outcomes`]). The batch row's counters
//! plus its shards therefore always equal the items' outcomes.
//!
//! The shards are folded into the batch row by short transactions of their own
//! ([`fold`]): a worker folds after a chunk's commit when [`ready_to_complete`] says the
//! batch is done, and otherwise every few hundred milliseconds; producers fold what is left
//! over ([`fold_stale`]). Every fold, and every direct write, empties the shards under the
//! batch row's lock, so exactly one transaction sees the batch's done count reach its
//! total: that one marks the batch completed and writes `bulk_batch.completed` to the
//! outbox. Why shards: a chunk that updated the batch row held its lock until its commit
//! was flushed, so concurrent chunks of a batch committed one after another.
//!
//! A batch with no items at all never records an outcome; the accepting transaction
//! completes it with [`complete_empty`].

use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, TransactionTrait};

use crate::batch::ItemStatus;
use crate::db::stmt;
use crate::ids::BatchId;

/// Outcomes newly recorded for one batch in one transaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutcomeDelta {
    /// Items that became `created`.
    pub created: i64,
    /// Items that became `converted`.
    pub converted: i64,
    /// Items that became `skipped`.
    pub skipped: i64,
    /// Items that became `failed`.
    pub failed: i64,
}

impl OutcomeDelta {
    /// Total items decided.
    pub fn total(&self) -> i64 {
        self.created + self.converted + self.skipped + self.failed
    }

    /// Each outcome with its count (the inverse of [`Self::add`]).
    pub fn by_outcome(&self) -> [(ItemStatus, i64); 4] {
        [
            (ItemStatus::Created, self.created),
            (ItemStatus::Converted, self.converted),
            (ItemStatus::Skipped, self.skipped),
            (ItemStatus::Failed, self.failed),
        ]
    }

    /// `$1` to `$5` of the counter statements: the batch, then created, converted,
    /// skipped and failed.
    fn params(&self, batch_id: BatchId) -> [sea_orm::Value; 5] {
        [
            batch_id.into(),
            self.created.into(),
            self.converted.into(),
            self.skipped.into(),
            self.failed.into(),
        ]
    }

    /// Adds `n` items that got `status` (`pending` is no outcome and adds nothing).
    pub fn add(&mut self, status: ItemStatus, n: i64) {
        match status {
            ItemStatus::Created => self.created += n,
            ItemStatus::Converted => self.converted += n,
            ItemStatus::Skipped => self.skipped += n,
            ItemStatus::Failed => self.failed += n,
            ItemStatus::Pending => {}
        }
    }
}

/// The counters of the contract's `counts` object, as stored.
pub const COUNTS_JSON_SQL: &str = "jsonb_build_object('pending', b.total - (b.n_created + b.n_converted + b.n_skipped + b.n_failed), \
     'created', b.n_created, 'converted', b.n_converted, 'skipped', b.n_skipped, 'failed', b.n_failed)";

/// Adds `delta` and whatever the batch's counter shards hold to the batch's counters (the
/// shards are emptied); when that completes the batch, marks it completed and writes its
/// `bulk_batch.completed` event, in the caller's transaction. Returns whether this call
/// completed the batch.
///
/// The direct writers (acceptance, the dead-letter watcher) call it with their delta; a
/// fold ([`fold`]) calls it with none. The shard rows are deleted first and the batch row
/// updated last, so a chunk transaction upserting its shard waits at most for this
/// statement's commit, and the batch row's lock is held only for the commit.
///
/// # Errors
/// Database errors.
pub async fn record_outcomes(
    tx: &impl ConnectionTrait,
    batch_id: BatchId,
    delta: OutcomeDelta,
) -> Result<bool, DbErr> {
    let sql = format!(
        "WITH s AS (
           DELETE FROM bulk_batch_counts WHERE batch_id = $1
        RETURNING n_created, n_converted, n_skipped, n_failed
         ), d AS (
           SELECT $2::bigint + COALESCE(sum(n_created), 0)::bigint AS created,
                  $3::bigint + COALESCE(sum(n_converted), 0)::bigint AS converted,
                  $4::bigint + COALESCE(sum(n_skipped), 0)::bigint AS skipped,
                  $5::bigint + COALESCE(sum(n_failed), 0)::bigint AS failed
             FROM s
         ), b AS (
           UPDATE bulk_batches bb
              SET n_created = bb.n_created + d.created, n_converted = bb.n_converted + d.converted,
                  n_skipped = bb.n_skipped + d.skipped, n_failed = bb.n_failed + d.failed,
                  state = CASE WHEN {done} >= bb.total THEN 'completed' ELSE bb.state END,
                  progress_at = clock_timestamp(),
                  completed_at = CASE WHEN {done} >= bb.total
                                      THEN COALESCE(bb.completed_at, clock_timestamp()) END
             FROM d
            WHERE bb.id = $1 AND d.created + d.converted + d.skipped + d.failed > 0
        RETURNING bb.*, d.created + d.converted + d.skipped + d.failed AS added
         ), done AS (
           SELECT b.*, (b.n_created + b.n_converted + b.n_skipped + b.n_failed) AS n_done FROM b
         ), ev AS (
           INSERT INTO outbox (routing_key, events, traceparent)
           SELECT 'bulk_batch.completed',
                  jsonb_build_array(jsonb_build_object(
                      'event_id', gen_random_uuid(), {occurred}, 'agency_id', b.agency_id, 'batch_id', b.id,
                      'kind', b.kind, 'total', b.total, 'counts', {COUNTS_JSON_SQL})),
                  COALESCE(NULLIF(current_setting('bulkops.traceparent', true), ''), b.trace_context)
             FROM done b
            WHERE b.n_done >= b.total AND b.n_done - b.added < b.total
        RETURNING 1
         )
         SELECT (SELECT count(*) FROM ev) AS completed",
        done = "bb.n_created + bb.n_converted + bb.n_skipped + bb.n_failed \
                + d.created + d.converted + d.skipped + d.failed",
        occurred = crate::outbox::OCCURRED_AT_SQL
    );
    let row = tx.query_one_raw(stmt(sql, delta.params(batch_id))).await?;
    let completed: i64 = match row {
        Some(r) => r.try_get("", "completed")?,
        None => 0,
    };
    Ok(completed > 0)
}

/// Adds `delta` to this backend's counter shard of the batch (a row keyed by
/// `pg_backend_pid()`), in the caller's transaction: what a worker's chunk transaction
/// does instead of updating the batch row, so that concurrent chunks never wait for each
/// other. A [`fold`] after the commit moves the shards into the batch's counters.
///
/// # Errors
/// Database errors.
pub async fn add_to_shard(
    tx: &impl ConnectionTrait,
    batch_id: BatchId,
    delta: OutcomeDelta,
) -> Result<(), DbErr> {
    if delta.total() == 0 {
        return Ok(());
    }
    tx.execute_raw(stmt(
        "INSERT INTO bulk_batch_counts AS c (batch_id, shard, n_created, n_converted, n_skipped, n_failed)
         VALUES ($1, pg_backend_pid(), $2, $3, $4, $5)
         ON CONFLICT (batch_id, shard) DO UPDATE
            SET n_created = c.n_created + EXCLUDED.n_created,
                n_converted = c.n_converted + EXCLUDED.n_converted,
                n_skipped = c.n_skipped + EXCLUDED.n_skipped,
                n_failed = c.n_failed + EXCLUDED.n_failed,
                updated_at = clock_timestamp()",
        delta.params(batch_id),
    ))
    .await?;
    Ok(())
}

/// Whether the batch has every item decided, shards included, and is not yet marked
/// completed: read after a chunk's commit, it tells the worker to [`fold`] now. Of the
/// chunks that decide a batch's last items, the one that commits last reads every other's
/// shard, so at least one of them sees it; a worker that dies between its commit and its
/// fold leaves the shard to [`fold_stale`].
///
/// # Errors
/// Database errors.
pub async fn ready_to_complete(
    db: &impl ConnectionTrait,
    batch_id: BatchId,
) -> Result<bool, DbErr> {
    let row = db
        .query_one_raw(stmt(
            format!(
                "SELECT b.completed_at IS NULL AND {} >= b.total AS ready
                   FROM bulk_batches b WHERE b.id = $1",
                decided_sql("b")
            ),
            [batch_id.into()],
        ))
        .await?;
    match row {
        Some(r) => r.try_get("", "ready"),
        None => Ok(false),
    }
}

/// SQL for how many items of the `bulk_batches` row aliased `b` have an outcome, its
/// counter shards included: exact while the batch runs, where the row's own counters lag
/// by what the workers have not folded yet. For whoever must not wait for a fold: the
/// completion check, and the split's in-flight window (which, reading the row alone,
/// counted up to a fold interval of finished work as still queued and stalled below its
/// window).
pub fn decided_sql(b: &str) -> String {
    format!(
        "({b}.n_created + {b}.n_converted + {b}.n_skipped + {b}.n_failed
          + COALESCE((SELECT sum(c.n_created + c.n_converted + c.n_skipped + c.n_failed)
                        FROM bulk_batch_counts c WHERE c.batch_id = {b}.id), 0))::bigint"
    )
}

/// Folds the batch's counter shards into its counters in a transaction of its own,
/// completing the batch when that decides its last items. Returns whether this call
/// completed it. The completion event carries `traceparent` (a worker passes the context
/// of the chunk transaction that committed before it); without one, the batch's own.
///
/// # Errors
/// Database errors (the shards stay for the next fold).
pub async fn fold(
    db: &DatabaseConnection,
    batch_id: BatchId,
    traceparent: Option<&str>,
) -> Result<bool, DbErr> {
    let tx = db.begin().await?;
    if let Some(tp) = traceparent {
        tx.execute_raw(stmt(
            "SELECT set_config('bulkops.traceparent', $1, true)",
            [tp.into()],
        ))
        .await?;
    }
    let completed = record_outcomes(&tx, batch_id, OutcomeDelta::default()).await?;
    tx.commit().await?;
    Ok(completed)
}

/// How old a counter shard gets before the producers fold it ([`fold_stale`]): well past a
/// worker's own fold interval, so that they only pick up what a worker left behind.
pub const STALE_SHARD_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Folds the shards nobody folded within `older_than` (a worker that died between a
/// chunk's commit and its fold, or that stopped receiving the batch's messages): the
/// producers' sweep. Returns the batches it completed.
///
/// # Errors
/// Database errors.
pub async fn fold_stale(
    db: &DatabaseConnection,
    older_than: std::time::Duration,
) -> Result<Vec<BatchId>, DbErr> {
    let rows = db
        .query_all_raw(stmt(
            "SELECT DISTINCT batch_id FROM bulk_batch_counts
              WHERE updated_at < clock_timestamp() - make_interval(secs => $1)
              ORDER BY batch_id LIMIT 100",
            [older_than.as_secs_f64().into()],
        ))
        .await?;
    let mut completed = Vec::new();
    for r in &rows {
        let batch = BatchId(r.try_get("", "batch_id")?);
        if fold(db, batch, None).await? {
            completed.push(batch);
        }
    }
    Ok(completed)
}

/// Completes a batch that was accepted with no items at all (a search that found nobody):
/// marks it completed with `completed_at` and writes its `bulk_batch.completed` event
/// (total 0, every count 0), in the caller's transaction. [`record_outcomes`] cannot do it,
/// as no outcome is ever recorded for such a batch. Returns whether this call completed it
/// (false when the batch has items or is already completed).
///
/// # Errors
/// Database errors.
pub async fn complete_empty(tx: &impl ConnectionTrait, batch_id: BatchId) -> Result<bool, DbErr> {
    let sql = format!(
        "WITH b AS (
           UPDATE bulk_batches
              SET state = 'completed', completed_at = clock_timestamp(), progress_at = clock_timestamp()
            WHERE id = $1 AND total = 0 AND completed_at IS NULL
        RETURNING *
         ), ev AS (
           INSERT INTO outbox (routing_key, events)
           SELECT 'bulk_batch.completed',
                  jsonb_build_array(jsonb_build_object(
                      'event_id', gen_random_uuid(), {occurred}, 'agency_id', b.agency_id, 'batch_id', b.id,
                      'kind', b.kind, 'total', b.total, 'counts', {COUNTS_JSON_SQL}))
             FROM b
        RETURNING 1
         )
         SELECT (SELECT count(*) FROM ev) AS completed",
        occurred = crate::outbox::OCCURRED_AT_SQL
    );
    let row = tx.query_one_raw(stmt(sql, [batch_id.into()])).await?;
    let completed: i64 = match row {
        Some(r) => r.try_get("", "completed")?,
        None => 0,
    };
    Ok(completed > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_adds_by_status() {
        let mut d = OutcomeDelta::default();
        d.add(ItemStatus::Created, 3);
        d.add(ItemStatus::Skipped, 1);
        d.add(ItemStatus::Failed, 2);
        d.add(ItemStatus::Converted, 4);
        d.add(ItemStatus::Pending, 9);
        assert_eq!(
            d,
            OutcomeDelta {
                created: 3,
                converted: 4,
                skipped: 1,
                failed: 2
            }
        );
        assert_eq!(d.total(), 10);
    }
}
