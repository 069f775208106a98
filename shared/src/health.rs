//! Dependency checks behind `/readyz`: the database answers `SELECT 1` on a connection the
//! pool checked is to a writable primary, the broker link is connected, and Redis can take
//! locks ([`Locks::ping`]: the server answers `PING`; in cluster mode every master does; in
//! sentinel mode the node the Sentinels name answers as master), each within a short
//! timeout. The result also feeds `bulkops_dependency_up`. A process may add what it knows
//! beyond reachability to [`Readiness::degraded`] (a worker whose Redis refuses lock writes).

use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde::Serialize;

use crate::amqp::AmqpLink;
use crate::db::stmt;
use crate::lock::Locks;
use crate::metrics::HealthMetrics;

/// Longest a readiness check waits for one dependency.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/readyz` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    /// Whether every dependency answered.
    pub ready: bool,
    /// The database answered.
    pub database: bool,
    /// The broker connection is up.
    pub broker: bool,
    /// Redis answered.
    pub redis: bool,
    /// Dependencies that answer but are not used as intended, and why (e.g.
    /// `redis_locks_bypassed`: Redis refuses lock writes, the worker carries on without
    /// locks). A degraded process is still ready: it gets its work done correctly.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<&'static str>,
}

impl Readiness {
    /// The status `/readyz` answers with: 200 when every dependency answered (degraded
    /// or not), 503 otherwise.
    pub fn http_status(&self) -> http::StatusCode {
        if self.ready {
            http::StatusCode::OK
        } else {
            http::StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

/// Checks the dependencies a process needs (`locks` is `None` for one that needs no Redis).
pub async fn check(
    db: &DatabaseConnection,
    links: &[&AmqpLink],
    locks: Option<&Locks>,
    metrics: &HealthMetrics,
) -> Readiness {
    let database = matches!(
        tokio::time::timeout(CHECK_TIMEOUT, db.execute_raw(stmt("SELECT 1", []))).await,
        Ok(Ok(_))
    );
    let mut broker = true;
    for link in links {
        broker &= link.refresh_health().await;
    }
    let redis = match locks {
        Some(l) => l.ping().await.is_ok(),
        None => true,
    };
    for (name, up) in [("database", database), ("broker", broker), ("redis", redis)] {
        metrics
            .dependency_up
            .with_label_values(&[name])
            .set(i64::from(up));
    }
    Readiness {
        ready: database && broker && redis,
        database,
        broker,
        redis,
        degraded: Vec::new(),
    }
}
