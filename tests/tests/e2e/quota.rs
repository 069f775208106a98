//! The per-agency quota (`limits.max_active_items_per_agency`): 429 with Retry-After and
//! nothing frozen, other agencies unaffected, single conversions exempt, and no two
//! concurrent requests slipping under the limit across several producers.

use std::time::Duration;

use bulkops_tests::check;
use bulkops_tests::fixture::{World, insert};
use reqwest::StatusCode;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

async fn individuals(env: &bulkops_tests::TestEnv, agency: i64, state: &str, n: i64) {
    bulkops_tests::fixture::rows(
        &env.db,
        "WITH ins AS (INSERT INTO individuals (agency_id, first_name, state)
                      SELECT $1, 'Q' || g, $2 FROM generate_series(1, $3::bigint) g RETURNING id)
         SELECT to_jsonb(count(*)) AS j FROM ins",
        vec![agency.into(), state.into(), n.into()],
    )
    .await;
}

fn create(w: &World, state: &str) -> Value {
    json!({"filter": {"individual": {"state": [state]}}, "record_type_id": w.record_type})
}

async fn metric(base: &str, line_prefix: &str) -> Option<f64> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quota_refuses_with_429_freezes_nothing_and_holds_under_concurrency() {
    let env = crate::env("quota").await;
    let a = World::new(&env.db, "Busy Agency").await;
    let b = World::new(&env.db, "Quiet Agency").await;
    individuals(&env, a.agency, "TX", 40).await;
    individuals(&env, a.agency, "OK", 30).await;
    individuals(&env, a.agency, "NM", 5).await;
    individuals(&env, b.agency, "TX", 45).await;
    let leads: Vec<i64> = {
        let mut v = Vec::new();
        for n in 0..20 {
            v.push(
                insert(
                    &env.db,
                    "sales_records",
                    &json!({"agency_id": a.agency, "record_type_id": a.record_type, "first_name": format!("L{n}")}),
                )
                .await,
            );
        }
        v
    };
    env.set("BULKOPS__LIMITS__MAX_ACTIVE_ITEMS_PER_AGENCY", 50)
        .await;
    // Two producers, no worker yet: items stay undecided.
    let (_, api) = env.start_producer().await.expect("producer");
    let (_, api2) = env.start_producer().await.expect("producer 2");
    let (ta, tb) = (a.token(), b.token());

    let first = api
        .bulk_create(&ta, &create(&a, "TX"))
        .await
        .expect("40 fit");
    let items_before = env.count("SELECT count(*) FROM bulk_items").await;
    let batches_before = env.count("SELECT count(*) FROM bulk_batches").await;

    // 40 in flight + 30 > 50: refused, as a problem, with Retry-After in seconds.
    let r = api
        .post("/v1/bulk/sales-records", &ta, &create(&a, "OK"))
        .await
        .expect("post");
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    assert!(r.content_type().starts_with("application/problem+json"));
    let retry: u64 = r
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=3600).contains(&retry), "{retry}");
    let detail = r.json["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("has 40 undecided items")
            && detail.contains("at least 11")
            && detail.contains("limit is 50"),
        "{detail}"
    );
    assert_eq!(r.json["status"], 429);
    // A conversion of 20 Sales Records: refused too.
    let r = api
        .post(
            "/v1/bulk/conversions",
            &ta,
            &json!({"sales_record_ids": leads}),
        )
        .await
        .expect("post");
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    // Nothing was frozen for them.
    assert_eq!(
        env.count("SELECT count(*) FROM bulk_items").await,
        items_before
    );
    assert_eq!(
        env.count("SELECT count(*) FROM bulk_batches").await,
        batches_before
    );
    // Another agency is not affected.
    let theirs = api
        .bulk_create(&tb, &create(&b, "TX"))
        .await
        .expect("other agency");
    // A single-record conversion is exempt (and counts: 41 in flight now).
    let single = api
        .convert(&ta, &[leads[0]])
        .await
        .expect("single conversion");

    // Ten requests of 5 at once, over two producers, with room for only 9: one fits.
    let mut tasks = Vec::new();
    for n in 0..10 {
        let api = if n % 2 == 0 {
            api.clone()
        } else {
            api2.clone()
        };
        let (ta, body) = (ta.clone(), create(&a, "NM"));
        tasks.push(tokio::spawn(async move {
            api.post("/v1/bulk/sales-records", &ta, &body)
                .await
                .expect("post")
        }));
    }
    let mut accepted = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let r = t.await.expect("task");
        match r.status {
            StatusCode::ACCEPTED => accepted.push(r.json["batch_id"].as_i64().expect("id")),
            StatusCode::TOO_MANY_REQUESTS => refused += 1,
            other => panic!("unexpected {other}: {}", r.text),
        }
    }
    assert_eq!((accepted.len(), refused), (1, 9));
    let in_flight = env
        .count(&format!(
            "SELECT sum(total - n_created - n_converted - n_skipped - n_failed)::bigint
               FROM bulk_batches WHERE agency_id = {}",
            a.agency
        ))
        .await;
    assert_eq!(in_flight, 46, "40 + 1 + 5, never over 50");
    let refusals = metric(&api.base, "bulkops_quota_refusals_total{kind=\"create\"}")
        .await
        .unwrap_or(0.0)
        + metric(&api2.base, "bulkops_quota_refusals_total{kind=\"create\"}")
            .await
            .unwrap_or(0.0);
    assert_eq!(refusals, 10.0, "1 + 9 refused bulk creates");
    assert_eq!(
        metric(&api.base, "bulkops_quota_refusals_total{kind=\"convert\"}").await,
        Some(1.0)
    );

    // Once the items are done there is room again.
    env.start_worker().await.expect("worker");
    for batch in [first, theirs, single, accepted[0]] {
        let t = if batch == theirs { &tb } else { &ta };
        api.wait_completed(t, batch, WAIT).await.expect("completed");
    }
    let later = api
        .bulk_create(&ta, &create(&a, "OK"))
        .await
        .expect("fits now");
    api.wait_completed(&ta, later, WAIT)
        .await
        .expect("completed");
    for batch in [first, theirs, accepted[0], later] {
        check::create_batch(&env, batch).await.expect("history");
    }
    env.finish().await;
}
