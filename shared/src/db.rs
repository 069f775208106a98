//! The PostgreSQL pool (through sea-orm) and database error classification.
//!
//! bulkops' hot paths are set-based SQL statements with array parameters; [`stmt`] builds
//! them, and sqlx prepares and caches each distinct statement per connection. Statement
//! logging is off: at INFO it costs CPU on every statement and fills logs.
//!
//! # Only the primary, directly or through PgBouncer in session mode
//! Every pooled connection must reach a writable primary. A connection is checked when it
//! is made and each time it is taken from the pool (`SHOW transaction_read_only`, one
//! round trip, in place of sqlx's ping): one that lands on a standby, or stays with a
//! primary that was demoted or fenced read-only after a failover, is closed and a new one
//! made through `database.url` (the VIP or proxy that follows the primary). While none can
//! be made the pool times out, which every caller treats as a database outage and waits
//! out. A statement that still meets a read-only server (SQLSTATE 25006, the node changed
//! role under an open connection) is transient: it is retried and its connection, back in
//! the pool, fails the check and is replaced.
//!
//! Session settings (timeouts, keepalives, `extra_float_digits`) are set with one `SET` right
//! after connecting, not in the startup packet: PgBouncer refuses the startup parameters
//! `options` and `extra_float_digits` ("unsupported startup parameter") unless told to
//! ignore them, and ignoring `options` would silently drop the timeout.
//!
//! PgBouncer must pool in **session** mode. sqlx (0.9, under sea-orm 2) prepares every
//! statement with parameters in one protocol round (Parse, Describe, Sync) and runs it in the
//! next (Bind, Execute, Sync); in transaction mode PgBouncer may give those two rounds to
//! different server connections, whatever the statement cache size: with the cache on, a
//! statement prepared on one server is run on another ("prepared statement sqlx_s_N does
//! not exist"); with it off, sqlx still names each statement and never closes it, so the
//! next client on that server collides with the name ("already exists"). PgBouncer 1.21+
//! tracks named statements itself (`max_prepared_statements`); Debian bookworm's 1.18 does
//! not. See `docs/OPERATIONS.md` for the PgBouncer settings bulkops is tested with.

use std::time::Duration;

use sea_orm::sqlx::{self, Row};
use sea_orm::{ConnectOptions, DatabaseConnection, DbBackend, DbErr, RuntimeErr, Statement, Value};
use secrecy::ExposeSecret;

use crate::config::DatabaseSettings;

/// Longest the pool waits for a returned connection to prove it is usable (the "ping on
/// release" of sqlx); a connection dropped mid-call on a half-open socket would otherwise
/// hold its pool slot until the kernel gives up.
const RELEASE_PING: Duration = Duration::from_secs(2);

/// Server-side session settings of every bulkops connection (beside `statement_timeout`):
/// the server probes an idle client socket after 10 s, every 5 s, 3 times, and drops a
/// connection whose sent data stays unacknowledged for 30 s, so it ends the backend (and
/// its locks) of a client that vanished. sqlx sets no client-side socket options, so these,
/// the client-side timeouts on every call and the bounded ping on release are what notice
/// a half-open connection here (see `net`).
const KEEPALIVE_SETTINGS: [(&str, &str); 4] = [
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "30000"),
];

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
    opts.map_sqlx_postgres_opts(|o| o.application_name("bulkops").extra_float_digits(None));
    let session = session_setup_sql(settings);
    opts.map_sqlx_postgres_pool_opts(move |pool| {
        let session = session.clone();
        pool.after_connect(move |conn, _| {
            let session = session.clone();
            Box::pin(async move {
                let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(session))
                    .fetch_all(&mut *conn)
                    .await?;
                if read_only(rows.last()) {
                    return Err(not_the_primary());
                }
                Ok(())
            })
        })
        // Replaces sqlx's ping on every acquire (a round trip either way).
        .test_before_acquire(false)
        .before_acquire(|conn, _| {
            Box::pin(async move {
                let row = sqlx::raw_sql(sqlx::AssertSqlSafe(READ_ONLY_CHECK))
                    .fetch_optional(&mut *conn)
                    .await?;
                Ok(!read_only(row.as_ref()))
            })
        })
        .after_release(|conn, _meta| {
            Box::pin(async move {
                use sea_orm::sqlx::Connection;
                match tokio::time::timeout(RELEASE_PING, conn.ping()).await {
                    Ok(Ok(())) => Ok(true),
                    Ok(Err(e)) => Err(e),
                    // The pool then closes it without a goodbye (nothing would arrive).
                    Err(_) => Err(sea_orm::sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connection did not answer on release",
                    ))),
                }
            })
        })
    });
    sea_orm::Database::connect(opts).await
}

const READ_ONLY_CHECK: &str = "SHOW transaction_read_only";

/// The session settings and the primary check, sent as one simple query after connecting:
/// the timeouts, the keepalives of [`KEEPALIVE_SETTINGS`], and `SHOW transaction_read_only`
/// last.
fn session_setup_sql(settings: &DatabaseSettings) -> String {
    // Integers and constants only: nothing here comes from outside the typed configuration.
    let mut sql = format!(
        "SET statement_timeout = {}; SET idle_in_transaction_session_timeout = {}; SET extra_float_digits = 3;",
        settings.statement_timeout_ms, settings.idle_in_transaction_timeout_ms
    );
    for (name, value) in KEEPALIVE_SETTINGS {
        sql.push_str(&format!(" SET {name} = {value};"));
    }
    sql.push(' ');
    sql.push_str(READ_ONLY_CHECK);
    sql
}

/// Whether a `SHOW transaction_read_only` row says the server cannot take writes (a
/// standby in recovery, or a primary fenced with `default_transaction_read_only`).
fn read_only(row: Option<&sqlx::postgres::PgRow>) -> bool {
    row.and_then(|r| r.try_get::<String, _>(0).ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("on"))
}

fn not_the_primary() -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        "the server is read-only (a standby, or a demoted primary); bulkops needs the primary",
    ))
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
/// timed out, the server is restarting or is no longer the primary (a failover), or the
/// transaction lost a deadlock or serialization race. Everything else (constraint violations, bad SQL) is permanent.
pub fn is_transient(err: &DbErr) -> bool {
    if is_client_timeout(err) {
        return true;
    }
    if let Some(code) = sqlstate(err) {
        return matches!(
            code.as_str(),
            "25006" // read_only_sql_transaction: a standby or demoted primary answered
                | "40001" // serialization_failure
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
