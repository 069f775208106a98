//! One test per fault kind.

use std::time::Duration;

use bulkops_tests::TestEnv;
use bulkops_tests::env::{Endpoints, amqp_url, queue_info};
use bulkops_tests::proxy::FaultProxy;
use bulkops_tests::services::{PgInstance, RabbitInstance, RedisInstance, Stop};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::{
    assert_mid_batch, bulk_create_all, convert_world, create_world, finish_convert, finish_create,
    keep_splitting, mid_batch, record, runs, start_processes, wait_done, worker_api,
};

const CREATE_ITEMS: i64 = 3000;
const CONVERT_ITEMS: i64 = 2000;

/// Small chunks and short lock lifetimes make every fault land mid-work.
async fn tune(env: &TestEnv) {
    env.set("BULKOPS__WORKER__CHUNK_SIZE", 50).await;
}

/// A create world, the producer and `workers` workers, and a bulk create of every
/// Individual; returns the batch.
async fn start_create(env: &TestEnv, workers: usize) -> i64 {
    let w = create_world(env, CREATE_ITEMS).await;
    tune(env).await;
    let api = env.start(workers).await.expect("start");
    bulk_create_all(&api, &w).await
}

fn amqp_via(proxy: &FaultProxy) -> String {
    format!("amqp://guest:guest@{}/%2f", proxy.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connections_cut() {
    for _ in 0..runs() {
        let proxy = FaultProxy::start("127.0.0.1:5672").await.expect("proxy");
        let env = TestEnv::with(
            "f_amqp_cut",
            Endpoints {
                amqp: amqp_via(&proxy),
                ..Endpoints::default()
            },
        )
        .await
        .expect("env");
        let batch = start_create(&env, 3).await;
        for k in 1..=3 {
            mid_batch(&env, batch, CREATE_ITEMS * k / 4).await;
            proxy.cut().await;
        }
        record(
            "broker connections cut (proxy), 3 times",
            finish_create(&env, batch).await,
        );
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_traffic_stalled() {
    for _ in 0..runs() {
        let proxy = FaultProxy::start("127.0.0.1:5672").await.expect("proxy");
        let env = TestEnv::with(
            "f_amqp_stall",
            Endpoints {
                amqp: amqp_via(&proxy),
                ..Endpoints::default()
            },
        )
        .await
        .expect("env");
        let batch = start_create(&env, 3).await;
        mid_batch(&env, batch, CREATE_ITEMS / 3).await;
        // Longer than two heartbeats: both sides give the connections up.
        proxy.set_stalled(true);
        tokio::time::sleep(Duration::from_secs(25)).await;
        proxy.set_stalled(false);
        record(
            "broker traffic stalled 25 s (proxy)",
            finish_create(&env, batch).await,
        );
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connections_dropped_mid_frame() {
    for _ in 0..runs() {
        let proxy = FaultProxy::start("127.0.0.1:5672").await.expect("proxy");
        let env = TestEnv::with(
            "f_amqp_frame",
            Endpoints {
                amqp: amqp_via(&proxy),
                ..Endpoints::default()
            },
        )
        .await
        .expect("env");
        let batch = start_create(&env, 3).await;
        for (k, bytes) in [(1, 37_u64), (2, 1500), (3, 9)] {
            mid_batch(&env, batch, CREATE_ITEMS * k / 4).await;
            proxy.cut_after_bytes(bytes);
        }
        record(
            "broker connections dropped mid-frame (proxy)",
            finish_create(&env, batch).await,
        );
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_connections_cut_during_conversions() {
    for _ in 0..runs() {
        let proxy = FaultProxy::start("127.0.0.1:5432").await.expect("proxy");
        let env = TestEnv::with(
            "f_pg_cut",
            Endpoints {
                pg: format!("postgres://postgres@{}", proxy.addr),
                ..Endpoints::default()
            },
        )
        .await
        .expect("env");
        let world = convert_world(&env, CONVERT_ITEMS).await;
        env.set("BULKOPS__WORKER__CHUNK_SIZE", 25).await;
        let api = env.start(3).await.expect("start");
        let batch = world.convert_all(&api).await;
        let total = world.total();
        for k in 1..=3 {
            mid_batch(&env, batch, total * k / 4).await;
            proxy.cut().await;
        }
        record(
            "database connections cut (proxy), 3 times",
            finish_convert(&env, batch, &world.before).await,
        );
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_stalled_and_dropped_mid_frame() {
    for _ in 0..runs() {
        let proxy = FaultProxy::start("127.0.0.1:5432").await.expect("proxy");
        let env = TestEnv::with(
            "f_pg_stall",
            Endpoints {
                pg: format!("postgres://postgres@{}", proxy.addr),
                ..Endpoints::default()
            },
        )
        .await
        .expect("env");
        let world = convert_world(&env, CONVERT_ITEMS).await;
        env.set("BULKOPS__WORKER__CHUNK_SIZE", 25).await;
        let api = env.start(3).await.expect("start");
        let batch = world.convert_all(&api).await;
        let total = world.total();
        mid_batch(&env, batch, total / 3).await;
        proxy.set_stalled(true);
        tokio::time::sleep(Duration::from_secs(8)).await;
        proxy.set_stalled(false);
        mid_batch(&env, batch, total * 2 / 3).await;
        proxy.cut_after_bytes(200);
        record(
            "database stalled 8 s, then dropped mid-message (proxy)",
            finish_convert(&env, batch, &world.before).await,
        );
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_and_cut() {
    for _ in 0..runs() {
        let proxy = FaultProxy::start("127.0.0.1:6379").await.expect("proxy");
        let env = TestEnv::with(
            "f_redis",
            Endpoints {
                redis: format!("redis://{}", proxy.addr),
                ..Endpoints::default()
            },
        )
        .await
        .expect("env");
        let w = create_world(&env, CREATE_ITEMS).await;
        tune(&env).await;
        let (api, probes) = start_processes(&env, 3).await;
        let batch = bulk_create_all(&api, &w).await;
        mid_batch(&env, batch, CREATE_ITEMS / 4).await;
        proxy.set_down(true).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        // /readyz says 503 while Redis is down, on the producer and every worker…
        for probe in &probes {
            let r = probe
                .send(reqwest::Method::GET, "/readyz", None, None, &[])
                .await
                .expect("readyz");
            assert_eq!(
                r.status,
                reqwest::StatusCode::SERVICE_UNAVAILABLE,
                "{}: {}",
                probe.base,
                r.text
            );
            assert_eq!(r.json["redis"], false);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        proxy.set_down(false).await;
        // …and 200 again once it is back.
        for probe in &probes {
            let started = std::time::Instant::now();
            loop {
                let r = probe
                    .send(reqwest::Method::GET, "/readyz", None, None, &[])
                    .await
                    .expect("readyz");
                if r.status == reqwest::StatusCode::OK {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "{} stays unready: {}",
                    probe.base,
                    r.text
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        mid_batch(&env, batch, CREATE_ITEMS / 2).await;
        proxy.cut().await;
        record(
            "redis down 6 s, then connections cut (proxy)",
            finish_create(&env, batch).await,
        );
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_at_random_moments() {
    for run in 0..runs() {
        let env = TestEnv::new("f_kill").await.expect("env");
        let world = convert_world(&env, CONVERT_ITEMS).await;
        env.set("BULKOPS__WORKER__CHUNK_SIZE", 25).await;
        let (_, api) = env.start_producer().await.expect("producer");
        let mut workers = [
            env.start_worker().await.expect("w"),
            env.start_worker().await.expect("w"),
        ];
        let batch = world.convert_all(&api).await;
        let total = world.total();
        // Pseudo-random but reproducible moments and victims.
        let mut seed = 0x9e37_79b9_u64 + run as u64;
        for k in 1..=5 {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let jitter = i64::try_from(seed % 50).unwrap_or(0);
            wait_done(&env, batch, total * k / 7 + jitter).await;
            let victim = usize::try_from(seed >> 33).unwrap_or(0) % workers.len();
            assert_mid_batch(&env, batch).await;
            workers[victim].lock().await.signal("KILL").expect("kill");
            workers[victim] = env.start_worker().await.expect("replacement");
        }
        record(
            "worker SIGKILL at random moments, 5 times",
            finish_convert(&env, batch, &world.before).await,
        );
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_killed_while_splitting() {
    for _ in 0..runs() {
        let env = TestEnv::new("f_producer").await.expect("env");
        let w = create_world(&env, CREATE_ITEMS).await;
        tune(&env).await;
        // A small queue window keeps the split going for the whole batch.
        keep_splitting(&env, 200).await;
        let (producer, api) = env.start_producer().await.expect("producer");
        env.start_worker().await.expect("w");
        env.start_worker().await.expect("w");
        let batch = bulk_create_all(&api, &w).await;
        wait_done(&env, batch, CREATE_ITEMS / 3).await;
        let published = env
            .count(&format!(
                "SELECT split_published FROM bulk_batches WHERE id = {batch}"
            ))
            .await;
        assert!(
            published < CREATE_ITEMS,
            "the split is still under way when the producer dies"
        );
        assert_mid_batch(&env, batch).await;
        producer.lock().await.signal("KILL").expect("kill");
        // Its lease expires; a new producer resumes the split.
        env.start_producer().await.expect("producer");
        record(
            "producer SIGKILL while splitting",
            finish_create(&env, batch).await,
        );
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_rabbitmq_restarted() {
    for _ in 0..runs() {
        let mut rabbit = RabbitInstance::start().await.expect("rabbitmq");
        let env = TestEnv::with(
            "f_rabbit",
            Endpoints {
                amqp: rabbit.url(),
                amqp_direct: rabbit.url(),
                ..Endpoints::default()
            },
        )
        .await
        .expect("env");
        let batch = start_create(&env, 2).await;
        mid_batch(&env, batch, CREATE_ITEMS / 3).await;
        rabbit
            .restart(Stop::Crash, Duration::from_secs(2))
            .await
            .expect("restart");
        record(
            "RabbitMQ instance crashed and restarted",
            finish_create(&env, batch).await,
        );
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_redis_restarted() {
    for _ in 0..runs() {
        let mut redis = RedisInstance::start().await.expect("redis");
        let env = TestEnv::with(
            "f_redis_restart",
            Endpoints {
                redis: redis.url(),
                ..Endpoints::default()
            },
        )
        .await
        .expect("env");
        let batch = start_create(&env, 3).await;
        mid_batch(&env, batch, CREATE_ITEMS / 3).await;
        redis
            .restart(Stop::Crash, Duration::from_secs(3))
            .await
            .expect("restart");
        record(
            "Redis instance crashed and restarted (locks lost)",
            finish_create(&env, batch).await,
        );
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_postgres_restarted() {
    for _ in 0..runs() {
        let mut pg = PgInstance::start().await.expect("postgres");
        let env = TestEnv::with(
            "f_pg_restart",
            Endpoints {
                pg: pg.server_url(),
                pg_direct: pg.server_url(),
                ..Endpoints::default()
            },
        )
        .await
        .expect("env");
        let world = convert_world(&env, CONVERT_ITEMS).await;
        env.set("BULKOPS__WORKER__CHUNK_SIZE", 25).await;
        let (_, api) = env.start_producer().await.expect("producer");
        let worker = env.start_worker().await.expect("worker");
        env.start_worker().await.expect("worker");
        env.start_worker().await.expect("worker");
        let worker_api = worker_api(&worker).await;
        let batch = world.convert_all(&api).await;
        let total = world.total();
        mid_batch(&env, batch, total / 3).await;
        pg.stop(Stop::Crash).await;
        // /readyz says 503 while the database is down.
        for probe in [&api, &worker_api] {
            let r = probe
                .send(reqwest::Method::GET, "/readyz", None, None, &[])
                .await
                .expect("readyz");
            assert_eq!(
                r.status,
                reqwest::StatusCode::SERVICE_UNAVAILABLE,
                "{}",
                r.text
            );
            assert_eq!(r.json["database"], false);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        pg.resume().await.expect("restart");
        record(
            "PostgreSQL instance crashed and restarted",
            finish_convert(&env, batch, &world.before).await,
        );
        env.finish().await;
    }
}

async fn publish_raw(env: &TestEnv, queue: &str, bodies: &[Vec<u8>]) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    queue_info(&ch, queue).await.expect("queue exists");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    for body in bodies {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmed");
    }
    let _ = conn.close(200, "done".into()).await;
    let _ = env;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_deliveries() {
    for _ in 0..runs() {
        let env = TestEnv::new("f_dup").await.expect("env");
        let batch = start_create(&env, 3).await;
        wait_done(&env, batch, CREATE_ITEMS / 5).await;
        // A second copy of every item's message, done or not, while the batch runs.
        let items = bulkops_tests::fixture::rows(
            &env.db,
            "SELECT jsonb_build_array(seq, target_id) AS j FROM bulk_items WHERE batch_id = $1 ORDER BY seq",
            vec![batch.into()],
        )
        .await;
        let bodies: Vec<Vec<u8>> = items
            .iter()
            .map(|i| {
                bulkops_shared::messages::WorkMessage::new(
                    bulkops_shared::messages::Op::CreateSalesRecord,
                    bulkops_shared::ids::BatchId(batch),
                    i[0].as_i64().unwrap_or(0),
                    i[1].as_i64().unwrap_or(0),
                )
                .encode()
            })
            .collect();
        assert_mid_batch(&env, batch).await;
        publish_raw(&env, &format!("{}.work.bulk", env.amqp_prefix), &bodies).await;
        record(
            "every message delivered twice",
            finish_create(&env, batch).await,
        );
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_paused_past_its_lock_ttl() {
    for _ in 0..runs() {
        let env = TestEnv::new("f_sigstop").await.expect("env");
        let world = convert_world(&env, CONVERT_ITEMS).await;
        env.set("BULKOPS__WORKER__CHUNK_SIZE", 25).await;
        let (_, api) = env.start_producer().await.expect("producer");
        let paused = env.start_worker().await.expect("w");
        env.start_worker().await.expect("w");
        let batch = world.convert_all(&api).await;
        let total = world.total();
        mid_batch(&env, batch, total / 4).await;
        paused.lock().await.signal("STOP").expect("stop");
        // The lock TTL is 3 s; two missed heartbeats (~20 s) make the broker hand its
        // messages to the other worker.
        tokio::time::sleep(Duration::from_secs(25)).await;
        paused.lock().await.signal("CONT").expect("cont");
        record(
            "worker SIGSTOP past lock TTL, then SIGCONT",
            finish_convert(&env, batch, &world.before).await,
        );
        env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_poison_messages() {
    for _ in 0..runs() {
        let env = TestEnv::new("f_garbage").await.expect("env");
        let batch = start_create(&env, 2).await;
        wait_done(&env, batch, CREATE_ITEMS / 4).await;
        let mut garbage: Vec<Vec<u8>> = Vec::new();
        for n in 0..10 {
            garbage.push(format!("not json {n}").into_bytes());
        }
        for n in 0..5 {
            garbage.push(format!(r#"{{"v":9,"op":"create_sales_record","batch_id":{batch},"seq":{n},"target_id":1}}"#).into_bytes());
        }
        for n in 1..=5 {
            garbage.push(format!(r#"{{"v":1,"op":"create_sales_record","batch_id":987654,"seq":{n},"target_id":1}}"#).into_bytes());
        }
        assert_mid_batch(&env, batch).await;
        publish_raw(&env, &format!("{}.work.bulk", env.amqp_prefix), &garbage).await;
        let tally = finish_create(&env, batch).await;
        // Every piece of garbage reached the dead-letter queue; no worker died of it.
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("amqp");
        let ch = conn.create_channel().await.expect("channel");
        let started = std::time::Instant::now();
        let mut dead = 0;
        while started.elapsed() < Duration::from_secs(30) {
            let q = queue_info(&ch, &format!("{}.dead", env.amqp_prefix))
                .await
                .expect("dead queue");
            dead = q.message_count();
            if dead >= 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            dead, 20,
            "every malformed or poison message is dead-lettered"
        );
        let logs = env.logs().await;
        assert!(!logs.contains("panicked"), "a worker panicked");
        record("malformed and poison messages injected", tally);
        env.finish().await;
    }
}
