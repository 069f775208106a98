//! What every request handler can reach.

use std::sync::Arc;

use bulkops_shared::amqp::AmqpLink;
use bulkops_shared::config::Settings;
use bulkops_shared::lock::Locks;
use bulkops_shared::metrics::ProducerMetrics;
use bulkops_shared::topology::Topology;
use jsonwebtoken::DecodingKey;
use sea_orm::DatabaseConnection;

use crate::split::SplitHandle;

/// Shared application state (cheap to clone).
#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

/// The state's contents.
pub struct Inner {
    /// The CRM database (accept, reads, the splitter and the relay share this pool).
    pub db: DatabaseConnection,
    /// A small pool of its own for CSV exports (`database.export_max_connections`), so
    /// that exports cannot take the connections accept and the splitter need.
    pub export_db: DatabaseConnection,
    /// CSV exports streaming now (`http.max_concurrent_exports` permits).
    pub exports: Arc<tokio::sync::Semaphore>,
    /// Configuration.
    pub settings: Settings,
    /// Verifies the CRM's HS256 tokens.
    pub jwt: DecodingKey,
    /// Metrics served at `/metrics`.
    pub metrics: ProducerMetrics,
    /// Redis, checked by `/readyz`.
    pub locks: Locks,
    /// The broker link the splitter and relay publish on.
    pub publish_link: Arc<AmqpLink>,
    /// Wakes the splitter when a batch is accepted.
    pub splitter: SplitHandle,
    /// This process's identity as a split lease holder.
    pub split_owner: uuid::Uuid,
    /// Queue names.
    pub topology: Topology,
    /// The operator console, when `ui.enabled`.
    pub ui: Option<Arc<crate::ui::Console>>,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}
