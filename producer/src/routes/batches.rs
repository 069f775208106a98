//! Batch progress: list, one batch, its items (paged, or as a streamed CSV).

use axum::extract::{Path, State};
use axum::response::Response;
use bulkops_shared::batch::{BatchKind, BatchState, ItemStatus};
pub use bulkops_shared::batch_view::{
    BATCH_COLUMNS, BatchView, Counts, ITEM_COLUMNS, ITEM_CSV_HEADER, ItemView, batch_from_row,
    item_from_row,
};
use bulkops_shared::csv_safe;
use bulkops_shared::db::stmt;
use bulkops_shared::ids::BatchId;
use sea_orm::{ConnectionTrait, Value};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::extract::{ApiQuery, int_from_str};
use crate::problem::{ApiError, Problem};
use crate::routes::search::{Export, exports_busy};
use crate::state::AppState;

/// Largest page of batches or items.
const MAX_LIMIT: i64 = 1000;
/// Items per round while streaming CSV.
const CSV_PAGE: i64 = 10_000;

/// A page of batches.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchList {
    /// Newest first.
    pub items: Vec<BatchView>,
}

/// A page of items.
#[derive(Debug, Serialize, ToSchema)]
pub struct ItemPage {
    /// By seq.
    pub items: Vec<ItemView>,
    /// Pass as `after` for the next page; null on the last.
    pub next_after: Option<i64>,
}

/// Filters of the batch list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BatchListQuery {
    /// `create_sales_records` or `convert_sales_records`.
    #[serde(default)]
    pub kind: Option<String>,
    /// `accepted`, `running` or `completed`.
    #[serde(default)]
    pub state: Option<String>,
    /// 1 to 1000 (default 50).
    #[serde(default, deserialize_with = "int_from_str::option")]
    #[param(value_type = Option<i64>)]
    pub limit: Option<i64>,
}

/// Filters and paging of a batch's items.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ItemQuery {
    /// Only items with this status.
    #[serde(default)]
    pub status: Option<String>,
    /// Items with a seq greater than this.
    #[serde(default, deserialize_with = "int_from_str::option")]
    #[param(value_type = Option<i64>)]
    pub after: Option<i64>,
    /// 1 to 1000 (default 100).
    #[serde(default, deserialize_with = "int_from_str::option")]
    #[param(value_type = Option<i64>)]
    pub limit: Option<i64>,
}

/// The 410 for a batch whose items were pruned.
fn items_kept(batch: &BatchView) -> Result<(), ApiError> {
    match batch.items_pruned_at {
        None => Ok(()),
        Some(at) => Err(ApiError::Gone(format!(
            "the items of batch {} were pruned on {} under the retention policy; the batch and its counts remain at /v1/batches/{}",
            batch.id,
            at.format("%Y-%m-%d"),
            batch.id
        ))),
    }
}

fn limit_of(limit: Option<i64>, default: i64) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(default);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be between 1 and {MAX_LIMIT}"),
        ));
    }
    Ok(limit)
}

fn batch_id_of(raw: &str) -> Result<BatchId, ApiError> {
    raw.parse::<i64>()
        .map(BatchId)
        .map_err(|_| ApiError::field("id", "must be an integer"))
}

/// Lists the agency's batches, newest first.
#[utoipa::path(
    get, path = "/v1/batches", tag = "batches",
    params(BatchListQuery),
    responses(
        (status = 200, description = "The agency's batches, newest first", body = BatchList),
        (status = 400, description = "Invalid filter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<BatchListQuery>,
) -> Result<axum::Json<BatchList>, ApiError> {
    let limit = limit_of(q.limit, 50)?;
    let mut params: Vec<Value> = vec![caller.agency_id.into()];
    let mut sql = format!("SELECT {BATCH_COLUMNS} FROM bulk_batches WHERE agency_id = $1");
    if let Some(kind) = q.kind.filter(|k| !k.is_empty()) {
        let kind = BatchKind::parse(&kind).ok_or_else(|| {
            ApiError::field(
                "kind",
                "must be create_sales_records or convert_sales_records",
            )
        })?;
        params.push(kind.as_str().into());
        sql.push_str(&format!(" AND kind = ${}", params.len()));
    }
    if let Some(st) = q.state.filter(|s| !s.is_empty()) {
        let st = BatchState::parse(&st)
            .ok_or_else(|| ApiError::field("state", "must be accepted, running or completed"))?;
        params.push(st.as_str().into());
        sql.push_str(&format!(" AND state = ${}", params.len()));
    }
    params.push(limit.into());
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", params.len()));
    let rows = state
        .db
        .query_all_raw(stmt(sql, params))
        .await
        .map_err(ApiError::db)?;
    let items = rows
        .iter()
        .map(batch_from_row)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::db)?;
    Ok(axum::Json(BatchList { items }))
}

/// Reads one batch of the agency.
///
/// # Errors
/// 404 when it is not the agency's.
pub async fn load_batch(
    state: &AppState,
    caller: &Caller,
    id: BatchId,
) -> Result<BatchView, ApiError> {
    let row = state
        .db
        .query_one_raw(stmt(
            format!("SELECT {BATCH_COLUMNS} FROM bulk_batches WHERE id = $1 AND agency_id = $2"),
            [id.into(), caller.agency_id.into()],
        ))
        .await
        .map_err(ApiError::db)?
        .ok_or(ApiError::NotFound("batch"))?;
    batch_from_row(&row).map_err(ApiError::db)
}

/// One batch and its progress.
#[utoipa::path(
    get, path = "/v1/batches/{id}", tag = "batches",
    params(("id" = i64, Path, description = "Batch id")),
    responses(
        (status = 200, description = "The batch", body = BatchView),
        (status = 400, description = "The id is not an integer", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such batch in the agency", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<BatchView>, ApiError> {
    let id = batch_id_of(&id)?;
    Ok(axum::Json(load_batch(&state, &caller, id).await?))
}

fn status_of(raw: Option<String>) -> Result<Option<ItemStatus>, ApiError> {
    match raw.filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => ItemStatus::parse(&s).map(Some).ok_or_else(|| {
            ApiError::field(
                "status",
                "must be pending, created, converted, skipped or failed",
            )
        }),
    }
}

/// A page of a batch's items, by seq.
#[utoipa::path(
    get, path = "/v1/batches/{id}/items", tag = "batches",
    params(("id" = i64, Path, description = "Batch id"), ItemQuery),
    responses(
        (status = 200, description = "A page of items", body = ItemPage),
        (status = 400, description = "Invalid filter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such batch in the agency", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The batch's items were pruned (retention); the batch remains", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn items(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ItemQuery>,
) -> Result<axum::Json<ItemPage>, ApiError> {
    let id = batch_id_of(&id)?;
    let limit = limit_of(q.limit, 100)?;
    let status = status_of(q.status)?;
    items_kept(&load_batch(&state, &caller, id).await?)?;
    Ok(axum::Json(
        item_page(&state.db, id, status, q.after.unwrap_or(0), limit).await?,
    ))
}

/// A page of a batch's items by seq: those after `after`, optionally of one status. The
/// caller has checked that the batch is the caller's to see.
///
/// # Errors
/// Database errors.
pub async fn item_page(
    db: &sea_orm::DatabaseConnection,
    id: BatchId,
    status: Option<ItemStatus>,
    after: i64,
    limit: i64,
) -> Result<ItemPage, ApiError> {
    let rows = db
        .query_all_raw(items_statement(id, status, after, limit + 1))
        .await
        .map_err(ApiError::db)?;
    let (items, next_after) = super::keyset_page(&rows, limit, item_from_row, |i| i.seq)?;
    Ok(ItemPage { items, next_after })
}

/// One keyset page of a batch's items (optionally of one status): seqs above `after`, by
/// seq, at most `limit`.
fn items_statement(
    id: BatchId,
    status: Option<ItemStatus>,
    after: i64,
    limit: i64,
) -> sea_orm::Statement {
    let mut params: Vec<Value> = vec![id.into(), after.into(), limit.into()];
    let mut sql = format!("SELECT {ITEM_COLUMNS} FROM bulk_items WHERE batch_id = $1 AND seq > $2");
    if let Some(st) = status {
        params.push(st.as_str().into());
        sql.push_str(" AND status = $4");
    }
    sql.push_str(" ORDER BY seq LIMIT $3");
    stmt(sql, params)
}

/// Every item of a batch as CSV, streamed.
#[utoipa::path(
    get, path = "/v1/batches/{id}/items.csv", tag = "batches",
    params(("id" = i64, Path, description = "Batch id")),
    responses(
        (status = 200, description = "Header row, then one row per item", content_type = "text/csv", body = String),
        (status = 400, description = "The id is not an integer", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such batch in the agency", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "The batch's items were pruned (retention); the batch remains", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn items_csv(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = batch_id_of(&id)?;
    items_kept(&load_batch(&state, &caller, id).await?)?;
    let Some(export) = Export::start(&state) else {
        return Ok(exports_busy());
    };
    Ok(items_csv_response(export, id, None))
}

/// A batch's items (optionally of one status) as a streamed CSV download. The caller has
/// checked that the batch is the caller's to see and still has its items, and holds an
/// export permit ([`Export::start`]). Keyset pages, each a single statement on the exports'
/// pool (see `search_csv`): the items are frozen and each moves from `pending` to its
/// outcome once, so every item appears exactly once, with its status as of its page.
pub fn items_csv_response(export: Export, id: BatchId, status: Option<ItemStatus>) -> Response {
    let name = match status {
        Some(st) => format!("batch-{id}-items-{}.csv", st.as_str()),
        None => format!("batch-{id}-items.csv"),
    };
    export.stream(
        &name,
        csv_safe::line(&ITEM_CSV_HEADER),
        CSV_PAGE,
        move |after| items_statement(id, status, after, CSV_PAGE),
        |r| item_from_row(r).map(|item| (item.seq, item.csv_line())),
    )
}
