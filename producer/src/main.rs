//! `bulkops-producer`: the HTTP API, the splitter and an outbox relay.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let settings = match bulkops_shared::config::Settings::load() {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string()),
    };
    if let Err(e) = settings.require_jwt_secret() {
        return fail(&e.to_string());
    }
    // Held to the end: dropping it flushes the spans still queued (bounded).
    let _traces = match bulkops_shared::telemetry::init_service(&settings, "bulkops-producer") {
        Ok(t) => t,
        Err(e) => return fail(&e.to_string()),
    };
    let shutdown = bulkops_shared::shutdown::on_signal();
    match bulkops_producer::run(settings, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("bulkops-producer: {e:#}")),
    }
}

#[allow(clippy::print_stderr)]
fn fail(msg: &str) -> ExitCode {
    eprintln!("{}", msg.split_whitespace().collect::<Vec<_>>().join(" "));
    ExitCode::FAILURE
}
