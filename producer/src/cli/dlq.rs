//! The dead-letter queue from the command line: list what is there and why, and replay it
//! after the cause is fixed.
//!
//! Replaying a message gives its item a real outcome: in one transaction the item goes
//! back from `failed` to `pending` (its failure is taken off the batch's counters, and a
//! completed batch is reopened), then the message is published to its batch's work queue
//! with a fresh attempt budget, and only then removed from the dead-letter queue. A batch
//! reopened this way completes again, and announces it again with a new
//! `bulk_batch.completed` event. Messages that name no item (not JSON, unknown version) stay
//! where they are.

use std::sync::Arc;

use anyhow::Context;
use bulkops_shared::amqp::{AmqpLink, Outgoing, Publisher, headers, json_properties, with_timeout};
use bulkops_shared::batch::Lane;
use bulkops_shared::config::Settings;
use bulkops_shared::db::stmt;
use bulkops_shared::messages::WorkMessage;
use bulkops_shared::topology::Topology;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};

use super::out;

/// A header's value as text.
fn header(table: Option<&FieldTable>, name: &str) -> String {
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

async fn channel(
    settings: &Settings,
) -> anyhow::Result<(Arc<AmqpLink>, lapin::Channel, Topology, u32)> {
    let topology = Topology::from_settings(settings);
    let link = Arc::new(
        AmqpLink::new(&settings.amqp, "bulkops-cli")
            .context("amqp.url / amqp.urls")?
            .with_placement(topology.clone()),
    );
    let ch = link.channel().await.context("connecting to the broker")?;
    with_timeout(link.timeout(), topology.declare(&ch)).await?;
    let q = with_timeout(
        link.timeout(),
        ch.queue_declare(
            topology.dead_queue().as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    Ok((link, ch, topology, q.message_count()))
}

/// Takes the next dead-lettered message, if any (it stays unacknowledged until acked or given back).
async fn next_dead(
    link: &AmqpLink,
    ch: &lapin::Channel,
    topology: &Topology,
) -> anyhow::Result<Option<lapin::message::BasicGetMessage>> {
    Ok(with_timeout(
        link.timeout(),
        ch.basic_get(
            topology.dead_queue().as_str().into(),
            BasicGetOptions::default(),
        ),
    )
    .await?)
}

/// Returns messages read but not acted on to the dead-letter queue. Best effort: a message
/// not returned comes back anyway when the connection closes.
async fn give_back(ackers: Vec<lapin::Acker>) {
    for acker in ackers {
        let _ = acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await;
    }
}

/// `bulkops dlq list`: one line per dead-lettered message (read, then returned).
///
/// # Errors
/// Broker errors.
pub async fn list(settings: &Settings, batch: Option<i64>) -> anyhow::Result<()> {
    let (link, ch, topology, count) = channel(settings).await?;
    out(&format!("{count} message(s) in {}", topology.dead_queue()));
    let mut returned = Vec::new();
    for _ in 0..count {
        let Some(m) = next_dead(&link, &ch, &topology).await? else {
            break;
        };
        let d = &m.delivery;
        let h = d.properties.headers().as_ref();
        let line = match WorkMessage::decode(&d.data) {
            Ok(msg) if batch.is_none_or(|b| b == msg.batch_id.0) => Some(format!(
                "batch {} seq {} target {}: reason {} | attempts {} | history {} | broker {}",
                msg.batch_id,
                msg.seq,
                msg.target_id,
                or_dash(header(h, "x-bulkops-reason")),
                or_dash(header(h, "x-attempts")),
                or_dash(header(h, "x-attempt-history")),
                or_dash(header(h, "x-death")),
            )),
            Ok(_) => None,
            Err(e) if batch.is_none() => Some(format!(
                "(unreadable message: {e}) broker {}",
                or_dash(header(h, "x-death"))
            )),
            Err(_) => None,
        };
        if let Some(line) = line {
            out(&line);
        }
        returned.push(d.acker.clone());
    }
    give_back(returned).await;
    link.close().await;
    Ok(())
}

fn or_dash(s: String) -> String {
    if s.is_empty() { "-".into() } else { s }
}

/// Puts a failed item back to pending (reopening its batch). Returns the batch's lane, or
/// `None` when the item is not failed (already decided otherwise, or unknown).
async fn reopen(db: &DatabaseConnection, msg: &WorkMessage) -> anyhow::Result<Option<Lane>> {
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
    let row = tx
        .query_one_raw(stmt(
            "UPDATE bulk_batches
                SET n_failed = n_failed - 1, completed_at = NULL, progress_at = clock_timestamp(),
                    state = CASE WHEN state = 'completed' THEN 'running' ELSE state END
              WHERE id = $1 RETURNING lane",
            [msg.batch_id.into()],
        ))
        .await?
        .context("batch vanished")?;
    let lane: String = row.try_get("", "lane")?;
    tx.commit().await?;
    Ok(Some(Lane::parse(&lane).unwrap_or(Lane::Bulk)))
}

/// `bulkops dlq replay`: re-publishes dead-lettered messages (optionally one batch's) so
/// their items get a real outcome.
///
/// # Errors
/// Database or broker errors (a message not yet replayed stays in the dead-letter queue).
pub async fn replay(
    settings: &Settings,
    db: &DatabaseConnection,
    batch: Option<i64>,
) -> anyhow::Result<()> {
    let (link, ch, topology, count) = channel(settings).await?;
    let publisher = Publisher::new(link.clone(), settings.amqp.confirm_window);
    let (mut replayed, mut dropped, mut kept) = (0, 0, 0);
    let mut returned = Vec::new();
    for _ in 0..count {
        let Some(m) = next_dead(&link, &ch, &topology).await? else {
            break;
        };
        let d = m.delivery;
        let msg = match WorkMessage::decode(&d.data) {
            Ok(msg) if batch.is_none_or(|b| b == msg.batch_id.0) => msg,
            _ => {
                kept += 1;
                returned.push(d.acker.clone());
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
                            "x-published-at-ms",
                            AMQPValue::LongLongInt(now_ms),
                        )])),
                        mandatory: true,
                    }])
                    .await?;
                replayed += 1;
            }
            // Its item already has another outcome (a duplicate succeeded): nothing to redo.
            None => dropped += 1,
        }
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    give_back(returned).await;
    out(&format!(
        "replayed {replayed}, removed {dropped} whose item already had an outcome, left {kept} in place"
    ));
    link.close().await;
    Ok(())
}
