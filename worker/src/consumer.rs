//! Consuming a lane's work queue: prefetch set explicitly, bounded concurrency, natural
//! batching, reconnection, and a bounded drain on shutdown.
//!
//! Deliveries accumulate while every processing slot is busy, so under load each chunk
//! carries up to `worker.chunk_size` messages (paying a transaction's fixed costs once for
//! all of them), and on an idle system a lone message is processed at once. After a broker
//! error the consumer rebuilds its channel, re-declares the topology, re-applies the
//! prefetch and consumes again; deliveries in hand on the dead channel are redelivered by
//! the broker and processed idempotently.

use std::sync::Arc;
use std::time::Duration;

use bulkops_shared::amqp::{AmqpLink, reconnect_backoff, with_timeout};
use bulkops_shared::batch::Lane;
use bulkops_shared::topology::Topology;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acks::AckTracker;
use crate::process::Processor;

/// How one lane is consumed.
#[derive(Debug, Clone)]
pub struct LaneConfig {
    /// The lane.
    pub lane: Lane,
    /// Chunks processed at once.
    pub concurrency: usize,
    /// Most deliveries per chunk.
    pub chunk_size: usize,
    /// basic.qos prefetch count.
    pub prefetch: u16,
    /// Longest wait for chunks in hand at shutdown.
    pub drain_timeout: Duration,
}

/// Consumes the lane until `shutdown`, then drains: stops taking messages, returns those not
/// yet started to the queue, and waits (bounded) for the chunks in hand.
pub async fn run(
    link: Arc<AmqpLink>,
    topology: Topology,
    processor: Arc<Processor>,
    cfg: LaneConfig,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(cfg.concurrency));
    let tasks = TaskTracker::new();
    let mut backoff = reconnect_backoff();
    let label = cfg.lane.as_str();
    while !shutdown.is_cancelled() {
        match consume(
            &link, &topology, &processor, &cfg, &slots, &tasks, &shutdown,
        )
        .await
        {
            Ok(()) => break,
            Err(e) => {
                processor
                    .metrics
                    .consumer_restarts
                    .with_label_values(&[label])
                    .inc();
                tracing::warn!(lane = label, error = %e, "consumer stopped; reconnecting");
                link.mark_broken().await;
                let pause = backoff.next().unwrap_or(Duration::from_secs(5));
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
    tasks.close();
    if tokio::time::timeout(cfg.drain_timeout, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            lane = label,
            "chunks still running at the drain deadline; the broker redelivers them"
        );
    }
}

#[allow(clippy::too_many_arguments)]
async fn consume(
    link: &AmqpLink,
    topology: &Topology,
    processor: &Arc<Processor>,
    cfg: &LaneConfig,
    slots: &Arc<Semaphore>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), bulkops_shared::amqp::AmqpError> {
    let channel = link.channel().await?;
    with_timeout(link.timeout(), topology.declare(&channel)).await?;
    // Per-consumer prefetch (global QoS is refused by quorum queues).
    with_timeout(
        link.timeout(),
        channel.basic_qos(cfg.prefetch, BasicQosOptions { global: false }),
    )
    .await?;
    let tag = format!(
        "bulkops-worker-{}-{}",
        cfg.lane.as_str(),
        uuid::Uuid::new_v4()
    );
    let mut consumer = with_timeout(
        link.timeout(),
        channel.basic_consume(
            topology.work_queue(cfg.lane).into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    tracing::info!(
        lane = cfg.lane.as_str(),
        prefetch = cfg.prefetch,
        "consuming"
    );
    let tracker = Arc::new(AckTracker::new(channel.clone(), processor.metrics.clone()));
    let inflight = processor
        .metrics
        .inflight
        .with_label_values(&[cfg.lane.as_str()]);
    let deliveries_total = processor
        .metrics
        .deliveries
        .with_label_values(&[cfg.lane.as_str()]);
    let mut buffer: Vec<Delivery> = Vec::with_capacity(cfg.chunk_size);
    loop {
        // Wait for the first delivery of the next chunk.
        if buffer.is_empty() {
            tokio::select! {
                () = shutdown.cancelled() => break,
                next = consumer.next() => match next {
                    Some(Ok(d)) => { deliveries_total.inc(); inflight.inc(); tracker.received(d.delivery_tag).await; buffer.push(d) }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(bulkops_shared::amqp::AmqpError::ConsumerEnded),
                },
            }
        }
        // Take whatever else is already here.
        while buffer.len() < cfg.chunk_size {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => {
                    deliveries_total.inc();
                    inflight.inc();
                    tracker.received(d.delivery_tag).await;
                    buffer.push(d);
                }
                Some(Some(Err(e))) => return Err(e.into()),
                _ => break,
            }
        }
        // Wait for a free slot, collecting more deliveries meanwhile.
        let permit = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break None,
                permit = slots.clone().acquire_owned() => break permit.ok(),
                next = consumer.next(), if buffer.len() < cfg.chunk_size => match next {
                    Some(Ok(d)) => { deliveries_total.inc(); inflight.inc(); tracker.received(d.delivery_tag).await; buffer.push(d) }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(bulkops_shared::amqp::AmqpError::ConsumerEnded),
                },
            }
        };
        let Some(permit) = permit else { break };
        let chunk = std::mem::take(&mut buffer);
        let processor = processor.clone();
        let lane = cfg.lane;
        let inflight = inflight.clone();
        let chunk_tracker = tracker.clone();
        tasks.spawn(async move {
            let n = chunk.len() as i64;
            processor.process(lane, chunk, chunk_tracker).await;
            inflight.sub(n);
            drop(permit);
        });
    }
    // Shutting down: stop deliveries, hand back what was not started.
    let _ = with_timeout(
        Duration::from_secs(2),
        channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
    )
    .await;
    for d in buffer.drain(..) {
        inflight.dec();
        tracker.requeue(d.delivery_tag).await;
    }
    Ok(())
}
