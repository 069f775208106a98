//! Waiting out an unreachable dependency, once per worker in the logs.
//!
//! Any number of chunks may wait for the same dependency at once. [`Outages`] counts them
//! (`bulkops_dependency_waiting_chunks`), logs one line when the first starts waiting and
//! one when the last stops, a reminder while it lasts, and tells the worker's status
//! reporter that this worker is waiting (so that producers do not re-publish work that is
//! only held up, see `status`).

use std::sync::Mutex;

use bulkops_shared::batch::BatchKind;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bulkops_shared::metrics::WorkerMetrics;
use bulkops_shared::ratelog::LogGate;
use sea_orm::ConnectionTrait;

use crate::process::Processor;
use crate::retry::{Dependency, Failure};

/// Every dependency a worker waits for.
const ALL: [Dependency; 2] = [Dependency::Database, Dependency::Redis];

/// One dependency's waiters.
#[derive(Debug, Default)]
struct Waiters {
    n: AtomicUsize,
    since: Mutex<Option<Instant>>,
}

/// The worker's view of its outages.
pub struct Outages {
    metrics: WorkerMetrics,
    waiters: [Waiters; 2],
    logs: LogGate,
}

impl std::fmt::Debug for Outages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outages")
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

fn slot(dep: Dependency) -> usize {
    match dep {
        Dependency::Database => 0,
        Dependency::Redis => 1,
    }
}

impl Outages {
    /// No outage yet.
    pub fn new(metrics: WorkerMetrics) -> Self {
        Self {
            metrics,
            waiters: Default::default(),
            logs: LogGate::default(),
        }
    }

    /// A chunk starts waiting for `dep`; it stops when the guard is dropped.
    pub fn enter(&self, dep: Dependency) -> Waiting<'_> {
        let w = &self.waiters[slot(dep)];
        if w.n.fetch_add(1, Ordering::SeqCst) == 0 {
            let mut since = lock(&w.since);
            if since.is_none() {
                *since = Some(Instant::now());
            }
            if let Some(held) = self.logs.admit(dep.as_str()) {
                tracing::warn!(
                    dependency = dep.as_str(),
                    flaps_since_last_line = held,
                    "dependency unreachable; holding work (unacknowledged) until it answers"
                );
            }
        }
        self.metrics
            .dependency_waiting
            .with_label_values(&[dep.as_str()])
            .inc();
        Waiting {
            outages: self,
            dep,
            last_reminder: Instant::now(),
        }
    }

    /// The dependencies some chunk of this worker is waiting for now, with how long.
    pub fn current(&self) -> Vec<(Dependency, Duration)> {
        ALL.iter()
            .filter_map(|d| {
                let w = &self.waiters[slot(*d)];
                if w.n.load(Ordering::SeqCst) == 0 {
                    return None;
                }
                let since = *lock(&w.since);
                Some((*d, since.map(|s| s.elapsed()).unwrap_or_default()))
            })
            .collect()
    }

    fn leave(&self, dep: Dependency) {
        let w = &self.waiters[slot(dep)];
        self.metrics
            .dependency_waiting
            .with_label_values(&[dep.as_str()])
            .dec();
        if w.n.fetch_sub(1, Ordering::SeqCst) == 1 {
            let waited = lock(&w.since).take().map(|s| s.elapsed());
            if self.logs.admit(&format!("{}_back", dep.as_str())).is_some() {
                tracing::info!(
                    dependency = dep.as_str(),
                    waited_secs = waited.map_or(0, |d| d.as_secs()),
                    "dependency answers again; resuming"
                );
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// One chunk waiting for a dependency.
#[derive(Debug)]
pub struct Waiting<'a> {
    outages: &'a Outages,
    dep: Dependency,
    last_reminder: Instant,
}

impl Waiting<'_> {
    /// Called after each failed probe: a reminder now and then while the outage lasts.
    pub fn still(&mut self) {
        if self.last_reminder.elapsed() < bulkops_shared::ratelog::REMINDER {
            return;
        }
        self.last_reminder = Instant::now();
        let w = &self.outages.waiters[slot(self.dep)];
        // One reminder per worker, not one per waiting chunk.
        if self
            .outages
            .logs
            .admit(&format!("{}_still", self.dep.as_str()))
            .is_some()
        {
            let since = *lock(&w.since);
            tracing::warn!(
                dependency = self.dep.as_str(),
                waiting_secs = since.map_or(0, |s| s.elapsed().as_secs()),
                chunks_held = w.n.load(Ordering::SeqCst),
                "still waiting for the dependency"
            );
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.outages.leave(self.dep);
    }
}

// Riding out an outage inside the chunk pipeline: what follows a failure, the probe and
// the wait.

/// What follows a failure.
pub(crate) enum Then {
    /// Try again (after the wait or pause that already happened).
    Retry,
    /// Stop trying here; hand the work on with this failure.
    Stop(Failure),
}

impl Processor {
    /// Decides what follows `failure`. A failure that names the database is checked with a
    /// probe: if the database does not answer either, this is an outage, waited out
    /// without spending an attempt (`Retry` once it answers). Otherwise the failure is
    /// unexplained: with `count`, it spends one of the in-process retries of `budget`
    /// (a jittered exponential pause, then `Retry`); without, or when they are spent, it
    /// stops with the failure for the caller to split, delay or dead-letter.
    pub(crate) async fn after_failure(
        &self,
        failure: Failure,
        budget: &mut impl Iterator<Item = Duration>,
        count: bool,
        kind: BatchKind,
        err: &(dyn std::fmt::Display + Sync),
    ) -> Then {
        self.metrics
            .failures
            .with_label_values(&[failure.class()])
            .inc();
        if let Some(dep) = failure.suspects()
            && !self.probe(dep).await
        {
            return if self.ride_out(dep).await {
                Then::Retry
            } else {
                Then::Stop(Failure::Interrupted)
            };
        }
        let Failure::Transient(class) = &failure else {
            if let Some(held) = self.logs.admit(failure.class()) {
                tracing::warn!(class = failure.class(), error = %err, repeats_since_last_line = held, "permanent database failure");
            }
            return Then::Stop(failure);
        };
        let class = class.name();
        if let Some(held) = self.logs.admit(class) {
            tracing::warn!(class, error = %err, repeats_since_last_line = held, "transient failure the database probe does not explain; retrying with backoff, counted");
        }
        if !count {
            return Then::Stop(failure);
        }
        match budget.next() {
            Some(pause) => {
                self.metrics
                    .retries
                    .with_label_values(&[kind.label(), "in_process"])
                    .inc();
                tokio::time::sleep(pause).await;
                Then::Retry
            }
            None => Then::Stop(failure),
        }
    }
}

impl Processor {
    /// Whether `dep` answers now (within a short timeout).
    async fn probe(&self, dep: Dependency) -> bool {
        match dep {
            Dependency::Database => matches!(
                tokio::time::timeout(
                    Duration::from_secs(2),
                    self.control
                        .execute_raw(bulkops_shared::db::stmt("SELECT 1", [])),
                )
                .await,
                Ok(Ok(_))
            ),
            Dependency::Redis => self.gate.locks().ping().await.is_ok(),
        }
    }

    /// Waits, with backoff, until `dep` answers again. Returns false when the worker is
    /// shutting down first. Deliveries in hand stay unacknowledged meanwhile (bounded by
    /// the prefetch), so nothing is lost and no attempt is spent on an outage. It sleeps
    /// before every probe, so a flapping dependency cannot make it spin.
    async fn ride_out(&self, dep: Dependency) -> bool {
        let mut waiting = self.outages.enter(dep);
        let mut backoff = bulkops_shared::backoff::Backoff::reconnect();
        loop {
            if !bulkops_shared::shutdown::sleep(&self.shutdown, backoff.next_pause()).await {
                return false;
            }
            if self.probe(dep).await {
                return true;
            }
            waiting.still();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_are_counted_per_dependency() {
        let o = Outages::new(WorkerMetrics::new().unwrap());
        assert!(o.current().is_empty());
        let a = o.enter(Dependency::Redis);
        let b = o.enter(Dependency::Redis);
        assert_eq!(o.current().len(), 1);
        assert_eq!(o.current()[0].0, Dependency::Redis);
        drop(a);
        assert_eq!(o.current().len(), 1);
        drop(b);
        assert!(o.current().is_empty());
    }
}
