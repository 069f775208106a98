//! What both services do the same way around their own work: start (the settings, a check
//! of what the service cannot run without, telemetry, the shutdown signal), connect to the
//! engines, and exit with one line on stderr when they cannot go on.
//!
//! Connecting is lazy everywhere: a pool, the Redis client and a broker link are made
//! without reaching their engine, so a service starts while a dependency is down and
//! reports it on `/readyz` instead of crash-looping. What fails here is configuration (an
//! invalid URL), named by the keys that set it, never by the URL (which may hold a
//! password).

use std::process::ExitCode;
use std::sync::Arc;

use sea_orm::{DatabaseConnection, DbErr};
use tokio_util::sync::CancellationToken;

use crate::amqp::{AmqpError, AmqpLink};
use crate::config::{ConfigError, DatabaseSettings, Settings};
use crate::lock::{LockError, Locks};
use crate::topology::Topology;

/// What a service could not be started with, by the configuration keys behind it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database pool.
    #[error("database.url")]
    Database(#[source] DbErr),
    /// The Redis client.
    #[error("redis (redis.url, redis.nodes)")]
    Redis(#[source] LockError),
    /// A broker link.
    #[error("amqp.url / amqp.urls")]
    Broker(#[source] AmqpError),
}

/// A service's `main`: loads the settings, refuses to start when `check` fails (what the
/// service cannot run without), installs telemetry as `name` and runs `run` until SIGINT
/// or SIGTERM. Whatever stops it early is one line on stderr and a failing exit code.
pub async fn main<F, E>(
    name: &'static str,
    check: fn(&Settings) -> Result<(), ConfigError>,
    run: impl FnOnce(Settings, CancellationToken) -> F,
) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => return exit_failure(&e.to_string()),
    };
    if let Err(e) = check(&settings) {
        return exit_failure(&e.to_string());
    }
    // Held to the end: dropping it flushes the spans still queued (bounded).
    let _traces = match crate::telemetry::init_service(&settings, name) {
        Ok(t) => t,
        Err(e) => return exit_failure(&e.to_string()),
    };
    let shutdown = crate::shutdown::on_signal();
    match run(settings, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit_failure(&format!("{name}: {e:#}")),
    }
}

/// Prints `msg` on stderr as one line (a log collector keeps it whole) and returns the
/// failing exit code.
#[allow(
    clippy::print_stderr,
    reason = "a program that cannot start says why on stderr, before or without its logs"
)]
pub fn exit_failure(msg: &str) -> ExitCode {
    eprintln!("{}", msg.split_whitespace().collect::<Vec<_>>().join(" "));
    ExitCode::FAILURE
}

/// The service's main database pool.
///
/// # Errors
/// An unusable `database.url`.
pub async fn pool(settings: &DatabaseSettings) -> Result<DatabaseConnection, StartError> {
    crate::db::connect(settings)
        .await
        .map_err(StartError::Database)
}

/// A second, small pool for one purpose (the producer's CSV exports, the worker's control
/// connection that cancels timed-out queries), so that it never waits behind the main
/// pool's work: at most `max_connections`, none kept open while idle.
///
/// # Errors
/// An unusable `database.url`.
pub async fn side_pool(
    settings: &DatabaseSettings,
    max_connections: u32,
) -> Result<DatabaseConnection, StartError> {
    pool(&DatabaseSettings {
        max_connections,
        min_connections: 0,
        ..settings.clone()
    })
    .await
}

/// The Redis client of the record locks.
///
/// # Errors
/// Unusable `redis.*` settings.
pub fn locks(settings: &Settings) -> Result<Locks, StartError> {
    Locks::connect(&settings.redis).map_err(StartError::Redis)
}

/// A broker link called `name` (the name the broker shows for its connection), which
/// declares the bulk shards through their own nodes on a cluster.
///
/// # Errors
/// An unusable `amqp.url` or `amqp.urls`.
pub fn broker_link(
    settings: &Settings,
    name: &str,
    topology: &Topology,
) -> Result<Arc<AmqpLink>, StartError> {
    Ok(Arc::new(
        AmqpLink::new(&settings.amqp, name)
            .map_err(StartError::Broker)?
            .with_placement(topology.clone()),
    ))
}
