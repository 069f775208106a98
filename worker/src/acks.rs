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

impl State {
    /// Marks `tags` settled by an ack and returns the tag a `multiple` ack may now cover:
    /// the highest settled tag below the oldest one still in progress, if any. Tags not
    /// in progress (already settled, or never received) are ignored.
    fn acked(&mut self, tags: &[u64]) -> Option<u64> {
        for t in tags {
            if self.in_progress.remove(t) {
                self.to_ack.insert(*t);
            }
        }
        self.releasable()
    }

    /// Forgets `tag` (settled one by one: a nack or a reject). Returns whether it was in
    /// progress, and the `multiple` ack its settling releases, if any.
    fn settled_alone(&mut self, tag: u64) -> (bool, Option<u64>) {
        if !self.in_progress.remove(&tag) {
            return (false, None);
        }
        (true, self.releasable())
    }

    /// The highest settled tag below the watermark (the oldest tag in progress), removed
    /// with everything below it: one `multiple` ack covers them all.
    fn releasable(&mut self) -> Option<u64> {
        let watermark = self.in_progress.first().copied().unwrap_or(u64::MAX);
        let upto = self.to_ack.range(..watermark).next_back().copied()?;
        self.to_ack = self.to_ack.split_off(&(upto + 1));
        Some(upto)
    }
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
        // The lock is held across the send: sends are serialised (see the module docs).
        let mut st = self.state.lock().await;
        let Some(upto) = st.acked(tags) else {
            return;
        };
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
        let (was_in_progress, released) = st.settled_alone(tag);
        if !was_in_progress {
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
        if let Some(upto) = released
            && bounded(
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

#[cfg(test)]
mod tests {
    use super::State;

    fn received(tags: &[u64]) -> State {
        let mut st = State::default();
        st.in_progress.extend(tags);
        st
    }

    #[test]
    fn a_chunk_that_finishes_first_waits_for_the_earlier_one() {
        let mut st = received(&[1, 2, 3, 4, 5, 6]);
        // The second chunk (4..6) commits first: tag 1 is still in progress.
        assert_eq!(st.acked(&[4, 5, 6]), None);
        // The first commits: one multiple ack covers all six.
        assert_eq!(st.acked(&[1, 2, 3]), Some(6));
        assert!(st.to_ack.is_empty() && st.in_progress.is_empty());
    }

    #[test]
    fn the_ack_stops_just_below_the_oldest_tag_in_progress() {
        let mut st = received(&[1, 2, 3, 4, 5]);
        assert_eq!(st.acked(&[1, 2, 4]), Some(2));
        assert_eq!(st.to_ack.iter().copied().collect::<Vec<_>>(), vec![4]);
        assert_eq!(st.acked(&[3]), Some(4));
        assert_eq!(st.acked(&[5]), Some(5));
    }

    #[test]
    fn a_requeue_releases_the_acks_held_behind_it() {
        let mut st = received(&[1, 2, 3]);
        assert_eq!(st.acked(&[2, 3]), None);
        // Tag 1 goes back to the queue alone; 2 and 3 may then be acked together.
        assert_eq!(st.settled_alone(1), (true, Some(3)));
        // Settling it twice changes nothing.
        assert_eq!(st.settled_alone(1), (false, None));
    }

    #[test]
    fn tags_settled_twice_or_never_received_are_ignored() {
        let mut st = received(&[7, 8]);
        assert_eq!(st.acked(&[9]), None, "never received");
        assert_eq!(st.acked(&[7]), Some(7));
        assert_eq!(st.acked(&[7]), None, "already acked");
        assert_eq!(st.acked(&[8]), Some(8));
    }
}
