//! Periodic gauges a dashboard and an autoscaler read: progress of active batches (removed
//! once a batch completes), active batches per kind, the backlog of each lane, queue depths
//! (every shard) and the outbox backlog.
//!
//! The autoscaler's figure is the lane backlog, items without an outcome, read from the
//! database: a queue's depth over AMQP counts ready messages only, so a busy queue whose
//! messages sit prefetched in workers (1,000 unacknowledged per worker by default) reads 0
//! and an autoscaler would scale the workers down mid-batch (kedacore/keda#356). The
//! backlog counts those, the messages of every shard, those waiting in a retry tier and
//! the items the metered splitter has not published yet, and needs no management API.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bulkops_shared::amqp::{AmqpLink, with_timeout};
use bulkops_shared::db::stmt;
use bulkops_shared::metrics::ProducerMetrics;
use bulkops_shared::topology::Topology;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use tokio_util::sync::CancellationToken;

/// How often the gauges are refreshed.
const PERIOD: Duration = Duration::from_secs(5);
/// Most active batches exported one by one (the rest are still counted per kind).
const MAX_BATCH_SERIES: i64 = 200;

/// Refreshes the gauges until `shutdown`.
pub async fn run(
    db: DatabaseConnection,
    link: Arc<AmqpLink>,
    topology: Topology,
    metrics: ProducerMetrics,
    call_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut exported: HashSet<(String, String)> = HashSet::new();
    loop {
        if let Err(e) = bulkops_shared::db::timed(
            call_timeout,
            "batch gauges",
            batches(&db, &metrics, &mut exported),
        )
        .await
        {
            tracing::debug!(error = %e, "batch gauges not refreshed");
        }
        queues(&link, &topology, &metrics).await;
        match bulkops_shared::db::timed(
            call_timeout,
            "outbox gauges",
            bulkops_shared::outbox::backlog(&db),
        )
        .await
        {
            Ok((n, age)) => {
                metrics.outbox_backlog.set(n);
                metrics.outbox_oldest_age.set(age);
            }
            Err(e) => tracing::debug!(error = %e, "outbox gauges not refreshed"),
        }
        if !bulkops_shared::shutdown::sleep(&shutdown, PERIOD).await {
            return;
        }
    }
}

async fn batches(
    db: &DatabaseConnection,
    metrics: &ProducerMetrics,
    exported: &mut HashSet<(String, String)>,
) -> Result<(), sea_orm::DbErr> {
    let rows = db
        .query_all_raw(stmt(
            "SELECT id, kind, total, n_created + n_converted + n_skipped + n_failed AS done
               FROM bulk_batches WHERE completed_at IS NULL ORDER BY id",
            [],
        ))
        .await?;
    let backlog = db
        .query_all_raw(stmt(
            "SELECT lane, sum(total - n_created - n_converted - n_skipped - n_failed)::bigint AS n
               FROM bulk_batches WHERE completed_at IS NULL GROUP BY lane",
            [],
        ))
        .await?;
    let mut by_lane = std::collections::HashMap::<String, i64>::new();
    for r in &backlog {
        let lane: String = r.try_get("", "lane")?;
        let n: Option<i64> = r.try_get("", "n")?;
        by_lane.insert(lane, n.unwrap_or(0));
    }
    for lane in bulkops_shared::batch::Lane::ALL {
        metrics
            .lane_backlog
            .with_label_values(&[lane.as_str()])
            .set(by_lane.get(lane.as_str()).copied().unwrap_or(0));
    }
    let mut active_by_kind = std::collections::HashMap::<String, i64>::new();
    let mut now: HashSet<(String, String)> = HashSet::new();
    for (i, r) in rows.iter().enumerate() {
        let id: i64 = r.try_get("", "id")?;
        let kind: String = r.try_get("", "kind")?;
        let label = bulkops_shared::batch::BatchKind::parse(&kind)
            .map(|k| k.label())
            .unwrap_or("unknown")
            .to_owned();
        *active_by_kind.entry(label.clone()).or_default() += 1;
        if i64::try_from(i).unwrap_or(i64::MAX) >= MAX_BATCH_SERIES {
            continue;
        }
        let key = (id.to_string(), label);
        metrics
            .batch_items
            .with_label_values(&[&key.0, &key.1])
            .set(r.try_get("", "total")?);
        metrics
            .batch_items_done
            .with_label_values(&[&key.0, &key.1])
            .set(r.try_get("", "done")?);
        now.insert(key);
    }
    for gone in exported.difference(&now) {
        let _ = metrics.batch_items.remove_label_values(&[&gone.0, &gone.1]);
        let _ = metrics
            .batch_items_done
            .remove_label_values(&[&gone.0, &gone.1]);
    }
    *exported = now;
    for kind in ["create", "convert"] {
        metrics
            .batches_active
            .with_label_values(&[kind])
            .set(active_by_kind.get(kind).copied().unwrap_or(0));
    }
    Ok(())
}

/// A queue's `queue` label: its name without the prefix (`work.bulk`, `dead`, …).
pub fn queue_label<'a>(topology: &Topology, queue: &'a str) -> &'a str {
    queue
        .strip_prefix(topology.prefix())
        .unwrap_or(queue)
        .trim_start_matches('.')
}

async fn queues(link: &AmqpLink, topology: &Topology, metrics: &ProducerMetrics) {
    let channel = match link.channel().await {
        Ok(ch) => ch,
        Err(e) => {
            tracing::debug!(error = %e, "queue gauges not refreshed");
            return;
        }
    };
    // Declaring is idempotent; it makes the passive reads below find every queue even on a
    // broker nothing has published to yet.
    if let Err(e) = with_timeout(link.timeout(), topology.declare(&channel)).await {
        tracing::debug!(error = %e, "queue gauges not refreshed");
        return;
    }
    for queue in topology.all_queues() {
        match link.queue_state(&channel, &queue).await {
            Ok(q) => {
                let short = queue_label(topology, &queue);
                metrics
                    .queue_messages
                    .with_label_values(&[short])
                    .set(i64::from(q.message_count()));
                metrics
                    .queue_consumers
                    .with_label_values(&[short])
                    .set(i64::from(q.consumer_count()));
            }
            // A passive declare of a missing queue closes the channel; the topology is
            // declared by the splitter's publisher, so try again next period.
            Err(_) => break,
        }
    }
    let _ = channel.close(200, "done".into()).await;
}
