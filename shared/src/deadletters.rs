//! The dead-letter queue for operators: what is in it and why, and replaying it once the
//! cause is fixed. `bulkops dlq` and the operator console both go through these functions,
//! so a replay means the same thing wherever it is started.
//!
//! Reading takes messages with `basic.get` on a channel of its own and gives every message
//! it does not act on back when it is done (explicitly, and by closing the channel, which
//! returns whatever is still unacknowledged even when an error cut the scan short).
//!
//! Replaying a message gives its item a real outcome: in one transaction the item goes
//! back from `failed` to `pending` (its failure is taken off the batch's counters, and a
//! completed batch is reopened), then the message is published to its batch's work queue
//! with a fresh attempt budget, and only then removed from the dead-letter queue. A batch
//! reopened this way completes again, and announces it again with a new
//! `bulk_batch.completed` event. A message whose item already has another outcome (a
//! duplicate succeeded) is removed; messages that name no item (not JSON, unknown version)
//! stay where they are.
//!
//! What is shown of a message is its ids and headers (the reason, the attempt history of
//! error classes and SQLSTATEs, the broker's own reason): work messages carry ids only.

use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Acker, Channel};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, TransactionTrait};

use crate::amqp::{
    AmqpError, AmqpLink, Outgoing, Publisher, headers, json_properties, with_timeout,
};
use crate::batch::Lane;
use crate::db::stmt;
use crate::ids::BatchId;
use crate::messages::WorkMessage;
use crate::topology::Topology;

/// Header naming why the worker dead-lettered a message.
pub const REASON_HEADER: &str = crate::messages::headers::REASON;
/// Header counting the deliveries a message had.
pub const ATTEMPTS_HEADER: &str = crate::messages::headers::ATTEMPTS;
/// Header listing `attempt:class` of every try, oldest first.
pub const HISTORY_HEADER: &str = crate::messages::headers::HISTORY;
/// The broker's own dead-lettering record.
pub const DEATH_HEADER: &str = crate::messages::headers::DEATH;

/// Why reading or replaying the dead-letter queue failed. Messages not yet replayed stay
/// in the queue.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The broker failed or did not answer.
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] DbErr),
}

/// One dead-lettered message as operators see it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The work message, or why it could not be read.
    pub message: Result<WorkMessage, String>,
    /// `x-bulkops-reason` (empty when absent).
    pub reason: String,
    /// `x-attempts`.
    pub attempts: String,
    /// `x-attempt-history`.
    pub history: String,
    /// The reason of the broker's first `x-death` entry (`rejected`, `delivery_limit`, …).
    pub broker_reason: String,
}

impl DeadLetter {
    fn read(data: &[u8], table: Option<&FieldTable>) -> Self {
        Self {
            message: WorkMessage::decode(data).map_err(|e| e.to_string()),
            reason: header(table, REASON_HEADER),
            attempts: header(table, ATTEMPTS_HEADER),
            history: header(table, HISTORY_HEADER),
            broker_reason: header(table, DEATH_HEADER),
        }
    }

    /// Whether it names an item of `batch`.
    pub fn is_of(&self, batch: BatchId) -> bool {
        self.message.as_ref().is_ok_and(|m| m.batch_id == batch)
    }
}

/// What [`list`] found.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Messages in the queue when the scan began.
    pub depth: u32,
    /// Messages read (at most the scan limit).
    pub scanned: u32,
    /// The selected ones, in queue order.
    pub letters: Vec<DeadLetter>,
}

/// What [`replay`] did.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    /// Messages in the queue when the replay began.
    pub depth: u32,
    /// Messages read.
    pub scanned: u32,
    /// Items put back to pending and republished: (batch, seq).
    pub replayed: Vec<(BatchId, i64)>,
    /// Selected messages removed because their item already had another outcome.
    pub dropped: usize,
    /// Messages read but not selected (or unreadable), given back.
    pub kept: usize,
}

/// A header's value as text.
pub fn header(table: Option<&FieldTable>, name: &str) -> String {
    match table.and_then(|t| t.inner().get(name)) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        Some(AMQPValue::LongLongInt(n)) => n.to_string(),
        Some(AMQPValue::LongInt(n)) => n.to_string(),
        Some(AMQPValue::FieldArray(a)) => {
            // x-death: the broker's own record; its first entry's reason says why.
            a.as_slice()
                .first()
                .and_then(|v| match v {
                    AMQPValue::FieldTable(t) => match t.inner().get("reason") {
                        Some(AMQPValue::LongString(r)) => {
                            Some(String::from_utf8_lossy(r.as_bytes()).into_owned())
                        }
                        _ => None,
                    },
                    _ => None,
                })
                .unwrap_or_default()
        }
        _ => String::new(),
    }
}

/// A channel reading the dead-letter queue; closing it returns what it still holds.
struct Scan {
    channel: Channel,
    queue: String,
    timeout: Duration,
    depth: u32,
    returned: Vec<Acker>,
}

impl Scan {
    async fn open(link: &AmqpLink, topology: &Topology) -> Result<Self, AmqpError> {
        let channel = link.channel().await?;
        let timeout = link.timeout();
        let opened = async {
            with_timeout(timeout, topology.declare(&channel)).await?;
            let q = with_timeout(
                timeout,
                channel.queue_declare(
                    topology.dead_queue().as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await?;
            Ok::<u32, AmqpError>(q.message_count())
        }
        .await;
        match opened {
            Ok(depth) => Ok(Self {
                channel,
                queue: topology.dead_queue(),
                timeout,
                depth,
                returned: Vec::new(),
            }),
            Err(e) => {
                let _ = tokio::time::timeout(timeout, channel.close(200, "done".into())).await;
                Err(e)
            }
        }
    }

    /// The next message, unacknowledged.
    async fn next(&self) -> Result<Option<lapin::message::BasicGetMessage>, AmqpError> {
        with_timeout(
            self.timeout,
            self.channel
                .basic_get(self.queue.as_str().into(), BasicGetOptions::default()),
        )
        .await
    }

    async fn ack(&self, acker: &Acker) -> Result<(), AmqpError> {
        with_timeout(self.timeout, acker.ack(BasicAckOptions::default()))
            .await
            .map(|_| ())
    }

    /// Gives back every message kept, then closes the channel (which returns anything
    /// still unacknowledged). Best effort: a message not returned comes back anyway when
    /// the channel or connection closes.
    async fn close(self) {
        for acker in &self.returned {
            let _ = tokio::time::timeout(
                self.timeout,
                acker.nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                }),
            )
            .await;
        }
        let _ = tokio::time::timeout(self.timeout, self.channel.close(200, "done".into())).await;
    }
}

/// Reads up to `limit` dead-lettered messages (those in the queue when it starts) and
/// returns the ones `select` keeps; every message read is given back.
///
/// # Errors
/// Broker errors.
pub async fn list(
    link: &AmqpLink,
    topology: &Topology,
    select: impl Fn(&DeadLetter) -> bool,
    limit: u32,
) -> Result<Listing, DeadLetterError> {
    let mut scan = Scan::open(link, topology).await?;
    let mut listing = Listing {
        depth: scan.depth,
        ..Listing::default()
    };
    let result = async {
        for _ in 0..scan.depth.min(limit) {
            let Some(m) = scan.next().await? else {
                break;
            };
            listing.scanned += 1;
            let d = &m.delivery;
            let letter = DeadLetter::read(&d.data, d.properties.headers().as_ref());
            scan.returned.push(d.acker.clone());
            if select(&letter) {
                listing.letters.push(letter);
            }
        }
        Ok::<(), DeadLetterError>(())
    }
    .await;
    scan.close().await;
    result.map(|()| listing)
}

/// Puts a failed item back to pending (reopening its batch). Returns the batch's lane, or
/// `None` when the item is not failed (already decided otherwise, or unknown).
async fn reopen(db: &DatabaseConnection, msg: &WorkMessage) -> Result<Option<Lane>, DbErr> {
    let tx = db.begin().await?;
    let updated = tx
        .execute_raw(stmt(
            "UPDATE bulk_items SET status = 'pending', reason = NULL, result_id = NULL, updated_at = NULL
              WHERE batch_id = $1 AND seq = $2 AND target_id = $3 AND status = 'failed'",
            [msg.batch_id.into(), msg.seq.into(), msg.target_id.into()],
        ))
        .await?;
    if updated.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(None);
    }
    // The batch's counter shards first, so that the failure being taken back is in the
    // batch row's counts whichever transaction recorded it.
    crate::progress::record_outcomes(&tx, msg.batch_id, crate::progress::OutcomeDelta::default())
        .await?;
    let row = tx
        .query_one_raw(stmt(
            "UPDATE bulk_batches
                SET n_failed = n_failed - 1, completed_at = NULL, progress_at = clock_timestamp(),
                    state = CASE WHEN state = 'completed' THEN 'running' ELSE state END
              WHERE id = $1 RETURNING lane",
            [msg.batch_id.into()],
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(format!("batch {}", msg.batch_id)))?;
    let lane: String = row.try_get("", "lane")?;
    tx.commit().await?;
    Ok(Some(Lane::parse(&lane).unwrap_or(Lane::Bulk)))
}

/// Replays the dead-lettered messages `select` keeps, among up to `limit` read (those in
/// the queue when it starts), publishing through `publisher`; the rest are given back.
///
/// # Errors
/// Database or broker errors; what was replayed before the error stays replayed, what was
/// not stays in the dead-letter queue.
pub async fn replay(
    link: &AmqpLink,
    db: &DatabaseConnection,
    publisher: &Publisher,
    topology: &Topology,
    select: impl Fn(&WorkMessage) -> bool,
    limit: u32,
) -> Result<ReplayReport, DeadLetterError> {
    let mut scan = Scan::open(link, topology).await?;
    let mut report = ReplayReport {
        depth: scan.depth,
        ..ReplayReport::default()
    };
    let result = async {
        for _ in 0..scan.depth.min(limit) {
            let Some(m) = scan.next().await? else {
                break;
            };
            report.scanned += 1;
            let d = m.delivery;
            let msg = match WorkMessage::decode(&d.data) {
                Ok(msg) if select(&msg) => msg,
                _ => {
                    report.kept += 1;
                    scan.returned.push(d.acker.clone());
                    continue;
                }
            };
            match reopen(db, &msg).await? {
                Some(lane) => {
                    // Spread over the lane's shards as the splitter does.
                    let queue = topology.work_shard(lane, topology.shard_for(lane, msg.seq));
                    let now_ms = chrono::Utc::now().timestamp_millis();
                    publisher
                        .publish_all(vec![Outgoing {
                            exchange: "",
                            routing_key: &queue,
                            body: &d.data,
                            // A fresh attempt budget: the cause has been fixed.
                            properties: json_properties().with_headers(headers(&[(
                                crate::messages::headers::PUBLISHED_AT,
                                AMQPValue::LongLongInt(now_ms),
                            )])),
                            mandatory: true,
                        }])
                        .await?;
                    report.replayed.push((msg.batch_id, msg.seq));
                }
                // Its item already has another outcome (a duplicate succeeded): nothing to redo.
                None => report.dropped += 1,
            }
            scan.ack(&d.acker).await?;
        }
        Ok::<(), DeadLetterError>(())
    }
    .await;
    scan.close().await;
    result.map(|()| report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    #[test]
    fn headers_read_as_text() {
        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString(LongString::from("delivery_limit")),
        );
        let mut t = FieldTable::default();
        t.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from("error")),
        );
        t.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongInt(3));
        t.insert(
            DEATH_HEADER.into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        let body =
            WorkMessage::new(crate::messages::Op::CreateSalesRecord, BatchId(7), 3, 42).encode();
        let letter = DeadLetter::read(&body, Some(&t));
        assert_eq!(letter.reason, "error");
        assert_eq!(letter.attempts, "3");
        assert_eq!(letter.history, "");
        assert_eq!(letter.broker_reason, "delivery_limit");
        assert!(letter.is_of(BatchId(7)));
        assert!(!letter.is_of(BatchId(8)));
        let garbage = DeadLetter::read(b"{\"not\": 1", None);
        assert!(garbage.message.is_err());
        assert!(!garbage.is_of(BatchId(7)));
    }
}
