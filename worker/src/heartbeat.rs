//! Readiness heartbeats: every few seconds the worker runs its own readiness check (the one
//! behind `/readyz`) and writes the answer into `worker_heartbeats`, so that the operator
//! console, served by any producer, can show every worker's readiness without knowing
//! where the workers run. A worker that cannot reach the database cannot write: its row
//! then ages, and the console shows it as not seen since then. On SIGTERM the row says
//! `draining`; once the drain is over it is deleted.

use std::sync::Arc;
use std::time::Duration;

use bulkops_shared::amqp::AmqpLink;
use bulkops_shared::batch::Lane;
use bulkops_shared::db::stmt;
use bulkops_shared::lock::Locks;
use bulkops_shared::metrics::WorkerMetrics;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use tokio_util::sync::CancellationToken;

/// How often the heartbeat is written.
pub const PERIOD: Duration = Duration::from_secs(5);
/// Longest a heartbeat write may take (the database may be down).
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest the last word (deleting the row) may take: the worker must exit within 30 s of
/// SIGTERM, and a row left behind only ages out.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a heartbeat reads.
pub struct Heartbeat {
    /// This process's identity in `worker_heartbeats`.
    pub id: uuid::Uuid,
    /// Database (also where the heartbeat goes).
    pub db: DatabaseConnection,
    /// Broker links (consume and publish).
    pub links: Vec<Arc<AmqpLink>>,
    /// Redis.
    pub locks: Locks,
    /// Metrics (readiness gauges; in-flight deliveries).
    pub metrics: WorkerMetrics,
}

/// The host's name: `HOSTNAME` (a pod's name in Kubernetes), else the kernel's.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

impl Heartbeat {
    /// Writes heartbeats until `stop` (which also cuts a heartbeat short); from `draining`
    /// on they say so. Deletes the row when stopped.
    pub async fn run(self, draining: CancellationToken, stop: CancellationToken) {
        let host = host_name();
        let started = chrono::Utc::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                r = self.beat(&host, started, draining.is_cancelled()) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "heartbeat not written");
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = draining.cancelled(), if !draining.is_cancelled() => {}
                () = tokio::time::sleep(PERIOD) => {}
            }
        }
        let gone = self.db.execute_raw(stmt(
            "DELETE FROM worker_heartbeats WHERE worker_id = $1",
            [self.id.into()],
        ));
        if !matches!(tokio::time::timeout(GOODBYE_TIMEOUT, gone).await, Ok(Ok(_))) {
            tracing::debug!("heartbeat row not deleted; it ages out");
        }
    }

    async fn beat(
        &self,
        host: &str,
        started: chrono::DateTime<chrono::Utc>,
        draining: bool,
    ) -> anyhow::Result<()> {
        let links: Vec<&AmqpLink> = self.links.iter().map(AsRef::as_ref).collect();
        let r = bulkops_shared::health::check(
            &self.db,
            &links,
            Some(&self.locks),
            &self.metrics.health,
        )
        .await;
        let inflight: i64 = Lane::ALL
            .iter()
            .map(|lane| {
                self.metrics
                    .inflight
                    .with_label_values(&[lane.as_str()])
                    .get()
            })
            .sum();
        let write = self.db.execute_raw(stmt(
            "WITH gone AS (DELETE FROM worker_heartbeats WHERE seen_at < now() - interval '1 day')
             INSERT INTO worker_heartbeats
                    (worker_id, host, pid, version, started_at, seen_at, ready, broker, redis, inflight, draining)
             VALUES ($1, $2, $3, $4, $5, now(), $6, $7, $8, $9, $10)
             ON CONFLICT (worker_id) DO UPDATE
                SET seen_at = now(), ready = EXCLUDED.ready, broker = EXCLUDED.broker,
                    redis = EXCLUDED.redis, inflight = EXCLUDED.inflight, draining = EXCLUDED.draining",
            [
                self.id.into(),
                host.into(),
                i32::try_from(std::process::id()).unwrap_or(0).into(),
                env!("CARGO_PKG_VERSION").into(),
                started.into(),
                (r.ready && !draining).into(),
                r.broker.into(),
                r.redis.into(),
                inflight.into(),
                draining.into(),
            ],
        ));
        tokio::time::timeout(WRITE_TIMEOUT, write).await??;
        Ok(())
    }
}
