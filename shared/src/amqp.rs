//! RabbitMQ connections that come back, and a publisher with confirms in windows.
//!
//! [`AmqpLink`] owns one connection and replaces it when it breaks; components ask it for
//! a fresh channel after an error (and re-declare, re-apply prefetch and re-consume
//! themselves), which is simpler to reason about than transparent recovery and avoids
//! lapin's recovery not re-applying `basic.qos`. Publishing and consuming use separate
//! links so that a resource alarm blocking publishers cannot stall consumers.
//!
//! [`Publisher`] publishes with publisher confirms, keeping at most `confirm_window`
//! publishes outstanding, and treats a mandatory message returned as unroutable as a
//! failure (lapin reports it as an ack carrying the returned message).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use lapin::{Confirmation, PublisherConfirm};
use secrecy::ExposeSecret;
use tokio::sync::Mutex;

use crate::config::AmqpSettings;

/// Heartbeat asked for when the URL does not say: a stalled broker is noticed in seconds,
/// not minutes.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// Errors of the AMQP layer.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The broker or the connection failed.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// An operation took longer than `amqp.timeout_ms`.
    #[error("broker did not answer within {0:?}")]
    Timeout(Duration),
    /// The broker refused (nacked) a publish.
    #[error("broker refused a publish")]
    Nacked,
    /// A mandatory publish could not be routed to any queue.
    #[error("message to {0:?} was unroutable (queue missing?)")]
    Unroutable(String),
    /// The broker ended a consumer (queue deleted, channel closed).
    #[error("the broker ended the consumer")]
    ConsumerEnded,
    /// The URL could not be parsed.
    #[error("amqp.url is not a valid AMQP URL")]
    BadUrl,
}

/// Runs `fut` with a timeout, turning an elapsed timer into [`AmqpError::Timeout`].
///
/// # Errors
/// The operation's own error, or [`AmqpError::Timeout`].
pub async fn with_timeout<T, E: Into<AmqpError>>(
    timeout: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, AmqpError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(AmqpError::Timeout(timeout)),
    }
}

/// A backoff for reconnecting: exponential from 100 ms to 5 s with full jitter, for ever.
pub fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// One connection to the broker, replaced when it breaks.
pub struct AmqpLink {
    uri: AMQPUri,
    name: String,
    timeout: Duration,
    current: Mutex<Option<Arc<Connection>>>,
    healthy: AtomicBool,
}

impl std::fmt::Debug for AmqpLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URI holds the password: show only the name.
        f.debug_struct("AmqpLink")
            .field("name", &self.name)
            .finish()
    }
}

impl AmqpLink {
    /// A link named `name` (shown in the broker's connection list). Connects lazily.
    ///
    /// # Errors
    /// [`AmqpError::BadUrl`] when `amqp.url` does not parse.
    pub fn new(settings: &AmqpSettings, name: &str) -> Result<Self, AmqpError> {
        let mut uri: AMQPUri = settings
            .url
            .expose_secret()
            .parse()
            .map_err(|_| AmqpError::BadUrl)?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS);
        }
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout =
                Some(u64::try_from(settings.timeout().as_millis()).unwrap_or(u64::MAX));
        }
        Ok(Self {
            uri,
            name: name.to_owned(),
            timeout: settings.timeout(),
            current: Mutex::new(None),
            healthy: AtomicBool::new(false),
        })
    }

    /// The timeout for one broker operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the current connection is up (for `/readyz`).
    pub fn is_connected(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The current connection, or a new one when there is none or it broke.
    ///
    /// # Errors
    /// When the broker cannot be reached within the timeout.
    pub async fn connection(&self) -> Result<Arc<Connection>, AmqpError> {
        let mut current = self.current.lock().await;
        if let Some(conn) = current.as_ref() {
            if conn.status().connected() {
                return Ok(conn.clone());
            }
            tracing::warn!(link = %self.name, "broker connection lost; reconnecting");
        }
        self.healthy.store(false, Ordering::Relaxed);
        *current = None;
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(self.name.as_str()));
        let conn = with_timeout(
            self.timeout,
            Connection::connect_uri(self.uri.clone(), props),
        )
        .await?;
        let conn = Arc::new(conn);
        *current = Some(conn.clone());
        self.healthy.store(true, Ordering::Relaxed);
        tracing::info!(link = %self.name, "connected to the broker");
        Ok(conn)
    }

    /// A new channel on the current (or a new) connection.
    ///
    /// # Errors
    /// When the broker cannot be reached or refuses the channel.
    pub async fn channel(&self) -> Result<Channel, AmqpError> {
        let conn = self.connection().await?;
        match with_timeout(self.timeout, conn.create_channel()).await {
            Ok(ch) => Ok(ch),
            Err(e) => {
                self.mark_broken().await;
                Err(e)
            }
        }
    }

    /// Forgets the current connection after an error that may have broken it, so that the
    /// next [`AmqpLink::channel`] reconnects.
    pub async fn mark_broken(&self) {
        let mut current = self.current.lock().await;
        if let Some(conn) = current.take() {
            self.healthy.store(false, Ordering::Relaxed);
            // Closing may fail when the socket is already gone; there is nothing to do then.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                conn.close(200, "reconnecting".into()),
            )
            .await;
        }
    }

    /// Refreshes the health flag from the connection's status.
    pub async fn refresh_health(&self) -> bool {
        let current = self.current.lock().await;
        let up = current.as_ref().is_some_and(|c| c.status().connected());
        self.healthy.store(up, Ordering::Relaxed);
        up
    }

    /// Keeps the link connected until `shutdown`: reconnects with backoff whenever the
    /// connection is down, so readiness reflects the broker even while the link is idle.
    pub async fn maintain(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut backoff = reconnect_backoff();
        loop {
            let pause = if self.refresh_health().await {
                backoff = reconnect_backoff();
                Duration::from_secs(1)
            } else {
                match self.connection().await {
                    Ok(_) => Duration::from_secs(1),
                    Err(e) => {
                        tracing::warn!(link = %self.name, error = %e, "broker unreachable; retrying");
                        backoff.next().unwrap_or(Duration::from_secs(5))
                    }
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Closes the connection (at shutdown).
    pub async fn close(&self) {
        let mut current = self.current.lock().await;
        if let Some(conn) = current.take() {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), conn.close(200, "shutdown".into()))
                    .await;
        }
        self.healthy.store(false, Ordering::Relaxed);
    }
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// Exchange ("" for the default exchange).
    pub exchange: &'a str,
    /// Routing key (the queue name on the default exchange).
    pub routing_key: &'a str,
    /// Body.
    pub body: &'a [u8],
    /// Properties (persistence is forced on).
    pub properties: BasicProperties,
    /// Whether an unroutable message is a failure (true for work messages).
    pub mandatory: bool,
}

/// Properties of a persistent JSON message.
pub fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2)
}

/// Builds message headers from string pairs.
pub fn headers(pairs: &[(&str, lapin::types::AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in pairs {
        table.insert(ShortString::from(*k), v.clone());
    }
    table
}

/// Publishes with confirms on one channel of a link, re-opening the channel after errors.
pub struct Publisher {
    link: Arc<AmqpLink>,
    channel: Mutex<Option<Channel>>,
    window: usize,
    topology: Option<crate::topology::Topology>,
}

impl Publisher {
    /// A publisher keeping at most `window` publishes unconfirmed.
    pub fn new(link: Arc<AmqpLink>, window: usize) -> Self {
        Self {
            link,
            channel: Mutex::new(None),
            window: window.max(1),
            topology: None,
        }
    }

    /// Declares `topology` on every new channel before publishing on it, so that queues
    /// exist after a broker restart or on a fresh broker.
    #[must_use]
    pub fn with_topology(mut self, topology: crate::topology::Topology) -> Self {
        self.topology = Some(topology);
        self
    }

    /// The link this publisher uses.
    pub fn link(&self) -> &Arc<AmqpLink> {
        &self.link
    }

    async fn confirm_channel(&self) -> Result<Channel, AmqpError> {
        let mut slot = self.channel.lock().await;
        if let Some(ch) = slot.as_ref()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        *slot = None;
        let ch = self.link.channel().await?;
        if let Some(t) = &self.topology {
            with_timeout(self.link.timeout(), t.declare(&ch)).await?;
        }
        with_timeout(
            self.link.timeout(),
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        *slot = Some(ch.clone());
        Ok(ch)
    }

    async fn forget_channel(&self) {
        *self.channel.lock().await = None;
    }

    /// Publishes every message and returns once the broker confirmed all of them.
    ///
    /// On error nothing is known about which messages arrived: the caller retries the
    /// whole set (consumers are idempotent, events carry an `event_id`).
    ///
    /// # Errors
    /// A broker error, a timeout, a nack, or an unroutable mandatory message.
    pub async fn publish_all(&self, messages: Vec<Outgoing<'_>>) -> Result<usize, AmqpError> {
        let result = self.publish_all_inner(messages).await;
        if let Err(e) = &result
            && !matches!(e, AmqpError::Unroutable(_) | AmqpError::Nacked)
        {
            self.forget_channel().await;
            self.link.refresh_health().await;
        }
        result
    }

    async fn publish_all_inner(&self, messages: Vec<Outgoing<'_>>) -> Result<usize, AmqpError> {
        let channel = self.confirm_channel().await?;
        let timeout = self.link.timeout();
        let mut pending: VecDeque<(PublisherConfirm, String)> = VecDeque::new();
        let mut count = 0;
        for msg in messages {
            if pending.len() >= self.window
                && let Some((confirm, key)) = pending.pop_front()
            {
                check(with_timeout(timeout, confirm).await?, key)?;
            }
            let confirm = with_timeout(
                timeout,
                channel.basic_publish(
                    ShortString::from(msg.exchange),
                    ShortString::from(msg.routing_key),
                    BasicPublishOptions {
                        mandatory: msg.mandatory,
                        ..BasicPublishOptions::default()
                    },
                    msg.body,
                    msg.properties.with_delivery_mode(2),
                ),
            )
            .await?;
            let key = if msg.mandatory {
                msg.routing_key.to_owned()
            } else {
                String::new()
            };
            pending.push_back((confirm, key));
            count += 1;
        }
        while let Some((confirm, key)) = pending.pop_front() {
            check(with_timeout(timeout, confirm).await?, key)?;
        }
        Ok(count)
    }
}

fn check(confirmation: Confirmation, routing_key: String) -> Result<(), AmqpError> {
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err(AmqpError::Unroutable(routing_key)),
        Confirmation::Nack(_) => Err(AmqpError::Nacked),
    }
}
