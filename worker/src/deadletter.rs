//! The dead-letter watcher: every message that reaches the dead-letter exchange (a worker
//! gave up on it, the broker hit its delivery limit, or it was rejected as malformed) also
//! reaches `{prefix}.dead.watch`; workers consume that queue and record the item as
//! `failed` with the message's reason, so a dead-lettered item still gets its one outcome
//! and its batch still completes. The copy in `{prefix}.dead` stays for operators.
//!
//! Every call has a client-side timeout (the database's `database.call_timeout_ms`, the
//! broker's `amqp.timeout_ms`), so a half-open connection cannot stall the watcher and with
//! it every dead-lettered item's outcome. A message that cannot be recorded yet goes back
//! to the queue after a pause that grows while the failures last (100 ms to 5 s); the
//! warning is logged once a minute at most, with the number of repeats.

use std::sync::Arc;
use std::time::Duration;

use bulkops_shared::amqp::{AmqpLink, with_timeout};
use bulkops_shared::backoff::Backoff;
use bulkops_shared::batch::reason;
use bulkops_shared::db::stmt;
use bulkops_shared::messages::WorkMessage;
use bulkops_shared::progress::{OutcomeDelta, record_outcomes};
use bulkops_shared::ratelog::LogGate;
use bulkops_shared::topology::Topology;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, TransactionTrait};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

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
    // A batch this completes announces it in the dead letter's trace.
    bulkops_shared::telemetry::propagation::stamp_transaction(&tx).await?;
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

/// What the watcher needs besides the broker link.
pub struct Watcher {
    /// The database the outcomes go to.
    pub db: DatabaseConnection,
    /// Client-side timeout of each database call.
    pub call_timeout: Duration,
    /// Rate-limits repeated warnings.
    pub logs: LogGate,
}

/// Watches the dead letters until `shutdown`.
pub async fn run(
    link: Arc<AmqpLink>,
    topology: Topology,
    watcher: Watcher,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::reconnect();
    while !shutdown.is_cancelled() {
        if let Err(e) = watch(&link, &topology, &watcher, &shutdown).await {
            if let Some(held) = watcher.logs.admit("watch") {
                tracing::warn!(error = %e, repeats_since_last_line = held, "dead-letter watcher stopped; reconnecting");
            }
            if !bulkops_shared::shutdown::sleep(&shutdown, backoff.next_pause()).await {
                break;
            }
        }
    }
}

async fn watch(
    link: &AmqpLink,
    topology: &Topology,
    watcher: &Watcher,
    shutdown: &CancellationToken,
) -> Result<(), bulkops_shared::amqp::AmqpError> {
    let channel = link.channel().await?;
    link.prepare_consuming(&channel, topology, 50).await?;
    let tag = format!("bulkops-dead-watch-{}", uuid::Uuid::new_v4());
    let mut consumer = link
        .consume(&channel, &topology.dead_watch_queue(), &tag)
        .await?;
    let mut pauses = Backoff::reconnect();
    loop {
        let delivery = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            next = consumer.next() => match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(bulkops_shared::amqp::AmqpError::ConsumerEnded),
            },
        };
        let span = crate::spans::dead_letter(&delivery);
        if handle(watcher, link.timeout(), delivery, &mut pauses)
            .instrument(span)
            .await
        {
            pauses.reset();
        }
    }
}

/// Records one dead letter; returns whether it could be recorded (or needed nothing).
async fn handle(
    watcher: &Watcher,
    amqp_timeout: Duration,
    delivery: Delivery,
    pauses: &mut Backoff,
) -> bool {
    let Ok(msg) = WorkMessage::decode(&delivery.data) else {
        // Nothing to record for a message that names no item; the copy in the dead-letter
        // queue is what operators look at.
        let _ = with_timeout(amqp_timeout, delivery.acker.ack(BasicAckOptions::default())).await;
        return true;
    };
    let why = retry::reason_of(delivery.properties.headers().as_ref())
        .unwrap_or_else(|| reason::DEAD_LETTERED.to_owned());
    let recorded = bulkops_shared::db::timed(
        watcher.call_timeout,
        "record a dead letter",
        record_failure(&watcher.db, &msg, &why),
    )
    .await;
    match recorded {
        Ok(changed) => {
            if changed {
                tracing::warn!(batch_id = %msg.batch_id, seq = msg.seq, reason = why, "item failed (dead-lettered)");
            }
            let _ =
                with_timeout(amqp_timeout, delivery.acker.ack(BasicAckOptions::default())).await;
            true
        }
        Err(e) => {
            if let Some(held) = watcher.logs.admit("record") {
                tracing::warn!(batch_id = %msg.batch_id, seq = msg.seq, error = %e, repeats_since_last_line = held, "cannot record a dead letter yet; retrying");
            }
            tokio::time::sleep(pauses.next_pause()).await;
            let _ = with_timeout(
                amqp_timeout,
                delivery.acker.nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                }),
            )
            .await;
            false
        }
    }
}
