//! Failure classes, retry decisions and the attempt history a message carries.
//!
//! Every failure is either **transient** (a dropped or timed-out connection, a deadlock or
//! serialization failure, a record lock held by another worker) or **permanent** (a
//! malformed message, a batch that does not exist, an unexpected database error). Transient
//! failures are retried a few times in process with exponential backoff and full jitter;
//! if they persist, the message goes to a delayed retry queue (one per delay tier) and
//! comes back later, up to `worker.max_attempts` deliveries. After that, and for every
//! permanent failure, the message is dead-lettered with its history in headers, and the
//! dead-letter watcher records the item as `failed` with the reason.
//!
//! Header values name error classes (a SQLSTATE, "lock_contention"), never record data.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Delivery attempts so far (1 on the first delivery).
pub const ATTEMPTS: &str = "x-attempts";
/// `attempt:class` entries, oldest first, comma-separated.
pub const HISTORY: &str = "x-attempt-history";
/// Why the message was dead-lettered (an item reason, e.g. `retries_exhausted`).
pub const REASON: &str = "x-bulkops-reason";
/// When the first failure happened (Unix ms).
pub const FIRST_FAILED_AT: &str = "x-first-failed-at-ms";

/// A failure's class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Worth retrying; the string names the class (for headers and metrics).
    Transient(String),
    /// Not worth retrying; the string names the class.
    Permanent(String),
    /// The worker is shutting down while a dependency is down: the message goes back to
    /// the queue untouched, its attempts not counted.
    Interrupted,
}

impl Failure {
    /// Classifies a database error.
    pub fn from_db(err: &sea_orm::DbErr) -> Self {
        let class = match bulkops_shared::db::sqlstate(err) {
            Some(code) => format!("db_{code}"),
            None => "db_connection".to_owned(),
        };
        if bulkops_shared::db::is_transient(err) {
            Self::Transient(class)
        } else {
            Self::Permanent(class)
        }
    }

    /// The class name.
    pub fn class(&self) -> &str {
        match self {
            Self::Transient(c) | Self::Permanent(c) => c,
            Self::Interrupted => "interrupted",
        }
    }

    /// Whether the failure means a dependency is unreachable (rather than this message or
    /// this moment being unlucky). Such failures are not retried against the message's
    /// attempt budget: the worker waits for the dependency and tries again, so an outage
    /// of any length fails no item.
    pub fn is_outage(&self) -> bool {
        match self {
            Self::Transient(c) => {
                c == "redis"
                    || c == "db_connection"
                    || c.starts_with("db_08")
                    || matches!(
                        c.as_str(),
                        // 25006: a standby or demoted primary answered (a failover).
                        "db_57P01" | "db_57P02" | "db_57P03" | "db_53300" | "db_25006"
                    )
            }
            _ => false,
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
    fn outages_are_told_apart_from_unlucky_moments() {
        for c in [
            "redis",
            "db_connection",
            "db_08006",
            "db_57P01",
            "db_57P03",
            "db_25006",
        ] {
            assert!(Failure::Transient(c.into()).is_outage(), "{c}");
        }
        for c in ["db_40P01", "db_40001", "lock_contention", "db_57014"] {
            assert!(!Failure::Transient(c.into()).is_outage(), "{c}");
        }
        assert!(!Failure::Permanent("db_connection".into()).is_outage());
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
