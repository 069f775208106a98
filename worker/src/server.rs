//! The worker's own HTTP endpoint (`metrics.bind`): `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bulkops_shared::amqp::AmqpLink;
use bulkops_shared::lock::Locks;
use bulkops_shared::metrics::WorkerMetrics;
use sea_orm::DatabaseConnection;

/// What the endpoint reads.
#[derive(Clone)]
pub struct Probe {
    /// Database.
    pub db: DatabaseConnection,
    /// Broker links (consume and publish).
    pub links: Vec<Arc<AmqpLink>>,
    /// Redis.
    pub locks: Locks,
    /// Metrics.
    pub metrics: WorkerMetrics,
}

/// The router.
pub fn router(probe: Probe) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .with_state(probe)
}

async fn metrics(State(p): State<Probe>) -> Response {
    let mut response = bulkops_shared::metrics::encode(&p.metrics.registry).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

async fn readyz(State(p): State<Probe>) -> Response {
    let links: Vec<&AmqpLink> = p.links.iter().map(AsRef::as_ref).collect();
    let r = bulkops_shared::health::check(&p.db, &links, Some(&p.locks), &p.metrics.health).await;
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(r)).into_response()
}
