//! The throughput history behind the overview's chart, shared by every producer.
//!
//! Every [`PERIOD`] each producer with the console enabled tries to take a sample; the
//! first to lock the one-row `throughput_cursor` within the period takes it, the others
//! find it fresh and leave. A sample is the number of items the workers gave an outcome
//! since the previous one: the sum, over the batches the cursor watched (active then) and
//! those accepted since, of how far their counters moved (items settled at acceptance are
//! left out: they had no worker). It reads `bulk_batches` by the active-batch index and by
//! primary key, never `bulk_items`, so it costs the same whatever the batches' sizes.
//! Samples older than [`KEEP`] are deleted as new ones come.

use std::collections::HashMap;
use std::time::Duration;

use bulkops_shared::db::stmt;
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, TransactionTrait};
use tokio_util::sync::CancellationToken;

use super::views::Bar;

/// How often a sample is taken.
pub const PERIOD: Duration = Duration::from_secs(10);
/// How long samples are kept.
pub const KEEP: Duration = Duration::from_secs(3600);
/// After a longer gap (no producer sampled), the next sample only restarts the history:
/// an hour's work spread over one bar would say nothing.
const LONGEST_INTERVAL: Duration = Duration::from_secs(60);

/// `done` of a batch as the sampler counts it: outcomes decided by workers.
const WORKER_DONE_SQL: &str =
    "GREATEST(n_created + n_converted + n_skipped + n_failed - n_presettled, 0)";

/// Takes samples until `shutdown`.
pub async fn run(db: DatabaseConnection, shutdown: CancellationToken) {
    loop {
        if let Err(e) = sample(&db).await {
            tracing::debug!(error = %e, "throughput sample not taken");
        }
        if !bulkops_shared::shutdown::sleep(&shutdown, PERIOD).await {
            return;
        }
    }
}

/// Items decided since the previous sample: each batch's count now minus its count then
/// (0 for a batch accepted since; a batch missing from `before` but not new was completed
/// then and is reopened now, and counts from where it is).
pub fn items_since(before: &HashMap<i64, i64>, before_max_id: i64, now: &[(i64, i64)]) -> i64 {
    now.iter()
        .map(|(id, done)| {
            let base = match before.get(id) {
                Some(b) => *b,
                None if *id > before_max_id => 0,
                None => *done,
            };
            (done - base).max(0)
        })
        .sum()
}

/// Takes one sample unless another producer took one within the period. Returns whether
/// this call wrote one.
///
/// # Errors
/// Database errors.
pub async fn sample(db: &DatabaseConnection) -> Result<bool, DbErr> {
    // The first sample ever starts from the batches as they are.
    db.execute_raw(stmt(
        format!(
            "INSERT INTO throughput_cursor (id, at, max_batch_id, done)
             SELECT true, clock_timestamp(), COALESCE((SELECT max(id) FROM bulk_batches), 0),
                    COALESCE((SELECT jsonb_object_agg(id::text, {WORKER_DONE_SQL})
                                FROM bulk_batches WHERE completed_at IS NULL), '{{}}'::jsonb)
              WHERE NOT EXISTS (SELECT 1 FROM throughput_cursor)
             ON CONFLICT (id) DO NOTHING"
        ),
        [],
    ))
    .await?;
    let tx = db.begin().await?;
    let cursor = tx
        .query_one_raw(stmt(
            "SELECT at, max_batch_id, done, clock_timestamp() AS now
               FROM throughput_cursor WHERE id FOR UPDATE",
            [],
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("throughput_cursor".into()))?;
    let at: DateTime<Utc> = cursor.try_get("", "at")?;
    let now: DateTime<Utc> = cursor.try_get("", "now")?;
    let max_id: i64 = cursor.try_get("", "max_batch_id")?;
    let done: serde_json::Value = cursor.try_get("", "done")?;
    let elapsed = (now - at).to_std().unwrap_or_default();
    // Another producer sampled within this period (allowing for the timers' drift).
    if elapsed < PERIOD.mul_f64(0.8) {
        tx.rollback().await?;
        return Ok(false);
    }
    let before: HashMap<i64, i64> = done
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_i64()?)))
                .collect()
        })
        .unwrap_or_default();
    let rows = tx
        .query_all_raw(stmt(
            format!(
                "SELECT id, {WORKER_DONE_SQL} AS done, completed_at IS NULL AS active FROM bulk_batches
                  WHERE completed_at IS NULL
                 UNION
                 SELECT id, {WORKER_DONE_SQL}, completed_at IS NULL FROM bulk_batches WHERE id > $1
                 UNION
                 SELECT id, {WORKER_DONE_SQL}, completed_at IS NULL FROM bulk_batches
                  WHERE id IN (SELECT jsonb_object_keys($2::jsonb)::bigint)"
            ),
            [max_id.into(), done.clone().into()],
        ))
        .await?;
    let mut seen: Vec<(i64, i64)> = Vec::with_capacity(rows.len());
    let mut watch = serde_json::Map::new();
    let mut new_max = max_id;
    for r in &rows {
        let id: i64 = r.try_get("", "id")?;
        let d: i64 = r.try_get("", "done")?;
        let active: bool = r.try_get("", "active")?;
        seen.push((id, d));
        new_max = new_max.max(id);
        if active {
            watch.insert(id.to_string(), d.into());
        }
    }
    let wrote = elapsed <= LONGEST_INTERVAL;
    if wrote {
        tx.execute_raw(stmt(
            "INSERT INTO throughput_samples (at, seconds, items) VALUES ($1, $2, $3)
             ON CONFLICT (at) DO NOTHING",
            [
                now.into(),
                elapsed.as_secs_f64().max(0.001).into(),
                items_since(&before, max_id, &seen).into(),
            ],
        ))
        .await?;
    }
    tx.execute_raw(stmt(
        "UPDATE throughput_cursor SET at = $1, max_batch_id = $2, done = $3 WHERE id",
        [
            now.into(),
            new_max.into(),
            serde_json::Value::Object(watch).into(),
        ],
    ))
    .await?;
    tx.execute_raw(stmt(
        "DELETE FROM throughput_samples WHERE at < $1",
        [(now - chrono::Duration::from_std(KEEP).unwrap_or_default()).into()],
    ))
    .await?;
    tx.commit().await?;
    Ok(wrote)
}

/// The samples of the last `window` before the database's now, oldest first.
///
/// # Errors
/// Database errors.
pub async fn recent(
    db: &DatabaseConnection,
    window: Duration,
) -> Result<(DateTime<Utc>, Vec<Bar>), DbErr> {
    let rows = db
        .query_all_raw(stmt(
            "SELECT at, seconds, items, now() AS now FROM throughput_samples
              WHERE at > now() - $1 * interval '1 second' ORDER BY at",
            [window.as_secs_f64().into()],
        ))
        .await?;
    let mut now = Utc::now();
    let mut bars = Vec::with_capacity(rows.len());
    for r in &rows {
        now = r.try_get("", "now")?;
        bars.push(Bar {
            at: r.try_get("", "at")?,
            seconds: r.try_get("", "seconds")?,
            items: r.try_get("", "items")?,
        });
    }
    Ok((now, bars))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_count_movement_since_the_last() {
        let before: HashMap<i64, i64> = [(1, 100), (2, 40)].into();
        // 1 moved by 50 (and completed), 2 by 0, 5 is new with 30 done, 4 was completed
        // before and is reopened (counts from where it is).
        let now = [(1, 150), (2, 40), (5, 30), (4, 7)];
        assert_eq!(items_since(&before, 4, &now), 80);
        // A replay takes a failure off a counter: never a negative sample.
        assert_eq!(items_since(&before, 2, &[(1, 99)]), 0);
    }
}
