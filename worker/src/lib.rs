//! The bulkops worker: consumes per-record messages and carries out bulk create and
//! conversion, idempotently, many deliveries per transaction.
//!
//! # Layout
//! - [`acks`]: many deliveries acknowledged with one frame, in order.
//! - [`consumer`]: one consumer per lane; prefetch, bounded concurrency, batching, drain.
//! - [`process`]: the chunk pipeline: take a chunk → lock → apply in one transaction → ack.
//! - [`job`]: the [`job::Job`] trait a kind of batch implements (lock targets, prepare,
//!   apply); [`create`] and [`convert`] are its two jobs, set-based SQL over a chunk.
//! - [`route`]: where failed deliveries go (delayed retry queues, the dead-letter queue).
//! - [`meta`]: cached batch facts.
//! - [`outcomes`]: recording a chunk's item outcomes in one statement.
//! - [`retry`]: failure classes, retry tiers, attempt history headers.
//! - [`gate`]: the record locks, waited for a bounded time and then bypassed.
//! - [`outage`]: waiting out an unreachable dependency (probe, wait, once per worker in the
//!   logs) and what follows a failure.
//! - [`status`]: the worker's row in `worker_status`: readiness for the operator console,
//!   and the outage report that holds the producers' stall sweeper.
//! - [`deadletter`]: records the failure of dead-lettered items.
//! - [`server`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`spans`]: the chunk's span (linked to its messages' contexts) and the batch spans
//!   under it (in the traces of the requests).

// The chunk pipeline's futures, each wrapped in its span, nest deeper than the default
// limit lets the compiler lay out.
#![recursion_limit = "256"]

pub mod acks;
pub mod consumer;
pub mod convert;
pub mod create;
pub mod deadletter;
pub mod gate;
pub mod job;
pub mod meta;
pub mod outage;
pub mod outcomes;
pub mod process;
pub mod retry;
pub mod route;
pub mod server;
pub mod spans;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bulkops_shared::batch::Lane;
use bulkops_shared::config::Settings;
use bulkops_shared::metrics::WorkerMetrics;
use bulkops_shared::outbox::OutboxRelay;
use bulkops_shared::service;
use bulkops_shared::topology::Topology;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::consumer::LaneConfig;
use crate::process::Processor;

/// Runs a worker until `shutdown`, then drains within `worker.drain_timeout_secs`.
///
/// # Errors
/// When the configuration is unusable or `metrics.bind` cannot be bound.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&settings.metrics.bind)
        .await
        .with_context(|| format!("cannot listen on metrics.bind {}", settings.metrics.bind))?;
    let db = service::pool(&settings.database).await?;
    let control = service::side_pool(&settings.database, 1).await?;
    let metrics = WorkerMetrics::new().context("metrics")?;
    let locks = service::locks(&settings)?;
    let topology = Topology::from_settings(&settings);
    let consume_link = service::broker_link(&settings, "bulkops-worker-consume", &topology)?;
    let publish_link = service::broker_link(&settings, "bulkops-worker-publish", &topology)?;
    let processor = Arc::new(Processor::new(
        &settings,
        process::Connections {
            db: db.clone(),
            control: control.clone(),
            locks: locks.clone(),
            publish: publish_link.clone(),
        },
        metrics.clone(),
        shutdown.clone(),
    ));
    let gate = processor.gate.clone();
    let outages = processor.outages.clone();

    let tasks = TaskTracker::new();
    let drain = Duration::from_secs(settings.worker.drain_timeout_secs);
    for (lane, concurrency) in [
        (Lane::Bulk, settings.worker.concurrency),
        (Lane::Interactive, 1),
    ] {
        tasks.spawn(consumer::run(
            consume_link.clone(),
            topology.clone(),
            processor.clone(),
            LaneConfig {
                lane,
                concurrency,
                chunk_size: settings.worker.chunk_size,
                linger: match lane {
                    Lane::Bulk => settings.worker.chunk_linger(),
                    Lane::Interactive => Duration::ZERO,
                },
                prefetch: settings.amqp.prefetch,
                drain_timeout: drain,
            },
            shutdown.clone(),
        ));
    }
    tasks.spawn(deadletter::run(
        consume_link.clone(),
        topology.clone(),
        deadletter::Watcher {
            db: db.clone(),
            call_timeout: settings.database.call_timeout(),
            logs: bulkops_shared::ratelog::LogGate::default(),
        },
        shutdown.clone(),
    ));
    let relay_stop = CancellationToken::new();
    let relay_task = if settings.outbox.enabled {
        let relay = OutboxRelay::from_settings(
            &settings,
            db.clone(),
            publish_link.clone(),
            &topology,
            metrics.outbox.clone(),
        );
        Some(tokio::spawn(relay.run(relay_stop.clone())))
    } else {
        None
    };
    tasks.spawn(gate.clone().maintain(shutdown.clone()));
    tasks.spawn(consume_link.clone().maintain(shutdown.clone()));
    tasks.spawn(publish_link.clone().maintain(shutdown.clone()));
    let heartbeat_stop = CancellationToken::new();
    let heartbeat = tokio::spawn(
        status::Status {
            id: uuid::Uuid::new_v4(),
            db: db.clone(),
            links: vec![consume_link.clone(), publish_link.clone()],
            locks: locks.clone(),
            metrics: metrics.clone(),
            outages: outages.clone(),
            call_timeout: settings.database.call_timeout(),
        }
        .run(shutdown.clone(), heartbeat_stop.clone()),
    );
    let probe = server::Probe {
        db: db.clone(),
        links: vec![consume_link.clone(), publish_link.clone()],
        locks,
        gate,
        metrics,
    };
    let addr = listener.local_addr().context("metrics address")?;
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(
        axum::serve(listener, server::router(probe))
            .with_graceful_shutdown(server_stop.clone().cancelled_owned())
            .into_future(),
    );
    tracing::info!(%addr, "bulkops-worker running; metrics on {addr}");
    tasks.close();

    shutdown.cancelled().await;
    tracing::info!("draining");
    if tokio::time::timeout(drain + Duration::from_secs(1), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline reached");
    }
    // Events of the work finished during the drain leave before the relay stops; the
    // heartbeat row is deleted meanwhile.
    relay_stop.cancel();
    heartbeat_stop.cancel();
    if let Some(t) = relay_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    let _ = tokio::time::timeout(Duration::from_millis(500), heartbeat).await;
    server_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    consume_link.close().await;
    publish_link.close().await;
    db.close().await.ok();
    control.close().await.ok();
    tracing::info!("bulkops-worker stopped");
    Ok(())
}
