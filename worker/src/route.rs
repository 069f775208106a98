//! Where failed deliveries go: transient ones to a delayed retry queue of their lane (the
//! tier [`crate::retry::next_step`] picks), or, with their attempts spent, to the
//! dead-letter exchange; permanent ones to the dead-letter exchange at once; deliveries
//! that could not be handed on go back to their queue. The dead-letter watcher
//! ([`crate::deadletter`]) then records the dead-lettered items' failure. Nothing is
//! acknowledged before its copy is confirmed by the broker.

use std::time::Duration;

use bulkops_shared::amqp::Outgoing;
use bulkops_shared::batch::{Lane, reason};

use tracing::Instrument as _;

use crate::process::{Processor, Work};
use crate::retry::{self, Failure, Next};

impl Processor {
    /// Hands failed deliveries on: transient ones to a delayed retry queue (or, with their
    /// attempts spent, to the dead-letter queue); permanent ones to the dead-letter queue.
    pub(crate) async fn fail(&self, lane: Lane, works: Vec<Work>, failure: Failure) {
        match failure {
            Failure::Interrupted => self.settle(&works, Settle::Requeue).await,
            Failure::Permanent(class) => {
                self.dead_letter(lane, works, reason::ERROR, class.name())
                    .await;
            }
            Failure::Transient(class) => {
                let class = class.name();
                let mut delayed: Vec<(Work, usize)> = Vec::new();
                let mut exhausted = Vec::new();
                for w in works {
                    match retry::next_step(
                        w.attempt,
                        self.settings.max_attempts,
                        self.topology.retry_tiers(),
                    ) {
                        Next::Delay(tier) => delayed.push((w, tier)),
                        Next::GiveUp => exhausted.push(w),
                    }
                }
                if !exhausted.is_empty() {
                    self.dead_letter(lane, exhausted, reason::RETRIES_EXHAUSTED, class)
                        .await;
                }
                if delayed.is_empty() {
                    return;
                }
                let queues: Vec<String> = delayed
                    .iter()
                    .map(|(_, tier)| self.topology.retry_queue(lane, *tier))
                    .collect();
                let outgoing: Vec<Outgoing<'_>> = delayed
                    .iter()
                    .zip(&queues)
                    .map(|((w, _), queue)| Outgoing {
                        exchange: "",
                        routing_key: queue,
                        body: &w.delivery.data,
                        properties: w.delivery.properties.clone().with_headers(
                            retry::next_headers(
                                w.delivery.properties.headers().as_ref(),
                                w.attempt,
                                class,
                                None,
                            ),
                        ),
                        mandatory: true,
                    })
                    .collect();
                let settle = match self.publisher.publish_all(outgoing).await {
                    Ok(_) => {
                        for (w, _) in &delayed {
                            self.metrics
                                .retries
                                .with_label_values(&[w.msg.op.kind().label(), "delayed"])
                                .inc();
                        }
                        Settle::Ack
                    }
                    Err(e) => {
                        if let Some(held) = self.logs.admit("publish_retries") {
                            tracing::warn!(error = %e, repeats_since_last_line = held, "could not publish retries; returning the messages to the queue");
                        }
                        Settle::Requeue
                    }
                };
                let works: Vec<Work> = delayed.into_iter().map(|(w, _)| w).collect();
                self.settle(&works, settle).await;
            }
        }
    }

    /// Sends copies of `works` to the dead-letter exchange with their history and `reason`,
    /// then acknowledges them. The dead-letter watcher records the items' failure.
    pub(crate) async fn dead_letter(
        &self,
        lane: Lane,
        works: Vec<Work>,
        reason: &str,
        class: &str,
    ) {
        let dlx = self.topology.dead_letter_exchange();
        let queue = self.topology.work_queue(lane);
        let outgoing: Vec<Outgoing<'_>> = works
            .iter()
            .map(|w| Outgoing {
                exchange: &dlx,
                routing_key: &queue,
                body: &w.delivery.data,
                properties: w
                    .delivery
                    .properties
                    .clone()
                    .with_headers(retry::next_headers(
                        w.delivery.properties.headers().as_ref(),
                        w.attempt,
                        class,
                        Some(reason),
                    )),
                mandatory: true,
            })
            .collect();
        let settle = match self.publisher.publish_all(outgoing).await {
            Ok(n) => {
                self.metrics
                    .dead_lettered
                    .with_label_values(&[reason])
                    .inc_by(n as u64);
                for w in &works {
                    tracing::warn!(seq = w.msg.seq, reason, class, "item dead-lettered");
                }
                Settle::Ack
            }
            Err(e) => {
                if let Some(held) = self.logs.admit("publish_dead_letters") {
                    tracing::warn!(error = %e, repeats_since_last_line = held, "could not dead-letter; returning the messages to the queue");
                }
                Settle::Requeue
            }
        };
        self.settle(&works, settle).await;
    }

    /// Settles deliveries of one channel: acks in one frame where the tracker allows.
    pub(crate) async fn settle(&self, works: &[Work], how: Settle) {
        let Some(first) = works.first() else { return };
        let tracker = &first.tracker;
        match how {
            Settle::Ack => {
                let tags: Vec<u64> = works.iter().map(|w| w.delivery.delivery_tag).collect();
                tracker
                    .ack(&tags)
                    .instrument(tracing::info_span!("worker.ack", items = tags.len()))
                    .await;
            }
            Settle::Requeue => {
                // Give the failing dependency a moment before the messages come round again.
                tokio::time::sleep(Duration::from_millis(200)).await;
                for w in works {
                    tracker.requeue(w.delivery.delivery_tag).await;
                }
            }
        }
    }
}

/// How a delivery is settled with the broker.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Settle {
    /// Done (committed, or handed on to a retry or dead-letter queue).
    Ack,
    /// Back to the queue (nothing could be done now).
    Requeue,
}
