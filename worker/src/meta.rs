//! What a worker needs to know about a batch, cached briefly: a chunk of deliveries of one
//! batch costs one lookup per few seconds, not one per message. Each lookup has a
//! client-side timeout (`database.call_timeout_ms`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkops_shared::batch::BatchKind;
use bulkops_shared::db::stmt;
use bulkops_shared::ids::{AgencyId, BatchId, UserId};
use bulkops_shared::permissions::FULL_RIGHTS_SQL;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};
use tokio::sync::Mutex;

/// How long a batch's facts are reused. Permissions revoked mid-batch apply within this.
const TTL: Duration = Duration::from_secs(10);
/// Entries kept at most; older ones are dropped when full.
const CAPACITY: usize = 1024;

/// A batch's facts.
#[derive(Debug, Clone)]
pub struct BatchMeta {
    /// The batch.
    pub id: BatchId,
    /// Its agency: every target must belong to it.
    pub agency_id: AgencyId,
    /// Create or convert.
    pub kind: BatchKind,
    /// The acting user.
    pub requested_by: UserId,
    /// Bulk create: the new records' type.
    pub record_type_id: Option<i64>,
    /// Convert: record types the acting user has view, edit and delete on.
    pub convertible_types: HashSet<i64>,
}

/// A cached entry: when it was read, and what.
type Entry = (Instant, Arc<BatchMeta>);

/// The cache.
#[derive(Clone)]
pub struct MetaCache {
    db: DatabaseConnection,
    timeout: Duration,
    entries: Arc<Mutex<HashMap<BatchId, Entry>>>,
}

impl MetaCache {
    /// An empty cache over `db`, each lookup bounded by `timeout`.
    pub fn new(db: DatabaseConnection, timeout: Duration) -> Self {
        Self {
            db,
            timeout,
            entries: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The batch's facts, or `None` when there is no such batch.
    ///
    /// # Errors
    /// Database errors.
    pub async fn get(&self, id: BatchId) -> Result<Option<Arc<BatchMeta>>, DbErr> {
        {
            let entries = self.entries.lock().await;
            if let Some((at, meta)) = entries.get(&id)
                && at.elapsed() < TTL
            {
                return Ok(Some(meta.clone()));
            }
        }
        let Some(meta) =
            bulkops_shared::db::timed(self.timeout, "batch lookup", self.load(id)).await?
        else {
            return Ok(None);
        };
        let meta = Arc::new(meta);
        let mut entries = self.entries.lock().await;
        if entries.len() >= CAPACITY {
            entries.retain(|_, (at, _)| at.elapsed() < TTL);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(id, (Instant::now(), meta.clone()));
        Ok(Some(meta))
    }

    async fn load(&self, id: BatchId) -> Result<Option<BatchMeta>, DbErr> {
        let Some(row) = self
            .db
            .query_one_raw(stmt(
                format!(
                    "SELECT b.agency_id, b.kind, b.requested_by, b.record_type_id,
                        COALESCE((SELECT array_agg(p.record_type_id) FROM user_sales_permissions p
                                   WHERE p.user_id = b.requested_by AND {FULL_RIGHTS_SQL}),
                                 '{{}}') AS convertible
                   FROM bulk_batches b WHERE b.id = $1"
                ),
                [id.into()],
            ))
            .await?
        else {
            return Ok(None);
        };
        let kind: String = row.try_get("", "kind")?;
        let kind = BatchKind::from_column(&kind)?;
        let convertible: Vec<i64> = row.try_get("", "convertible")?;
        Ok(Some(BatchMeta {
            id,
            agency_id: AgencyId(row.try_get("", "agency_id")?),
            kind,
            requested_by: UserId(row.try_get("", "requested_by")?),
            record_type_id: row.try_get("", "record_type_id")?,
            convertible_types: convertible.into_iter().collect(),
        }))
    }
}
