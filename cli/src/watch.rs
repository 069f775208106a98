//! Looking at batches from the command line: list, show, watch (a live progress bar with
//! rate and ETA over a sliding window), items.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Context;
use bulkops_shared::batch::{BatchState, ItemStatus};
use bulkops_shared::db::stmt;
use indicatif::{ProgressBar, ProgressStyle};
use sea_orm::{ConnectionTrait, DatabaseConnection, Value};

use bulkops_shared::batch_view::{
    BATCH_COLUMNS as COLUMNS, BatchView, ITEM_COLUMNS, ITEM_CSV_HEADER, batch_from_row,
    item_from_row,
};
use bulkops_shared::csv_safe;

use crate::out;

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

/// Rate and ETA over a sliding window of progress samples, so that the first tick (which
/// may find thousands of items already decided a millisecond after the watch began) and a
/// stall both show what is happening now rather than an average since the start.
#[derive(Debug, Clone)]
pub struct RateWindow {
    window: Duration,
    min_span: Duration,
    samples: std::collections::VecDeque<(Duration, u64)>,
}

impl RateWindow {
    /// A window of `window`; no rate is given until the samples span at least `min_span`.
    pub fn new(window: Duration, min_span: Duration) -> Self {
        Self {
            window,
            min_span,
            samples: std::collections::VecDeque::new(),
        }
    }

    /// Records `done` items decided at `at` (time since the watch began, non-decreasing).
    pub fn record(&mut self, at: Duration, done: u64) {
        self.samples.push_back((at, done));
        // Keep the newest sample older than the window as the base, so the rate always
        // covers about `window`.
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| at.saturating_sub(*t) >= self.window)
        {
            self.samples.pop_front();
        }
    }

    /// Items per second over the window, or `None` until it spans `min_span`.
    pub fn rate(&self) -> Option<f64> {
        let (t0, d0) = *self.samples.front()?;
        let (t1, d1) = *self.samples.back()?;
        let span = t1.saturating_sub(t0);
        if span < self.min_span || span.is_zero() {
            return None;
        }
        Some(d1.saturating_sub(d0) as f64 / span.as_secs_f64())
    }

    /// Time until `remaining` more items are decided at the window's rate; `None` while the
    /// rate is unknown or zero.
    pub fn eta(&self, remaining: u64) -> Option<Duration> {
        let rate = self.rate()?;
        if remaining == 0 {
            return Some(Duration::ZERO);
        }
        if rate <= 0.0 {
            return None;
        }
        Duration::try_from_secs_f64(remaining as f64 / rate).ok()
    }

    /// `"1234/s ETA 56s"`, or `"…/s ETA ?"` while unknown.
    pub fn describe(&self, remaining: u64) -> String {
        let rate = self
            .rate()
            .map_or_else(|| "…".to_owned(), |r| format!("{r:.0}"));
        let eta = self
            .eta(remaining)
            .map_or_else(|| "?".to_owned(), |d| format!("{}s", d.as_secs()));
        format!("{rate}/s ETA {eta}")
    }
}

/// The progress line's window: long enough to smooth chunk-sized steps, short enough to
/// follow a change of pace.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// No rate is shown from samples closer together than this.
const RATE_MIN_SPAN: Duration = Duration::from_secs(1);

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
                "{spinner} batch {prefix} [{elapsed_precise}] [{wide_bar}] {pos}/{len} {msg}",
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
    let mut window = RateWindow::new(RATE_WINDOW, RATE_MIN_SPAN);
    let mut last_line = Instant::now()
        .checked_sub(Duration::from_secs(10))
        .unwrap_or_else(Instant::now);
    loop {
        let b = load(db, id).await?;
        let done = u64::try_from(b.total - b.counts.pending).unwrap_or(0);
        window.record(started.elapsed(), done);
        let remaining = total.saturating_sub(done);
        if let Some(bar) = &bar {
            bar.set_position(done);
            bar.set_message(window.describe(remaining));
        } else if last_line.elapsed() >= Duration::from_secs(2) || b.state == BatchState::Completed
        {
            out(&format!(
                "batch {id}: {done}/{total} ({:.0}%) {}",
                if total == 0 {
                    100.0
                } else {
                    done as f64 * 100.0 / total as f64
                },
                window.describe(remaining)
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
    if let Some(at) = load(db, id).await?.items_pruned_at {
        anyhow::bail!(
            "the items of batch {id} were pruned on {} under the retention policy (retention.items_days); `bulkops batch show {id}` still has its counts",
            at.format("%Y-%m-%d")
        );
    }
    let mut params: Vec<Value> = vec![id.into()];
    let mut sql = format!("SELECT {ITEM_COLUMNS} FROM bulk_items WHERE batch_id = $1");
    if let Some(s) = status {
        let s = ItemStatus::parse(&s).with_context(|| format!("unknown status {s}"))?;
        params.push(s.as_str().into());
        sql.push_str(" AND status = $2");
    }
    sql.push_str(" ORDER BY seq");
    if csv {
        let header = csv_safe::line(&ITEM_CSV_HEADER);
        out(String::from_utf8_lossy(&header).trim_end());
    }
    for r in db.query_all_raw(stmt(sql, params)).await? {
        let item = item_from_row(&r)?;
        if csv {
            out(String::from_utf8_lossy(&item.csv_line()).trim_end());
        } else {
            out(&item.csv_fields().join("\t"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn the_first_tick_has_no_rate_however_much_is_done() {
        let mut w = RateWindow::new(RATE_WINDOW, RATE_MIN_SPAN);
        // 504 items already decided when the watch began, seen a millisecond later.
        w.record(secs(0.001), 504);
        assert_eq!(w.rate(), None);
        assert_eq!(w.describe(1000), "…/s ETA ?");
        w.record(secs(0.25), 510);
        assert_eq!(w.rate(), None, "a quarter second is too short to tell");
        w.record(secs(1.001), 604);
        assert_eq!(w.rate(), Some(100.0));
        assert_eq!(w.eta(400), Some(Duration::from_secs(4)));
    }

    #[test]
    fn the_rate_follows_the_last_window_not_the_average() {
        let mut w = RateWindow::new(Duration::from_secs(10), RATE_MIN_SPAN);
        // 1,000/s for 30 s, then 100/s for 20 s.
        let mut done = 0;
        for t in 0..=30 {
            w.record(secs(f64::from(t)), done);
            done += 1000;
        }
        done -= 1000;
        for t in 31..=50 {
            done += 100;
            w.record(secs(f64::from(t)), done);
        }
        let rate = w.rate().unwrap();
        assert!((rate - 100.0).abs() < 1e-9, "{rate}");
        assert_eq!(w.eta(1000), Some(Duration::from_secs(10)));
        assert!(w.samples.len() <= 12, "old samples are dropped");
    }

    #[test]
    fn a_stall_shows_zero_and_no_eta() {
        let mut w = RateWindow::new(Duration::from_secs(10), RATE_MIN_SPAN);
        for t in 0..20 {
            w.record(secs(f64::from(t)), 5000);
        }
        assert_eq!(w.rate(), Some(0.0));
        assert_eq!(w.eta(10), None);
        assert_eq!(w.eta(0), Some(Duration::ZERO));
        assert_eq!(w.describe(10), "0/s ETA ?");
    }
}
