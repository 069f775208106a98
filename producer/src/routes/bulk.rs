//! Bulk requests: preview, bulk create Sales Records, bulk convert Sales Records.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bulkops_shared::db::stmt;
use bulkops_shared::filter::SearchFilter;
use sea_orm::{ConnectionTrait, Value};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::accept::{
    AcceptConfig, AcceptError, Acceptance, AcceptedBatch, IdempotencyKey, Targets, accept,
};
use crate::auth::{Caller, require};
use crate::extract::ApiJson;
use crate::problem::{ApiError, Problem};
use crate::routes::saved::filter_of;
use crate::routes::search::checked;
use crate::state::AppState;

/// Most Sales Records in one conversion request.
pub const MAX_CONVERSION_IDS: usize = 100_000;
/// Longest `Idempotency-Key`.
const MAX_KEY_LEN: usize = 255;

/// Which Individuals, and the new records' type.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkCreateRequest {
    /// The filter; give this or `saved_search_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<SearchFilter>,
    /// A saved search of the agency; give this or `filter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_search_id: Option<i64>,
    /// The Sales Record type to create.
    pub record_type_id: i64,
    /// When given, the request is refused (409) unless the search finds exactly this many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub expected_total: Option<i64>,
}

/// A preview request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    /// The filter; give this or `saved_search_id`.
    #[serde(default)]
    pub filter: Option<SearchFilter>,
    /// A saved search of the agency; give this or `filter`.
    #[serde(default)]
    pub saved_search_id: Option<i64>,
    /// The Sales Record type that would be created.
    pub record_type_id: i64,
}

/// What a bulk create would do now.
#[derive(Debug, Serialize, ToSchema)]
pub struct PreviewResponse {
    /// Individuals found.
    pub total: i64,
    /// Of those, how many already have a Sales Record (they would be skipped).
    pub already_linked: i64,
    /// How many Sales Records would be created.
    pub to_create: i64,
}

/// Sales Records to convert.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConversionRequest {
    /// 1 to 100,000 Sales Record ids; repeats count once.
    #[schema(min_items = 1, max_items = 100_000)]
    pub sales_record_ids: Vec<i64>,
}

async fn resolve_filter(
    state: &AppState,
    caller: &Caller,
    filter: Option<SearchFilter>,
    saved_search_id: Option<i64>,
) -> Result<SearchFilter, ApiError> {
    match (filter, saved_search_id) {
        (Some(_), Some(_)) => Err(ApiError::field(
            "saved_search_id",
            "give either filter or saved_search_id, not both",
        )),
        (Some(f), None) => checked(f),
        (None, Some(id)) => filter_of(state, caller, id).await,
        (None, None) => Err(ApiError::field(
            "filter",
            "give a filter or a saved_search_id",
        )),
    }
}

async fn check_record_type(state: &AppState, caller: &Caller, id: i64) -> Result<(), ApiError> {
    let found = state
        .db
        .query_one_raw(stmt(
            "SELECT 1 AS one FROM sales_record_types WHERE id = $1 AND agency_id = $2",
            [id.into(), caller.agency_id.into()],
        ))
        .await
        .map_err(ApiError::db)?;
    match found {
        Some(_) => Ok(()),
        None => Err(ApiError::field(
            "record_type_id",
            "no such Sales Record type in your agency",
        )),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ApiError::field("Idempotency-Key", "must be printable ASCII"))?
        .trim();
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(ApiError::field(
            "Idempotency-Key",
            format!("must be 1 to {MAX_KEY_LEN} characters"),
        ));
    }
    Ok(Some(key.to_owned()))
}

fn accepted_response(batch: &AcceptedBatch) -> Response {
    let mut response = (StatusCode::ACCEPTED, axum::Json(batch)).into_response();
    if let Ok(loc) = HeaderValue::from_str(&format!("/v1/batches/{}", batch.batch_id)) {
        response.headers_mut().insert(header::LOCATION, loc);
    }
    response
}

async fn accept_and_split(
    state: &AppState,
    caller: &Caller,
    targets: Targets,
    key: Option<IdempotencyKey>,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let kind = match targets {
        Targets::Search { .. } => bulkops_shared::batch::BatchKind::CreateSalesRecords,
        Targets::Conversion { .. } => bulkops_shared::batch::BatchKind::ConvertSalesRecords,
    };
    let cfg = AcceptConfig {
        interactive_max_items: state.settings.split.interactive_max_items,
        split_owner: state.split_owner,
        lease_secs: state.settings.split.lease_secs,
        max_active_items_per_agency: state.settings.limits.max_active_items_per_agency,
    };
    let outcome = match accept(&state.db, caller, &targets, key.as_ref(), cfg).await {
        Err(AcceptError::Quota(refusal)) => {
            state
                .metrics
                .quota_refusals
                .with_label_values(&[kind.label()])
                .inc();
            tracing::info!(
                agency_id = caller.agency_id.0,
                kind = kind.label(),
                in_flight = refusal.in_flight,
                requested = refusal.requested,
                limit = refusal.limit,
                "request refused: the agency's quota of items in flight is full"
            );
            return Err(ApiError::QuotaExceeded(refusal));
        }
        other => other.map_err(ApiError::from)?,
    };
    match outcome {
        Acceptance::New {
            batch,
            needs_split,
            settled,
        } => {
            state
                .metrics
                .accept_duration
                .with_label_values(&[kind.label()])
                .observe(started.elapsed().as_secs_f64());
            state
                .metrics
                .batches_accepted
                .with_label_values(&[kind.label()])
                .inc();
            for (outcome, n) in settled.by_outcome() {
                if n > 0 {
                    state
                        .metrics
                        .items_settled_on_accept
                        .with_label_values(&[kind.label(), outcome.as_str()])
                        .inc_by(n.unsigned_abs());
                }
            }
            if needs_split {
                state.splitter.wake();
            }
            Ok(accepted_response(&batch))
        }
        Acceptance::Replayed(batch) => Ok(accepted_response(&batch)),
    }
}

/// Counts what a bulk create would do.
#[utoipa::path(
    post, path = "/v1/bulk/sales-records/preview", tag = "bulk",
    request_body = PreviewRequest,
    responses(
        (status = 200, description = "What a bulk create would do now", body = PreviewResponse),
        (status = 400, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The user may not bulk create", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn preview(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<PreviewRequest>,
) -> Result<axum::Json<PreviewResponse>, ApiError> {
    require(bulkops_shared::permissions::may_bulk_create(&caller.access))?;
    let filter = resolve_filter(&state, &caller, req.filter, req.saved_search_id).await?;
    check_record_type(&state, &caller, req.record_type_id).await?;
    let mut params: Vec<Value> = vec![caller.agency_id.into()];
    let conditions = filter.to_sql("i", &mut params);
    let sql = format!(
        "SELECT count(*) AS total, count(sr.id) AS linked
           FROM individuals i LEFT JOIN sales_records sr ON sr.individual_id = i.id
          WHERE i.agency_id = $1 AND {conditions}"
    );
    let row = state
        .db
        .query_one_raw(stmt(sql, params))
        .await
        .map_err(ApiError::db)?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("count returned no row")))?;
    let total: i64 = row.try_get("", "total").map_err(ApiError::db)?;
    let linked: i64 = row.try_get("", "linked").map_err(ApiError::db)?;
    Ok(axum::Json(PreviewResponse {
        total,
        already_linked: linked,
        to_create: total - linked,
    }))
}

/// Creates a Sales Record for every Individual the search finds now, skipping those that
/// already have one. Answers at once; the batch runs in the background.
#[utoipa::path(
    post, path = "/v1/bulk/sales-records", tag = "bulk",
    request_body = BulkCreateRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays return the first answer")),
    responses(
        (status = 202, description = "Accepted; items frozen", body = AcceptedBatch,
         headers(("Location" = String, description = "/v1/batches/{batch_id}"))),
        (status = 400, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The user may not bulk create", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "expected_total differs from what the search finds now", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Idempotency-Key reused for another request", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The agency's undecided items would exceed limits.max_active_items_per_agency; nothing was frozen", body = Problem, content_type = "application/problem+json",
         headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(req): ApiJson<BulkCreateRequest>,
) -> Result<Response, ApiError> {
    require(bulkops_shared::permissions::may_bulk_create(&caller.access))?;
    let key = idempotency_key(&headers)?;
    if let Some(expected) = req.expected_total
        && expected < 0
    {
        return Err(ApiError::field("expected_total", "must not be negative"));
    }
    let filter = resolve_filter(&state, &caller, req.filter.clone(), req.saved_search_id).await?;
    check_record_type(&state, &caller, req.record_type_id).await?;
    let key = key.map(|k| IdempotencyKey::new(k, "POST /v1/bulk/sales-records", &req));
    let targets = Targets::Search {
        filter: Box::new(filter),
        saved_search_id: req.saved_search_id,
        record_type_id: req.record_type_id,
        expected_total: req.expected_total,
    };
    accept_and_split(&state, &caller, targets, key).await
}

/// Converts Sales Records to Individuals. Answers at once; the batch runs in the background.
#[utoipa::path(
    post, path = "/v1/bulk/conversions", tag = "bulk",
    request_body = ConversionRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays return the first answer")),
    responses(
        (status = 202, description = "Accepted; items frozen", body = AcceptedBatch,
         headers(("Location" = String, description = "/v1/batches/{batch_id}"))),
        (status = 400, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The user may not convert", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Enhanced Records agency, or Idempotency-Key reused for another request", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The agency's undecided items would exceed limits.max_active_items_per_agency; nothing was frozen", body = Problem, content_type = "application/problem+json",
         headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
    ),
    security(("bearer" = []))
)]
pub async fn convert(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(req): ApiJson<ConversionRequest>,
) -> Result<Response, ApiError> {
    require(bulkops_shared::permissions::may_convert(&caller.access))?;
    let key = idempotency_key(&headers)?;
    if req.sales_record_ids.is_empty() || req.sales_record_ids.len() > MAX_CONVERSION_IDS {
        return Err(ApiError::field(
            "sales_record_ids",
            format!("give 1 to {MAX_CONVERSION_IDS} ids"),
        ));
    }
    let enhanced = state
        .db
        .query_one_raw(stmt(
            "SELECT enhanced_records FROM agencies WHERE id = $1",
            [caller.agency_id.into()],
        ))
        .await
        .map_err(ApiError::db)?
        .map(|r| r.try_get::<bool>("", "enhanced_records"))
        .transpose()
        .map_err(ApiError::db)?
        .unwrap_or(false);
    if enhanced {
        return Err(ApiError::Unprocessable(
            "this agency uses Enhanced Records, which cannot convert Sales Records to Individuals"
                .to_owned(),
        ));
    }
    let key = key.map(|k| IdempotencyKey::new(k, "POST /v1/bulk/conversions", &req));
    let targets = Targets::Conversion {
        ids: req.sales_record_ids,
    };
    accept_and_split(&state, &caller, targets, key).await
}

/// The problem document of each reason a batch was not accepted.
impl From<AcceptError> for ApiError {
    fn from(e: AcceptError) -> Self {
        match e {
            AcceptError::TotalChanged { found, expected } => ApiError::Conflict(format!(
                "the search now finds {found} Individuals, not the expected {expected}; preview again and resubmit"
            )),
            AcceptError::KeyReused => ApiError::Unprocessable(e.to_string()),
            AcceptError::Quota(refusal) => ApiError::QuotaExceeded(refusal),
            AcceptError::Db(db) => ApiError::db(db),
            AcceptError::NoRow(what) => ApiError::Internal(anyhow::anyhow!(what)),
            AcceptError::Json(json) => ApiError::Internal(json.into()),
        }
    }
}
