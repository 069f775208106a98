//! Consuming a lane's work queues: prefetch set explicitly, bounded concurrency, natural
//! batching, reconnection, and a bounded drain on shutdown.
//!
//! A sharded lane (`amqp.bulk_queues` > 1) is consumed on one channel with one consumer
//! per shard, their deliveries merged into one stream: delivery tags are per channel, so
//! one [`AckTracker`] still acknowledges many deliveries with one frame whichever shard
//! they came from, and the lane's concurrency slots are shared by all its shards. The
//! prefetch is per consumer (quorum queues refuse global QoS), so `amqp.prefetch` is
//! divided among the shards: a worker holds about as many unacknowledged deliveries per
//! lane whatever the number of shards.
//!
//! Deliveries accumulate while every processing slot is busy, so under load each chunk
//! carries up to `worker.chunk_size` messages (paying a transaction's fixed costs once for
//! all of them), and on an idle system a lone message is processed at once. A slot that
//! frees while another chunk is still in flight would otherwise start on the few
//! deliveries that arrived meanwhile: with two workers on a busy machine chunks shrank to
//! 40–150 deliveries, and their fixed costs took the CPU the work needed. Such a chunk
//! waits up to `worker.chunk_linger_ms` from its first delivery to fill (the bulk lane
//! only; the interactive lane has one slot, so it never waits). After a broker
//! error the consumer rebuilds its channel, re-declares the topology, re-applies the
//! prefetch and consumes again; deliveries in hand on the dead channel are redelivered by
//! the broker and processed idempotently. A consumer the broker cancels (a queue deleted
//! or unavailable; the stream ends) costs the channel only: the connection, which the
//! other lanes share, is kept when it is still up. A connection lost with its node is
//! re-made to another node of the cluster ([`AmqpLink`]). A queue whose leader moves to
//! another node needs nothing: the channel's node follows the new leader, and deliveries
//! and acks carry on.

use std::sync::Arc;
use std::time::Duration;

use bulkops_shared::amqp::{AmqpError, AmqpLink, with_timeout};
use bulkops_shared::backoff::Backoff;
use bulkops_shared::batch::Lane;
use bulkops_shared::topology::Topology;
use futures_util::stream::SelectAll;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

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
    /// Longest a chunk waits to fill while another is in flight (from its first delivery).
    pub linger: Duration,
    /// basic.qos prefetch count of the lane (divided among its shards).
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
    let mut backoff = Backoff::reconnect();
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
                // A consumer cancelled by the broker on a live connection costs the channel
                // only (closed in `consume`); anything else may have broken the connection.
                let cancelled = matches!(e, AmqpError::ConsumerEnded);
                if !cancelled || !link.refresh_health().await {
                    link.mark_broken().await;
                }
                if !bulkops_shared::shutdown::sleep(&shutdown, backoff.next_pause()).await {
                    break;
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

/// The prefetch of each of a lane's `shards` consumers: the lane's prefetch divided among
/// them, at least 1.
pub fn prefetch_per_shard(prefetch: u16, shards: usize) -> u16 {
    let shards = u16::try_from(shards.max(1)).unwrap_or(u16::MAX);
    prefetch.div_ceil(shards).max(1)
}

async fn consume(
    link: &AmqpLink,
    topology: &Topology,
    processor: &Arc<Processor>,
    cfg: &LaneConfig,
    slots: &Arc<Semaphore>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), AmqpError> {
    let channel = link.channel().await?;
    let result = consume_on(
        &channel, link, topology, processor, cfg, slots, tasks, shutdown,
    )
    .await;
    if matches!(result, Err(AmqpError::ConsumerEnded)) {
        // The other shards' consumers of this channel would keep deliveries nobody reads:
        // closing the channel returns them (and those in hand) to their queues.
        let _ = with_timeout(
            Duration::from_secs(2),
            channel.close(200, "consumer cancelled; re-consuming".into()),
        )
        .await;
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn consume_on(
    channel: &lapin::Channel,
    link: &AmqpLink,
    topology: &Topology,
    processor: &Arc<Processor>,
    cfg: &LaneConfig,
    slots: &Arc<Semaphore>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), AmqpError> {
    let queues = topology.work_queues(cfg.lane);
    let prefetch = prefetch_per_shard(cfg.prefetch, queues.len());
    // Set before any shard's consumer starts, so it applies to every shard's.
    link.prepare_consuming(channel, topology, prefetch).await?;
    let mut tags = Vec::with_capacity(queues.len());
    // Each shard's stream ends with a `None` item, so that one shard's consumer cancelled by
    // the broker is noticed (`SelectAll` alone would carry on with the others, and ends only
    // when all have).
    let mut consumer = SelectAll::new();
    for queue in &queues {
        let tag = format!("bulkops-worker-{queue}-{}", uuid::Uuid::new_v4());
        let shard = link.consume(channel, queue, &tag).await?;
        consumer.push(
            shard
                .map(Some)
                .chain(futures_util::stream::once(std::future::ready(None)))
                .boxed(),
        );
        tags.push(tag);
    }
    tracing::info!(
        lane = cfg.lane.as_str(),
        shards = queues.len(),
        prefetch,
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
    let received = |d: &Delivery| {
        deliveries_total.inc();
        inflight.inc();
        tracker.received(d.delivery_tag)
    };
    let mut buffer: Vec<Delivery> = Vec::with_capacity(cfg.chunk_size);
    // When the buffer's first delivery arrived: a chunk lingers from then, not from when a
    // slot freed, so no delivery waits longer than `linger` for lingering's sake.
    let mut first_at = tokio::time::Instant::now();
    loop {
        // Wait for the first delivery of the next chunk.
        if buffer.is_empty() {
            tokio::select! {
                () = shutdown.cancelled() => break,
                next = consumer.next() => {
                    let d = delivery(next)?;
                    first_at = tokio::time::Instant::now();
                    received(&d).await;
                    buffer.push(d);
                }
            }
        }
        // Take whatever else is already here.
        while buffer.len() < cfg.chunk_size {
            let Some(next) = consumer.next().now_or_never() else {
                break;
            };
            let d = delivery(next)?;
            received(&d).await;
            buffer.push(d);
        }
        // Wait for a free slot, collecting more deliveries meanwhile.
        let permit = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break None,
                permit = slots.clone().acquire_owned() => break permit.ok(),
                next = consumer.next(), if buffer.len() < cfg.chunk_size => {
                    let d = delivery(next)?;
                    received(&d).await;
                    buffer.push(d);
                }
            }
        };
        let Some(permit) = permit else { break };
        // This chunk holds a permit: any other permit taken is a chunk still in flight.
        let in_flight = cfg
            .concurrency
            .saturating_sub(slots.available_permits() + 1);
        if let Some(until) = linger_until(in_flight, buffer.len(), cfg, first_at) {
            while buffer.len() < cfg.chunk_size {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep_until(until) => break,
                    next = consumer.next() => {
                        let d = delivery(next)?;
                        received(&d).await;
                        buffer.push(d);
                    }
                }
            }
        }
        let chunk = std::mem::take(&mut buffer);
        let processor = processor.clone();
        let lane = cfg.lane;
        let inflight = inflight.clone();
        let chunk_tracker = tracker.clone();
        tasks.spawn(async move {
            let n = chunk.len() as i64;
            let span = crate::spans::chunk(lane, &chunk);
            processor
                .process(lane, chunk, chunk_tracker)
                .instrument(span)
                .await;
            inflight.sub(n);
            drop(permit);
        });
    }
    // Shutting down: stop deliveries, hand back what was not started.
    for tag in &tags {
        let _ = with_timeout(
            Duration::from_secs(2),
            channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
        )
        .await;
    }
    for d in buffer.drain(..) {
        inflight.dec();
        tracker.requeue(d.delivery_tag).await;
    }
    Ok(())
}

/// Until when a chunk about to start with `buffered` deliveries waits for more, or `None`
/// to start it now. It waits only while `in_flight` other chunks of the lane run (the
/// machine is busy, so a few deliveries would pay a whole transaction), only when it is
/// not full, and never past `linger` after its first delivery.
fn linger_until(
    in_flight: usize,
    buffered: usize,
    cfg: &LaneConfig,
    first_at: tokio::time::Instant,
) -> Option<tokio::time::Instant> {
    (in_flight > 0 && buffered < cfg.chunk_size && !cfg.linger.is_zero())
        .then(|| first_at + cfg.linger)
}

/// One item of the merged shard streams: a delivery, or why consuming must start over.
fn delivery(next: Option<Option<lapin::Result<Delivery>>>) -> Result<Delivery, AmqpError> {
    match next {
        Some(Some(Ok(d))) => Ok(d),
        Some(Some(Err(e))) => Err(e.into()),
        // A shard's consumer ended (cancelled by the broker), or all of them did.
        Some(None) | None => Err(AmqpError::ConsumerEnded),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lane_prefetch_is_divided_among_its_shards() {
        assert_eq!(prefetch_per_shard(1000, 1), 1000);
        assert_eq!(prefetch_per_shard(1000, 3), 334);
        assert_eq!(prefetch_per_shard(2, 3), 1);
        assert_eq!(prefetch_per_shard(0, 3), 1);
        assert_eq!(prefetch_per_shard(100, 0), 100);
    }

    #[test]
    fn a_shard_ending_restarts_consuming() {
        assert!(matches!(delivery(None), Err(AmqpError::ConsumerEnded)));
        assert!(matches!(
            delivery(Some(None)),
            Err(AmqpError::ConsumerEnded)
        ));
    }

    fn lane(chunk_size: usize, linger_ms: u64) -> LaneConfig {
        LaneConfig {
            lane: Lane::Bulk,
            concurrency: 2,
            chunk_size,
            linger: Duration::from_millis(linger_ms),
            prefetch: 1000,
            drain_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_chunk_lingers_only_while_another_is_in_flight_and_it_is_not_full() {
        let first = tokio::time::Instant::now();
        let cfg = lane(250, 50);
        // Idle: a lone delivery starts at once.
        assert_eq!(linger_until(0, 1, &cfg, first), None);
        // Busy and not full: until 50 ms after its first delivery, not after the slot freed.
        assert_eq!(
            linger_until(1, 40, &cfg, first),
            Some(first + Duration::from_millis(50))
        );
        // Full: nothing to wait for.
        assert_eq!(linger_until(1, 250, &cfg, first), None);
        // Lingering turned off.
        assert_eq!(linger_until(1, 40, &lane(250, 0), first), None);
    }
}
