//! Typed, layered configuration.
//!
//! Layers, later ones winning: built-in defaults, `config/default.toml` (relative to the
//! working directory, optional), the file named by `BULKOPS_CONFIG` (required when set),
//! then environment variables `BULKOPS__SECTION__KEY` (for example
//! `BULKOPS__DATABASE__URL`). The result is validated once at start-up; a bad or missing
//! value stops the program with a one-line reason. URLs and the JWT secret are wrapped so
//! that they never print.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Why the configuration could not be used. The message is one line, names the key, and
/// never contains a secret.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// Everything bulkops can be told. Every binary reads the whole of it and uses its part.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// PostgreSQL, the CRM's database.
    pub database: DatabaseSettings,
    /// RabbitMQ: work queues and the events exchange.
    pub amqp: AmqpSettings,
    /// Redis: per-record locks.
    pub redis: RedisSettings,
    /// Authentication of API callers.
    #[serde(default)]
    pub auth: AuthSettings,
    /// The producer's HTTP API.
    pub http: HttpSettings,
    /// The worker's metrics and health endpoint.
    pub metrics: MetricsSettings,
    /// Per-record processing.
    pub worker: WorkerSettings,
    /// Turning accepted batches into messages.
    pub split: SplitSettings,
    /// The transactional outbox relay.
    pub outbox: OutboxSettings,
    /// Per-agency limits on what is accepted.
    pub limits: LimitsSettings,
    /// How long finished work is kept, and the pruner that removes it.
    pub retention: RetentionSettings,
    /// Logging.
    pub log: LogSettings,
    /// The operator console served by the producer under `/ui`.
    pub ui: UiSettings,
    /// Traces, beyond what the standard `OTEL_*` variables say.
    pub telemetry: TelemetrySettings,
}

/// `[telemetry]`: only what the standard `OTEL_*` environment does not cover. Export is
/// off unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set (see `telemetry::otel`).
#[derive(Debug, Clone, Deserialize)]
pub struct TelemetrySettings {
    /// Which spans are exported, as `tracing` filter directives (default `info`: every
    /// span bulkops opens; `debug` adds the health and metrics requests). Independent of
    /// `log.level`, so quiet logs keep full traces.
    pub filter: String,
    /// Longest the flush of queued spans may take at shutdown, in milliseconds (default
    /// 3000), so that the exit stays within its bound when the collector is away.
    pub flush_timeout_ms: u64,
}

/// `[database]`
#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    /// Connection URL, `postgres://user:password@host:port/database`.
    pub url: SecretString,
    /// Largest number of pooled connections per process.
    pub max_connections: u32,
    /// Connections kept open when idle.
    pub min_connections: u32,
    /// How long to wait for a pooled connection, in milliseconds.
    pub acquire_timeout_ms: u64,
    /// Server-side `statement_timeout` for every session, in milliseconds (0: none).
    pub statement_timeout_ms: u64,
    /// Client-side timeout of every database call outside a chunk's transaction (batch
    /// look-ups, the dead-letter watcher, the splitter, the outbox relay, accepting), in
    /// milliseconds: `statement_timeout` bounds the server's work, not a half-open
    /// connection that never answers.
    pub call_timeout_ms: u64,
    /// Server-side `idle_in_transaction_session_timeout` for every session, in
    /// milliseconds (0: none): a bulkops session that leaves a transaction open and idle
    /// (a stuck task, a half-open client connection) is ended by the server, releasing its
    /// locks and its snapshot.
    pub idle_in_transaction_timeout_ms: u64,
    /// Pooled connections of the producer's CSV exports, apart from the pool that accept,
    /// the splitter and the outbox relay use.
    pub export_max_connections: u32,
}

impl DatabaseSettings {
    /// [`DatabaseSettings::call_timeout_ms`] as a duration.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }
}

/// `[amqp]`
#[derive(Debug, Clone, Deserialize)]
pub struct AmqpSettings {
    /// Connection URL, `amqp://user:password@host:port/vhost`.
    pub url: SecretString,
    /// The nodes of one RabbitMQ cluster (`BULKOPS__AMQP__URLS`, comma-separated). When
    /// set, used instead of `url`: every (re)connect tries them in turn, starting at a
    /// random one.
    #[serde(default)]
    pub urls: Vec<SecretString>,
    /// How many queues the bulk lane is sharded into (their leaders spread over the
    /// cluster's nodes); the splitter spreads every batch over all of them and every worker
    /// consumes all of them.
    pub bulk_queues: u16,
    /// Every queue and internal exchange name starts with this.
    pub prefix: String,
    /// Topic exchange the CRM's workflow engine listens on.
    pub events_exchange: String,
    /// Unacknowledged deliveries a worker holds per lane (basic.qos prefetch count).
    pub prefetch: u16,
    /// Quorum queue `x-delivery-limit`: deliveries before the broker dead-letters a message
    /// that keeps crashing its consumers.
    pub delivery_limit: u32,
    /// Largest number of publishes awaiting a confirm on one channel.
    pub confirm_window: usize,
    /// Longest wait for a broker operation (connect, declare, confirm), in milliseconds.
    pub timeout_ms: u64,
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize)]
pub struct RedisSettings {
    /// How Redis is deployed: one server (`url`), a Redis Cluster or Sentinels (`nodes`).
    pub mode: RedisMode,
    /// Connection URL in standalone mode, `redis://[:password@]host:port[/db]`.
    pub url: SecretString,
    /// Cluster mode: seed nodes; sentinel mode: the Sentinels. `redis://host:port` each
    /// (`BULKOPS__REDIS__NODES`, comma-separated).
    #[serde(default)]
    pub nodes: Vec<SecretString>,
    /// Sentinel mode: the name of the monitored master.
    pub sentinel_master: String,
    /// Every key starts with this.
    pub prefix: String,
    /// Longest wait for one Redis command, in milliseconds.
    pub timeout_ms: u64,
}

/// `redis.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One Redis server at `redis.url`.
    Standalone,
    /// A Redis Cluster reached through the seed nodes in `redis.nodes`.
    Cluster,
    /// A master managed by the Sentinels in `redis.nodes`, named `redis.sentinel_master`.
    Sentinel,
}

impl RedisMode {
    /// The configured name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standalone => "standalone",
            Self::Cluster => "cluster",
            Self::Sentinel => "sentinel",
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuthSettings {
    /// HS256 secret that signs the CRM's JWTs. The producer refuses to start without it.
    pub jwt_secret: Option<SecretString>,
    /// HS256 secret that signs operators' tokens (claim `role: "operator"`), which open the
    /// console for every agency. Required when `ui.enabled`; must differ from `jwt_secret`,
    /// so that no CRM token is ever an operator's.
    pub operator_jwt_secret: Option<SecretString>,
}

/// `[ui]`
#[derive(Debug, Clone, Deserialize)]
pub struct UiSettings {
    /// Serve the operator console under `/ui`. Off by default: it is a second way into
    /// every agency's batches, so a deployment turns it on deliberately, with an operator
    /// secret, behind an ingress it chose.
    pub enabled: bool,
    /// When the session cookie carries `Secure`: `auto` (when the request came over TLS,
    /// as the ingress says with `X-Forwarded-Proto: https`), `always` or `never`.
    pub cookie_secure: CookieSecure,
}

/// `ui.cookie_secure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CookieSecure {
    /// `Secure` when the request arrived over TLS (`X-Forwarded-Proto: https`, or
    /// `Forwarded: proto=https`).
    Auto,
    /// Always `Secure` (the console is only ever reached over TLS).
    Always,
    /// Never `Secure` (plain HTTP on a trusted network, development).
    Never,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
pub struct HttpSettings {
    /// Address the producer listens on (port 0 picks a free one and logs it).
    pub bind: String,
    /// Largest request body accepted, in bytes (413 beyond).
    pub body_limit_bytes: usize,
    /// Longest time a request may take before it is answered 503, in milliseconds.
    pub request_timeout_ms: u64,
    /// A client that accepts no byte of its answer for this long is cut, in milliseconds
    /// (a CSV reader that stopped reading, a half-open connection).
    pub write_timeout_ms: u64,
    /// CSV exports streamed at once by one producer; one more is answered 503 with
    /// `Retry-After`.
    pub max_concurrent_exports: usize,
}

impl HttpSettings {
    /// [`HttpSettings::write_timeout_ms`] as a duration.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
pub struct MetricsSettings {
    /// Address of the worker's `/metrics`, `/healthz` and `/readyz`.
    pub bind: String,
}

/// `[worker]`
#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSettings {
    /// Chunks of deliveries processed at once on the bulk lane.
    pub concurrency: usize,
    /// Most deliveries handled in one database transaction.
    pub chunk_size: usize,
    /// How long a bulk-lane chunk may wait to fill while another chunk of the worker is in
    /// flight, in milliseconds, counted from its first delivery (0: start at once). A lone
    /// delivery on an idle worker never waits.
    pub chunk_linger_ms: u64,
    /// Lifetime of a record lock, in milliseconds; longer than any chunk's transaction.
    pub lock_ttl_ms: u64,
    /// Delivery attempts before an item that keeps failing transiently is failed and
    /// its message dead-lettered.
    pub max_attempts: u32,
    /// In-process retries of a transient failure before the message is handed to a
    /// delayed retry queue.
    pub in_process_retries: usize,
    /// Delay of each retry tier, in milliseconds; attempt `n` waits in tier `min(n, len)`.
    pub retry_delays_ms: Vec<u64>,
    /// Longest time SIGTERM waits for chunks in hand to finish, in seconds.
    pub drain_timeout_secs: u64,
    /// Longest a chunk's transaction may take, client-side, in milliseconds; its backend's
    /// query is then cancelled and the chunk retried (counted). 0: twice
    /// `database.statement_timeout_ms` (120 s when that is 0 too).
    pub chunk_timeout_ms: u64,
    /// How long a worker waits, with backoff, for a Redis that refuses lock writes (OOM,
    /// READONLY, MOVED, …) or does not answer, before it carries on without locks (the
    /// database decides) until Redis takes lock writes again, in milliseconds.
    pub lock_bypass_after_ms: u64,
}

/// `[split]`
#[derive(Debug, Clone, Deserialize)]
pub struct SplitSettings {
    /// Items read and published per round.
    pub chunk_size: usize,
    /// Most messages of one batch waiting in the work queue at once; the splitter tops up
    /// as items finish (0: no limit).
    pub max_in_flight_per_batch: u64,
    /// Most bulk-lane messages of one agency waiting in the work queues at once, shared by
    /// its batches: every agency with work gets the same share of the workers, however many
    /// batches it runs (0: no per-agency limit, batches share alone).
    pub max_in_flight_per_agency: u64,
    /// Batches of at most this many items go to the interactive lane.
    pub interactive_max_items: u64,
    /// How long a producer's claim on splitting a batch lasts without renewal, in seconds;
    /// another producer resumes a batch whose claim expired.
    pub lease_secs: u64,
    /// How often idle producers look for batches to split, in milliseconds.
    pub poll_interval_ms: u64,
    /// A batch whose split finished but whose items have not moved for this long is
    /// re-split (its pending items published again), in seconds.
    pub stall_after_secs: u64,
}

/// `[outbox]`
#[derive(Debug, Clone, Deserialize)]
pub struct OutboxSettings {
    /// Whether this process relays outbox rows to the events exchange.
    pub enabled: bool,
    /// Outbox rows (each the events of one transaction) published per round.
    pub batch_size: u64,
    /// Pause between rounds when the outbox is empty, in milliseconds.
    pub poll_interval_ms: u64,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
pub struct LimitsSettings {
    /// Most undecided (pending) items an agency may have across its batches; a bulk create
    /// or conversion that would take it over this is answered 429 (0: no limit). A
    /// single-record conversion is never refused (it still counts).
    pub max_active_items_per_agency: u64,
}

/// `[retention]`. A value of 0 days keeps that kind of row for ever.
#[derive(Debug, Clone, Deserialize)]
pub struct RetentionSettings {
    /// Whether this process takes part in pruning (one process at a time prunes, under a
    /// lease).
    pub enabled: bool,
    /// Days a completed batch's items are kept after it completed; the batch itself (its
    /// counts, who asked, the filter, timestamps) is kept for ever.
    pub items_days: u64,
    /// Days an `Idempotency-Key` (and the answer it replays) is kept.
    pub idempotency_keys_days: u64,
    /// Days a conversion's log row (which Individual a deleted Sales Record became) is kept.
    pub conversion_log_days: u64,
    /// Days an outbox row that could not be relayed is kept before it is dropped (with a
    /// warning and a metric).
    pub outbox_days: u64,
    /// Seconds between pruning passes.
    pub interval_secs: u64,
    /// Rows deleted per statement (each its own short transaction).
    pub delete_chunk: u64,
    /// Pause between two deletes, in milliseconds, so that workers and the API never stall.
    pub pause_ms: u64,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    /// `tracing` filter directives, e.g. `info` or `info,bulkops_worker=debug`;
    /// `RUST_LOG` wins when set.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

/// Where configuration comes from. [`Sources::from_process`] is what the binaries use;
/// tests build their own without touching the process environment.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `config/default.toml` or another base file; skipped when absent.
    pub default_file: Option<PathBuf>,
    /// The file named by `BULKOPS_CONFIG`; must exist when given.
    pub override_file: Option<PathBuf>,
    /// Environment variables (only `BULKOPS__…` ones are read).
    pub env: HashMap<String, String>,
}

impl Sources {
    /// The process's own sources: `config/default.toml`, `BULKOPS_CONFIG`, the environment.
    pub fn from_process() -> Self {
        Self {
            default_file: Some(PathBuf::from("config/default.toml")),
            override_file: std::env::var_os("BULKOPS_CONFIG").map(PathBuf::from),
            env: std::env::vars().collect(),
        }
    }
}

const DEFAULTS: &[(&str, &str)] = &[
    ("database.url", "postgres://postgres@127.0.0.1:5432/bulkops"),
    ("database.max_connections", "10"),
    ("database.min_connections", "1"),
    ("database.acquire_timeout_ms", "5000"),
    ("database.statement_timeout_ms", "60000"),
    ("database.call_timeout_ms", "15000"),
    ("database.idle_in_transaction_timeout_ms", "60000"),
    ("database.export_max_connections", "2"),
    ("amqp.url", "amqp://guest:guest@127.0.0.1:5672/%2f"),
    ("amqp.prefix", "bulkops"),
    ("amqp.events_exchange", "crm.events"),
    ("amqp.prefetch", "1000"),
    ("amqp.delivery_limit", "20"),
    ("amqp.confirm_window", "2000"),
    ("amqp.timeout_ms", "10000"),
    ("amqp.bulk_queues", "1"),
    ("redis.mode", "standalone"),
    ("redis.url", "redis://127.0.0.1:6379"),
    ("redis.sentinel_master", "mymaster"),
    ("redis.prefix", "bulkops"),
    ("redis.timeout_ms", "2000"),
    ("http.bind", "127.0.0.1:8080"),
    ("http.body_limit_bytes", "4194304"),
    ("http.request_timeout_ms", "30000"),
    ("http.write_timeout_ms", "30000"),
    ("http.max_concurrent_exports", "4"),
    ("metrics.bind", "127.0.0.1:9090"),
    ("worker.concurrency", "2"),
    ("worker.chunk_size", "250"),
    ("worker.chunk_linger_ms", "50"),
    ("worker.lock_ttl_ms", "15000"),
    ("worker.max_attempts", "5"),
    ("worker.in_process_retries", "3"),
    ("worker.drain_timeout_secs", "25"),
    ("worker.chunk_timeout_ms", "0"),
    ("worker.lock_bypass_after_ms", "10000"),
    ("split.chunk_size", "2000"),
    ("split.max_in_flight_per_batch", "20000"),
    ("split.max_in_flight_per_agency", "20000"),
    ("split.interactive_max_items", "100"),
    ("split.lease_secs", "10"),
    ("split.poll_interval_ms", "500"),
    ("split.stall_after_secs", "120"),
    ("outbox.enabled", "true"),
    ("outbox.batch_size", "50"),
    ("outbox.poll_interval_ms", "50"),
    ("limits.max_active_items_per_agency", "1000000"),
    ("retention.enabled", "true"),
    ("retention.items_days", "90"),
    ("retention.idempotency_keys_days", "7"),
    ("retention.conversion_log_days", "3650"),
    ("retention.outbox_days", "30"),
    ("retention.interval_secs", "300"),
    ("retention.delete_chunk", "5000"),
    ("retention.pause_ms", "20"),
    ("log.level", "info"),
    ("log.format", "text"),
    ("ui.enabled", "false"),
    ("ui.cookie_secure", "auto"),
    ("telemetry.filter", "info"),
    ("telemetry.flush_timeout_ms", "3000"),
];

impl Settings {
    /// Loads and validates the process's configuration.
    ///
    /// # Errors
    /// A one-line [`ConfigError`] naming the key that is missing or invalid.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_from(&Sources::from_process())
    }

    /// Loads and validates configuration from explicit sources.
    ///
    /// # Errors
    /// A one-line [`ConfigError`] naming the key that is missing or invalid.
    pub fn load_from(sources: &Sources) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        for (key, value) in DEFAULTS {
            builder = builder
                .set_default(*key, *value)
                .map_err(|e| ConfigError::new(e.to_string()))?;
        }
        builder = builder
            .set_default("worker.retry_delays_ms", vec![1000_i64, 5000, 30000])
            .map_err(|e| ConfigError::new(e.to_string()))?;
        if let Some(path) = &sources.default_file {
            builder = builder.add_source(config::File::from(path.as_path()).required(false));
        }
        if let Some(path) = &sources.override_file {
            if !path.is_file() {
                return Err(ConfigError::new(format!(
                    "BULKOPS_CONFIG names {}, which is not a readable file",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path.as_path()).required(true));
        }
        let env: config::Map<String, String> = sources
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("BULKOPS__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("BULKOPS")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("worker.retry_delays_ms")
                .with_list_parse_key("amqp.urls")
                .with_list_parse_key("redis.nodes")
                .try_parsing(true)
                .source(Some(env)),
        );
        let raw = builder
            .build()
            .map_err(|e| ConfigError::new(one_line(&e.to_string())))?;
        let mut settings: Settings = raw
            .try_deserialize()
            .map_err(|e| ConfigError::new(one_line(&redact_variant(&e.to_string()))))?;
        // An empty `BULKOPS__AMQP__URLS=` (or a trailing comma) means no entry, not an
        // entry that is an empty URL.
        settings
            .amqp
            .urls
            .retain(|u| !u.expose_secret().trim().is_empty());
        settings
            .redis
            .nodes
            .retain(|u| !u.expose_secret().trim().is_empty());
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_url(
            &self.database.url,
            "database.url",
            &["postgres", "postgresql"],
        )?;
        // With amqp.urls set, amqp.url is not used (a deployment may leave it empty).
        if self.amqp.urls.is_empty() {
            check_url(&self.amqp.url, "amqp.url", &["amqp", "amqps"])?;
        }
        check_url(&self.redis.url, "redis.url", &["redis", "rediss"])?;
        for (i, url) in self.amqp.urls.iter().enumerate() {
            if url
                .expose_secret()
                .trim()
                .parse::<lapin::uri::AMQPUri>()
                .is_err()
            {
                return Err(ConfigError::new(format!(
                    "amqp.urls entry {} is not a valid AMQP URL (amqp://user:password@host:port/vhost)",
                    i + 1
                )));
            }
        }
        for (i, url) in self.redis.nodes.iter().enumerate() {
            check_url(
                url,
                &format!("redis.nodes entry {}", i + 1),
                &["redis", "rediss"],
            )?;
        }
        if self.redis.mode != RedisMode::Standalone && self.redis.nodes.is_empty() {
            return Err(ConfigError::new(format!(
                "redis.nodes must list at least one node when redis.mode is {} (BULKOPS__REDIS__NODES, comma-separated)",
                self.redis.mode.as_str()
            )));
        }
        if self.redis.mode == RedisMode::Sentinel && self.redis.sentinel_master.trim().is_empty() {
            return Err(ConfigError::new(
                "redis.sentinel_master must name the master when redis.mode is sentinel",
            ));
        }
        if self.amqp.bulk_queues == 0 || self.amqp.bulk_queues > 64 {
            return Err(ConfigError::new(
                "amqp.bulk_queues must be between 1 and 64",
            ));
        }
        check_name(&self.amqp.prefix, "amqp.prefix")?;
        check_name(&self.amqp.events_exchange, "amqp.events_exchange")?;
        check_name(&self.redis.prefix, "redis.prefix")?;
        check_addr(&self.http.bind, "http.bind")?;
        check_addr(&self.metrics.bind, "metrics.bind")?;
        if let Some(secret) = &self.auth.jwt_secret
            && secret.expose_secret().is_empty()
        {
            return Err(ConfigError::new("auth.jwt_secret is set but empty"));
        }
        if let Some(secret) = &self.auth.operator_jwt_secret {
            if secret.expose_secret().len() < 16 {
                return Err(ConfigError::new(
                    "auth.operator_jwt_secret must be at least 16 characters",
                ));
            }
            if self
                .auth
                .jwt_secret
                .as_ref()
                .is_some_and(|crm| crm.expose_secret() == secret.expose_secret())
            {
                return Err(ConfigError::new(
                    "auth.operator_jwt_secret must differ from auth.jwt_secret (a CRM token must never be an operator's)",
                ));
            }
        }
        if self.ui.enabled && self.auth.operator_jwt_secret.is_none() {
            return Err(ConfigError::new(
                "ui.enabled needs auth.operator_jwt_secret: set BULKOPS__AUTH__OPERATOR_JWT_SECRET",
            ));
        }
        positive(
            self.database.max_connections.into(),
            "database.max_connections",
        )?;
        if self.database.min_connections > self.database.max_connections {
            return Err(ConfigError::new(
                "database.min_connections must not exceed database.max_connections",
            ));
        }
        positive(self.database.call_timeout_ms, "database.call_timeout_ms")?;
        positive(
            self.database.export_max_connections.into(),
            "database.export_max_connections",
        )?;
        positive(self.http.write_timeout_ms, "http.write_timeout_ms")?;
        positive(
            self.http.max_concurrent_exports as u64,
            "http.max_concurrent_exports",
        )?;
        positive(self.amqp.prefetch.into(), "amqp.prefetch")?;
        positive(self.amqp.delivery_limit.into(), "amqp.delivery_limit")?;
        positive(self.amqp.confirm_window as u64, "amqp.confirm_window")?;
        positive(self.amqp.timeout_ms, "amqp.timeout_ms")?;
        positive(self.redis.timeout_ms, "redis.timeout_ms")?;
        positive(self.http.body_limit_bytes as u64, "http.body_limit_bytes")?;
        positive(self.worker.concurrency as u64, "worker.concurrency")?;
        positive(self.worker.chunk_size as u64, "worker.chunk_size")?;
        if self.worker.chunk_size > 5000 {
            return Err(ConfigError::new("worker.chunk_size must be at most 5000"));
        }
        if self.worker.chunk_linger_ms > 1000 {
            return Err(ConfigError::new(
                "worker.chunk_linger_ms must be at most 1000",
            ));
        }
        positive(self.worker.lock_ttl_ms, "worker.lock_ttl_ms")?;
        positive(self.worker.max_attempts.into(), "worker.max_attempts")?;
        if self.worker.retry_delays_ms.is_empty() || self.worker.retry_delays_ms.contains(&0) {
            return Err(ConfigError::new(
                "worker.retry_delays_ms must list at least one positive delay",
            ));
        }
        // A worker that dies holding locks leaves them until they expire; the retries of
        // the items it held must outlast that, or they would fail for nothing.
        let tiers = &self.worker.retry_delays_ms;
        let waited: u64 = (1..self.worker.max_attempts)
            .map(|attempt| tiers[(attempt as usize).min(tiers.len()) - 1])
            .sum();
        if waited <= self.worker.lock_ttl_ms {
            return Err(ConfigError::new(format!(
                "worker.retry_delays_ms over worker.max_attempts wait {waited} ms in all, which must exceed worker.lock_ttl_ms ({} ms)",
                self.worker.lock_ttl_ms
            )));
        }
        if self.worker.drain_timeout_secs == 0 || self.worker.drain_timeout_secs > 29 {
            return Err(ConfigError::new(
                "worker.drain_timeout_secs must be between 1 and 29 (SIGTERM drains within 30 s)",
            ));
        }
        positive(self.split.chunk_size as u64, "split.chunk_size")?;
        positive(self.split.lease_secs, "split.lease_secs")?;
        positive(self.split.poll_interval_ms, "split.poll_interval_ms")?;
        positive(self.split.stall_after_secs, "split.stall_after_secs")?;
        positive(self.retention.interval_secs, "retention.interval_secs")?;
        positive(self.retention.delete_chunk, "retention.delete_chunk")?;
        if self.retention.delete_chunk > 100_000 {
            return Err(ConfigError::new(
                "retention.delete_chunk must be at most 100000 (small deletes keep locks short)",
            ));
        }
        positive(self.outbox.batch_size, "outbox.batch_size")?;
        positive(self.outbox.poll_interval_ms, "outbox.poll_interval_ms")?;
        if self.telemetry.flush_timeout_ms > 10_000 {
            return Err(ConfigError::new(
                "telemetry.flush_timeout_ms must be at most 10000 (the exit is bounded)",
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::new("log.format must be \"text\" or \"json\""));
        }
        Ok(())
    }

    /// The JWT secret, or the error the producer stops with when it is missing.
    ///
    /// # Errors
    /// When `auth.jwt_secret` is not configured.
    pub fn require_jwt_secret(&self) -> Result<&SecretString, ConfigError> {
        self.auth.jwt_secret.as_ref().ok_or_else(|| {
            ConfigError::new(
                "auth.jwt_secret is required: set BULKOPS__AUTH__JWT_SECRET or [auth] jwt_secret",
            )
        })
    }
}

impl AmqpSettings {
    /// The broker URLs to try: `amqp.urls` when set, otherwise `amqp.url` alone.
    pub fn node_urls(&self) -> Vec<&SecretString> {
        if self.urls.is_empty() {
            vec![&self.url]
        } else {
            self.urls.iter().collect()
        }
    }

    /// [`AmqpSettings::timeout_ms`] as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

impl RedisSettings {
    /// [`RedisSettings::timeout_ms`] as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

impl WorkerSettings {
    /// Lock lifetime as a duration.
    pub fn lock_ttl(&self) -> Duration {
        Duration::from_millis(self.lock_ttl_ms)
    }

    /// The chunk timeout in force, given the session's statement timeout.
    pub fn chunk_timeout(&self, statement_timeout_ms: u64) -> Duration {
        Duration::from_millis(match (self.chunk_timeout_ms, statement_timeout_ms) {
            (0, 0) => 120_000,
            (0, ms) => ms.saturating_mul(2),
            (ms, _) => ms,
        })
    }

    /// [`WorkerSettings::chunk_linger_ms`] as a duration.
    pub fn chunk_linger(&self) -> Duration {
        Duration::from_millis(self.chunk_linger_ms)
    }

    /// [`WorkerSettings::lock_bypass_after_ms`] as a duration.
    pub fn lock_bypass_after(&self) -> Duration {
        Duration::from_millis(self.lock_bypass_after_ms)
    }

    /// Retry tier delays as durations.
    pub fn retry_delays(&self) -> Vec<Duration> {
        self.retry_delays_ms
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect()
    }
}

/// serde names the offending value in an unknown-variant error; the only enum in the
/// settings is `redis.mode`, whose value is no secret, but keep the message about the key.
fn redact_variant(s: &str) -> String {
    if s.contains("redis.mode") && (s.contains("variant") || s.contains("enum RedisMode")) {
        return "redis.mode must be standalone, cluster or sentinel".to_owned();
    }
    if s.contains("ui.cookie_secure") && (s.contains("variant") || s.contains("CookieSecure")) {
        return "ui.cookie_secure must be auto, always or never".to_owned();
    }
    s.to_owned()
}

/// The config crate's messages can span lines; ours are one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn positive(value: u64, key: &str) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::new(format!("{key} must be greater than 0")));
    }
    Ok(())
}

fn check_url(url: &SecretString, key: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let url = url.expose_secret();
    let scheme = url.split_once("://").map(|(s, _)| s);
    match scheme {
        Some(s) if schemes.contains(&s) => Ok(()),
        _ => Err(ConfigError::new(format!(
            "{key} must be a URL starting with {}://",
            schemes.join(":// or ")
        ))),
    }
}

fn check_name(name: &str, key: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(format!(
            "{key} must be 1 to 100 characters of letters, digits, '.', '_' or '-'"
        )))
    }
}

fn check_addr(addr: &str, key: &str) -> Result<(), ConfigError> {
    addr.parse::<SocketAddr>()
        .map(|_| ())
        .map_err(|_| ConfigError::new(format!("{key} must be host:port, e.g. 127.0.0.1:8080")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Sources {
        Sources {
            env: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Sources::default()
        }
    }

    #[test]
    fn defaults_match_the_contract() {
        let s = Settings::load_from(&Sources::default()).unwrap();
        assert_eq!(
            s.database.url.expose_secret(),
            "postgres://postgres@127.0.0.1:5432/bulkops"
        );
        assert_eq!(
            s.amqp.url.expose_secret(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(s.amqp.prefix, "bulkops");
        assert_eq!(s.amqp.events_exchange, "crm.events");
        assert_eq!(s.redis.url.expose_secret(), "redis://127.0.0.1:6379");
        assert_eq!(s.redis.prefix, "bulkops");
        assert!(s.auth.jwt_secret.is_none());
        assert_eq!(s.http.bind, "127.0.0.1:8080");
        assert_eq!(s.metrics.bind, "127.0.0.1:9090");
        assert_eq!(s.limits.max_active_items_per_agency, 1_000_000);
        assert_eq!(s.retention.items_days, 90);
        assert_eq!(s.retention.idempotency_keys_days, 7);
        assert_eq!(s.retention.conversion_log_days, 3650);
        assert_eq!(s.retention.outbox_days, 30);
        assert_eq!(s.split.max_in_flight_per_agency, 20_000);
    }

    #[test]
    fn quota_and_retention_come_from_the_environment() {
        let s = Settings::load_from(&env(&[
            ("BULKOPS__LIMITS__MAX_ACTIVE_ITEMS_PER_AGENCY", "500"),
            ("BULKOPS__RETENTION__ITEMS_DAYS", "0"),
            ("BULKOPS__RETENTION__ENABLED", "false"),
        ]))
        .unwrap();
        assert_eq!(s.limits.max_active_items_per_agency, 500);
        assert_eq!(s.retention.items_days, 0);
        assert!(!s.retention.enabled);
        let err = Settings::load_from(&env(&[("BULKOPS__RETENTION__DELETE_CHUNK", "0")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("retention.delete_chunk"), "{err}");
    }

    #[test]
    fn environment_overrides_with_double_underscores() {
        let s = Settings::load_from(&env(&[
            ("BULKOPS__AMQP__PREFIX", "t42"),
            ("BULKOPS__AUTH__JWT_SECRET", "s3cret"),
            ("BULKOPS__WORKER__CHUNK_SIZE", "17"),
            ("BULKOPS__WORKER__RETRY_DELAYS_MS", "10,20"),
            ("BULKOPS__WORKER__LOCK_TTL_MS", "50"),
            ("OTHER__AMQP__PREFIX", "ignored"),
        ]))
        .unwrap();
        assert_eq!(s.amqp.prefix, "t42");
        assert_eq!(s.worker.chunk_size, 17);
        assert_eq!(s.worker.retry_delays_ms, vec![10, 20]);
        assert_eq!(s.require_jwt_secret().unwrap().expose_secret(), "s3cret");
    }

    #[test]
    fn secrets_never_print() {
        let s = Settings::load_from(&env(&[
            ("BULKOPS__AUTH__JWT_SECRET", "hunter2-topsecret"),
            ("BULKOPS__DATABASE__URL", "postgres://u:pw-topsecret@h/db"),
        ]))
        .unwrap();
        let printed = format!("{s:?}");
        assert!(!printed.contains("topsecret"), "{printed}");
    }

    #[test]
    fn bad_values_give_one_line_naming_the_key() {
        for (key, value, expect) in [
            ("BULKOPS__AMQP__PREFIX", "has space", "amqp.prefix"),
            ("BULKOPS__DATABASE__URL", "mysql://x", "database.url"),
            ("BULKOPS__HTTP__BIND", "nowhere", "http.bind"),
            ("BULKOPS__WORKER__CHUNK_SIZE", "0", "worker.chunk_size"),
            ("BULKOPS__WORKER__CHUNK_SIZE", "many", "chunk_size"),
            ("BULKOPS__LOG__FORMAT", "xml", "log.format"),
            ("BULKOPS__WORKER__MAX_ATTEMPTS", "2", "worker.lock_ttl_ms"),
        ] {
            let err = Settings::load_from(&env(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{key}={value}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn cluster_keys_parse_from_the_environment() {
        let s = Settings::load_from(&env(&[
            (
                "BULKOPS__AMQP__URLS",
                "amqp://u:p@n1:5672/%2f,amqp://u:p@n2:5672/%2f,",
            ),
            ("BULKOPS__AMQP__BULK_QUEUES", "3"),
            ("BULKOPS__REDIS__MODE", "cluster"),
            ("BULKOPS__REDIS__NODES", "redis://n1:7000,redis://n2:7001"),
        ]))
        .unwrap();
        assert_eq!(s.amqp.urls.len(), 2);
        assert_eq!(s.amqp.node_urls().len(), 2);
        assert_eq!(s.amqp.bulk_queues, 3);
        assert_eq!(s.redis.mode, RedisMode::Cluster);
        assert_eq!(s.redis.nodes.len(), 2);
        assert_eq!(s.redis.sentinel_master, "mymaster");
        // amqp.url is unused, so may be empty, when amqp.urls lists the nodes.
        let s = Settings::load_from(&env(&[
            ("BULKOPS__AMQP__URL", ""),
            ("BULKOPS__AMQP__URLS", "amqp://u:p@n1:5672/%2f"),
        ]))
        .unwrap();
        assert_eq!(s.amqp.node_urls().len(), 1);
        let d = Settings::load_from(&Sources::default()).unwrap();
        assert_eq!(d.redis.mode, RedisMode::Standalone);
        assert_eq!(d.amqp.node_urls().len(), 1);
        assert_eq!(d.amqp.bulk_queues, 1);
    }

    #[test]
    fn bad_cluster_keys_are_named_and_passwords_never_printed() {
        for (pairs, expect) in [
            (vec![("BULKOPS__REDIS__MODE", "galaxy")], "redis.mode"),
            (vec![("BULKOPS__REDIS__MODE", "cluster")], "redis.nodes"),
            (
                vec![
                    ("BULKOPS__REDIS__MODE", "sentinel"),
                    ("BULKOPS__REDIS__NODES", ""),
                ],
                "redis.nodes",
            ),
            (
                vec![(
                    "BULKOPS__AMQP__URLS",
                    "amqp://u:pw-topsecret@n1/%2f,http://u:pw-topsecret@n2",
                )],
                "amqp.urls",
            ),
            (
                vec![(
                    "BULKOPS__REDIS__NODES",
                    "redis://:pw-topsecret@n1:1,tcp://x",
                )],
                "redis.nodes",
            ),
            (
                vec![("BULKOPS__AMQP__BULK_QUEUES", "0")],
                "amqp.bulk_queues",
            ),
        ] {
            let err = Settings::load_from(&env(&pairs)).unwrap_err().to_string();
            assert!(err.contains(expect), "{pairs:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
            assert!(!err.contains("topsecret"), "{err}");
        }
    }

    #[test]
    fn the_console_is_off_unless_enabled_with_its_own_secret() {
        let d = Settings::load_from(&Sources::default()).unwrap();
        assert!(!d.ui.enabled);
        assert_eq!(d.ui.cookie_secure, CookieSecure::Auto);
        assert!(d.auth.operator_jwt_secret.is_none());
        let s = Settings::load_from(&env(&[
            ("BULKOPS__UI__ENABLED", "true"),
            ("BULKOPS__UI__COOKIE_SECURE", "always"),
            ("BULKOPS__AUTH__JWT_SECRET", "crm-secret-0123456789"),
            (
                "BULKOPS__AUTH__OPERATOR_JWT_SECRET",
                "ops-secret-0123456789",
            ),
        ]))
        .unwrap();
        assert!(s.ui.enabled);
        assert_eq!(s.ui.cookie_secure, CookieSecure::Always);
        for (pairs, expect) in [
            (vec![("BULKOPS__UI__ENABLED", "true")], "ui.enabled needs"),
            (
                vec![
                    ("BULKOPS__AUTH__JWT_SECRET", "same-secret-0123456789"),
                    (
                        "BULKOPS__AUTH__OPERATOR_JWT_SECRET",
                        "same-secret-0123456789",
                    ),
                ],
                "must differ",
            ),
            (
                vec![("BULKOPS__AUTH__OPERATOR_JWT_SECRET", "short")],
                "at least 16",
            ),
            (
                vec![("BULKOPS__UI__COOKIE_SECURE", "sometimes")],
                "ui.cookie_secure must be auto, always or never",
            ),
        ] {
            let err = Settings::load_from(&env(&pairs)).unwrap_err().to_string();
            assert!(err.contains(expect), "{pairs:?}: {err}");
            assert!(!err.contains("0123456789"), "{err}");
        }
    }

    #[test]
    fn missing_jwt_secret_is_a_clear_error() {
        let s = Settings::load_from(&Sources::default()).unwrap();
        let err = s.require_jwt_secret().unwrap_err().to_string();
        assert!(err.contains("auth.jwt_secret"), "{err}");
    }

    #[test]
    fn missing_override_file_is_an_error() {
        let sources = Sources {
            override_file: Some(PathBuf::from("/nonexistent/bulkops.toml")),
            ..Sources::default()
        };
        let err = Settings::load_from(&sources).unwrap_err().to_string();
        assert!(err.contains("BULKOPS_CONFIG"), "{err}");
    }
}
