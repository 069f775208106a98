//! The worker's row in `worker_status`: one row per running worker, written by one task
//! with two beats.
//!
//! - **Readiness**, every few seconds: the worker runs its own readiness check (the one
//!   behind `/readyz`) and writes the answer, so that the operator console, served by any
//!   producer, can show every worker's readiness without knowing where the workers run. A
//!   worker that cannot reach the database cannot write: its row then ages, and the
//!   console shows it as not seen since then. On SIGTERM the row says `draining`; once the
//!   drain is over it is deleted.
//! - **Outage report**, while some chunk of this worker waits for an unreachable
//!   dependency ([`Outages`]): what it waits for and since when, renewed every few
//!   seconds. The producers' stall sweeper republishes nothing while any report is fresh:
//!   a batch that stopped moving because its workers are waiting is held up, not lost, and
//!   copies of its messages would only pile up in the queues.
//!
//! The two beats run side by side, so a readiness check slowed by the very outage being
//! reported never delays the report.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkops_shared::amqp::AmqpLink;
use bulkops_shared::batch::Lane;
use bulkops_shared::db::{stmt, timed};
use bulkops_shared::lock::Locks;
use bulkops_shared::metrics::WorkerMetrics;
use bulkops_shared::ratelog::LogGate;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use tokio_util::sync::CancellationToken;

use crate::outage::Outages;

/// How often readiness is written.
pub const PERIOD: Duration = Duration::from_secs(5);
/// Longest a readiness write may take (the database may be down).
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest the last word (deleting the row) may take: the worker must exit within 30 s of
/// SIGTERM, and a row left behind only ages out.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the outage report is renewed while the worker waits.
const RENEW: Duration = Duration::from_secs(5);

/// What the worker's status row is made of.
pub struct Status {
    /// This process's identity in `worker_status`.
    pub id: uuid::Uuid,
    /// Database (also where the row goes).
    pub db: DatabaseConnection,
    /// Broker links (consume and publish).
    pub links: Vec<Arc<AmqpLink>>,
    /// Redis.
    pub locks: Locks,
    /// Metrics (readiness gauges; in-flight deliveries).
    pub metrics: WorkerMetrics,
    /// The outages this worker's chunks wait out.
    pub outages: Arc<Outages>,
    /// Client-side timeout of an outage report.
    pub call_timeout: Duration,
}

/// Who this process is, as the row says.
struct Identity {
    host: String,
    pid: i32,
    started: chrono::DateTime<chrono::Utc>,
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

impl Status {
    /// Writes the row until `stop`: readiness every [`PERIOD`] (from `draining` on, saying
    /// so), and outage reports while chunks wait, until `draining`. Deletes the row when
    /// stopped.
    pub async fn run(self, draining: CancellationToken, stop: CancellationToken) {
        let me = Identity {
            host: host_name(),
            pid: i32::try_from(std::process::id()).unwrap_or(0),
            started: chrono::Utc::now(),
        };
        tokio::join!(
            self.readiness(&me, &draining, &stop),
            self.outage_reports(&me, &draining),
        );
        let gone = self.db.execute_raw(stmt(
            "DELETE FROM worker_status WHERE worker_id = $1",
            [self.id.into()],
        ));
        if !matches!(tokio::time::timeout(GOODBYE_TIMEOUT, gone).await, Ok(Ok(_))) {
            tracing::debug!("heartbeat row not deleted; it ages out");
        }
    }

    async fn readiness(
        &self,
        me: &Identity,
        draining: &CancellationToken,
        stop: &CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                r = self.beat(me, draining.is_cancelled()) => {
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
    }

    async fn beat(&self, me: &Identity, draining: bool) -> anyhow::Result<()> {
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
            "WITH gone AS (DELETE FROM worker_status WHERE seen_at < now() - interval '1 day')
             INSERT INTO worker_status
                    (worker_id, host, pid, version, started_at, seen_at, ready, broker, redis, inflight, draining)
             VALUES ($1, $2, $3, $4, $5, now(), $6, $7, $8, $9, $10)
             ON CONFLICT (worker_id) DO UPDATE
                SET seen_at = now(), ready = EXCLUDED.ready, broker = EXCLUDED.broker,
                    redis = EXCLUDED.redis, inflight = EXCLUDED.inflight, draining = EXCLUDED.draining",
            [
                self.id.into(),
                me.host.clone().into(),
                me.pid.into(),
                env!("CARGO_PKG_VERSION").into(),
                me.started.into(),
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

    /// Reports this worker's outages until `shutdown`, then withdraws the report.
    async fn outage_reports(&self, me: &Identity, shutdown: &CancellationToken) {
        let logs = LogGate::default();
        let mut last: Option<Instant> = None;
        loop {
            if !bulkops_shared::shutdown::sleep(shutdown, Duration::from_secs(1)).await {
                break;
            }
            let current = self.outages.current();
            if current.is_empty() {
                last = None;
                continue;
            }
            if last.is_some_and(|t| t.elapsed() < RENEW) {
                continue;
            }
            let deps: Vec<String> = current.iter().map(|(d, _)| d.as_str().to_owned()).collect();
            let longest = current
                .iter()
                .map(|(_, since)| since.as_secs_f64())
                .fold(0.0, f64::max);
            // The row normally exists (readiness is written at start); when it does not,
            // the report creates it, not ready until the next readiness beat.
            let reported = timed(
                self.call_timeout,
                "worker status report",
                self.db.execute_raw(stmt(
                    "INSERT INTO worker_status (worker_id, host, pid, version, started_at, seen_at,
                                                ready, broker, redis, waiting_for, waiting_since,
                                                waiting_reported_at)
                     VALUES ($1, $2, $3, $4, $5, clock_timestamp(), false, false, false, $6,
                             clock_timestamp() - make_interval(secs => $7), clock_timestamp())
                     ON CONFLICT (worker_id) DO UPDATE
                       SET waiting_for = EXCLUDED.waiting_for,
                           waiting_reported_at = clock_timestamp(),
                           waiting_since = LEAST(worker_status.waiting_since, EXCLUDED.waiting_since)",
                    [
                        self.id.into(),
                        me.host.clone().into(),
                        me.pid.into(),
                        env!("CARGO_PKG_VERSION").into(),
                        me.started.into(),
                        deps.into(),
                        longest.into(),
                    ],
                )),
            )
            .await;
            match reported {
                Ok(_) => last = Some(Instant::now()),
                // The database itself may be what this worker waits for.
                Err(e) => {
                    if let Some(held) = logs.admit("report") {
                        tracing::debug!(error = %e, repeats_since_last_line = held, "cannot report the outage");
                    }
                }
            }
        }
        let _ = timed(
            Duration::from_secs(2),
            "worker status removal",
            self.db.execute_raw(stmt(
                "UPDATE worker_status SET waiting_for = '{}', waiting_since = NULL, waiting_reported_at = NULL
                  WHERE worker_id = $1",
                [self.id.into()],
            )),
        )
        .await;
    }
}
