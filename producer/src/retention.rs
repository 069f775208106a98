//! The retention pruner: deletes what bulkops no longer needs to keep, in small batches,
//! in one process at a time.
//!
//! What goes, after the number of days `retention.*` names (0 keeps it for ever):
//! - **a completed batch's items** (`items_days`). The batch row stays for ever with its
//!   counts, requester, filter and timestamps; `items_pruned_at` says when its items went,
//!   and the API answers 410 for them from then on. A batch is first marked, and its items
//!   are deleted one pass later, so that an `items.csv` download started just before the
//!   mark is not cut short;
//! - **idempotency keys** (`idempotency_keys_days`): a replay after that is a new request;
//! - **conversion log rows** (`conversion_log_days`): converting such a Sales Record id
//!   again answers `not_found` rather than `already_converted`;
//! - **outbox rows that could not be relayed** (`outbox_days`): events the relay never
//!   managed to publish; each is logged (ids only) and counted, because dropping one breaks
//!   "an event for every change". Alerts on `bulkops_outbox_oldest_age_seconds` fire long
//!   before.
//!
//! **One at a time.** Every producer runs the loop; only the holder of the `retention`
//! lease (`bulkops_leases`) prunes, renewing the lease as it goes; another producer takes
//! over when the holder dies and its lease expires.
//!
//! **Never a stall.** Every delete removes at most `retention.delete_chunk` rows by index
//! (a range of one batch's primary key, or the oldest rows by a timestamp index) in its own
//! short transaction, with `retention.pause_ms` between deletes, so its locks and WAL come
//! in small pieces that workers and the API do not notice. `bulk_items` is not partitioned:
//! see docs/PERFORMANCE.md ("Retention") for the measurement behind that choice.

use std::time::Duration;

use bulkops_shared::config::RetentionSettings;
use bulkops_shared::db::stmt;
use bulkops_shared::metrics::ProducerMetrics;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};
use tokio_util::sync::CancellationToken;

/// The lease's name in `bulkops_leases`.
const LEASE: &str = "retention";
/// How long the lease lasts without renewal.
const LEASE_SECS: f64 = 60.0;
/// Renew the lease at least this often while pruning.
const RENEW_EVERY: Duration = Duration::from_secs(15);
/// Batches marked per pass at most (the rest wait for the next pass).
const MARK_PER_PASS: i64 = 1000;

/// The tables pruned, as the metric's `table` label names them.
pub mod table {
    /// Items of completed batches.
    pub const ITEMS: &str = "bulk_items";
    /// Idempotency keys.
    pub const IDEMPOTENCY_KEYS: &str = "idempotency_keys";
    /// The conversion log.
    pub const CONVERSION_LOG: &str = "conversion_log";
    /// Outbox rows never relayed.
    pub const OUTBOX: &str = "outbox";
}

/// What one pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    /// Batches whose items were marked pruned.
    pub batches_marked: u64,
    /// Item rows deleted.
    pub items: u64,
    /// Idempotency keys deleted.
    pub idempotency_keys: u64,
    /// Conversion log rows deleted.
    pub conversion_log: u64,
    /// Outbox rows dropped.
    pub outbox: u64,
}

/// The pruner of one process.
pub struct Pruner {
    db: DatabaseConnection,
    cfg: RetentionSettings,
    owner: uuid::Uuid,
    metrics: ProducerMetrics,
    last_renew: std::sync::Mutex<std::time::Instant>,
}

impl Pruner {
    /// A pruner identified by `owner` (unique per process).
    pub fn new(
        db: DatabaseConnection,
        cfg: RetentionSettings,
        owner: uuid::Uuid,
        metrics: ProducerMetrics,
    ) -> Self {
        Self {
            db,
            cfg,
            owner,
            metrics,
            last_renew: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    /// Prunes every `retention.interval_secs` while it holds the lease, until `shutdown`;
    /// hands the lease back on the way out.
    pub async fn run(self, shutdown: CancellationToken) {
        let interval = Duration::from_secs(self.cfg.interval_secs);
        loop {
            match self.take_lease().await {
                Ok(true) => match self.pass(&shutdown).await {
                    Ok(report) => {
                        if report != PassReport::default() {
                            tracing::info!(
                                batches_marked = report.batches_marked,
                                items = report.items,
                                idempotency_keys = report.idempotency_keys,
                                conversion_log = report.conversion_log,
                                outbox = report.outbox,
                                "retention pass pruned rows"
                            );
                        }
                    }
                    Err(_) if shutdown.is_cancelled() => break,
                    Err(e) => {
                        self.metrics.retention_errors.inc();
                        tracing::warn!(error = %e, "retention pass failed; retrying next pass");
                    }
                },
                Ok(false) => {}
                Err(e) => {
                    self.metrics.retention_errors.inc();
                    tracing::debug!(error = %e, "retention lease not checked");
                }
            }
            if !bulkops_shared::shutdown::sleep(&shutdown, interval).await {
                break;
            }
        }
        let _ = self
            .db
            .execute_raw(stmt(
                "DELETE FROM bulkops_leases WHERE name = $1 AND owner = $2",
                [LEASE.into(), self.owner.into()],
            ))
            .await;
    }

    /// Takes (or renews) the lease; whether this process holds it now.
    async fn take_lease(&self) -> Result<bool, DbErr> {
        let row = self
            .db
            .query_one_raw(stmt(
                "INSERT INTO bulkops_leases (name, owner, until)
                 VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
                 ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, until = EXCLUDED.until
                  WHERE bulkops_leases.owner = EXCLUDED.owner OR bulkops_leases.until < clock_timestamp()
                 RETURNING 1 AS held",
                [LEASE.into(), self.owner.into(), LEASE_SECS.into()],
            ))
            .await?;
        if let Ok(mut at) = self.last_renew.lock() {
            *at = std::time::Instant::now();
        }
        Ok(row.is_some())
    }

    /// Renews the lease when due; an error when it was lost (another process prunes now).
    async fn keep_lease(&self) -> Result<(), DbErr> {
        let due = self
            .last_renew
            .lock()
            .map(|at| at.elapsed() >= RENEW_EVERY)
            .unwrap_or(true);
        if due && !self.take_lease().await? {
            return Err(DbErr::Custom(
                "retention lease lost to another process".into(),
            ));
        }
        Ok(())
    }

    async fn pause(&self, shutdown: &CancellationToken) -> Result<(), DbErr> {
        tokio::select! {
            () = shutdown.cancelled() => Err(DbErr::Custom("shutting down".into())),
            () = tokio::time::sleep(Duration::from_millis(self.cfg.pause_ms)) => Ok(()),
        }
    }

    /// One pass over every kind of row.
    ///
    /// # Errors
    /// Database errors, a lost lease, or shutdown; what was deleted stays deleted and the
    /// next pass carries on.
    pub async fn pass(&self, shutdown: &CancellationToken) -> Result<PassReport, DbErr> {
        let mut report = PassReport::default();
        if self.cfg.items_days > 0 {
            report.items = self.delete_marked_items(shutdown).await?;
            report.batches_marked = self.mark_batches().await?;
        }
        report.idempotency_keys = self
            .delete_old(
                shutdown,
                table::IDEMPOTENCY_KEYS,
                "idempotency_keys",
                "created_at",
                self.cfg.idempotency_keys_days,
            )
            .await?;
        report.conversion_log = self
            .delete_old(
                shutdown,
                table::CONVERSION_LOG,
                "conversion_log",
                "converted_at",
                self.cfg.conversion_log_days,
            )
            .await?;
        report.outbox = self.drop_stale_outbox(shutdown).await?;
        Ok(report)
    }

    /// Marks the items of batches completed more than `items_days` ago as pruned: from now
    /// on the API answers 410 for them; the next pass deletes them.
    async fn mark_batches(&self) -> Result<u64, DbErr> {
        let rows = self
            .db
            .query_all_raw(stmt(
                "UPDATE bulk_batches SET items_pruned_at = clock_timestamp()
                  WHERE id IN (SELECT id FROM bulk_batches
                                WHERE completed_at IS NOT NULL AND items_pruned_at IS NULL
                                  AND completed_at < clock_timestamp() - make_interval(days => $1)
                                ORDER BY completed_at LIMIT $2
                                FOR UPDATE SKIP LOCKED)
                    AND completed_at IS NOT NULL
                RETURNING id",
                [
                    i32::try_from(self.cfg.items_days)
                        .unwrap_or(i32::MAX)
                        .into(),
                    MARK_PER_PASS.into(),
                ],
            ))
            .await?;
        let n = rows.len() as u64;
        self.metrics.retention_batches_pruned.inc_by(n);
        Ok(n)
    }

    /// Deletes the items of batches marked at least one pass ago, a primary-key range at a
    /// time.
    async fn delete_marked_items(&self, shutdown: &CancellationToken) -> Result<u64, DbErr> {
        let batches = self
            .db
            .query_all_raw(stmt(
                "SELECT id, total FROM bulk_batches
                  WHERE items_pruned_at IS NOT NULL AND NOT items_prune_done
                    AND items_pruned_at <= clock_timestamp() - make_interval(secs => $1)
                    -- A batch reopened since (a dead letter replayed) waits until it is
                    -- completed again.
                    AND completed_at IS NOT NULL
                  ORDER BY id",
                [(self.cfg.interval_secs as f64 * 0.9).into()],
            ))
            .await?;
        let chunk = i64::try_from(self.cfg.delete_chunk).unwrap_or(5000);
        let mut deleted = 0_u64;
        for b in batches {
            let id: i64 = b.try_get("", "id")?;
            let total: i64 = b.try_get("", "total")?;
            let mut from = 1_i64;
            while from <= total {
                self.keep_lease().await?;
                let gone = self
                    .db
                    .execute_raw(stmt(
                        "DELETE FROM bulk_items WHERE batch_id = $1 AND seq >= $2 AND seq < $3",
                        [id.into(), from.into(), from.saturating_add(chunk).into()],
                    ))
                    .await?
                    .rows_affected();
                deleted += gone;
                self.metrics
                    .retention_pruned_rows
                    .with_label_values(&[table::ITEMS])
                    .inc_by(gone);
                from = from.saturating_add(chunk);
                if gone > 0 {
                    self.pause(shutdown).await?;
                }
            }
            self.db
                .execute_raw(stmt(
                    "UPDATE bulk_batches SET items_prune_done = true WHERE id = $1",
                    [id.into()],
                ))
                .await?;
            tracing::info!(batch_id = id, "items of the batch pruned (retention)");
        }
        Ok(deleted)
    }

    /// Deletes rows of `table_name` whose `column` is older than `days`, oldest first, a
    /// chunk at a time.
    async fn delete_old(
        &self,
        shutdown: &CancellationToken,
        label: &'static str,
        table_name: &str,
        column: &str,
        days: u64,
    ) -> Result<u64, DbErr> {
        if days == 0 {
            return Ok(0);
        }
        let sql = format!(
            "DELETE FROM {table_name} WHERE ctid = ANY(ARRAY(
               SELECT ctid FROM {table_name}
                WHERE {column} < clock_timestamp() - make_interval(days => $1)
                ORDER BY {column} LIMIT $2 FOR UPDATE SKIP LOCKED))"
        );
        let days = i32::try_from(days).unwrap_or(i32::MAX);
        let chunk = i64::try_from(self.cfg.delete_chunk).unwrap_or(5000);
        let mut deleted = 0_u64;
        loop {
            self.keep_lease().await?;
            let gone = self
                .db
                .execute_raw(stmt(sql.clone(), [days.into(), chunk.into()]))
                .await?
                .rows_affected();
            deleted += gone;
            self.metrics
                .retention_pruned_rows
                .with_label_values(&[label])
                .inc_by(gone);
            if gone < self.cfg.delete_chunk {
                return Ok(deleted);
            }
            self.pause(shutdown).await?;
        }
    }

    /// Drops outbox rows older than `outbox_days`: events that could not be relayed.
    async fn drop_stale_outbox(&self, shutdown: &CancellationToken) -> Result<u64, DbErr> {
        if self.cfg.outbox_days == 0 {
            return Ok(0);
        }
        let days = i32::try_from(self.cfg.outbox_days).unwrap_or(i32::MAX);
        let chunk = i64::try_from(self.cfg.delete_chunk.min(1000)).unwrap_or(1000);
        let mut dropped = 0_u64;
        loop {
            self.keep_lease().await?;
            let rows = self
                .db
                .query_all_raw(stmt(
                    "DELETE FROM outbox WHERE id IN (
                       SELECT id FROM outbox
                        WHERE created_at < clock_timestamp() - make_interval(days => $1)
                        ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING id, routing_key, jsonb_array_length(events) AS events",
                    [days.into(), chunk.into()],
                ))
                .await?;
            for r in &rows {
                let id: i64 = r.try_get("", "id")?;
                let key: String = r.try_get("", "routing_key")?;
                let events: i32 = r.try_get("", "events")?;
                tracing::warn!(
                    outbox_id = id,
                    routing_key = %key,
                    events,
                    "dropped an outbox row that could not be relayed within retention.outbox_days"
                );
            }
            let gone = rows.len() as u64;
            dropped += gone;
            self.metrics
                .retention_pruned_rows
                .with_label_values(&[table::OUTBOX])
                .inc_by(gone);
            if (rows.len() as i64) < chunk {
                return Ok(dropped);
            }
            self.pause(shutdown).await?;
        }
    }
}
