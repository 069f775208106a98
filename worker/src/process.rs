//! The chunk pipeline: from a handful of deliveries to committed outcomes and acks.
//!
//! For each batch in a chunk: take the Redis locks of every target in one round trip
//! (through the [`LockGate`], which waits a bounded time for a Redis that refuses or does
//! not answer, then bypasses it); run the batch's rules over the locked items in one
//! transaction, commit together with the batch counters, and only then acknowledge. Items
//! whose lock another worker holds are retried in process after a short jittered pause,
//! then through the delayed retry queues.
//!
//! Failures are handled by what they mean ([`crate::retry`]): one the database probe
//! explains (it does not answer either) is waited out without spending an attempt; one it
//! does not explain pauses with backoff and counts; a failing chunk of several items is
//! split in halves until the failure is isolated. Failures that outlast the retries, and
//! permanent ones, are dead-lettered with their history; the dead-letter watcher then
//! records the item as `failed`. Nothing is acknowledged that did not commit or move on,
//! and no path retries without a pause. Log lines are rate-limited per failure class.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use bulkops_shared::amqp::{Outgoing, Publisher};
use bulkops_shared::batch::{BatchKind, Lane, reason};
use bulkops_shared::config::WorkerSettings;
use bulkops_shared::ids::BatchId;
use bulkops_shared::lock::{LockTarget, Locks};
use bulkops_shared::messages::{Op, WorkMessage};
use bulkops_shared::metrics::WorkerMetrics;
use bulkops_shared::progress::{OutcomeDelta, record_outcomes};
use bulkops_shared::ratelog::LogGate;
use bulkops_shared::topology::Topology;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, ShortString};
use sea_orm::{ConnectionTrait, DatabaseConnection, TransactionTrait};
use tracing::Instrument as _;

use crate::acks::AckTracker;
use crate::gate::{Acquired, LockGate};
use crate::meta::{BatchMeta, MetaCache};
use crate::outage::Outages;
use crate::retry::{self, Dependency, Failure, Next};

/// Header the splitter stamps with the publish time (Unix ms).
const PUBLISHED_AT: &str = "x-published-at-ms";

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
}

/// How much longer than the chunk's server-side statement timeout the client waits: the
/// server normally ends a stuck statement itself (SQLSTATE 57014) and the connection stays
/// usable; the client-side timeout is for a server that does not answer at all.
const CHUNK_GRACE: Duration = Duration::from_secs(1);

/// What follows a failure.
enum Then {
    /// Try again (after the wait or pause that already happened).
    Retry,
    /// Stop trying here; hand the work on with this failure.
    Stop(Failure),
}

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
                    .after_failure(Failure::from_db(&e), &mut budget, true, &e)
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
        let expected_op = match meta.kind {
            BatchKind::CreateSalesRecords => Op::CreateSalesRecord,
            BatchKind::ConvertSalesRecords => Op::ConvertSalesRecord,
        };
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
            let merge = if meta.kind == BatchKind::ConvertSalesRecords {
                let ids: Vec<i64> = todo.iter().map(|w| w.msg.target_id).collect();
                let looked_up = bulkops_shared::db::timed(
                    self.call_timeout,
                    "merge targets",
                    crate::convert::merge_targets(&self.db, &meta, &ids),
                )
                .await;
                match looked_up {
                    Ok(m) => m,
                    Err(e) => {
                        match self
                            .after_failure(Failure::from_db(&e), &mut budget, true, &e)
                            .await
                        {
                            Then::Retry => continue,
                            Then::Stop(failure) => {
                                self.fail(lane, std::mem::take(&mut todo), failure).await;
                                break;
                            }
                        }
                    }
                }
            } else {
                HashMap::new()
            };
            let keys_of = |w: &Work| -> Vec<LockTarget> {
                match meta.kind {
                    BatchKind::CreateSalesRecords => vec![LockTarget::Individual(w.msg.target_id)],
                    BatchKind::ConvertSalesRecords => {
                        let mut k = vec![LockTarget::SalesRecord(w.msg.target_id)];
                        if let Some(ind) = merge.get(&w.msg.target_id) {
                            k.push(LockTarget::Individual(*ind));
                        }
                        k
                    }
                }
            };
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
                    self.commit_and_ack(lane, &meta, ready).await;
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
                self.commit_and_ack(lane, &meta, ready).await;
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
                    self.fail(
                        lane,
                        contended,
                        Failure::Transient("lock_contention".into()),
                    )
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
    async fn commit_and_ack(self: &Arc<Self>, lane: Lane, meta: &Arc<BatchMeta>, works: Vec<Work>) {
        let started = Instant::now();
        let items: Vec<(i64, i64)> = works.iter().map(|w| (w.msg.seq, w.msg.target_id)).collect();
        match self.commit_with_retries(meta, &items).await {
            Ok(delta) => {
                self.record_success(lane, meta, &works, delta, started);
                self.settle(&works, Settle::Ack).await;
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
                Box::pin(self.commit_and_ack(lane, meta, first)).await;
                Box::pin(self.commit_and_ack(lane, meta, second)).await;
            }
            Err(failure) => self.fail(lane, works, failure).await,
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
                    .with_label_values(&[kind, outcome])
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
        meta: &BatchMeta,
        items: &[(i64, i64)],
    ) -> Result<OutcomeDelta, Failure> {
        let mut budget = retry::in_process_backoff(self.settings.in_process_retries);
        loop {
            let (failure, err) = match self.commit(meta, items).await {
                Ok(delta) => return Ok(delta),
                Err(ChunkError::Db(e)) => (Failure::from_db(&e), Some(e)),
                Err(ChunkError::Timeout) => (Failure::chunk_timeout(), None),
            };
            // The commit may or may not have happened; running the chunk again is safe
            // either way (items leave `pending` once).
            let detail = err.unwrap_or_else(|| {
                sea_orm::DbErr::Custom(format!(
                    "chunk transaction did not finish within {:?}",
                    self.chunk_timeout
                ))
            });
            match self
                .after_failure(failure, &mut budget, items.len() == 1, &detail)
                .await
            {
                Then::Retry => continue,
                Then::Stop(failure) => return Err(failure),
            }
        }
    }

    /// Decides what follows `failure`. A failure that names the database is checked with a
    /// probe: if the database does not answer either, this is an outage, waited out
    /// without spending an attempt (`Retry` once it answers). Otherwise the failure is
    /// unexplained: with `count`, it spends one of the in-process retries of `budget`
    /// (a jittered exponential pause, then `Retry`); without, or when they are spent, it
    /// stops with the failure for the caller to split, delay or dead-letter.
    async fn after_failure(
        &self,
        failure: Failure,
        budget: &mut impl Iterator<Item = Duration>,
        count: bool,
        err: &sea_orm::DbErr,
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
                    .with_label_values(&["any", "in_process"])
                    .inc();
                tokio::time::sleep(pause).await;
                Then::Retry
            }
            None => Then::Stop(failure),
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
        meta: &BatchMeta,
        items: &[(i64, i64)],
    ) -> Result<OutcomeDelta, ChunkError> {
        let backend = AtomicI32::new(0);
        match tokio::time::timeout(
            self.chunk_timeout + CHUNK_GRACE,
            self.commit_unbounded(meta, items, &backend),
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
                Err(ChunkError::Timeout)
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
        meta: &BatchMeta,
        items: &[(i64, i64)],
        backend: &AtomicI32,
    ) -> Result<OutcomeDelta, sea_orm::DbErr> {
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
        let delta = match meta.kind {
            BatchKind::CreateSalesRecords => crate::create::apply(&tx, meta, items).await?,
            BatchKind::ConvertSalesRecords => {
                let seqs: Vec<i64> = items.iter().map(|(seq, _)| *seq).collect();
                crate::convert::apply(&tx, meta, &seqs).await?
            }
        };
        crate::spans::record_outcomes(&delta);
        let completed = record_outcomes(&tx, meta.id, delta).await?;
        tx.commit()
            .instrument(tracing::info_span!("worker.commit"))
            .await?;
        if completed {
            tracing::info!("batch completed");
        }
        Ok(delta)
    }

    /// Hands failed deliveries on: transient ones to a delayed retry queue (or, with their
    /// attempts spent, to the dead-letter queue); permanent ones to the dead-letter queue.
    async fn fail(&self, lane: Lane, works: Vec<Work>, failure: Failure) {
        match failure {
            Failure::Interrupted => self.settle(&works, Settle::Requeue).await,
            Failure::Permanent(class) => self.dead_letter(lane, works, reason::ERROR, &class).await,
            Failure::Transient(class) => {
                let mut delayed: Vec<(Work, usize)> = Vec::new();
                let mut exhausted = Vec::new();
                for w in works {
                    match retry::next_step(
                        w.attempt,
                        self.settings.max_attempts,
                        self.topology.retry_tiers(),
                    ) {
                        Next::Delay(tier) => delayed.push((w, tier)),
                        Next::GiveUp => exhausted.push(w),
                    }
                }
                if !exhausted.is_empty() {
                    self.dead_letter(lane, exhausted, reason::RETRIES_EXHAUSTED, &class)
                        .await;
                }
                if delayed.is_empty() {
                    return;
                }
                let queues: Vec<String> = delayed
                    .iter()
                    .map(|(_, tier)| self.topology.retry_queue(lane, *tier))
                    .collect();
                let outgoing: Vec<Outgoing<'_>> = delayed
                    .iter()
                    .zip(&queues)
                    .map(|((w, _), queue)| Outgoing {
                        exchange: "",
                        routing_key: queue,
                        body: &w.delivery.data,
                        properties: w.delivery.properties.clone().with_headers(
                            retry::next_headers(
                                w.delivery.properties.headers().as_ref(),
                                w.attempt,
                                &class,
                                None,
                            ),
                        ),
                        mandatory: true,
                    })
                    .collect();
                let n = outgoing.len();
                let settle = match self.publisher.publish_all(outgoing).await {
                    Ok(_) => {
                        self.metrics
                            .retries
                            .with_label_values(&["any", "delayed"])
                            .inc_by(n as u64);
                        Settle::Ack
                    }
                    Err(e) => {
                        if let Some(held) = self.logs.admit("publish_retries") {
                            tracing::warn!(error = %e, repeats_since_last_line = held, "could not publish retries; returning the messages to the queue");
                        }
                        Settle::Requeue
                    }
                };
                let works: Vec<Work> = delayed.into_iter().map(|(w, _)| w).collect();
                self.settle(&works, settle).await;
            }
        }
    }

    /// Sends copies of `works` to the dead-letter exchange with their history and `reason`,
    /// then acknowledges them. The dead-letter watcher records the items' failure.
    async fn dead_letter(&self, lane: Lane, works: Vec<Work>, reason: &str, class: &str) {
        let dlx = self.topology.dead_letter_exchange();
        let queue = self.topology.work_queue(lane);
        let outgoing: Vec<Outgoing<'_>> = works
            .iter()
            .map(|w| Outgoing {
                exchange: &dlx,
                routing_key: &queue,
                body: &w.delivery.data,
                properties: w
                    .delivery
                    .properties
                    .clone()
                    .with_headers(retry::next_headers(
                        w.delivery.properties.headers().as_ref(),
                        w.attempt,
                        class,
                        Some(reason),
                    )),
                mandatory: true,
            })
            .collect();
        let settle = match self.publisher.publish_all(outgoing).await {
            Ok(n) => {
                self.metrics
                    .dead_lettered
                    .with_label_values(&[reason])
                    .inc_by(n as u64);
                for w in &works {
                    tracing::warn!(seq = w.msg.seq, reason, class, "item dead-lettered");
                }
                Settle::Ack
            }
            Err(e) => {
                if let Some(held) = self.logs.admit("publish_dead_letters") {
                    tracing::warn!(error = %e, repeats_since_last_line = held, "could not dead-letter; returning the messages to the queue");
                }
                Settle::Requeue
            }
        };
        self.settle(&works, settle).await;
    }

    /// Settles deliveries of one channel: acks in one frame where the tracker allows.
    async fn settle(&self, works: &[Work], how: Settle) {
        let Some(first) = works.first() else { return };
        let tracker = &first.tracker;
        match how {
            Settle::Ack => {
                let tags: Vec<u64> = works.iter().map(|w| w.delivery.delivery_tag).collect();
                tracker
                    .ack(&tags)
                    .instrument(tracing::info_span!("worker.ack", items = tags.len()))
                    .await;
            }
            Settle::Requeue => {
                // Give the failing dependency a moment before the messages come round again.
                tokio::time::sleep(Duration::from_millis(200)).await;
                for w in works {
                    tracker.requeue(w.delivery.delivery_tag).await;
                }
            }
        }
    }
}

/// Why a chunk's transaction did not commit.
enum ChunkError {
    /// The database said so.
    Db(sea_orm::DbErr),
    /// It outlived `worker.chunk_timeout_ms` (not a connection error: the probe decides).
    Timeout,
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
        let mut backoff = bulkops_shared::amqp::reconnect_backoff();
        loop {
            let pause = backoff.next().unwrap_or(Duration::from_secs(5));
            tokio::select! {
                () = self.shutdown.cancelled() => return false,
                () = tokio::time::sleep(pause) => {}
            }
            if self.probe(dep).await {
                return true;
            }
            waiting.still();
        }
    }
}

/// How a delivery is settled with the broker.
#[derive(Debug, Clone, Copy)]
enum Settle {
    /// Done (committed, or handed on to a retry or dead-letter queue).
    Ack,
    /// Back to the queue (nothing could be done now).
    Requeue,
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
