//! Captures every event published to a test's events exchange.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::Connection;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use tokio::sync::Mutex;

/// One captured event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Its routing key.
    pub routing_key: String,
    /// Its JSON body.
    pub body: Value,
    /// The raw body, for privacy checks.
    pub raw: String,
    /// The AMQP message id.
    pub message_id: Option<String>,
}

/// The captured events, in arrival order.
#[derive(Clone, Default)]
pub struct Events(Arc<Mutex<Vec<Event>>>);

impl Events {
    /// Binds an exclusive queue to `exchange` with `#` and collects what arrives.
    pub async fn capture(conn: &Connection, exchange: &str) -> anyhow::Result<Self> {
        let ch = conn.create_channel().await?;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        ch.queue_bind(
            q.name().clone(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let mut consumer = ch
            .basic_consume(
                q.name().clone(),
                "capture".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let events = Events::default();
        let sink = events.0.clone();
        tokio::spawn(async move {
            let _keep = ch;
            while let Some(Ok(d)) = consumer.next().await {
                let raw = String::from_utf8_lossy(&d.data).into_owned();
                sink.lock().await.push(Event {
                    routing_key: d.routing_key.as_str().to_owned(),
                    body: serde_json::from_str(&raw).unwrap_or(Value::Null),
                    raw,
                    message_id: d
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|m| m.as_str().to_owned()),
                });
                let _ = d.acker.ack(BasicAckOptions::default()).await;
            }
        });
        Ok(events)
    }

    /// Everything captured so far.
    pub async fn all(&self) -> Vec<Event> {
        self.0.lock().await.clone()
    }

    /// Captured events with this routing key.
    pub async fn of(&self, routing_key: &str) -> Vec<Event> {
        self.0
            .lock()
            .await
            .iter()
            .filter(|e| e.routing_key == routing_key)
            .cloned()
            .collect()
    }

    /// Waits until `pred` holds over the captured events (bounded).
    pub async fn wait_until(
        &self,
        within: std::time::Duration,
        pred: impl Fn(&[Event]) -> bool,
    ) -> bool {
        let started = std::time::Instant::now();
        loop {
            if pred(&self.0.lock().await) {
                return true;
            }
            if started.elapsed() > within {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}
