//! The worker's outage report: while some chunk of this worker waits for an unreachable
//! dependency, a row of `bulk_worker_status` says so, renewed every few seconds. The
//! producers' stall sweeper republishes nothing while any report is fresh: a batch that
//! stopped moving because its workers are waiting is held up, not lost, and copies of its
//! messages would only pile up in the queues.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkops_shared::db::{stmt, timed};
use bulkops_shared::ratelog::LogGate;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use tokio_util::sync::CancellationToken;

use crate::outage::Outages;

/// How often the report is renewed while the worker waits.
const RENEW: Duration = Duration::from_secs(5);

/// Reports this worker's outages until `shutdown`, then removes its row.
pub async fn run(
    db: DatabaseConnection,
    outages: Arc<Outages>,
    worker_id: uuid::Uuid,
    call_timeout: Duration,
    shutdown: CancellationToken,
) {
    let logs = LogGate::default();
    let mut last: Option<Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let current = outages.current();
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
        let reported = timed(
            call_timeout,
            "worker status report",
            db.execute_raw(stmt(
                "INSERT INTO bulk_worker_status (worker_id, waiting_for, since)
                 VALUES ($1, $2, clock_timestamp() - make_interval(secs => $3))
                 ON CONFLICT (worker_id) DO UPDATE
                   SET waiting_for = EXCLUDED.waiting_for, reported_at = clock_timestamp(),
                       since = LEAST(bulk_worker_status.since, EXCLUDED.since)",
                [worker_id.into(), deps.into(), longest.into()],
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
        db.execute_raw(stmt(
            "DELETE FROM bulk_worker_status WHERE worker_id = $1 OR reported_at < clock_timestamp() - interval '1 day'",
            [worker_id.into()],
        )),
    )
    .await;
}
