//! The transactional outbox and its relay.
//!
//! Workflow events are written to the `outbox` table in the same transaction as the change
//! they announce, so an event exists if and only if its change committed. The relay claims
//! rows with `FOR UPDATE SKIP LOCKED` (any number of relays may run, in producers and
//! workers alike), publishes them to the events exchange with publisher confirms, and
//! deletes them in the same transaction once the broker confirmed. A crash between the
//! confirm and the delete publishes a row again: delivery is at-least-once, and every
//! event carries a unique `event_id` (also the AMQP `message_id`) so consumers drop repeats.
//! Rows are never selected by "id greater than the last seen", which skips rows whose
//! transactions commit out of id order.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::types::ShortString;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, TransactionTrait};
use tokio_util::sync::CancellationToken;

use crate::amqp::{AmqpError, Outgoing, Publisher, json_properties, reconnect_backoff};
use crate::db::stmt;
use crate::metrics::OutboxMetrics;

/// Why a relay round failed. The round is retried; nothing is lost.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] DbErr),
    /// The broker failed.
    #[error(transparent)]
    Amqp(#[from] AmqpError),
}

/// Publishes outbox rows to the events exchange.
pub struct OutboxRelay {
    db: DatabaseConnection,
    publisher: Publisher,
    exchange: String,
    batch_size: u64,
    poll_interval: Duration,
    metrics: Arc<OutboxMetrics>,
}

/// The body of an event as published: `event_id` and `occurred_at` first, then the row's
/// payload fields.
pub fn event_body(
    event_id: uuid::Uuid,
    occurred_at: DateTime<Utc>,
    payload: &serde_json::Value,
) -> serde_json::Value {
    let mut body = serde_json::Map::new();
    body.insert("event_id".into(), event_id.to_string().into());
    body.insert(
        "occurred_at".into(),
        occurred_at
            .to_rfc3339_opts(SecondsFormat::Micros, true)
            .into(),
    );
    if let Some(fields) = payload.as_object() {
        for (k, v) in fields {
            body.insert(k.clone(), v.clone());
        }
    }
    serde_json::Value::Object(body)
}

impl OutboxRelay {
    /// A relay publishing to `exchange`.
    pub fn new(
        db: DatabaseConnection,
        publisher: Publisher,
        exchange: String,
        batch_size: u64,
        poll_interval: Duration,
        metrics: Arc<OutboxMetrics>,
    ) -> Self {
        Self {
            db,
            publisher,
            exchange,
            batch_size,
            poll_interval,
            metrics,
        }
    }

    /// Relays until `shutdown` fires, backing off while the database or broker is down.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = reconnect_backoff();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let pause = match self.relay_once().await {
                Ok(n) => {
                    backoff = reconnect_backoff();
                    if n as u64 >= self.batch_size {
                        continue;
                    }
                    self.poll_interval
                }
                Err(e) => {
                    self.metrics.errors.inc();
                    tracing::warn!(error = %e, "outbox relay round failed; retrying");
                    backoff.next().unwrap_or(Duration::from_secs(5))
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
        // One last round so that events of work finished during the drain leave promptly.
        if let Err(e) = self.relay_once().await {
            tracing::debug!(error = %e, "final outbox round failed; another relay will publish");
        }
    }

    /// Publishes one round of rows; returns how many.
    ///
    /// # Errors
    /// Database or broker errors; the round's rows stay in the outbox.
    pub async fn relay_once(&self) -> Result<usize, RelayError> {
        let tx = self.db.begin().await?;
        let rows = tx
            .query_all_raw(stmt(
                "SELECT id, event_id, routing_key, payload, created_at FROM outbox
                  ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                [i64::try_from(self.batch_size).unwrap_or(i64::MAX).into()],
            ))
            .await?;
        if rows.is_empty() {
            self.metrics.lag_seconds.set(0.0);
            tx.commit().await?;
            return Ok(0);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut messages = Vec::with_capacity(rows.len());
        let mut oldest: Option<DateTime<Utc>> = None;
        for row in &rows {
            let id: i64 = row.try_get("", "id")?;
            let event_id: uuid::Uuid = row.try_get("", "event_id")?;
            let routing_key: String = row.try_get("", "routing_key")?;
            let payload: serde_json::Value = row.try_get("", "payload")?;
            let created_at: DateTime<Utc> = row.try_get("", "created_at")?;
            oldest = Some(oldest.map_or(created_at, |o| o.min(created_at)));
            let body = serde_json::to_vec(&event_body(event_id, created_at, &payload))
                .map_err(|e| DbErr::Json(e.to_string()))?;
            ids.push(id);
            messages.push((routing_key, body, event_id, created_at));
        }
        let outgoing: Vec<Outgoing<'_>> = messages
            .iter()
            .map(|(key, body, event_id, at)| Outgoing {
                exchange: &self.exchange,
                routing_key: key,
                body,
                properties: json_properties()
                    .with_message_id(ShortString::from(event_id.to_string()))
                    .with_timestamp(u64::try_from(at.timestamp()).unwrap_or(0)),
                // Events are routed by the CRM's bindings; with none bound the broker drops
                // them, which is the CRM's configuration, not a failure to retry for ever.
                mandatory: false,
            })
            .collect();
        self.publisher.publish_all(outgoing).await?;
        tx.execute_raw(stmt(
            "DELETE FROM outbox WHERE id = ANY($1::bigint[])",
            [ids.clone().into()],
        ))
        .await?;
        tx.commit().await?;
        self.metrics.published.inc_by(ids.len() as u64);
        if let Some(oldest) = oldest {
            let lag = (Utc::now() - oldest).num_milliseconds().max(0) as f64 / 1000.0;
            self.metrics.lag_seconds.set(lag);
        }
        Ok(ids.len())
    }
}

/// How many events wait in the outbox and how old the oldest is, in seconds.
///
/// # Errors
/// Database errors.
pub async fn backlog(db: &impl ConnectionTrait) -> Result<(i64, f64), DbErr> {
    let row = db
        .query_one_raw(stmt(
            "SELECT count(*) AS n,
                    COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS age
               FROM outbox",
            [],
        ))
        .await?;
    match row {
        Some(r) => Ok((r.try_get("", "n")?, r.try_get("", "age")?)),
        None => Ok((0, 0.0)),
    }
}
