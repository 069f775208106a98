//! Acknowledging many deliveries with one frame.
//!
//! Chunks finish out of order, so a chunk cannot simply `ack(multiple)` its highest tag:
//! that would also acknowledge an earlier chunk still in progress. The tracker keeps, per
//! channel, the tags delivered and not yet settled; when a chunk commits, its tags are
//! acknowledged with one `multiple` ack up to just below the oldest tag still in progress
//! (the rest follow when that one settles). Nacks and rejects go out one by one, at once.
//! Sends are serialised, so a later multiple ack never overtakes an earlier one.

use std::collections::BTreeSet;

use bulkops_shared::metrics::WorkerMetrics;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use tokio::sync::Mutex;

#[derive(Default)]
struct State {
    /// Delivered, not yet settled.
    in_progress: BTreeSet<u64>,
    /// Settled by an ack not yet sent (waiting for an earlier tag).
    to_ack: BTreeSet<u64>,
}

/// The acknowledgements of one channel.
pub struct AckTracker {
    channel: Channel,
    state: Mutex<State>,
    metrics: WorkerMetrics,
}

impl AckTracker {
    /// A tracker for `channel`.
    pub fn new(channel: Channel, metrics: WorkerMetrics) -> Self {
        Self {
            channel,
            state: Mutex::new(State::default()),
            metrics,
        }
    }

    /// Records a delivery received on the channel.
    pub async fn received(&self, tag: u64) {
        self.state.lock().await.in_progress.insert(tag);
    }

    /// Acknowledges `tags`, as far as earlier deliveries allow, in one frame.
    pub async fn ack(&self, tags: &[u64]) {
        let mut st = self.state.lock().await;
        for t in tags {
            if st.in_progress.remove(t) {
                st.to_ack.insert(*t);
            }
        }
        let watermark = st.in_progress.first().copied().unwrap_or(u64::MAX);
        let Some(upto) = st.to_ack.range(..watermark).next_back().copied() else {
            return;
        };
        st.to_ack = st.to_ack.split_off(&(upto + 1));
        let sent = bounded(
            self.channel
                .basic_ack(upto, BasicAckOptions { multiple: true }),
        )
        .await;
        if sent.is_err() {
            // The channel is gone: the broker redelivers, and processing again changes nothing.
            self.metrics.ack_failures.inc();
        }
    }

    /// Returns `tag` to the queue.
    pub async fn requeue(&self, tag: u64) {
        self.settle_one(tag, true).await;
    }

    /// Rejects `tag` without requeue (the queue dead-letters it).
    pub async fn reject(&self, tag: u64) {
        self.settle_one(tag, false).await;
    }

    async fn settle_one(&self, tag: u64, requeue: bool) {
        let mut st = self.state.lock().await;
        if !st.in_progress.remove(&tag) {
            return;
        }
        let sent = if requeue {
            bounded(self.channel.basic_nack(
                tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            ))
            .await
        } else {
            bounded(
                self.channel
                    .basic_reject(tag, BasicRejectOptions { requeue: false }),
            )
            .await
        };
        if sent.is_err() {
            self.metrics.ack_failures.inc();
        }
        // Acks held back behind this tag may go now.
        let watermark = st.in_progress.first().copied().unwrap_or(u64::MAX);
        if let Some(upto) = st.to_ack.range(..watermark).next_back().copied() {
            st.to_ack = st.to_ack.split_off(&(upto + 1));
            if bounded(
                self.channel
                    .basic_ack(upto, BasicAckOptions { multiple: true }),
            )
            .await
            .is_err()
            {
                self.metrics.ack_failures.inc();
            }
        }
    }
}

/// Longest an ack, nack or reject may take to leave: a stalled connection is noticed by
/// the heartbeat, but the settling chunk must not wait for that.
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A settling frame with [`SETTLE_TIMEOUT`]; a timeout counts as a failure (the broker
/// redelivers what was not settled, and processing again changes nothing).
async fn bounded(
    frame: impl std::future::Future<Output = lapin::Result<()>>,
) -> Result<(), bulkops_shared::amqp::AmqpError> {
    bulkops_shared::amqp::with_timeout(SETTLE_TIMEOUT, frame).await
}
