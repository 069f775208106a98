//! The record lock as the optimisation it is: waited for a bounded time, then bypassed.
//!
//! A Redis that refuses lock writes while it answers `PING` (`-OOM` at `maxmemory` with
//! `noeviction`, `-READONLY` from a demoted master, `-MOVED` from a cluster node that lost
//! the slot, `-CLUSTERDOWN`, `-BUSY`, …) would otherwise stop every worker, since no probe
//! ever says it is down. The lock only saves work: the database decides (the unique index
//! of `sales_records.individual_id`, the items' and records' row locks, the `pending`
//! guard). So the gate does both things the situation allows:
//!
//! 1. **Wait out** a refusal or an unreachable Redis with jittered backoff (100 ms to 2 s)
//!    for up to `worker.lock_bypass_after_ms` (10 s): a failover's `READONLY`/`MOVED`
//!    passes in seconds, and locks keep competing workers from racing on the same rows.
//! 2. Then **bypass**: chunks run without locks (`bulkops_lock_bypassed_total`), correct
//!    under any concurrency, only with more row-lock waits when workers overlap. One line
//!    is logged when this begins and one when it ends; `/readyz` stays 200 with
//!    `degraded: ["redis_locks_bypassed"]` and `bulkops_dependency_degraded{dependency=
//!    "redis"}` is 1. While bypassing no chunk calls Redis; one background probe per worker
//!    (a `PING`, then the real lock script on a key no record uses) runs every 1 to 15 s,
//!    and the first success puts the locks back on.
//!
//! An unreachable Redis (no `PING`) is waited for in the same way, so a restart or a short
//! partition keeps the locks, and an outage longer than the bound no longer stops work.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bulkops_shared::backoff::Backoff;
use bulkops_shared::lock::{LockErrorKind, LockTarget, Locks};
use bulkops_shared::metrics::WorkerMetrics;
use bulkops_shared::ratelog::LogGate;
use tokio_util::sync::CancellationToken;

use crate::outage::Outages;
use crate::retry::Dependency;

/// A target no record has (ids start at 1): the probe's lock key.
const PROBE_TARGET: LockTarget = LockTarget::Individual(0);

/// What [`LockGate::acquire`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// Redis answered: per key, whether this holder has it now.
    Held(Vec<bool>),
    /// Redis is being bypassed: go ahead without locks; the database decides.
    Bypassed,
}

/// The worker is shutting down while it waited for Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

/// Record locks behind a wait-then-bypass circuit.
pub struct LockGate {
    locks: Locks,
    bypass_after: Duration,
    metrics: WorkerMetrics,
    outages: Arc<Outages>,
    bypassing: AtomicBool,
    since: Mutex<Option<(Instant, &'static str)>>,
    logs: LogGate,
}

impl std::fmt::Debug for LockGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGate")
            .field("bypassing", &self.is_bypassing())
            .finish_non_exhaustive()
    }
}

/// Pauses while a lock call is waited out, before the gate bypasses the locks.
fn wait_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(2))
}

/// Pauses between probes while the locks are bypassed.
fn probe_backoff() -> Backoff {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(15))
}

impl LockGate {
    /// A gate over `locks` that bypasses them after `bypass_after` of refusals or silence.
    pub fn new(
        locks: Locks,
        bypass_after: Duration,
        metrics: WorkerMetrics,
        outages: Arc<Outages>,
    ) -> Self {
        metrics
            .dependency_degraded
            .with_label_values(&[Dependency::Redis.as_str()])
            .set(0);
        Self {
            locks,
            bypass_after,
            metrics,
            outages,
            bypassing: AtomicBool::new(false),
            since: Mutex::new(None),
            logs: LogGate::default(),
        }
    }

    /// The locks behind the gate (for releasing).
    pub fn locks(&self) -> &Locks {
        &self.locks
    }

    /// Whether chunks run without locks now.
    pub fn is_bypassing(&self) -> bool {
        self.bypassing.load(Ordering::SeqCst)
    }

    /// Takes the targets' locks, or says to go ahead without them.
    ///
    /// # Errors
    /// [`Interrupted`] when `shutdown` fires while waiting for Redis.
    pub async fn acquire(
        &self,
        token: &str,
        targets: &[LockTarget],
        ttl: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Acquired, Interrupted> {
        if self.is_bypassing() {
            return Ok(Acquired::Bypassed);
        }
        let deadline = Instant::now() + self.bypass_after;
        let mut backoff = wait_backoff();
        let mut waiting = None;
        loop {
            let err = match self.locks.acquire(token, targets, ttl).await {
                Ok(held) => return Ok(Acquired::Held(held)),
                Err(e) => e,
            };
            let class = err.class();
            self.metrics.failures.with_label_values(&[class]).inc();
            if self.is_bypassing() {
                // Another chunk's wait ran out meanwhile.
                return Ok(Acquired::Bypassed);
            }
            match err.kind() {
                LockErrorKind::Unreachable => {
                    if waiting.is_none() {
                        waiting = Some(self.outages.enter(Dependency::Redis));
                    }
                }
                LockErrorKind::Refused(_) => {
                    if let Some(held) = self.logs.admit(class) {
                        tracing::warn!(
                            class,
                            error = %err,
                            repeats_since_last_line = held,
                            wait_secs = self.bypass_after.as_secs(),
                            "redis refuses lock writes; waiting, then carrying on without locks"
                        );
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                self.open(class);
                return Ok(Acquired::Bypassed);
            }
            let pause = backoff.next_pause().min(deadline - now);
            if !bulkops_shared::shutdown::sleep(shutdown, pause).await {
                return Err(Interrupted);
            }
            if let Some(w) = waiting.as_mut() {
                w.still();
            }
        }
    }

    fn open(&self, class: &'static str) {
        if self.bypassing.swap(true, Ordering::SeqCst) {
            return;
        }
        *lock(&self.since) = Some((Instant::now(), class));
        self.metrics
            .dependency_degraded
            .with_label_values(&[Dependency::Redis.as_str()])
            .set(1);
        tracing::warn!(
            class,
            waited_secs = self.bypass_after.as_secs(),
            "redis still refuses lock writes or does not answer: carrying on without record locks (the database decides) until it takes them again"
        );
    }

    fn close(&self) {
        if !self.bypassing.swap(false, Ordering::SeqCst) {
            return;
        }
        let since = lock(&self.since).take();
        self.metrics
            .dependency_degraded
            .with_label_values(&[Dependency::Redis.as_str()])
            .set(0);
        tracing::info!(
            bypassed_secs = since.map_or(0, |(s, _)| s.elapsed().as_secs()),
            "redis takes lock writes again; record locks back on"
        );
    }

    /// While the gate bypasses Redis, probes it with backoff (one probe per worker, not one
    /// per chunk) and puts the locks back on once a lock write succeeds. Runs until
    /// `shutdown`.
    pub async fn maintain(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = probe_backoff();
        loop {
            let pause = if self.is_bypassing() {
                backoff.next_pause()
            } else {
                backoff.reset();
                Duration::from_millis(500)
            };
            if !bulkops_shared::shutdown::sleep(&shutdown, pause).await {
                return;
            }
            if !self.is_bypassing() {
                continue;
            }
            match self.probe().await {
                Ok(()) => self.close(),
                Err(class) => {
                    self.metrics.failures.with_label_values(&[class]).inc();
                    let since = *lock(&self.since);
                    if self.logs.admit("bypass_still").is_some() {
                        tracing::warn!(
                            class,
                            bypassed_secs = since.map_or(0, |(s, _)| s.elapsed().as_secs()),
                            "redis still refuses lock writes; record locks still bypassed"
                        );
                    }
                }
            }
        }
    }

    /// A `PING` (cheap, and enough to tell an unreachable Redis), then the lock script
    /// itself: only a lock write says that lock writes are accepted.
    async fn probe(&self) -> Result<(), &'static str> {
        self.locks.ping().await.map_err(|e| e.class())?;
        let token = Locks::new_token();
        self.locks
            .acquire(&token, &[PROBE_TARGET], Duration::from_secs(1))
            .await
            .map_err(|e| e.class())?;
        let _ = self.locks.release(&token, &[PROBE_TARGET]).await;
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
