//! The API's document and its edges: the OpenAPI 3 document served at
//! `/v1/openapi.json`, request size limits, and Schemathesis run against a live producer.

use std::time::Duration;

use bulkops_tests::fixture::{World, insert};
use bulkops_tests::process::workspace_root;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_limits_and_schemathesis() {
    let env = crate::env("openapi").await;
    let w = World::new(&env.db, "OpenAPI Agency").await;
    for n in 0..30 {
        insert(
            &env.db,
            "individuals",
            &json!({"agency_id": w.agency, "first_name": format!("F{n}"), "state": "TX"}),
        )
        .await;
    }
    let saved = insert(
        &env.db,
        "saved_searches",
        &json!({"agency_id": w.agency, "user_id": w.admin, "name": "Texans", "filter": {"individual": {"state": ["TX"]}}}),
    )
    .await;
    env.set("BULKOPS__HTTP__BODY_LIMIT_BYTES", 65536).await;
    let api = env.start(1).await.expect("start");
    let t = w.token();
    let batch = api
        .bulk_create(&t, &json!({"filter": {}, "record_type_id": w.record_type}))
        .await
        .expect("create");
    api.wait_completed(&t, batch, Duration::from_secs(60))
        .await
        .expect("completed");

    // The document covers the whole API.
    let doc = api.get("/v1/openapi.json", &t).await.expect("openapi");
    assert_eq!(doc.status, StatusCode::OK);
    assert!(
        doc.json["openapi"]
            .as_str()
            .unwrap_or_default()
            .starts_with("3."),
        "{}",
        doc.json["openapi"]
    );
    for path in [
        "/v1/individuals/search",
        "/v1/individuals/search.csv",
        "/v1/saved-searches",
        "/v1/saved-searches/{id}",
        "/v1/bulk/sales-records/preview",
        "/v1/bulk/sales-records",
        "/v1/bulk/conversions",
        "/v1/batches",
        "/v1/batches/{id}",
        "/v1/batches/{id}/items",
        "/v1/batches/{id}/items.csv",
        "/metrics",
        "/healthz",
        "/readyz",
    ] {
        assert!(
            doc.json["paths"].get(path).is_some(),
            "{path} is documented"
        );
    }

    // Request size limit: 413, as a problem document.
    let huge = json!({"sales_record_ids": vec![123_456_789_i64; 20_000]});
    let r = api
        .post("/v1/bulk/conversions", &t, &huge)
        .await
        .expect("post");
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
    assert!(r.content_type().starts_with("application/problem+json"));

    // Schemathesis: no 5xx, every answer as documented, and no warning that generated data
    // was mostly rejected (the document states what the API accepts). The ids it cannot
    // guess are given to it.
    let out = tokio::process::Command::new("bash")
        .arg(workspace_root().join("tests/api/schemathesis.sh"))
        .arg(&api.base)
        .arg(&t)
        .env("ST_RECORD_TYPE_ID", w.record_type.to_string())
        .env("ST_SAVED_SEARCH_ID", saved.to_string())
        .env("ST_BATCH_ID", batch.to_string())
        .output()
        .await
        .expect("schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis failed:\n{text}");
    assert!(
        env.logs().await.lines().all(|l| !l.contains(" ERROR ")),
        "no request failed unexpectedly"
    );
    env.finish().await;
}
