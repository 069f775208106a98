//! Batch counters and exactly-once completion.
//!
//! Items move from `pending` to one outcome exactly once (every writer updates only rows
//! still `pending`), and the transaction that records outcomes adds the number it newly
//! recorded to the batch's counters in the same transaction. The counters therefore always
//! equal the items' outcomes, and exactly one transaction sees the batch's done count reach
//! its total: that one marks the batch completed and writes `bulk_batch.completed` to the
//! outbox. The batch row is updated last in each transaction, so its row lock is held only
//! for the commit. A batch with no items at all never records an outcome; the accepting
//! transaction completes it with [`complete_empty`].

use sea_orm::{ConnectionTrait, DbErr};

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

/// Adds `delta` to the batch's counters; when that completes the batch, marks it completed
/// and writes its `bulk_batch.completed` event, in the caller's transaction. Returns
/// whether this call completed the batch.
///
/// # Errors
/// Database errors.
pub async fn record_outcomes(
    tx: &impl ConnectionTrait,
    batch_id: BatchId,
    delta: OutcomeDelta,
) -> Result<bool, DbErr> {
    if delta.total() == 0 {
        return Ok(false);
    }
    let sql = format!(
        "WITH b AS (
           UPDATE bulk_batches
              SET n_created = n_created + $2, n_converted = n_converted + $3,
                  n_skipped = n_skipped + $4, n_failed = n_failed + $5,
                  state = CASE WHEN n_created + n_converted + n_skipped + n_failed + $6 >= total
                               THEN 'completed' ELSE state END,
                  progress_at = clock_timestamp(),
                  completed_at = CASE WHEN n_created + n_converted + n_skipped + n_failed + $6 >= total
                                      THEN COALESCE(completed_at, clock_timestamp()) END
            WHERE id = $1
        RETURNING *
         ), done AS (
           SELECT b.*, (b.n_created + b.n_converted + b.n_skipped + b.n_failed) AS n_done FROM b
         ), ev AS (
           INSERT INTO outbox (routing_key, events)
           SELECT 'bulk_batch.completed',
                  jsonb_build_array(jsonb_build_object(
                      'event_id', gen_random_uuid(), {occurred}, 'agency_id', b.agency_id, 'batch_id', b.id,
                      'kind', b.kind, 'total', b.total, 'counts', {COUNTS_JSON_SQL}))
             FROM done b
            WHERE b.n_done >= b.total AND b.n_done - $6 < b.total
        RETURNING 1
         )
         SELECT (SELECT count(*) FROM ev) AS completed",
        occurred = crate::outbox::OCCURRED_AT_SQL
    );
    let row = tx
        .query_one_raw(stmt(
            sql,
            [
                batch_id.into(),
                delta.created.into(),
                delta.converted.into(),
                delta.skipped.into(),
                delta.failed.into(),
                delta.total().into(),
            ],
        ))
        .await?;
    let completed: i64 = match row {
        Some(r) => r.try_get("", "completed")?,
        None => 0,
    };
    Ok(completed > 0)
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
