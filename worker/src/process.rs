//! The chunk pipeline: take a chunk → lock → apply in one transaction → ack.
//!
//! For each batch in a chunk: find the batch's [`Job`] ([`crate::job::for_kind`]); take the
//! Redis locks of every target in one round trip (through the [`LockGate`], which waits a
//! bounded time for a Redis that refuses or does not answer, then bypasses it); run the
//! job over the locked items in one transaction, commit together with the batch counters,
//! and only then acknowledge. Items whose lock another worker holds are retried in process
//! after a short jittered pause, then through the delayed retry queues.
//!
//! Failures are handled by what they mean ([`crate::retry`]): one the database probe
//! explains (it does not answer either) is waited out without spending an attempt
//! ([`crate::outage`]); one it does not explain pauses with backoff and counts; a failing
//! chunk of several items is split in halves until the failure is isolated. Failures that
//! outlast the retries, and permanent ones, are routed on ([`crate::route`]): to a delayed
//! retry queue or, with their history, to the dead-letter queue, where the dead-letter
//! watcher records the item as `failed`. Nothing is acknowledged that did not commit or
//! move on, and no path retries without a pause. Log lines are rate-limited per failure
//! class.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use bulkops_shared::amqp::{AmqpLink, Publisher};
use bulkops_shared::batch::{Lane, reason};
use bulkops_shared::config::{Settings, WorkerSettings};
use bulkops_shared::ids::BatchId;
use bulkops_shared::lock::{LockTarget, Locks};
use bulkops_shared::messages::WorkMessage;
use bulkops_shared::metrics::WorkerMetrics;
use bulkops_shared::progress::{OutcomeDelta, add_to_shard};
use bulkops_shared::ratelog::LogGate;
use bulkops_shared::topology::Topology;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, ShortString};
use sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};
use tracing::Instrument as _;

use crate::acks::AckTracker;
use crate::gate::{Acquired, LockGate};
use crate::job::Job;
use crate::meta::{BatchMeta, MetaCache};
use crate::outage::{Outages, Then};
use crate::retry::{self, Class, Failure};
use crate::route::Settle;

/// Header the splitter stamps with the publish time (Unix ms).
use bulkops_shared::messages::headers::PUBLISHED_AT;

/// One decoded delivery.
pub struct Work {
    /// The delivery (for acking and re-publishing).
    pub delivery: Delivery,
    /// What it asks for.
    pub msg: WorkMessage,
    /// Which delivery attempt this is (1-based).
    pub attempt: u32,
    /// Settles it on the channel it came from.
    pub tracker: Arc<AckTracker>,
}

/// Everything a chunk needs.
pub struct Processor {
    /// The CRM database.
    pub db: DatabaseConnection,
    /// Record locks, behind the wait-then-bypass gate.
    pub gate: Arc<LockGate>,
    /// Outages being waited out (for logs, metrics and the status report).
    pub outages: Arc<Outages>,
    /// Rate-limits the log lines of repeated failures.
    pub logs: LogGate,
    /// Batch facts.
    pub meta: MetaCache,
    /// Publishes retries and dead letters (confirmed).
    pub publisher: Publisher,
    /// Queue names.
    pub topology: Topology,
    /// Tuning.
    pub settings: WorkerSettings,
    /// Metrics.
    pub metrics: WorkerMetrics,
    /// Fired at shutdown: stops waiting for a dependency that is down.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Longest a chunk's transaction may take (client-side) before it is cancelled and
    /// retried.
    pub chunk_timeout: Duration,
    /// The session's `statement_timeout` (`database.statement_timeout_ms`; zero: none). A
    /// chunk timeout below it becomes the chunk transaction's statement timeout.
    pub statement_timeout: Duration,
    /// Client-side timeout of the database calls outside the chunk's transaction.
    pub call_timeout: Duration,
    /// A connection of its own (a pool of one) for probing the database and cancelling
    /// a timed-out chunk's query: neither may wait for the main pool, which the stuck
    /// chunks themselves may hold.
    pub control: DatabaseConnection,
    /// When this worker last folded each batch's counter shards.
    pub folded: std::sync::Mutex<std::collections::HashMap<BatchId, Instant>>,
}

/// The connections a [`Processor`] runs over: the ones a worker makes at start-up, or the
/// ones a test makes for itself.
pub struct Connections {
    /// The CRM database's pool.
    pub db: DatabaseConnection,
    /// A pool of one connection, for the database probe and for cancelling a timed-out
    /// chunk's query ([`Processor::control`]).
    pub control: DatabaseConnection,
    /// The record locks (behind the [`LockGate`] the processor builds over them).
    pub locks: Locks,
    /// The broker link retries and dead letters are published on.
    pub publish: Arc<AmqpLink>,
}

impl Processor {
    /// The processor of a worker configured by `settings`, over `connections`. Everything
    /// else a chunk needs (the lock gate and its outage book-keeping, the batch cache, the
    /// confirmed publisher, the timeouts) is built here, in one place, so the processor a
    /// test drives is the one the worker runs. The gate's background probe
    /// ([`LockGate::maintain`]) is the caller's to spawn.
    pub fn new(
        settings: &Settings,
        connections: Connections,
        metrics: WorkerMetrics,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        let Connections {
            db,
            control,
            locks,
            publish,
        } = connections;
        let topology = Topology::from_settings(settings);
        let outages = Arc::new(Outages::new(metrics.clone()));
        let gate = Arc::new(LockGate::new(
            locks,
            settings.worker.lock_bypass_after(),
            metrics.clone(),
            outages.clone(),
        ));
        Self {
            meta: MetaCache::new(db.clone(), settings.database.call_timeout()),
            db,
            gate,
            outages,
            logs: LogGate::default(),
            publisher: Publisher::new(publish, settings.amqp.confirm_window)
                .with_topology(topology.clone()),
            topology,
            settings: settings.worker.clone(),
            metrics,
            shutdown,
            chunk_timeout: settings
                .worker
                .chunk_timeout(settings.database.statement_timeout_ms),
            statement_timeout: Duration::from_millis(settings.database.statement_timeout_ms),
            call_timeout: settings.database.call_timeout(),
            control,
            folded: Default::default(),
        }
    }
}

/// How much longer than the chunk's server-side statement timeout the client waits: the
/// server normally ends a stuck statement itself (SQLSTATE 57014) and the connection stays
/// usable; the client-side timeout is for a server that does not answer at all.
const CHUNK_GRACE: Duration = Duration::from_secs(1);

/// How often a worker folds a running batch's counter shards into its counters (see
/// [`bulkops_shared::progress`]): the lag of the counts that the API, the metrics and the
/// splitter's windows read while a batch runs. A batch's last items are folded at once.
pub const FOLD_INTERVAL: Duration = Duration::from_millis(500);

impl Processor {
    /// Processes one chunk of deliveries from `lane`. Every delivery is acked, re-routed or
    /// (when even that fails) returned to the queue before this returns.
    pub async fn process(
        self: &Arc<Self>,
        lane: Lane,
        deliveries: Vec<Delivery>,
        tracker: Arc<AckTracker>,
    ) {
        self.metrics.chunk_items.observe(deliveries.len() as f64);
        let mut by_batch: BTreeMap<BatchId, Vec<Work>> = BTreeMap::new();
        for delivery in deliveries {
            match WorkMessage::decode(&delivery.data) {
                Ok(msg) => {
                    let attempt = retry::attempts_of(delivery.properties.headers().as_ref());
                    by_batch.entry(msg.batch_id).or_default().push(Work {
                        delivery,
                        msg,
                        attempt,
                        tracker: tracker.clone(),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, lane = lane.as_str(), "malformed message; dead-lettering it");
                    self.metrics
                        .dead_lettered
                        .with_label_values(&["malformed"])
                        .inc();
                    // The work queue's dead-letter exchange takes it to the dead-letter queue.
                    tracker.reject(delivery.delivery_tag).await;
                }
            }
        }
        for (batch_id, works) in by_batch {
            let span = crate::spans::batch(batch_id, &works);
            self.process_batch(lane, batch_id, works)
                .instrument(span)
                .await;
        }
    }

    async fn process_batch(self: &Arc<Self>, lane: Lane, batch_id: BatchId, works: Vec<Work>) {
        let mut budget = retry::in_process_backoff(self.settings.in_process_retries);
        // Until the batch is read, its kind is the one its messages name.
        let Some(named) = works.first().map(|w| w.msg.op.kind()) else {
            return;
        };
        let meta = loop {
            match self.meta.get(batch_id).await {
                Ok(Some(meta)) => break meta,
                Ok(None) => {
                    tracing::warn!("message for a batch that does not exist");
                    self.dead_letter(lane, works, "unknown_batch", "unknown_batch")
                        .await;
                    return;
                }
                Err(e) => match self
                    .after_failure(Failure::from_db(&e), &mut budget, true, named, &e)
                    .await
                {
                    Then::Retry => continue,
                    Then::Stop(failure) => {
                        self.fail(lane, works, failure).await;
                        return;
                    }
                },
            }
        };
        tracing::Span::current()
            .record("kind", meta.kind.as_str())
            .record("agency_id", meta.agency_id.0);
        let job = crate::job::for_kind(meta.kind);
        let expected_op = meta.kind.op();
        let (works, wrong): (Vec<Work>, Vec<Work>) =
            works.into_iter().partition(|w| w.msg.op == expected_op);
        if !wrong.is_empty() {
            tracing::warn!(
                n = wrong.len(),
                "messages whose operation does not match their batch"
            );
            self.dead_letter(lane, wrong, reason::ERROR, "wrong_operation")
                .await;
        }
        // A duplicate delivery in the same chunk is settled with its twin.
        let mut seen = HashSet::new();
        let (mut todo, dups): (Vec<Work>, Vec<Work>) =
            works.into_iter().partition(|w| seen.insert(w.msg.seq));
        let token = Locks::new_token();
        let mut backoff = retry::in_process_backoff(self.settings.in_process_retries);
        while !todo.is_empty() {
            let ids: Vec<i64> = todo.iter().map(|w| w.msg.target_id).collect();
            let prepared = match bulkops_shared::db::timed(
                self.call_timeout,
                "prepare the locks",
                job.prepare(&self.db, &meta, &ids),
            )
            .await
            {
                Ok(prepared) => prepared,
                Err(e) => {
                    match self
                        .after_failure(Failure::from_db(&e), &mut budget, true, meta.kind, &e)
                        .await
                    {
                        Then::Retry => continue,
                        Then::Stop(failure) => {
                            self.fail(lane, std::mem::take(&mut todo), failure).await;
                            break;
                        }
                    }
                }
            };
            let keys_of = |w: &Work| job.lock_targets(w.msg.target_id, &prepared);
            let mut keys: Vec<LockTarget> = todo.iter().flat_map(keys_of).collect();
            keys.sort_unstable();
            keys.dedup();
            let held_keys: HashSet<LockTarget> = match self
                .gate
                .acquire(&token, &keys, self.settings.lock_ttl(), &self.shutdown)
                .instrument(tracing::info_span!("worker.lock", keys = keys.len()))
                .await
            {
                Ok(Acquired::Held(held)) => keys
                    .iter()
                    .zip(&held)
                    .filter(|(_, h)| **h)
                    .map(|(k, _)| *k)
                    .collect(),
                Ok(Acquired::Bypassed) => {
                    // The lock only saves work: the database decides (unique index, row
                    // locks, the pending guard). Nothing to release afterwards.
                    self.metrics
                        .lock_bypassed
                        .with_label_values(&[meta.kind.label()])
                        .inc_by(todo.len() as u64);
                    let ready = std::mem::take(&mut todo);
                    self.commit_and_ack(lane, job, &meta, ready).await;
                    break;
                }
                Err(crate::gate::Interrupted) => {
                    self.fail(lane, std::mem::take(&mut todo), Failure::Interrupted)
                        .await;
                    break;
                }
            };
            let (ready, contended): (Vec<Work>, Vec<Work>) = std::mem::take(&mut todo)
                .into_iter()
                .partition(|w| keys_of(w).iter().all(|k| held_keys.contains(k)));
            if !ready.is_empty() {
                self.commit_and_ack(lane, job, &meta, ready).await;
            }
            let mine: Vec<LockTarget> = held_keys.into_iter().collect();
            if let Err(e) = self.gate.locks().release(&token, &mine).await {
                tracing::debug!(error = %e, "lock release failed; the locks expire by themselves");
            }
            if contended.is_empty() {
                break;
            }
            self.metrics
                .lock_contention
                .with_label_values(&[meta.kind.label()])
                .inc_by(contended.len() as u64);
            match backoff.next() {
                Some(pause) => {
                    self.metrics
                        .retries
                        .with_label_values(&[meta.kind.label(), "in_process"])
                        .inc_by(contended.len() as u64);
                    tokio::time::sleep(pause).await;
                    todo = contended;
                }
                None => {
                    self.fail(lane, contended, Failure::Transient(Class::LockContention))
                        .await;
                }
            }
        }
        self.settle(&dups, Settle::Ack).await;
    }

    /// Runs the batch's rules over `works` in one transaction (retrying transient failures
    /// in process) and acknowledges them after the commit. A chunk of several items that
    /// fails (other than by an outage) is split in halves, each run on its own, so that one
    /// item's failure, permanent or not, neither fails nor spends the attempts of the
    /// others: about 2·log2(n) transactions isolate one bad item among n.
    async fn commit_and_ack(
        self: &Arc<Self>,
        lane: Lane,
        job: &'static dyn Job,
        meta: &Arc<BatchMeta>,
        works: Vec<Work>,
    ) {
        let started = Instant::now();
        let items: Vec<(i64, i64)> = works.iter().map(|w| (w.msg.seq, w.msg.target_id)).collect();
        match self.commit_with_retries(job, meta, &items).await {
            Ok(committed) => {
                self.record_success(lane, meta, &works, committed.delta, started);
                self.settle(&works, Settle::Ack).await;
                if committed.delta.total() > 0 {
                    self.fold_after_commit(meta, committed.context).await;
                }
            }
            Err(Failure::Interrupted) => self.fail(lane, works, Failure::Interrupted).await,
            Err(failure) if works.len() > 1 => {
                tracing::debug!(
                    class = failure.class(),
                    n = works.len(),
                    "chunk failed; splitting it to isolate the failure"
                );
                let mut first = works;
                let second = first.split_off(first.len() / 2);
                Box::pin(self.commit_and_ack(lane, job, meta, first)).await;
                Box::pin(self.commit_and_ack(lane, job, meta, second)).await;
            }
            Err(failure) => self.fail(lane, works, failure).await,
        }
    }

    /// After a chunk's commit (and its ack): folds the batch's counter shards into its
    /// counters when every item is decided (completing the batch), or when this worker
    /// last folded the batch more than [`FOLD_INTERVAL`] ago (so that its progress shows).
    /// A failed fold is left to the next one, or to the producers' sweep of stale shards:
    /// nothing is lost, the counts are merely late.
    async fn fold_after_commit(&self, meta: &BatchMeta, context: Option<String>) {
        let due = {
            let mut last = match self.folded.lock() {
                Ok(last) => last,
                Err(poisoned) => poisoned.into_inner(),
            };
            let now = Instant::now();
            if last.len() > 1000 {
                last.retain(|_, at| now.duration_since(*at) < FOLD_INTERVAL * 10);
            }
            match last.get(&meta.id) {
                Some(at) if now.duration_since(*at) < FOLD_INTERVAL => false,
                _ => {
                    last.insert(meta.id, now);
                    true
                }
            }
        };
        let fold = async {
            if !due && !bulkops_shared::progress::ready_to_complete(&self.db, meta.id).await? {
                return Ok(false);
            }
            bulkops_shared::progress::fold(&self.db, meta.id, context.as_deref()).await
        };
        let span = tracing::info_span!("worker.fold");
        match bulkops_shared::db::timed(self.call_timeout, "fold the batch counters", fold)
            .instrument(span)
            .await
        {
            Ok(true) => tracing::info!("batch completed"),
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(error = %e, "could not fold the batch's counter shards; the next fold or the producers' sweep will");
            }
        }
    }

    fn record_success(
        &self,
        lane: Lane,
        meta: &BatchMeta,
        works: &[Work],
        delta: OutcomeDelta,
        started: Instant,
    ) {
        let kind = meta.kind.label();
        self.metrics
            .chunk_duration
            .with_label_values(&[kind])
            .observe(started.elapsed().as_secs_f64());
        for (outcome, n) in delta.by_outcome() {
            if n > 0 {
                self.metrics
                    .items_processed
                    .with_label_values(&[kind, outcome.as_str()])
                    .inc_by(n.unsigned_abs());
            }
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let latency = self
            .metrics
            .item_latency
            .with_label_values(&[kind, lane.as_str()]);
        for w in works {
            if let Some(at) = published_at(&w.delivery) {
                latency.observe((now_ms - at).max(0) as f64 / 1000.0);
            }
        }
    }

    /// Runs one chunk, waiting out outages and retrying unexplained transient failures
    /// with a pause (counted). A chunk of several items is not retried in process after an
    /// unexplained failure: the caller splits it instead.
    async fn commit_with_retries(
        &self,
        job: &dyn Job,
        meta: &BatchMeta,
        items: &[(i64, i64)],
    ) -> Result<Committed, Failure> {
        let mut budget = retry::in_process_backoff(self.settings.in_process_retries);
        loop {
            // The commit may or may not have happened; running the chunk again is safe
            // either way (items leave `pending` once).
            let err = match self.commit(job, meta, items).await {
                Ok(committed) => return Ok(committed),
                Err(err) => err,
            };
            let failure = match &err {
                ChunkError::Db(e) => Failure::from_db(e),
                ChunkError::Timeout(_) => Failure::chunk_timeout(),
            };
            match self
                .after_failure(failure, &mut budget, items.len() == 1, meta.kind, &err)
                .await
            {
                Then::Retry => continue,
                Then::Stop(failure) => return Err(failure),
            }
        }
    }

    /// One chunk's transaction, bounded in time: a statement stuck behind a lock, or a
    /// database that stops answering (a stalled network), must not hold the chunk for
    /// ever. Server-side, a statement ends by itself (57014) and releases its row locks
    /// within the chunk timeout or the session's statement timeout, whichever is shorter
    /// (the chunk timeout is set as the transaction's own when it is). Client-side, the
    /// chunk gives up a moment later; the backend's query is then cancelled from the
    /// control connection (`pg_cancel_backend`), so its row locks do not outlive the
    /// attempt and block the retry, and the dropped connection is discarded by the pool.
    async fn commit(
        &self,
        job: &dyn Job,
        meta: &BatchMeta,
        items: &[(i64, i64)],
    ) -> Result<Committed, ChunkError> {
        let backend = AtomicI32::new(0);
        match tokio::time::timeout(
            self.chunk_timeout + CHUNK_GRACE,
            self.commit_unbounded(job, meta, items, &backend),
        )
        .await
        {
            Ok(result) => result.map_err(ChunkError::Db),
            Err(_) => {
                let pid = backend.load(Ordering::SeqCst);
                if pid > 0 {
                    let cancelled = bulkops_shared::db::timed(
                        self.call_timeout,
                        "cancel a timed-out chunk",
                        self.control.execute_raw(bulkops_shared::db::stmt(
                            "SELECT pg_cancel_backend($1)",
                            [pid.into()],
                        )),
                    )
                    .await;
                    if let Err(e) = cancelled {
                        tracing::debug!(error = %e, "could not cancel a timed-out chunk's query; the server ends it");
                    }
                }
                Err(ChunkError::Timeout(self.chunk_timeout))
            }
        }
    }

    #[tracing::instrument(name = "worker.apply", skip_all, fields(
        items = items.len(),
        created = tracing::field::Empty,
        converted = tracing::field::Empty,
        skipped = tracing::field::Empty,
        failed = tracing::field::Empty,
    ))]
    async fn commit_unbounded(
        &self,
        job: &dyn Job,
        meta: &BatchMeta,
        items: &[(i64, i64)],
        backend: &AtomicI32,
    ) -> Result<Committed, sea_orm::DbErr> {
        let tx = self.db.begin().await?;
        // One round trip: the backend to cancel if the client gives up, and, when the
        // chunk timeout is the tighter bound, it as this transaction's statement timeout
        // (SET LOCAL), so the server ends a stuck statement by itself.
        let tighter =
            self.statement_timeout.is_zero() || self.chunk_timeout < self.statement_timeout;
        let first = if tighter {
            bulkops_shared::db::stmt(
                "SELECT pg_backend_pid() AS pid, set_config('statement_timeout', $1, true) AS st",
                [format!("{}ms", self.chunk_timeout.as_millis()).into()],
            )
        } else {
            bulkops_shared::db::stmt("SELECT pg_backend_pid() AS pid", [])
        };
        if let Some(r) = tx.query_one_raw(first).await? {
            backend.store(r.try_get("", "pid")?, Ordering::SeqCst);
        }
        // The events this transaction writes continue this span's trace.
        bulkops_shared::telemetry::propagation::stamp_transaction(&tx).await?;
        let delta = job.apply(&tx, meta, items).await?;
        crate::spans::record_outcomes(&delta);
        add_to_shard(&tx, meta.id, delta).await?;
        tx.commit()
            .instrument(tracing::info_span!("worker.commit"))
            .await?;
        Ok(Committed {
            delta,
            context: bulkops_shared::telemetry::propagation::current(),
        })
    }
}

/// What a chunk's committed transaction decided.
struct Committed {
    /// The outcomes it recorded (in its backend's counter shard).
    delta: OutcomeDelta,
    /// The trace context it committed under (its `worker.apply` span), for the event of
    /// the fold that completes the batch.
    context: Option<String>,
}

/// Why a chunk's transaction did not commit.
#[derive(Debug, thiserror::Error)]
enum ChunkError {
    /// The database said so.
    #[error(transparent)]
    Db(sea_orm::DbErr),
    /// It outlived `worker.chunk_timeout_ms` (not a connection error: the probe decides).
    #[error("chunk transaction did not finish within {0:?}")]
    Timeout(Duration),
}

fn published_at(delivery: &Delivery) -> Option<i64> {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(&ShortString::from(PUBLISHED_AT)))
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => Some(*n),
            _ => None,
        })
}
