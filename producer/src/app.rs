//! Wiring: the router with its middleware, the background tasks beside it, and `run`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use bulkops_shared::amqp::Publisher;
use bulkops_shared::config::Settings;
use bulkops_shared::metrics::ProducerMetrics;
use bulkops_shared::outbox::OutboxRelay;
use bulkops_shared::service;
use bulkops_shared::topology::Topology;
use jsonwebtoken::DecodingKey;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;

use crate::problem::problem_fallback;
use crate::routes::{batches, bulk, ops, saved, search};
use crate::split::{SplitHandle, Splitter};
use crate::state::{AppState, Inner};

/// The API's router (with the operator console under `/ui` when it is enabled).
pub fn router(state: AppState) -> Router {
    let body_limit = state.settings.http.body_limit_bytes;
    let timeout = Duration::from_millis(state.settings.http.request_timeout_ms);
    let api = Router::new()
        .route("/v1/individuals/search", post(search::search))
        .route("/v1/individuals/search.csv", post(search::search_csv))
        .route("/v1/saved-searches", post(saved::create).get(saved::list))
        .route("/v1/saved-searches/{id}", get(saved::get))
        .route("/v1/bulk/sales-records/preview", post(bulk::preview))
        .route("/v1/bulk/sales-records", post(bulk::create))
        .route("/v1/bulk/conversions", post(bulk::convert))
        .route("/v1/batches", get(batches::list))
        .route("/v1/batches/{id}", get(batches::get))
        .route("/v1/batches/{id}/items", get(batches::items))
        .route("/v1/batches/{id}/items.csv", get(batches::items_csv))
        .route("/v1/openapi.json", get(ops::openapi))
        .route("/metrics", get(ops::metrics))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz));
    let app = if state.ui.is_some() {
        api.nest("/ui", crate::ui::router()).route(
            "/ui/",
            get(|| async { axum::response::Redirect::permanent("/ui") }),
        )
    } else {
        api
    };
    app.layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::new())
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ))
        .layer(middleware::from_fn(problem_fallback))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(crate::spans::http_layer())
        .with_state(state)
}

/// Counts requests and their durations by matched route (never by raw path: ids would
/// make the label unbounded).
async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    state
        .metrics
        .http_requests
        .with_label_values(&[&route, &method, &status])
        .inc();
    state
        .metrics
        .http_duration
        .with_label_values(&[&route, &method])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Runs the producer until `shutdown`: the API, the splitter, the outbox relay, the
/// retention pruner and the gauges. Dependencies may be down at start: requests then answer 503, `/readyz` says so,
/// and everything reconnects by itself.
///
/// # Errors
/// When the configuration lacks the JWT secret or the address cannot be bound.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&settings.http.bind)
        .await
        .with_context(|| format!("cannot listen on http.bind {}", settings.http.bind))?;
    serve(settings, listener, shutdown).await
}

/// [`run`] on an already bound listener (tests bind port 0).
///
/// # Errors
/// As [`run`].
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let state = state(&settings, &shutdown).await?;
    let Inner {
        db,
        export_db,
        metrics,
        publish_link,
        splitter: split_handle,
        split_owner,
        topology,
        ui: console,
        ..
    } = &*state.0;
    let (db, export_db, metrics, publish_link) = (
        db.clone(),
        export_db.clone(),
        metrics.clone(),
        publish_link.clone(),
    );
    let (split_handle, split_owner, topology, console) = (
        split_handle.clone(),
        *split_owner,
        topology.clone(),
        console.clone(),
    );

    let tasks = TaskTracker::new();
    let splitter = Splitter::new(
        db.clone(),
        Publisher::new(publish_link.clone(), settings.amqp.confirm_window)
            .with_topology(topology.clone()),
        topology.clone(),
        settings.split.clone(),
        split_owner,
        metrics.clone(),
        split_handle,
    )
    .with_round_timeout(settings.database.call_timeout() * 4);
    tasks.spawn(splitter.run(shutdown.clone()));
    if settings.outbox.enabled {
        let relay = OutboxRelay::from_settings(
            &settings,
            db.clone(),
            publish_link.clone(),
            &topology,
            metrics.outbox.clone(),
        );
        tasks.spawn(relay.run(shutdown.clone()));
    }
    if settings.retention.enabled {
        let pruner = crate::retention::Pruner::new(
            db.clone(),
            settings.retention.clone(),
            split_owner,
            metrics.clone(),
        );
        tasks.spawn(pruner.run(shutdown.clone()));
    }
    tasks.spawn(publish_link.clone().maintain(shutdown.clone()));
    if console.is_some() {
        tasks.spawn(crate::ui::sampler::run(db.clone(), shutdown.clone()));
    }
    tasks.spawn(crate::monitor::run(
        db.clone(),
        publish_link.clone(),
        topology,
        metrics,
        settings.database.call_timeout(),
        shutdown.clone(),
    ));
    tasks.close();

    let addr = listener.local_addr().context("listener address")?;
    tracing::info!(%addr, split_owner = %split_owner, "bulkops-producer listening on {addr}");
    let listener = crate::listener::TimedListener::new(listener, settings.http.write_timeout());
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .context("http server")?;
    shutdown.cancel();
    if tokio::time::timeout(Duration::from_secs(20), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop within 20 s");
    }
    publish_link.close().await;
    if let Some(c) = &console {
        c.link.close().await;
    }
    db.close().await.ok();
    export_db.close().await.ok();
    tracing::info!("bulkops-producer stopped");
    Ok(())
}

/// What the router serves from: the pools, the broker link, Redis, metrics and the
/// console, connected lazily (a dependency that is down makes requests answer 503). The
/// background tasks are [`serve`]'s; tests drive [`router`] over this state alone.
///
/// # Errors
/// When the configuration lacks the JWT secret or names an invalid endpoint.
pub async fn state(settings: &Settings, shutdown: &CancellationToken) -> anyhow::Result<AppState> {
    let secret = settings
        .require_jwt_secret()?
        .expose_secret()
        .as_bytes()
        .to_vec();
    let db = service::pool(&settings.database).await?;
    let export_db =
        service::side_pool(&settings.database, settings.database.export_max_connections).await?;
    let metrics = ProducerMetrics::new().context("metrics")?;
    let locks = service::locks(settings)?;
    let topology = Topology::from_settings(settings);
    let publish_link = service::broker_link(settings, "bulkops-producer", &topology)?;
    let console = if settings.ui.enabled {
        Some(Arc::new(
            crate::ui::Console::new(settings, shutdown.clone()).context("ui")?,
        ))
    } else {
        None
    };
    Ok(AppState(Arc::new(Inner {
        db,
        export_db,
        exports: Arc::new(tokio::sync::Semaphore::new(
            settings.http.max_concurrent_exports,
        )),
        jwt: DecodingKey::from_secret(&secret),
        metrics,
        locks,
        publish_link,
        splitter: SplitHandle::default(),
        split_owner: uuid::Uuid::new_v4(),
        topology,
        settings: settings.clone(),
        ui: console,
    })))
}
