//! `bulkops-migrate up|status`: applies or lists the schema migrations of `database.url`,
//! creating the database when it does not exist.

use bulkops_shared::service::exit_failure;
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;

#[derive(Parser)]
#[command(
    name = "bulkops-migrate",
    version,
    about = "Apply or list bulkops' database migrations"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending migrations (creating the database if it does not exist). Idempotent.
    Up,
    /// List the migrations and whether each is applied.
    Status,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let settings = match bulkops_shared::config::Settings::load() {
        Ok(s) => s,
        Err(e) => return exit_failure(&e.to_string()),
    };
    bulkops_shared::telemetry::init(&settings.log);
    let url = settings.database.url.expose_secret();
    match cli.command {
        Command::Up => match bulkops_migrations::migrate_up(url).await {
            Ok(()) => {
                tracing::info!("migrations applied");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => exit_failure(&format!("bulkops-migrate: {e}")),
        },
        Command::Status => match bulkops_migrations::status(url).await {
            Ok(list) => {
                #[allow(clippy::print_stdout)]
                for (name, applied) in list {
                    println!("{} {name}", if applied { "applied" } else { "pending" });
                }
                std::process::ExitCode::SUCCESS
            }
            Err(e) => exit_failure(&format!("bulkops-migrate: {e}")),
        },
    }
}
