//! The library both bulkops services stand on.
//!
//! The producer (HTTP API, splitting) and the worker (per-record processing) share
//! everything that defines the system's behaviour: how it is configured, what goes on a
//! queue, how queues are named and declared, how records are locked, which metrics exist,
//! and the CRM's business rules for bulk create and conversion. Keeping them here means
//! the two binaries cannot drift apart.
//!
//! # Layout
//! - [`config`]: typed, layered configuration (defaults, `config/default.toml`,
//!   `BULKOPS_CONFIG`, `BULKOPS__SECTION__KEY`), validated at start-up.
//! - [`telemetry`]: logs to stderr; OpenTelemetry traces over OTLP, and the W3C trace
//!   context carried over HTTP, AMQP and the database.
//! - [`ids`], [`batch`]: typed ids and the batch/item vocabulary (kinds, states, outcomes).
//! - [`batch_view`]: the batch read model (columns, views, row readers) every reader uses.
//! - [`csv_safe`]: the CSV writer and its spreadsheet-safe cell rule.
//! - [`messages`]: the versioned per-record work message (ids only).
//! - [`topology`]: AMQP names and their idempotent declaration.
//! - [`amqp`]: connections that come back, and a publisher with confirms in windows.
//! - [`backoff`]: the pauses of every reconnect and retry loop.
//! - [`db`]: the PostgreSQL pool and error classification.
//! - [`deadletters`]: the dead-letter queue for operators: list, and replay after a fix.
//! - [`lock`]: Redis locks (SET NX PX with a token, compare-and-delete release).
//! - [`net`]: TCP keepalives, so a half-open connection is noticed in seconds.
//! - [`filter`]: the Individual search filter, parsed into a typed value and turned into SQL.
//! - [`mapping`]: the field mappings of the create and convert rules, as data and pure
//!   functions that turn that data into SQL.
//! - [`progress`]: item outcomes, batch counters and exactly-once completion.
//! - [`permissions`]: who may search, bulk create and convert, as pure functions.
//! - [`outbox`]: the transactional outbox and its relay to the events exchange.
//! - [`metrics`]: every Prometheus metric, defined once.
//! - [`health`]: dependency checks behind `/readyz`.
//! - [`ratelog`]: log lines that stay few when a failure repeats.
//! - [`service`]: what both services do alike to start, connect and exit.
//! - [`shutdown`]: the SIGINT/SIGTERM future injected into every `run()`, and the pause
//!   between rounds that it cuts short.

pub mod amqp;
pub mod backoff;
pub mod batch;
pub mod batch_view;
pub mod config;
pub mod csv_safe;
pub mod db;
pub mod deadletters;
pub mod filter;
pub mod health;
pub mod ids;
pub mod lock;
pub mod mapping;
pub mod messages;
pub mod metrics;
pub mod net;
pub mod outbox;
pub mod permissions;
pub mod progress;
pub mod ratelog;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod topology;
