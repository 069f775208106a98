//! Splitting accepted batches into per-record messages: resumable, confirmed, streaming,
//! metered and fair.
//!
//! - **Resumable.** A producer splits a batch only while it holds the batch's lease
//!   (`split_owner`, `split_lease_until`), renewed as it goes. Progress (`split_next_seq`) is
//!   committed after each chunk's publishes are confirmed. If the producer dies, the lease
//!   expires and any producer (or its restart) adopts the batch and carries on from the
//!   committed position; a chunk published but not yet recorded is published again, which
//!   workers absorb (an item leaves `pending` once).
//! - **Streaming.** Items are read in chunks by keyset (`seq`), so memory does not grow
//!   with the batch; only `pending` items are published.
//! - **Metered and fair.** At most `split.max_in_flight_per_agency` bulk-lane messages of
//!   one agency, and `split.max_in_flight_per_batch` of one batch, wait in the work queues at
//!   once; the splitter tops them up as items finish, agencies first and then batches within
//!   an agency ([`crate::fair`]), so a huge batch cannot bury a later one and an agency with
//!   many batches gets no more of the workers than an agency with one. Small batches (a
//!   single conversion, ten Individuals) travel on the interactive lane, which workers serve
//!   with capacity of their own, and are published first in every round.
//! - **Never stuck, never flooded.** A batch whose split finished but whose items stopped
//!   moving for `split.stall_after_secs` (a message lost to an operator's purge, say) has
//!   its still-pending items published again, one *generation* at a time, and only when
//!   that can be what is missing:
//!   - never while a worker reports waiting for an unreachable dependency
//!     (`worker_status.waiting_reported_at`, fresh within 15 s): the items are held up, not lost;
//!   - never while the batch's lane still has ready messages in its work, retry or
//!     dead-letter-watch queues: they may be the batch's own messages, merely waiting;
//!   - generation g+1 only after `stall_after_secs × 2^g` more without progress (the
//!     exponent capped at 4), claimed by one producer (optimistically, on the generation).
//!
//!   A generation publishes each pending item once, at most `max_in_flight_per_batch` of
//!   them, and touches neither the split position nor `split_published`, so the in-flight
//!   window is never lifted. The bound: the queues hold at most one ready copy of each
//!   pending item beyond the original, plus what workers hold unacknowledged (at most
//!   `amqp.prefetch` per worker and lane); an outage of any length adds nothing.
//! - **Traced.** Each chunk is a `split.chunk` span in the trace its batch was accepted
//!   under ([`crate::spans`]), and every message it publishes carries that span's
//!   `traceparent` header.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkops_shared::amqp::{Outgoing, Publisher, headers, json_properties, with_timeout};
use bulkops_shared::backoff::Backoff;
use bulkops_shared::batch::{BatchKind, Lane};
use bulkops_shared::config::SplitSettings;
use bulkops_shared::db::stmt;
use bulkops_shared::ids::BatchId;
use bulkops_shared::messages::WorkMessage;
use bulkops_shared::metrics::ProducerMetrics;
use bulkops_shared::progress;
use bulkops_shared::telemetry::propagation;
use bulkops_shared::topology::Topology;
use lapin::types::AMQPValue;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::fair;

/// Wakes the splitter (after a batch is accepted).
#[derive(Clone, Default)]
pub struct SplitHandle {
    wake: Arc<Notify>,
}

impl SplitHandle {
    /// Asks the splitter to look for work now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// Header carrying the publish time (Unix milliseconds), for the item latency metric.
pub const PUBLISHED_AT_HEADER: &str = bulkops_shared::messages::headers::PUBLISHED_AT;

/// How recent a worker's outage report must be to hold the stall sweeper, in seconds
/// (workers renew theirs every 5 s while they wait; a worker that recovered keeps holding
/// the sweeper this long, while it catches up).
const OUTAGE_REPORT_FRESH_SECS: f64 = 15.0;
/// Largest exponent of the spacing between a batch's republish generations.
const MAX_GENERATION_EXPONENT: i32 = 4;

/// Why a split round failed (retried from the committed position).
pub use bulkops_shared::amqp::RoundError as SplitError;

#[derive(Debug, Clone)]
struct OwnedBatch {
    id: BatchId,
    agency_id: i64,
    kind: BatchKind,
    lane: Lane,
    next_seq: i64,
    published: i64,
    presettled: i64,
    done: i64,
    total: i64,
    /// Bulk-lane messages in flight over all the agency's unfinished batches.
    agency_in_flight: i64,
    /// The `traceparent` the batch was accepted under (traces on).
    trace_context: Option<String>,
}

impl OwnedBatch {
    /// Messages published and not yet decided (an estimate from the counters). Items
    /// settled at acceptance count as done but were never published, so they are taken
    /// out of the decided ones; never negative.
    fn in_flight(&self) -> i64 {
        (self.published - (self.done - self.presettled)).max(0)
    }

    /// Items from the split position to the end, not published yet (an upper bound: some
    /// may be settled already, and are skipped when read).
    fn unpublished(&self) -> i64 {
        (self.total - self.next_seq + 1).max(0)
    }

    /// The batch as the fair planner ([`fair::plan`]) sees it.
    fn candidate(&self) -> fair::Candidate {
        fair::Candidate {
            agency_id: self.agency_id,
            lane: self.lane,
            in_flight: self.in_flight(),
            unpublished: self.unpublished(),
        }
    }
}

/// The planner's windows from `split.*`: a 0 window keeps meaning "no limit", and a window
/// too large for the planner's arithmetic saturates instead of wrapping.
fn windows(cfg: &SplitSettings) -> fair::Windows {
    let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    fair::Windows {
        chunk: i64::try_from(cfg.chunk_size).unwrap_or(i64::MAX),
        per_batch: as_i64(cfg.max_in_flight_per_batch),
        per_agency: as_i64(cfg.max_in_flight_per_agency),
    }
}

/// The splitter of one producer.
pub struct Splitter {
    db: DatabaseConnection,
    publisher: Publisher,
    topology: Topology,
    cfg: SplitSettings,
    owner: uuid::Uuid,
    metrics: ProducerMetrics,
    handle: SplitHandle,
    logs: bulkops_shared::ratelog::LogGate,
    round_timeout: Duration,
}

impl Splitter {
    /// A splitter identified by `owner` (unique per producer process).
    pub fn new(
        db: DatabaseConnection,
        publisher: Publisher,
        topology: Topology,
        cfg: SplitSettings,
        owner: uuid::Uuid,
        metrics: ProducerMetrics,
        handle: SplitHandle,
    ) -> Self {
        Self {
            db,
            publisher,
            topology,
            cfg,
            owner,
            metrics,
            handle,
            logs: bulkops_shared::ratelog::LogGate::default(),
            round_timeout: Duration::from_secs(60),
        }
    }

    /// Bounds each split round (its database calls and confirmed publishes) in time, so a
    /// half-open connection cannot stall splitting; a round cut short is simply run again
    /// (positions are committed per confirmed chunk).
    #[must_use]
    pub fn with_round_timeout(mut self, timeout: Duration) -> Self {
        self.round_timeout = timeout;
        self
    }

    fn lease_secs(&self) -> f64 {
        self.cfg.lease_secs as f64
    }

    /// Splits until `shutdown`, then hands its batches back so another producer resumes
    /// them at once.
    pub async fn run(self, shutdown: CancellationToken) {
        let poll = Duration::from_millis(self.cfg.poll_interval_ms);
        let mut last_scan = Instant::now()
            .checked_sub(poll)
            .unwrap_or_else(Instant::now);
        let mut last_renew = Instant::now();
        let mut backoff = Backoff::reconnect();
        while !shutdown.is_cancelled() {
            let round = async {
                if last_scan.elapsed() >= poll {
                    self.fold_stale_shards().await?;
                    self.sweep_stalled().await?;
                    self.claim_orphans().await?;
                    last_scan = Instant::now();
                }
                if last_renew.elapsed() >= Duration::from_secs(self.cfg.lease_secs.div_ceil(3)) {
                    self.renew_leases().await?;
                    last_renew = Instant::now();
                }
                self.round().await
            };
            let bounded = match tokio::time::timeout(self.round_timeout, round).await {
                Ok(r) => r,
                Err(_) => Err(SplitError::Db(bulkops_shared::db::client_timeout(
                    "split round",
                ))),
            };
            let pause = match bounded {
                Ok((published, owned)) => {
                    backoff.reset();
                    if published > 0 {
                        continue;
                    }
                    if owned > 0 {
                        // Metered: items are finishing; top up soon.
                        Duration::from_millis(50).min(poll)
                    } else {
                        poll
                    }
                }
                Err(e) => {
                    self.metrics.split_errors.inc();
                    if let Some(held) = self.logs.admit("round") {
                        tracing::warn!(error = %e, repeats_since_last_line = held, "split round failed; retrying");
                    }
                    backoff.next_pause()
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.handle.wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
        if let Err(e) = self.release_leases().await {
            tracing::warn!(error = %e, "could not hand back split leases; they expire by themselves");
        }
    }

    /// One round over the batches this producer owns. Returns messages published and
    /// batches still owned. How much each batch may publish is [`fair::plan`]'s choice:
    /// agencies first, then batches within an agency.
    async fn round(&self) -> Result<(usize, usize), SplitError> {
        let mut owned = self.owned().await?;
        // Interactive batches first, then oldest first.
        owned.sort_by_key(|b| (b.lane != Lane::Interactive, b.id));
        self.metrics.split_owned.set(owned.len() as i64);
        let candidates: Vec<fair::Candidate> = owned.iter().map(OwnedBatch::candidate).collect();
        let agency_in_flight: HashMap<i64, i64> = owned
            .iter()
            .map(|b| (b.agency_id, b.agency_in_flight))
            .collect();
        let rooms = fair::plan(&candidates, &agency_in_flight, windows(&self.cfg));
        let mut published = 0;
        let mut still_owned = 0;
        for (batch, room) in owned.iter().zip(rooms) {
            still_owned += 1;
            if room == 0 {
                continue;
            }
            let span = crate::spans::split_chunk(
                batch.id,
                batch.kind,
                batch.agency_id,
                batch.lane,
                room,
                batch.trace_context.as_deref(),
            );
            published += self.publish_chunk(batch, room).instrument(span).await?;
        }
        Ok((published, still_owned))
    }

    async fn owned(&self) -> Result<Vec<OwnedBatch>, DbErr> {
        let rows = self
            .db
            .query_all_raw(stmt(
                // The windows count outcomes with the counter shards: the batch row alone
                // lags by the workers' unfolded work, which the split would take for
                // messages still queued.
                format!(
                    "SELECT b.id, b.agency_id, b.kind, b.lane, b.split_next_seq, b.split_published,
                            b.n_presettled, {b_done} AS n_done,
                            b.total, a.in_flight AS agency_in_flight, b.trace_context
                       FROM bulk_batches b
                      CROSS JOIN LATERAL (
                        SELECT COALESCE(sum(GREATEST(o.split_published - ({o_done} - o.n_presettled), 0)), 0)::bigint
                               AS in_flight
                          FROM bulk_batches o
                         WHERE o.agency_id = b.agency_id AND o.completed_at IS NULL AND o.lane = 'bulk'
                      ) a
                      WHERE b.split_done_at IS NULL AND b.split_owner = $1
                      ORDER BY b.id",
                    b_done = progress::decided_sql("b"),
                    o_done = progress::decided_sql("o"),
                ),
                [self.owner.into()],
            ))
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let kind: String = r.try_get("", "kind")?;
            let lane: String = r.try_get("", "lane")?;
            out.push(OwnedBatch {
                id: BatchId(r.try_get("", "id")?),
                agency_id: r.try_get("", "agency_id")?,
                kind: BatchKind::from_column(&kind)?,
                lane: Lane::from_column(&lane)?,
                next_seq: r.try_get("", "split_next_seq")?,
                published: r.try_get("", "split_published")?,
                presettled: r.try_get("", "n_presettled")?,
                done: r.try_get("", "n_done")?,
                total: r.try_get("", "total")?,
                agency_in_flight: r.try_get("", "agency_in_flight")?,
                trace_context: r.try_get("", "trace_context")?,
            });
        }
        self.metrics
            .split_backlog
            .set(out.iter().map(OwnedBatch::unpublished).sum());
        Ok(out)
    }

    /// Publishes up to `limit` pending items of `batch` from its split position and records
    /// the new position. Returns how many were published.
    async fn publish_chunk(&self, batch: &OwnedBatch, limit: i64) -> Result<usize, SplitError> {
        let rows = self
            .db
            .query_all_raw(stmt(
                "SELECT seq, target_id FROM bulk_items
                  WHERE batch_id = $1 AND seq >= $2 AND status = 'pending'
                  ORDER BY seq LIMIT $3",
                [batch.id.into(), batch.next_seq.into(), limit.into()],
            ))
            .await?;
        let op = batch.kind.op();
        let mut bodies = Vec::with_capacity(rows.len());
        let mut last_seq = batch.next_seq - 1;
        for r in &rows {
            let seq: i64 = r.try_get("", "seq")?;
            let target: i64 = r.try_get("", "target_id")?;
            last_seq = seq;
            // Spread over the lane's shards, so every queue leader (every node) takes a share.
            let shard = self.topology.shard_for(batch.lane, seq);
            bodies.push((shard, WorkMessage::new(op, batch.id, seq, target).encode()));
        }
        let exhausted = (rows.len() as i64) < limit;
        if !bodies.is_empty() {
            let queues = self.topology.work_queues(batch.lane);
            let now_ms = chrono::Utc::now().timestamp_millis();
            let props =
                json_properties().with_headers(propagation::with_traceparent(headers(&[(
                    PUBLISHED_AT_HEADER,
                    AMQPValue::LongLongInt(now_ms),
                )])));
            let outgoing: Vec<Outgoing<'_>> = bodies
                .iter()
                .map(|(shard, body)| Outgoing {
                    exchange: "",
                    routing_key: &queues[(shard - 1).min(queues.len() - 1)],
                    body,
                    properties: props.clone(),
                    mandatory: true,
                })
                .collect();
            self.publisher.publish_all(outgoing).await?;
        }
        let updated = self
            .db
            .execute_raw(stmt(
                "UPDATE bulk_batches
                    SET split_next_seq = $3, split_published = split_published + $4,
                        state = CASE WHEN state = 'accepted' THEN 'running' ELSE state END,
                        started_at = COALESCE(started_at, clock_timestamp()),
                        progress_at = clock_timestamp(),
                        split_lease_until = CASE WHEN $5 THEN NULL ELSE clock_timestamp() + make_interval(secs => $6) END,
                        split_owner = CASE WHEN $5 THEN NULL ELSE split_owner END,
                        split_done_at = CASE WHEN $5 THEN clock_timestamp() END
                  WHERE id = $1 AND split_owner = $2",
                [
                    batch.id.into(),
                    self.owner.into(),
                    (last_seq + 1).into(),
                    (bodies.len() as i64).into(),
                    exhausted.into(),
                    self.lease_secs().into(),
                ],
            ))
            .await?;
        tracing::Span::current().record("items", bodies.len());
        if updated.rows_affected() == 0 {
            tracing::warn!("split lease lost to another producer; it carries on");
        } else if exhausted {
            tracing::info!("split finished");
        }
        self.metrics
            .split_published
            .with_label_values(&[batch.kind.label(), batch.lane.as_str()])
            .inc_by(bodies.len() as u64);
        Ok(bodies.len())
    }

    /// Takes over batches whose split lease expired (their producer died) or was handed back.
    async fn claim_orphans(&self) -> Result<(), DbErr> {
        let rows = self
            .db
            .query_all_raw(stmt(
                "UPDATE bulk_batches
                    SET split_owner = $1, split_lease_until = clock_timestamp() + make_interval(secs => $2)
                  WHERE id IN (SELECT id FROM bulk_batches
                                WHERE split_done_at IS NULL
                                  AND (split_lease_until IS NULL OR split_lease_until < clock_timestamp())
                                ORDER BY id LIMIT 50
                                FOR UPDATE SKIP LOCKED)
                RETURNING id",
                [self.owner.into(), self.lease_secs().into()],
            ))
            .await?;
        for r in rows {
            let id: i64 = r.try_get("", "id")?;
            tracing::info!(
                batch_id = id,
                "resuming the split of a batch whose producer stopped"
            );
        }
        Ok(())
    }

    async fn renew_leases(&self) -> Result<(), DbErr> {
        self.db
            .execute_raw(stmt(
                "UPDATE bulk_batches SET split_lease_until = clock_timestamp() + make_interval(secs => $2)
                  WHERE split_done_at IS NULL AND split_owner = $1",
                [self.owner.into(), self.lease_secs().into()],
            ))
            .await?;
        Ok(())
    }

    async fn release_leases(&self) -> Result<(), DbErr> {
        self.db
            .execute_raw(stmt(
                "UPDATE bulk_batches SET split_owner = NULL, split_lease_until = NULL
                  WHERE split_done_at IS NULL AND split_owner = $1",
                [self.owner.into()],
            ))
            .await?;
        Ok(())
    }

    /// Folds the counter shards that no worker folded (one died between a chunk's commit
    /// and its fold, or stopped getting the batch's messages), completing the batches that
    /// they finish; before the stall sweep, which reads the folded progress.
    async fn fold_stale_shards(&self) -> Result<(), SplitError> {
        let completed = bulkops_shared::progress::fold_stale(
            &self.db,
            bulkops_shared::progress::STALE_SHARD_AFTER,
        )
        .await?;
        for batch in completed {
            tracing::info!(batch_id = %batch, "completed a batch whose last counts no worker folded");
        }
        Ok(())
    }

    /// Republishes the pending items of batches whose items stopped moving after their
    /// split finished, one generation at a time and only when nothing says they are merely
    /// held up (see the module's "Never stuck, never flooded").
    async fn sweep_stalled(&self) -> Result<(), SplitError> {
        let rows = self
            .db
            .query_all_raw(stmt(
                "SELECT id, kind, lane, resplit_generation, trace_context FROM bulk_batches
                  WHERE completed_at IS NULL AND split_done_at IS NOT NULL
                    AND progress_at < clock_timestamp()
                        - make_interval(secs => $1 * power(2, least(resplit_generation, $2)))
                  ORDER BY id LIMIT 20",
                [
                    (self.cfg.stall_after_secs as f64).into(),
                    MAX_GENERATION_EXPONENT.into(),
                ],
            ))
            .await?;
        let mut stalled = Vec::with_capacity(rows.len());
        for r in &rows {
            let kind: String = r.try_get("", "kind")?;
            let lane: String = r.try_get("", "lane")?;
            stalled.push((
                BatchId(r.try_get("", "id")?),
                BatchKind::from_column(&kind)?,
                Lane::from_column(&lane)?,
                r.try_get::<i32>("", "resplit_generation")?,
                r.try_get::<Option<String>>("", "trace_context")?,
            ));
        }
        let mut held_outage = 0;
        let mut held_queued = 0;
        if !stalled.is_empty() {
            let waiting = self
                .db
                .query_one_raw(stmt(
                    "SELECT count(*) AS n FROM worker_status
                      WHERE waiting_reported_at > clock_timestamp() - make_interval(secs => $1)",
                    [OUTAGE_REPORT_FRESH_SECS.into()],
                ))
                .await?
                .map(|r| r.try_get::<i64>("", "n"))
                .transpose()?
                .unwrap_or(0);
            if waiting > 0 {
                held_outage = stalled.len() as i64;
                if let Some(held) = self.logs.admit("held_outage") {
                    tracing::info!(
                        batches = stalled.len(),
                        workers_waiting = waiting,
                        repeats_since_last_line = held,
                        "stalled batches are held up by an outage workers report; not republishing"
                    );
                }
                stalled.clear();
            }
        }
        let mut ready: std::collections::HashMap<Lane, u64> = std::collections::HashMap::new();
        for (id, kind, lane, generation, trace_context) in stalled {
            let queued = match ready.get(&lane) {
                Some(n) => *n,
                None => {
                    let n = self.ready_messages(lane).await?;
                    ready.insert(lane, n);
                    n
                }
            };
            if queued > 0 {
                held_queued += 1;
                continue;
            }
            // One producer claims the generation; the others see it changed.
            let claimed = self
                .db
                .execute_raw(stmt(
                    "UPDATE bulk_batches
                        SET resplit_generation = resplit_generation + 1,
                            resplit_at = clock_timestamp(), progress_at = clock_timestamp()
                      WHERE id = $1 AND completed_at IS NULL AND resplit_generation = $2
                        AND progress_at < clock_timestamp()
                            - make_interval(secs => $3 * power(2, least(resplit_generation, $4)))",
                    [
                        id.into(),
                        generation.into(),
                        (self.cfg.stall_after_secs as f64).into(),
                        MAX_GENERATION_EXPONENT.into(),
                    ],
                ))
                .await?;
            if claimed.rows_affected() == 0 {
                continue;
            }
            let span = crate::spans::republish(id, kind, lane, trace_context.as_deref());
            let n = self.republish(id, kind, lane).instrument(span).await?;
            tracing::warn!(
                batch_id = %id,
                generation = generation + 1,
                republished = n,
                "batch stopped moving with nothing queued for it; republished its pending items"
            );
        }
        self.metrics
            .split_stalled
            .with_label_values(&["held_outage"])
            .set(held_outage);
        self.metrics
            .split_stalled
            .with_label_values(&["held_queued"])
            .set(held_queued);
        Ok(())
    }

    /// Ready messages in the queues that may hold a message of a `lane` batch: every shard
    /// of its work queue, its retry tiers and the dead-letter watch queue.
    async fn ready_messages(&self, lane: Lane) -> Result<u64, SplitError> {
        let link = self.publisher.link();
        let channel = link.channel().await?;
        // Every shard of the lane: a batch's messages are spread over all of them.
        let mut queues: Vec<String> = self.topology.work_queues(lane);
        for tier in 1..=self.topology.retry_tiers() {
            queues.push(self.topology.retry_queue(lane, tier));
        }
        queues.push(self.topology.dead_watch_queue());
        let mut total = 0_u64;
        let mut result = Ok(());
        for q in &queues {
            match link.queue_state(&channel, q).await {
                Ok(state) => total += u64::from(state.message_count()),
                Err(e) => {
                    // Unknown is not empty: republish nothing this round.
                    result = Err(e);
                    break;
                }
            }
        }
        let _ = with_timeout(link.timeout(), channel.close(200, "done".into())).await;
        result?;
        Ok(total)
    }

    /// Publishes every pending item of a batch once more (at most the in-flight window),
    /// reading them by keyset. The split position and `split_published` stay as they are.
    async fn republish(&self, id: BatchId, kind: BatchKind, lane: Lane) -> Result<u64, SplitError> {
        let chunk = i64::try_from(self.cfg.chunk_size).unwrap_or(i64::MAX);
        let cap = match self.cfg.max_in_flight_per_batch {
            0 => u64::MAX,
            w => w,
        };
        let op = kind.op();
        let queues = self.topology.work_queues(lane);
        let mut after = 0_i64;
        let mut published = 0_u64;
        while published < cap {
            let limit = chunk.min(i64::try_from(cap - published).unwrap_or(i64::MAX));
            let rows = self
                .db
                .query_all_raw(stmt(
                    "SELECT seq, target_id FROM bulk_items
                      WHERE batch_id = $1 AND seq > $2 AND status = 'pending'
                      ORDER BY seq LIMIT $3",
                    [id.into(), after.into(), limit.into()],
                ))
                .await?;
            // Each item to the shard the split gave it, so the shards stay even.
            let mut bodies = Vec::with_capacity(rows.len());
            for r in &rows {
                let seq: i64 = r.try_get("", "seq")?;
                after = seq;
                let shard = self.topology.shard_for(lane, seq);
                bodies.push((
                    shard,
                    WorkMessage::new(op, id, seq, r.try_get("", "target_id")?).encode(),
                ));
            }
            if !bodies.is_empty() {
                let props =
                    json_properties().with_headers(propagation::with_traceparent(headers(&[(
                        PUBLISHED_AT_HEADER,
                        AMQPValue::LongLongInt(chrono::Utc::now().timestamp_millis()),
                    )])));
                let outgoing: Vec<Outgoing<'_>> = bodies
                    .iter()
                    .map(|(shard, body)| Outgoing {
                        exchange: "",
                        routing_key: &queues[(shard - 1).min(queues.len() - 1)],
                        body,
                        properties: props.clone(),
                        mandatory: true,
                    })
                    .collect();
                self.publisher.publish_all(outgoing).await?;
                published += bodies.len() as u64;
                self.metrics
                    .split_republished
                    .with_label_values(&[kind.label(), lane.as_str()])
                    .inc_by(bodies.len() as u64);
            }
            if (rows.len() as i64) < limit {
                break;
            }
        }
        Ok(published)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bulk batch of 1,000 items at split position `next_seq`, with `published`
    /// messages out, `done` items decided of which `presettled` at acceptance.
    fn batch(next_seq: i64, published: i64, done: i64, presettled: i64) -> OwnedBatch {
        OwnedBatch {
            id: BatchId(1),
            agency_id: 7,
            kind: BatchKind::CreateSalesRecords,
            lane: Lane::Bulk,
            next_seq,
            published,
            presettled,
            done,
            total: 1000,
            agency_in_flight: 0,
            trace_context: None,
        }
    }

    fn settings(chunk: usize, per_batch: u64, per_agency: u64) -> SplitSettings {
        SplitSettings {
            chunk_size: chunk,
            max_in_flight_per_batch: per_batch,
            max_in_flight_per_agency: per_agency,
            interactive_max_items: 100,
            lease_secs: 10,
            poll_interval_ms: 500,
            stall_after_secs: 120,
        }
    }

    /// The room `split.*` gives one batch this round, as the splitter computes it.
    fn room(b: &OwnedBatch, cfg: &SplitSettings) -> i64 {
        let in_flight = HashMap::from([(b.agency_id, b.in_flight())]);
        fair::plan(&[b.candidate()], &in_flight, windows(cfg))[0]
    }

    #[test]
    fn items_settled_at_acceptance_are_never_in_flight() {
        // 100 published, 40 decided, 10 of them at acceptance (never published): 70 wait.
        assert_eq!(batch(101, 100, 40, 10).in_flight(), 70);
        // Nothing published yet, 5 settled at acceptance: nothing waits.
        assert_eq!(batch(1, 0, 5, 5).in_flight(), 0);
        // Every published item decided.
        assert_eq!(batch(101, 100, 110, 10).in_flight(), 0);
    }

    #[test]
    fn the_in_flight_estimate_is_never_negative() {
        // Counters read while a chunk commits can show more decided than published.
        assert_eq!(batch(11, 10, 30, 0).in_flight(), 0);
    }

    #[test]
    fn unpublished_counts_from_the_split_position_to_the_end() {
        assert_eq!(batch(1, 0, 0, 0).unpublished(), 1000);
        assert_eq!(batch(1000, 999, 0, 0).unpublished(), 1);
        assert_eq!(batch(1001, 1000, 0, 0).unpublished(), 0);
        assert_eq!(batch(1200, 1000, 0, 0).unpublished(), 0, "never negative");
    }

    #[test]
    fn the_room_is_the_window_left_at_most_a_chunk() {
        let cfg = settings(50, 100, 0);
        assert_eq!(room(&batch(1, 0, 0, 0), &cfg), 50, "a chunk");
        assert_eq!(room(&batch(101, 100, 30, 0), &cfg), 30, "70 in flight");
        assert_eq!(
            room(&batch(201, 200, 100, 0), &cfg),
            0,
            "the window is full"
        );
        // Presettled items do not take window: 100 published, 40 decided of which 10
        // at acceptance leaves 70 in flight, so 30 of room.
        assert_eq!(room(&batch(111, 100, 40, 10), &cfg), 30);
    }

    #[test]
    fn a_zero_window_means_no_limit() {
        let cfg = settings(50, 0, 0);
        assert_eq!(
            room(&batch(10_001, 10_000, 0, 0), &cfg),
            50,
            "a chunk, however many are in flight"
        );
        let w = windows(&settings(2000, 0, 0));
        assert_eq!((w.chunk, w.per_batch, w.per_agency), (2000, 0, 0));
    }

    #[test]
    fn the_agency_window_bounds_a_lone_batch_too() {
        let cfg = settings(50, 1000, 80);
        // 60 of the agency's messages in flight (all this batch's): 20 left.
        assert_eq!(room(&batch(61, 60, 0, 0), &cfg), 20);
        // A batch that has published everything keeps a token room to finish its split.
        assert_eq!(room(&batch(1001, 1000, 990, 0), &cfg), 1);
    }

    #[test]
    fn huge_windows_saturate_instead_of_wrapping() {
        let w = windows(&settings(usize::MAX, u64::MAX, u64::MAX));
        assert_eq!(
            (w.chunk, w.per_batch, w.per_agency),
            (i64::MAX, i64::MAX, i64::MAX)
        );
    }
}
