//! The transactional outbox and its relay.
//!
//! Workflow events are written to the `outbox` table in the same transaction as the change
//! they announce, so an event exists if and only if its change committed. A row holds the
//! events of one transaction (a chunk's worth), each with its own `event_id`, so the outbox
//! costs a row per transaction, not per record. The relay claims
//! rows with `FOR UPDATE SKIP LOCKED` (any number of relays may run, in producers and
//! workers alike), publishes them to the events exchange with publisher confirms, and
//! deletes them in the same transaction once the broker confirmed. A crash between the
//! confirm and the delete publishes a row again: delivery is at-least-once, and every
//! event carries a unique `event_id` (also the AMQP `message_id`) so consumers drop repeats.
//! Rows are never selected by "id greater than the last seen", which skips rows whose
//! transactions commit out of id order.
//!
//! With traces on, a row also holds the `traceparent` of the transaction that wrote it
//! (the column defaults to the transaction's stamp, see [`crate::telemetry::propagation`]),
//! and every event of the row carries it as an AMQP header. Each round that publishes is an
//! `outbox.relay` span linked to the rows' contexts.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::types::ShortString;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, TransactionTrait};
use tokio_util::sync::CancellationToken;

use crate::amqp::{Outgoing, Publisher, json_properties};
use crate::backoff::Backoff;
use crate::db::stmt;
use crate::metrics::OutboxMetrics;
use crate::telemetry::propagation;
use tracing::Instrument as _;

/// Why a relay round failed (retried; nothing is lost).
pub use crate::amqp::RoundError as RelayError;

/// Publishes outbox rows to the events exchange.
pub struct OutboxRelay {
    db: DatabaseConnection,
    publisher: Publisher,
    exchange: String,
    batch_size: u64,
    poll_interval: Duration,
    metrics: Arc<OutboxMetrics>,
    round_timeout: Duration,
    logs: crate::ratelog::LogGate,
}

/// The `occurred_at` member of every event object, as SQL for `jsonb_build_object`: events
/// are rendered whole when written, so the relay forwards them byte for byte.
pub const OCCURRED_AT_SQL: &str = "'occurred_at', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";

/// Splits an outbox row's `events` (a JSON array) into each event's exact bytes and its
/// `event_id`, without rebuilding the objects.
///
/// # Errors
/// When the text is not an array of objects each with a string `event_id`.
pub fn split_events(events: &str) -> Result<Vec<(&str, String)>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Id<'a> {
        #[serde(borrow)]
        event_id: &'a str,
    }
    let raw: Vec<&serde_json::value::RawValue> = serde_json::from_str(events)?;
    raw.into_iter()
        .map(|r| {
            let id: Id<'_> = serde_json::from_str(r.get())?;
            Ok((r.get(), id.event_id.to_owned()))
        })
        .collect()
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
            round_timeout: Duration::from_secs(60),
            logs: crate::ratelog::LogGate::default(),
        }
    }

    /// The relay every service runs when `outbox.enabled`: through `link` to the events
    /// exchange of `topology`, up to `outbox.batch_size` rows a round, polling every
    /// `outbox.poll_interval_ms` while the outbox is empty, each round bounded by one
    /// database call and two broker calls.
    pub fn from_settings(
        settings: &crate::config::Settings,
        db: DatabaseConnection,
        link: Arc<crate::amqp::AmqpLink>,
        topology: &crate::topology::Topology,
        metrics: Arc<OutboxMetrics>,
    ) -> Self {
        Self::new(
            db,
            Publisher::new(link, settings.amqp.confirm_window).with_topology(topology.clone()),
            topology.events_exchange().to_owned(),
            settings.outbox.batch_size,
            Duration::from_millis(settings.outbox.poll_interval_ms),
            metrics,
        )
        .with_round_timeout(settings.database.call_timeout() + settings.amqp.timeout() * 2)
    }

    /// Bounds each relay round (claim, confirmed publishes, delete, commit) in time, so a
    /// half-open connection cannot stall the events; a round cut short leaves its rows in
    /// the outbox (its transaction never commits) and is run again.
    #[must_use]
    pub fn with_round_timeout(mut self, timeout: Duration) -> Self {
        self.round_timeout = timeout;
        self
    }

    async fn bounded_round(&self) -> Result<usize, RelayError> {
        match tokio::time::timeout(self.round_timeout, self.relay_once()).await {
            Ok(r) => r,
            Err(_) => Err(RelayError::Db(crate::db::client_timeout(
                "outbox relay round",
            ))),
        }
    }

    /// Relays until `shutdown` fires, backing off while the database or broker is down.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::reconnect();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let pause = match self.bounded_round().await {
                Ok(n) => {
                    backoff.reset();
                    if n as u64 >= self.batch_size {
                        continue;
                    }
                    self.poll_interval
                }
                Err(e) => {
                    self.metrics.errors.inc();
                    if let Some(held) = self.logs.admit("round") {
                        tracing::warn!(error = %e, repeats_since_last_line = held, "outbox relay round failed; retrying");
                    }
                    backoff.next_pause()
                }
            };
            if !crate::shutdown::sleep(&shutdown, pause).await {
                break;
            }
        }
        // One last round so that events of work finished during the drain leave promptly.
        if let Err(e) = self.bounded_round().await {
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
                "SELECT id, routing_key, events::text AS events, created_at, traceparent FROM outbox
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
        let mut rendered: Vec<(String, String, DateTime<Utc>, Option<String>)> =
            Vec::with_capacity(rows.len());
        let mut oldest: Option<DateTime<Utc>> = None;
        for row in &rows {
            ids.push(row.try_get::<i64>("", "id")?);
            let routing_key: String = row.try_get("", "routing_key")?;
            let events: String = row.try_get("", "events")?;
            let created_at: DateTime<Utc> = row.try_get("", "created_at")?;
            oldest = Some(oldest.map_or(created_at, |o| o.min(created_at)));
            let traceparent: Option<String> = row.try_get("", "traceparent")?;
            rendered.push((routing_key, events, created_at, traceparent));
        }
        /// (routing key, body, event id, occurred at, trace context)
        type Message<'a> = (&'a str, &'a str, String, DateTime<Utc>, Option<&'a str>);
        let mut messages: Vec<Message<'_>> = Vec::new();
        for (routing_key, events, at, traceparent) in &rendered {
            for (body, event_id) in split_events(events).map_err(|e| DbErr::Json(e.to_string()))? {
                messages.push((routing_key, body, event_id, *at, traceparent.as_deref()));
            }
        }
        let outgoing: Vec<Outgoing<'_>> = messages
            .iter()
            .map(|(key, body, event_id, at, traceparent)| Outgoing {
                exchange: &self.exchange,
                routing_key: key,
                body: body.as_bytes(),
                // The CRM's workflow engine continues the trace of the span that committed
                // the event (stored on the row).
                properties: propagation::traceparent_props(
                    json_properties()
                        .with_message_id(ShortString::from(event_id.as_str()))
                        .with_timestamp(u64::try_from(at.timestamp()).unwrap_or(0)),
                    *traceparent,
                ),
                // Events are routed by the CRM's bindings; with none bound the broker drops
                // them, which is the CRM's configuration, not a failure to retry for ever.
                mandatory: false,
            })
            .collect();
        let span = tracing::info_span!(
            "outbox.relay",
            otel.kind = "producer",
            rows = rows.len(),
            events = messages.len()
        );
        propagation::link_all(&span, rendered.iter().map(|r| r.3.as_deref()));
        let published = self
            .publisher
            .publish_all(outgoing)
            .instrument(span)
            .await?;
        tx.execute_raw(stmt(
            "DELETE FROM outbox WHERE id = ANY($1::bigint[])",
            [ids.into()],
        ))
        .await?;
        tx.commit().await?;
        self.metrics.published.inc_by(published as u64);
        if let Some(oldest) = oldest {
            let lag = (Utc::now() - oldest).num_milliseconds().max(0) as f64 / 1000.0;
            self.metrics.lag_seconds.set(lag);
        }
        Ok(rows.len())
    }
}

/// How many events wait in the outbox and how old the oldest is, in seconds.
///
/// # Errors
/// Database errors.
pub async fn backlog(db: &impl ConnectionTrait) -> Result<(i64, f64), DbErr> {
    let row = db
        .query_one_raw(stmt(
            "SELECT COALESCE(sum(jsonb_array_length(events)), 0)::bigint AS n,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_forwarded_byte_for_byte() {
        let row = r#"[{"event_id": "a1", "batch_id": 7}, {"event_id": "b2", "batch_id": 7, "merged": true}]"#;
        let events = split_events(row).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0],
            (r#"{"event_id": "a1", "batch_id": 7}"#, "a1".to_owned())
        );
        assert_eq!(events[1].1, "b2");
        assert!(split_events(r#"[{"batch_id": 7}]"#).is_err());
        assert!(split_events(r#"{"event_id": "a"}"#).is_err());
    }
}
