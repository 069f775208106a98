//! OpenTelemetry traces, end to end: a producer and two workers export OTLP/HTTP to a
//! receiver the test runs itself. A bulk create sent with the CRM's `traceparent` must be
//! one trace from the request to every committed chunk and event: the request, the accept
//! and the freeze; each split chunk (in the trace, although it runs later, in the
//! splitter); each worker chunk (a trace of its own, linked to the split chunks whose
//! messages it holds) with, per batch, a span in the request's trace holding the lock,
//! apply, commit and ack; the outbox relay; and a `traceparent` on every event naming the
//! transaction that committed it. Attributes carry ids and counts; no span carries record
//! data.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bulkops_tests::check;
use bulkops_tests::fixture::{World, insert};
use bulkops_tests::otlp::{Receiver, Span};
use reqwest::{Method, StatusCode};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

/// Distinctive values a leak would show.
const SECRETS: [&str; 6] = [
    "Marigoldine",
    "Thistlewaite",
    "876-54-3210",
    "7TR5UV3WX90",
    "1939-11-23",
    "Ravenscroft",
];

fn by_name<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn sum(spans: &[&Span], key: &str) -> i64 {
    spans.iter().filter_map(|s| s.int(key)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_create_is_one_trace_from_request_to_event() {
    let receiver = Receiver::start().await.expect("OTLP receiver");
    let env = crate::env("traces").await;
    let db = &env.db;
    let w = World::new(db, "Traced Agency").await;
    const N: i64 = 60;
    let mut individuals = Vec::new();
    for n in 0..N {
        individuals.push(
            insert(db, "individuals", &json!({
                "agency_id": w.agency, "first_name": "Marigoldine", "last_name": "Thistlewaite",
                "ssn": "876-54-3210", "medicare_beneficiary_id": "7TR5UV3WX90", "dob": "1939-11-23",
                "home_phone": format!("555-31{n:02}"),
            }))
            .await,
        );
    }
    // Two already have a Sales Record: settled (skipped) by the accept, never published.
    for ind in &individuals[..2] {
        insert(
            db,
            "sales_records",
            &json!({
                "agency_id": w.agency, "record_type_id": w.record_type, "individual_id": ind,
                "first_name": "Ravenscroft",
            }),
        )
        .await;
    }
    let to_create = N - 2;
    // Small chunks: several split chunks and several worker chunks.
    env.set("BULKOPS__SPLIT__CHUNK_SIZE", 20).await;
    env.set("BULKOPS__WORKER__CHUNK_SIZE", 8).await;
    for (k, v) in receiver.process_env() {
        env.set(k, v).await;
    }
    let api = env.start(2).await.expect("start");
    let t = w.token();

    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let crm_span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let traceparent = format!("00-{trace_id}-{crm_span}-01");
    let r = api
        .send(
            Method::POST,
            "/v1/bulk/sales-records",
            Some(&t),
            Some(&json!({"filter": {}, "record_type_id": w.record_type})),
            &[("traceparent", &traceparent)],
        )
        .await
        .expect("bulk create");
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let batch = r.json["batch_id"].as_i64().expect("batch id");
    api.wait_completed(&t, batch, WAIT)
        .await
        .expect("the batch completes");
    check::create_batch(&env, batch).await.expect("history");
    // Requests without a usable traceparent start traces of their own.
    for tp in [None, Some("00-zz-not-a-context-01")] {
        let headers: Vec<(&str, &str)> = tp.map(|v| ("traceparent", v)).into_iter().collect();
        let r = api
            .send(
                Method::GET,
                &format!("/v1/batches/{batch}"),
                Some(&t),
                None,
                &headers,
            )
            .await
            .expect("get");
        assert_eq!(r.status, StatusCode::OK);
    }

    // Everything arrives: the worker's spans close after the acks, the relay's after the
    // events' confirms.
    let complete = receiver
        .wait_until(WAIT, |spans| {
            let s: Vec<Span> = spans.to_vec();
            let applied: Vec<&Span> = by_name(&s, "worker.apply")
                .into_iter()
                .filter(|a| a.trace_id == trace_id)
                .collect();
            sum(&applied, "created") == to_create
                && by_name(&s, "GET /v1/batches/{id}").len() >= 2
                && !by_name(&s, "outbox.relay").is_empty()
                && by_name(&s, "worker.batch")
                    .iter()
                    .filter(|b| b.trace_id == trace_id)
                    .count()
                    == by_name(&s, "worker.apply")
                        .iter()
                        .filter(|a| a.trace_id == trace_id)
                        .count()
        })
        .await;
    let spans = receiver.spans().await;
    assert!(
        complete,
        "the spans of the batch arrived; got {:?}",
        spans.iter().map(|s| &s.name).collect::<HashSet<_>>()
    );
    let (requests, refused) = receiver.requests().await;
    assert!(
        requests > 0 && refused == 0,
        "{refused} of {requests} exports refused"
    );
    let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    assert!(
        services.contains("bulkops-producer") && services.contains("bulkops-worker"),
        "service.name defaults to the program's name: {services:?}"
    );
    let batch_s = batch.to_string();
    let agency_s = w.agency.to_string();

    // The request continues the CRM's trace; the accept and freeze are its children.
    let request = by_name(&spans, "POST /v1/bulk/sales-records");
    assert_eq!(request.len(), 1, "one request span");
    let request = request[0];
    assert_eq!(request.service, "bulkops-producer");
    assert_eq!(
        request.trace_id, trace_id,
        "the CRM's traceparent is honoured"
    );
    assert_eq!(
        request.parent_span_id, crm_span,
        "a child of the CRM's span"
    );
    assert_eq!(request.attr("http.route"), Some("/v1/bulk/sales-records"));
    assert_eq!(request.attr("http.request.method"), Some("POST"));
    assert_eq!(request.int("http.response.status_code"), Some(202));
    let accept = by_name(&spans, "bulk.accept");
    assert_eq!(accept.len(), 1);
    let accept = accept[0];
    assert_eq!(
        (accept.trace_id.as_str(), accept.parent_span_id.as_str()),
        (trace_id.as_str(), request.span_id.as_str())
    );
    assert_eq!(accept.attr("batch_id"), Some(batch_s.as_str()));
    assert_eq!(accept.attr("kind"), Some("create_sales_records"));
    assert_eq!(accept.attr("agency_id"), Some(agency_s.as_str()));
    assert_eq!(accept.int("items"), Some(N));
    assert_eq!(accept.int("presettled"), Some(2));
    let freeze = by_name(&spans, "bulk.freeze");
    assert_eq!(freeze.len(), 1);
    assert_eq!(freeze[0].parent_span_id, accept.span_id);
    assert_eq!(freeze[0].attr("batch_id"), Some(batch_s.as_str()));
    assert_eq!(freeze[0].int("items"), Some(N));

    // The split chunks run in the splitter, later, yet sit under the accept: the batch
    // kept the context it was accepted under.
    let splits: Vec<&Span> = by_name(&spans, "split.chunk")
        .into_iter()
        .filter(|s| s.attr("batch_id") == Some(batch_s.as_str()))
        .collect();
    assert!(splits.len() >= 3, "{} split chunks of 20", splits.len());
    for s in &splits {
        assert_eq!(
            s.trace_id, trace_id,
            "a split chunk is in the request's trace"
        );
        assert_eq!(
            s.parent_span_id, accept.span_id,
            "a split chunk continues the accept"
        );
        assert_eq!(s.attr("kind"), Some("create_sales_records"));
        assert_eq!(s.attr("agency_id"), Some(agency_s.as_str()));
        assert!(s.int("room").is_some_and(|r| r > 0));
    }
    assert_eq!(
        sum(&splits, "items"),
        to_create,
        "every message published in a chunk span"
    );
    let split_ids: HashSet<(String, String)> = splits
        .iter()
        .map(|s| (s.trace_id.clone(), s.span_id.clone()))
        .collect();

    // Worker chunks start their own traces and link to the split chunks they consumed.
    let chunks: Vec<&Span> = by_name(&spans, "worker.chunk")
        .into_iter()
        .filter(|c| c.links.iter().any(|l| split_ids.contains(l)))
        .collect();
    assert!(chunks.len() >= 2, "{} worker chunks", chunks.len());
    for c in &chunks {
        assert_eq!(c.service, "bulkops-worker");
        assert_ne!(
            c.trace_id, trace_id,
            "a chunk mixes batches: linked, not parented"
        );
        assert!(
            c.int("items").is_some_and(|n| (1..=8).contains(&n)),
            "{c:?}"
        );
        assert!(c.attr("lane").is_some());
    }
    let chunk_ids: HashSet<(String, String)> = chunks
        .iter()
        .map(|c| (c.trace_id.clone(), c.span_id.clone()))
        .collect();
    let split_span_ids: HashSet<&str> = splits.iter().map(|s| s.span_id.as_str()).collect();
    // Per batch within a chunk: a span in the request's trace, under a split chunk, linked
    // back to its worker chunk.
    let batches: Vec<&Span> = by_name(&spans, "worker.batch")
        .into_iter()
        .filter(|b| b.attr("batch_id") == Some(batch_s.as_str()))
        .collect();
    assert!(!batches.is_empty());
    for b in &batches {
        assert_eq!(
            b.trace_id, trace_id,
            "the worker's batch span is in the request's trace"
        );
        assert!(
            split_span_ids.contains(b.parent_span_id.as_str()),
            "under a split chunk: {b:?}"
        );
        assert!(
            b.links.iter().any(|l| chunk_ids.contains(l)),
            "linked to its chunk: {b:?}"
        );
        assert_eq!(b.attr("kind"), Some("create_sales_records"));
        assert_eq!(b.attr("agency_id"), Some(agency_s.as_str()));
        assert!(b.int("items").is_some_and(|n| n >= 1));
    }
    let batch_span_ids: HashSet<&str> = batches.iter().map(|b| b.span_id.as_str()).collect();
    let children = |name: &str| -> Vec<&Span> {
        by_name(&spans, name)
            .into_iter()
            .filter(|s| batch_span_ids.contains(s.parent_span_id.as_str()))
            .collect()
    };
    let applies = children("worker.apply");
    assert_eq!(
        sum(&applies, "created"),
        to_create,
        "outcome counts on the apply spans"
    );
    assert_eq!(sum(&applies, "items"), to_create);
    assert!(!children("worker.lock").is_empty(), "lock spans");
    assert!(!children("worker.ack").is_empty(), "ack spans");
    let apply_ids: HashSet<&str> = applies.iter().map(|a| a.span_id.as_str()).collect();
    let commits: Vec<&Span> = by_name(&spans, "worker.commit")
        .into_iter()
        .filter(|c| apply_ids.contains(c.parent_span_id.as_str()))
        .collect();
    assert_eq!(
        commits.len(),
        applies.len(),
        "a commit span in every apply span"
    );

    // Every event carries the traceparent of the transaction that committed it.
    let events = env.events.all().await;
    let ours: Vec<_> = events
        .iter()
        .filter(|e| e.body["batch_id"] == batch)
        .collect();
    assert_eq!(
        ours.iter()
            .filter(|e| e.routing_key == "sales_record.created")
            .count() as i64,
        to_create
    );
    assert!(ours.iter().any(|e| e.routing_key == "bulk_batch.completed"));
    let mut event_spans: HashMap<String, usize> = HashMap::new();
    for e in &ours {
        let tp = e
            .traceparent
            .as_deref()
            .unwrap_or_else(|| panic!("event {} has no traceparent", e.routing_key));
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!(
            parts[1], trace_id,
            "event {} continues the request's trace",
            e.routing_key
        );
        assert!(
            apply_ids.contains(parts[2]),
            "event {} names its apply span: {tp}",
            e.routing_key
        );
        *event_spans.entry(parts[2].to_owned()).or_default() += 1;
    }
    // The relay's rounds link to the contexts of the rows they published.
    let relays = by_name(&spans, "outbox.relay");
    assert!(
        relays.iter().any(|r| r
            .links
            .iter()
            .any(|(t, s)| *t == trace_id && event_spans.contains_key(s))),
        "an outbox.relay span links to the events' contexts"
    );
    assert!(
        relays
            .iter()
            .all(|r| r.int("events").is_some_and(|n| n > 0))
    );

    // Requests without a usable traceparent are roots of new traces.
    for get in by_name(&spans, "GET /v1/batches/{id}") {
        assert!(get.parent_span_id.is_empty(), "{get:?}");
        assert_ne!(get.trace_id, trace_id);
    }

    // No record data in any span: names, attributes, events, resources.
    let raw = receiver.raw().await;
    for secret in SECRETS {
        for body in &raw {
            assert!(!body.contains(secret), "an export carries {secret}");
        }
        for s in &spans {
            assert!(
                !s.name.contains(secret)
                    && !s.attributes.values().any(|v| v.contains(secret))
                    && !s.events.iter().any(|e| e.contains(secret)),
                "span {} carries {secret}",
                s.name
            );
        }
    }
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_collector_nothing_is_exported_or_stamped() {
    // The default: no OTEL_EXPORTER_OTLP_ENDPOINT. Nothing is stored or sent.
    let env = crate::env("traces_off").await;
    let db = &env.db;
    let w = World::new(db, "Untraced Agency").await;
    for _ in 0..5 {
        insert(
            db,
            "individuals",
            &json!({"agency_id": w.agency, "first_name": "Plain"}),
        )
        .await;
    }
    let api = env.start(1).await.expect("start");
    let t = w.token();
    let r = api
        .send(
            Method::POST,
            "/v1/bulk/sales-records",
            Some(&t),
            Some(&json!({"filter": {}, "record_type_id": w.record_type})),
            &[(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )],
        )
        .await
        .expect("bulk create");
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let batch = r.json["batch_id"].as_i64().expect("batch id");
    api.wait_completed(&t, batch, WAIT)
        .await
        .expect("completes");
    check::create_batch(&env, batch).await.expect("history");
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM bulk_batches WHERE id = {batch} AND trace_context IS NOT NULL"
        ))
        .await,
        0,
        "no context stored with traces off"
    );
    let events = env.events.all().await;
    assert!(events.iter().any(|e| e.body["batch_id"] == batch));
    assert!(
        events.iter().all(|e| e.traceparent.is_none()),
        "no traceparent on events with traces off"
    );
    env.finish().await;
}
