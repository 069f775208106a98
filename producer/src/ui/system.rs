//! What the overview shows of the system around the batches (operators only): queue
//! depths per lane and shard, workers' readiness, outbox lag and the dead-letter count.
//!
//! Queue depths are the ones this producer's monitor measured last (every 5 s, the values
//! of `bulkops_queue_messages`), for every queue of the [`Topology`], so the console adds
//! no broker traffic. Workers' readiness comes from `worker_status`, which every
//! worker writes every few seconds with its own readiness check (`worker/src/status.rs`):
//! the producer needs no address of any worker, and a worker that stopped writing shows as
//! not seen for so long. The outbox is read directly (a small table).

use bulkops_shared::db::stmt;
use bulkops_shared::topology::Topology;
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, FromQueryResult};

use super::views::{self, fmt_int};
use crate::monitor::queue_label;
use crate::state::AppState;

/// A worker whose heartbeat is older than this is shown as not seen.
const STALE_SECS: f64 = 15.0;
/// Workers not seen for longer are not listed.
const FORGET_MINUTES: i64 = 10;

/// One queue's depth.
#[derive(Debug, Clone)]
pub struct QueueDepth {
    /// Its name without the prefix (`work.bulk`, `retry.bulk.1`, `dead`, …).
    pub label: String,
    /// Messages ready.
    pub messages: i64,
    /// Consumers.
    pub consumers: i64,
}

/// Every queue of the topology with its last measured depth.
pub fn queues(state: &AppState, topology: &Topology) -> Vec<QueueDepth> {
    topology
        .all_queues()
        .iter()
        .map(|q| {
            let label = queue_label(topology, q).to_owned();
            QueueDepth {
                messages: state
                    .metrics
                    .queue_messages
                    .with_label_values(&[&label])
                    .get(),
                consumers: state
                    .metrics
                    .queue_consumers
                    .with_label_values(&[&label])
                    .get(),
                label,
            }
        })
        .collect()
}

/// Messages waiting in the dead-letter queue, as last measured.
pub fn dead_letters(state: &AppState, topology: &Topology) -> i64 {
    let dead = topology.dead_queue();
    state
        .metrics
        .queue_messages
        .with_label_values(&[queue_label(topology, &dead)])
        .get()
}

/// One worker's last heartbeat (read from its `worker_status` row by column name).
#[derive(Debug, Clone, FromQueryResult)]
pub struct Worker {
    /// Its host (the pod's name in Kubernetes).
    pub host: String,
    /// Its process id.
    pub pid: i32,
    /// Its version.
    pub version: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Seconds since its last heartbeat.
    #[sea_orm(from_alias = "silent")]
    pub silent_secs: f64,
    /// Its readiness check passed.
    pub ready: bool,
    /// Its broker links were up.
    pub broker: bool,
    /// Redis answered.
    pub redis: bool,
    /// Deliveries in hand.
    pub inflight: i64,
    /// It is draining after SIGTERM.
    pub draining: bool,
}

impl Worker {
    /// Its state in words.
    pub fn status(&self) -> (&'static str, String) {
        if self.silent_secs > STALE_SECS {
            return (
                "bad",
                format!(
                    "not seen for {} (gone, or cannot reach the database)",
                    views::fmt_duration(self.silent_secs)
                ),
            );
        }
        if self.draining {
            return ("warn", "draining (SIGTERM)".to_owned());
        }
        if self.ready {
            return ("ok", "ready".to_owned());
        }
        let mut down = Vec::new();
        if !self.broker {
            down.push("broker");
        }
        if !self.redis {
            down.push("Redis");
        }
        ("bad", format!("not ready: {} down", down.join(" and ")))
    }
}

/// The workers seen in the last minutes.
///
/// # Errors
/// Database errors.
pub async fn workers(db: &DatabaseConnection) -> Result<Vec<Worker>, DbErr> {
    let rows = db
        .query_all_raw(stmt(
            "SELECT host, pid, version, started_at, ready, broker, redis, inflight, draining,
                    EXTRACT(EPOCH FROM now() - seen_at)::float8 AS silent
               FROM worker_status
              WHERE seen_at > now() - $1 * interval '1 minute'
              ORDER BY host, started_at",
            [FORGET_MINUTES.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| Worker::from_query_result(r, ""))
        .collect()
}

/// The queues table.
pub fn queues_table(queues: &[QueueDepth], broker_up: bool) -> Markup {
    html! {
        @if !broker_up {
            p.warn { "This producer is not connected to the broker: the depths below are its last measurement." }
        }
        table #queues {
            thead { tr { th { "Queue" } th.num { "Ready" } th.num { "Consumers" } } }
            tbody {
                @for q in queues {
                    @let alert = (q.label == "dead" && q.messages > 0)
                        || (q.label.starts_with("work.") && q.messages > 0 && q.consumers == 0);
                    tr class=[alert.then_some("alert")] data-queue=(q.label) {
                        td { code { (q.label) } }
                        td.num { (fmt_int(q.messages)) }
                        td.num { (fmt_int(q.consumers)) }
                    }
                }
            }
        }
    }
}

/// The workers table.
pub fn workers_table(workers: &[Worker], now: DateTime<Utc>) -> Markup {
    html! {
        @if workers.is_empty() {
            p.warn #no-workers { "No worker has reported in the last " (FORGET_MINUTES) " minutes." }
        } @else {
            table #workers {
                thead { tr { th { "Worker" } th { "Status" } th.num { "In flight" } th { "Up" } th { "Version" } } }
                tbody {
                    @for w in workers {
                        @let (class, status) = w.status();
                        tr {
                            td { code { (w.host) } " (pid " (w.pid) ")" }
                            td { span class=(format!("status status-{class}")) { (status) } }
                            td.num { (fmt_int(w.inflight)) }
                            td { (views::fmt_duration((now - w.started_at).num_seconds() as f64)) }
                            td { (w.version) }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker() -> Worker {
        Worker {
            host: "w".into(),
            pid: 1,
            version: "0".into(),
            started_at: Utc::now(),
            silent_secs: 2.0,
            ready: true,
            broker: true,
            redis: true,
            inflight: 0,
            draining: false,
        }
    }

    #[test]
    fn a_worker_status_says_what_is_wrong() {
        assert_eq!(worker().status().1, "ready");
        let w = Worker {
            ready: false,
            redis: false,
            ..worker()
        };
        assert_eq!(w.status().1, "not ready: Redis down");
        let w = Worker {
            silent_secs: 40.0,
            ..worker()
        };
        assert!(
            w.status().1.starts_with("not seen for 40s"),
            "{:?}",
            w.status()
        );
        let w = Worker {
            draining: true,
            ..worker()
        };
        assert_eq!(w.status().0, "warn");
    }
}
