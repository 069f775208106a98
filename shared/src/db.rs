//! The PostgreSQL pool (through sea-orm) and database error classification.
//!
//! bulkops' hot paths are set-based SQL statements with array parameters; [`stmt`] builds
//! them, and sqlx prepares and caches each distinct statement per connection. Statement
//! logging is off: at INFO it costs CPU on every statement and fills logs.

use std::time::Duration;

use sea_orm::{ConnectOptions, DatabaseConnection, DbBackend, DbErr, RuntimeErr, Statement, Value};
use secrecy::ExposeSecret;

use crate::config::DatabaseSettings;

/// Opens the pool. Connections are made lazily, so a database that is down at start-up
/// makes `/readyz` answer 503 instead of stopping the process; it comes back by itself.
///
/// # Errors
/// When the URL is invalid.
pub async fn connect(settings: &DatabaseSettings) -> Result<DatabaseConnection, DbErr> {
    let mut opts = ConnectOptions::new(settings.url.expose_secret().to_owned());
    opts.max_connections(settings.max_connections)
        .min_connections(settings.min_connections)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .idle_timeout(Duration::from_secs(300))
        .connect_lazy(true)
        .sqlx_logging(false);
    let statement_timeout = settings.statement_timeout_ms;
    opts.map_sqlx_postgres_opts(move |o| {
        let o = o.application_name("bulkops");
        if statement_timeout > 0 {
            o.options([("statement_timeout", format!("{statement_timeout}ms"))])
        } else {
            o
        }
    });
    sea_orm::Database::connect(opts).await
}

/// A PostgreSQL statement with positional (`$n`) parameters.
pub fn stmt(sql: impl Into<String>, values: impl IntoIterator<Item = Value>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

/// The SQLSTATE of a database error, when there is one.
pub fn sqlstate(err: &DbErr) -> Option<String> {
    let runtime = match err {
        DbErr::Exec(r) | DbErr::Query(r) | DbErr::Conn(r) => r,
        _ => return None,
    };
    match runtime {
        RuntimeErr::SqlxError(e) => e
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned()),
        _ => None,
    }
}

/// Whether an error is worth retrying: the connection dropped, the pool or the server
/// timed out, the server is restarting, or the transaction lost a deadlock or
/// serialization race. Everything else (constraint violations, bad SQL) is permanent.
pub fn is_transient(err: &DbErr) -> bool {
    if is_client_timeout(err) {
        return true;
    }
    if let Some(code) = sqlstate(err) {
        return matches!(
            code.as_str(),
            "40001" // serialization_failure
                | "40P01" // deadlock_detected
                | "55P03" // lock_not_available
                | "57014" // query_canceled (statement_timeout)
                | "57P01" // admin_shutdown
                | "57P02" // crash_shutdown
                | "57P03" // cannot_connect_now
                | "53300" // too_many_connections
                | "53400" // configuration_limit_exceeded
        ) || code.starts_with("08"); // connection_exception
    }
    match err {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            matches!(
                e.as_ref(),
                sea_orm::sqlx::Error::Io(_)
                    | sea_orm::sqlx::Error::PoolTimedOut
                    | sea_orm::sqlx::Error::PoolClosed
                    | sea_orm::sqlx::Error::WorkerCrashed
                    | sea_orm::sqlx::Error::Protocol(_)
                    | sea_orm::sqlx::Error::Tls(_)
            )
        }
        _ => false,
    }
}

/// What a client-side timeout error's message starts with.
const CLIENT_TIMEOUT: &str = "no answer from the database within the client-side timeout";

/// The error of a database call that did not finish within its client-side timeout
/// (`what` names the call, never data).
pub fn client_timeout(what: &str) -> DbErr {
    DbErr::Custom(format!("{CLIENT_TIMEOUT} ({what})"))
}

/// Whether `err` is a [`client_timeout`].
pub fn is_client_timeout(err: &DbErr) -> bool {
    matches!(err, DbErr::Custom(m) if m.starts_with(CLIENT_TIMEOUT))
}

/// Runs a database call with a client-side timeout: `statement_timeout` bounds the
/// server's work, not a half-open connection that never answers.
///
/// # Errors
/// The call's own error, or [`client_timeout`].
pub async fn timed<T>(
    timeout: Duration,
    what: &str,
    call: impl Future<Output = Result<T, DbErr>>,
) -> Result<T, DbErr> {
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(client_timeout(what)),
    }
}

/// Whether an error is a unique-constraint violation (SQLSTATE 23505).
pub fn is_unique_violation(err: &DbErr) -> bool {
    sqlstate(err).as_deref() == Some("23505")
}
