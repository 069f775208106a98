//! The processor tier: the worker's whole chunk pipeline (`Processor::process`) run inside
//! the test, built by `Processor::new` from the test's configuration as a worker builds
//! it, over real deliveries: WorkMessages published to the test's own work queue and
//! consumed with lapin, against real PostgreSQL, Redis and RabbitMQ, with no worker
//! process. One chunk mixes two batches (a bulk create and a conversion), a duplicate
//! delivery, a message for a batch that does not exist, a malformed one and an item whose
//! Redis lock another holder has. It checks what the pipeline promises: every item is
//! decided once, in one transaction with its batch's counters and events; the contended
//! item is left alone and comes back through a retry queue with its attempt counted; the
//! unknown and malformed messages go to the dead-letter queue; every delivery is settled
//! (nothing is back in a queue once the channel closes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkops_shared::amqp::{AmqpLink, Outgoing, json_properties};
use bulkops_shared::batch::{BatchKind, Lane};
use bulkops_shared::config::{DatabaseSettings, Settings, Sources};
use bulkops_shared::ids::BatchId;
use bulkops_shared::lock::{LockTarget, Locks};
use bulkops_shared::messages::{Op, WorkMessage};
use bulkops_shared::metrics::WorkerMetrics;
use bulkops_tests::TestEnv;
use bulkops_tests::env::queue_info;
use bulkops_tests::fixture::rows;
use bulkops_tests::scenario::create_world;
use bulkops_worker::acks::AckTracker;
use bulkops_worker::process::{Connections, Processor};
use futures_util::StreamExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use crate::interleave::batch;

/// Longest wait for a delivery or a dead letter (only keeps a broken run from hanging).
const WAIT: Duration = Duration::from_secs(30);

/// The next `n` deliveries of `consumer`, each recorded with `tracker` as the worker's
/// consumer does before it hands a chunk to the processor.
async fn take(consumer: &mut lapin::Consumer, tracker: &AckTracker, n: usize) -> Vec<Delivery> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let d = tokio::time::timeout(WAIT, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} deliveries arrived", out.len()))
            .expect("consumer ended")
            .expect("delivery");
        tracker.received(d.delivery_tag).await;
        out.push(d);
    }
    out
}

/// Ready messages in `queue` (a passive declare: what no consumer holds).
async fn ready(channel: &Channel, queue: &str) -> u32 {
    queue_info(channel, queue)
        .await
        .unwrap_or_else(|e| panic!("{queue}: {e}"))
        .message_count()
}

/// The ids a query of one jsonb column `j` returns for the agency `$1`.
async fn ids(env: &TestEnv, sql: &str, agency: i64) -> Vec<i64> {
    rows(&env.db, sql, vec![agency.into()])
        .await
        .iter()
        .filter_map(serde_json::Value::as_i64)
        .collect()
}

/// The targets of a batch's items with `status`.
async fn targets_with(env: &TestEnv, batch: BatchId, status: &str) -> Vec<i64> {
    rows(
        &env.db,
        "SELECT to_jsonb(target_id) AS j FROM bulk_items WHERE batch_id = $1 AND status = $2 ORDER BY seq",
        vec![batch.0.into(), status.into()],
    )
    .await
    .iter()
    .filter_map(serde_json::Value::as_i64)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_of_real_deliveries_is_decided_once_settled_and_routed() {
    let env = crate::env("processor").await;
    // The configuration a worker process of this test gets (its database, prefixes, short
    // retry tiers), read the way the worker reads its own.
    let settings = Settings::load_from(&Sources {
        env: env.process_env().await.into_iter().collect(),
        ..Sources::default()
    })
    .expect("settings");
    let db = bulkops_shared::db::connect(&settings.database)
        .await
        .expect("database");
    let control = bulkops_shared::db::connect(&DatabaseSettings {
        max_connections: 1,
        min_connections: 0,
        ..settings.database.clone()
    })
    .await
    .expect("control connection");
    let locks = Locks::connect(&settings.redis).expect("redis");
    let link = Arc::new(AmqpLink::new(&settings.amqp, "processor-test").expect("amqp"));
    let metrics = WorkerMetrics::new().expect("metrics");
    let processor = Arc::new(Processor::new(
        &settings,
        Connections {
            db,
            control,
            locks: locks.clone(),
            publish: link.clone(),
        },
        metrics.clone(),
        CancellationToken::new(),
    ));
    let topology = processor.topology.clone();
    let channel = link.channel().await.expect("channel");
    topology
        .declare(&channel)
        .await
        .expect("declare the topology");
    let work_queue = topology.work_queue(Lane::Bulk);

    // 36 Individuals without a Sales Record to create one for, and the 4 Sales Records of
    // the others to convert (they merge into their Individuals).
    let w = create_world(&env, 40).await;
    let individuals = ids(
        &env,
        "SELECT to_jsonb(i.id) AS j FROM individuals i WHERE i.agency_id = $1
            AND NOT EXISTS (SELECT 1 FROM sales_records sr WHERE sr.individual_id = i.id) ORDER BY i.id",
        w.agency,
    )
    .await;
    let leads = ids(
        &env,
        "SELECT to_jsonb(id) AS j FROM sales_records WHERE agency_id = $1 ORDER BY id",
        w.agency,
    )
    .await;
    assert_eq!((individuals.len(), leads.len()), (36, 4));
    let create = batch(&env, &w, BatchKind::CreateSalesRecords, &individuals).await;
    let convert = batch(&env, &w, BatchKind::ConvertSalesRecords, &leads).await;

    // Another holder (a worker whose chunk is still running) has the lock of item 2's
    // Individual.
    let contended = individuals[1];
    let foreign = Locks::new_token();
    let held = locks
        .acquire(
            &foreign,
            &[LockTarget::Individual(contended)],
            Duration::from_secs(120),
        )
        .await
        .expect("foreign lock");
    assert_eq!(held, vec![true]);

    // One message per item, a duplicate of item 1, a message of a batch that does not
    // exist and one that is not a work message at all.
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for (n, t) in individuals.iter().enumerate() {
        bodies.push(WorkMessage::new(Op::CreateSalesRecord, create.id, n as i64 + 1, *t).encode());
    }
    bodies.push(WorkMessage::new(Op::CreateSalesRecord, create.id, 1, individuals[0]).encode());
    for (n, t) in leads.iter().enumerate() {
        bodies
            .push(WorkMessage::new(Op::ConvertSalesRecord, convert.id, n as i64 + 1, *t).encode());
    }
    let unknown = BatchId(convert.id.0 + 1000);
    bodies.push(WorkMessage::new(Op::CreateSalesRecord, unknown, 1, individuals[0]).encode());
    bodies.push(b"{\"v\":1,\"op\":\"nonsense\"}".to_vec());
    let outgoing: Vec<Outgoing<'_>> = bodies
        .iter()
        .map(|body| Outgoing {
            exchange: "",
            routing_key: &work_queue,
            body,
            properties: json_properties(),
            mandatory: true,
        })
        .collect();
    processor
        .publisher
        .publish_all(outgoing)
        .await
        .expect("publish the work messages");

    // Consume them as the worker's consumer does and hand them over as one chunk.
    let consuming = link.channel().await.expect("channel");
    consuming
        .basic_qos(500, BasicQosOptions { global: false })
        .await
        .expect("qos");
    let mut consumer = consuming
        .basic_consume(
            work_queue.as_str().into(),
            "processor-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let tracker = Arc::new(AckTracker::new(consuming.clone(), metrics.clone()));
    let chunk = take(&mut consumer, &tracker, bodies.len()).await;
    processor.process(Lane::Bulk, chunk, tracker.clone()).await;

    // Every item decided once, except the one whose lock another holder has: the pipeline
    // left it alone.
    assert_eq!(
        targets_with(&env, create.id, "pending").await,
        vec![contended],
        "only the contended item is still pending"
    );
    assert_eq!(targets_with(&env, create.id, "created").await.len(), 35);
    assert_eq!(targets_with(&env, convert.id, "converted").await, leads);
    let counters = |b: BatchId| {
        format!(
            "SELECT n_created * 1000000 + n_converted * 10000 + n_skipped * 100 + n_failed
               FROM bulk_batches WHERE id = {}",
            b.0
        )
    };
    assert_eq!(
        env.count(&counters(create.id)).await,
        35_000_000,
        "35 created"
    );
    assert_eq!(
        env.count(&counters(convert.id)).await,
        40_000,
        "4 converted"
    );
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM sales_records WHERE id = ANY('{{{}}}'::bigint[])",
            leads
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ))
        .await,
        0,
        "the converted Sales Records are gone"
    );

    // The contended message comes back through the first retry tier, its attempt counted;
    // with the other holder gone, it is decided.
    locks
        .release(&foreign, &[LockTarget::Individual(contended)])
        .await
        .expect("release the foreign lock");
    let again = take(&mut consumer, &tracker, 1).await;
    let msg = WorkMessage::decode(&again[0].data).expect("a work message");
    assert_eq!(
        (msg.batch_id, msg.seq, msg.target_id),
        (create.id, 2, contended)
    );
    assert_eq!(
        bulkops_worker::retry::attempts_of(again[0].properties.headers().as_ref()),
        2,
        "the retry counts as the second attempt"
    );
    processor.process(Lane::Bulk, again, tracker.clone()).await;

    assert_eq!(targets_with(&env, create.id, "created").await, individuals);
    assert_eq!(
        env.count(&counters(create.id)).await,
        36_000_000,
        "36 created"
    );
    for b in [create.id, convert.id] {
        assert_eq!(
            env.count(&format!(
                "SELECT count(*) FROM bulk_batches WHERE id = {} AND state = 'completed'",
                b.0
            ))
            .await,
            1,
            "batch {b} completed"
        );
    }
    // One Sales Record per Individual, each item naming its own.
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM bulk_items it JOIN sales_records sr ON sr.id = it.result_id
              WHERE it.batch_id = {} AND sr.individual_id = it.target_id",
            create.id.0
        ))
        .await,
        36
    );
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM (SELECT individual_id FROM sales_records WHERE agency_id = {}
               GROUP BY individual_id HAVING count(*) > 1) d",
            w.agency
        ))
        .await,
        0
    );
    // One event per change and one completion per batch, in the outbox.
    let events = |key: &str, b: BatchId, id: &str| {
        format!(
            "SELECT count(DISTINCT e->>'{id}') * 1000 + count(*) FROM outbox o
              CROSS JOIN LATERAL jsonb_array_elements(o.events) e
             WHERE o.routing_key = '{key}' AND (e->>'batch_id')::bigint = {}",
            b.0
        )
    };
    assert_eq!(
        env.count(&events(
            "sales_record.created",
            create.id,
            "sales_record_id"
        ))
        .await,
        36_036,
        "36 distinct sales_record.created events"
    );
    assert_eq!(
        env.count(&events(
            "sales_record.converted",
            convert.id,
            "sales_record_id"
        ))
        .await,
        4_004,
        "4 distinct sales_record.converted events"
    );
    for b in [create.id, convert.id] {
        assert_eq!(
            env.count(&events("bulk_batch.completed", b, "batch_id"))
                .await,
            1_001,
            "one bulk_batch.completed for batch {b}"
        );
    }

    // The unknown batch's and the malformed message went to the dead-letter queue (the
    // broker dead-letters a rejected message on its own time: wait for it).
    let dead = topology.dead_queue();
    let started = Instant::now();
    while ready(&channel, &dead).await < 2 && started.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ready(&channel, &dead).await, 2, "two dead letters");

    // Every delivery was settled: closing the consuming channel returns nothing to the
    // work queue, and no retry is left waiting.
    consuming
        .close(200, "done".into())
        .await
        .expect("close the consuming channel");
    assert_eq!(
        ready(&channel, &work_queue).await,
        0,
        "nothing back in the work queue"
    );
    for q in topology.retry_queues(Lane::Bulk) {
        assert_eq!(ready(&channel, &q).await, 0, "nothing waiting in {q}");
    }
    link.close().await;
    env.finish().await;
}
