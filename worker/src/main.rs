//! `bulkops-worker`: consumes per-record messages; any number may run at once.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    bulkops_shared::service::main("bulkops-worker", |_| Ok(()), bulkops_worker::run).await
}
