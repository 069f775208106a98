//! Captures every event published to a test's events exchange, through a durable queue and
//! a consumer that reconnects, so that a broker restart during a test loses no event from
//! the capture either. On a cluster the queue is a quorum queue (a classic queue lives on
//! one node, and events published while that node is down would miss it), and the
//! consumer reconnects to the next node when its node goes.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

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
    /// The `traceparent` header (traces on).
    pub traceparent: Option<String>,
}

/// The captured events, in arrival order, and what the capture's connection went through
/// (for the report of a test that misses events).
#[derive(Clone, Default)]
pub struct Events(
    Arc<Mutex<Vec<Event>>>,
    CancellationToken,
    Arc<std::sync::Mutex<Vec<String>>>,
);

/// Appends a line to the capture's history, stamped with the time since it began.
fn note(history: &std::sync::Mutex<Vec<String>>, began: std::time::Instant, line: String) {
    if let Ok(mut h) = history.lock() {
        h.push(format!("{:.1}s {line}", began.elapsed().as_secs_f64()));
    }
}

async fn setup(
    url: &str,
    exchange: &str,
    queue: &str,
    replicated: bool,
) -> anyhow::Result<(Connection, lapin::Consumer)> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    let mut args = FieldTable::default();
    if replicated {
        args.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
    }
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await?;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let consumer = ch
        .basic_consume(
            queue.into(),
            "capture".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((conn, consumer))
}

/// The capture queue's ready messages and consumers as the first node that answers (within
/// a few seconds) reports them, passively: a report, so `None` when no node answers.
pub async fn queue_state(urls: &[String], queue: &str) -> Option<(u32, u32)> {
    for url in urls {
        let probe = async {
            let conn = Connection::connect(url, ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            let q = crate::env::queue_info(&ch, queue).await?;
            let _ = conn.close(200, "done".into()).await;
            Ok::<_, lapin::Error>((q.message_count(), q.consumer_count()))
        };
        if let Ok(Ok(state)) = tokio::time::timeout(Duration::from_secs(5), probe).await {
            return Some(state);
        }
    }
    None
}

impl Events {
    /// Binds the durable queue `queue` to `exchange` with `#` and collects what arrives,
    /// reconnecting after broker failures; `urls` are the nodes of one broker or cluster.
    pub async fn capture(urls: &[String], exchange: &str, queue: &str) -> anyhow::Result<Self> {
        let replicated = urls.len() > 1;
        let first_url = urls.first().context("no broker URL")?;
        let first = setup(first_url, exchange, queue, replicated).await?;
        let events = Events::default();
        let sink = events.0.clone();
        let stop = events.1.clone();
        let history = events.2.clone();
        let began = std::time::Instant::now();
        let (urls, exchange, queue) = (urls.to_vec(), exchange.to_owned(), queue.to_owned());
        tokio::spawn(async move {
            let mut current = Some(first);
            let mut node = 0;
            // Stops once asked to, so that the capture queue, once deleted, stays deleted.
            while !stop.is_cancelled() {
                let (conn, mut consumer) = match current.take() {
                    Some(c) => c,
                    None => match setup(&urls[node], &exchange, &queue, replicated).await {
                        Ok(c) => c,
                        Err(e) => {
                            note(&history, began, format!("node {node}: setup failed: {e:#}"));
                            node = (node + 1) % urls.len();
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    },
                };
                note(&history, began, format!("node {node}: consuming"));
                let mut got = 0u64;
                loop {
                    let next = tokio::select! {
                        () = stop.cancelled() => None,
                        next = consumer.next() => next,
                    };
                    let d = match next {
                        Some(Ok(d)) => d,
                        Some(Err(e)) => {
                            note(
                                &history,
                                began,
                                format!("node {node}: {got} events, then {e}"),
                            );
                            break;
                        }
                        None => {
                            note(
                                &history,
                                began,
                                format!("node {node}: {got} events, then the stream ended"),
                            );
                            break;
                        }
                    };
                    got += 1;
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
                        traceparent: bulkops_shared::telemetry::propagation::amqp_traceparent(
                            d.properties.headers().as_ref(),
                        )
                        .map(str::to_owned),
                    });
                    let _ = d.acker.ack(BasicAckOptions::default()).await;
                }
                drop(conn);
                node = (node + 1) % urls.len();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(events)
    }

    /// What the capture's connection went through: each node it consumed from, how many
    /// events came through it and how that ended, and failed reconnections.
    pub fn history(&self) -> Vec<String> {
        self.2.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Stops capturing: the consumer goes away and the queue is no longer re-declared.
    pub fn stop(&self) {
        self.1.cancel();
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
    pub async fn wait_until(&self, within: Duration, pred: impl Fn(&[Event]) -> bool) -> bool {
        let started = std::time::Instant::now();
        loop {
            if pred(&self.0.lock().await) {
                return true;
            }
            if started.elapsed() > within {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
