//! The worker's own HTTP endpoint (`metrics.bind`): `/metrics`, `/healthz`, `/readyz`.
//!
//! `/readyz` answers 503 while PostgreSQL, RabbitMQ or Redis does not answer. A worker
//! whose Redis answers but refuses lock writes, and which therefore works without record
//! locks, is still ready (200): it gets its work done correctly, and taking it out of
//! rotation would only stop a rollout. It says so in the body (`"degraded":
//! ["redis_locks_bypassed"]`) and in `bulkops_dependency_degraded{dependency="redis"}`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
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
    /// Whether the locks are bypassed.
    pub gate: Arc<crate::gate::LockGate>,
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
    bulkops_shared::metrics::http_response(&p.metrics.registry).into_response()
}

async fn readyz(State(p): State<Probe>) -> Response {
    let links: Vec<&AmqpLink> = p.links.iter().map(AsRef::as_ref).collect();
    let mut r =
        bulkops_shared::health::check(&p.db, &links, Some(&p.locks), &p.metrics.health).await;
    if p.gate.is_bypassing() {
        r.degraded.push("redis_locks_bypassed");
    }
    (r.http_status(), axum::Json(r)).into_response()
}
