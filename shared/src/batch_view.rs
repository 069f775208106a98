//! The batch read model: how a batch and its items are read from the database, the one way
//! the API, the console and the `bulkops` CLI read them (the columns to select, the typed
//! views and the row readers), and the columns of an items CSV.

use chrono::{DateTime, Utc};
use sea_orm::QueryResult;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::batch::{BatchKind, BatchState, ItemStatus};

/// Items per outcome.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Counts {
    /// No outcome yet.
    pub pending: i64,
    /// Sales Records created.
    pub created: i64,
    /// Sales Records converted.
    pub converted: i64,
    /// Skipped (see each item's reason).
    pub skipped: i64,
    /// Failed (see each item's reason).
    pub failed: i64,
}

/// A batch and its progress.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchView {
    /// The batch.
    pub id: i64,
    /// What it does.
    pub kind: BatchKind,
    /// `accepted`, `running` or `completed`.
    pub state: BatchState,
    /// Items frozen into it.
    pub total: i64,
    /// Items per outcome; they add up to `total`.
    pub counts: Counts,
    /// The acting user.
    pub requested_by: i64,
    /// The Sales Record type created (bulk create).
    pub record_type_id: Option<i64>,
    /// The filter used (bulk create).
    #[schema(value_type = Option<Object>)]
    pub filter: Option<serde_json::Value>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When its last item got its outcome.
    pub completed_at: Option<DateTime<Utc>>,
    /// When its items were pruned under the retention policy (`retention.items_days`); from
    /// then on `items` and `items.csv` answer 410 and only the counts remain. Null while the
    /// items are kept.
    pub items_pruned_at: Option<DateTime<Utc>>,
}

/// One item of a batch.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ItemView {
    /// Position in the batch (1-based).
    pub seq: i64,
    /// The Individual (create) or Sales Record (convert).
    pub target_id: i64,
    /// Its status.
    pub status: ItemStatus,
    /// The Sales Record created, or the Individual converted into.
    pub result_id: Option<i64>,
    /// Why it was skipped or failed.
    pub reason: Option<String>,
}

/// The `bulk_batches` columns [`batch_from_row`] reads (the API, the CLI and the console
/// select them the same way).
pub const BATCH_COLUMNS: &str =
    "id, kind, state, total, n_created, n_converted, n_skipped, n_failed,
     requested_by, record_type_id, filter, created_at, completed_at, items_pruned_at";

/// The `bulk_items` columns [`item_from_row`] reads.
pub const ITEM_COLUMNS: &str = "seq, target_id, status, result_id, reason";

/// The header row of an items CSV (the API's `items.csv`, the console's download and
/// `bulkops batch items --csv`); [`ItemView::csv_fields`] gives the rows.
pub const ITEM_CSV_HEADER: [&str; 5] = ["seq", "target_id", "status", "result_id", "reason"];

/// Reads a batch row ([`BATCH_COLUMNS`]).
///
/// # Errors
/// Database errors (a row of an unknown kind or state is one).
pub fn batch_from_row(r: &QueryResult) -> Result<BatchView, sea_orm::DbErr> {
    let kind: String = r.try_get("", "kind")?;
    let state: String = r.try_get("", "state")?;
    let total: i64 = r.try_get("", "total")?;
    let created: i64 = r.try_get("", "n_created")?;
    let converted: i64 = r.try_get("", "n_converted")?;
    let skipped: i64 = r.try_get("", "n_skipped")?;
    let failed: i64 = r.try_get("", "n_failed")?;
    Ok(BatchView {
        id: r.try_get("", "id")?,
        kind: BatchKind::from_column(&kind)?,
        state: BatchState::parse(&state)
            .ok_or_else(|| sea_orm::DbErr::Type(format!("batch state {state}")))?,
        total,
        counts: Counts {
            pending: total - created - converted - skipped - failed,
            created,
            converted,
            skipped,
            failed,
        },
        requested_by: r.try_get("", "requested_by")?,
        record_type_id: r.try_get("", "record_type_id")?,
        filter: r.try_get("", "filter")?,
        created_at: r.try_get("", "created_at")?,
        completed_at: r.try_get("", "completed_at")?,
        items_pruned_at: r.try_get("", "items_pruned_at")?,
    })
}

/// Reads an item row ([`ITEM_COLUMNS`]).
///
/// # Errors
/// Database errors (a row of an unknown status is one).
pub fn item_from_row(r: &QueryResult) -> Result<ItemView, sea_orm::DbErr> {
    let status: String = r.try_get("", "status")?;
    Ok(ItemView {
        seq: r.try_get("", "seq")?,
        target_id: r.try_get("", "target_id")?,
        status: ItemStatus::from_column(&status)?,
        result_id: r.try_get("", "result_id")?,
        reason: r.try_get("", "reason")?,
    })
}

impl ItemView {
    /// The item's cells in [`ITEM_CSV_HEADER`]'s order (empty for a missing result or
    /// reason).
    pub fn csv_fields(&self) -> [String; 5] {
        [
            self.seq.to_string(),
            self.target_id.to_string(),
            self.status.as_str().to_owned(),
            self.result_id.map(|v| v.to_string()).unwrap_or_default(),
            self.reason.clone().unwrap_or_default(),
        ]
    }

    /// The item as one CSV record ([`crate::csv_safe::line`]).
    pub fn csv_line(&self) -> bytes::Bytes {
        let f = self.csv_fields();
        crate::csv_safe::line(&[&f[0], &f[1], &f[2], &f[3], &f[4]])
    }
}
