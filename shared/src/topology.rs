//! AMQP names and their idempotent declaration.
//!
//! Every queue and internal exchange name starts with `amqp.prefix`:
//!
//! | name | kind | purpose |
//! |---|---|---|
//! | `{p}.work.bulk` | quorum queue | per-record messages of large batches |
//! | `{p}.work.interactive` | quorum queue | per-record messages of small batches (served first) |
//! | `{p}.retry.{lane}.{tier}` | quorum queue, message TTL | delayed retry; dead-letters back to the lane's work queue |
//! | `{p}.dlx` | fanout exchange | dead-letter exchange of the work queues |
//! | `{p}.dead` | quorum queue | dead-lettered messages, kept for operators (`bulkops dlq`) |
//! | `{p}.dead.watch` | quorum queue | the same messages, consumed by workers to record the item's failure |
//! | `amqp.events_exchange` | topic exchange | the CRM's workflow events |
//!
//! Work queues carry an explicit `x-delivery-limit` and dead-letter exchange so that a
//! message that keeps crashing its consumers ends in `{p}.dead` instead of being dropped.
//! Delayed retries use one TTL queue per delay tier (a queue with mixed TTLs would hold
//! short delays behind long ones), which works on RabbitMQ 3.10 and 4.x alike and needs
//! no plugin. Dead-lettering uses the at-least-once strategy, so the broker does not drop
//! a message on its way to the dead-letter queue.
//!
//! Declaring is idempotent: every process declares the whole topology when it connects.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::batch::Lane;

/// All the names and queue arguments, derived from the configuration.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    events_exchange: String,
    delivery_limit: u32,
    retry_delays: Vec<Duration>,
}

impl Topology {
    /// The topology for a prefix, events exchange, delivery limit and retry tiers.
    pub fn new(
        prefix: impl Into<String>,
        events_exchange: impl Into<String>,
        delivery_limit: u32,
        retry_delays: Vec<Duration>,
    ) -> Self {
        Self {
            prefix: prefix.into(),
            events_exchange: events_exchange.into(),
            delivery_limit,
            retry_delays,
        }
    }

    /// The topology the configuration describes.
    pub fn from_settings(s: &crate::config::Settings) -> Self {
        Self::new(
            s.amqp.prefix.clone(),
            s.amqp.events_exchange.clone(),
            s.amqp.delivery_limit,
            s.worker.retry_delays(),
        )
    }

    /// The prefix every name starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The work queue of a lane.
    pub fn work_queue(&self, lane: Lane) -> String {
        format!("{}.work.{}", self.prefix, lane.as_str())
    }

    /// Number of retry tiers.
    pub fn retry_tiers(&self) -> usize {
        self.retry_delays.len()
    }

    /// The retry queue of a lane and tier (1-based; clamped to the last tier).
    pub fn retry_queue(&self, lane: Lane, tier: usize) -> String {
        let tier = tier.clamp(1, self.retry_delays.len().max(1));
        format!("{}.retry.{}.{}", self.prefix, lane.as_str(), tier)
    }

    /// The dead-letter exchange.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }

    /// Where dead letters are kept for operators.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// Where workers learn of dead letters, to record the item's failure.
    pub fn dead_watch_queue(&self) -> String {
        format!("{}.dead.watch", self.prefix)
    }

    /// The CRM's events exchange.
    pub fn events_exchange(&self) -> &str {
        &self.events_exchange
    }

    /// Every queue this topology declares (for metrics, tests and clean-up).
    pub fn all_queues(&self) -> Vec<String> {
        let mut queues: Vec<String> = Lane::ALL.iter().map(|l| self.work_queue(*l)).collect();
        for lane in Lane::ALL {
            for tier in 1..=self.retry_delays.len() {
                queues.push(self.retry_queue(lane, tier));
            }
        }
        queues.push(self.dead_queue());
        queues.push(self.dead_watch_queue());
        queues
    }

    /// Declares exchanges, queues and bindings. Safe to call any number of times.
    ///
    /// # Errors
    /// A broker error, for example when a queue exists with other arguments.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.events_exchange.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange().into(),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        for queue in [self.dead_queue(), self.dead_watch_queue()] {
            // Listing the dead letters (read, then returned) and a watcher waiting out a
            // database outage return messages many times; RabbitMQ 4 would drop a quorum
            // queue's message after 20 returns without an explicit, generous limit.
            let mut args = quorum_args();
            args.insert("x-delivery-limit".into(), AMQPValue::LongInt(1_000_000));
            declare_queue(channel, &queue, args).await?;
            channel
                .queue_bind(
                    queue.into(),
                    self.dead_letter_exchange().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        for lane in Lane::ALL {
            let mut args = quorum_args();
            dead_letter_to(&mut args, &self.dead_letter_exchange(), None);
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(i32::try_from(self.delivery_limit).unwrap_or(i32::MAX)),
            );
            declare_queue(channel, &self.work_queue(lane), args).await?;
            for (i, delay) in self.retry_delays.iter().enumerate() {
                let mut args = quorum_args();
                dead_letter_to(&mut args, "", Some(&self.work_queue(lane)));
                args.insert(
                    "x-message-ttl".into(),
                    AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
                );
                declare_queue(channel, &self.retry_queue(lane, i + 1), args).await?;
            }
        }
        Ok(())
    }
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> lapin::Result<()> {
    channel
        .queue_declare(
            ShortString::from(name),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map(|_| ())
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args
}

/// At-least-once dead-lettering (RabbitMQ ≥ 3.10) needs `reject-publish` overflow; without
/// it the broker silently falls back to at-most-once.
fn dead_letter_to(args: &mut FieldTable, exchange: &str, routing_key: Option<&str>) {
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(exchange)),
    );
    if let Some(key) = routing_key {
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(key)),
        );
    }
    args.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString(LongString::from("at-least-once")),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        Topology::new(
            "bulkops",
            "crm.events",
            20,
            vec![Duration::from_secs(1), Duration::from_secs(5)],
        )
    }

    #[test]
    fn every_name_starts_with_the_prefix() {
        let t = topology();
        for q in t.all_queues() {
            assert!(q.starts_with("bulkops."), "{q}");
        }
        assert!(t.dead_letter_exchange().starts_with("bulkops."));
        assert_eq!(t.work_queue(Lane::Bulk), "bulkops.work.bulk");
        assert_eq!(
            t.retry_queue(Lane::Interactive, 2),
            "bulkops.retry.interactive.2"
        );
        assert_eq!(t.all_queues().len(), 2 + 4 + 2);
    }

    #[test]
    fn retry_tiers_clamp_to_the_last() {
        let t = topology();
        assert_eq!(t.retry_queue(Lane::Bulk, 0), "bulkops.retry.bulk.1");
        assert_eq!(t.retry_queue(Lane::Bulk, 9), "bulkops.retry.bulk.2");
    }
}
