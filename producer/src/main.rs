//! `bulkops-producer`: the HTTP API, the splitter and an outbox relay.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    bulkops_shared::service::main(
        "bulkops-producer",
        // Checked before anything starts: without it no request could be authenticated.
        |settings| settings.require_jwt_secret().map(drop),
        bulkops_producer::run,
    )
    .await
}
