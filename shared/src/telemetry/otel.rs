//! The OpenTelemetry pipeline: an OTLP/HTTP exporter behind a batch span processor, and
//! the `tracing` layer that turns spans into OpenTelemetry spans.
//!
//! Off unless configured: export starts only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and not when `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none`. Everything else is the standard environment, read by the
//! SDK itself: `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf`, the default, or
//! `http/json`; this build has no gRPC), `OTEL_EXPORTER_OTLP_HEADERS`, `…_TIMEOUT`,
//! `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` (`service.name` defaults to the
//! program's name), `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` (default
//! `parentbased_always_on`: a CRM request that was sampled out stays out), and
//! `OTEL_BSP_*` for batching. `telemetry.filter` says which spans are exported and
//! `telemetry.flush_timeout_ms` bounds the flush at shutdown, which nothing standard covers.
//!
//! Spans are exported from a thread of the batch processor's own, so a slow or absent
//! collector never holds up a request or a chunk: when its queue is full, spans are dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::config::TelemetrySettings;

/// Set once traces are exported: the propagation helpers do nothing before.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (and contexts therefore worth carrying).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Marks traces as exported. `init_service` does it; tests that install a tracer of
/// their own call it too.
pub fn mark_enabled() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Why tracing could not start. The program stops with it: a collector named but not
/// usable is a configuration mistake worth refusing.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A standard variable has a value this build does not support.
    #[error("{0}")]
    Unsupported(String),
    /// The exporter could not be built (a malformed endpoint, say).
    #[error("OTLP exporter (OTEL_EXPORTER_OTLP_*): {0}")]
    Exporter(String),
    /// `telemetry.filter` is not a valid filter.
    #[error("telemetry.filter: {0}")]
    Filter(String),
}

/// The exporter while the program runs. Dropping it flushes the spans still queued and
/// shuts the exporter down, waiting at most `telemetry.flush_timeout_ms`.
#[must_use = "dropping it stops the export"]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
    flush_timeout: Duration,
}

impl Traces {
    /// No export.
    pub fn off() -> Self {
        Self {
            provider: None,
            flush_timeout: Duration::ZERO,
        }
    }

    /// Whether spans are being exported.
    pub fn is_on(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes and stops the export now (bounded by `telemetry.flush_timeout_ms`).
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.provider.take() {
            match provider.shutdown_with_timeout(self.flush_timeout) {
                Ok(()) => tracing::debug!("trace export flushed and stopped"),
                Err(e) => {
                    tracing::warn!(error = %e, "trace export did not flush in time; the last spans may be lost")
                }
            }
        }
    }
}

impl Drop for Traces {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn env_value(key: &str) -> Option<String> {
    std::env::var(key)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Whether the environment asks for trace export.
pub fn requested() -> bool {
    let disabled = env_value("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env_value("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled
        && (env_value("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
            || env_value("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some())
}

fn protocol() -> Result<Protocol, TelemetryError> {
    let value = env_value("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env_value("OTEL_EXPORTER_OTLP_PROTOCOL"));
    match value.as_deref() {
        None | Some("http/protobuf") => Ok(Protocol::HttpBinary),
        Some("http/json") => Ok(Protocol::HttpJson),
        Some(other) => Err(TelemetryError::Unsupported(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported: use http/protobuf (a collector's port 4318) or http/json"
        ))),
    }
}

fn resource(service: &'static str) -> Resource {
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win; without them the SDK says
    // `unknown_service`, and the program's name is what an operator looks for.
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    let builder = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if named {
        builder.build()
    } else {
        builder.with_service_name(service).build()
    }
}

/// Builds the exporter and provider when the environment asks for them.
///
/// # Errors
/// An unsupported protocol or exporter, or an exporter that cannot be built.
pub fn tracer(
    settings: &TelemetrySettings,
    service: &'static str,
) -> Result<Option<(SdkTracer, Traces)>, TelemetryError> {
    if !requested() {
        return Ok(None);
    }
    if let Some(exporter) = env_value("OTEL_TRACES_EXPORTER")
        && !exporter.eq_ignore_ascii_case("otlp")
    {
        return Err(TelemetryError::Unsupported(format!(
            "OTEL_TRACES_EXPORTER={exporter} is not supported: use otlp (or none)"
        )));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol()?)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource(service))
        .build();
    let tracer = provider.tracer(service);
    mark_enabled();
    Ok(Some((
        tracer,
        Traces {
            provider: Some(provider),
            flush_timeout: Duration::from_millis(settings.flush_timeout_ms),
        },
    )))
}
