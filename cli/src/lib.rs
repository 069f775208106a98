//! The `bulkops` operator's command line: demo data, tokens (CRM users' and operators'),
//! batches and dead letters.
//!
//! It reads the same layered configuration as the services (`config/default.toml`,
//! `BULKOPS_CONFIG`, `BULKOPS__…`) and talks to the database and the broker directly, as an
//! operator's tool inside the cluster would.

pub mod dlq;
pub mod seed;
pub mod watch;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use bulkops_shared::config::Settings;
use bulkops_shared::db::stmt;
use bulkops_shared::service::exit_failure;
use clap::{Parser, Subcommand, ValueEnum};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use secrecy::ExposeSecret;

/// The command line.
#[derive(Parser)]
#[command(
    name = "bulkops",
    version,
    about = "Operate bulkops: demo data, tokens, batches, dead letters"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Seed a realistic demo agency (users, agents, record types, custom fields,
    /// Individuals with policies, some already holding a Sales Record). Prints its ids as JSON.
    Seed {
        /// Individuals to create.
        #[arg(long, default_value_t = 20_000)]
        individuals: i64,
        /// Share of Individuals that already hold a Sales Record.
        #[arg(long, default_value_t = 0.1)]
        linked_share: f64,
        /// Agency name.
        #[arg(long, default_value = "Lone Star Senior Benefits")]
        name: String,
        /// Random seed in [-1, 1] (the same seed gives the same data).
        #[arg(long, default_value_t = 0.42)]
        seed: f64,
        /// Apply migrations first (creating the database when missing).
        #[arg(long)]
        migrate: bool,
        /// Drop the database first (implies --migrate). Demo and benchmark use only.
        #[arg(long)]
        reset: bool,
    },
    /// Give Sales Records a lead's history (notes, SOA notes, activities, attachments,
    /// prescriptions, sales policies, …): those a batch created, and/or new stand-alone
    /// leads. Prints the Sales Record ids as JSON.
    SeedLeads {
        /// The agency.
        #[arg(long)]
        agency: i64,
        /// Take Sales Records created by this bulk create batch.
        #[arg(long)]
        from_batch: Option<i64>,
        /// How many of the batch's records to take.
        #[arg(long, default_value_t = 300)]
        count: i64,
        /// New leads that were never Individuals.
        #[arg(long, default_value_t = 0)]
        standalone: i64,
        /// How much history each lead gets.
        #[arg(long, value_enum, default_value_t = Profile::Demo)]
        profile: Profile,
    },
    /// Print a JWT: a CRM user's (signed with auth.jwt_secret), for scripts and the demo,
    /// or an operator's for the console (signed with auth.operator_jwt_secret).
    Token {
        /// The user.
        #[arg(
            long,
            required_unless_present = "operator",
            conflicts_with = "operator"
        )]
        user: Option<i64>,
        /// An operator's token for the console instead, naming the operator (its `sub`,
        /// shown in the console and its logs).
        #[arg(long, value_name = "NAME")]
        operator: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: i64,
    },
    /// Batches.
    Batch {
        #[command(subcommand)]
        command: BatchCommand,
    },
    /// The dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead-lettered messages with their reason and attempt history.
    List {
        /// Only this batch's.
        #[arg(long)]
        batch: Option<i64>,
    },
    /// Re-publish dead-lettered messages (after fixing the cause); their items get a real
    /// outcome, reopening their batches.
    Replay {
        /// Only this batch's.
        #[arg(long)]
        batch: Option<i64>,
    },
}

#[derive(Subcommand)]
enum BatchCommand {
    /// List batches, newest first.
    List {
        /// Only this agency's.
        #[arg(long)]
        agency: Option<i64>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Show one batch and its counts (JSON).
    Show {
        /// The batch.
        id: i64,
    },
    /// Follow a batch with a live progress bar (rate, ETA) until it completes.
    Watch {
        /// The batch.
        id: i64,
    },
    /// List a batch's items (optionally only one status), as text or CSV.
    Items {
        /// The batch.
        id: i64,
        /// Only items with this status.
        #[arg(long)]
        status: Option<String>,
        /// Print CSV.
        #[arg(long)]
        csv: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Profile {
    /// A bit of every kind of history.
    Demo,
    /// The benchmark's: 3 notes, 1 SOA note, 2 activities, 1 attachment, 2 prescriptions, 2 sales policies.
    Bench,
}

/// Runs the command line; the binary's `main`.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => return exit_failure(&e.to_string()),
    };
    bulkops_shared::telemetry::init(&bulkops_shared::config::LogSettings {
        level: "warn".into(),
        format: settings.log.format.clone(),
    });
    match run(cli, settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit_failure(&format!("bulkops: {e:#}")),
    }
}

/// Writes a line to stdout (the CLI's output channel).
pub fn out(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
}

async fn connect(settings: &Settings) -> anyhow::Result<DatabaseConnection> {
    bulkops_shared::db::connect(&settings.database)
        .await
        .context("database.url")
}

async fn run(cli: Cli, settings: Settings) -> anyhow::Result<()> {
    match cli.command {
        Command::Seed {
            individuals,
            linked_share,
            name,
            seed,
            migrate,
            reset,
        } => {
            if reset {
                bulkops_migrations::drop_database(settings.database.url.expose_secret())
                    .await
                    .context("dropping the database")?;
            }
            if migrate || reset {
                bulkops_migrations::migrate_up(settings.database.url.expose_secret())
                    .await
                    .context("migrations")?;
            }
            let db = connect(&settings).await?;
            let seeded = seed::seed_agency(
                &db,
                &seed::AgencySpec {
                    name,
                    individuals,
                    linked_share,
                    seed,
                },
            )
            .await
            .context("seeding")?;
            out(&serde_json::to_string(&seeded)?);
        }
        Command::SeedLeads {
            agency,
            from_batch,
            count,
            standalone,
            profile,
        } => {
            let db = connect(&settings).await?;
            let mut ids: Vec<i64> = Vec::new();
            if let Some(batch) = from_batch {
                let rows = db
                    .query_all_raw(stmt(
                        "SELECT result_id FROM bulk_items WHERE batch_id = $1 AND status = 'created'
                          ORDER BY seq LIMIT $2",
                        [batch.into(), count.into()],
                    ))
                    .await?;
                for r in rows {
                    ids.push(r.try_get("", "result_id")?);
                }
            }
            if standalone > 0 {
                ids.extend(seed::create_leads(&db, agency, standalone, 0.17).await?);
            }
            let profile = match profile {
                Profile::Demo => seed::LeadProfile::DEMO,
                Profile::Bench => seed::LeadProfile::BENCH,
            };
            seed::enrich_leads(&db, agency, &ids, profile).await?;
            out(&serde_json::to_string(&ids)?);
        }
        Command::Token {
            operator: Some(name),
            ttl_secs,
            ..
        } => {
            let secret = settings
                .auth
                .operator_jwt_secret
                .as_ref()
                .context("auth.operator_jwt_secret is required for an operator token: set BULKOPS__AUTH__OPERATOR_JWT_SECRET")?
                .expose_secret()
                .to_owned();
            if name.trim().is_empty() {
                anyhow::bail!("--operator needs a name");
            }
            let now = chrono::Utc::now().timestamp();
            let claims = serde_json::json!({
                "sub": name.trim(), "role": bulkops_shared::permissions::OPERATOR_ROLE,
                "iat": now, "exp": now + ttl_secs,
            });
            out(&jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            )?);
        }
        Command::Token { user, ttl_secs, .. } => {
            let user = user.context("--user or --operator is required")?;
            let secret = settings.require_jwt_secret()?.expose_secret().to_owned();
            let db = connect(&settings).await?;
            let row = db
                .query_one_raw(stmt(
                    "SELECT agency_id FROM users WHERE id = $1",
                    [user.into()],
                ))
                .await?
                .with_context(|| format!("no user {user}"))?;
            let agency: i64 = row.try_get("", "agency_id")?;
            let now = chrono::Utc::now().timestamp();
            let claims = serde_json::json!({
                "sub": user.to_string(), "agency_id": agency, "iat": now, "exp": now + ttl_secs,
            });
            let token = jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            )?;
            out(&token);
        }
        Command::Batch { command } => {
            let db = connect(&settings).await?;
            match command {
                BatchCommand::List { agency, limit } => watch::list(&db, agency, limit).await?,
                BatchCommand::Show { id } => watch::show(&db, id).await?,
                BatchCommand::Watch { id } => watch::watch(&db, id).await?,
                BatchCommand::Items { id, status, csv } => {
                    watch::items(&db, id, status, csv).await?
                }
            }
        }
        Command::Dlq { command } => match command {
            DlqCommand::List { batch } => dlq::list(&settings, batch).await?,
            DlqCommand::Replay { batch } => {
                let db = connect(&settings).await?;
                dlq::replay(&settings, &db, batch).await?;
            }
        },
    }
    Ok(())
}
