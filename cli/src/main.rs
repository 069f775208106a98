//! `bulkops`: the operator's command line (see `bulkops --help`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    bulkops_cli::main().await
}
