//! The end-to-end test harness.
//!
//! Each test gets its own [`env::TestEnv`]: a fresh database (migrated), an AMQP prefix, an
//! events exchange and a Redis prefix of its own, so tests run in parallel and never see
//! each other's data. It starts the real `bulkops-producer` and `bulkops-worker` binaries
//! (built by `make test` before the tests run) as child processes, captures their logs to
//! `target/e2e-logs/<test>/`, and captures every event published to its events exchange.
//!
//! # Layout
//! - [`env`]: the per-test environment and its clean-up.
//! - [`process`]: spawned programs (start, signal, logs).
//! - [`api`]: an HTTP client for the producer's API.
//! - [`console`]: the operator console's configuration, operators' tokens, a page client.
//! - [`cost`]: CPU seconds and peak memory per process (PostgreSQL, brokers, bulkops) for the benchmarks.
//! - [`browser`]: a headless Chromium driven over WebDriver, for the console's test.
//! - [`events`]: captured workflow events.
//! - [`otlp`]: an OTLP/HTTP trace receiver the test runs itself.
//! - [`fixture`]: CRM data builders.
//! - [`check`]: history checks every scenario ends with.
//! - [`proxy`]: a fault-injecting TCP proxy (and the switch a failover test repoints).
//! - [`rabbit_cluster`]: a 3-node RabbitMQ cluster of the test's own (kill, restart, leaders).
//! - [`scenario`]: the skeleton fault and cluster scenarios share (worlds, waits, tallies).
//! - [`services`]: PostgreSQL, RabbitMQ and Redis instances a test starts (and restarts) itself.
//! - [`redis_cluster`]: a Redis Cluster (3 masters, 3 replicas) and a Sentinel setup.
//! - [`pg_cluster`]: PgBouncer, and a PostgreSQL primary/standby pair behind a switch.

pub mod api;
pub mod browser;
pub mod check;
pub mod console;
pub mod cost;
pub mod env;
pub mod events;
pub mod fixture;
pub mod otlp;
pub mod pg_cluster;
pub mod process;
pub mod proxy;
pub mod rabbit_cluster;
pub mod redis_cluster;
pub mod scenario;
pub mod services;

pub use env::TestEnv;
