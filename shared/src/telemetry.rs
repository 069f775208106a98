//! Logging: `tracing` to stderr, as text or JSON lines, filtered by `RUST_LOG` or
//! `log.level`. Log records carry ids (batch, item seq, record ids), never record data.

use tracing_subscriber::EnvFilter;

use crate::config::LogSettings;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(settings: &LogSettings) {
    // sqlx and lapin are chatty at INFO; keep them at WARN unless asked otherwise.
    let default = format!("{},sqlx=warn,lapin=warn,sea_orm=warn", settings.level);
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&default))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    let result = if settings.format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    // A second call (tests) keeps the first subscriber.
    drop(result);
}
