//! AMQP names and their idempotent declaration.
//!
//! Every queue and internal exchange name starts with `amqp.prefix`:
//!
//! | name | kind | purpose |
//! |---|---|---|
//! | `{p}.work.bulk` | quorum queue | per-record messages of large batches (shard 1 of the bulk lane) |
//! | `{p}.work.bulk.{i}` | quorum queue | shard `i` (2 ..= `amqp.bulk_queues`) of the bulk lane |
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
//!
//! # Shards
//! One quorum queue is one Raft group with one leader, and the leader does the work of
//! the queue (the followers only replicate), so one queue is a ceiling on a cluster.
//! `amqp.bulk_queues` shards the bulk lane: the splitter spreads each batch's messages over
//! the shards by item `seq`, every worker consumes every shard, and the shards' leaders land
//! on different nodes (see Placement). Shard 1 keeps the unsharded name `{p}.work.bulk` and shard `i ≥ 2`
//! is `{p}.work.bulk.{i}`: a deployment that goes from 1 to N shards keeps consuming the
//! queue its waiting messages are in, and `amqp.bulk_queues = 1` is exactly today's
//! topology.
//!
//! Retry tiers stay one queue per lane and tier, and return messages to the lane's shard
//! 1: retries are a trickle, every worker consumes shard 1 like any other, and 3 × N tier
//! queues would cost a Raft group each (memory, file handles, WAL) for no gain. Dead
//! letters of every shard go through the one fanout `{p}.dlx`.
//!
//! # Placement (RabbitMQ 3.10)
//! Checked against the installed 3.10.8. A new quorum queue's leader goes where
//! `x-queue-leader-locator` says: `client-local` (the default: the node the declaring
//! client is connected to) or `balanced` (the node with the fewest leaders while the
//! cluster has fewer than 1,000 queues, else random). Neither argument is used here:
//! - the argument takes part in the equivalence check of a re-declaration, both ways
//!   (`PRECONDITION_FAILED - inequivalent arg 'x-queue-leader-locator'`), so it cannot be
//!   added to a queue that exists without it, nor left out by an older process during a
//!   rolling upgrade;
//! - `balanced` counts the leaders of every queue of the cluster (other applications'
//!   too) at the moment of creation, and a fresh deployment's processes all declare the
//!   topology at once: on a 3-node test cluster, four clients declaring concurrently put
//!   the `balanced` shards 2 and 3 on shard 1's node or on one node in 3 rounds of 4.
//!
//! Instead every process, on its link's first connection, declares each bulk shard through
//! a connection to the shard's own node ([`Topology::shard_placement`], used by
//! [`crate::amqp::AmqpLink::with_placement`]) before declaring anything else, so that
//! whichever process comes first creates shard `i` `client-local` on node `i`. Queues that
//! exist stay where they are; the other queues (interactive lane, retry tiers, dead
//! letters: a trickle) are created `client-local` wherever the first process connected.
//! An operator may still set the policy key `queue-leader-locator` (policies take no part
//! in the equivalence check).
//!
//! Replicas: 3.10 gives a new quorum queue `quorum_cluster_size` members (default 3), one
//! per node on a 3-node cluster. `x-quorum-initial-group-size` is checked for equivalence
//! like the locator, so it is not set; larger clusters raise `quorum_cluster_size` or run
//! `rabbitmq-queues grow`. Leaders that moved after a node loss stay where they are until
//! `rabbitmq-queues rebalance quorum` (see docs/OPERATIONS.md).

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
    bulk_queues: u16,
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
            bulk_queues: 1,
        }
    }

    /// The same topology with the bulk lane sharded into `n` queues (at least 1).
    #[must_use]
    pub fn with_bulk_queues(mut self, n: u16) -> Self {
        self.bulk_queues = n.max(1);
        self
    }

    /// The topology the configuration describes.
    pub fn from_settings(s: &crate::config::Settings) -> Self {
        Self::new(
            s.amqp.prefix.clone(),
            s.amqp.events_exchange.clone(),
            s.amqp.delivery_limit,
            s.worker.retry_delays(),
        )
        .with_bulk_queues(s.amqp.bulk_queues)
    }

    /// The prefix every name starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The first (or only) work queue of a lane: where retries return to.
    pub fn work_queue(&self, lane: Lane) -> String {
        format!("{}.work.{}", self.prefix, lane.as_str())
    }

    /// How many queues a lane is sharded into.
    pub fn shards(&self, lane: Lane) -> usize {
        match lane {
            Lane::Bulk => usize::from(self.bulk_queues),
            Lane::Interactive => 1,
        }
    }

    /// Shard `i` (1-based) of a lane: shard 1 is [`Topology::work_queue`], shard `i ≥ 2`
    /// appends `.{i}`.
    pub fn work_shard(&self, lane: Lane, i: usize) -> String {
        if i <= 1 {
            self.work_queue(lane)
        } else {
            format!("{}.{i}", self.work_queue(lane))
        }
    }

    /// Every work queue of a lane, shard 1 first.
    pub fn work_queues(&self, lane: Lane) -> Vec<String> {
        (1..=self.shards(lane))
            .map(|i| self.work_shard(lane, i))
            .collect()
    }

    /// The shard an item's message goes to: consecutive items go to consecutive shards, so
    /// every chunk the splitter publishes is spread evenly.
    pub fn shard_for(&self, lane: Lane, seq: i64) -> usize {
        let n = i64::try_from(self.shards(lane)).unwrap_or(1).max(1);
        usize::try_from((seq - 1).rem_euclid(n)).unwrap_or(0) + 1
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

    /// The retry queues of a lane, tier 1 first.
    pub fn retry_queues(&self, lane: Lane) -> Vec<String> {
        (1..=self.retry_delays.len())
            .map(|tier| self.retry_queue(lane, tier))
            .collect()
    }

    /// Every queue this topology declares (for metrics, tests and clean-up).
    pub fn all_queues(&self) -> Vec<String> {
        let mut queues: Vec<String> = Lane::ALL
            .iter()
            .flat_map(|l| self.work_queues(*l))
            .collect();
        for lane in Lane::ALL {
            for tier in 1..=self.retry_delays.len() {
                queues.push(self.retry_queue(lane, tier));
            }
        }
        queues.push(self.dead_queue());
        queues.push(self.dead_watch_queue());
        queues
    }

    /// The arguments of every work queue (every shard alike).
    fn work_args(&self) -> FieldTable {
        let mut args = quorum_args();
        dead_letter_to(&mut args, &self.dead_letter_exchange(), None);
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(i32::try_from(self.delivery_limit).unwrap_or(i32::MAX)),
        );
        args
    }

    /// Which of `nodes` nodes each bulk shard is placed on: shard `i` (1-based) on node
    /// `(i - 1) mod nodes`, in `amqp.urls` order, so `N ≤ nodes` shards get a node each.
    pub fn shard_placement(&self, nodes: usize) -> Vec<(String, usize)> {
        self.work_queues(Lane::Bulk)
            .into_iter()
            .enumerate()
            .map(|(i, q)| (q, i % nodes.max(1)))
            .collect()
    }

    /// Declares one bulk shard (on a channel of the node that is to lead it). Idempotent;
    /// an existing queue stays where it is.
    ///
    /// # Errors
    /// A broker error.
    pub async fn declare_work_queue(&self, channel: &Channel, queue: &str) -> lapin::Result<()> {
        declare_queue(channel, queue, self.work_args()).await
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
            for queue in self.work_queues(lane) {
                declare_queue(channel, &queue, self.work_args()).await?;
            }
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
        assert_eq!(t.work_queues(Lane::Bulk), vec!["bulkops.work.bulk"]);
    }

    #[test]
    fn shards_keep_the_first_name_and_spread_items_evenly() {
        let t = topology().with_bulk_queues(3);
        assert_eq!(
            t.work_queues(Lane::Bulk),
            vec![
                "bulkops.work.bulk",
                "bulkops.work.bulk.2",
                "bulkops.work.bulk.3"
            ]
        );
        assert_eq!(
            t.work_queues(Lane::Interactive),
            vec!["bulkops.work.interactive"]
        );
        assert_eq!(t.all_queues().len(), 4 + 4 + 2);
        let mut per_shard = [0; 3];
        for seq in 1..=3000 {
            per_shard[t.shard_for(Lane::Bulk, seq) - 1] += 1;
        }
        assert_eq!(per_shard, [1000, 1000, 1000]);
        assert_eq!(t.shard_for(Lane::Interactive, 7), 1);
        assert_eq!(t.shard_for(Lane::Bulk, 0), 3, "never out of range");
        assert_eq!(
            t.shard_placement(3)
                .iter()
                .map(|(_, n)| *n)
                .collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(
            t.shard_placement(2)
                .iter()
                .map(|(_, n)| *n)
                .collect::<Vec<_>>(),
            vec![0, 1, 0]
        );
        // Retries of every shard return to shard 1.
        assert_eq!(t.retry_queues(Lane::Bulk).len(), 2);
        assert_eq!(topology().with_bulk_queues(0).shards(Lane::Bulk), 1);
    }

    #[test]
    fn retry_tiers_clamp_to_the_last() {
        let t = topology();
        assert_eq!(t.retry_queue(Lane::Bulk, 0), "bulkops.retry.bulk.1");
        assert_eq!(t.retry_queue(Lane::Bulk, 9), "bulkops.retry.bulk.2");
    }
}
