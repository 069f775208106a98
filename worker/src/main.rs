//! `bulkops-worker`: consumes per-record messages; any number may run at once.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let settings = match bulkops_shared::config::Settings::load() {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string()),
    };
    // Held to the end: dropping it flushes the spans still queued (bounded).
    let _traces = match bulkops_shared::telemetry::init_service(&settings, "bulkops-worker") {
        Ok(t) => t,
        Err(e) => return fail(&e.to_string()),
    };
    let shutdown = bulkops_shared::shutdown::on_signal();
    match bulkops_worker::run(settings, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("bulkops-worker: {e:#}")),
    }
}

#[allow(clippy::print_stderr)]
fn fail(msg: &str) -> ExitCode {
    eprintln!("{}", msg.split_whitespace().collect::<Vec<_>>().join(" "));
    ExitCode::FAILURE
}
