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

/// What a [`LockError`] means for the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockErrorKind {
    /// Redis could not be reached, the connection dropped, or it did not answer in time: a
    /// `PING` tells whether it is down.
    Unreachable,
    /// Redis answered, but refused the command: it may well answer `PING` meanwhile.
    Refused(Refusal),
}

/// Why a Redis that answers refused a lock command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// `-OOM`: `maxmemory` reached with a `noeviction` policy; writes are refused until an
    /// operator frees memory.
    OutOfMemory,
    /// `-READONLY`: a replica (typically a master demoted by a failover).
    ReadOnly,
    /// `-MOVED` / `-ASK`: a cluster node that does not own the key's slot (resharding,
    /// failover, a stale slot map).
    Moved,
    /// `-NOSCRIPT` after the script was loaded again (script cache flushed, a failover to
    /// a node without it).
    NoScript,
    /// `-BUSY`: a script is running for longer than `busy-reply-threshold`.
    Busy,
    /// `-LOADING`: the server is loading its data set.
    Loading,
    /// `-CLUSTERDOWN`, `-TRYAGAIN`, `-MASTERDOWN`: the cluster cannot serve the slot now.
    ClusterDown,
    /// `-MISCONF`: the server refuses writes because it cannot persist.
    Misconfigured,
    /// Any other error reply (`-NOPERM`, `-CROSSSLOT`, `-ERR …`).
    Other,
}

impl Refusal {
    /// The class name used in metrics and logs (bounded, no data).
    pub fn class(self) -> &'static str {
        match self {
            Self::OutOfMemory => "redis_oom",
            Self::ReadOnly => "redis_readonly",
            Self::Moved => "redis_moved",
            Self::NoScript => "redis_noscript",
            Self::Busy => "redis_busy",
            Self::Loading => "redis_loading",
            Self::ClusterDown => "redis_clusterdown",
            Self::Misconfigured => "redis_misconf",
            Self::Other => "redis_refused",
        }
    }
}

impl LockError {
    /// What this error says about Redis: unreachable, or answering with a refusal.
    pub fn kind(&self) -> LockErrorKind {
        let e = match self {
            Self::Timeout(_) => return LockErrorKind::Unreachable,
            Self::Redis(e) => e,
        };
        let refusal = match e.code() {
            Some("OOM") => Refusal::OutOfMemory,
            Some("READONLY") => Refusal::ReadOnly,
            Some("MOVED" | "ASK") => Refusal::Moved,
            Some("NOSCRIPT") => Refusal::NoScript,
            Some("BUSY") => Refusal::Busy,
            Some("LOADING") => Refusal::Loading,
            Some("CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN") => Refusal::ClusterDown,
            Some("MISCONF") => Refusal::Misconfigured,
            Some(_) => Refusal::Other,
            None if e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal() =>
            {
                return LockErrorKind::Unreachable;
            }
            None => match e.kind() {
                redis::ErrorKind::Server(_) | redis::ErrorKind::Extension => Refusal::Other,
                _ => return LockErrorKind::Unreachable,
            },
        };
        LockErrorKind::Refused(refusal)
    }

    /// The class name used in metrics and logs: `redis_unreachable` or the refusal's.
    pub fn class(&self) -> &'static str {
        match self.kind() {
            LockErrorKind::Unreachable => "redis_unreachable",
            LockErrorKind::Refused(r) => r.class(),
        }
    }
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
        // Keepalives and a user timeout: a half-open connection is noticed in seconds.
        let tcp = redis::io::tcp::TcpSettings::default()
            .set_nodelay(true)
            .set_keepalive(crate::net::keepalive());
        #[cfg(target_os = "linux")]
        let tcp = tcp.set_user_timeout(crate::net::USER_TIMEOUT);
        let client =
            redis::Client::open(client.get_connection_info().clone().set_tcp_settings(tcp))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: &str, detail: &str) -> LockError {
        // The error replies a real Redis sends, parsed by the redis crate itself.
        let text = format!("-{code} {detail}\r\n");
        match redis::parse_redis_value(text.as_bytes()) {
            Ok(redis::Value::ServerError(e)) => LockError::Redis(e.into()),
            other => panic!("not an error reply: {other:?}"),
        }
    }

    #[test]
    fn refusals_are_told_apart_from_an_unreachable_redis() {
        for (code, class) in [
            ("OOM", "redis_oom"),
            ("READONLY", "redis_readonly"),
            ("MOVED", "redis_moved"),
            ("ASK", "redis_moved"),
            ("NOSCRIPT", "redis_noscript"),
            ("BUSY", "redis_busy"),
            ("LOADING", "redis_loading"),
            ("CLUSTERDOWN", "redis_clusterdown"),
            ("TRYAGAIN", "redis_clusterdown"),
            ("MISCONF", "redis_misconf"),
            ("NOPERM", "redis_refused"),
            ("ERR", "redis_refused"),
        ] {
            let e = reply(code, "something");
            assert!(matches!(e.kind(), LockErrorKind::Refused(_)), "{code}");
            assert_eq!(e.class(), class, "{code}");
        }
        assert_eq!(
            LockError::Timeout(Duration::from_secs(1)).kind(),
            LockErrorKind::Unreachable
        );
        let io = LockError::Redis(
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused").into(),
        );
        assert_eq!(io.kind(), LockErrorKind::Unreachable);
        assert_eq!(io.class(), "redis_unreachable");
    }
}
