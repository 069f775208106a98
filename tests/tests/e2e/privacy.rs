//! No record data outside the database: the logs of every process, every message put on
//! a queue or exchange during a bulk create and a conversion, and every page of the
//! operator console carry ids only.

use std::time::Duration;

use bulkops_tests::console::{ConsoleClient, enable, operator_token};
use bulkops_tests::env::queue_info;
use bulkops_tests::fixture::{World, insert};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;

/// Distinctive values a leak would show.
const SECRETS: [&str; 8] = [
    "Zephyrine",
    "Quillfeather",
    "987-65-4321",
    "1EG4TE5MK72",
    "1947-08-09",
    "Bartholomew",
    "Xanthopoulos",
    "4SQ9TB2XK61",
];

async fn drain_queue(url: &str, queue: &str) -> Vec<String> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    let mut bodies = Vec::new();
    // Read every message, then hand them all back.
    let mut tags = Vec::new();
    while let Ok(Some(m)) = ch.basic_get(queue.into(), BasicGetOptions::default()).await {
        bodies.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
        tags.push(m.delivery.acker.clone());
    }
    for t in tags {
        let _ = t
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_record_data_in_logs_messages_or_events() {
    let env = crate::env("privacy").await;
    let db = &env.db;
    let w = World::new(db, "Privacy Agency").await;
    for n in 0..40 {
        insert(db, "individuals", &json!({
            "agency_id": w.agency, "first_name": "Zephyrine", "last_name": "Quillfeather", "ssn": "987-65-4321",
            "medicare_beneficiary_id": "1EG4TE5MK72", "dob": "1947-08-09", "home_phone": format!("555-77{n:02}"),
        }))
        .await;
    }
    let mut leads = Vec::new();
    for _ in 0..20 {
        let sr = insert(db, "sales_records", &json!({
            "agency_id": w.agency, "record_type_id": w.record_type, "first_name": "Bartholomew",
            "last_name": "Xanthopoulos", "ssn": "987-65-4321", "medicare_beneficiary_id": "4SQ9TB2XK61", "birth_date": "1947-08-09",
        }))
        .await;
        insert(
            db,
            "notes",
            &json!({"agency_id": w.agency, "owner_type": "sales_record", "owner_id": sr,
                                    "subject": "Zephyrine", "body": "SSN 987-65-4321"}),
        )
        .await;
        leads.push(sr);
    }
    // A forbidden record makes a failure path run too.
    let restricted = insert(
        db,
        "sales_record_types",
        &json!({"agency_id": w.agency, "name": "Restricted"}),
    )
    .await;
    leads.push(insert(db, "sales_records", &json!({"agency_id": w.agency, "record_type_id": restricted, "first_name": "Bartholomew"})).await);

    // The producer alone first, so the split's messages can be read off the queues. The
    // console is on, so that its pages are checked too.
    enable(&env).await;
    env.set(
        "RUST_LOG",
        "info,bulkops_producer=debug,bulkops_worker=debug,bulkops_shared=debug",
    )
    .await;
    let (_, api) = env.start_producer().await.expect("producer");
    let t = w.token();
    let create = api
        .bulk_create(&t, &json!({"filter": {}, "record_type_id": w.record_type}))
        .await
        .expect("create");
    let convert = api.convert(&t, &leads).await.expect("convert");
    let queue = |lane: &str| format!("{}.work.{lane}", env.amqp_prefix);
    let mut messages = Vec::new();
    let started = std::time::Instant::now();
    while messages.len() < 40 + 20 && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        messages = drain_queue(&env.endpoints.amqp_direct, &queue("interactive")).await;
        messages.extend(drain_queue(&env.endpoints.amqp_direct, &queue("bulk")).await);
    }
    assert_eq!(
        messages.len(),
        60,
        "every pending item's message was published"
    );
    for m in &messages {
        let v: serde_json::Value = serde_json::from_str(m).expect("JSON");
        let mut keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            vec!["batch_id", "op", "seq", "target_id", "v"],
            "ids only: {m}"
        );
    }
    // Garbage, to exercise the dead-letter paths' logs too.
    {
        let conn = Connection::connect(&env.endpoints.amqp_direct, ConnectionProperties::default())
            .await
            .expect("amqp");
        let ch = conn.create_channel().await.expect("channel");
        ch.basic_publish(
            "".into(),
            queue("bulk").as_str().into(),
            Default::default(),
            b"{\"ssn\": \"987-65-4321\"",
            Default::default(),
        )
        .await
        .expect("publish");
        let _ = conn.close(200, "done".into()).await;
    }
    env.start_worker().await.expect("worker");
    env.start_worker().await.expect("worker");
    api.wait_completed(&t, create, Duration::from_secs(120))
        .await
        .expect("create completes");
    api.wait_completed(&t, convert, Duration::from_secs(120))
        .await
        .expect("convert completes");
    bulkops_tests::check::create_batch(&env, create)
        .await
        .expect("history");

    // Every message that reached the dead-letter queue, and every event.
    let mut published: Vec<String> = messages;
    let conn = Connection::connect(&env.endpoints.amqp_direct, ConnectionProperties::default())
        .await
        .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    let dead = format!("{}.dead", env.amqp_prefix);
    queue_info(&ch, &dead).await.expect("dead queue");
    let mut consumer = ch
        .basic_consume(
            dead.as_str().into(),
            "privacy".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
    {
        published.push(format!(
            "{:?} {}",
            d.properties.headers(),
            String::from_utf8_lossy(&d.data)
        ));
        let _ = d.acker.ack(BasicAckOptions::default()).await;
    }
    let events = env.events.all().await;
    assert!(
        events.len() >= 40 + 20,
        "events were captured: {}",
        events.len()
    );
    // Every console page about these batches, as an operator and as the CRM user.
    let mut pages = Vec::new();
    for token in [operator_token("privacy-ops"), t.clone()] {
        let console = ConsoleClient::new(&api.base, Some(&token));
        let mut paths = vec!["/ui".to_owned(), "/ui/batches".to_owned()];
        for batch in [create, convert] {
            paths.push(format!("/ui/batches/{batch}"));
            for status in ["created", "converted", "skipped", "failed"] {
                paths.push(format!("/ui/batches/{batch}?status={status}"));
            }
            paths.push(format!("/ui/batches/{batch}/items.csv"));
            paths.push(format!("/ui/batches/{batch}/live"));
            paths.push(format!("/ui/batches/{batch}/replay?seq=1"));
        }
        for path in paths {
            let page = console.get(&path).await.expect("console page");
            assert!(
                page.status.is_success() || page.status == reqwest::StatusCode::FORBIDDEN,
                "{path}: {}",
                page.status
            );
            pages.push((path, page.body));
        }
    }
    assert!(
        pages
            .iter()
            .any(|(p, body)| p.ends_with("?status=failed") && body.contains("forbidden")),
        "the console pages show the items' reasons"
    );
    let logs = env.logs().await;
    assert!(
        logs.contains("batch accepted") && logs.contains("malformed message"),
        "the logs of the accept and dead-letter paths were captured"
    );
    for secret in SECRETS {
        for e in &events {
            assert!(
                !e.raw.contains(secret),
                "event {} carries {secret}",
                e.routing_key
            );
        }
        for m in &published {
            // The garbage message itself is the only body that may hold it: the test wrote it.
            if m.contains("\"ssn\"") {
                continue;
            }
            assert!(!m.contains(secret), "a message carries {secret}: {m}");
        }
        assert!(!logs.contains(secret), "the logs carry {secret}");
        for (path, body) in &pages {
            assert!(
                !body.contains(secret),
                "console page {path} carries {secret}"
            );
        }
    }
    let _ = conn.close(200, "done".into()).await;
    env.finish().await;
}
