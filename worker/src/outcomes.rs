//! Recording item outcomes: one `UPDATE … FROM unnest(…)` for a whole chunk, touching only
//! items still `pending`, returning what it actually changed (for the batch counters).

use bulkops_shared::batch::ItemStatus;
use bulkops_shared::db::stmt;
use bulkops_shared::ids::BatchId;
use bulkops_shared::progress::OutcomeDelta;
use sea_orm::{ConnectionTrait, DbErr};

/// One item's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The item.
    pub seq: i64,
    /// Its target as the message named it; the item is left alone if the batch froze
    /// another one (a message that does not match its batch cannot decide an item).
    pub target: i64,
    /// `created`, `converted`, `skipped` or `failed` (never `pending`).
    pub status: ItemStatus,
    /// The record created or converted into (or the existing one, for a skip).
    pub result_id: Option<i64>,
    /// Why it was skipped or failed.
    pub reason: Option<&'static str>,
}

const WRITE_SQL: &str = "WITH upd AS (
       UPDATE bulk_items it
          SET status = d.status, result_id = NULLIF(d.result_id, 0), reason = NULLIF(d.reason, ''),
              attempts = it.attempts + 1, updated_at = clock_timestamp()
         FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::text[], $6::bigint[])
              AS d(seq, status, result_id, reason, target)
        WHERE it.batch_id = $1 AND it.seq = d.seq AND it.target_id = d.target AND it.status = 'pending'
       RETURNING it.status
     )
     SELECT status, count(*) AS n FROM upd GROUP BY status";

/// Records `outcomes` for items of `batch` still pending; returns what changed.
///
/// # Errors
/// Database errors.
pub async fn write(
    tx: &impl ConnectionTrait,
    batch: BatchId,
    outcomes: &[Outcome],
) -> Result<OutcomeDelta, DbErr> {
    let mut delta = OutcomeDelta::default();
    if outcomes.is_empty() {
        return Ok(delta);
    }
    // 0 and '' stand for NULL (ids are positive, reasons non-empty): arrays of options do
    // not bind.
    let seqs: Vec<i64> = outcomes.iter().map(|o| o.seq).collect();
    let statuses: Vec<String> = outcomes
        .iter()
        .map(|o| o.status.as_str().to_owned())
        .collect();
    let results: Vec<i64> = outcomes.iter().map(|o| o.result_id.unwrap_or(0)).collect();
    let reasons: Vec<String> = outcomes
        .iter()
        .map(|o| o.reason.unwrap_or("").to_owned())
        .collect();
    let targets: Vec<i64> = outcomes.iter().map(|o| o.target).collect();
    let rows = tx
        .query_all_raw(stmt(
            WRITE_SQL,
            [
                batch.into(),
                seqs.into(),
                statuses.into(),
                results.into(),
                reasons.into(),
                targets.into(),
            ],
        ))
        .await?;
    for r in &rows {
        let status: String = r.try_get("", "status")?;
        delta.add(ItemStatus::from_column(&status)?, r.try_get("", "n")?);
    }
    Ok(delta)
}
