//! RabbitMQ connections that come back, and a publisher with confirms in windows.
//!
//! [`AmqpLink`] owns one connection and replaces it when it breaks; components ask it for
//! a fresh channel after an error (and re-declare, re-apply prefetch and re-consume
//! themselves), which is simpler to reason about than transparent recovery and avoids
//! lapin's recovery not re-applying `basic.qos`. Publishing and consuming use separate
//! links so that a resource alarm blocking publishers cannot stall consumers.
//!
//! A link knows every node of the cluster (`amqp.urls`, or `amqp.url` alone). Each
//! connect, first or re-made, tries the nodes in turn; a link starts at a random node, so
//! the clients of many processes spread over the cluster, and after losing a node it
//! starts with the next one. Logs name a node by `host:port` only, never by its URL (which
//! holds the password).
//!
//! [`Publisher`] publishes with publisher confirms, keeping at most `confirm_window`
//! publishes outstanding, and treats a mandatory message returned as unroutable as a
//! failure (lapin reports it as an ack carrying the returned message).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
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

/// Why a round of a loop that moves rows from the database to the broker failed (the
/// splitter's, the outbox relay's): one of the two did. The round is retried; nothing
/// is lost, since positions and deletions commit only after the broker confirmed.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    /// The broker failed.
    #[error(transparent)]
    Amqp(#[from] AmqpError),
}

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
    /// A URL could not be parsed (the message names the key, never the URL).
    #[error("{0} is not a valid AMQP URL")]
    BadUrl(String),
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

/// One node of the cluster: where to connect, and how logs name it.
#[derive(Clone)]
struct Node {
    uri: AMQPUri,
    /// `host:port`: never the URL, which holds the password.
    label: String,
}

/// One connection to the broker, replaced when it breaks; it may go to any node of the
/// cluster.
pub struct AmqpLink {
    nodes: Vec<Node>,
    /// The node the next connect tries first.
    next: AtomicUsize,
    name: String,
    timeout: Duration,
    current: Mutex<Option<(Arc<Connection>, usize)>>,
    healthy: AtomicBool,
    /// Bulk shards to declare through their own nodes before the first connection is used.
    placement: Option<crate::topology::Topology>,
    placed: AtomicBool,
}

impl std::fmt::Debug for AmqpLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URIs hold the password: show only the name and the nodes' addresses.
        let nodes: Vec<&str> = self.nodes.iter().map(|n| n.label.as_str()).collect();
        f.debug_struct("AmqpLink")
            .field("name", &self.name)
            .field("nodes", &nodes)
            .finish()
    }
}

impl AmqpLink {
    /// A link named `name` (shown in the broker's connection list) to the nodes of
    /// `amqp.urls` (or `amqp.url` alone), starting at a random one. Connects lazily.
    ///
    /// # Errors
    /// [`AmqpError::BadUrl`] when a URL does not parse.
    pub fn new(settings: &AmqpSettings, name: &str) -> Result<Self, AmqpError> {
        let listed = !settings.urls.is_empty();
        let mut nodes = Vec::new();
        for (i, url) in settings.node_urls().into_iter().enumerate() {
            let key = if listed {
                format!("amqp.urls entry {}", i + 1)
            } else {
                "amqp.url".to_owned()
            };
            let mut uri: AMQPUri = url
                .expose_secret()
                .trim()
                .parse()
                .map_err(|_| AmqpError::BadUrl(key))?;
            if uri.query.heartbeat.is_none() {
                uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS);
            }
            if uri.query.connection_timeout.is_none() {
                uri.query.connection_timeout =
                    Some(u64::try_from(settings.timeout().as_millis()).unwrap_or(u64::MAX));
            }
            let label = format!("{}:{}", uri.authority.host, uri.authority.port);
            nodes.push(Node { uri, label });
        }
        // A v4 UUID is 122 random bits: enough to pick a starting node without another
        // dependency.
        let start = usize::try_from(uuid::Uuid::new_v4().as_u128() % nodes.len().max(1) as u128)
            .unwrap_or(0);
        Ok(Self {
            nodes,
            next: AtomicUsize::new(start),
            name: name.to_owned(),
            timeout: settings.timeout(),
            current: Mutex::new(None),
            healthy: AtomicBool::new(false),
            placement: None,
            placed: AtomicBool::new(false),
        })
    }

    /// On its first connection, before handing it out, the link declares each of
    /// `topology`'s bulk shards through a connection to the node that is to lead it
    /// ([`crate::topology::Topology::shard_placement`]): RabbitMQ 3.10 puts a new quorum
    /// queue's leader on the declaring client's node, so the shards' leaders spread over the
    /// cluster whichever process declares first. Nothing to do with one node.
    #[must_use]
    pub fn with_placement(mut self, topology: crate::topology::Topology) -> Self {
        if self.nodes.len() > 1 {
            self.placement = Some(topology);
        }
        self
    }

    /// Declares the bulk shards through their nodes (best effort: a node that cannot be
    /// reached leaves its shard to be created wherever the first declaration happens).
    async fn place_shards(&self, topology: &crate::topology::Topology) {
        let placement = topology.shard_placement(self.nodes.len());
        for (i, node) in self.nodes.iter().enumerate() {
            let queues: Vec<&str> = placement
                .iter()
                .filter(|(_, n)| *n == i)
                .map(|(q, _)| q.as_str())
                .collect();
            if queues.is_empty() {
                continue;
            }
            let props = ConnectionProperties::default()
                .with_connection_name(LongString::from(format!("{}-placement", self.name)));
            let declared = async {
                let conn = with_timeout(
                    self.timeout,
                    Connection::connect_uri(node.uri.clone(), props),
                )
                .await?;
                let result = async {
                    let ch = with_timeout(self.timeout, conn.create_channel()).await?;
                    for q in &queues {
                        with_timeout(self.timeout, topology.declare_work_queue(&ch, q)).await?;
                    }
                    // The channel first: lapin logs an error for a connection closed under
                    // an open channel.
                    with_timeout(self.timeout, ch.close(200, "placed".into())).await?;
                    Ok::<(), AmqpError>(())
                }
                .await;
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), conn.close(200, "placed".into()))
                        .await;
                result
            };
            match declared.await {
                Ok(()) => {
                    tracing::info!(link = %self.name, node = %node.label, shards = ?queues, "bulk shards declared through their node");
                }
                Err(e) => {
                    tracing::warn!(link = %self.name, node = %node.label, error = %e, "could not declare bulk shards through their node; they go wherever they are first declared");
                }
            }
        }
    }

    /// The nodes' addresses (`host:port`), in configuration order.
    pub fn nodes(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.label.clone()).collect()
    }

    /// The address (`host:port`) of the node the link is connected to, if it is.
    pub async fn connected_node(&self) -> Option<String> {
        let current = self.current.lock().await;
        current
            .as_ref()
            .filter(|(c, _)| c.status().connected())
            .and_then(|(_, i)| self.nodes.get(*i))
            .map(|n| n.label.clone())
    }

    /// The timeout for one broker operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the current connection is up (for `/readyz`).
    pub fn is_connected(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The current connection, or a new one when there is none or it broke. A new one
    /// tries every node in turn, from the one after the node last used.
    ///
    /// # Errors
    /// When no node can be reached within the timeout (the last node's error).
    pub async fn connection(&self) -> Result<Arc<Connection>, AmqpError> {
        let mut current = self.current.lock().await;
        if let Some((conn, i)) = current.as_ref() {
            if conn.status().connected() {
                return Ok(conn.clone());
            }
            let node = self.nodes.get(*i).map_or("?", |n| n.label.as_str());
            tracing::warn!(link = %self.name, node, "broker connection lost; reconnecting");
            // Start with the next node: this one just failed us.
            self.next
                .store((*i + 1) % self.nodes.len().max(1), Ordering::Relaxed);
        }
        self.healthy.store(false, Ordering::Relaxed);
        *current = None;
        let first = self.next.load(Ordering::Relaxed);
        let mut last_error = AmqpError::BadUrl("amqp.urls (empty)".to_owned());
        for k in 0..self.nodes.len() {
            let i = (first + k) % self.nodes.len();
            let node = &self.nodes[i];
            let props = ConnectionProperties::default()
                .with_connection_name(LongString::from(self.name.as_str()));
            match with_timeout(
                self.timeout,
                Connection::connect_uri(node.uri.clone(), props),
            )
            .await
            {
                Ok(conn) => {
                    if let Some(topology) = &self.placement
                        && !self.placed.swap(true, Ordering::Relaxed)
                    {
                        self.place_shards(topology).await;
                    }
                    let conn = Arc::new(conn);
                    *current = Some((conn.clone(), i));
                    self.next.store(i, Ordering::Relaxed);
                    self.healthy.store(true, Ordering::Relaxed);
                    tracing::info!(link = %self.name, node = %node.label, "connected to the broker");
                    return Ok(conn);
                }
                Err(e) => {
                    if self.nodes.len() > 1 {
                        tracing::warn!(link = %self.name, node = %node.label, error = %e, "broker node unreachable; trying the next");
                    }
                    last_error = e;
                }
            }
        }
        // Next time, start one further on, so a node that hangs is not always tried first.
        self.next
            .store((first + 1) % self.nodes.len().max(1), Ordering::Relaxed);
        Err(last_error)
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
        if let Some((conn, i)) = current.take() {
            self.healthy.store(false, Ordering::Relaxed);
            // The node may be the thing that failed: the reconnect starts with the next.
            self.next
                .store((i + 1) % self.nodes.len().max(1), Ordering::Relaxed);
            // Closing may fail when the socket is already gone; there is nothing to do then.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                conn.close(200, "reconnecting".into()),
            )
            .await;
        }
    }

    /// Makes `channel` ready to consume from: declares the topology (idempotent, so a broker
    /// or a node that lost it has it again after a reconnect) and sets the prefetch of the
    /// consumers started after it on the channel, each within [`AmqpLink::timeout`]. The
    /// prefetch is per consumer: quorum queues refuse a global one.
    ///
    /// # Errors
    /// Broker errors and timeouts: the caller starts over with a new channel.
    pub async fn prepare_consuming(
        &self,
        channel: &Channel,
        topology: &crate::topology::Topology,
        prefetch: u16,
    ) -> Result<(), AmqpError> {
        with_timeout(self.timeout, topology.declare(channel)).await?;
        with_timeout(
            self.timeout,
            channel.basic_qos(prefetch, BasicQosOptions { global: false }),
        )
        .await
    }

    /// Starts a consumer of `queue` on `channel` (after [`AmqpLink::prepare_consuming`]),
    /// tagged `tag` so that it can be cancelled, within [`AmqpLink::timeout`].
    ///
    /// # Errors
    /// Broker errors and timeouts.
    pub async fn consume(
        &self,
        channel: &Channel,
        queue: &str,
        tag: &str,
    ) -> Result<lapin::Consumer, AmqpError> {
        with_timeout(
            self.timeout,
            channel.basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
    }

    /// A queue's state (ready messages, consumers) by a passive declare on `channel`,
    /// within [`AmqpLink::timeout`].
    ///
    /// # Errors
    /// Broker errors and timeouts; a queue that does not exist is an error that also closes
    /// the channel, so the caller stops using it.
    pub async fn queue_state(
        &self,
        channel: &Channel,
        queue: &str,
    ) -> Result<lapin::Queue, AmqpError> {
        with_timeout(
            self.timeout,
            channel.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
    }

    /// Refreshes the health flag from the connection's status.
    pub async fn refresh_health(&self) -> bool {
        let current = self.current.lock().await;
        let up = current
            .as_ref()
            .is_some_and(|(c, _)| c.status().connected());
        self.healthy.store(up, Ordering::Relaxed);
        up
    }

    /// Keeps the link connected until `shutdown`: reconnects with backoff whenever the
    /// connection is down, so readiness reflects the broker even while the link is idle.
    pub async fn maintain(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut backoff = crate::backoff::Backoff::reconnect();
        loop {
            let pause = if self.refresh_health().await {
                backoff.reset();
                Duration::from_secs(1)
            } else {
                match self.connection().await {
                    Ok(_) => Duration::from_secs(1),
                    Err(e) => {
                        tracing::warn!(link = %self.name, error = %e, "broker unreachable; retrying");
                        backoff.next_pause()
                    }
                }
            };
            if !crate::shutdown::sleep(&shutdown, pause).await {
                return;
            }
        }
    }

    /// Closes the connection (at shutdown).
    pub async fn close(&self) {
        let mut current = self.current.lock().await;
        if let Some((conn, _)) = current.take() {
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

    /// Drops the channel so that the next publish opens a new one; a channel still open is
    /// closed (best effort), so channels do not pile up on the connection.
    async fn forget_channel(&self) {
        let old = self.channel.lock().await.take();
        if let Some(ch) = old
            && ch.status().connected()
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), ch.close(200, "reopening".into()))
                .await;
        }
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
            && !matches!(e, AmqpError::Unroutable(_))
        {
            // A nack needs a new channel too. On RabbitMQ 3.10, a channel whose first
            // publish to a quorum queue comes while the queue elects a new leader (its node
            // was lost) is refused, and that channel goes on refusing every publish to the
            // queue; a channel opened a few seconds later publishes normally (seen in the
            // cluster suite).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Settings, Sources};

    fn settings(pairs: &[(&str, &str)]) -> AmqpSettings {
        let sources = Sources {
            env: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Sources::default()
        };
        Settings::load_from(&sources).unwrap().amqp
    }

    #[test]
    fn a_link_knows_every_node_by_address_only() {
        let s = settings(&[(
            "BULKOPS__AMQP__URLS",
            "amqp://u:pw-topsecret@n1:5672/%2f, amqp://u:pw-topsecret@n2:5673/%2f,amqp://u:pw-topsecret@n3/%2f",
        )]);
        let link = AmqpLink::new(&s, "test").unwrap();
        assert_eq!(link.nodes(), vec!["n1:5672", "n2:5673", "n3:5672"]);
        let shown = format!("{link:?}");
        assert!(shown.contains("n2:5673"), "{shown}");
        assert!(!shown.contains("topsecret"), "{shown}");
        // Without amqp.urls, amqp.url alone.
        let single = AmqpLink::new(&settings(&[]), "test").unwrap();
        assert_eq!(single.nodes(), vec!["127.0.0.1:5672"]);
    }

    #[test]
    fn links_start_at_random_nodes() {
        let s = settings(&[(
            "BULKOPS__AMQP__URLS",
            "amqp://u:p@n1/%2f,amqp://u:p@n2/%2f,amqp://u:p@n3/%2f",
        )]);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let link = AmqpLink::new(&s, "test").unwrap();
            let first = link.next.load(Ordering::Relaxed);
            assert!(first < 3);
            seen.insert(first);
        }
        assert_eq!(seen.len(), 3, "every node is some link's first");
    }

    #[tokio::test]
    async fn a_failed_connect_tries_every_node_and_names_none_by_url() {
        // Nothing listens on these ports: each attempt is refused at once.
        let ports: Vec<u16> = (0..3)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let urls: Vec<String> = ports
            .iter()
            .map(|p| format!("amqp://u:pw-topsecret@127.0.0.1:{p}/%2f"))
            .collect();
        let s = settings(&[
            ("BULKOPS__AMQP__URLS", &urls.join(",")),
            ("BULKOPS__AMQP__TIMEOUT_MS", "2000"),
        ]);
        let link = AmqpLink::new(&s, "test").unwrap();
        let first = link.next.load(Ordering::Relaxed);
        let err = link.connection().await.unwrap_err().to_string();
        assert!(!err.contains("topsecret"), "{err}");
        assert!(!link.is_connected());
        assert!(link.connected_node().await.is_none());
        // The next attempt starts one node further on.
        assert_eq!(link.next.load(Ordering::Relaxed), (first + 1) % 3);
    }
}
