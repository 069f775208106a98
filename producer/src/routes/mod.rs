//! HTTP handlers, one module per resource.

pub mod batches;
pub mod bulk;
pub mod ops;
pub mod saved;
pub mod search;

use sea_orm::{DbErr, QueryResult};

use crate::problem::ApiError;

/// Turns rows fetched with `LIMIT limit + 1` into one keyset page: the extra row only says
/// that more follow, so it is dropped and the last kept row's key becomes `next_after`.
pub(crate) fn keyset_page<T>(
    rows: &[QueryResult],
    limit: i64,
    from_row: impl Fn(&QueryResult) -> Result<T, DbErr>,
    key: impl Fn(&T) -> i64,
) -> Result<(Vec<T>, Option<i64>), ApiError> {
    let mut items = rows
        .iter()
        .map(from_row)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::db)?;
    let next_after = if items.len() as i64 > limit {
        items.truncate(usize::try_from(limit).unwrap_or(0));
        items.last().map(&key)
    } else {
        None
    };
    Ok((items, next_after))
}
