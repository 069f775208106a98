//! PostgreSQL through PgBouncer and through a primary failover: what the pool needs from
//! PgBouncer, then real batches through a PgBouncer restart and a primary failover.

use std::time::Duration;

use bulkops_shared::config::{Settings, Sources};
use bulkops_tests::TestEnv;
use bulkops_tests::env::{Endpoints, pg_server};
use bulkops_tests::pg_cluster::{PgBouncer, PgPair, PoolMode};
use bulkops_tests::scenario::{
    assert_mid_batch, finish_create, keep_splitting, mid_batch, start_create_ready, wait_all_ready,
};
use bulkops_tests::services::Stop;
use sea_orm::{ConnectionTrait, DatabaseConnection};

use crate::redis::assert_none_failed;
use crate::{record, runs};

const CREATE_ITEMS: i64 = 3000;

/// The port of the machine's PostgreSQL.
pub(crate) fn machine_pg_port() -> u16 {
    pg_server()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5432)
}

/// bulkops' own pool (shared::db::connect) on `url`, with at most `max` connections.
async fn bulkops_pool(url: &str, max: u32) -> DatabaseConnection {
    let sources = Sources {
        env: [
            ("BULKOPS__DATABASE__URL".to_owned(), url.to_owned()),
            (
                "BULKOPS__DATABASE__MAX_CONNECTIONS".to_owned(),
                max.to_string(),
            ),
            (
                "BULKOPS__DATABASE__STATEMENT_TIMEOUT_MS".to_owned(),
                "45000".to_owned(),
            ),
        ]
        .into_iter()
        .collect(),
        ..Sources::default()
    };
    let settings = Settings::load_from(&sources).expect("settings");
    bulkops_shared::db::connect(&settings.database)
        .await
        .expect("pool")
}

async fn one_text(db: &DatabaseConnection, sql: &str) -> Result<String, sea_orm::DbErr> {
    let row = db
        .query_one_raw(bulkops_shared::db::stmt(sql, []))
        .await?
        .ok_or_else(|| sea_orm::DbErr::RecordNotFound(sql.to_owned()))?;
    row.try_get_by_index::<String>(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_session_mode_carries_the_pool_and_its_settings() {
    let bouncer = PgBouncer::start(machine_pg_port(), PoolMode::Session)
        .await
        .expect("pgbouncer");
    let db = bulkops_pool(&format!("{}/postgres", bouncer.server_url()), 4).await;
    // The session settings reach the server (PgBouncer refuses them in the startup
    // packet; bulkops sets them after connecting).
    assert_eq!(
        one_text(&db, "SHOW statement_timeout").await.expect("show"),
        "45s"
    );
    // Prepared statements from several pooled connections at once, over and over.
    let mut tasks = Vec::new();
    for t in 0..8_i64 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50_i64 {
                let row = db
                    .query_one_raw(bulkops_shared::db::stmt(
                        "SELECT ($1::bigint + $2::bigint)::bigint",
                        [t.into(), i.into()],
                    ))
                    .await
                    .expect("query through PgBouncer")
                    .expect("row");
                assert_eq!(row.try_get_by_index::<i64>(0).expect("value"), t + i);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    db.close().await.ok();
}

/// Why the pool mode must be session: sqlx names its prepared statements per client
/// connection (`sqlx_s_1`, …), and in transaction mode two clients share one server
/// connection, so the second one's statement collides with the first one's (or runs on a
/// server that never saw it). If this ever passes, transaction mode may have become
/// possible (a PgBouncer with `max_prepared_statements`): update docs/OPERATIONS.md.
/// One server connection for both clients makes the collision certain rather than a
/// matter of which server PgBouncer happens to hand out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_transaction_mode_breaks_prepared_statements() {
    let bouncer = PgBouncer::start_with_pool(machine_pg_port(), PoolMode::Transaction, 1)
        .await
        .expect("pgbouncer");
    let url = format!("{}/postgres", bouncer.server_url());
    // Two pools, one client connection each, over PgBouncer's server connections.
    let a = bulkops_pool(&url, 1).await;
    let b = bulkops_pool(&url, 1).await;
    let query = |db: DatabaseConnection| async move {
        db.query_one_raw(bulkops_shared::db::stmt(
            "SELECT $1::bigint",
            [1_i64.into()],
        ))
        .await
        .map(|_| ())
    };
    let mut failures = Vec::new();
    for _ in 0..20 {
        for db in [&a, &b] {
            if let Err(e) = query(db.clone()).await {
                failures.push(e.to_string());
            }
        }
    }
    assert!(
        failures
            .iter()
            .any(|e| e.contains("prepared statement") && e.contains("sqlx_s_")),
        "transaction pooling served sqlx's named statements: {failures:?}"
    );
    a.close().await.ok();
    b.close().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_restarted_mid_batch() {
    for _ in 0..runs() {
        let mut bouncer = PgBouncer::start(machine_pg_port(), PoolMode::Session)
            .await
            .expect("pgbouncer");
        let env = TestEnv::with(
            "c_pgbouncer",
            Endpoints {
                pg: bouncer.server_url(),
                ..Endpoints::default()
            },
        )
        .await
        .expect("env");
        env.set("BULKOPS__WORKER__CHUNK_SIZE", 50).await;
        keep_splitting(&env, 200).await;
        let (batch, probes) = start_create_ready(&env, CREATE_ITEMS, 3).await;
        mid_batch(&env, batch, CREATE_ITEMS / 3).await;
        // SIGTERM: PgBouncer 1.18 drops every client and server connection at once.
        bouncer
            .restart(Stop::Graceful, Duration::from_secs(2))
            .await
            .expect("restart pgbouncer");
        wait_all_ready(&probes).await;
        let tally = finish_create(&env, batch).await;
        assert_none_failed(&env, batch).await;
        record("PgBouncer (session pooling) restarted mid-batch", tally);
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_primary_failover_mid_batch() {
    for _ in 0..runs() {
        let pair = PgPair::start().await.expect("primary and standby");
        let mut env = TestEnv::with(
            "c_pg_failover",
            Endpoints {
                pg: pair.server_url(),
                pg_direct: pair.server_url(),
                ..Endpoints::default()
            },
        )
        .await
        .expect("env");
        env.set("BULKOPS__WORKER__CHUNK_SIZE", 50).await;
        keep_splitting(&env, 200).await;
        // Outages end sooner than the default 5 s acquire timeout would notice.
        env.set("BULKOPS__DATABASE__ACQUIRE_TIMEOUT_MS", 2000).await;
        let (batch, probes) = start_create_ready(&env, CREATE_ITEMS, 3).await;
        mid_batch(&env, batch, CREATE_ITEMS / 3).await;
        // The failover manager fences the primary: it keeps answering, read-only (25006
        // on every write of the pools' open connections)…
        pair.primary.fence_read_only().await.expect("fence");
        pair.wait_standby_caught_up()
            .await
            .expect("standby caught up");
        // …the VIP moves to the standby, still in recovery (new connections land on a
        // read-only server); open connections stay with the fenced primary…
        pair.switch.switch_to(&pair.standby_addr());
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_mid_batch(&env, batch).await;
        // …and the standby is promoted. The fenced primary stays up, read-only, to the end:
        // connections still open to it must be dropped, not retried for ever.
        pair.standby.promote().await.expect("promote");
        // The harness reads the new primary from now on.
        env.db = sea_orm::Database::connect(env.db_url.clone())
            .await
            .expect("harness pool on the new primary");
        wait_all_ready(&probes).await;
        let tally = finish_create(&env, batch).await;
        assert_none_failed(&env, batch).await;
        record(
            "PostgreSQL primary failover mid-batch (fenced read-only, VIP moved, standby promoted)",
            tally,
        );
        env.finish().await;
    }
}
