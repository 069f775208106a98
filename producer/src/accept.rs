//! Accepting a batch: one transaction that records the request, freezes its items with
//! one set-based `INSERT … SELECT`, settles at once the items that need no work, stores
//! the idempotent answer, and hands the batch to this producer's splitter.
//!
//! Items decided at acceptance get no message: for a bulk create, Individuals that already
//! have a Sales Record are `skipped` (`already_has_sales_record`, result_id = that record);
//! for a conversion, ids that are not Sales Records of the agency are `failed`
//! (`not_found`), ones converted earlier are `skipped` (`already_converted`, result_id =
//! the Individual), and records of a type the user lacks full rights on are `failed`
//! (`forbidden`). Workers apply the same rules again when they process an item, because the
//! database may change between acceptance and processing.
//!
//! A batch left with nothing to do (a search that found nobody, or every item settled here)
//! is `completed` by this same transaction, with `completed_at` and its
//! `bulk_batch.completed` event in the outbox, so the CRM's progress modal never waits on it.

use bulkops_shared::batch::{BatchKind, Lane, reason};
use bulkops_shared::db::stmt;
use bulkops_shared::filter::SearchFilter;
use bulkops_shared::ids::BatchId;
use bulkops_shared::permissions::FULL_RIGHTS_SQL;
use bulkops_shared::progress::{OutcomeDelta, complete_empty, record_outcomes};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr, TransactionTrait, Value,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::quota;

/// Why a batch was not accepted. The layer's own words: the route maps each to its
/// problem document (`routes::bulk`), this module knows nothing of HTTP.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The caller's `expected_total` is not what the search finds now.
    #[error("the search now finds {found} Individuals, not the expected {expected}")]
    TotalChanged {
        /// What the search froze.
        found: i64,
        /// What the caller expected.
        expected: i64,
    },
    /// The `Idempotency-Key` was used before for another request.
    #[error("this Idempotency-Key was already used for a different request")]
    KeyReused,
    /// The agency's quota of items in flight has no room for the batch.
    #[error("the agency's quota of items in flight is full")]
    Quota(quota::Refusal),
    /// A statement returned no row where it always returns one.
    #[error("{0}")]
    NoRow(&'static str),
    /// The database failed (transient or not: the route tells them apart).
    #[error(transparent)]
    Db(#[from] DbErr),
    /// A stored answer or filter could not be (de)serialised.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// What the batch is made of.
#[derive(Debug, Clone)]
pub enum Targets {
    /// Every Individual the filter finds now gets a Sales Record of this type.
    Search {
        /// The filter (from the request or the saved search).
        filter: Box<SearchFilter>,
        /// The saved search it came from, if any.
        saved_search_id: Option<i64>,
        /// The new records' type.
        record_type_id: i64,
        /// When given, the number of Individuals the caller expects (409 otherwise).
        expected_total: Option<i64>,
    },
    /// These Sales Records are converted (duplicates already removed or not; they count once).
    Conversion {
        /// The ids as requested.
        ids: Vec<i64>,
    },
}

impl Targets {
    /// The kind of batch these targets make.
    pub fn kind(&self) -> BatchKind {
        match self {
            Self::Search { .. } => BatchKind::CreateSalesRecords,
            Self::Conversion { .. } => BatchKind::ConvertSalesRecords,
        }
    }

    /// Whether the quota does not apply: the conversion of one record (the CRM's
    /// "Convert to Individual" button, a workflow action) is never refused (see
    /// `crate::quota`).
    pub fn quota_exempt(&self) -> bool {
        match self {
            Self::Conversion { ids } => quota::is_single_conversion(ids),
            Self::Search { .. } => false,
        }
    }

    /// Holds the caller to its `expected_total`: a search that now finds another number
    /// of Individuals (already linked ones included) is refused, so a user never starts a
    /// batch over a set they did not see. Conversions name their records and expect
    /// nothing.
    ///
    /// # Errors
    /// [`AcceptError::TotalChanged`].
    pub fn check_total(&self, found: i64) -> Result<(), AcceptError> {
        match self {
            Self::Search {
                expected_total: Some(expected),
                ..
            } if *expected != found => Err(AcceptError::TotalChanged {
                found,
                expected: *expected,
            }),
            _ => Ok(()),
        }
    }
}

/// What accepting does with a batch once its items are frozen, decided from its counts
/// alone: how many items are left for the workers and which lane their messages take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frozen {
    /// Items frozen (the search's Individuals, or the distinct ids).
    pub total: i64,
    /// Of them, settled by the freeze itself (skipped or failed at once): no message.
    pub presettled: i64,
    /// Of them, left for the workers: one message each.
    pub to_publish: i64,
    /// The lane of the messages. Chosen by what is left to publish, not by the total: a
    /// request of thousands that all but a few are settled at once is a small job.
    pub lane: Lane,
}

impl Frozen {
    /// The decisions for `total` frozen items of which `settled` were settled at once.
    pub fn new(total: i64, settled: &OutcomeDelta, interactive_max_items: u64) -> Self {
        let presettled = settled.total();
        let to_publish = total - presettled;
        Self {
            total,
            presettled,
            to_publish,
            lane: Lane::for_total(
                u64::try_from(to_publish).unwrap_or(0),
                interactive_max_items,
            ),
        }
    }

    /// Whether the splitter has messages to publish. A batch without is split-done at
    /// acceptance, so no splitter ever holds a lease on it.
    pub fn needs_split(&self) -> bool {
        self.to_publish > 0
    }
}

/// An `Idempotency-Key` and what it was used for.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    /// The header's value.
    pub key: String,
    /// The endpoint, so a key reused on another endpoint is refused.
    pub endpoint: &'static str,
    /// A hash of the parsed request, so a key reused with another body is refused.
    pub request_hash: String,
}

impl IdempotencyKey {
    /// A key for `endpoint` and the canonical form of `request`.
    pub fn new(key: String, endpoint: &'static str, request: &impl Serialize) -> Self {
        let canonical = serde_json::to_vec(request).unwrap_or_default();
        let mut h = Sha256::new();
        h.update(endpoint.as_bytes());
        h.update([0]);
        h.update(&canonical);
        Self {
            key,
            endpoint,
            request_hash: hex::encode(h.finalize()),
        }
    }
}

/// The 202 answer.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct AcceptedBatch {
    /// The new batch.
    pub batch_id: i64,
    /// Items frozen into it (already linked or not found included).
    pub total: i64,
}

/// The result of an accept call.
#[derive(Debug)]
pub enum Acceptance {
    /// A new batch (the splitter should be woken).
    New {
        /// The answer.
        batch: AcceptedBatch,
        /// Whether it still has items to publish.
        needs_split: bool,
        /// The items settled by the accepting transaction itself.
        settled: OutcomeDelta,
    },
    /// The same key was used before for the same request: its stored answer.
    Replayed(AcceptedBatch),
}

/// How this producer accepts batches.
#[derive(Debug, Clone, Copy)]
pub struct AcceptConfig {
    /// Batches with at most this many items to publish take the interactive lane.
    pub interactive_max_items: u64,
    /// This producer's split lease identity: it splits what it accepts.
    pub split_owner: uuid::Uuid,
    /// Split lease lifetime, in seconds.
    pub lease_secs: u64,
    /// `limits.max_active_items_per_agency` (0: no limit).
    pub max_active_items_per_agency: u64,
}

/// Accepts a batch for `caller`.
///
/// # Errors
/// [`AcceptError`]: an `expected_total` mismatch, a key reused for another request, a full
/// quota, or a database failure. Nothing is stored then.
#[tracing::instrument(name = "bulk.accept", skip_all, fields(
    agency_id = caller.agency_id.0,
    kind = tracing::field::Empty,
    batch_id = tracing::field::Empty,
    items = tracing::field::Empty,
    presettled = tracing::field::Empty,
))]
pub async fn accept(
    db: &DatabaseConnection,
    caller: &Caller,
    targets: &Targets,
    idempotency: Option<&IdempotencyKey>,
    cfg: AcceptConfig,
) -> Result<Acceptance, AcceptError> {
    let AcceptConfig {
        interactive_max_items,
        split_owner,
        lease_secs,
        max_active_items_per_agency: limit,
    } = cfg;
    let tx = db.begin().await?;
    // The batch row and any event this transaction writes keep the accept's trace context.
    bulkops_shared::telemetry::propagation::stamp_transaction(&tx).await?;
    if let Some(key) = idempotency
        && let Some(replay) = claim_key(&tx, caller, key).await?
    {
        tx.rollback().await?;
        return Ok(Acceptance::Replayed(replay));
    }
    // The quota, checked before anything is frozen (see `crate::quota`).
    let mut quota_state = None;
    if limit > 0 && !targets.quota_exempt() {
        let now = quota::lock_and_measure(&tx, caller.agency_id).await?;
        let room = quota::room(limit, now.items);
        let (requested, exact) = match targets {
            Targets::Search { filter, .. } => {
                quota::count_search(&tx, caller, filter, room).await?
            }
            Targets::Conversion { ids } => {
                (quota::count_conversion(&tx, caller, ids, room).await?, true)
            }
        };
        if let Some(refusal) = quota::check(limit, now, requested, exact) {
            tx.rollback().await?;
            return Err(AcceptError::Quota(refusal));
        }
        quota_state = Some(now);
    }
    let kind = targets.kind();
    tracing::Span::current().record("kind", kind.as_str());
    let (record_type_id, saved_search_id, filter_json) = match targets {
        Targets::Search {
            filter,
            saved_search_id,
            record_type_id,
            ..
        } => (
            Some(*record_type_id),
            *saved_search_id,
            Some(serde_json::to_value(filter)?),
        ),
        Targets::Conversion { .. } => (None, None, None),
    };
    let row = tx
        .query_one_raw(stmt(
            "INSERT INTO bulk_batches (agency_id, kind, lane, requested_by, record_type_id, saved_search_id, filter)
             VALUES ($1, $2, 'bulk', $3, $4, $5, $6) RETURNING id",
            [
                caller.agency_id.into(),
                kind.as_str().into(),
                caller.user_id.into(),
                record_type_id.into(),
                saved_search_id.into(),
                filter_json.into(),
            ],
        ))
        .await?
        .ok_or_else(|| AcceptError::NoRow("batch insert returned no row"))?;
    let batch_id = BatchId(row.try_get("", "id")?);
    tracing::Span::current().record("batch_id", batch_id.0);

    let (total, delta) = match targets {
        Targets::Search { filter, .. } => freeze_search(&tx, batch_id, caller, filter).await?,
        Targets::Conversion { ids } => freeze_conversion(&tx, batch_id, caller, ids).await?,
    };
    if let Err(e) = targets.check_total(total) {
        tx.rollback().await?;
        return Err(e);
    }
    let frozen = Frozen::new(total, &delta, interactive_max_items);
    // The count above and the freeze are two statements: the CRM may have added
    // Individuals in between. The limit holds for what was actually frozen.
    if let Some(now) = quota_state
        && let Some(refusal) = quota::check(limit, now, frozen.to_publish, true)
    {
        tx.rollback().await?;
        return Err(AcceptError::Quota(refusal));
    }
    refresh_statistics(&tx, total).await?;
    tx.execute_raw(stmt(
        "UPDATE bulk_batches
            SET total = $2, lane = $3, n_presettled = $4,
                split_owner = $5, split_lease_until = clock_timestamp() + make_interval(secs => $6)
          WHERE id = $1",
        [
            batch_id.into(),
            total.into(),
            frozen.lane.as_str().into(),
            frozen.presettled.into(),
            split_owner.into(),
            (lease_secs as f64).into(),
        ],
    ))
    .await?;
    // A batch whose every item is settled here completes here, like any other: the
    // transaction that records its last outcome marks it completed and writes its event.
    // One with no items at all records no outcome, so it is completed explicitly.
    let completed = if total == 0 {
        complete_empty(&tx, batch_id).await?
    } else {
        record_outcomes(&tx, batch_id, delta).await?
    };
    if completed || !frozen.needs_split() {
        tx.execute_raw(stmt(
            "UPDATE bulk_batches SET split_done_at = clock_timestamp(), split_owner = NULL,
                    split_lease_until = NULL WHERE id = $1",
            [batch_id.into()],
        ))
        .await?;
    }
    let answer = AcceptedBatch {
        batch_id: batch_id.0,
        total,
    };
    if let Some(key) = idempotency {
        tx.execute_raw(stmt(
            "UPDATE idempotency_keys SET status_code = 202, response = $3, batch_id = $4
              WHERE user_id = $1 AND key = $2",
            [
                caller.user_id.into(),
                key.key.clone().into(),
                serde_json::to_value(&answer)?.into(),
                batch_id.into(),
            ],
        ))
        .await?;
    }
    tx.commit().await?;
    tracing::Span::current()
        .record("items", total)
        .record("presettled", frozen.presettled);
    tracing::info!(lane = frozen.lane.as_str(), "batch accepted");
    Ok(Acceptance::New {
        batch: answer,
        needs_split: frozen.needs_split(),
        settled: delta,
    })
}

/// A batch that grows `bulk_items` by a large share makes the planner's statistics stale,
/// and with them the workers' per-chunk plans (a sequential scan per item instead of an
/// index probe). Analysing in the accepting transaction keeps the plans right from the
/// first chunk; small batches skip it (autovacuum keeps up with them).
async fn refresh_statistics(tx: &DatabaseTransaction, added: i64) -> Result<(), AcceptError> {
    if added < 1000 {
        return Ok(());
    }
    let row = tx
        .query_one_raw(stmt(
            "SELECT GREATEST(reltuples, 0)::float8 AS n FROM pg_class WHERE oid = 'bulk_items'::regclass",
            [],
        ))
        .await
        ?;
    let known: f64 = match row {
        Some(r) => r.try_get("", "n")?,
        None => 0.0,
    };
    if added as f64 > 0.2 * known {
        tx.execute_raw(stmt("ANALYZE bulk_items", [])).await?;
    }
    Ok(())
}

/// Claims the key for this request, or returns the answer stored for it. A concurrent
/// request with the same key waits here for the first to commit, then replays its answer.
async fn claim_key(
    tx: &DatabaseTransaction,
    caller: &Caller,
    key: &IdempotencyKey,
) -> Result<Option<AcceptedBatch>, AcceptError> {
    let inserted = tx
        .query_one_raw(stmt(
            "INSERT INTO idempotency_keys (user_id, key, agency_id, endpoint, request_hash, status_code, response)
             VALUES ($1, $2, $3, $4, $5, 0, '{}'::jsonb)
             ON CONFLICT (user_id, key) DO NOTHING RETURNING 1 AS claimed",
            [
                caller.user_id.into(),
                key.key.clone().into(),
                caller.agency_id.into(),
                key.endpoint.into(),
                key.request_hash.clone().into(),
            ],
        ))
        .await
        ?;
    if inserted.is_some() {
        return Ok(None);
    }
    let stored = tx
        .query_one_raw(stmt(
            "SELECT endpoint, request_hash, response FROM idempotency_keys WHERE user_id = $1 AND key = $2",
            [caller.user_id.into(), key.key.clone().into()],
        ))
        .await
        ?
        .ok_or_else(|| AcceptError::NoRow("idempotency key vanished"))?;
    let endpoint: String = stored.try_get("", "endpoint")?;
    let hash: String = stored.try_get("", "request_hash")?;
    if endpoint != key.endpoint || hash != key.request_hash {
        return Err(AcceptError::KeyReused);
    }
    let response: serde_json::Value = stored.try_get("", "response")?;
    let answer: AcceptedBatch = serde_json::from_value(response)?;
    Ok(Some(answer))
}

/// Freezes the Individuals the filter finds now. Returns the total and the outcomes
/// settled at once.
#[tracing::instrument(name = "bulk.freeze", skip_all, fields(batch_id = batch_id.0, items = tracing::field::Empty))]
async fn freeze_search(
    tx: &DatabaseTransaction,
    batch_id: BatchId,
    caller: &Caller,
    filter: &SearchFilter,
) -> Result<(i64, OutcomeDelta), AcceptError> {
    let mut params: Vec<Value> = vec![batch_id.into(), caller.agency_id.into()];
    let conditions = filter.to_sql("i", &mut params);
    let sql = format!(
        "WITH ins AS (
           INSERT INTO bulk_items (batch_id, seq, target_id, status, result_id, reason, updated_at)
           SELECT $1, row_number() OVER (ORDER BY i.id), i.id,
                  CASE WHEN sr.id IS NULL THEN 'pending' ELSE 'skipped' END,
                  sr.id,
                  CASE WHEN sr.id IS NULL THEN NULL ELSE '{already}' END,
                  CASE WHEN sr.id IS NULL THEN NULL ELSE clock_timestamp() END
             FROM individuals i
             LEFT JOIN sales_records sr ON sr.individual_id = i.id
            WHERE i.agency_id = $2 AND {conditions}
           RETURNING status
         )
         SELECT count(*) AS total, count(*) FILTER (WHERE status = 'skipped') AS skipped FROM ins",
        already = reason::ALREADY_HAS_SALES_RECORD,
    );
    let row = tx
        .query_one_raw(stmt(sql, params))
        .await?
        .ok_or_else(|| AcceptError::NoRow("freeze returned no row"))?;
    let total: i64 = row.try_get("", "total")?;
    let skipped: i64 = row.try_get("", "skipped")?;
    tracing::Span::current().record("items", total);
    Ok((
        total,
        OutcomeDelta {
            skipped,
            ..OutcomeDelta::default()
        },
    ))
}

/// Freezes the requested Sales Record ids (each once, in the order first given).
#[tracing::instrument(name = "bulk.freeze", skip_all, fields(batch_id = batch_id.0, items = tracing::field::Empty))]
async fn freeze_conversion(
    tx: &DatabaseTransaction,
    batch_id: BatchId,
    caller: &Caller,
    ids: &[i64],
) -> Result<(i64, OutcomeDelta), AcceptError> {
    let sql = format!(
        "WITH ids AS (
           SELECT u.id, min(u.ord) AS ord FROM unnest($3::bigint[]) WITH ORDINALITY AS u(id, ord) GROUP BY u.id
         ), allowed AS (
           SELECT p.record_type_id FROM user_sales_permissions p
            WHERE p.user_id = $4 AND {FULL_RIGHTS_SQL}
         ), ins AS (
           INSERT INTO bulk_items (batch_id, seq, target_id, status, result_id, reason, updated_at)
           SELECT $1, row_number() OVER (ORDER BY ids.ord), ids.id, d.status,
                  CASE WHEN d.status = 'skipped' THEN cl.individual_id END,
                  d.reason,
                  CASE WHEN d.status = 'pending' THEN NULL ELSE clock_timestamp() END
             FROM ids
             LEFT JOIN sales_records sr ON sr.id = ids.id AND sr.agency_id = $2
             LEFT JOIN conversion_log cl ON cl.sales_record_id = ids.id AND cl.agency_id = $2
             LEFT JOIN allowed a ON a.record_type_id = sr.record_type_id
             CROSS JOIN LATERAL (
               SELECT CASE WHEN sr.id IS NOT NULL AND a.record_type_id IS NOT NULL THEN 'pending'
                           WHEN sr.id IS NOT NULL THEN 'failed'
                           WHEN cl.sales_record_id IS NOT NULL THEN 'skipped'
                           ELSE 'failed' END AS status,
                      CASE WHEN sr.id IS NOT NULL AND a.record_type_id IS NOT NULL THEN NULL
                           WHEN sr.id IS NOT NULL THEN '{forbidden}'
                           WHEN cl.sales_record_id IS NOT NULL THEN '{converted}'
                           ELSE '{not_found}' END AS reason
             ) d
           RETURNING status
         )
         SELECT count(*) AS total,
                count(*) FILTER (WHERE status = 'skipped') AS skipped,
                count(*) FILTER (WHERE status = 'failed') AS failed
           FROM ins",
        forbidden = reason::FORBIDDEN,
        converted = reason::ALREADY_CONVERTED,
        not_found = reason::NOT_FOUND,
    );
    let row = tx
        .query_one_raw(stmt(
            sql,
            [
                batch_id.into(),
                caller.agency_id.into(),
                ids.to_vec().into(),
                caller.user_id.into(),
            ],
        ))
        .await?
        .ok_or_else(|| AcceptError::NoRow("freeze returned no row"))?;
    let total: i64 = row.try_get("", "total")?;
    tracing::Span::current().record("items", total);
    Ok((
        total,
        OutcomeDelta {
            skipped: row.try_get("", "skipped")?,
            failed: row.try_get("", "failed")?,
            ..OutcomeDelta::default()
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search(expected_total: Option<i64>) -> Targets {
        Targets::Search {
            filter: Box::new(SearchFilter::default()),
            saved_search_id: None,
            record_type_id: 1,
            expected_total,
        }
    }

    fn conversion(ids: &[i64]) -> Targets {
        Targets::Conversion { ids: ids.to_vec() }
    }

    fn settled(skipped: i64, failed: i64) -> OutcomeDelta {
        OutcomeDelta {
            skipped,
            failed,
            ..OutcomeDelta::default()
        }
    }

    #[test]
    fn targets_make_their_kind_of_batch() {
        assert_eq!(search(None).kind(), BatchKind::CreateSalesRecords);
        assert_eq!(conversion(&[1, 2]).kind(), BatchKind::ConvertSalesRecords);
    }

    #[test]
    fn only_the_conversion_of_one_record_escapes_the_quota() {
        assert!(conversion(&[7]).quota_exempt());
        assert!(
            conversion(&[7, 7, 7]).quota_exempt(),
            "one record, named thrice"
        );
        assert!(!conversion(&[7, 8]).quota_exempt());
        assert!(!search(None).quota_exempt(), "a search is never exempt");
    }

    #[test]
    fn a_search_that_finds_another_total_than_expected_is_refused() {
        assert!(search(None).check_total(10).is_ok(), "no expectation");
        assert!(search(Some(10)).check_total(10).is_ok());
        match search(Some(10)).check_total(11) {
            Err(AcceptError::TotalChanged { found, expected }) => {
                assert_eq!((found, expected), (11, 10));
            }
            other => panic!("expected TotalChanged, got {other:?}"),
        }
        assert!(
            search(Some(0)).check_total(0).is_ok(),
            "an empty search, expected"
        );
        assert!(
            conversion(&[1, 2]).check_total(5).is_ok(),
            "conversions expect nothing"
        );
    }

    #[test]
    fn items_settled_at_once_get_no_message() {
        // 10 Individuals found, 3 already hold a Sales Record.
        let f = Frozen::new(10, &settled(3, 0), 100);
        assert_eq!((f.total, f.presettled, f.to_publish), (10, 3, 7));
        assert!(f.needs_split());
        // Conversions: skipped (converted earlier) and failed (not found, forbidden) alike.
        let f = Frozen::new(10, &settled(2, 5), 100);
        assert_eq!((f.presettled, f.to_publish), (7, 3));
    }

    #[test]
    fn a_batch_with_nothing_left_to_publish_needs_no_split() {
        for f in [
            Frozen::new(0, &OutcomeDelta::default(), 100),
            Frozen::new(4, &settled(4, 0), 100),
            Frozen::new(4, &settled(1, 3), 100),
        ] {
            assert_eq!(f.to_publish, 0, "{f:?}");
            assert!(!f.needs_split(), "{f:?}");
        }
    }

    #[test]
    fn the_lane_follows_what_is_left_to_publish_not_the_total() {
        assert_eq!(
            Frozen::new(100, &settled(0, 0), 100).lane,
            Lane::Interactive
        );
        assert_eq!(Frozen::new(101, &settled(0, 0), 100).lane, Lane::Bulk);
        // 5,000 found, all but 10 already linked: a small job.
        assert_eq!(
            Frozen::new(5000, &settled(4990, 0), 100).lane,
            Lane::Interactive
        );
        // One conversion.
        assert_eq!(Frozen::new(1, &settled(0, 0), 100).lane, Lane::Interactive);
        // Without an interactive lane (0), any work is bulk.
        assert_eq!(Frozen::new(1, &settled(0, 0), 0).lane, Lane::Bulk);
    }
}
