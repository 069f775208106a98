//! `bulkops-bench` (`make bench`): measures bulkops against the set-based SQL limit, in one
//! run, on this machine's PostgreSQL, RabbitMQ and Redis, and writes docs/PERFORMANCE.md.
//!
//! a. bulk create: one set-based transaction doing rules 4–6 for a filter, then bulkops
//!    end to end (request → batch completed) with 1 and 2 workers, each on a fresh copy of
//!    the same data;
//! b. conversion: a set-based conversion of 10,000 Sales Records with children (the
//!    workers' own statements over all of them in one transaction), then bulkops with 1
//!    and 2 workers;
//! c. accepting a 1,000,000-item bulk create: time to the 202, the split's messages/s
//!    against a plain lapin publish loop with confirms of the same messages to the same kind
//!    of queue, and the producer's peak RSS; then the same request end to end with two
//!    workers (records/s, time to the 202, every process's peak memory and CPU);
//! d. fairness: while that batch is processed, single-record conversions and 10-Individual
//!    bulk creates of another agency (p50, p95 over 20 each);
//! e. the workers' peak RSS and CPU seconds per 1,000 records;
//!
//! and the cost table: CPU seconds per 1,000 records created for each process
//! (PostgreSQL, RabbitMQ, Redis, producer, workers; [`bulkops_tests::cost`]) for the
//! set-based limit, bulkops with 1 and 2 workers and the big run, with each total as a
//! ratio to the limit's. `--big 0` skips c and d; `--conversions 0` skips b; `--env
//! KEY=VALUE` (repeatable) runs every bulkops process with a configuration variant.
//!
//! `--fairness` (`make bench-fairness`) runs only f.: two agencies, one with 4 batches of
//! `--fair-items` (50,000) items and one with 1, submitted together, with the default
//! per-agency shares and with per-batch shares only (`split.max_in_flight_per_agency = 0`);
//! each agency's throughput while both are active. It writes its own section of
//! docs/PERFORMANCE.md.
//!
//! Every bulkops run uses the release binaries and a database cloned from a template, so
//! runs never see each other's data. Each figure is the median of `--runs` runs.
//!
//! `bulkops-bench --cluster` (`make bench-cluster`) measures instead, in one run, bulk
//! create records/s on a RabbitMQ node of its own against a 3-node RabbitMQ cluster of its
//! own (the installed RabbitMQ, [`bulkops_tests::rabbit_cluster`]), each with
//! `amqp.bulk_queues` = 1 and 3, with the brokers' CPU per 1,000 records, and writes the
//! cluster table of docs/PERFORMANCE.md.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bulkops_shared::db::stmt;
use bulkops_shared::mapping::{CREATE_FIELDS, create_copied_types, insert_lists};
use bulkops_tests::api::{Api, token};
use bulkops_tests::cost::{Group, Meter, Usage};
use bulkops_tests::env::{
    SECRET, amqp_url, ensure_queue_expiry, pg_server, redis_url, release_amqp,
};
use bulkops_tests::process::{Proc, workspace_root};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, TransactionTrait};
use serde_json::json;
use tokio::sync::Mutex;

const FILTER: &str = r#"{"policy": {"coverage_type": ["Medicare Supplement"]}}"#;

struct Args {
    individuals: i64,
    big: i64,
    conversions: i64,
    runs: usize,
    out: String,
    cluster: bool,
    fairness: bool,
    fair_items: i64,
    /// Extra environment for every bulkops process (`--env KEY=VALUE`, repeatable): to
    /// measure a configuration variant against the defaults.
    env: Vec<(&'static str, String)>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        individuals: 100_000,
        big: 1_000_000,
        conversions: 10_000,
        runs: 3,
        out: "docs/PERFORMANCE.md".into(),
        cluster: false,
        fairness: false,
        fair_items: 50_000,
        env: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--cluster" {
            a.cluster = true;
            continue;
        }
        if flag == "--fairness" {
            a.fairness = true;
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--individuals" => a.individuals = value.parse()?,
            "--big" => a.big = value.parse()?,
            "--conversions" => a.conversions = value.parse()?,
            "--runs" => a.runs = value.parse()?,
            "--out" => a.out = value,
            "--fair-items" => a.fair_items = value.parse()?,
            "--env" => {
                let (k, v) = value
                    .split_once('=')
                    .with_context(|| format!("--env {value}: KEY=VALUE"))?;
                // Leaked once per flag: the deployments take `&'static str` keys.
                a.env
                    .push((Box::leak(k.to_owned().into_boxed_str()), v.to_owned()));
            }
            _ => bail!("unknown flag {flag}"),
        }
    }
    Ok(a)
}

async fn admin() -> anyhow::Result<DatabaseConnection> {
    Ok(Database::connect(format!("{}/postgres", pg_server())).await?)
}

async fn drop_db(name: &str) -> anyhow::Result<()> {
    let a = admin().await?;
    a.execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await?;
    a.close().await?;
    Ok(())
}

async fn clone_db(template: &str, name: &str) -> anyhow::Result<DatabaseConnection> {
    drop_db(name).await?;
    let a = admin().await?;
    a.execute_unprepared(&format!(
        "CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""
    ))
    .await?;
    a.close().await?;
    connect(name).await
}

async fn connect(name: &str) -> anyhow::Result<DatabaseConnection> {
    let mut o = sea_orm::ConnectOptions::new(format!("{}/{name}", pg_server()));
    o.max_connections(4).sqlx_logging(false);
    Ok(Database::connect(o).await?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let idx = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[idx]
}

/// Peak RSS (kB) and CPU seconds of a process, from /proc.
fn proc_usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    (rss, ticks / 100.0)
}

/// A running bulkops (one producer, N workers) against one database.
struct Deployment {
    producer: Arc<Mutex<Proc>>,
    workers: Vec<Arc<Mutex<Proc>>>,
    api: Api,
    prefix: String,
    began: Instant,
    /// The broker its queues are on (`BULKOPS__AMQP__URL` in `extra`, else the machine's).
    amqp: String,
    bulk_queues: u16,
}

async fn deploy(
    db: &str,
    workers: usize,
    extra: &[(&str, String)],
    tag: &str,
) -> anyhow::Result<Deployment> {
    let prefix = format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    ensure_queue_expiry().await;
    let began = Instant::now();
    let log_dir = workspace_root().join("target").join("bench-logs").join(tag);
    tokio::fs::create_dir_all(&log_dir).await?;
    let mut env: Vec<(String, String)> = vec![
        (
            "BULKOPS__DATABASE__URL".into(),
            format!("{}/{db}", pg_server()),
        ),
        ("BULKOPS__AMQP__URL".into(), amqp_url()),
        ("BULKOPS__AMQP__PREFIX".into(), prefix.clone()),
        (
            "BULKOPS__AMQP__EVENTS_EXCHANGE".into(),
            format!("{prefix}.events"),
        ),
        ("BULKOPS__REDIS__URL".into(), redis_url()),
        ("BULKOPS__REDIS__PREFIX".into(), prefix.clone()),
        ("BULKOPS__AUTH__JWT_SECRET".into(), SECRET.into()),
        ("BULKOPS__HTTP__BIND".into(), "127.0.0.1:0".into()),
        ("BULKOPS__METRICS__BIND".into(), "127.0.0.1:0".into()),
        (
            "RUST_LOG".into(),
            "warn,bulkops_producer=info,bulkops_worker=info".into(),
        ),
    ];
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    let producer = Proc::start(
        "bulkops-producer",
        &[],
        "producer",
        &env,
        &log_dir,
        Some("listening on "),
    )
    .await?;
    let api = Api::new(&format!(
        "http://{}",
        producer.addr.clone().context("producer address")?
    ));
    let mut ws = Vec::new();
    for n in 0..workers {
        ws.push(Arc::new(Mutex::new(
            Proc::start(
                "bulkops-worker",
                &[],
                &format!("worker-{n}"),
                &env,
                &log_dir,
                Some("metrics on "),
            )
            .await?,
        )));
    }
    let find = |key: &str| {
        extra
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    };
    Ok(Deployment {
        producer: Arc::new(Mutex::new(producer)),
        workers: ws,
        api,
        prefix,
        began,
        amqp: find("BULKOPS__AMQP__URL").unwrap_or_else(amqp_url),
        bulk_queues: find("BULKOPS__AMQP__BULK_QUEUES")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
    })
}

impl Deployment {
    async fn stop(self) -> anyhow::Result<()> {
        for w in &self.workers {
            w.lock().await.kill().await;
        }
        self.producer.lock().await.kill().await;
        let conn = Connection::connect(&self.amqp, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        let topology = bulkops_shared::topology::Topology::new(
            self.prefix.clone(),
            format!("{}.events", self.prefix),
            20,
            vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
        )
        .with_bulk_queues(self.bulk_queues);
        release_amqp(
            &ch,
            &topology,
            &[],
            &format!("{}.events", self.prefix),
            self.began,
        )
        .await;
        let _ = conn.close(200, "done".into()).await;
        Ok(())
    }

    /// Starts measuring what each process costs from now on.
    async fn meter(&self) -> Meter {
        let producer = self.producer.lock().await.pid;
        let mut workers = Vec::new();
        for w in &self.workers {
            workers.push(w.lock().await.pid);
        }
        Meter::start(vec![producer], workers)
    }

    /// Chunks the workers ran and their mean size (deliveries per transaction) and mean
    /// duration, from their metrics.
    async fn chunk_stats(&self) -> (f64, f64, f64) {
        let (mut items, mut chunks, mut secs) = (0.0, 0.0, 0.0);
        for w in &self.workers {
            let Some(addr) = w.lock().await.addr.clone() else {
                continue;
            };
            let Ok(reply) = reqwest::get(format!("http://{addr}/metrics")).await else {
                continue;
            };
            let text = reply.text().await.unwrap_or_default();
            for line in text.lines() {
                let mut parts = line.split_whitespace();
                let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let v: f64 = value.parse().unwrap_or(0.0);
                if name == "bulkops_chunk_items_sum" {
                    items += v;
                } else if name == "bulkops_chunk_items_count" {
                    chunks += v;
                } else if name.starts_with("bulkops_chunk_duration_seconds_sum") {
                    secs += v;
                }
            }
        }
        (
            chunks,
            items / chunks.max(1.0),
            1000.0 * secs / chunks.max(1.0),
        )
    }

    async fn workers_usage(&self) -> (u64, f64) {
        let mut peak = 0;
        let mut cpu = 0.0;
        for w in &self.workers {
            let (rss, c) = proc_usage(w.lock().await.pid);
            peak = peak.max(rss);
            cpu += c;
        }
        (peak, cpu)
    }
}

/// Waits for a batch to complete; returns the server-side time from acceptance to
/// completion and the count of the given outcome column.
async fn wait_batch(
    db: &DatabaseConnection,
    batch: i64,
    outcome_col: &str,
) -> anyhow::Result<(f64, i64)> {
    let started = Instant::now();
    loop {
        let row = db
            .query_one_raw(stmt(
                format!(
                    "SELECT state, EXTRACT(EPOCH FROM completed_at - created_at)::float8 AS secs, {outcome_col} AS n
                       FROM bulk_batches WHERE id = $1"
                ),
                [batch.into()],
            ))
            .await?
            .context("batch")?;
        let state: String = row.try_get("", "state")?;
        if state == "completed" {
            return Ok((row.try_get("", "secs")?, row.try_get("", "n")?));
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("batch {batch} did not complete");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Data

async fn seed_create_template(name: &str, individuals: i64) -> anyhow::Result<(i64, i64, i64)> {
    let url = format!("{}/{name}", pg_server());
    bulkops_migrations::drop_database(&url).await?;
    bulkops_migrations::migrate_up(&url).await?;
    let db = connect(name).await?;
    let s = bulkops_cli::seed::seed_agency(
        &db,
        &bulkops_cli::seed::AgencySpec {
            name: "Bench Agency".into(),
            individuals,
            linked_share: 0.1,
            seed: 0.42,
        },
    )
    .await?;
    db.execute_unprepared("VACUUM ANALYZE").await?;
    db.close().await?;
    Ok((s.agency_id, s.admin_user_id, s.record_type_id))
}

/// The set-based limit: the same bulk create (rules 4–6) of the Individuals `filter` finds,
/// as one transaction.
async fn limit_create(
    db: &DatabaseConnection,
    agency: i64,
    record_type: i64,
    filter: &str,
) -> anyhow::Result<(f64, i64)> {
    let filter =
        bulkops_shared::filter::SearchFilter::parse(&serde_json::from_str(filter)?, "filter")
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut params: Vec<sea_orm::Value> = vec![
        agency.into(),
        record_type.into(),
        create_copied_types().into(),
    ];
    let conditions = filter.to_sql("i", &mut params);
    let (targets, exprs) = insert_lists(CREATE_FIELDS, "i");
    let sql = format!(
        "WITH ins AS (
           INSERT INTO sales_records (agency_id, record_type_id, individual_id, assigned_user_id, {targets})
           SELECT i.agency_id, $2, i.id, u.id, {exprs}
             FROM individuals i
             LEFT JOIN user_linked_agents ula ON ula.agent_id = i.servicing_agent_id
             LEFT JOIN users u ON u.id = ula.user_id AND u.agency_id = i.agency_id
            WHERE i.agency_id = $1 AND {conditions}
              AND NOT EXISTS (SELECT 1 FROM sales_records sr WHERE sr.individual_id = i.id)
           ON CONFLICT ON CONSTRAINT sales_records_individual_id_key DO NOTHING
           RETURNING id, individual_id
         ), defs AS (
           SELECT sd.id AS src_def, td.id AS dst_def FROM custom_field_definitions sd
             JOIN custom_field_definitions td ON td.agency_id = sd.agency_id AND td.entity = 'sales_record'
              AND td.name = sd.name AND td.field_type = sd.field_type
            WHERE sd.agency_id = $1 AND sd.entity = 'individual' AND sd.field_type = ANY($3::text[])
         ), cf AS (
           INSERT INTO custom_field_values (definition_id, record_id, value)
           SELECT defs.dst_def, ins.id, v.value FROM ins CROSS JOIN defs
             JOIN custom_field_values v ON v.definition_id = defs.src_def AND v.record_id = ins.individual_id
           RETURNING 1
         )
         SELECT (SELECT count(*) FROM ins) AS created"
    );
    let started = Instant::now();
    let tx = db.begin().await?;
    let row = tx
        .query_one_raw(stmt(sql, params))
        .await?
        .context("limit")?;
    let created: i64 = row.try_get("", "created")?;
    tx.commit().await?;
    Ok((started.elapsed().as_secs_f64(), created))
}

struct ConvertTemplate {
    agency: i64,
    admin: i64,
    ids: Vec<i64>,
}

async fn seed_convert_template(name: &str, conversions: i64) -> anyhow::Result<ConvertTemplate> {
    use bulkops_cli::seed;
    let url = format!("{}/{name}", pg_server());
    bulkops_migrations::drop_database(&url).await?;
    bulkops_migrations::migrate_up(&url).await?;
    let db = connect(name).await?;
    let s = seed::seed_agency(
        &db,
        &seed::AgencySpec {
            name: "Bench Leads".into(),
            individuals: 1000,
            linked_share: 0.0,
            seed: 0.3,
        },
    )
    .await?;
    let ids = seed::create_leads(&db, s.agency_id, conversions, 0.7).await?;
    seed::enrich_leads(&db, s.agency_id, &ids, seed::LeadProfile::BENCH).await?;
    db.execute_unprepared("VACUUM ANALYZE").await?;
    db.close().await?;
    Ok(ConvertTemplate {
        agency: s.agency_id,
        admin: s.admin_user_id,
        ids,
    })
}

/// The set-based limit of conversion: the workers' own statements over every record in one
/// transaction (no messages, locks or chunking).
async fn limit_convert(db: &DatabaseConnection, t: &ConvertTemplate) -> anyhow::Result<(f64, i64)> {
    // The batch and its items exist for the statements to record outcomes; not timed.
    let batch: i64 = db
        .query_one_raw(stmt(
            "WITH b AS (INSERT INTO bulk_batches (agency_id, kind, lane, requested_by, total)
                        VALUES ($1, 'convert_sales_records', 'bulk', $2, $4) RETURNING id),
                  i AS (INSERT INTO bulk_items (batch_id, seq, target_id)
                        SELECT b.id, u.ord, u.id FROM b, unnest($3::bigint[]) WITH ORDINALITY AS u(id, ord))
             SELECT id FROM b",
            [t.agency.into(), t.admin.into(), t.ids.clone().into(), (t.ids.len() as i64).into()],
        ))
        .await?
        .context("batch")?
        .try_get("", "id")?;
    db.execute_unprepared("ANALYZE bulk_items").await?;
    let convertible: Vec<i64> = db
        .query_all_raw(stmt(
            "SELECT record_type_id FROM user_sales_permissions WHERE user_id = $1 AND can_view AND can_edit AND can_delete",
            [t.admin.into()],
        ))
        .await?
        .iter()
        .map(|r| r.try_get("", "record_type_id"))
        .collect::<Result<_, _>>()?;
    let meta = bulkops_worker::meta::BatchMeta {
        id: bulkops_shared::ids::BatchId(batch),
        agency_id: bulkops_shared::ids::AgencyId(t.agency),
        kind: bulkops_shared::batch::BatchKind::ConvertSalesRecords,
        requested_by: bulkops_shared::ids::UserId(t.admin),
        record_type_id: None,
        convertible_types: convertible.into_iter().collect(),
    };
    let seqs: Vec<i64> = (1..=t.ids.len() as i64).collect();
    let started = Instant::now();
    let tx = db.begin().await?;
    let delta = bulkops_worker::convert::apply(&tx, &meta, &seqs).await?;
    tx.commit().await?;
    Ok((started.elapsed().as_secs_f64(), delta.converted))
}

// ---------------------------------------------------------------------------------------
// The 1,000,000-item request

/// A plain publish loop: the same messages (size, properties, headers) to a fresh quorum
/// queue, with confirms in the same window as the splitter.
async fn plain_publish_loop(n: i64, window: usize) -> anyhow::Result<f64> {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let queue = format!(
        "bench{}.plain",
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    );
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut headers = FieldTable::default();
    headers.insert(
        bulkops_shared::messages::headers::PUBLISHED_AT.into(),
        AMQPValue::LongLongInt(chrono::Utc::now().timestamp_millis()),
    );
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for seq in 1..=n {
        let body = bulkops_shared::messages::WorkMessage::new(
            bulkops_shared::messages::Op::CreateSalesRecord,
            bulkops_shared::ids::BatchId(1),
            seq,
            seq,
        )
        .encode();
        if pending.len() >= window
            && let Some(c) = pending.pop_front()
        {
            let c: lapin::PublisherConfirm = c;
            c.await?;
        }
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                props.clone(),
            )
            .await?;
        pending.push_back(confirm);
    }
    while let Some(c) = pending.pop_front() {
        c.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(n as f64 / secs)
}

/// Adds to the big template another agency for the fairness measurements: 200
/// Individuals in 20 counties of 10, and 40 leads.
async fn seed_fairness_agency(name: &str) -> anyhow::Result<(i64, i64, i64, Vec<i64>)> {
    use bulkops_cli::seed;
    let db = connect(name).await?;
    let s = seed::seed_agency(
        &db,
        &seed::AgencySpec {
            name: "Small Agency".into(),
            individuals: 200,
            linked_share: 0.0,
            seed: 0.9,
        },
    )
    .await?;
    db.execute_raw(stmt(
        "UPDATE individuals SET county = 'County-' || ((id % 20) + 1) WHERE agency_id = $1",
        [s.agency_id.into()],
    ))
    .await?;
    let leads = seed::create_leads(&db, s.agency_id, 40, 0.8).await?;
    seed::enrich_leads(&db, s.agency_id, &leads, seed::LeadProfile::BENCH).await?;
    db.close().await?;
    Ok((s.agency_id, s.admin_user_id, s.record_type_id, leads))
}

// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// f. fair shares per agency

/// Databases of their own, so that a fairness run and a full `make bench` (whose
/// `bulkops_bench_run` is dropped and recreated for every run) never meet.
const FAIR_TEMPLATE_DB: &str = "bulkops_bench_fair";
const FAIR_RUN_DB: &str = "bulkops_bench_fair_run";

/// Two agencies: "Busy" with 4 × `items` Individuals in four counties (one batch each) and
/// "Quiet" with `items`. Plain Individuals (no policies, no one linked): every item is a
/// create, so the two agencies' items cost the same.
async fn seed_fairness_template(name: &str, items: i64) -> anyhow::Result<[(i64, i64, i64); 2]> {
    use bulkops_cli::seed;
    let url = format!("{}/{name}", pg_server());
    bulkops_migrations::drop_database(&url).await?;
    bulkops_migrations::migrate_up(&url).await?;
    let db = connect(name).await?;
    let mut out = [(0, 0, 0); 2];
    for (i, (agency, n)) in [("Busy Agency", 4 * items), ("Quiet Agency", items)]
        .into_iter()
        .enumerate()
    {
        let s = seed::seed_agency(
            &db,
            &seed::AgencySpec {
                name: agency.into(),
                individuals: 0,
                linked_share: 0.0,
                seed: 0.5,
            },
        )
        .await?;
        db.execute_raw(stmt(
            "INSERT INTO individuals (agency_id, first_name, last_name, state, county, status)
             SELECT $1, 'F' || g, 'L' || g, 'TX', 'Part-' || (g % 4), 'Active'
               FROM generate_series(1, $2::bigint) g",
            [s.agency_id.into(), n.into()],
        ))
        .await?;
        out[i] = (s.agency_id, s.admin_user_id, s.record_type_id);
    }
    db.execute_unprepared("VACUUM ANALYZE").await?;
    db.close().await?;
    Ok(out)
}

/// Items decided per agency, and whether each agency's batches are all completed.
async fn agency_progress(
    db: &DatabaseConnection,
    agencies: [i64; 2],
) -> anyhow::Result<[(i64, bool); 2]> {
    let mut out = [(0, false); 2];
    for (i, agency) in agencies.iter().enumerate() {
        let row = db
            .query_one_raw(stmt(
                "SELECT COALESCE(sum(n_created + n_converted + n_skipped + n_failed), 0)::bigint AS done,
                        COALESCE(bool_and(state = 'completed'), false) AS all_done
                   FROM bulk_batches WHERE agency_id = $1",
                [(*agency).into()],
            ))
            .await?
            .context("progress")?;
        out[i] = (row.try_get("", "done")?, row.try_get("", "all_done")?);
    }
    Ok(out)
}

/// f.: each agency's throughput while both have work, under one splitter policy.
async fn fairness_run(
    template: &str,
    agencies: &[(i64, i64, i64); 2],
    extra: &[(&str, String)],
    tag: &str,
) -> anyhow::Result<(f64, f64, f64)> {
    let db = clone_db(template, FAIR_RUN_DB).await?;
    let d = deploy(FAIR_RUN_DB, 2, extra, tag).await?;
    let [
        (busy, busy_admin, busy_type),
        (quiet, quiet_admin, quiet_type),
    ] = *agencies;
    let busy_token = token(busy_admin, busy);
    for part in 0..4 {
        d.api
            .bulk_create(
                &busy_token,
                &json!({"filter": {"individual": {"county": [format!("Part-{part}")]}}, "record_type_id": busy_type}),
            )
            .await?;
    }
    d.api
        .bulk_create(
            &token(quiet_admin, quiet),
            &json!({"filter": {}, "record_type_id": quiet_type}),
        )
        .await?;
    // The window: from the first sample where both agencies have items decided (their
    // messages are in the queue) to the first sample where either has finished.
    let started = Instant::now();
    let mut from: Option<(Instant, [(i64, bool); 2])> = None;
    let result = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = agency_progress(&db, [busy, quiet]).await?;
        let at = Instant::now();
        match from {
            None if now[0].0 > 0 && now[1].0 > 0 => from = Some((at, now)),
            Some((t0, p0)) if now[0].1 || now[1].1 => {
                let secs = (at - t0).as_secs_f64();
                break (
                    (now[0].0 - p0[0].0) as f64 / secs,
                    (now[1].0 - p0[1].0) as f64 / secs,
                    secs,
                );
            }
            _ => {}
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("the fairness run did not finish");
        }
    };
    d.stop().await?;
    db.close().await?;
    Ok(result)
}

async fn fairness(a: &Args) -> anyhow::Result<Vec<(String, String, String)>> {
    println!(
        "seeding two agencies ({} and {} Individuals) …",
        4 * a.fair_items,
        a.fair_items
    );
    let agencies = seed_fairness_template(FAIR_TEMPLATE_DB, a.fair_items).await?;
    let mut rows = Vec::new();
    for (policy, extra) in [
        ("per agency, then per batch (default)", vec![]),
        (
            "per batch only (split.max_in_flight_per_agency = 0)",
            vec![("BULKOPS__SPLIT__MAX_IN_FLIGHT_PER_AGENCY", "0".to_owned())],
        ),
    ] {
        let mut busy = Vec::new();
        let mut quiet = Vec::new();
        let mut window = Vec::new();
        for run in 0..a.runs {
            let (b, q, secs) =
                fairness_run(FAIR_TEMPLATE_DB, &agencies, &extra, &format!("fair-{run}")).await?;
            println!("  {policy}: busy {b:.0}/s, quiet {q:.0}/s over {secs:.1} s");
            busy.push(b);
            quiet.push(q);
            window.push(secs);
        }
        let (b, q) = (median(busy), median(quiet));
        rows.push((
            format!("f. {policy}"),
            format!("{:.0} % / {:.0} %", 100.0 * b / (b + q), 100.0 * q / (b + q)),
            format!(
                "4-batch agency {b:.0} rec/s, 1-batch agency {q:.0} rec/s, both active for {:.1} s (median of {})",
                median(window),
                a.runs
            ),
        ));
    }
    drop_db(FAIR_RUN_DB).await?;
    drop_db(FAIR_TEMPLATE_DB).await?;
    Ok(rows)
}

/// Replaces the text between `<!-- {tag}:start -->` and `<!-- {tag}:end -->` in `out`
/// (appending it when the markers are missing).
fn write_section(out: &std::path::Path, tag: &str, body: &str) -> anyhow::Result<()> {
    let doc = std::fs::read_to_string(out).unwrap_or_default();
    let start = format!("<!-- {tag}:start -->");
    let end = format!("<!-- {tag}:end -->");
    let section = format!("{start}\n{body}{end}");
    let new_doc = match (doc.find(&start), doc.find(&end)) {
        (Some(s), Some(e)) => format!("{}{}{}", &doc[..s], section, &doc[e + end.len()..]),
        _ => format!("{doc}\n{section}\n"),
    };
    std::fs::write(out, new_doc)?;
    Ok(())
}

fn table(rows: &[(String, String, String)]) -> String {
    let mut table = String::new();
    let _ = writeln!(table, "| measurement | figure | notes |");
    let _ = writeln!(table, "|---|---:|---|");
    for (what, value, note) in rows {
        let _ = writeln!(table, "| {what} | {value} | {note} |");
    }
    table
}

#[derive(Default)]
struct Report {
    rows: Vec<(String, String, String)>,
}

impl Report {
    fn row(&mut self, what: &str, value: String, note: String) {
        println!("{what:<60} {value:>18}  {note}");
        self.rows.push((what.to_owned(), value, note));
    }
}

/// `--cluster`: bulk create on one RabbitMQ node with a standalone Redis against a 3-node
/// RabbitMQ cluster (with a standalone Redis, then with a Redis Cluster), with 1 and 3 bulk
/// shards each, in the same run.
async fn cluster_bench(a: &Args) -> anyhow::Result<()> {
    use bulkops_tests::rabbit_cluster::RabbitCluster;
    use bulkops_tests::services::RabbitInstance;
    const WORKERS: usize = 3;
    let mut r = Report::default();
    println!("seeding {} Individuals …", a.individuals);
    let (agency, admin_user, record_type) =
        seed_create_template("bulkops_bench_create", a.individuals).await?;
    println!("starting a RabbitMQ node, a 3-node RabbitMQ cluster and a Redis Cluster …");
    let single = RabbitInstance::start().await?;
    let cluster = RabbitCluster::start(3).await?;
    let redis_cluster = bulkops_tests::redis_cluster::RedisCluster::start().await?;
    let standalone: Vec<(&str, String)> = Vec::new();
    let clustered_redis = vec![
        ("BULKOPS__REDIS__MODE", "cluster".to_owned()),
        ("BULKOPS__REDIS__NODES", redis_cluster.seeds()),
    ];
    // (label, broker URLs, broker nodes, Redis settings)
    type Setup<'a> = (
        &'a str,
        Vec<String>,
        Vec<&'a RabbitInstance>,
        &'a [(&'a str, String)],
    );
    let setups: [Setup<'_>; 3] = [
        (
            "1 RabbitMQ node, standalone Redis",
            vec![single.url()],
            vec![&single],
            &standalone,
        ),
        (
            "3-node RabbitMQ cluster, standalone Redis",
            cluster.urls(),
            cluster.nodes.iter().collect(),
            &standalone,
        ),
        (
            "3-node RabbitMQ cluster, Redis Cluster (3 masters, 3 replicas)",
            cluster.urls(),
            cluster.nodes.iter().collect(),
            &clustered_redis,
        ),
    ];
    let mut baseline = None;
    for (label, urls, nodes, redis) in &setups {
        for shards in [1_u16, 3] {
            let mut secs = Vec::new();
            let mut broker_cpu = Vec::new();
            let mut node_cpu: Vec<Vec<f64>> = vec![Vec::new(); nodes.len()];
            let mut worker_cpu = Vec::new();
            let mut created = 0;
            for run in 0..a.runs {
                let db = clone_db("bulkops_bench_create", "bulkops_bench_run").await?;
                let mut extra = vec![
                    ("BULKOPS__AMQP__URL", urls[0].clone()),
                    ("BULKOPS__AMQP__BULK_QUEUES", shards.to_string()),
                ];
                if urls.len() > 1 {
                    extra.push(("BULKOPS__AMQP__URLS", urls.join(",")));
                }
                extra.extend(redis.iter().cloned());
                let tag = format!("cluster-{}-{}-{shards}-{run}", urls.len(), redis.len());
                let d = deploy("bulkops_bench_run", WORKERS, &extra, &tag).await?;
                let cpu_before: Vec<f64> = nodes.iter().map(|n| n.cpu_seconds()).collect();
                let (_, worker_before) = d.workers_usage().await;
                let t = token(admin_user, agency);
                let started = Instant::now();
                let batch = d
                    .api
                    .bulk_create(&t, &json!({"filter": serde_json::from_str::<serde_json::Value>(FILTER)?, "record_type_id": record_type}))
                    .await?;
                let (_, n) = wait_batch(&db, batch, "n_created").await?;
                secs.push(started.elapsed().as_secs_f64());
                created = n;
                let thousands = (n as f64 / 1000.0).max(f64::MIN_POSITIVE);
                let per_node: Vec<f64> = nodes
                    .iter()
                    .zip(&cpu_before)
                    .map(|(n, before)| (n.cpu_seconds() - before) / thousands)
                    .collect();
                broker_cpu.push(per_node.iter().sum());
                for (all, one) in node_cpu.iter_mut().zip(&per_node) {
                    all.push(*one);
                }
                let (_, worker_after) = d.workers_usage().await;
                worker_cpu.push((worker_after - worker_before) / thousands);
                d.stop().await?;
                db.close().await?;
            }
            let rate = created as f64 / median(secs.clone());
            let base = *baseline.get_or_insert(rate);
            let nodes_note = if nodes.len() > 1 {
                let each: Vec<String> = node_cpu
                    .into_iter()
                    .map(|v| format!("{:.2}", median(v)))
                    .collect();
                format!(" ({} per node)", each.join(" / "))
            } else {
                String::new()
            };
            r.row(
                &format!("{label}, amqp.bulk_queues = {shards}: bulk create, {WORKERS} workers"),
                format!("{rate:.0} rec/s"),
                format!(
                    "{:.0} % of 1 node / 1 queue; {created} created in {:.2} s; CPU s per 1,000 records: brokers {:.2}{nodes_note}, workers {:.2} (medians of {})",
                    100.0 * rate / base,
                    median(secs),
                    median(broker_cpu),
                    median(worker_cpu),
                    a.runs
                ),
            );
        }
    }
    drop_db("bulkops_bench_run").await?;
    drop_db("bulkops_bench_create").await?;
    drop(setups);
    drop(redis_cluster);
    drop(cluster);
    drop(single);
    let stamp = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC");
    let body = format!(
        "Measured {stamp} on this 2-core machine, shared with other work (the figures are noisy), with `make bench-cluster` (`bulkops-bench --cluster --individuals {} --runs {}`; medians):\n\n{}",
        a.individuals,
        a.runs,
        table(&r.rows)
    );
    let out = workspace_root().join(&a.out);
    write_section(&out, "bench-cluster", &body)?;
    println!("\nwrote {}", out.display());
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let mut r = Report::default();
    let mut costs: Vec<(String, [f64; 5])> = Vec::new();
    let bin = bulkops_tests::process::bin_dir();
    println!("bulkops-bench: binaries from {}", bin.display());
    for p in ["bulkops-producer", "bulkops-worker"] {
        if !bin.join(p).is_file() {
            bail!(
                "{} missing: build the release binaries first (make bench does)",
                bin.join(p).display()
            );
        }
    }
    if a.cluster {
        return cluster_bench(&a).await;
    }
    if a.fairness {
        let rows = fairness(&a).await?;
        for (what, value, note) in &rows {
            println!("{what:<60} {value:>18}  {note}");
        }
        let stamp = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC");
        let body = format!(
            "Measured {stamp} on this 2-core machine with `make bench-fairness` (2 workers, {} items per batch, {} run(s), medians):\n\n{}",
            a.fair_items,
            a.runs,
            table(&rows)
        );
        let out = workspace_root().join(&a.out);
        write_section(&out, "fairness", &body)?;
        println!("\nwrote {}", out.display());
        return Ok(());
    }

    // a. bulk create
    println!("seeding {} Individuals …", a.individuals);
    let (agency, admin_user, record_type) =
        seed_create_template("bulkops_bench_create", a.individuals).await?;
    let mut limit_secs = Vec::new();
    let mut limit_created = 0;
    let mut limit_cost = Vec::new();
    for _ in 0..a.runs {
        let db = clone_db("bulkops_bench_create", "bulkops_bench_run").await?;
        let meter = Meter::start(Vec::new(), Vec::new());
        let (secs, created) = limit_create(&db, agency, record_type, FILTER).await?;
        limit_cost.push(meter.stop().await);
        limit_secs.push(secs);
        limit_created = created;
        db.close().await?;
    }
    let limit_rate = limit_created as f64 / median(limit_secs.clone());
    costs.push((
        "set-based limit".into(),
        per_thousand(&limit_cost, limit_created),
    ));
    r.row(
        "a. set-based limit: one SQL transaction (rules 4–6)",
        format!("{limit_rate:.0} rec/s"),
        format!(
            "{limit_created} created in {:.2} s (median of {})",
            median(limit_secs),
            a.runs
        ),
    );
    let mut worker_cpu_per_k = Vec::new();
    let mut worker_rss = 0_u64;
    let mut rate_by_workers = Vec::new();
    for workers in [1, 2] {
        let mut secs = Vec::new();
        let mut created = 0;
        let mut usage = Vec::new();
        let mut chunk_notes = Vec::new();
        for run in 0..a.runs {
            let db = clone_db("bulkops_bench_create", "bulkops_bench_run").await?;
            let d = deploy(
                "bulkops_bench_run",
                workers,
                &a.env,
                &format!("create-{workers}-{run}"),
            )
            .await?;
            let t = token(admin_user, agency);
            let meter = d.meter().await;
            let started = Instant::now();
            let batch = d
                .api
                .bulk_create(&t, &json!({"filter": serde_json::from_str::<serde_json::Value>(FILTER)?, "record_type_id": record_type}))
                .await?;
            let (_, n) = wait_batch(&db, batch, "n_created").await?;
            secs.push(started.elapsed().as_secs_f64());
            usage.push(meter.stop().await);
            created = n;
            let (chunks, mean, ms) = d.chunk_stats().await;
            chunk_notes.push(format!("{chunks:.0} chunks of {mean:.0} in {ms:.0} ms"));
            let (rss, cpu) = d.workers_usage().await;
            worker_rss = worker_rss.max(rss);
            if workers == 2 {
                worker_cpu_per_k.push(cpu / (n as f64 / 1000.0));
            }
            d.stop().await?;
            db.close().await?;
        }
        let rate = created as f64 / median(secs.clone());
        rate_by_workers.push(rate);
        costs.push((
            format!("bulkops, {workers} worker(s)"),
            per_thousand(&usage, created),
        ));
        r.row(
            &format!("a. bulkops bulk create, {workers} worker(s), request → completed"),
            format!("{rate:.0} rec/s"),
            format!(
                "{:.0} % of the limit (target ≥ 60 %); {created} created in {:.2} s (median); chunks per run: {}",
                100.0 * rate / limit_rate,
                median(secs),
                chunk_notes.join(", ")
            ),
        );
    }
    if let [one, two] = rate_by_workers[..] {
        r.row(
            "a. 2 workers against 1",
            format!("{:.0} %", 100.0 * two / one),
            "target ≥ 100 % (two workers no slower than one)".into(),
        );
    }
    drop_db("bulkops_bench_run").await?;

    // b. conversion
    if a.conversions > 0 {
        println!("seeding {} Sales Records with children …", a.conversions);
        let ct = seed_convert_template("bulkops_bench_convert", a.conversions).await?;
        let mut lsecs = Vec::new();
        let mut lconv = 0;
        for _ in 0..a.runs {
            let db = clone_db("bulkops_bench_convert", "bulkops_bench_run").await?;
            let (secs, n) = limit_convert(&db, &ct).await?;
            lsecs.push(secs);
            lconv = n;
            db.close().await?;
        }
        let conv_limit = lconv as f64 / median(lsecs.clone());
        r.row(
            "b. set-based limit: conversion in one transaction",
            format!("{conv_limit:.0} rec/s"),
            format!("{lconv} converted in {:.2} s (median)", median(lsecs)),
        );
        for workers in [1, 2] {
            let mut secs = Vec::new();
            let mut n = 0;
            let mut chunk_notes = Vec::new();
            for run in 0..a.runs {
                let db = clone_db("bulkops_bench_convert", "bulkops_bench_run").await?;
                let d = deploy(
                    "bulkops_bench_run",
                    workers,
                    &a.env,
                    &format!("convert-{workers}-{run}"),
                )
                .await?;
                let started = Instant::now();
                let batch = d.api.convert(&token(ct.admin, ct.agency), &ct.ids).await?;
                let (_, c) = wait_batch(&db, batch, "n_converted").await?;
                secs.push(started.elapsed().as_secs_f64());
                n = c;
                let (chunks, mean, ms) = d.chunk_stats().await;
                chunk_notes.push(format!("{chunks:.0} chunks of {mean:.0} in {ms:.0} ms"));
                let (rss, _) = d.workers_usage().await;
                worker_rss = worker_rss.max(rss);
                d.stop().await?;
                db.close().await?;
            }
            let rate = n as f64 / median(secs.clone());
            r.row(
            &format!("b. bulkops conversion, {workers} worker(s), request → completed"),
            format!("{rate:.0} rec/s"),
            format!(
                "{:.0} % of the limit (target ≥ 70 %); {n} converted in {:.2} s (median); chunks per run: {}",
                100.0 * rate / conv_limit,
                median(secs),
                chunk_notes.join(", ")
            ),
        );
        }
        // b'. one conversion at a time on an idle system (what an agent watching the modal sees)
        {
            let db = clone_db("bulkops_bench_convert", "bulkops_bench_run").await?;
            let d = deploy("bulkops_bench_run", 2, &[], "convert-single").await?;
            let t = token(ct.admin, ct.agency);
            let mut lat = Vec::new();
            for id in ct.ids.iter().take(50) {
                let started = Instant::now();
                let b = d.api.convert(&t, &[*id]).await?;
                wait_batch(&db, b, "n_converted").await?;
                lat.push(started.elapsed().as_secs_f64());
            }
            r.row(
                "b. single-record conversion, idle system, request → completed",
                format!("p50 {:.0} ms", 1000.0 * percentile(lat.clone(), 0.5)),
                format!(
                    "p95 {:.0} ms over {} runs",
                    1000.0 * percentile(lat.clone(), 0.95),
                    lat.len()
                ),
            );
            d.stop().await?;
            db.close().await?;
        }
        drop_db("bulkops_bench_run").await?;
        drop_db("bulkops_bench_convert").await?;
    }

    // c. the 1,000,000-item request
    let mut big_usage: Option<(Usage, i64)> = None;
    if a.big > 0 {
        println!("seeding {} Individuals for the big batch …", a.big);
        let (big_agency, big_admin, big_type) =
            seed_create_template("bulkops_bench_big", a.big).await?;
        let (small_agency, small_admin, small_type, leads) =
            seed_fairness_agency("bulkops_bench_big").await?;
        {
            let db = clone_db("bulkops_bench_big", "bulkops_bench_run").await?;
            let d = deploy(
                "bulkops_bench_run",
                0,
                // No window at all (the batch's nor the agency's): with no worker running,
                // any window would stop the split at its size.
                &[
                    ("BULKOPS__SPLIT__MAX_IN_FLIGHT_PER_BATCH", "0".into()),
                    ("BULKOPS__SPLIT__MAX_IN_FLIGHT_PER_AGENCY", "0".into()),
                ],
                "accept-big",
            )
            .await?;
            let started = Instant::now();
            let reply = d
                .api
                .post(
                    "/v1/bulk/sales-records",
                    &token(big_admin, big_agency),
                    &json!({"filter": {}, "record_type_id": big_type}),
                )
                .await?;
            let to_202 = started.elapsed().as_secs_f64();
            if reply.status != reqwest::StatusCode::ACCEPTED {
                bail!("big request answered {}: {}", reply.status, reply.text);
            }
            let batch = reply.json["batch_id"].as_i64().context("batch id")?;
            let total = reply.json["total"].as_i64().unwrap_or(0);
            r.row(
                "c. 1,000,000-item bulk create: time to the 202",
                format!("{to_202:.2} s"),
                format!("{total} items frozen (target < 10 s)"),
            );
            let (published, split_secs) = loop {
                let row = db
                .query_one_raw(stmt(
                    "SELECT split_published, EXTRACT(EPOCH FROM split_done_at - started_at)::float8 AS secs
                       FROM bulk_batches WHERE id = $1 AND split_done_at IS NOT NULL",
                    [batch.into()],
                ))
                .await?;
                if let Some(row) = row {
                    break (
                        row.try_get::<i64>("", "split_published")?,
                        row.try_get::<f64>("", "secs")?,
                    );
                }
                if started.elapsed() > Duration::from_secs(1200) {
                    bail!("split did not finish");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            let split_rate = published as f64 / split_secs;
            let (producer_rss, _) = proc_usage(d.producer.lock().await.pid);
            d.stop().await?;
            db.close().await?;
            let plain = plain_publish_loop(published, 2000).await?;
            r.row(
            "c. split: messages/s (published and confirmed)",
            format!("{split_rate:.0} msg/s"),
            format!("{published} messages in {split_secs:.1} s; {:.0} % of the plain loop (target ≥ 70 %)", 100.0 * split_rate / plain),
        );
            r.row(
                "c. plain lapin publish loop with confirms, same messages",
                format!("{plain:.0} msg/s"),
                "window 2000, quorum queue".into(),
            );
            r.row(
                "c. producer peak RSS",
                format!("{:.0} MB", producer_rss as f64 / 1024.0),
                "target < 150 MB".into(),
            );
        }

        // c. the set-based limit on the same Individuals: how much of the growth in the
        // per-record cost from N to BIG the data's size alone explains.
        {
            let db = clone_db("bulkops_bench_big", "bulkops_bench_run").await?;
            let meter = Meter::start(Vec::new(), Vec::new());
            let (secs, created) = limit_create(&db, big_agency, big_type, "{}").await?;
            let usage = meter.stop().await;
            r.row(
                &format!("c. set-based limit on the same {} Individuals", a.big),
                format!("{:.0} rec/s", created as f64 / secs),
                format!("{created} created in {secs:.1} s"),
            );
            costs.push((
                format!("set-based limit, {created} created (c)"),
                per_thousand(&[usage], created),
            ));
            db.close().await?;
        }

        // c'. the same request end to end with two workers; d. fairness under it.
        {
            let db = clone_db("bulkops_bench_big", "bulkops_bench_run").await?;
            let d = deploy("bulkops_bench_run", 2, &a.env, "big").await?;
            let meter = d.meter().await;
            let started = Instant::now();
            let reply = d
                .api
                .post(
                    "/v1/bulk/sales-records",
                    &token(big_admin, big_agency),
                    &json!({"filter": {}, "record_type_id": big_type}),
                )
                .await?;
            let to_202 = started.elapsed().as_secs_f64();
            if reply.status != reqwest::StatusCode::ACCEPTED {
                bail!("big request answered {}: {}", reply.status, reply.text);
            }
            let big = reply.json["batch_id"].as_i64().context("batch id")?;
            // Let the big batch get going.
            loop {
                let row = db
                    .query_one_raw(stmt(
                        "SELECT n_created AS n FROM bulk_batches WHERE id = $1",
                        [big.into()],
                    ))
                    .await?
                    .context("batch")?;
                if row.try_get::<i64>("", "n")? >= 20_000 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let t = token(small_admin, small_agency);
            let mut conv = Vec::new();
            for id in leads.iter().take(20) {
                let started = Instant::now();
                let b = d.api.convert(&t, &[*id]).await?;
                wait_batch(&db, b, "n_converted").await?;
                conv.push(started.elapsed().as_secs_f64());
            }
            let mut small = Vec::new();
            for k in 1..=20 {
                let started = Instant::now();
                let b = d
                .api
                .bulk_create(&t, &json!({"filter": {"individual": {"county": [format!("County-{k}")]}}, "record_type_id": small_type}))
                .await?;
                wait_batch(&db, b, "n_created").await?;
                small.push(started.elapsed().as_secs_f64());
            }
            let progress = db
                .query_one_raw(stmt(
                    "SELECT n_created AS n FROM bulk_batches WHERE id = $1",
                    [big.into()],
                ))
                .await?
                .context("batch")?
                .try_get::<i64>("", "n")?;
            let (_, created) = wait_batch(&db, big, "n_created").await?;
            let secs = started.elapsed().as_secs_f64();
            let usage = meter.stop().await;
            r.row(
                &format!(
                    "c. {}-Individual bulk create end to end, 2 workers, request → completed",
                    a.big
                ),
                format!("{:.0} rec/s", created as f64 / secs),
                format!(
                    "{created} created in {secs:.1} s; 202 after {to_202:.2} s; peak memory: {}",
                    Group::ALL
                        .iter()
                        .map(|g| format!("{} {:.0} MB", g.label(), usage.peak_of(*g)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            big_usage = Some((usage, created));
            r.row(
                "d. single conversion of another agency, under the big batch",
                format!("p50 {:.2} s", percentile(conv.clone(), 0.5)),
                format!("p95 {:.2} s (target < 2 s)", percentile(conv, 0.95)),
            );
            r.row(
                "d. 10-Individual bulk create of another agency, under it",
                format!("p50 {:.2} s", percentile(small.clone(), 0.5)),
                format!(
                    "p95 {:.2} s (target < 5 s); the big batch had created {progress} meanwhile",
                    percentile(small, 0.95)
                ),
            );
            let (rss, _) = d.workers_usage().await;
            worker_rss = worker_rss.max(rss);
            d.stop().await?;
            db.close().await?;
        }
        drop_db("bulkops_bench_run").await?;
        drop_db("bulkops_bench_big").await?;
    }
    drop_db("bulkops_bench_create").await?;

    // e. worker resources
    r.row(
        "e. worker peak RSS (any run)",
        format!("{:.0} MB", worker_rss as f64 / 1024.0),
        "target < 100 MB".into(),
    );
    r.row(
        "e. worker CPU seconds per 1,000 records (bulk create, 2 workers)",
        format!("{:.2} s", median(worker_cpu_per_k)),
        "sum over both workers".into(),
    );

    // The cost table.
    if let Some((usage, created)) = big_usage {
        costs.push((
            format!("{created} created, 2 workers (c)"),
            per_thousand(&[usage], created),
        ));
    }
    let cost_md = cost_table(&costs);
    println!("\nCPU seconds per 1,000 records created (bulk create of part a):\n\n{cost_md}");

    // The report.
    let out = workspace_root().join(&a.out);
    let stamp = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC");
    let variant = if a.env.is_empty() {
        String::new()
    } else {
        format!(
            ", with {}",
            a.env
                .iter()
                .map(|(k, v)| format!("`{k}={v}`"))
                .collect::<Vec<_>>()
                .join(" ")
        )
    };
    let body = format!(
        "Measured {stamp} on this 2-core machine with `make bench` (N={}, BIG={}, {} runs each, medians{variant}):\n\n{}\n\
         CPU seconds per 1,000 records created, per process (`utime + stime` from `/proc`, medians of the runs; \
         PostgreSQL is the sum over all its processes, so on a shared machine it includes other work):\n\n{cost_md}",
        a.individuals,
        a.big,
        a.runs,
        table(&r.rows)
    );
    write_section(&out, "bench", &body)?;
    println!("\nwrote {}", out.display());
    Ok(())
}

/// Each group's CPU seconds per 1,000 records: the median over the runs.
fn per_thousand(runs: &[Usage], records: i64) -> [f64; 5] {
    let k = (records.max(1)) as f64 / 1000.0;
    let mut out = [0.0; 5];
    for (i, g) in Group::ALL.iter().enumerate() {
        out[i] = median(runs.iter().map(|u| u.cpu_of(*g) / k).collect());
    }
    out
}

/// The cost table: a row per process, a column per measurement, then the totals and each
/// total as a ratio to the set-based limit's (the first column).
fn cost_table(costs: &[(String, [f64; 5])]) -> String {
    let mut t = String::new();
    let _ = write!(t, "| process |");
    for (name, _) in costs {
        let _ = write!(t, " {name} |");
    }
    let _ = write!(t, "\n|---|");
    for _ in costs {
        let _ = write!(t, "---:|");
    }
    t.push('\n');
    for (i, g) in Group::ALL.iter().enumerate() {
        let _ = write!(t, "| {} |", g.label());
        for (_, c) in costs {
            let _ = write!(t, " {:.3} |", c[i]);
        }
        t.push('\n');
    }
    let totals: Vec<f64> = costs.iter().map(|(_, c)| c.iter().sum()).collect();
    let _ = write!(t, "| **total** |");
    for v in &totals {
        let _ = write!(t, " **{v:.3}** |");
    }
    let _ = write!(t, "\n| total / the limit's |");
    for v in &totals {
        let _ = write!(
            t,
            " {:.1}× |",
            v / totals.first().copied().unwrap_or(f64::NAN)
        );
    }
    t.push('\n');
    t
}
