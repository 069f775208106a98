//! Per-record Redis locks, on one Redis server, a Redis Cluster or a Sentinel-managed master.
//!
//! A lock is a key `{redis.prefix}:lock:{kind}:{id}` set with `SET NX PX` to a token that
//! names its holder, and released by a Lua compare-and-delete, so a worker can never
//! release a lock another worker took after its own expired. A chunk's keys are taken and
//! released in as few round trips as the deployment allows.
//!
//! A lock only saves work: it keeps two workers from racing on the same record. It can
//! expire under a long pause (SIGSTOP, GC, a network partition), or vanish in a failover
//! (Redis replicates asynchronously, so a promoted replica may not have the newest locks);
//! correctness never rests on it: the database's unique index and row locks decide. A lost
//! lock costs duplicate work, never a duplicate record.
//!
//! # Modes (`redis.mode`)
//! - **standalone**: one server at `redis.url`, through the crate's reconnecting
//!   `ConnectionManager`. One script call per chunk.
//! - **cluster**: a Redis Cluster found from the seed nodes in `redis.nodes`, through the
//!   crate's async cluster client, which keeps a slot map, follows `MOVED`/`ASK` and
//!   reconnects after a failover. A Lua script may only touch keys of one hash slot, so a
//!   chunk's keys are **grouped by hash slot** (the crate's own `Slot::for_key`) and one
//!   script call per slot is sent, all at once: the cluster client multiplexes them over one
//!   connection per master, so a chunk costs one round trip per master, in parallel.
//!   We chose this over hash tags: tags that put a chunk in one slot would have to follow
//!   the chunk (a chunk is whatever the broker delivered together, not a range of ids), and
//!   tags by id range put every worker of a batch that walks the ids in order on one
//!   master at a time. Untagged keys spread by CRC16 of each key over every slot, the key
//!   names stay the same in every mode, and a lock script does so little that one call per
//!   key costs microseconds of server time. A script missing on a node (a fresh node, a
//!   promoted replica: `SCRIPT LOAD` is not replicated) answers `NOSCRIPT`; the script is
//!   then loaded on that slot's master alone and the call repeated, so one unreachable
//!   master does not stop the slots of the others. A cluster connection that keeps failing
//!   `PING` is replaced by a fresh one from the seed nodes (see `ClusterLink`: the crate's
//!   client can wedge when a master dies under load).
//! - **sentinel**: the master named `redis.sentinel_master`, found through the Sentinels in
//!   `redis.nodes` with the crate's Sentinel client (which checks the node it names answers
//!   `ROLE` as master). The connection to it is kept until a command on it fails (the
//!   master died, or was demoted: Sentinel kills the clients of a demoted master, or it
//!   answers `READONLY`); the next command asks the Sentinels again, so a failover is
//!   followed. The master is reached with the username, password and database of
//!   `redis.url` (its host and port are not used in this mode); the Sentinels with the
//!   credentials in their own URLs.
//!
//! Every call is bounded by `redis.timeout_ms`. Both scripts are idempotent (acquire is
//! re-entrant by token, release compares tokens), so the cluster client may retry them
//! after a redirection or a reconnect. A Redis that is unreachable makes every call fail
//! quickly; callers wait it out ([`Locks::ping`] says when it is back).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, ErrorKind, IntoConnectionInfo, Script, ServerErrorKind};
use secrecy::ExposeSecret;

use crate::config::{RedisMode, RedisSettings};

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
    backend: Backend,
    prefix: String,
    timeout: Duration,
    acquire: LuaScript,
    release: LuaScript,
}

/// A script and its code (`Script` keeps its code to itself; a cluster node that lacks the
/// script gets it loaded by code).
#[derive(Clone)]
struct LuaScript {
    script: Script,
    code: &'static str,
}

impl LuaScript {
    fn new(code: &'static str) -> Self {
        Self {
            script: Script::new(code),
            code,
        }
    }
}

#[derive(Clone)]
enum Backend {
    Standalone(ConnectionManager),
    Cluster(Arc<ClusterLink>),
    Sentinel(Arc<SentinelMaster>),
}

impl std::fmt::Debug for Locks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.backend {
            Backend::Standalone(_) => RedisMode::Standalone,
            Backend::Cluster(_) => RedisMode::Cluster,
            Backend::Sentinel(_) => RedisMode::Sentinel,
        };
        f.debug_struct("Locks")
            .field("mode", &mode.as_str())
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Locks {
    /// Connects lazily to Redis in the configured mode: a Redis that is down at start-up is
    /// retried, and `/readyz` reports it meanwhile. Must be called inside a tokio runtime
    /// (the cluster client starts its connection task).
    ///
    /// # Errors
    /// When a URL is invalid (the error never contains it).
    pub fn connect(settings: &RedisSettings) -> Result<Self, LockError> {
        let timeout = settings.timeout();
        let backend = match settings.mode {
            RedisMode::Standalone => {
                let info = settings.url.expose_secret().into_connection_info()?;
                let client = redis::Client::open(info.set_tcp_settings(tcp_settings()))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(2));
                Backend::Standalone(ConnectionManager::new_lazy_with_config(client, config)?)
            }
            RedisMode::Cluster => Backend::Cluster(Arc::new(ClusterLink::new(settings)?)),
            RedisMode::Sentinel => Backend::Sentinel(Arc::new(SentinelMaster::new(settings)?)),
        };
        Ok(Self {
            backend,
            prefix: settings.prefix.clone(),
            timeout,
            acquire: LuaScript::new(ACQUIRE),
            release: LuaScript::new(RELEASE),
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
        let keys: Vec<String> = targets.iter().map(|t| self.key(*t)).collect();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let args = [token.to_owned(), ttl_ms.to_string()];
        let held: Vec<i64> = self
            .bounded(self.run_per_slot(&self.acquire, &keys, &args, |per_key| per_key))
            .await?;
        if held.len() != keys.len() {
            return Err(LockError::Redis(redis::RedisError::from((
                ErrorKind::Parse,
                "lock script answered for a different number of keys",
            ))));
        }
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
        let keys: Vec<String> = targets.iter().map(|t| self.key(*t)).collect();
        let args = [token.to_owned()];
        self.bounded(
            self.run_per_slot(&self.release, &keys, &args, |parts: Vec<usize>| {
                parts.into_iter().sum()
            }),
        )
        .await
    }

    /// Whether Redis can take locks now, for readiness and for waiting out an outage:
    /// standalone, the server answers `PING`; cluster, every master in the client's slot
    /// map answers `PING` (a master that died and has not been replaced yet fails it);
    /// sentinel, the Sentinels name a master and it answers `ROLE` as master.
    ///
    /// # Errors
    /// When Redis does not answer, or the node answering is not a master.
    pub async fn ping(&self) -> Result<(), LockError> {
        let result = self
            .bounded(async {
                match &self.backend {
                    Backend::Standalone(conn) => {
                        let mut conn = conn.clone();
                        redis::cmd("PING").query_async::<()>(&mut conn).await?;
                    }
                    Backend::Cluster(link) => {
                        let (generation, mut conn) = link.connection();
                        // The cluster client sends PING to every master and fails unless all answer.
                        if let Err(e) = redis::cmd("PING").query_async::<()>(&mut conn).await {
                            link.replace_if_stuck(generation);
                            return Err(e.into());
                        }
                    }
                    Backend::Sentinel(master) => master.check_role().await?,
                }
                Ok(())
            })
            .await;
        if let (Err(LockError::Timeout(_)), Backend::Cluster(link)) = (&result, &self.backend) {
            // A PING that never came back: the client itself may be stuck.
            link.replace_if_stuck(link.connection().0);
        }
        result
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, LockError>>,
    ) -> Result<T, LockError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| LockError::Timeout(self.timeout))?
    }

    /// Runs `script` over `keys`: in one call on a single server, or in one call per hash
    /// slot (all sent at once) on a cluster, where `combine` joins the slots' answers back in
    /// key order.
    async fn run_per_slot<T, P>(
        &self,
        script: &LuaScript,
        keys: &[String],
        args: &[String],
        combine: impl FnOnce(Vec<P>) -> T,
    ) -> Result<T, LockError>
    where
        T: redis::FromRedisValue,
        P: redis::FromRedisValue + Default + Clone + Send,
        Vec<P>: Send,
    {
        match &self.backend {
            Backend::Standalone(conn) => {
                let mut conn = conn.clone();
                Ok(invocation(&script.script, keys, args)
                    .invoke_async(&mut conn)
                    .await?)
            }
            Backend::Sentinel(master) => {
                let (generation, mut conn) = master.connection().await?;
                let result = invocation(&script.script, keys, args)
                    .invoke_async(&mut conn)
                    .await;
                if result.is_err() {
                    // The master died or was demoted: ask the Sentinels again next time.
                    master.forget(generation);
                }
                Ok(result?)
            }
            Backend::Cluster(link) => {
                let (_, conn) = link.connection();
                let groups = group_by_slot(keys);
                let calls =
                    groups.iter().map(|(slot, indices)| {
                        let slot_keys: Vec<String> =
                            indices.iter().map(|i| keys[*i].clone()).collect();
                        let mut conn = conn.clone();
                        async move {
                            eval_in_slot::<P>(&mut conn, script, *slot, &slot_keys, args).await
                        }
                    });
                let answers = futures_util::future::try_join_all(calls).await?;
                combine_in_key_order(keys.len(), &groups, answers).map(combine)
            }
        }
    }
}

fn invocation<'a>(
    script: &'a Script,
    keys: &[String],
    args: &[String],
) -> redis::ScriptInvocation<'a> {
    let mut inv = script.prepare_invoke();
    for k in keys {
        inv.key(k);
    }
    for a in args {
        inv.arg(a);
    }
    inv
}

/// The keys' indices grouped by hash slot, each group in key order, groups in order of
/// their first key.
fn group_by_slot(keys: &[String]) -> Vec<(Slot, Vec<usize>)> {
    let mut order: Vec<(Slot, Vec<usize>)> = Vec::new();
    let mut at: HashMap<Slot, usize> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        let slot = Slot::for_key(key.as_bytes());
        match at.get(&slot) {
            Some(g) => order[*g].1.push(i),
            None => {
                at.insert(slot, order.len());
                order.push((slot, vec![i]));
            }
        }
    }
    order
}

/// One script call over keys of one slot. The script is loaded on that slot's master
/// alone when it is missing there, then the call is repeated once.
async fn eval_in_slot<P: redis::FromRedisValue>(
    conn: &mut ClusterConnection,
    script: &LuaScript,
    slot: Slot,
    keys: &[String],
    args: &[String],
) -> Result<Answer<P>, LockError> {
    let mut evalsha = redis::cmd("EVALSHA");
    evalsha
        .arg(script.script.get_hash())
        .arg(keys.len())
        .arg(keys)
        .arg(args);
    match evalsha.query_async::<redis::Value>(conn).await {
        Ok(v) => Ok(Answer::parse(v)?),
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            let mut load = redis::cmd("SCRIPT");
            load.arg("LOAD").arg(script.code);
            conn.route_command(
                load,
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_slot(
                    slot,
                    SlotAddr::Master,
                ))),
            )
            .await?;
            let v = evalsha.query_async::<redis::Value>(conn).await?;
            Ok(Answer::parse(v)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// One slot's answer: a list of per-key flags (acquire) or one count (release).
enum Answer<P> {
    PerKey(Vec<P>),
    Total(P),
}

impl<P: redis::FromRedisValue> Answer<P> {
    fn parse(v: redis::Value) -> redis::RedisResult<Self> {
        match v {
            redis::Value::Array(items) => items
                .into_iter()
                .map(P::from_redis_value)
                .collect::<Result<Vec<P>, _>>()
                .map(Self::PerKey)
                .map_err(Into::into),
            other => Ok(Self::Total(P::from_redis_value(other)?)),
        }
    }
}

/// Puts per-slot answers back in key order (per-key answers), or collects the per-slot
/// totals (one count each).
fn combine_in_key_order<P: Default + Clone>(
    n_keys: usize,
    groups: &[(Slot, Vec<usize>)],
    answers: Vec<Answer<P>>,
) -> Result<Vec<P>, LockError> {
    let mut per_key: Option<Vec<P>> = None;
    let mut totals = Vec::new();
    for ((_, indices), answer) in groups.iter().zip(answers) {
        match answer {
            Answer::PerKey(values) => {
                if values.len() != indices.len() {
                    return Err(LockError::Redis(redis::RedisError::from((
                        ErrorKind::Parse,
                        "lock script answered for a different number of keys",
                    ))));
                }
                let out = per_key.get_or_insert_with(|| vec![P::default(); n_keys]);
                for (i, v) in indices.iter().zip(values) {
                    out[*i] = v;
                }
            }
            Answer::Total(v) => totals.push(v),
        }
    }
    Ok(per_key.unwrap_or(totals))
}

/// The cluster client and the connection made from it.
///
/// The crate's cluster connection heals itself (slot refreshes, reconnects), but redis 1.8.1
/// can wedge for good when a master dies under load: requests queued on its topology lock
/// while a slot refresh holds it are granted the lock without being polled, and the next
/// refresh waits for them for ever (seen in this project's cluster suite). A connection
/// whose `PING` keeps failing is therefore replaced by a fresh one from the seed nodes,
/// at most once per [`ClusterLink::REBUILD_AFTER`]; during a real outage the fresh one
/// simply waits for the nodes like the old one did.
struct ClusterLink {
    client: redis::cluster::ClusterClient,
    config: redis::cluster::ClusterConfig,
    current: std::sync::Mutex<(u64, std::time::Instant, ClusterConnection)>,
}

impl ClusterLink {
    /// How long a connection must have existed before a failed `PING` replaces it (long
    /// enough for a fresh one to find the slots).
    const REBUILD_AFTER: Duration = Duration::from_secs(5);

    fn new(settings: &RedisSettings) -> Result<Self, LockError> {
        let timeout = settings.timeout();
        let nodes = settings
            .nodes
            .iter()
            .map(|n| {
                n.expose_secret()
                    .into_connection_info()
                    .map(|i| i.set_tcp_settings(tcp_settings()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let client = redis::cluster::ClusterClientBuilder::new(nodes)
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .overall_response_timeout(Some(timeout))
            // Retries (after MOVED, ASK, TRYAGAIN or a reconnect) fit within one call's
            // timeout; the caller waits out anything longer.
            .retries(3)
            .min_retry_wait(20)
            .max_retry_wait(500)
            .build()?;
        let config = redis::cluster::ClusterConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout);
        let conn = client.get_pending_async_connection_with_config(config.clone());
        Ok(Self {
            client,
            config,
            current: std::sync::Mutex::new((1, std::time::Instant::now(), conn)),
        })
    }

    /// The current connection and its generation.
    fn connection(&self) -> (u64, ClusterConnection) {
        match self.current.lock() {
            Ok(c) => (c.0, c.2.clone()),
            Err(poisoned) => {
                let c = poisoned.into_inner();
                (c.0, c.2.clone())
            }
        }
    }

    /// Replaces the connection of `generation` with a fresh one, unless it is younger than
    /// [`ClusterLink::REBUILD_AFTER`] or was replaced already.
    fn replace_if_stuck(&self, generation: u64) {
        let Ok(mut current) = self.current.lock() else {
            return;
        };
        if current.0 != generation || current.1.elapsed() < Self::REBUILD_AFTER {
            return;
        }
        tracing::warn!(
            "the Redis Cluster connection keeps failing; connecting afresh from the seed nodes"
        );
        let conn = self
            .client
            .get_pending_async_connection_with_config(self.config.clone());
        *current = (generation + 1, std::time::Instant::now(), conn);
    }
}

/// Keepalives and a user timeout on every Redis socket: a half-open connection is noticed
/// in seconds, not when the kernel gives up.
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    let tcp = redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(crate::net::keepalive());
    #[cfg(target_os = "linux")]
    let tcp = tcp.set_user_timeout(crate::net::USER_TIMEOUT);
    tcp
}

/// The master a set of Sentinels names, and a connection to it kept until it fails.
struct SentinelMaster {
    sentinels: tokio::sync::Mutex<SentinelClient>,
    current: std::sync::Mutex<Option<(u64, MultiplexedConnection)>>,
    next_generation: std::sync::atomic::AtomicU64,
    config: AsyncConnectionConfig,
}

impl SentinelMaster {
    fn new(settings: &RedisSettings) -> Result<Self, LockError> {
        // The master's credentials and database come from redis.url.
        let master = settings
            .url
            .expose_secret()
            .into_connection_info()?
            .redis_settings()
            .clone();
        let nodes = settings
            .nodes
            .iter()
            .map(|n| {
                n.expose_secret()
                    .into_connection_info()
                    .map(|i| i.set_tcp_settings(tcp_settings()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sentinels = SentinelClient::build(
            nodes,
            settings.sentinel_master.clone(),
            Some(
                SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(master)
                    .set_tcp_settings(tcp_settings()),
            ),
            SentinelServerType::Master,
        )?;
        Ok(Self {
            sentinels: tokio::sync::Mutex::new(sentinels),
            current: std::sync::Mutex::new(None),
            next_generation: std::sync::atomic::AtomicU64::new(1),
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(settings.timeout()))
                .set_response_timeout(Some(settings.timeout())),
        })
    }

    fn cached(&self) -> Option<(u64, MultiplexedConnection)> {
        self.current.lock().ok().and_then(|c| c.clone())
    }

    /// The connection to the current master, asking the Sentinels when there is none.
    async fn connection(&self) -> Result<(u64, MultiplexedConnection), LockError> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        // One lookup at a time; whoever waited finds the fresh connection.
        let mut sentinels = self.sentinels.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let client = sentinels.async_get_client().await?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let generation = self
            .next_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut current) = self.current.lock() {
            *current = Some((generation, conn.clone()));
        }
        Ok((generation, conn))
    }

    /// Drops the connection of `generation` (a newer one, made meanwhile, stays).
    fn forget(&self, generation: u64) {
        if let Ok(mut current) = self.current.lock()
            && current.as_ref().is_some_and(|(g, _)| *g == generation)
        {
            *current = None;
        }
    }

    /// The node we talk to answers `ROLE` as master.
    async fn check_role(&self) -> Result<(), LockError> {
        let (generation, mut conn) = self.connection().await?;
        match redis::cmd("ROLE")
            .query_async::<redis::Role>(&mut conn)
            .await
        {
            Ok(redis::Role::Primary { .. }) => Ok(()),
            Ok(_) => {
                self.forget(generation);
                Err(LockError::Redis(redis::RedisError::from((
                    ErrorKind::Server(ServerErrorKind::ReadOnly),
                    "the node the Sentinels named is no longer a master",
                ))))
            }
            Err(e) => {
                self.forget(generation);
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_grouped_by_slot_in_key_order() {
        let keys: Vec<String> = (0..500).map(|i| format!("p:lock:individual:{i}")).collect();
        let groups = group_by_slot(&keys);
        let mut seen: Vec<usize> = groups.iter().flat_map(|(_, ix)| ix.clone()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..500).collect::<Vec<_>>());
        for (slot, ix) in &groups {
            assert!(ix.windows(2).all(|w| w[0] < w[1]));
            assert!(
                ix.iter()
                    .all(|i| Slot::for_key(keys[*i].as_bytes()) == *slot)
            );
        }
        // Untagged keys spread: 500 keys land in (nearly) 500 slots.
        assert!(groups.len() > 450, "{}", groups.len());
        // A hash tag would pin them all to one slot.
        let tagged: Vec<String> = (0..50).map(|i| format!("{{p}}:lock:{i}")).collect();
        assert_eq!(group_by_slot(&tagged).len(), 1);
    }

    #[test]
    fn per_slot_answers_go_back_in_key_order() {
        let keys: Vec<String> = (0..40)
            .map(|i| format!("p:lock:sales_record:{i}"))
            .collect();
        let groups = group_by_slot(&keys);
        // Each slot answers "held" for even key indices.
        let answers: Vec<Answer<i64>> = groups
            .iter()
            .map(|(_, ix)| Answer::PerKey(ix.iter().map(|i| i64::from(*i % 2 == 0)).collect()))
            .collect();
        let held = combine_in_key_order(keys.len(), &groups, answers).unwrap();
        assert_eq!(
            held,
            (0..40).map(|i| i64::from(i % 2 == 0)).collect::<Vec<_>>()
        );
        let totals: Vec<Answer<usize>> = groups
            .iter()
            .map(|(_, ix)| Answer::Total(ix.len()))
            .collect();
        let sum: usize = combine_in_key_order(keys.len(), &groups, totals)
            .unwrap()
            .into_iter()
            .sum();
        assert_eq!(sum, 40);
    }

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
