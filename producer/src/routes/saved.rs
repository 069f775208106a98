//! Saved searches: a named filter, shared within the agency.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use bulkops_shared::db::stmt;
use bulkops_shared::filter::SearchFilter;
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, QueryResult};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Caller, require};
use crate::extract::ApiJson;
use crate::problem::{ApiError, Problem};
use crate::routes::search::checked;
use crate::state::AppState;

/// Longest name.
const MAX_NAME: usize = 200;

/// A new saved search.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSavedSearch {
    /// Its name (1 to 200 characters).
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    /// The filter.
    pub filter: SearchFilter,
}

/// A saved search.
#[derive(Debug, Serialize, ToSchema)]
pub struct SavedSearch {
    /// Its id.
    pub id: i64,
    /// Its name.
    pub name: String,
    /// The filter.
    pub filter: SearchFilter,
    /// When it was saved.
    pub created_at: DateTime<Utc>,
}

/// The agency's saved searches.
#[derive(Debug, Serialize, ToSchema)]
pub struct SavedSearchList {
    /// Newest first.
    pub items: Vec<SavedSearch>,
}

fn from_row(r: &QueryResult) -> Result<SavedSearch, ApiError> {
    let filter: serde_json::Value = r.try_get("", "filter").map_err(ApiError::db)?;
    Ok(SavedSearch {
        id: r.try_get("", "id").map_err(ApiError::db)?,
        name: r.try_get("", "name").map_err(ApiError::db)?,
        // A filter saved by the CRM that this version cannot read still lists; it is shown
        // as matching everything rather than failing the whole list.
        filter: serde_json::from_value(filter).unwrap_or_default(),
        created_at: r.try_get("", "created_at").map_err(ApiError::db)?,
    })
}

/// Saves a search.
#[utoipa::path(
    post, path = "/v1/saved-searches", tag = "saved searches",
    request_body = NewSavedSearch,
    responses(
        (status = 201, description = "Saved", body = SavedSearch),
        (status = 400, description = "Invalid name or filter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "No access to Individuals", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewSavedSearch>,
) -> Result<(StatusCode, axum::Json<SavedSearch>), ApiError> {
    require(bulkops_shared::permissions::may_search(&caller.access))?;
    let name = req.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > MAX_NAME || name.contains('\0') {
        return Err(ApiError::field(
            "name",
            format!("must be 1 to {MAX_NAME} characters, without NUL"),
        ));
    }
    let filter = checked(req.filter)?;
    let filter_json = serde_json::to_value(&filter).map_err(|e| ApiError::Internal(e.into()))?;
    let row = state
        .db
        .query_one_raw(stmt(
            "INSERT INTO saved_searches (agency_id, user_id, name, filter) VALUES ($1, $2, $3, $4)
             RETURNING id, name, filter, created_at",
            [
                caller.agency_id.into(),
                caller.user_id.into(),
                name.into(),
                filter_json.into(),
            ],
        ))
        .await
        .map_err(ApiError::db)?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("insert returned no row")))?;
    Ok((StatusCode::CREATED, axum::Json(from_row(&row)?)))
}

/// Lists the agency's saved searches.
#[utoipa::path(
    get, path = "/v1/saved-searches", tag = "saved searches",
    responses(
        (status = 200, description = "The agency's saved searches, newest first", body = SavedSearchList),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "No access to Individuals", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<axum::Json<SavedSearchList>, ApiError> {
    require(bulkops_shared::permissions::may_search(&caller.access))?;
    let rows = state
        .db
        .query_all_raw(stmt(
            "SELECT id, name, filter, created_at FROM saved_searches WHERE agency_id = $1 ORDER BY id DESC LIMIT 1000",
            [caller.agency_id.into()],
        ))
        .await
        .map_err(ApiError::db)?;
    let items = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
    Ok(axum::Json(SavedSearchList { items }))
}

/// Reads one saved search.
#[utoipa::path(
    get, path = "/v1/saved-searches/{id}", tag = "saved searches",
    params(("id" = i64, Path, description = "Saved search id")),
    responses(
        (status = 200, description = "The saved search", body = SavedSearch),
        (status = 400, description = "The id is not an integer", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "No access to Individuals", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such saved search in the agency", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<SavedSearch>, ApiError> {
    require(bulkops_shared::permissions::may_search(&caller.access))?;
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::field("id", "must be an integer"))?;
    let row = state
        .db
        .query_one_raw(stmt(
            "SELECT id, name, filter, created_at FROM saved_searches WHERE id = $1 AND agency_id = $2",
            [id.into(), caller.agency_id.into()],
        ))
        .await
        .map_err(ApiError::db)?
        .ok_or(ApiError::NotFound("saved search"))?;
    Ok(axum::Json(from_row(&row)?))
}

/// The filter of a saved search of the agency, or a 400 naming `saved_search_id`.
///
/// # Errors
/// 400 when the saved search is not the agency's.
pub async fn filter_of(
    state: &AppState,
    caller: &Caller,
    id: i64,
) -> Result<SearchFilter, ApiError> {
    let row = state
        .db
        .query_one_raw(stmt(
            "SELECT filter FROM saved_searches WHERE id = $1 AND agency_id = $2",
            [id.into(), caller.agency_id.into()],
        ))
        .await
        .map_err(ApiError::db)?
        .ok_or_else(|| ApiError::field("saved_search_id", "no such saved search in your agency"))?;
    let filter: serde_json::Value = row.try_get("", "filter").map_err(ApiError::db)?;
    SearchFilter::parse(&filter, "saved_search_id")
        .map_err(|_| ApiError::field("saved_search_id", "the saved search's filter is not valid"))
}
