//! Per-record Redis locks.
//!
//! A lock is a key `{redis.prefix}:lock:{kind}:{id}` set with `SET NX PX` to a token that
//! names its holder, and released by a Lua compare-and-delete, so a worker can never
//! release a lock another worker took after its own expired. Many keys are taken and
//! released in one round trip each (one script call over all the keys of a chunk).
//!
//! A lock only saves work: it keeps two workers from racing on the same record. It can
//! expire under a long pause (SIGSTOP, GC, a network partition), so correctness never
//! rests on it: the database's unique index and row locks decide.

use std::time::Duration;

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;

use crate::config::RedisSettings;

/// Takes every key whose lock is free (or already ours) and reports, per key, whether we
/// hold it now. Re-entrant by token, so retrying after a lost reply is safe.
const ACQUIRE: &str = r"
local held = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    held[i] = 1
  elseif redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    held[i] = 1
  else
    held[i] = 0
  end
end
return held
";

/// Deletes each key only while it still holds our token; returns how many were ours.
const RELEASE: &str = r"
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
";

/// What a lock protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LockTarget {
    /// An Individual (bulk create; merge target of a conversion).
    Individual(i64),
    /// A Sales Record (conversion).
    SalesRecord(i64),
}

/// Errors talking to Redis. Always transient from the caller's point of view.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Redis failed or the connection dropped.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// Takes and releases record locks.
#[derive(Clone)]
pub struct Locks {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    acquire: Script,
    release: Script,
}

impl std::fmt::Debug for Locks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locks")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Locks {
    /// Connects lazily to Redis: a Redis that is down at start-up is retried, and
    /// `/readyz` reports it meanwhile.
    ///
    /// # Errors
    /// When the URL is invalid.
    pub fn connect(settings: &RedisSettings) -> Result<Self, LockError> {
        let client = redis::Client::open(settings.url.expose_secret())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout()))
            .set_response_timeout(Some(settings.timeout()))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            conn,
            prefix: settings.prefix.clone(),
            timeout: settings.timeout(),
            acquire: Script::new(ACQUIRE),
            release: Script::new(RELEASE),
        })
    }

    /// The Redis key of a target.
    pub fn key(&self, target: LockTarget) -> String {
        match target {
            LockTarget::Individual(id) => format!("{}:lock:individual:{id}", self.prefix),
            LockTarget::SalesRecord(id) => format!("{}:lock:sales_record:{id}", self.prefix),
        }
    }

    /// A fresh token naming one holder (one chunk of one worker).
    pub fn new_token() -> String {
        uuid::Uuid::new_v4().to_string()
    }

    /// Tries to take every target's lock for `ttl`; returns, in order, whether each is held.
    ///
    /// # Errors
    /// When Redis fails or times out; locks taken before the failure expire by themselves.
    pub async fn acquire(
        &self,
        token: &str,
        targets: &[LockTarget],
        ttl: Duration,
    ) -> Result<Vec<bool>, LockError> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.acquire.prepare_invoke();
        for t in targets {
            invocation.key(self.key(*t));
        }
        invocation
            .arg(token)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let mut conn = self.conn.clone();
        let held: Vec<i64> = tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn))
            .await
            .map_err(|_| LockError::Timeout(self.timeout))??;
        Ok(held.into_iter().map(|h| h == 1).collect())
    }

    /// Releases the targets' locks that still hold `token`; returns how many did.
    ///
    /// # Errors
    /// When Redis fails or times out; the locks then expire by themselves.
    pub async fn release(&self, token: &str, targets: &[LockTarget]) -> Result<usize, LockError> {
        if targets.is_empty() {
            return Ok(0);
        }
        let mut invocation = self.release.prepare_invoke();
        for t in targets {
            invocation.key(self.key(*t));
        }
        invocation.arg(token);
        let mut conn = self.conn.clone();
        let n: usize = tokio::time::timeout(self.timeout, invocation.invoke_async(&mut conn))
            .await
            .map_err(|_| LockError::Timeout(self.timeout))??;
        Ok(n)
    }

    /// `PING`, for readiness.
    ///
    /// # Errors
    /// When Redis does not answer.
    pub async fn ping(&self) -> Result<(), LockError> {
        let mut conn = self.conn.clone();
        let _: String =
            tokio::time::timeout(self.timeout, redis::cmd("PING").query_async(&mut conn))
                .await
                .map_err(|_| LockError::Timeout(self.timeout))??;
        Ok(())
    }
}
