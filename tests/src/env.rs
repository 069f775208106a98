//! One test's world: its database, AMQP names, Redis prefix, processes and events.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bulkops_shared::topology::Topology;
use lapin::options::QueueDeleteOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use tokio::sync::Mutex;

use crate::api::Api;
use crate::events::Events;
use crate::process::{Proc, workspace_root};

/// PostgreSQL server of the machine (tests create their own database on it).
pub fn pg_server() -> String {
    std::env::var("BULKOPS_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// RabbitMQ of the machine.
pub fn amqp_url() -> String {
    std::env::var("BULKOPS_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A queue as the broker reports it (ready messages, consumers), without creating it: a
/// passive declare, which fails (and closes the channel) when the queue does not exist.
pub async fn queue_info(channel: &Channel, queue: &str) -> lapin::Result<lapin::Queue> {
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
}

/// Redis of the machine.
pub fn redis_url() -> String {
    std::env::var("BULKOPS_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Where the programs and the harness find the services. The programs may go through a
/// fault proxy or to an instance the test restarts; the harness always goes direct.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// PostgreSQL server base URL for the programs (the test database name is appended).
    pub pg: String,
    /// PostgreSQL server base URL for the harness.
    pub pg_direct: String,
    /// RabbitMQ URL for the programs.
    pub amqp: String,
    /// RabbitMQ URL for the harness.
    pub amqp_direct: String,
    /// The nodes of a RabbitMQ cluster, for the programs (`BULKOPS__AMQP__URLS`) and the
    /// harness alike; empty for a single broker (`amqp` and `amqp_direct`).
    pub amqp_nodes: Vec<String>,
    /// Redis URL for the programs.
    pub redis: String,
}

impl Endpoints {
    /// The machine's PostgreSQL and Redis, and the RabbitMQ cluster at `nodes`.
    pub fn cluster(nodes: Vec<String>) -> Self {
        let first = nodes.first().cloned().unwrap_or_else(amqp_url);
        Self {
            amqp: first.clone(),
            amqp_direct: first,
            amqp_nodes: nodes,
            ..Self::default()
        }
    }

    /// The broker URLs the harness uses: the cluster's nodes, or `amqp_direct` alone.
    pub fn harness_amqp(&self) -> Vec<String> {
        if self.amqp_nodes.is_empty() {
            vec![self.amqp_direct.clone()]
        } else {
            self.amqp_nodes.clone()
        }
    }
}

impl Default for Endpoints {
    fn default() -> Self {
        Self {
            pg: pg_server(),
            pg_direct: pg_server(),
            amqp: amqp_url(),
            amqp_direct: amqp_url(),
            amqp_nodes: Vec::new(),
            redis: redis_url(),
        }
    }
}

/// The JWT secret every test environment uses.
pub const SECRET: &str = "e2e-test-secret-0123456789abcdef";

/// A test's isolated environment.
pub struct TestEnv {
    /// Short unique id (also in every name below).
    pub id: String,
    /// The test database's URL.
    pub db_url: String,
    /// A pool on it.
    pub db: DatabaseConnection,
    /// Every queue and internal exchange starts with this.
    pub amqp_prefix: String,
    /// The events exchange.
    pub events_exchange: String,
    /// Every Redis key starts with this.
    pub redis_prefix: String,
    /// Where the services are.
    pub endpoints: Endpoints,
    /// Events published during the test.
    pub events: Events,
    /// Where the processes' logs go.
    pub log_dir: PathBuf,
    /// Extra configuration for every process started (`BULKOPS__…` pairs).
    pub overrides: Mutex<Vec<(String, String)>>,
    procs: Mutex<Vec<Arc<Mutex<Proc>>>>,
    counter: std::sync::atomic::AtomicUsize,
    began: std::time::Instant,
}

impl TestEnv {
    /// Creates a migrated database and the AMQP/Redis names for test `name`, on the
    /// machine's services.
    pub async fn new(name: &str) -> anyhow::Result<Self> {
        Self::with(name, Endpoints::default()).await
    }

    /// As [`TestEnv::new`], on the given services.
    pub async fn with(name: &str, endpoints: Endpoints) -> anyhow::Result<Self> {
        let id = format!(
            "{}{}",
            chrono::Utc::now().format("%H%M%S"),
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let db_name = format!("bulkops_t_{id}");
        let db_url = format!("{}/{db_name}", endpoints.pg_direct);
        bulkops_migrations::migrate_up(&db_url)
            .await
            .context("migrating the test database")?;
        let mut opts = sea_orm::ConnectOptions::new(db_url.clone());
        opts.max_connections(8).sqlx_logging(false);
        let db = Database::connect(opts).await?;
        let amqp_prefix = format!("t{id}");
        let events_exchange = format!("t{id}.events");
        // Before anything is declared: a failing test's queues expire instead of piling up.
        ensure_queue_expiry().await;
        let began = std::time::Instant::now();
        let events = Events::capture(
            &endpoints.harness_amqp(),
            &events_exchange,
            &format!("{amqp_prefix}.capture"),
        )
        .await?;
        let log_dir = workspace_root()
            .join("target")
            .join("e2e-logs")
            .join(format!("{name}-{id}"));
        tokio::fs::create_dir_all(&log_dir).await?;
        Ok(Self {
            id: id.clone(),
            db_url: format!("{}/{db_name}", endpoints.pg),
            db,
            amqp_prefix,
            events_exchange,
            redis_prefix: format!("t{id}"),
            endpoints,
            events,
            log_dir,
            overrides: Mutex::new(Vec::new()),
            procs: Mutex::new(Vec::new()),
            counter: std::sync::atomic::AtomicUsize::new(0),
            began,
        })
    }

    /// Adds a configuration override for processes started from now on.
    pub async fn set(&self, key: &str, value: impl ToString) {
        self.overrides
            .lock()
            .await
            .push((key.to_owned(), value.to_string()));
    }

    /// The `amqp.bulk_queues` the test's processes were given (1 unless overridden).
    pub async fn bulk_queues(&self) -> u16 {
        self.overrides
            .lock()
            .await
            .iter()
            .rev()
            .find(|(k, _)| k == "BULKOPS__AMQP__BULK_QUEUES")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(1)
    }

    /// The environment every process of this test gets.
    pub async fn process_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("BULKOPS__DATABASE__URL".into(), self.db_url.clone()),
            ("BULKOPS__AMQP__URL".into(), self.endpoints.amqp.clone()),
            ("BULKOPS__AMQP__PREFIX".into(), self.amqp_prefix.clone()),
            (
                "BULKOPS__AMQP__EVENTS_EXCHANGE".into(),
                self.events_exchange.clone(),
            ),
            ("BULKOPS__REDIS__URL".into(), self.endpoints.redis.clone()),
            ("BULKOPS__REDIS__PREFIX".into(), self.redis_prefix.clone()),
            ("BULKOPS__AUTH__JWT_SECRET".into(), SECRET.into()),
            ("BULKOPS__HTTP__BIND".into(), "127.0.0.1:0".into()),
            ("BULKOPS__METRICS__BIND".into(), "127.0.0.1:0".into()),
            ("BULKOPS__DATABASE__MAX_CONNECTIONS".into(), "6".into()),
            // Short retry tiers and stall detection keep failure scenarios quick.
            (
                "BULKOPS__WORKER__RETRY_DELAYS_MS".into(),
                "200,500,1000".into(),
            ),
            ("BULKOPS__WORKER__MAX_ATTEMPTS".into(), "8".into()),
            ("BULKOPS__WORKER__LOCK_TTL_MS".into(), "3000".into()),
            ("BULKOPS__SPLIT__POLL_INTERVAL_MS".into(), "200".into()),
            ("BULKOPS__SPLIT__LEASE_SECS".into(), "3".into()),
            ("RUST_LOG".into(), "info".into()),
        ];
        if !self.endpoints.amqp_nodes.is_empty() {
            env.push((
                "BULKOPS__AMQP__URLS".into(),
                self.endpoints.amqp_nodes.join(","),
            ));
        }
        env.extend(self.overrides.lock().await.iter().cloned());
        env
    }

    async fn spawn(
        &self,
        program: &str,
        role: &str,
        marker: &str,
        extra: &[(&str, String)],
    ) -> anyhow::Result<Arc<Mutex<Proc>>> {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let mut env = self.process_env().await;
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        let proc = Proc::start(
            program,
            &[],
            &format!("{role}-{n}"),
            &env,
            &self.log_dir,
            Some(marker),
        )
        .await?;
        let proc = Arc::new(Mutex::new(proc));
        self.procs.lock().await.push(proc.clone());
        Ok(proc)
    }

    /// Starts a producer; returns it and an API client for it.
    pub async fn start_producer(&self) -> anyhow::Result<(Arc<Mutex<Proc>>, Api)> {
        self.start_producer_with(&[]).await
    }

    /// Starts a producer with extra environment.
    pub async fn start_producer_with(
        &self,
        extra: &[(&str, String)],
    ) -> anyhow::Result<(Arc<Mutex<Proc>>, Api)> {
        let proc = self
            .spawn("bulkops-producer", "producer", "listening on ", extra)
            .await?;
        let addr = proc.lock().await.addr.clone().context("producer address")?;
        Ok((proc, Api::new(&format!("http://{addr}"))))
    }

    /// Starts a worker.
    pub async fn start_worker(&self) -> anyhow::Result<Arc<Mutex<Proc>>> {
        self.start_worker_with(&[]).await
    }

    /// Starts a worker with extra environment.
    pub async fn start_worker_with(
        &self,
        extra: &[(&str, String)],
    ) -> anyhow::Result<Arc<Mutex<Proc>>> {
        self.spawn("bulkops-worker", "worker", "metrics on ", extra)
            .await
    }

    /// Starts a producer and `workers` workers.
    pub async fn start(&self, workers: usize) -> anyhow::Result<Api> {
        let (_, api) = self.start_producer().await?;
        for _ in 0..workers {
            self.start_worker().await?;
        }
        Ok(api)
    }

    /// Runs the `bulkops` CLI with this test's configuration; returns its exit status,
    /// stdout and stderr.
    pub async fn cli(
        &self,
        args: &[&str],
    ) -> anyhow::Result<(std::process::ExitStatus, String, String)> {
        let mut cmd = tokio::process::Command::new(crate::process::bin_dir().join("bulkops"));
        cmd.args(args).current_dir(workspace_root());
        for (k, _) in std::env::vars() {
            if k.starts_with("BULKOPS") || k == "RUST_LOG" {
                cmd.env_remove(&k);
            }
        }
        for (k, v) in self.process_env().await {
            cmd.env(k, v);
        }
        let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
            .await
            .context("bulkops CLI timed out")??;
        Ok((
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Every log line of every process so far.
    pub async fn logs(&self) -> String {
        let mut all = String::new();
        if let Ok(mut dir) = tokio::fs::read_dir(&self.log_dir).await {
            while let Ok(Some(entry)) = dir.next_entry().await {
                all.push_str(
                    &tokio::fs::read_to_string(entry.path())
                        .await
                        .unwrap_or_default(),
                );
            }
        }
        all
    }

    /// A count from SQL, or `None` when the database does not answer (a test restarting
    /// it polls with this).
    pub async fn try_count(&self, sql: &str) -> Option<i64> {
        let row = self
            .db
            .query_one_raw(bulkops_shared::db::stmt(sql, []))
            .await
            .ok()??;
        row.try_get_by_index::<i64>(0).ok()
    }

    /// A count from SQL (`SELECT count(*) …` or any query of one bigint column `n`).
    pub async fn count(&self, sql: &str) -> i64 {
        let row = self
            .db
            .query_one_raw(bulkops_shared::db::stmt(sql, []))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .unwrap_or_else(|| panic!("{sql}: no row"));
        row.try_get_by_index::<i64>(0)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Deletes the test's queues and exchanges on the first broker node that answers.
    async fn release_broker(&self) {
        let mut amqp = None;
        for url in self.endpoints.harness_amqp() {
            if let Ok(c) = Connection::connect(&url, ConnectionProperties::default()).await {
                amqp = Some(c);
                break;
            }
        }
        let channel = match &amqp {
            Some(c) => c.create_channel().await.ok(),
            None => None,
        };
        if let Some(ch) = channel {
            let topology = Topology::new(
                self.amqp_prefix.clone(),
                self.events_exchange.clone(),
                1,
                vec![
                    Duration::from_millis(200),
                    Duration::from_millis(500),
                    Duration::from_millis(1000),
                ],
            )
            .with_bulk_queues(self.bulk_queues().await);
            release_amqp(
                &ch,
                &topology,
                &[format!("{}.capture", self.amqp_prefix)],
                &self.events_exchange,
                self.began,
            )
            .await;
        }
        if let Some(c) = amqp {
            let _ = c.close(200, "done".into()).await;
        }
    }

    /// Stops every process, releases the test's queues and exchanges ([`release_amqp`]), and
    /// drops its database. Called at the end of a passing test (a failing one leaves its database for
    /// inspection; its processes die with it).
    pub async fn finish(self) {
        self.events.stop();
        // Each step is bounded: a teardown that waits forever on a broker or a process
        // would hang the whole suite (seen once in `producer_killed_while_splitting`,
        // after the test had passed). What a cut-short step leaves behind, the broker's
        // expiry policy and the next run's cleanup remove.
        for p in self.procs.lock().await.iter() {
            let _ =
                tokio::time::timeout(TEARDOWN_STEP, async { p.lock().await.kill().await }).await;
        }
        let _ = tokio::time::timeout(TEARDOWN_STEP + QUEUE_MIN_AGE, self.release_broker()).await;
        let _ = tokio::time::timeout(TEARDOWN_STEP, self.db.clone().close()).await;
        let _ = tokio::time::timeout(TEARDOWN_STEP, async {
            if let Ok(admin) =
                Database::connect(format!("{}/postgres", self.endpoints.pg_direct)).await
            {
                let _ = admin
                    .execute_unprepared(&format!(
                        "DROP DATABASE IF EXISTS \"bulkops_t_{}\" WITH (FORCE)",
                        self.id
                    ))
                    .await;
                let _ = admin.close().await;
            }
        })
        .await;
        let _ = tokio::fs::remove_dir_all(&self.log_dir).await;
    }
}

/// The RabbitMQ policy that expires what failed test runs and benchmarks leave behind.
const EXPIRY_POLICY: &str = "bulkops-test-runs";
/// Every queue name a test run (`t{HHMMSS}{6 hex}.`) or a benchmark (`bench{6 hex}.`) declares.
const RUN_QUEUES: &str = r"^(t[0-9]{6}[0-9a-f]{6}|bench[0-9a-f]{6})\.";
/// Longer than any test or benchmark deployment lives: a retry queue has no consumer, so
/// the broker counts it unused from its declaration on.
const RUN_QUEUE_EXPIRY: Duration = Duration::from_secs(30 * 60);
/// How old a run's queues must be before it deletes them (see [`release_amqp`]).
const QUEUE_MIN_AGE: Duration = Duration::from_secs(15);
/// The bound on each step of [`TestEnv::finish`].
const TEARDOWN_STEP: Duration = Duration::from_secs(60);

/// Makes sure the machine's broker expires the queues a failed run leaves behind (a passing
/// run deletes its own), so that they do not pile up across runs: each quorum queue holds
/// a few of the broker's file handles, and a broker out of them stalls. Best effort: without
/// `rabbitmqctl` the leftovers stay until deleted by hand.
#[allow(
    clippy::print_stderr,
    reason = "the harness tells whoever runs the tests that leftovers will not expire"
)]
pub async fn ensure_queue_expiry() {
    static SET: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SET.get_or_init(|| async {
        let definition = format!(r#"{{"expires":{}}}"#, RUN_QUEUE_EXPIRY.as_millis());
        let out = tokio::process::Command::new("rabbitmqctl")
            .args([
                "-q",
                "set_policy",
                "--apply-to",
                "queues",
                EXPIRY_POLICY,
                RUN_QUEUES,
            ])
            .arg(definition)
            .output()
            .await;
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "rabbitmqctl set_policy failed ({}); failed runs' queues will not expire",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => {
                eprintln!("rabbitmqctl not runnable ({e}); failed runs' queues will not expire")
            }
        }
    })
    .await;
}

/// Deletes a run's AMQP names on the machine's broker, best effort (what is already gone
/// is fine): every queue of `topology` and the `extra` ones, its dead-letter exchange and
/// the events exchange.
///
/// The queues are deleted only once they are [`QUEUE_MIN_AGE`] old (`declared_at` is when
/// the run began). On RabbitMQ 3.10, deleting a quorum queue with at-least-once
/// dead-lettering while its dead-letter worker is still starting crashes that worker twice
/// in a row, which stops the broker's `rabbit_fifo_dlx_sup` for good: from then on every
/// such queue fails to start (rabbitmq-server#16652). A short test deleted its queues a
/// second after declaring them and wedged the broker that way.
pub async fn release_amqp(
    ch: &Channel,
    topology: &Topology,
    extra: &[String],
    events_exchange: &str,
    declared_at: std::time::Instant,
) {
    if let Some(wait) = QUEUE_MIN_AGE.checked_sub(declared_at.elapsed()) {
        tokio::time::sleep(wait).await;
    }
    for q in topology.all_queues().iter().chain(extra) {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in [topology.dead_letter_exchange().as_str(), events_exchange] {
        let _ = ch.exchange_delete(x.into(), Default::default()).await;
    }
}

/// Messages (ready and unacknowledged) in every queue on the machine's broker whose name
/// starts with `prefix.` (read with `rabbitmqctl`, which sees what AMQP cannot: the
/// deliveries consumers hold).
pub async fn queued_messages(prefix: &str) -> anyhow::Result<u64> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "name",
            "messages",
            "--no-table-headers",
        ])
        .output()
        .await
        .context("rabbitmqctl")?;
    anyhow::ensure!(out.status.success(), "rabbitmqctl list_queues failed");
    let want = format!("{prefix}.");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(name, _)| name.starts_with(&want))
        .filter_map(|(_, n)| n.trim().parse::<u64>().ok())
        .sum())
}
