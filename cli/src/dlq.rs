//! The dead-letter queue from the command line: list what is there and why, and replay it
//! after the cause is fixed. The reading and the replay semantics are
//! [`bulkops_shared::deadletters`]' (the operator console uses the same functions); this
//! module prints.

use std::sync::Arc;

use anyhow::Context;
use bulkops_shared::amqp::{AmqpLink, Publisher};
use bulkops_shared::config::Settings;
use bulkops_shared::deadletters;
use bulkops_shared::ids::BatchId;
use bulkops_shared::topology::Topology;
use sea_orm::DatabaseConnection;

use crate::out;

fn link(settings: &Settings) -> anyhow::Result<Arc<AmqpLink>> {
    Ok(Arc::new(
        AmqpLink::new(&settings.amqp, "bulkops-cli")
            .context("amqp.url / amqp.urls")?
            .with_placement(Topology::from_settings(settings)),
    ))
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// `bulkops dlq list`: one line per dead-lettered message (read, then returned).
///
/// # Errors
/// Broker errors.
pub async fn list(settings: &Settings, batch: Option<i64>) -> anyhow::Result<()> {
    let link = link(settings)?;
    let topology = Topology::from_settings(settings);
    let listing = deadletters::list(
        &link,
        &topology,
        |l| batch.is_none_or(|b| l.is_of(BatchId(b))),
        u32::MAX,
    )
    .await
    .context("reading the dead-letter queue");
    link.close().await;
    let listing = listing?;
    out(&format!(
        "{} message(s) in {}",
        listing.depth,
        topology.dead_queue()
    ));
    for l in &listing.letters {
        out(&match &l.message {
            Ok(msg) => format!(
                "batch {} seq {} target {}: reason {} | attempts {} | history {} | broker {}",
                msg.batch_id,
                msg.seq,
                msg.target_id,
                or_dash(&l.reason),
                or_dash(&l.attempts),
                or_dash(&l.history),
                or_dash(&l.broker_reason),
            ),
            Err(e) => format!(
                "(unreadable message: {e}) broker {}",
                or_dash(&l.broker_reason)
            ),
        });
    }
    Ok(())
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
    let link = link(settings)?;
    let topology = Topology::from_settings(settings);
    let publisher = Publisher::new(link.clone(), settings.amqp.confirm_window);
    let report = deadletters::replay(
        &link,
        db,
        &publisher,
        &topology,
        |m| batch.is_none_or(|b| m.batch_id == BatchId(b)),
        u32::MAX,
    )
    .await
    .context("replaying the dead-letter queue");
    link.close().await;
    let report = report?;
    out(&format!(
        "replayed {}, removed {} whose item already had an outcome, left {} in place",
        report.replayed.len(),
        report.dropped,
        report.kept
    ));
    Ok(())
}
