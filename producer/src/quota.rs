//! The per-agency quota: `limits.max_active_items_per_agency` caps the undecided
//! (`pending`) items an agency may have across its batches.
//!
//! The check runs inside the accepting transaction, before anything is frozen:
//!
//! 1. A transaction-scoped advisory lock per agency (`pg_advisory_xact_lock`) serialises
//!    the agency's accepting transactions across every producer, so no two concurrent
//!    requests can both see room for themselves. The lock is released by the commit or
//!    rollback (it works through PgBouncer in transaction mode too), locks no CRM row, and
//!    never delays another agency (two agencies whose keys collide merely wait for each
//!    other).
//! 2. The agency's items in flight are summed from its unfinished batches' counters, which
//!    the previous lock holder's commit already shows.
//! 3. The request's own undecided items are counted (bounded: the count stops one past the
//!    room left); a request that does not fit is refused with 429 and nothing is frozen.
//! 4. After freezing, the exact number frozen is compared again: the CRM may have added
//!    Individuals between the count and the freeze, and the limit must hold exactly.
//!
//! A **single-record conversion** (one distinct Sales Record id: the "Convert to
//! Individual" button and the workflow action) is exempt: it is what a user watches in a
//! modal, it is one item, and it must not wait behind another request's lock. It still
//! counts towards the agency's items in flight, so it can take an agency at most a few
//! items over the limit, never refuse anyone else's work for long.
//!
//! `Retry-After` is an estimate: the items that must finish before the request fits,
//! divided by the rate at which the agency's running batches have been finishing items,
//! between 1 s and 1 h (60 s when no batch of the agency has a rate yet).

use std::collections::HashSet;

use bulkops_shared::db::stmt;
use bulkops_shared::filter::SearchFilter;
use bulkops_shared::ids::AgencyId;
use bulkops_shared::permissions::FULL_RIGHTS_SQL;
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr, Value};

use crate::auth::Caller;

/// Shortest `Retry-After`, in seconds.
const MIN_RETRY_SECS: u64 = 1;
/// Longest `Retry-After`, in seconds.
const MAX_RETRY_SECS: u64 = 3600;
/// `Retry-After` when the agency's drain rate is unknown, in seconds.
const UNKNOWN_RATE_RETRY_SECS: u64 = 60;

/// What the quota check knows about an agency while it holds the agency's lock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InFlight {
    /// Undecided items across the agency's unfinished batches.
    pub items: i64,
    /// Items per second the agency's running batches have been deciding (0 when unknown).
    pub rate: f64,
}

/// A refusal, as the 429 describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// Undecided items the agency has in flight now.
    pub in_flight: i64,
    /// Undecided items the request would add (a lower bound unless `requested_exact`).
    pub requested: i64,
    /// Whether `requested` is the exact count (the count of a search stops one past the
    /// room left, so a refused search is known to be "more than the room").
    pub requested_exact: bool,
    /// The configured limit.
    pub limit: u64,
    /// Seconds to wait before trying again.
    pub retry_after_secs: u64,
}

/// Whether a conversion of these ids is a single-record conversion (exempt).
pub fn is_single_conversion(ids: &[i64]) -> bool {
    ids.iter().collect::<HashSet<_>>().len() == 1
}

/// Room left under `limit` for an agency with `in_flight` undecided items.
pub fn room(limit: u64, in_flight: i64) -> i64 {
    i64::try_from(limit)
        .unwrap_or(i64::MAX)
        .saturating_sub(in_flight.max(0))
        .max(0)
}

/// The refusal for a request of `requested` items (`exact`: counted in full, else a lower
/// bound), or `None` when it fits.
pub fn check(limit: u64, now: InFlight, requested: i64, exact: bool) -> Option<Refusal> {
    if limit == 0 || requested <= room(limit, now.items) {
        return None;
    }
    let limit_i = i64::try_from(limit).unwrap_or(i64::MAX);
    // Items that must be decided before the request fits (all of them when it can never fit
    // alone: the estimate is then capped, and the detail says so).
    let must_finish = now.items.saturating_add(requested).saturating_sub(limit_i);
    Some(Refusal {
        in_flight: now.items,
        requested,
        requested_exact: exact,
        limit,
        retry_after_secs: retry_after(must_finish, now.rate),
    })
}

/// Seconds until `must_finish` items are decided at `rate` items/s, clamped.
pub fn retry_after(must_finish: i64, rate: f64) -> u64 {
    if !(rate.is_finite() && rate > 0.0) {
        return UNKNOWN_RATE_RETRY_SECS;
    }
    let secs = (must_finish.max(1) as f64 / rate).ceil();
    if secs >= MAX_RETRY_SECS as f64 {
        MAX_RETRY_SECS
    } else {
        (secs as u64).max(MIN_RETRY_SECS)
    }
}

/// Takes the agency's quota lock (held until the transaction ends) and reads what it has
/// in flight.
///
/// # Errors
/// Database errors.
pub async fn lock_and_measure(
    tx: &DatabaseTransaction,
    agency_id: AgencyId,
) -> Result<InFlight, DbErr> {
    tx.execute_raw(stmt(
        "SELECT pg_advisory_xact_lock(hashtextextended('bulkops.quota.' || $1::text, 0))",
        [agency_id.into()],
    ))
    .await?;
    let row = tx
        .query_one_raw(stmt(
            "SELECT COALESCE(sum(total - (n_created + n_converted + n_skipped + n_failed)), 0)::bigint AS items,
                    COALESCE(sum(n_created + n_converted + n_skipped + n_failed - n_presettled)
                               FILTER (WHERE started_at IS NOT NULL), 0)::float8 AS decided,
                    COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(started_at)), 0)::float8 AS secs
               FROM bulk_batches
              WHERE agency_id = $1 AND completed_at IS NULL",
            [agency_id.into()],
        ))
        .await
        ?;
    let Some(row) = row else {
        return Ok(InFlight {
            items: 0,
            rate: 0.0,
        });
    };
    let items: i64 = row.try_get("", "items")?;
    let decided: f64 = row.try_get("", "decided")?;
    let secs: f64 = row.try_get("", "secs")?;
    Ok(InFlight {
        items,
        rate: if secs >= 1.0 { decided / secs } else { 0.0 },
    })
}

/// Undecided items a bulk create would freeze now (Individuals found without a Sales
/// Record), counting at most `bound` + 1: `(count, exact)`.
///
/// # Errors
/// Database errors.
pub async fn count_search(
    tx: &DatabaseTransaction,
    caller: &Caller,
    filter: &SearchFilter,
    bound: i64,
) -> Result<(i64, bool), DbErr> {
    let mut params: Vec<Value> = vec![caller.agency_id.into()];
    let conditions = filter.to_sql("i", &mut params);
    params.push(bound.saturating_add(1).into());
    let sql = format!(
        "SELECT count(*) AS n FROM (
           SELECT 1 FROM individuals i
            WHERE i.agency_id = $1 AND {conditions}
              AND NOT EXISTS (SELECT 1 FROM sales_records sr WHERE sr.individual_id = i.id)
            LIMIT ${}) x",
        params.len()
    );
    let n = count(tx, sql, params).await?;
    Ok((n, n <= bound))
}

/// Undecided items a conversion would freeze now (distinct ids that are Sales Records of
/// the agency of a type the user has full rights on). Without a query when every id fits.
///
/// # Errors
/// Database errors.
pub async fn count_conversion(
    tx: &DatabaseTransaction,
    caller: &Caller,
    ids: &[i64],
    bound: i64,
) -> Result<i64, DbErr> {
    let distinct = ids.iter().collect::<HashSet<_>>().len();
    let distinct = i64::try_from(distinct).unwrap_or(i64::MAX);
    if distinct <= bound {
        return Ok(distinct);
    }
    count(
        tx,
        "SELECT count(*) AS n FROM sales_records sr
          WHERE sr.id = ANY($1::bigint[]) AND sr.agency_id = $2
            AND EXISTS (SELECT 1 FROM user_sales_permissions p
                         WHERE p.user_id = $3 AND p.record_type_id = sr.record_type_id
                           AND {FULL_RIGHTS_SQL})"
            .replace("{FULL_RIGHTS_SQL}", FULL_RIGHTS_SQL),
        vec![
            ids.to_vec().into(),
            caller.agency_id.into(),
            caller.user_id.into(),
        ],
    )
    .await
}

async fn count(tx: &DatabaseTransaction, sql: String, params: Vec<Value>) -> Result<i64, DbErr> {
    let row = tx
        .query_one_raw(stmt(sql, params))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("count returned no row".to_owned()))?;
    row.try_get("", "n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now(items: i64, rate: f64) -> InFlight {
        InFlight { items, rate }
    }

    #[test]
    fn a_request_that_fits_is_accepted_up_to_the_limit_exactly() {
        assert_eq!(check(100, now(0, 0.0), 100, true), None);
        assert_eq!(check(100, now(60, 5.0), 40, true), None);
        assert_eq!(check(100, now(100, 5.0), 0, true), None);
        // 0 means no limit.
        assert_eq!(check(0, now(i64::MAX, 0.0), i64::MAX, true), None);
    }

    #[test]
    fn a_request_over_the_limit_is_refused_with_what_is_in_flight() {
        let r = check(100, now(60, 10.0), 41, false).unwrap();
        assert_eq!(
            r,
            Refusal {
                in_flight: 60,
                requested: 41,
                requested_exact: false,
                limit: 100,
                // 1 item must finish at 10/s: rounded up to the minimum.
                retry_after_secs: 1,
            }
        );
        assert_eq!(
            check(100, now(90, 2.0), 50, true).unwrap().retry_after_secs,
            20
        );
        // More in flight than the limit (single conversions are exempt): no negative room.
        assert_eq!(room(100, 150), 0);
        assert!(check(100, now(150, 1.0), 1, true).is_some());
    }

    #[test]
    fn retry_after_is_clamped_and_has_a_default() {
        assert_eq!(retry_after(10, 0.0), UNKNOWN_RATE_RETRY_SECS);
        assert_eq!(retry_after(10, f64::NAN), UNKNOWN_RATE_RETRY_SECS);
        assert_eq!(retry_after(10_000_000, 1.0), MAX_RETRY_SECS);
        assert_eq!(retry_after(0, 1000.0), MIN_RETRY_SECS);
        assert_eq!(retry_after(250, 100.0), 3);
    }

    #[test]
    fn only_one_distinct_id_is_a_single_conversion() {
        assert!(is_single_conversion(&[7]));
        assert!(is_single_conversion(&[7, 7, 7]));
        assert!(!is_single_conversion(&[7, 8]));
        assert!(!is_single_conversion(&[]));
    }
}
