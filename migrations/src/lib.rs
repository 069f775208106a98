//! The database schema of bulkops, as sea-orm migrations.
//!
//! The CRM's tables of CONTRACT §1 (all of them, so the schema does not churn as features
//! land) with the indexes bulkops' queries need; bulkops' own tables (batches, items,
//! outbox, idempotency keys, conversion log); the triggers beside the CRM's tables that
//! keep a child row from outliving the Sales Record it belongs to (`orphan_guard.sql`);
//! the stall sweeper's republish generations and the workers' outage reports
//! (`stall_bound.sql`); then what quotas, fair shares and retention need (pruning
//! columns, indexes, leases: `quotas_retention.sql`); and what the operator console reads
//! (worker heartbeats, throughput samples: `console_schema.sql`); one table of worker
//! liveness, readiness and outage reports together (`worker_status.sql`); and the trace
//! context a batch and an outbox row were written under (`trace_context.sql`); and the
//! per-backend counter shards that chunk transactions write instead of the batch row
//! (`counter_shards.sql`); and the orphan guards again, checking owners by primary key
//! whatever the tables' size (`guard_probes.sql`). Each is plain SQL kept beside this file, applied in one transaction.
//!
//! [`migrate_up`] also creates the database when it does not exist, and serialises
//! concurrent runs with an advisory lock, so any number of deploy hooks or test harnesses
//! may call it at once.

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbErr, Statement};
use sea_orm_migration::prelude::*;

/// The migrations, in order.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(SqlMigration {
                name: "m20261122_000001_crm_schema",
                up: include_str!("crm_schema.sql"),
            }),
            Box::new(SqlMigration {
                name: "m20261122_000002_bulkops_schema",
                up: include_str!("bulkops_schema.sql"),
            }),
            Box::new(SqlMigration {
                name: "m20261201_000003_orphan_guard",
                up: include_str!("orphan_guard.sql"),
            }),
            Box::new(SqlMigration {
                name: "m20261201_000004_stall_bound",
                up: include_str!("stall_bound.sql"),
            }),
            Box::new(SqlMigration {
                name: "m20261202_000005_quotas_retention",
                up: include_str!("quotas_retention.sql"),
            }),
            Box::new(SqlMigration {
                name: "m20261202_000006_console",
                up: include_str!("console_schema.sql"),
            }),
            Box::new(SqlMigration {
                name: "m20261202_000007_worker_status",
                up: include_str!("worker_status.sql"),
            }),
            Box::new(SqlMigration {
                name: "m20261202_000008_trace_context",
                up: include_str!("trace_context.sql"),
            }),
            Box::new(SqlMigration {
                name: "m20261203_000009_counter_shards",
                up: include_str!("counter_shards.sql"),
            }),
            Box::new(SqlMigration {
                name: "m20261203_000010_guard_probes",
                up: include_str!("guard_probes.sql"),
            }),
        ]
    }
}

/// A migration written as SQL. There is no `down`: the CRM's data is not ours to drop.
struct SqlMigration {
    name: &'static str,
    up: &'static str,
}

impl MigrationName for SqlMigration {
    fn name(&self) -> &str {
        self.name
    }
}

#[async_trait::async_trait]
impl MigrationTrait for SqlMigration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared(self.up).await?;
        Ok(())
    }
}

/// Splits `postgres://…/name?params` into the URL of the server's `postgres` database and
/// the database name.
///
/// # Errors
/// When the URL names no database.
pub fn split_database_url(url: &str) -> Result<(String, String), DbErr> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let Some((server, name)) = base.rsplit_once('/') else {
        return Err(DbErr::Custom("database.url names no database".into()));
    };
    if name.is_empty() || server.ends_with('/') {
        return Err(DbErr::Custom("database.url names no database".into()));
    }
    let mut admin = format!("{server}/postgres");
    if let Some(q) = query {
        admin.push('?');
        admin.push_str(q);
    }
    Ok((admin, name.to_owned()))
}

/// Creates the database named by `url` when it does not exist.
///
/// # Errors
/// When the server cannot be reached or refuses.
pub async fn create_database_if_missing(url: &str) -> Result<bool, DbErr> {
    let (admin_url, name) = split_database_url(url)?;
    let admin = Database::connect(admin_url).await?;
    let exists = admin
        .query_one_raw(Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT 1 FROM pg_database WHERE datname = $1",
            [name.clone().into()],
        ))
        .await?
        .is_some();
    let mut created = false;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match admin
            .execute_unprepared(&format!("CREATE DATABASE {quoted}"))
            .await
        {
            Ok(_) => created = true,
            // Another process created it at the same moment.
            Err(e) if bulkops_shared::db::sqlstate(&e).as_deref() == Some("42P04") => {}
            Err(e) => return Err(e),
        }
    }
    admin.close().await?;
    Ok(created)
}

/// Drops the database named by `url` if it exists (disconnecting its sessions). For demo
/// and benchmark resets only.
///
/// # Errors
/// When the server cannot be reached or refuses.
pub async fn drop_database(url: &str) -> Result<(), DbErr> {
    let (admin_url, name) = split_database_url(url)?;
    let admin = Database::connect(admin_url).await?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
        .await?;
    admin.close().await
}

/// Applies pending migrations (creating the database first if needed), holding an
/// advisory lock so that concurrent runs apply each migration once.
///
/// # Errors
/// When the database cannot be reached or a migration fails.
pub async fn migrate_up(url: &str) -> Result<(), DbErr> {
    create_database_if_missing(url).await?;
    let db = connect_single(url).await?;
    db.execute_unprepared("SELECT pg_advisory_lock(7261135002)")
        .await?;
    let result = Migrator::up(&db, None).await;
    db.execute_unprepared("SELECT pg_advisory_unlock(7261135002)")
        .await?;
    db.close().await?;
    result
}

/// Each migration's name and whether it is applied.
///
/// # Errors
/// When the database cannot be reached.
pub async fn status(url: &str) -> Result<Vec<(String, bool)>, DbErr> {
    let db = connect_single(url).await?;
    let applied: Vec<String> = match Migrator::get_applied_migrations(&db).await {
        Ok(list) => list.iter().map(|m| m.name().to_owned()).collect(),
        Err(_) => Vec::new(),
    };
    let all = Migrator::migrations()
        .iter()
        .map(|m| {
            let name = m.name().to_owned();
            let done = applied.contains(&name);
            (name, done)
        })
        .collect();
    db.close().await?;
    Ok(all)
}

async fn connect_single(url: &str) -> Result<DatabaseConnection, DbErr> {
    let mut opts = sea_orm::ConnectOptions::new(url.to_owned());
    opts.max_connections(1)
        .min_connections(1)
        .sqlx_logging(false);
    Database::connect(opts).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_database_urls() {
        assert_eq!(
            split_database_url("postgres://u@h:5432/bulkops").unwrap(),
            (
                "postgres://u@h:5432/postgres".to_owned(),
                "bulkops".to_owned()
            )
        );
        assert_eq!(
            split_database_url("postgres://u@h/db?sslmode=disable").unwrap(),
            (
                "postgres://u@h/postgres?sslmode=disable".to_owned(),
                "db".to_owned()
            )
        );
        assert!(split_database_url("postgres://u@h/").is_err());
    }
}
