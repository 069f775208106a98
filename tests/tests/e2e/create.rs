//! Bulk create, end to end: the rules field by field, concurrency, crashes and events.

use std::collections::HashSet;
use std::time::Duration;

use bulkops_tests::check;
use bulkops_tests::fixture::{self, World, insert, row};
use reqwest::StatusCode;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

/// Every column of an Individual, with distinct values.
fn full_individual(agency: i64, servicing_agent: Option<i64>, n: i64) -> Value {
    json!({
        "agency_id": agency,
        "first_name": format!("First{n}"), "middle_name": format!("M{n}"), "last_name": format!("Last{n}"),
        "nickname": format!("Nick{n}"), "title": "Dr.", "status": "Active",
        "secondary_email": format!("second{n}@example.org"), "cell_phone": format!("555-1{n:03}"),
        "home_phone": format!("555-2{n:03}"), "address_type": "Home", "address_line1": format!("{n} Main St"),
        "city": "Austin", "county": "Travis", "zip": "78701", "state": "TX", "gender": "Female",
        "dob": "1951-02-03", "lead_source": "Referral", "lead_date": "2025-05-06",
        "medicare_beneficiary_id": format!("1EG4-TE5-MK{n:02}"), "medicare_part_a_effective_date": "2016-01-01",
        "medicare_part_b_effective_date": "2016-02-01", "ssn": format!("123-45-{n:04}"),
        "drivers_license_number": format!("DL{n}"), "smoker_status": "Non-smoker",
        "servicing_agent_id": servicing_agent, "additional_agent_1_id": servicing_agent,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_create_applies_rules_4_to_6_field_by_field() {
    let env = crate::env("create_rules").await;
    let db = &env.db;
    let w = World::new(db, "Rules Agency").await;
    let other = World::new(db, "Other Agency").await;
    // Rule 5: a servicing agent linked to a user; one linked to nobody; none at all.
    let linked_user = fixture::user(db, w.agency, "agent_crm_user").await;
    let linked_agent = fixture::agent(db, w.agency).await;
    fixture::link(db, linked_user, linked_agent, 1).await;
    let lonely_agent = fixture::agent(db, w.agency).await;
    let a = insert(
        db,
        "individuals",
        &full_individual(w.agency, Some(linked_agent), 1),
    )
    .await;
    let b = insert(
        db,
        "individuals",
        &full_individual(w.agency, Some(lonely_agent), 2),
    )
    .await;
    let c = insert(
        db,
        "individuals",
        &json!({"agency_id": w.agency, "first_name": "Sparse"}),
    )
    .await;
    let d = insert(db, "individuals", &full_individual(w.agency, None, 4)).await;
    let existing = insert(
        db,
        "sales_records",
        &json!({"agency_id": w.agency, "record_type_id": w.record_type, "individual_id": d, "first_name": "Kept"}),
    )
    .await;
    let foreign = insert(db, "individuals", &full_individual(other.agency, None, 5)).await;
    // Rule 6: all twelve types on both entities; plus fields without a counterpart.
    let types = [
        ("text", json!("morning")),
        ("textarea", json!("long\ntext")),
        ("date", json!("2026-01-02")),
        ("dropdown", json!("Gold")),
        ("email", json!("x@example.org")),
        ("phone", json!("555-0000")),
        ("url", json!("https://example.org")),
        ("number", json!(3)),
        ("currency", json!(12.5)),
        ("percent", json!(0.2)),
        ("checkbox", json!(true)),
        ("checkbox_list", json!(["a", "b"])),
    ];
    for (t, v) in &types {
        let name = format!("F {t}");
        let src = fixture::custom_field(db, w.agency, "individual", &name, t).await;
        fixture::custom_field(db, w.agency, "sales_record", &name, t).await;
        fixture::custom_value(db, src, a, v.clone()).await;
    }
    let orphan =
        fixture::custom_field(db, w.agency, "individual", "Only On Individuals", "text").await;
    fixture::custom_value(db, orphan, a, json!("stays")).await;
    let mismatched =
        fixture::custom_field(db, w.agency, "individual", "Typed Differently", "text").await;
    fixture::custom_field(db, w.agency, "sales_record", "Typed Differently", "email").await;
    fixture::custom_value(db, mismatched, a, json!("not copied")).await;

    let api = env.start(2).await.expect("start");
    let token = w.token();
    let batch = api
        .bulk_create(
            &token,
            &json!({"filter": {}, "record_type_id": w.record_type}),
        )
        .await
        .expect("bulk create");
    let done = api
        .wait_completed(&token, batch, WAIT)
        .await
        .expect("completed");
    assert_eq!(done["total"], 4, "{done}");
    assert_eq!(
        done["counts"],
        json!({"pending": 0, "created": 3, "converted": 0, "skipped": 1, "failed": 0})
    );
    check::create_batch(&env, batch).await.expect("history");

    let items = api.items(&token, batch).await.expect("items");
    let by_target = |t: i64| {
        items
            .iter()
            .find(|i| i["target_id"] == t)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(by_target(d)["status"], "skipped");
    assert_eq!(by_target(d)["reason"], "already_has_sales_record");
    assert_eq!(by_target(d)["result_id"], existing);
    // It was decided by the accepting transaction, and the producer's metrics say so.
    let metrics = reqwest::get(format!("{}/metrics", api.base))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        metrics
            .lines()
            .any(|l| l
                == r#"bulkops_items_settled_on_accept_total{kind="create",outcome="skipped"} 1"#),
        "{metrics}"
    );
    assert!(
        items.iter().all(|i| i["target_id"] != foreign),
        "another agency's Individual is never found"
    );

    let ind_a = row(db, "individuals", a).await;
    let sr_a = row(
        db,
        "sales_records",
        by_target(a)["result_id"].as_i64().expect("result"),
    )
    .await;
    for (from, to) in [
        ("first_name", "first_name"),
        ("middle_name", "middle_name"),
        ("last_name", "last_name"),
        ("nickname", "nickname"),
        ("title", "title"),
        ("status", "status"),
        ("secondary_email", "secondary_email"),
        ("cell_phone", "cell_phone"),
        ("home_phone", "phone"),
        ("address_type", "address_type"),
        ("address_line1", "address_line1"),
        ("city", "city"),
        ("county", "county"),
        ("zip", "zip"),
        ("state", "state"),
        ("gender", "gender"),
        ("dob", "birth_date"),
        ("lead_source", "lead_source"),
        ("medicare_beneficiary_id", "medicare_beneficiary_id"),
        (
            "medicare_part_a_effective_date",
            "medicare_part_a_effective_date",
        ),
        (
            "medicare_part_b_effective_date",
            "medicare_part_b_effective_date",
        ),
        ("ssn", "ssn"),
        ("drivers_license_number", "drivers_license_number"),
        ("smoker_status", "smoker_status"),
    ] {
        assert!(!ind_a[from].is_null(), "fixture sets {from}");
        assert_eq!(sr_a[to], ind_a[from], "{from} → {to}");
    }
    // Nothing else is copied.
    assert!(sr_a["lead_date"].is_null(), "lead_date is not in rule 4");
    assert_eq!(sr_a["record_type_id"], w.record_type);
    assert_eq!(sr_a["individual_id"], a);
    assert_eq!(sr_a["agency_id"], w.agency);
    assert_eq!(
        sr_a["assigned_user_id"], linked_user,
        "rule 5: the servicing agent's linked user"
    );
    let sr_b = row(
        db,
        "sales_records",
        by_target(b)["result_id"].as_i64().expect("result"),
    )
    .await;
    assert!(
        sr_b["assigned_user_id"].is_null(),
        "agent linked to no user"
    );
    let sr_c = row(
        db,
        "sales_records",
        by_target(c)["result_id"].as_i64().expect("result"),
    )
    .await;
    assert!(sr_c["assigned_user_id"].is_null(), "no servicing agent");
    assert_eq!(sr_c["first_name"], "Sparse");
    assert!(sr_c["phone"].is_null() && sr_c["birth_date"].is_null());
    assert_eq!(
        row(db, "sales_records", existing).await["first_name"],
        "Kept",
        "the existing record is untouched"
    );

    let copied = fixture::custom_values(db, "sales_record", sr_a["id"].as_i64().expect("id")).await;
    for (t, v) in &types {
        let name = format!("F {t}");
        let should = !matches!(
            *t,
            "number" | "currency" | "percent" | "checkbox" | "checkbox_list"
        );
        assert_eq!(
            copied.get(&name),
            if should { Some(v) } else { None },
            "custom field of type {t}"
        );
    }
    assert_eq!(copied.len(), 7, "only the seven copyable types: {copied:?}");
    // The Individual's own values are untouched.
    assert_eq!(fixture::custom_values(db, "individual", a).await.len(), 14);

    // One created event per record, ids only.
    let events = env.events.of("sales_record.created").await;
    assert_eq!(events.len(), 3);
    for e in &events {
        let keys: HashSet<&str> = e
            .body
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            HashSet::from([
                "event_id",
                "occurred_at",
                "agency_id",
                "sales_record_id",
                "individual_id",
                "record_type_id",
                "batch_id"
            ])
        );
        assert_eq!(e.body["record_type_id"], w.record_type);
        assert_eq!(e.message_id.as_deref(), e.body["event_id"].as_str());
    }
    let completed = env.events.of("bulk_batch.completed").await;
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0].body["kind"], "create_sales_records");
    assert_eq!(completed[0].body["total"], 4);
    assert_eq!(completed[0].body["counts"]["created"], 3);
    env.finish().await;
}

/// Seeds `n` plain Individuals of an agency (ids returned in order).
async fn plain_individuals(env: &bulkops_tests::TestEnv, agency: i64, n: i64) -> Vec<i64> {
    fixture::rows(
        &env.db,
        "WITH ins AS (
           INSERT INTO individuals (agency_id, first_name, last_name, state, ssn)
           SELECT $1, 'Pat' || g, 'Doe' || g, (ARRAY['TX','OK'])[1 + g % 2], lpad(g::text, 9, '7')
             FROM generate_series(1, $2::bigint) g RETURNING id)
         SELECT to_jsonb(id) AS j FROM ins ORDER BY id",
        vec![agency.into(), n.into()],
    )
    .await
    .iter()
    .filter_map(Value::as_i64)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_batches_submitted_at_once_give_one_sales_record_each() {
    let env = crate::env("create_overlap").await;
    let w = World::new(&env.db, "Overlap Agency").await;
    let ids = plain_individuals(&env, w.agency, 3000).await;
    // A few already linked.
    for id in ids.iter().step_by(10) {
        insert(
            &env.db,
            "sales_records",
            &json!({"agency_id": w.agency, "record_type_id": w.record_type, "individual_id": id}),
        )
        .await;
    }
    let api = env.start(2).await.expect("start");
    let token = w.token();
    let everyone = json!({"filter": {}, "record_type_id": w.record_type});
    let texans =
        json!({"filter": {"individual": {"state": ["TX"]}}, "record_type_id": w.record_type});
    let (a, b) = tokio::join!(
        api.bulk_create(&token, &everyone),
        api.bulk_create(&token, &texans)
    );
    let (a, b) = (a.expect("a"), b.expect("b"));
    api.wait_completed(&token, a, WAIT)
        .await
        .expect("a completes");
    api.wait_completed(&token, b, WAIT)
        .await
        .expect("b completes");
    let sa = check::create_batch(&env, a).await.expect("history a");
    let sb = check::create_batch(&env, b).await.expect("history b");
    assert_eq!(sa.total, 3000);
    assert_eq!(sb.total, 1500);
    // Every Individual has exactly one Sales Record, created once across both batches.
    let with_record = env
        .count(&format!(
            "SELECT count(DISTINCT individual_id) FROM sales_records WHERE agency_id = {}",
            w.agency
        ))
        .await;
    assert_eq!(with_record, 3000);
    assert_eq!(
        sa.by_status["created"] + sb.by_status["created"],
        3000 - 300
    );
    assert_eq!(sa.by_status["failed"] + sb.by_status["failed"], 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_loses_and_duplicates_nothing() {
    let env = crate::env("create_kill").await;
    let w = World::new(&env.db, "Kill Agency").await;
    plain_individuals(&env, w.agency, 6000).await;
    env.set("BULKOPS__WORKER__CHUNK_SIZE", 50).await;
    let (_, api) = env.start_producer().await.expect("producer");
    let victim = env.start_worker().await.expect("worker");
    env.start_worker().await.expect("worker");
    let token = w.token();
    let batch = api
        .bulk_create(
            &token,
            &json!({"filter": {}, "record_type_id": w.record_type}),
        )
        .await
        .expect("bulk create");
    // Kill one worker once the batch is under way, then start a replacement.
    let started = std::time::Instant::now();
    loop {
        let done = env
            .count(&format!(
                "SELECT n_created + n_skipped + n_failed FROM bulk_batch_live_counts WHERE batch_id = {batch}"
            ))
            .await;
        if done >= 500 || started.elapsed() > WAIT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    victim.lock().await.signal("KILL").expect("kill");
    env.start_worker().await.expect("replacement");
    api.wait_completed(&token, batch, WAIT)
        .await
        .expect("completes");
    let s = check::create_batch(&env, batch).await.expect("history");
    assert_eq!(s.total, 6000);
    assert_eq!(s.by_status["created"], 6000);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_worker_within_30_seconds() {
    let env = crate::env("create_sigterm").await;
    let w = World::new(&env.db, "Drain Agency").await;
    plain_individuals(&env, w.agency, 4000).await;
    env.set("BULKOPS__WORKER__CHUNK_SIZE", 50).await;
    let (_, api) = env.start_producer().await.expect("producer");
    let worker = env.start_worker().await.expect("worker");
    let token = w.token();
    let batch = api
        .bulk_create(
            &token,
            &json!({"filter": {}, "record_type_id": w.record_type}),
        )
        .await
        .expect("bulk create");
    let started = std::time::Instant::now();
    while env
        .count(&format!(
            "SELECT n_created FROM bulk_batch_live_counts WHERE batch_id = {batch}"
        ))
        .await
        < 200
        && started.elapsed() < WAIT
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = worker
        .lock()
        .await
        .terminate(Duration::from_secs(30))
        .await
        .expect("exits within 30 s");
    assert!(status.success(), "exit status {status}");
    // What it had in hand was finished or returned: another worker completes the batch.
    env.start_worker().await.expect("worker");
    api.wait_completed(&token, batch, WAIT)
        .await
        .expect("completes");
    let s = check::create_batch(&env, batch).await.expect("history");
    assert_eq!(s.by_status["created"], 4000);
    env.finish().await;
}

/// The `bulk_batch.completed` event of a batch.
async fn completed_event(env: &bulkops_tests::TestEnv, batch: i64) -> Value {
    env.events
        .of("bulk_batch.completed")
        .await
        .into_iter()
        .find(|e| e.body["batch_id"] == batch)
        .map(|e| e.body)
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_fully_settled_bulk_creates_complete_at_acceptance() {
    let env = crate::env("create_settled").await;
    let w = World::new(&env.db, "Settled Agency").await;
    let ids = plain_individuals(&env, w.agency, 6).await;
    // The Oklahomans (every other one, from the first) all hold a Sales Record already.
    for id in ids.iter().step_by(2) {
        insert(
            &env.db,
            "sales_records",
            &json!({"agency_id": w.agency, "record_type_id": w.record_type, "individual_id": id}),
        )
        .await;
    }
    // No worker: only the accepting transaction can complete these batches.
    let api = env.start(0).await.expect("start");
    let t = w.token();
    let body = |states: &[&str]| json!({"filter": {"individual": {"state": states}}, "record_type_id": w.record_type});

    let r = api
        .post("/v1/bulk/sales-records", &t, &body(&["ZZ"]))
        .await
        .expect("post");
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.json["total"], 0);
    let empty = r.json["batch_id"].as_i64().expect("batch");
    let linked = api
        .bulk_create(&t, &body(&["OK"]))
        .await
        .expect("bulk create");
    let pending = api
        .bulk_create(&t, &body(&["TX"]))
        .await
        .expect("bulk create");

    // Completed the moment they were accepted, with completed_at.
    let got = api
        .get(&format!("/v1/batches/{empty}"), &t)
        .await
        .expect("get");
    assert_eq!(got.json["state"], "completed", "{}", got.text);
    assert!(got.json["completed_at"].is_string(), "{}", got.text);
    assert_eq!(got.json["total"], 0);
    assert_eq!(
        got.json["counts"],
        json!({"pending": 0, "created": 0, "converted": 0, "skipped": 0, "failed": 0})
    );
    let got = api
        .get(&format!("/v1/batches/{linked}"), &t)
        .await
        .expect("get");
    assert_eq!(got.json["state"], "completed", "{}", got.text);
    assert!(got.json["completed_at"].is_string(), "{}", got.text);
    assert_eq!(got.json["counts"]["skipped"], 3);
    // A batch with work to do is not completed by anyone but the workers.
    let got = api
        .get(&format!("/v1/batches/{pending}"), &t)
        .await
        .expect("get");
    assert_ne!(got.json["state"], "completed", "{}", got.text);

    // Their bulk_batch.completed events went out through the outbox, once each.
    check::create_batch(&env, empty).await.expect("history");
    check::create_batch(&env, linked).await.expect("history");
    let ev = completed_event(&env, empty).await;
    assert_eq!(ev["kind"], "create_sales_records", "{ev}");
    assert_eq!(ev["agency_id"], w.agency);
    assert_eq!(ev["total"], 0);
    assert_eq!(
        ev["counts"],
        json!({"pending": 0, "created": 0, "converted": 0, "skipped": 0, "failed": 0})
    );
    let ev = completed_event(&env, linked).await;
    assert_eq!(ev["total"], 3);
    assert_eq!(ev["counts"]["skipped"], 3);
    assert!(completed_event(&env, pending).await.is_null());

    // The batch with work completes once a worker is there.
    env.start_worker().await.expect("worker");
    api.wait_completed(&t, pending, WAIT)
        .await
        .expect("completed");
    check::create_batch(&env, pending).await.expect("history");
    env.finish().await;
}
