//! Looking at batches from the command line: list, show, watch (a live progress bar with
//! rate and ETA), items.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Context;
use bulkops_shared::batch::{BatchState, ItemStatus};
use bulkops_shared::db::stmt;
use indicatif::{ProgressBar, ProgressStyle};
use sea_orm::{ConnectionTrait, DatabaseConnection, Value};

use super::out;
use crate::routes::batches::{BATCH_COLUMNS as COLUMNS, BatchView, batch_from_row};
use crate::routes::search::csv_line;

async fn load(db: &DatabaseConnection, id: i64) -> anyhow::Result<BatchView> {
    let row = db
        .query_one_raw(stmt(
            format!("SELECT {COLUMNS} FROM bulk_batches WHERE id = $1"),
            [id.into()],
        ))
        .await?
        .with_context(|| format!("no batch {id}"))?;
    Ok(batch_from_row(&row)?)
}

fn summary(b: &BatchView) -> String {
    let c = &b.counts;
    format!(
        "batch {} {} {}: total {} | pending {} created {} converted {} skipped {} failed {}",
        b.id,
        b.kind.as_str(),
        b.state.as_str(),
        b.total,
        c.pending,
        c.created,
        c.converted,
        c.skipped,
        c.failed
    )
}

/// `bulkops batch list`.
///
/// # Errors
/// Database errors.
pub async fn list(db: &DatabaseConnection, agency: Option<i64>, limit: i64) -> anyhow::Result<()> {
    let mut params: Vec<Value> = vec![limit.into()];
    let mut sql = format!("SELECT {COLUMNS} FROM bulk_batches");
    if let Some(a) = agency {
        params.push(a.into());
        sql.push_str(" WHERE agency_id = $2");
    }
    sql.push_str(" ORDER BY id DESC LIMIT $1");
    for row in db.query_all_raw(stmt(sql, params)).await? {
        out(&summary(&batch_from_row(&row)?));
    }
    Ok(())
}

/// `bulkops batch show`.
///
/// # Errors
/// Database errors, or no such batch.
pub async fn show(db: &DatabaseConnection, id: i64) -> anyhow::Result<()> {
    let b = load(db, id).await?;
    out(&serde_json::to_string_pretty(&b)?);
    Ok(())
}

/// `bulkops batch watch`: follows the batch until it completes.
///
/// # Errors
/// Database errors, or no such batch.
pub async fn watch(db: &DatabaseConnection, id: i64) -> anyhow::Result<()> {
    let first = load(db, id).await?;
    let total = u64::try_from(first.total).unwrap_or(0);
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} batch {prefix} [{elapsed_precise}] [{wide_bar}] {pos}/{len} {per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(id.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Some(bar)
    } else {
        None
    };
    let started = Instant::now();
    let mut last_line = Instant::now()
        .checked_sub(Duration::from_secs(10))
        .unwrap_or_else(Instant::now);
    loop {
        let b = load(db, id).await?;
        let done = u64::try_from(b.total - b.counts.pending).unwrap_or(0);
        if let Some(bar) = &bar {
            bar.set_position(done);
        } else if last_line.elapsed() >= Duration::from_secs(2) || b.state == BatchState::Completed
        {
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let rate = done as f64 / secs;
            let eta = if rate > 0.0 {
                format!("{:.0}s", (total.saturating_sub(done)) as f64 / rate)
            } else {
                "?".into()
            };
            out(&format!(
                "batch {id}: {done}/{total} ({:.0}%) {rate:.0}/s ETA {eta}",
                if total == 0 {
                    100.0
                } else {
                    done as f64 * 100.0 / total as f64
                }
            ));
            last_line = Instant::now();
        }
        if b.state == BatchState::Completed {
            if let Some(bar) = &bar {
                bar.finish();
            }
            let secs = match b.completed_at {
                Some(done_at) => (done_at - b.created_at).num_milliseconds() as f64 / 1000.0,
                None => started.elapsed().as_secs_f64(),
            };
            out(&summary(&b));
            out(&format!(
                "completed in {secs:.2}s from acceptance ({:.0} items/s)",
                b.total as f64 / secs.max(0.001)
            ));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `bulkops batch items`.
///
/// # Errors
/// Database errors, or an unknown status.
pub async fn items(
    db: &DatabaseConnection,
    id: i64,
    status: Option<String>,
    csv: bool,
) -> anyhow::Result<()> {
    load(db, id).await?;
    let mut params: Vec<Value> = vec![id.into()];
    let mut sql =
        "SELECT seq, target_id, status, result_id, reason FROM bulk_items WHERE batch_id = $1"
            .to_owned();
    if let Some(s) = status {
        let s = ItemStatus::parse(&s).with_context(|| format!("unknown status {s}"))?;
        params.push(s.as_str().into());
        sql.push_str(" AND status = $2");
    }
    sql.push_str(" ORDER BY seq");
    if csv {
        let header = csv_line(&["seq", "target_id", "status", "result_id", "reason"]);
        out(String::from_utf8_lossy(&header).trim_end());
    }
    for r in db.query_all_raw(stmt(sql, params)).await? {
        let seq: i64 = r.try_get("", "seq")?;
        let target: i64 = r.try_get("", "target_id")?;
        let status: String = r.try_get("", "status")?;
        let result: Option<i64> = r.try_get("", "result_id")?;
        let reason: Option<String> = r.try_get("", "reason")?;
        let result = result.map(|v| v.to_string()).unwrap_or_default();
        let reason = reason.unwrap_or_default();
        if csv {
            let line = csv_line(&[
                &seq.to_string(),
                &target.to_string(),
                &status,
                &result,
                &reason,
            ]);
            out(String::from_utf8_lossy(&line).trim_end());
        } else {
            out(&format!("{seq}\t{target}\t{status}\t{result}\t{reason}"));
        }
    }
    Ok(())
}
