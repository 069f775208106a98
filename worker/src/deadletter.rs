//! The dead-letter watcher: every message that reaches the dead-letter exchange (a worker
//! gave up on it, the broker hit its delivery limit, or it was rejected as malformed) also
//! reaches `{prefix}.dead.watch`; workers consume that queue and record the item as
//! `failed` with the message's reason, so a dead-lettered item still gets its one outcome
//! and its batch still completes. The copy in `{prefix}.dead` stays for operators.

use std::sync::Arc;
use std::time::Duration;

use bulkops_shared::amqp::{AmqpLink, reconnect_backoff, with_timeout};
use bulkops_shared::batch::reason;
use bulkops_shared::db::stmt;
use bulkops_shared::messages::WorkMessage;
use bulkops_shared::progress::{OutcomeDelta, record_outcomes};
use bulkops_shared::topology::Topology;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, TransactionTrait};
use tokio_util::sync::CancellationToken;

use crate::retry;

/// Records the failure of one dead-lettered item. Returns whether it was still pending.
///
/// # Errors
/// Database errors (the message is then returned to the queue and tried again).
pub async fn record_failure(
    db: &DatabaseConnection,
    msg: &WorkMessage,
    why: &str,
) -> Result<bool, DbErr> {
    let tx = db.begin().await?;
    let updated = tx
        .execute_raw(stmt(
            "UPDATE bulk_items SET status = 'failed', reason = $3, result_id = NULL,
                    attempts = attempts + 1, updated_at = clock_timestamp()
              WHERE batch_id = $1 AND seq = $2 AND target_id = $4 AND status = 'pending'",
            [
                msg.batch_id.into(),
                msg.seq.into(),
                why.into(),
                msg.target_id.into(),
            ],
        ))
        .await?;
    let changed = updated.rows_affected() > 0;
    if changed {
        record_outcomes(
            &tx,
            msg.batch_id,
            OutcomeDelta {
                failed: 1,
                ..OutcomeDelta::default()
            },
        )
        .await?;
    }
    tx.commit().await?;
    Ok(changed)
}

/// Watches the dead letters until `shutdown`.
pub async fn run(
    link: Arc<AmqpLink>,
    topology: Topology,
    db: DatabaseConnection,
    shutdown: CancellationToken,
) {
    let mut backoff = reconnect_backoff();
    while !shutdown.is_cancelled() {
        if let Err(e) = watch(&link, &topology, &db, &shutdown).await {
            tracing::warn!(error = %e, "dead-letter watcher stopped; reconnecting");
            let pause = backoff.next().unwrap_or(Duration::from_secs(5));
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}

async fn watch(
    link: &AmqpLink,
    topology: &Topology,
    db: &DatabaseConnection,
    shutdown: &CancellationToken,
) -> Result<(), bulkops_shared::amqp::AmqpError> {
    let channel = link.channel().await?;
    with_timeout(link.timeout(), topology.declare(&channel)).await?;
    with_timeout(
        link.timeout(),
        channel.basic_qos(50, BasicQosOptions { global: false }),
    )
    .await?;
    let mut consumer = with_timeout(
        link.timeout(),
        channel.basic_consume(
            topology.dead_watch_queue().into(),
            format!("bulkops-dead-watch-{}", uuid::Uuid::new_v4())
                .as_str()
                .into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    loop {
        let delivery = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            next = consumer.next() => match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(bulkops_shared::amqp::AmqpError::ConsumerEnded),
            },
        };
        handle(db, delivery).await;
    }
}

async fn handle(db: &DatabaseConnection, delivery: Delivery) {
    let Ok(msg) = WorkMessage::decode(&delivery.data) else {
        // Nothing to record for a message that names no item; the copy in the dead-letter
        // queue is what operators look at.
        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        return;
    };
    let why = retry::reason_of(delivery.properties.headers().as_ref())
        .unwrap_or_else(|| reason::DEAD_LETTERED.to_owned());
    match record_failure(db, &msg, &why).await {
        Ok(changed) => {
            if changed {
                tracing::warn!(batch_id = %msg.batch_id, seq = msg.seq, reason = why, "item failed (dead-lettered)");
            }
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
        }
        Err(e) => {
            tracing::warn!(batch_id = %msg.batch_id, seq = msg.seq, error = %e, "cannot record a dead letter yet; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
        }
    }
}
