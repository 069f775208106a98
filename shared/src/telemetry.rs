//! Logs and traces.
//!
//! Logs: `tracing` to stderr, as text or JSON lines, filtered by `RUST_LOG` or `log.level`.
//! Traces: the same `tracing` spans, exported over OTLP when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` says where ([`otel`]), filtered by `telemetry.filter`
//! (independently of the log level: quiet logs keep full traces); W3C trace context carried
//! across HTTP, AMQP and the database ([`propagation`]). Log records and spans carry ids
//! (batch, item seq, record ids, agency), never record data.

pub mod otel;
pub mod propagation;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::{LogSettings, Settings};

fn log_filter(settings: &LogSettings) -> EnvFilter {
    // sqlx and lapin are chatty at INFO; keep them at WARN unless asked otherwise.
    let default = format!("{},sqlx=warn,lapin=warn,sea_orm=warn", settings.level);
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&default))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// The spans sent to the exporter: `telemetry.filter`, less the exporter's own HTTP client
/// and the SDK (tracing them would feed the exporter its own requests).
fn trace_filter(directives: &str) -> Result<EnvFilter, otel::TelemetryError> {
    EnvFilter::try_new(format!(
        "{directives},opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off,reqwest=off,hyper=off,hyper_util=off,h2=off"
    ))
    .map_err(|e| otel::TelemetryError::Filter(e.to_string()))
}

/// Installs the global subscriber, logs only (the CLI and the migrations). Call once,
/// first thing in `main`.
pub fn init(settings: &LogSettings) {
    install(settings, None);
}

/// Installs the global subscriber for a service: logs, and traces when the environment
/// asks for them, with `service.name` defaulting to `service`. Keep the returned value
/// until the program ends: dropping it flushes the spans still queued (bounded by
/// `telemetry.flush_timeout_ms`).
///
/// # Errors
/// An OTLP configuration this build cannot serve (see [`otel`]), or a bad
/// `telemetry.filter`.
pub fn init_service(
    settings: &Settings,
    service: &'static str,
) -> Result<otel::Traces, otel::TelemetryError> {
    let filter = trace_filter(&settings.telemetry.filter)?;
    match otel::tracer(&settings.telemetry, service)? {
        Some((tracer, traces)) => {
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                // Thread names and ids, and the source location, say nothing an operator
                // needs and cost attributes on every span.
                .with_threads(false)
                .with_location(false)
                .with_filter(filter);
            install(&settings.log, Some(layer.boxed()));
            Ok(traces)
        }
        None => {
            install(&settings.log, None);
            Ok(otel::Traces::off())
        }
    }
}

type Boxed = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

fn install(settings: &LogSettings, traces: Option<Boxed>) {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    let fmt: Boxed = if settings.format == "json" {
        fmt.json()
            .flatten_event(true)
            .with_filter(log_filter(settings))
            .boxed()
    } else {
        fmt.with_filter(log_filter(settings)).boxed()
    };
    let layers: Vec<Boxed> = std::iter::once(fmt).chain(traces).collect();
    // A second call (tests) keeps the first subscriber.
    drop(tracing_subscriber::registry().with(layers).try_init());
}
