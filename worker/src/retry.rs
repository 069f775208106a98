//! Failure classes, retry decisions and the attempt history a message carries.
//!
//! Every failure is classified by what it means for the next attempt:
//!
//! - **Outage**: the failure names a dependency (a dropped or timed-out database
//!   connection, a terminated backend, the chunk's own timeout) and a probe of that
//!   dependency (`SELECT 1`) fails too. The worker holds the chunk and waits, with
//!   backoff, until the dependency answers; no attempt is spent, however long it lasts.
//! - **Counted**: a transient failure the probe does not explain (the probe answers, or
//!   the failure names no dependency: a deadlock, a serialization failure, a statement
//!   timeout, lock contention). It costs an attempt: a jittered exponential pause, a few
//!   times in process, then a delayed retry queue, up to `worker.max_attempts`
//!   deliveries; then the item ends `failed`/`retries_exhausted`. A failing chunk of many
//!   items is split in halves first, so one bad item cannot spend its neighbours'
//!   attempts.
//! - **Permanent**: a malformed message, a batch that does not exist, an unexpected
//!   database error: dead-lettered at once (after isolating the item), the item `failed`.
//!
//! No path retries without a pause: an outage waits between probes, a counted failure
//! waits its backoff. Redis failures never cost an attempt: the record lock only saves
//! work, so a Redis that refuses or does not answer is waited for a bounded time and then
//! bypassed (see `gate`).
//!
//! Header values name error classes (a SQLSTATE, "lock_contention"), never record data.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use bulkops_shared::messages::headers;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Delivery attempts so far (1 on the first delivery).
pub const ATTEMPTS: &str = headers::ATTEMPTS;
/// `attempt:class` entries, oldest first, comma-separated.
pub const HISTORY: &str = headers::HISTORY;
/// Why the message was dead-lettered (an item reason, e.g. `retries_exhausted`).
pub const REASON: &str = headers::REASON;
/// When the first failure happened (Unix ms).
pub const FIRST_FAILED_AT: &str = headers::FIRST_FAILED_AT;

/// A dependency a failure can implicate, and that a worker can wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dependency {
    /// PostgreSQL.
    Database,
    /// Redis.
    Redis,
}

impl Dependency {
    /// The name used in logs, metrics and `/readyz`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Database => "database",
            Self::Redis => "redis",
        }
    }
}

/// What went wrong, as the class named in headers, metrics and log lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// The server answered with an error: `db_<SQLSTATE>` (the string is the whole name).
    Db(String),
    /// A database call outlived its client-side timeout: `db_timeout`.
    DbTimeout,
    /// The connection failed without a SQLSTATE: `db_connection`.
    DbConnection,
    /// A chunk did not finish within `worker.chunk_timeout_ms`: `chunk_timeout`.
    ChunkTimeout,
    /// Another worker held a record's lock through every in-process retry:
    /// `lock_contention`.
    LockContention,
}

impl Class {
    /// A server error's class.
    pub fn sqlstate(code: &str) -> Self {
        Self::Db(format!("db_{code}"))
    }

    /// The class's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Db(name) => name,
            Self::DbTimeout => "db_timeout",
            Self::DbConnection => "db_connection",
            Self::ChunkTimeout => "chunk_timeout",
            Self::LockContention => "lock_contention",
        }
    }
}

/// A failure's class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Worth retrying.
    Transient(Class),
    /// Not worth retrying.
    Permanent(Class),
    /// The worker is shutting down while a dependency is down: the message goes back to
    /// the queue untouched, its attempts not counted.
    Interrupted,
}

impl Failure {
    /// Classifies a database error: `db_<SQLSTATE>` when the server sent one,
    /// `db_timeout` for a client-side timeout, `db_connection` for anything else of the
    /// connection.
    pub fn from_db(err: &sea_orm::DbErr) -> Self {
        let class = match bulkops_shared::db::sqlstate(err) {
            Some(code) => Class::sqlstate(&code),
            None if bulkops_shared::db::is_client_timeout(err) => Class::DbTimeout,
            None => Class::DbConnection,
        };
        if bulkops_shared::db::is_transient(err) {
            Self::Transient(class)
        } else {
            Self::Permanent(class)
        }
    }

    /// A chunk whose transaction outlived `worker.chunk_timeout_ms`.
    pub fn chunk_timeout() -> Self {
        Self::Transient(Class::ChunkTimeout)
    }

    /// The class name.
    pub fn class(&self) -> &str {
        match self {
            Self::Transient(c) | Self::Permanent(c) => c.name(),
            Self::Interrupted => "interrupted",
        }
    }

    /// The dependency whose being unreachable would explain this failure, if any: the
    /// worker probes it before deciding. A failed probe makes the failure an outage
    /// (waited out, not counted); an answering probe leaves it unexplained (counted).
    ///
    /// A terminated backend (57P01, `pg_terminate_backend` or a server shutting down) is
    /// such a failure: the connection is gone (the pool discards it); if the database
    /// answers a fresh connection, only that session was killed and the chunk is retried
    /// after a pause, counted; if it does not, the server is going down and the worker
    /// waits for it.
    pub fn suspects(&self) -> Option<Dependency> {
        match self {
            Self::Transient(Class::DbConnection | Class::DbTimeout | Class::ChunkTimeout) => {
                Some(Dependency::Database)
            }
            Self::Transient(Class::Db(c))
                if c.starts_with("db_08")
                    || matches!(
                        c.as_str(),
                        // 25006: a standby or demoted primary answered (a failover).
                        "db_57P01" | "db_57P02" | "db_57P03" | "db_53300" | "db_25006"
                    ) =>
            {
                Some(Dependency::Database)
            }
            _ => None,
        }
    }
}

/// Backoff of in-process retries: 50 ms doubling, capped at 1 s, full jitter.
pub fn in_process_backoff(times: usize) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(1))
        .with_max_times(times)
        .with_jitter()
        .build()
}

/// What to do with a message whose item failed transiently `attempts` times in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Send to the retry queue of this tier (1-based).
    Delay(usize),
    /// Give up: dead-letter, item failed `retries_exhausted`.
    GiveUp,
}

/// The retry decision: attempt `n` (1-based, the one that just failed) of at most
/// `max_attempts` waits in tier `min(n, tiers)`.
pub fn next_step(attempt: u32, max_attempts: u32, tiers: usize) -> Next {
    if attempt >= max_attempts {
        Next::GiveUp
    } else {
        Next::Delay((attempt as usize).clamp(1, tiers.max(1)))
    }
}

/// The attempt number of a delivery, from its headers (1 when absent).
pub fn attempts_of(headers: Option<&FieldTable>) -> u32 {
    headers
        .and_then(|h| h.inner().get(&ShortString::from(ATTEMPTS)))
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
            AMQPValue::LongUInt(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(1)
}

fn string_header(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    headers
        .and_then(|h| h.inner().get(&ShortString::from(name)))
        .and_then(|v| match v {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        })
}

/// The reason a dead-lettered message carries, if a worker put it there.
pub fn reason_of(headers: Option<&FieldTable>) -> Option<String> {
    string_header(headers, REASON)
}

/// Headers for the next delivery after a failure of `class` on attempt `attempt`.
pub fn next_headers(
    previous: Option<&FieldTable>,
    attempt: u32,
    class: &str,
    reason: Option<&str>,
) -> FieldTable {
    let mut table = previous.cloned().unwrap_or_default();
    let mut history = string_header(previous, HISTORY).unwrap_or_default();
    if !history.is_empty() {
        history.push(',');
    }
    history.push_str(&format!("{attempt}:{class}"));
    table.insert(
        ATTEMPTS.into(),
        AMQPValue::LongLongInt(i64::from(attempt) + 1),
    );
    table.insert(
        HISTORY.into(),
        AMQPValue::LongString(LongString::from(history)),
    );
    if string_header(previous, FIRST_FAILED_AT).is_none()
        && !table
            .inner()
            .contains_key(&ShortString::from(FIRST_FAILED_AT))
    {
        table.insert(
            FIRST_FAILED_AT.into(),
            AMQPValue::LongLongInt(chrono::Utc::now().timestamp_millis()),
        );
    }
    if let Some(r) = reason {
        table.insert(REASON.into(), AMQPValue::LongString(LongString::from(r)));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_that_a_probe_may_explain_name_the_database() {
        for c in [
            Class::DbConnection,
            Class::DbTimeout,
            Class::sqlstate("08006"),
            Class::sqlstate("57P01"),
            Class::sqlstate("57P03"),
            Class::ChunkTimeout,
            Class::sqlstate("25006"),
        ] {
            assert_eq!(
                Failure::Transient(c.clone()).suspects(),
                Some(Dependency::Database),
                "{c:?}"
            );
        }
        for c in [
            Class::sqlstate("40P01"),
            Class::sqlstate("40001"),
            Class::LockContention,
            Class::sqlstate("57014"),
        ] {
            assert_eq!(Failure::Transient(c.clone()).suspects(), None, "{c:?}");
        }
        assert_eq!(Failure::Permanent(Class::DbConnection).suspects(), None);
        assert_eq!(Failure::chunk_timeout().class(), "chunk_timeout");
        assert_eq!(Class::LockContention.name(), "lock_contention");
        assert_eq!(Class::sqlstate("40P01").name(), "db_40P01");
        let timeout = bulkops_shared::db::client_timeout("batch lookup");
        assert_eq!(
            Failure::from_db(&timeout),
            Failure::Transient(Class::DbTimeout)
        );
    }

    #[test]
    fn retries_walk_the_tiers_then_give_up() {
        assert_eq!(next_step(1, 5, 3), Next::Delay(1));
        assert_eq!(next_step(2, 5, 3), Next::Delay(2));
        assert_eq!(next_step(3, 5, 3), Next::Delay(3));
        assert_eq!(next_step(4, 5, 3), Next::Delay(3));
        assert_eq!(next_step(5, 5, 3), Next::GiveUp);
        assert_eq!(next_step(1, 1, 3), Next::GiveUp);
    }

    #[test]
    fn headers_accumulate_history() {
        assert_eq!(attempts_of(None), 1);
        let h1 = next_headers(None, 1, "lock_contention", None);
        assert_eq!(attempts_of(Some(&h1)), 2);
        let h2 = next_headers(Some(&h1), 2, "db_40P01", Some("retries_exhausted"));
        assert_eq!(attempts_of(Some(&h2)), 3);
        assert_eq!(
            string_header(Some(&h2), HISTORY).as_deref(),
            Some("1:lock_contention,2:db_40P01")
        );
        assert_eq!(reason_of(Some(&h2)).as_deref(), Some("retries_exhausted"));
        assert!(string_header(Some(&h2), FIRST_FAILED_AT).is_none());
        assert!(h2.inner().contains_key(&ShortString::from(FIRST_FAILED_AT)));
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let delays: Vec<Duration> = in_process_backoff(3).collect();
        assert_eq!(delays.len(), 3);
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
    }
}
