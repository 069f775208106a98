//! Operational endpoints: `/metrics`, `/healthz`, `/readyz`, `/v1/openapi.json`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bulkops_shared::health::{Readiness, check};

use crate::state::AppState;

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    bulkops_shared::metrics::http_response(&state.metrics.registry).into_response()
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = serde_json::Value)))]
pub async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// Readiness: the database, the broker and Redis answer.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Every dependency answers", body = serde_json::Value),
        (status = 503, description = "A dependency is down", body = serde_json::Value)))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let r: Readiness = check(
        &state.db,
        &[state.publish_link.as_ref()],
        Some(&state.locks),
        &state.metrics.health,
    )
    .await;
    (r.http_status(), axum::Json(r)).into_response()
}

/// The OpenAPI 3 document of this API, generated from the code.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3 document", body = serde_json::Value)))]
pub async fn openapi() -> Response {
    axum::Json(crate::openapi::document_json()).into_response()
}
