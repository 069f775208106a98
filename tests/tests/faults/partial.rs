//! Partial failures: dependencies that answer but refuse, work that keeps timing out,
//! backends terminated under the workers. Unlike a clean cut, the dependency's probe
//! (`PING`, `SELECT 1`) still succeeds, so nothing may wait for it to "come back": every
//! retry pauses and counts, and the batch completes or its items fail visibly.

use std::time::{Duration, Instant};

use bulkops_tests::TestEnv;
use bulkops_tests::api::{Api, metric_sum};
use bulkops_tests::env::{Endpoints, queued_messages};
use bulkops_tests::fixture::World;
use bulkops_tests::proxy::FaultProxy;
use bulkops_tests::services::RedisInstance;
use sea_orm::{ConnectionTrait, TransactionTrait};
use serde_json::json;

use crate::{bulk_create_all, completed_within, create_world, record, runs, wait_done, worker_api};

const ITEMS: i64 = 3000;

/// Longest a batch of these scenarios may take (a hang guard, not a speed assertion;
/// `PARTIAL_BOUND_SECS` overrides it, e.g. to see the old code fail sooner).
fn bound() -> Duration {
    Duration::from_secs(
        std::env::var("PARTIAL_BOUND_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(240),
    )
}

/// Starts a producer and `n` workers; returns the API and each worker's metrics endpoint
/// and log file.
async fn start(env: &TestEnv, n: usize) -> (Api, Vec<(Api, std::path::PathBuf)>) {
    let (_, api) = env.start_producer().await.expect("producer");
    let mut workers = Vec::new();
    for _ in 0..n {
        let p = env.start_worker().await.expect("worker");
        let api = worker_api(&p).await;
        workers.push((api, p.lock().await.log.clone()));
    }
    (api, workers)
}

/// Lines a process has logged so far.
fn log_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// The sum of a metric over every worker.
async fn across(
    workers: &[(Api, std::path::PathBuf)],
    name: &str,
    filters: &[(&str, &str)],
) -> f64 {
    let mut sum = 0.0;
    for (api, _) in workers {
        sum += metric_sum(&api.metrics_text().await.unwrap_or_default(), name, filters);
    }
    sum
}

/// Appends a measured figure to `target/reliability/figures.jsonl` and prints it.
#[allow(
    clippy::print_stderr,
    reason = "the figures are what the run is for; cargo test shows them with --nocapture"
)]
fn figure(name: &str, value: serde_json::Value) {
    bulkops_tests::scenario::append_result(
        "figures.jsonl",
        &json!({"figure": name, "value": value}),
    );
    eprintln!("figure {name}: {value}");
}

/// The first Individual of the world that has no Sales Record yet.
async fn unlinked_individual(env: &TestEnv) -> i64 {
    env.count("SELECT min(i.id) FROM individuals i WHERE NOT EXISTS (SELECT 1 FROM sales_records sr WHERE sr.individual_id = i.id)")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refusing_lock_writes() {
    for _ in 0..runs() {
        let redis = RedisInstance::start().await.expect("redis");
        let env = TestEnv::with(
            "f_redis_oom",
            Endpoints {
                redis: redis.url(),
                ..Endpoints::default()
            },
        )
        .await
        .expect("env");
        let w = create_world(&env, ITEMS).await;
        env.set("BULKOPS__WORKER__CHUNK_SIZE", 50).await;
        // A Redis at maxmemory with noeviction: the lock script gets -OOM, PING answers.
        let refusal = redis.refuse_writes().await.expect("refuse writes");
        assert!(refusal.contains("OOM"), "{refusal}");
        let (api, workers) = start(&env, 2).await;
        let logs_before: Vec<usize> = workers.iter().map(|(_, l)| log_lines(l)).collect();
        redis.reset_stats().await.expect("reset stats");
        let started = Instant::now();
        let batch = bulk_create_all(&api, &w).await;
        assert!(
            completed_within(&env, batch, bound()).await,
            "the batch completes while Redis refuses lock writes"
        );
        let secs = started.elapsed().as_secs_f64();
        let scripts = redis
            .command_calls(&["evalsha", "eval"])
            .await
            .expect("commandstats");
        figure(
            "lock script calls under a refusing Redis",
            json!({"calls": scripts, "seconds": secs, "per_second": scripts as f64 / secs, "workers": 2, "items": ITEMS}),
        );
        // Bounded retries: the whole batch (60 chunks of 50) costs fewer script calls than
        // a lock round trip per chunk would, because refused locks are bypassed.
        assert!(scripts <= 200, "{scripts} lock script calls");
        // Bounded logs: a line per state change and a reminder, not a line per pass.
        for ((_, log), before) in workers.iter().zip(&logs_before) {
            let lines = log_lines(log) - before;
            figure("worker log lines under a refusing Redis", json!(lines));
            assert!(lines <= 40, "{lines} log lines from one worker");
        }
        // The workers say so: ready (they get work done), degraded, and counted.
        assert!(across(&workers, "bulkops_lock_bypassed_total", &[]).await >= 1.0);
        let mut degraded = 0;
        for (probe, _) in &workers {
            let r = probe
                .send(reqwest::Method::GET, "/readyz", None, None, &[])
                .await
                .expect("readyz");
            assert_eq!(r.status, reqwest::StatusCode::OK, "{}", r.text);
            assert_eq!(r.json["redis"], true, "{}", r.text);
            if r.json["degraded"]
                .as_array()
                .is_some_and(|d| d.iter().any(|x| x == "redis_locks_bypassed"))
            {
                degraded += 1;
            }
        }
        assert!(degraded >= 1, "a bypassing worker reports itself degraded");
        assert!(
            across(
                &workers,
                "bulkops_dependency_degraded",
                &[("dependency", "redis")]
            )
            .await
                >= 1.0
        );
        let tally = crate::finish_create(&env, batch).await;
        // Once Redis takes writes again, the workers go back to locking.
        redis.accept_writes().await.expect("accept writes");
        let started = Instant::now();
        while across(
            &workers,
            "bulkops_dependency_degraded",
            &[("dependency", "redis")],
        )
        .await
            > 0.0
        {
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "workers stay degraded after Redis recovered"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        record(
            "redis refuses lock writes (OOM, noeviction; PING answers)",
            tally,
        );
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_terminated_under_the_workers() {
    for _ in 0..runs() {
        let env = TestEnv::new("f_pg_terminated").await.expect("env");
        let w = create_world(&env, ITEMS).await;
        env.set("BULKOPS__WORKER__CHUNK_SIZE", 50).await;
        // One Individual whose insert always fails as a terminated backend does (57P01)
        // while the database answers every probe: the worst case of "the probe does not
        // explain the error".
        let doomed = unlinked_individual(&env).await;
        env.db
            .execute_unprepared(&format!(
                "CREATE FUNCTION t_terminated() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                   IF NEW.individual_id = {doomed} THEN
                     RAISE EXCEPTION 'terminating connection due to administrator command' USING ERRCODE = '57P01';
                   END IF;
                   RETURN NEW;
                 END $$;
                 CREATE TRIGGER t_terminated BEFORE INSERT ON sales_records
                   FOR EACH ROW EXECUTE FUNCTION t_terminated();"
            ))
            .await
            .expect("trigger");
        let (api, workers) = start(&env, 2).await;
        let logs_before: Vec<usize> = workers.iter().map(|(_, l)| log_lines(l)).collect();
        let batch = bulk_create_all(&api, &w).await;
        // And three times mid-batch, every bulkops backend of the database is terminated
        // for real (pg_terminate_backend).
        let mut terminated = 0;
        for k in 1..=3 {
            wait_done(&env, batch, ITEMS * k / 4).await;
            terminated += env
                .count(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                      WHERE datname = current_database() AND application_name = 'bulkops'
                        AND pid <> pg_backend_pid()) t",
                )
                .await;
        }
        assert!(terminated > 0, "backends were terminated");
        assert!(
            completed_within(&env, batch, bound()).await,
            "the batch completes"
        );
        let failed = bulkops_tests::fixture::rows(
            &env.db,
            "SELECT jsonb_build_array(target_id, reason) AS j FROM bulk_items WHERE batch_id = $1 AND status = 'failed'",
            vec![batch.into()],
        )
        .await;
        assert_eq!(
            failed,
            vec![json!([doomed, "retries_exhausted"])],
            "only the doomed item fails, visibly"
        );
        let seen = across(&workers, "bulkops_failures_total", &[("class", "db_57P01")]).await;
        figure("57P01 failures handled", json!(seen));
        // Bisection isolates the item (a handful of chunk failures), then each of its
        // worker.max_attempts (8) deliveries tries it worker.in_process_retries + 1 times;
        // the terminations add one failure per chunk in flight.
        assert!(
            (1.0..=80.0).contains(&seen),
            "{seen} 57P01 failures: counted and bounded"
        );
        for ((_, log), before) in workers.iter().zip(&logs_before) {
            let lines = log_lines(log) - before;
            assert!(lines <= 80, "{lines} log lines from one worker");
        }
        record(
            "backends terminated (pg_terminate_backend x3, one item failing 57P01 for ever)",
            crate::finish_create(&env, batch).await,
        );
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_that_keeps_timing_out() {
    for _ in 0..runs() {
        let env = TestEnv::new("f_chunk_timeout").await.expect("env");
        let w = create_world(&env, 600).await;
        env.set("BULKOPS__WORKER__CHUNK_SIZE", 50).await;
        env.set("BULKOPS__WORKER__CHUNK_TIMEOUT_MS", 1000).await;
        // Another session holds an uncommitted Sales Record for one Individual for the
        // whole run: every chunk that contains it waits on the unique index until the
        // worker's own chunk timeout (the statement timeout is a minute) gives up.
        let stuck = unlinked_individual(&env).await;
        let blocker = env.db.begin().await.expect("begin");
        blocker
            .execute_raw(bulkops_shared::db::stmt(
                "INSERT INTO sales_records (agency_id, record_type_id, individual_id) VALUES ($1, $2, $3)",
                [w.agency.into(), w.record_type.into(), stuck.into()],
            ))
            .await
            .expect("blocker");
        let (api, workers) = start(&env, 2).await;
        let logs_before: Vec<usize> = workers.iter().map(|(_, l)| log_lines(l)).collect();
        let batch = bulk_create_all(&api, &w).await;
        assert!(
            completed_within(&env, batch, bound()).await,
            "the batch completes"
        );
        let failed = bulkops_tests::fixture::rows(
            &env.db,
            "SELECT jsonb_build_array(target_id, reason) AS j FROM bulk_items WHERE batch_id = $1 AND status = 'failed'",
            vec![batch.into()],
        )
        .await;
        assert_eq!(
            failed,
            vec![json!([stuck, "retries_exhausted"])],
            "only the stuck item fails, visibly; its chunk neighbours are created"
        );
        // The chunk timeout is the transaction's statement timeout too: the server usually
        // ends the stuck statement itself (57014), the client-side timeout is its backstop.
        let seen = across(
            &workers,
            "bulkops_failures_total",
            &[("class", "chunk_timeout")],
        )
        .await
            + across(&workers, "bulkops_failures_total", &[("class", "db_57014")]).await;
        figure("chunk timeouts handled", json!(seen));
        assert!(
            (1.0..=60.0).contains(&seen),
            "{seen} chunk timeouts: counted and bounded"
        );
        for ((_, log), before) in workers.iter().zip(&logs_before) {
            let lines = log_lines(log) - before;
            assert!(lines <= 60, "{lines} log lines from one worker");
        }
        blocker.rollback().await.expect("rollback");
        record(
            "a chunk that keeps timing out (a row lock held for ever)",
            crate::finish_create(&env, batch).await,
        );
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_longer_than_three_stall_periods() {
    for _ in 0..runs() {
        let proxy = FaultProxy::start("127.0.0.1:6379").await.expect("proxy");
        let env = TestEnv::with(
            "f_stall_bound",
            Endpoints {
                redis: format!("redis://{}", proxy.addr),
                ..Endpoints::default()
            },
        )
        .await
        .expect("env");
        let w = create_world(&env, ITEMS).await;
        env.set("BULKOPS__WORKER__CHUNK_SIZE", 50).await;
        env.set("BULKOPS__SPLIT__STALL_AFTER_SECS", 2).await;
        // Workers hold their chunks for the whole outage instead of bypassing the locks:
        // the batch makes no progress, which is what the stall sweeper reacts to.
        env.set("BULKOPS__WORKER__LOCK_BYPASS_AFTER_MS", 600_000)
            .await;
        let (api, _) = start(&env, 2).await;
        let batch = bulk_create_all(&api, &w).await;
        wait_done(&env, batch, ITEMS / 4).await;
        proxy.set_down(true).await;
        let pending = env
            .count(&format!(
                "SELECT count(*) FROM bulk_items WHERE batch_id = {batch} AND status = 'pending'"
            ))
            .await;
        // Five stall periods of outage; the queues' depth (ready and held) is sampled.
        let started = Instant::now();
        let mut most = 0;
        while started.elapsed() < Duration::from_secs(10) {
            most = most.max(queued_messages(&env.amqp_prefix).await.expect("queues"));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        proxy.set_down(false).await;
        let tally = crate::finish_create(&env, batch).await;
        let resplits = env
            .try_count(&format!(
                "SELECT resplit_generation::bigint FROM bulk_batches WHERE id = {batch}"
            ))
            .await
            .unwrap_or(-1);
        figure(
            "queued messages during a Redis outage of five stall periods",
            json!({"most": most, "pending_at_outage": pending, "republish_generations": resplits}),
        );
        // The stated bound: one copy of each pending item, plus at most one republished copy.
        let bound = u64::try_from(2 * pending).unwrap_or(0);
        assert!(
            most <= bound,
            "{most} messages queued for {pending} pending items"
        );
        record(
            "redis down for five stall periods (queue depth bounded)",
            tally,
        );
        env.finish().await;
    }
}

/// Starts a producer with no worker, bulk-creates for every Individual of `w`, waits until
/// the whole batch is split into the queues, then purges `{prefix}.work.bulk` (shard 1):
/// its messages are lost. Returns the producer's API and the batch.
async fn split_then_purge_shard_1(env: &TestEnv, w: &World) -> (Api, i64) {
    use lapin::options::QueuePurgeOptions;
    let (_, api) = env.start_producer().await.expect("producer");
    let batch = bulk_create_all(&api, w).await;
    let started = Instant::now();
    while env
        .count(&format!(
            "SELECT count(*) FROM bulk_batches WHERE id = {batch} AND split_done_at IS NOT NULL"
        ))
        .await
        == 0
    {
        assert!(started.elapsed() < bound(), "the split finishes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let conn = lapin::Connection::connect(
        &bulkops_tests::env::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    let purged = ch
        .queue_purge(
            format!("{}.work.bulk", env.amqp_prefix).as_str().into(),
            QueuePurgeOptions::default(),
        )
        .await
        .expect("purge");
    assert!(purged > 0, "messages were lost");
    let _ = conn.close(200, "done".into()).await;
    (api, batch)
}

/// Starts two workers and checks that the stall sweeper brings `batch` to completion with
/// exactly one republished generation; records the history as `what`.
async fn workers_finish_in_one_generation(env: &TestEnv, batch: i64, what: &str) {
    for _ in 0..2 {
        env.start_worker().await.expect("worker");
    }
    assert!(
        completed_within(env, batch, bound()).await,
        "the sweeper republishes what was lost"
    );
    let generations = env
        .count(&format!(
            "SELECT resplit_generation::bigint FROM bulk_batches WHERE id = {batch}"
        ))
        .await;
    assert_eq!(generations, 1, "one republished generation was enough");
    record(what, crate::finish_create(env, batch).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_messages_are_republished_once() {
    for _ in 0..runs() {
        let env = TestEnv::new("f_purged").await.expect("env");
        let w = create_world(&env, ITEMS).await;
        env.set("BULKOPS__SPLIT__STALL_AFTER_SECS", 2).await;
        // No worker yet: the whole batch is split into the queue, then lost to a purge.
        let (_api, batch) = split_then_purge_shard_1(&env, &w).await;
        workers_finish_in_one_generation(
            &env,
            batch,
            "work queue purged (messages lost), republished by the stall sweeper",
        )
        .await;
        env.finish().await;
    }
}

/// With the bulk lane sharded (`amqp.bulk_queues = 3`), one shard purged while the other
/// two still hold their messages: the stall sweeper must see those (every shard counts as
/// queued) and hold, not republish the whole batch on top of them; once the workers have
/// drained the shards, one generation republishes what the purge lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_shard_is_republished_once_the_others_drain() {
    for _ in 0..runs() {
        let env = TestEnv::new("f_purged_shard").await.expect("env");
        let w = create_world(&env, ITEMS).await;
        env.set("BULKOPS__SPLIT__STALL_AFTER_SECS", 2).await;
        env.set("BULKOPS__AMQP__BULK_QUEUES", 3).await;
        let (api, batch) = split_then_purge_shard_1(&env, &w).await;
        // The sweeper looks at the stalled batch and holds it: shards 2 and 3 still hold
        // two thirds of its messages.
        let started = Instant::now();
        loop {
            let text = api.metrics_text().await.expect("metrics");
            if metric_sum(
                &text,
                "bulkops_split_stalled_batches",
                &[("state", "held_queued")],
            ) >= 1.0
            {
                break;
            }
            assert!(
                started.elapsed() < bound(),
                "the sweeper holds the batch while shards hold its messages"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            env.count(&format!(
                "SELECT resplit_generation::bigint FROM bulk_batches WHERE id = {batch}"
            ))
            .await,
            0,
            "nothing republished while the other shards hold the batch's messages"
        );
        workers_finish_in_one_generation(
            &env,
            batch,
            "one of three bulk shards purged, republished by the stall sweeper",
        )
        .await;
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_connections_gone_half_open() {
    for _ in 0..runs() {
        let proxy = FaultProxy::start("127.0.0.1:5432").await.expect("proxy");
        let env = TestEnv::with(
            "f_pg_half_open",
            Endpoints {
                pg: format!("postgres://postgres@{}", proxy.addr),
                ..Endpoints::default()
            },
        )
        .await
        .expect("env");
        let w = create_world(&env, ITEMS).await;
        env.set("BULKOPS__WORKER__CHUNK_SIZE", 50).await;
        env.set("BULKOPS__DATABASE__CALL_TIMEOUT_MS", 3000).await;
        env.set("BULKOPS__WORKER__CHUNK_TIMEOUT_MS", 5000).await;
        // The last item is dead-lettered (its insert always fails permanently), so that the
        // dead-letter watcher must record an outcome after its connection went silent.
        let doomed = env
            .count("SELECT max(i.id) FROM individuals i WHERE NOT EXISTS (SELECT 1 FROM sales_records sr WHERE sr.individual_id = i.id)")
            .await;
        env.db
            .execute_unprepared(&format!(
                "CREATE FUNCTION t_doomed() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                   IF NEW.individual_id = {doomed} THEN RAISE EXCEPTION 'refused' USING ERRCODE = '23514'; END IF;
                   RETURN NEW;
                 END $$;
                 CREATE TRIGGER t_doomed BEFORE INSERT ON sales_records
                   FOR EACH ROW EXECUTE FUNCTION t_doomed();"
            ))
            .await
            .expect("trigger");
        let (api, _) = start(&env, 2).await;
        let batch = bulk_create_all(&api, &w).await;
        wait_done(&env, batch, ITEMS / 3).await;
        // Every database connection open now goes silent for good (no byte, no FIN), as
        // after a NAT or firewall dropped them; the database itself is fine and new
        // connections work. Each process must give its stuck calls up and carry on.
        proxy.stall_existing();
        assert!(
            completed_within(&env, batch, bound()).await,
            "the batch completes on fresh connections"
        );
        let failed = bulkops_tests::fixture::rows(
            &env.db,
            "SELECT to_jsonb(target_id) AS j FROM bulk_items WHERE batch_id = $1 AND status = 'failed'",
            vec![batch.into()],
        )
        .await;
        assert_eq!(
            failed,
            vec![json!(doomed)],
            "the dead letter got its outcome"
        );
        record(
            "database connections gone half-open mid-batch (proxy: silent, new ones pass)",
            crate::finish_create(&env, batch).await,
        );
        env.finish().await;
    }
}
