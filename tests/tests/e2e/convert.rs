//! Conversion, end to end: both paths field by field, agents, custom fields, children,
//! notes, policies, permissions, tenancy, and repeated worker crashes.

use std::collections::HashSet;
use std::time::Duration;

use bulkops_tests::api::token;
use bulkops_tests::check;
use bulkops_tests::fixture::{self, World, insert, row, rows};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(180);

const TRANSFERRED: [(&str, &str); 25] = [
    ("first_name", "first_name"),
    ("middle_name", "middle_name"),
    ("last_name", "last_name"),
    ("nickname", "nickname"),
    ("title", "title"),
    ("status", "status"),
    ("birth_date", "dob"),
    ("secondary_email", "secondary_email"),
    ("phone", "home_phone"),
    ("cell_phone", "cell_phone"),
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
    ("gender", "gender"),
    ("smoker_status", "smoker_status"),
    ("lead_source", "lead_source"),
    ("lead_date", "lead_date"),
    ("drivers_license_number", "drivers_license_number"),
    ("address_type", "address_type"),
    ("address_line1", "address_line1"),
    ("city", "city"),
    ("state", "state"),
    ("zip", "zip"),
    ("county", "county"),
];

fn full_sales_record(
    agency: i64,
    record_type: i64,
    assigned: Option<i64>,
    individual: Option<i64>,
    n: i64,
) -> Value {
    json!({
        "agency_id": agency, "record_type_id": record_type, "assigned_user_id": assigned, "individual_id": individual,
        "first_name": format!("SrFirst{n}"), "middle_name": "Q", "last_name": format!("SrLast{n}"), "nickname": "Sunny",
        "title": "Ms.", "status": "Won", "birth_date": "1952-03-04", "secondary_email": format!("sr{n}@example.org"),
        "phone": "555-3000", "cell_phone": "555-3001", "medicare_beneficiary_id": format!("9AA9-AA9-AA{n:02}"),
        "medicare_part_a_effective_date": "2017-01-01", "medicare_part_b_effective_date": "2017-02-01",
        "ssn": format!("987-65-{n:04}"), "gender": "Female", "smoker_status": "Former smoker", "lead_source": "Seminar",
        "lead_date": "2026-02-03", "drivers_license_number": "DL-SR", "address_type": "Mailing",
        "address_line1": "9 Ranch Rd", "city": "Plano", "state": "TX", "zip": "75001", "county": "Collin",
    })
}

const TYPES: [&str; 12] = [
    "text",
    "textarea",
    "date",
    "dropdown",
    "email",
    "phone",
    "url",
    "number",
    "currency",
    "percent",
    "checkbox",
    "checkbox_list",
];

fn value_of(t: &str) -> Value {
    match t {
        "number" => json!(4),
        "currency" => json!(99.5),
        "percent" => json!(0.15),
        "checkbox" => json!(true),
        "checkbox_list" => json!(["x", "y"]),
        "date" => json!("2026-05-05"),
        _ => json!(format!("value of {t}")),
    }
}

/// Gives a Sales Record one row in every child table, three notes at distinct times and an
/// SOA note; returns the SOA note's id and the plain notes' (created_at, subject, body).
async fn children(
    db: &sea_orm::DatabaseConnection,
    agency: i64,
    sr: i64,
) -> (i64, Vec<(String, String, String)>) {
    let owner = |extra: Value| {
        let mut base = json!({"agency_id": agency, "owner_type": "sales_record", "owner_id": sr});
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        base
    };
    insert(
        db,
        "activities",
        &owner(json!({"kind": "call", "subject": "Call back"})),
    )
    .await;
    insert(
        db,
        "attachments",
        &owner(json!({"file_name": "soa.pdf", "storage_key": "k/1", "is_soa": true})),
    )
    .await;
    insert(
        db,
        "call_recordings",
        &owner(json!({"storage_key": "rec/1", "duration_seconds": 60})),
    )
    .await;
    insert(
        db,
        "sms_messages",
        &owner(json!({"direction": "in", "body": "ok"})),
    )
    .await;
    insert(
        db,
        "prescriptions",
        &owner(json!({"drug_name": "Metformin"})),
    )
    .await;
    insert(db, "providers", &owner(json!({"name": "Dr. Who"}))).await;
    insert(
        db,
        "change_history",
        &owner(json!({"field": "status", "old_value": "New", "new_value": "Won"})),
    )
    .await;
    insert(
        db,
        "aca_consents",
        &owner(json!({"consent_type": "attestation"})),
    )
    .await;
    insert(
        db,
        "scope_of_appointments",
        &owner(json!({"products": "MA"})),
    )
    .await;
    let soa = insert(db, "notes", &owner(json!({"subject": "SOA", "body": "signed", "contains_soa": true, "created_at": "2026-01-01T10:00:00Z"}))).await;
    let plain = vec![
        (
            "2026-03-01T09:00:00Z".to_owned(),
            "Second".to_owned(),
            "two".to_owned(),
        ),
        (
            "2026-01-15T08:30:00Z".to_owned(),
            "First".to_owned(),
            "one".to_owned(),
        ),
        (
            "2026-04-20T17:45:10Z".to_owned(),
            "Third".to_owned(),
            "three".to_owned(),
        ),
    ];
    for (at, subject, body) in &plain {
        insert(
            db,
            "notes",
            &owner(json!({"subject": subject, "body": body, "created_at": at})),
        )
        .await;
    }
    (soa, plain)
}

async fn owned_by(
    db: &sea_orm::DatabaseConnection,
    table: &str,
    owner_type: &str,
    owner: i64,
) -> i64 {
    rows(
        db,
        &format!(
            "SELECT to_jsonb(count(*)) AS j FROM {table} WHERE owner_type = $1 AND owner_id = $2"
        ),
        vec![owner_type.into(), owner.into()],
    )
    .await[0]
        .as_i64()
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converting_into_a_new_individual_moves_everything() {
    let env = crate::env("convert_new").await;
    let db = &env.db;
    let w = World::new(db, "Convert Agency").await;
    let assignee = fixture::user(db, w.agency, "agent_crm_user").await;
    let a1 = fixture::agent(db, w.agency).await;
    let a2 = fixture::agent(db, w.agency).await;
    fixture::link(db, assignee, a2, 2).await;
    fixture::link(db, assignee, a1, 1).await;
    let sr = insert(
        db,
        "sales_records",
        &full_sales_record(w.agency, w.record_type, Some(assignee), None, 1),
    )
    .await;
    let (soa, plain) = children(db, w.agency, sr).await;
    for t in TYPES {
        let name = format!("CF {t}");
        let src = fixture::custom_field(db, w.agency, "sales_record", &name, t).await;
        fixture::custom_field(db, w.agency, "individual", &name, t).await;
        fixture::custom_value(db, src, sr, value_of(t)).await;
    }
    let unmatched = fixture::custom_field(db, w.agency, "sales_record", "Nowhere", "text").await;
    fixture::custom_value(db, unmatched, sr, json!("dropped")).await;
    let converted_policy = insert(db, "sales_policies", &json!({"agency_id": w.agency, "sales_record_id": sr, "coverage_type": "Medicare Advantage", "status": "Conversion", "carrier": "Humana", "carrier_product": "Gold PPO", "effective_date": "2026-07-01", "renewal_date": "2027-07-01", "policy_number": "MA-1"})).await;
    insert(db, "sales_policies", &json!({"agency_id": w.agency, "sales_record_id": sr, "status": "Quoted", "policy_number": "Q-1"})).await;
    let spf = fixture::custom_field(db, w.agency, "sales_policy", "Premium", "currency").await;
    fixture::custom_field(db, w.agency, "policy", "Premium", "currency").await;
    fixture::custom_value(db, spf, converted_policy, json!(123.45)).await;
    let individuals_before = env.count("SELECT count(*) FROM individuals").await;

    let api = env.start(2).await.expect("start");
    let t = w.token();
    let batch = api.convert(&t, &[sr]).await.expect("convert");
    let done = api
        .wait_completed(&t, batch, WAIT)
        .await
        .expect("completed");
    assert_eq!(done["kind"], "convert_sales_records");
    assert_eq!(
        done["counts"],
        json!({"pending": 0, "created": 0, "converted": 1, "skipped": 0, "failed": 0})
    );
    check::convert_batch(&env, batch, &Default::default())
        .await
        .expect("history");
    assert_eq!(
        env.count("SELECT count(*) FROM individuals").await,
        individuals_before + 1
    );

    let items = api.items(&t, batch).await.expect("items");
    let ind_id = items[0]["result_id"].as_i64().expect("individual");
    let ind = row(db, "individuals", ind_id).await;
    let source = full_sales_record(w.agency, w.record_type, Some(assignee), None, 1);
    for (from, to) in TRANSFERRED {
        assert_eq!(ind[to], source[from], "{from} → {to}");
    }
    assert_eq!(ind["agency_id"], w.agency);
    assert_eq!(
        ind["servicing_agent_id"], a1,
        "first linked agent by position"
    );
    assert_eq!(ind["additional_agent_1_id"], a2);
    assert!(ind["additional_agent_2_id"].is_null());
    assert!(
        row(db, "sales_records", sr).await.is_null(),
        "the Sales Record is deleted"
    );

    // Custom fields of every type move; the unmatched one goes with the record.
    let moved = fixture::custom_values(db, "individual", ind_id).await;
    for t in TYPES {
        assert_eq!(
            moved.get(&format!("CF {t}")),
            Some(&value_of(t)),
            "custom field of type {t}"
        );
    }
    assert_eq!(moved.len(), 12);
    assert!(
        fixture::custom_values(db, "sales_record", sr)
            .await
            .is_empty()
    );

    // Children re-owned, one each.
    for t in [
        "activities",
        "attachments",
        "call_recordings",
        "sms_messages",
        "prescriptions",
        "providers",
        "change_history",
        "aca_consents",
        "scope_of_appointments",
    ] {
        assert_eq!(owned_by(db, t, "individual", ind_id).await, 1, "{t}");
        assert_eq!(owned_by(db, t, "sales_record", sr).await, 0, "{t}");
    }
    // Notes: the SOA note as it was; the others combined, oldest first, and gone.
    let soa_row = row(db, "notes", soa).await;
    assert_eq!(soa_row["owner_type"], "individual");
    assert_eq!(soa_row["owner_id"], ind_id);
    assert_eq!(soa_row["subject"], "SOA");
    assert_eq!(soa_row["body"], "signed");
    let notes = rows(db, "SELECT to_jsonb(n) AS j FROM notes n WHERE owner_type = 'individual' AND owner_id = $1 AND NOT contains_soa", vec![ind_id.into()]).await;
    assert_eq!(notes.len(), 1, "exactly one Conversion note");
    assert_eq!(notes[0]["subject"], "Conversion");
    assert_eq!(notes[0]["created_by_user_id"], w.admin);
    let body = notes[0]["body"].as_str().expect("body");
    let mut order = Vec::new();
    for (at, subject, text) in &plain {
        let date = &at[..10];
        let time = &at[11..19];
        let pos = body
            .find(&format!("{date} {time}"))
            .unwrap_or_else(|| panic!("{at} in {body}"));
        assert!(
            body[pos..].contains(subject.as_str()) && body.contains(text.as_str()),
            "{subject} in {body}"
        );
        order.push((pos, subject.clone()));
    }
    order.sort();
    assert_eq!(
        order.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>(),
        vec!["First", "Second", "Third"]
    );
    assert_eq!(owned_by(db, "notes", "sales_record", sr).await, 0);

    // Only the lead-conversion policy became a policy, with its custom field.
    let policies = rows(
        db,
        "SELECT to_jsonb(p) AS j FROM policies p WHERE individual_id = $1",
        vec![ind_id.into()],
    )
    .await;
    assert_eq!(policies.len(), 1);
    let p = &policies[0];
    for (k, v) in [
        ("coverage_type", "Medicare Advantage"),
        ("status", "Conversion"),
        ("carrier", "Humana"),
        ("carrier_product", "Gold PPO"),
        ("effective_date", "2026-07-01"),
        ("renewal_date", "2027-07-01"),
        ("policy_number", "MA-1"),
    ] {
        assert_eq!(p[k], v, "{k}");
    }
    let policy_id = p["id"].as_i64().expect("id");
    assert_eq!(
        fixture::custom_values(db, "policy", policy_id)
            .await
            .get("Premium"),
        Some(&json!(123.45))
    );
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM sales_policies WHERE sales_record_id = {sr}"
        ))
        .await,
        0
    );
    assert!(
        fixture::custom_values(db, "sales_policy", converted_policy)
            .await
            .is_empty()
    );

    let events = env.events.of("sales_record.converted").await;
    assert_eq!(events.len(), 1);
    let e = &events[0].body;
    assert_eq!(e["sales_record_id"], sr);
    assert_eq!(e["individual_id"], ind_id);
    assert_eq!(e["merged"], false);
    assert_eq!(e["policy_ids"], json!([policy_id]));
    assert_eq!(e["batch_id"], batch);
    assert_eq!(e["agency_id"], w.agency);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merging_overwrites_with_values_never_erases_and_records_changes() {
    let env = crate::env("convert_merge").await;
    let db = &env.db;
    let w = World::new(db, "Merge Agency").await;
    let agent = fixture::agent(db, w.agency).await;
    let ind = insert(db, "individuals", &json!({
        "agency_id": w.agency, "first_name": "Old", "last_name": "Same", "nickname": "Keepme", "home_phone": "111",
        "dob": "1950-01-01", "city": "Austin", "servicing_agent_id": agent, "additional_agent_1_id": agent,
    })).await;
    let cf_src = fixture::custom_field(db, w.agency, "sales_record", "Tier", "dropdown").await;
    let cf_dst = fixture::custom_field(db, w.agency, "individual", "Tier", "dropdown").await;
    fixture::custom_value(db, cf_dst, ind, json!("Silver")).await;
    // The Sales Record has no assigned user: the Individual keeps its agents.
    let sr = insert(db, "sales_records", &json!({
        "agency_id": w.agency, "record_type_id": w.record_type, "individual_id": ind,
        "first_name": "New", "last_name": "Same", "nickname": null, "phone": "222", "birth_date": "1950-01-01",
        "city": null, "status": "Won",
    })).await;
    fixture::custom_value(db, cf_src, sr, json!("Gold")).await;
    let individuals_before = env.count("SELECT count(*) FROM individuals").await;

    let api = env.start(1).await.expect("start");
    let t = w.token();
    let batch = api.convert(&t, &[sr]).await.expect("convert");
    api.wait_completed(&t, batch, WAIT)
        .await
        .expect("completed");
    check::convert_batch(&env, batch, &Default::default())
        .await
        .expect("history");
    assert_eq!(
        env.count("SELECT count(*) FROM individuals").await,
        individuals_before,
        "no new Individual"
    );
    let items = api.items(&t, batch).await.expect("items");
    assert_eq!(items[0]["status"], "converted");
    assert_eq!(items[0]["result_id"], ind);

    let after = row(db, "individuals", ind).await;
    assert_eq!(after["first_name"], "New", "a non-NULL value overwrites");
    assert_eq!(after["home_phone"], "222");
    assert_eq!(after["status"], "Won");
    assert_eq!(after["nickname"], "Keepme", "NULL never erases");
    assert_eq!(after["city"], "Austin");
    assert_eq!(after["last_name"], "Same");
    assert_eq!(
        after["servicing_agent_id"], agent,
        "no assigned user: agents kept"
    );
    assert_eq!(after["additional_agent_1_id"], agent);
    assert_eq!(
        fixture::custom_values(db, "individual", ind)
            .await
            .get("Tier"),
        Some(&json!("Gold"))
    );

    let changes = rows(db, "SELECT jsonb_build_object('field', field, 'old', old_value, 'new', new_value, 'by', changed_by_user_id) AS j
                             FROM change_history WHERE owner_type = 'individual' AND owner_id = $1 ORDER BY field", vec![ind.into()]).await;
    let got: HashSet<(String, Value, Value)> = changes
        .iter()
        .map(|c| {
            assert_eq!(c["by"], w.admin, "changed_by_user_id is the acting user");
            (
                c["field"].as_str().unwrap_or_default().to_owned(),
                c["old"].clone(),
                c["new"].clone(),
            )
        })
        .collect();
    let want: HashSet<(String, Value, Value)> = [
        ("first_name", json!("Old"), json!("New")),
        ("home_phone", json!("111"), json!("222")),
        ("status", Value::Null, json!("Won")),
        ("custom_field:Tier", json!("\"Silver\""), json!("\"Gold\"")),
    ]
    .into_iter()
    .map(|(f, o, n)| (f.to_owned(), o, n))
    .collect();
    assert_eq!(
        got, want,
        "one row per changed value, none for unchanged or NULL ones"
    );

    let e = &env.events.of("sales_record.converted").await[0].body;
    assert_eq!(e["merged"], true);
    assert_eq!(e["individual_id"], ind);
    assert_eq!(e["policy_ids"], json!([]));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_come_from_the_first_three_linked_agents() {
    let env = crate::env("convert_agents").await;
    let db = &env.db;
    let w = World::new(db, "Agents Agency").await;
    let mut cases = Vec::new();
    for n in 0..=4 {
        let u = fixture::user(db, w.agency, "agent_crm_user").await;
        let mut agents = Vec::new();
        for p in 0..n {
            agents.push(fixture::agent(db, w.agency).await);
            let _ = p;
        }
        // Link in reverse so that position, not insertion order, decides.
        for (p, a) in agents.iter().enumerate().rev() {
            fixture::link(db, u, *a, i32::try_from(p).unwrap_or(0) + 1).await;
        }
        let sr = insert(db, "sales_records", &json!({"agency_id": w.agency, "record_type_id": w.record_type, "assigned_user_id": u, "first_name": format!("N{n}")})).await;
        cases.push((sr, agents));
    }
    let unassigned = insert(
        db,
        "sales_records",
        &json!({"agency_id": w.agency, "record_type_id": w.record_type, "first_name": "Nobody"}),
    )
    .await;
    // Merge where the assigned user has no linked agent: the Individual keeps its agents.
    let kept_agent = fixture::agent(db, w.agency).await;
    let lonely_user = fixture::user(db, w.agency, "agent_crm_user").await;
    let ind = insert(db, "individuals", &json!({"agency_id": w.agency, "servicing_agent_id": kept_agent, "additional_agent_2_id": kept_agent})).await;
    let merging = insert(db, "sales_records", &json!({"agency_id": w.agency, "record_type_id": w.record_type, "assigned_user_id": lonely_user, "individual_id": ind})).await;

    let api = env.start(1).await.expect("start");
    let t = w.token();
    let mut ids: Vec<i64> = cases.iter().map(|(sr, _)| *sr).collect();
    ids.push(unassigned);
    ids.push(merging);
    let batch = api.convert(&t, &ids).await.expect("convert");
    api.wait_completed(&t, batch, WAIT)
        .await
        .expect("completed");
    check::convert_batch(&env, batch, &Default::default())
        .await
        .expect("history");
    let items = api.items(&t, batch).await.expect("items");
    let result = |sr: i64| {
        items
            .iter()
            .find(|i| i["target_id"] == sr)
            .and_then(|i| i["result_id"].as_i64())
            .expect("result")
    };
    for (sr, agents) in &cases {
        let ind = row(db, "individuals", result(*sr)).await;
        let want = |k: usize| agents.get(k).map_or(Value::Null, |a| json!(a));
        assert_eq!(
            ind["servicing_agent_id"],
            want(0),
            "{} linked agents",
            agents.len()
        );
        assert_eq!(
            ind["additional_agent_1_id"],
            want(1),
            "{} linked agents",
            agents.len()
        );
        assert_eq!(
            ind["additional_agent_2_id"],
            want(2),
            "{} linked agents",
            agents.len()
        );
    }
    let nobody = row(db, "individuals", result(unassigned)).await;
    assert!(nobody["servicing_agent_id"].is_null() && nobody["additional_agent_1_id"].is_null());
    let merged = row(db, "individuals", result(merging)).await;
    assert_eq!(merged["id"], ind);
    assert_eq!(merged["servicing_agent_id"], kept_agent);
    assert_eq!(merged["additional_agent_2_id"], kept_agent);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merging_keeps_the_agent_slots_the_linked_agents_do_not_fill() {
    // Rules 3 and 5 together: on merge, the assigned user's first three Linked Agents fill
    // the servicing and additional agent slots; a slot they do not fill is not NULLed (a
    // NULL never erases the Individual's data). Only changed slots are recorded.
    let env = crate::env("convert_merge_agents").await;
    let db = &env.db;
    let w = World::new(db, "Merge Agents Agency").await;
    let old = [
        fixture::agent(db, w.agency).await,
        fixture::agent(db, w.agency).await,
        fixture::agent(db, w.agency).await,
    ];
    let mut cases = Vec::new();
    for n in 1..=2 {
        let u = fixture::user(db, w.agency, "agent_crm_user").await;
        let mut linked = Vec::new();
        for p in 0..n {
            let a = fixture::agent(db, w.agency).await;
            fixture::link(db, u, a, p + 1).await;
            linked.push(a);
        }
        let ind = insert(db, "individuals", &json!({"agency_id": w.agency, "first_name": format!("M{n}"),
            "servicing_agent_id": old[0], "additional_agent_1_id": old[1], "additional_agent_2_id": old[2]})).await;
        let sr = insert(
            db,
            "sales_records",
            &json!({"agency_id": w.agency, "record_type_id": w.record_type,
            "assigned_user_id": u, "individual_id": ind}),
        )
        .await;
        cases.push((sr, ind, linked));
    }
    let api = env.start(1).await.expect("start");
    let t = w.token();
    let ids: Vec<i64> = cases.iter().map(|(sr, _, _)| *sr).collect();
    let batch = api.convert(&t, &ids).await.expect("convert");
    api.wait_completed(&t, batch, WAIT)
        .await
        .expect("completed");
    check::convert_batch(&env, batch, &Default::default())
        .await
        .expect("history");
    for (_, ind, linked) in &cases {
        let after = row(db, "individuals", *ind).await;
        let slots = [
            "servicing_agent_id",
            "additional_agent_1_id",
            "additional_agent_2_id",
        ];
        for (k, slot) in slots.iter().enumerate() {
            let want = linked.get(k).copied().unwrap_or(old[k]);
            assert_eq!(
                after[*slot],
                json!(want),
                "{slot} with {} linked agents",
                linked.len()
            );
        }
        let changed = rows(
            db,
            "SELECT jsonb_build_array(field, old_value, new_value) AS j FROM change_history
              WHERE owner_type = 'individual' AND owner_id = $1 AND field LIKE '%agent%' ORDER BY field",
            vec![(*ind).into()],
        )
        .await;
        let mut want: Vec<Value> = linked
            .iter()
            .enumerate()
            .map(|(k, a)| json!([slots[k], old[k].to_string(), a.to_string()]))
            .collect();
        want.sort_by_key(|v| v[0].as_str().unwrap_or_default().to_owned());
        assert_eq!(
            changed,
            want,
            "only the filled slots change, {} linked agents",
            linked.len()
        );
    }
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_types_other_agencies_enhanced_records_and_403s() {
    let env = crate::env("convert_rights").await;
    let db = &env.db;
    let w = World::new(db, "Rights Agency").await;
    let restricted_type = insert(
        db,
        "sales_record_types",
        &json!({"agency_id": w.agency, "name": "Final Expense"}),
    )
    .await;
    // The admin may view and edit but not delete this type.
    fixture::permit(db, w.admin, restricted_type, true, true, false).await;
    let allowed = insert(
        db,
        "sales_records",
        &json!({"agency_id": w.agency, "record_type_id": w.record_type, "first_name": "Yes"}),
    )
    .await;
    let forbidden = insert(
        db,
        "sales_records",
        &json!({"agency_id": w.agency, "record_type_id": restricted_type, "first_name": "No"}),
    )
    .await;
    insert(db, "notes", &json!({"agency_id": w.agency, "owner_type": "sales_record", "owner_id": forbidden, "subject": "kept"})).await;
    let other = World::new(db, "Other Agency").await;
    let foreign = insert(db, "sales_records", &json!({"agency_id": other.agency, "record_type_id": other.record_type, "first_name": "Theirs"})).await;
    let before = check::owned_rows(&env, &[forbidden, foreign]).await;

    let api = env.start(1).await.expect("start");
    let t = w.token();
    let body = json!({"sales_record_ids": [allowed, forbidden, foreign, 987_654_321, allowed]});
    let key = [("Idempotency-Key", "convert-once")];
    let r = api
        .send(
            Method::POST,
            "/v1/bulk/conversions",
            Some(&t),
            Some(&body),
            &key,
        )
        .await
        .expect("post");
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.json["total"], 4, "repeats count once");
    let batch = r.json["batch_id"].as_i64().expect("batch");
    let replay = api
        .send(
            Method::POST,
            "/v1/bulk/conversions",
            Some(&t),
            Some(&body),
            &key,
        )
        .await
        .expect("post");
    assert_eq!(replay.json, r.json);
    api.wait_completed(&t, batch, WAIT)
        .await
        .expect("completed");
    check::convert_batch(&env, batch, &before)
        .await
        .expect("history");
    let items = api.items(&t, batch).await.expect("items");
    let outcome = |sr: i64| {
        let i = items.iter().find(|i| i["target_id"] == sr).expect("item");
        (
            i["status"].as_str().unwrap_or_default().to_owned(),
            i["reason"].clone(),
        )
    };
    assert_eq!(outcome(allowed).0, "converted");
    assert_eq!(
        outcome(forbidden),
        ("failed".to_owned(), json!("forbidden"))
    );
    assert_eq!(outcome(foreign), ("failed".to_owned(), json!("not_found")));
    assert_eq!(
        outcome(987_654_321),
        ("failed".to_owned(), json!("not_found"))
    );
    assert!(
        !row(db, "sales_records", forbidden).await.is_null(),
        "forbidden is untouched"
    );
    assert!(
        !row(db, "sales_records", foreign).await.is_null(),
        "another agency's record is untouched"
    );

    // Converted earlier by another batch: skipped, naming its Individual.
    let again = api.convert(&t, &[allowed]).await.expect("convert");
    api.wait_completed(&t, again, WAIT)
        .await
        .expect("completed");
    let first_result = items
        .iter()
        .find(|i| i["target_id"] == allowed)
        .expect("item")["result_id"]
        .clone();
    let again_items = api.items(&t, again).await.expect("items");
    assert_eq!(again_items[0]["status"], "skipped");
    assert_eq!(again_items[0]["reason"], "already_converted");
    assert_eq!(again_items[0]["result_id"], first_result);

    // 403: a user of kind 'other', one without Sales Enablement, one without full rights.
    let other_kind = fixture::user(db, w.agency, "other").await;
    fixture::join(db, other_kind, w.full_group).await;
    fixture::permit(db, other_kind, w.record_type, true, true, true).await;
    let no_sales = fixture::user(db, w.agency, "agency_user").await;
    fixture::permit(db, no_sales, w.record_type, true, true, true).await;
    let partial = fixture::user(db, w.agency, "agency_user").await;
    fixture::join(db, partial, w.full_group).await;
    fixture::permit(db, partial, w.record_type, true, true, false).await;
    for user in [other_kind, no_sales, partial] {
        let r = api
            .post(
                "/v1/bulk/conversions",
                &token(user, w.agency),
                &json!({"sales_record_ids": [forbidden]}),
            )
            .await
            .expect("post");
        assert_eq!(r.status, StatusCode::FORBIDDEN, "user {user}: {}", r.text);
    }
    for bad in [
        json!({"sales_record_ids": []}),
        json!({"sales_record_ids": "1,2"}),
        json!({"ids": [1]}),
    ] {
        let r = api
            .post("/v1/bulk/conversions", &t, &bad)
            .await
            .expect("post");
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.text);
    }
    let too_many: Vec<i64> = (1..=100_001).collect();
    let r = api
        .post(
            "/v1/bulk/conversions",
            &t,
            &json!({"sales_record_ids": too_many}),
        )
        .await
        .expect("post");
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json["errors"][0]["field"], "sales_record_ids");

    // Enhanced Records agencies cannot convert.
    let enhanced = World::new(db, "Enhanced Agency").await;
    bulkops_tests::fixture::rows(
        db,
        "UPDATE agencies SET enhanced_records = true WHERE id = $1 RETURNING to_jsonb(id) AS j",
        vec![enhanced.agency.into()],
    )
    .await;
    let r = api
        .post(
            "/v1/bulk/conversions",
            &enhanced.token(),
            &json!({"sales_record_ids": [1]}),
        )
        .await
        .expect("post");
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert!(
        r.json["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("Enhanced Records")
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversion_batch_survives_workers_killed_again_and_again() {
    let env = crate::env("convert_kill").await;
    let db = &env.db;
    let seeded = bulkops_cli::seed::seed_agency(
        db,
        &bulkops_cli::seed::AgencySpec {
            name: "Kill Agency".into(),
            individuals: 1500,
            linked_share: 0.5,
            seed: 0.3,
        },
    )
    .await
    .expect("seed");
    let mut ids = bulkops_cli::seed::create_leads(db, seeded.agency_id, 1500, 0.2)
        .await
        .expect("leads");
    ids.extend(
        rows(
            db,
            "SELECT to_jsonb(id) AS j FROM sales_records WHERE individual_id IS NOT NULL",
            vec![],
        )
        .await
        .iter()
        .filter_map(Value::as_i64),
    );
    bulkops_cli::seed::enrich_leads(
        db,
        seeded.agency_id,
        &ids,
        bulkops_cli::seed::LeadProfile::DEMO,
    )
    .await
    .expect("enrich");
    let before = check::owned_rows(&env, &ids).await;
    env.set("BULKOPS__WORKER__CHUNK_SIZE", 40).await;
    let (_, api) = env.start_producer().await.expect("producer");
    env.start_worker().await.expect("worker");
    let mut victim = env.start_worker().await.expect("worker");
    let t = token(seeded.admin_user_id, seeded.agency_id);
    let batch = api.convert(&t, &ids).await.expect("convert");
    let total = i64::try_from(ids.len()).unwrap_or(0);
    for round in 0..4 {
        let target = total * (round + 1) / 6;
        let started = std::time::Instant::now();
        while env
            .count(&format!(
                "SELECT n_converted + n_skipped + n_failed FROM bulk_batch_live_counts WHERE batch_id = {batch}"
            ))
            .await
            < target
            && started.elapsed() < WAIT
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        victim.lock().await.signal("KILL").expect("kill");
        victim = env.start_worker().await.expect("replacement");
    }
    api.wait_completed(&t, batch, WAIT)
        .await
        .expect("completed");
    let s = check::convert_batch(&env, batch, &before)
        .await
        .expect("history");
    assert_eq!(s.by_status["converted"], total, "{s:?}");
    assert_eq!(env.count("SELECT count(*) FROM sales_records").await, 0);
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM conversion_log WHERE batch_id = {batch}"
        ))
        .await,
        total
    );
    // Every converted record left exactly one Conversion note on its Individual.
    let notes = env
        .count("SELECT count(*) FROM (SELECT owner_id FROM notes WHERE subject = 'Conversion' GROUP BY owner_id HAVING count(*) > 1) d")
        .await;
    assert_eq!(notes, 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversion_whose_every_item_is_settled_completes_at_acceptance() {
    let env = crate::env("convert_settled").await;
    let db = &env.db;
    let w = World::new(db, "Settled Leads").await;
    let restricted_type = insert(
        db,
        "sales_record_types",
        &json!({"agency_id": w.agency, "name": "Final Expense"}),
    )
    .await;
    fixture::permit(db, w.admin, restricted_type, true, true, false).await;
    let forbidden = insert(
        db,
        "sales_records",
        &json!({"agency_id": w.agency, "record_type_id": restricted_type, "first_name": "No"}),
    )
    .await;
    let other = World::new(db, "Other Agency").await;
    let foreign = insert(
        db,
        "sales_records",
        &json!({"agency_id": other.agency, "record_type_id": other.record_type}),
    )
    .await;
    // A Sales Record converted long ago: only its log row is left.
    let became = insert(
        db,
        "individuals",
        &json!({"agency_id": w.agency, "first_name": "Was A Lead"}),
    )
    .await;
    let converted_earlier = 880_000_001_i64;
    fixture::insert_plain(
        db,
        "conversion_log",
        &json!({"sales_record_id": converted_earlier, "agency_id": w.agency, "individual_id": became, "merged": false}),
    )
    .await;
    let before = check::owned_rows(&env, &[forbidden, foreign]).await;

    // No worker: only the accepting transaction can complete the batch.
    let api = env.start(0).await.expect("start");
    let t = w.token();
    let batch = api
        .convert(&t, &[forbidden, foreign, 987_654_321, converted_earlier])
        .await
        .expect("convert");
    let got = api
        .get(&format!("/v1/batches/{batch}"), &t)
        .await
        .expect("get");
    assert_eq!(got.json["state"], "completed", "{}", got.text);
    assert!(got.json["completed_at"].is_string(), "{}", got.text);
    assert_eq!(
        got.json["counts"],
        json!({"pending": 0, "created": 0, "converted": 0, "skipped": 1, "failed": 3})
    );
    check::convert_batch(&env, batch, &before)
        .await
        .expect("history");
    let ev = env
        .events
        .of("bulk_batch.completed")
        .await
        .into_iter()
        .find(|e| e.body["batch_id"] == batch)
        .expect("completed event")
        .body;
    assert_eq!(ev["kind"], "convert_sales_records");
    assert_eq!(ev["total"], 4);
    assert_eq!(ev["counts"]["failed"], 3);
    assert_eq!(ev["counts"]["skipped"], 1);
    let items = api.items(&t, batch).await.expect("items");
    let skipped = items
        .iter()
        .find(|i| i["target_id"] == converted_earlier)
        .expect("item");
    assert_eq!(skipped["reason"], "already_converted");
    assert_eq!(skipped["result_id"], became);
    // A conversion batch cannot be empty: it needs at least one id.
    let r = api
        .post("/v1/bulk/conversions", &t, &json!({"sales_record_ids": []}))
        .await
        .expect("post");
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    env.finish().await;
}
