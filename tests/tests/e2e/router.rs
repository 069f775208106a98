//! The router tier: the producer's `Router` driven with `tower::ServiceExt::oneshot`, built
//! by `app::state` on the test's real PostgreSQL, RabbitMQ and Redis, without starting a
//! process or a listener (nor the splitter, monitor and relay that `serve` adds). Auth,
//! 4xx answers and their problem documents, and an accepted batch.

use axum::body::{Body, to_bytes};
use axum::http::{Method, Request, StatusCode, header};
use bulkops_shared::config::{Settings, Sources};
use bulkops_tests::TestEnv;
use bulkops_tests::fixture::World;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// One request through a fresh clone of the router: its status, content type and body.
async fn call(
    app: &axum::Router,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (StatusCode, String, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = match body {
        Some(b) => req
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .expect("request");
    let res = app.clone().oneshot(req).await.expect("router answers");
    let status = res.status();
    let content_type = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes = to_bytes(res.into_body(), 1 << 20).await.expect("body");
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, content_type, json)
}

/// A problem document (RFC 9457) with this status.
fn assert_problem(answer: &(StatusCode, String, Value), status: StatusCode, what: &str) {
    assert_eq!(answer.0, status, "{what}: {}", answer.2);
    assert!(
        answer.1.starts_with("application/problem+json"),
        "{what}: content type {}",
        answer.1
    );
    assert_eq!(answer.2["status"], status.as_u16(), "{what}: {}", answer.2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_answers_auth_errors_and_batches_without_a_process() {
    let env = TestEnv::new("router_oneshot").await.expect("env");
    let settings = Settings::load_from(&Sources {
        env: env.process_env().await.into_iter().collect(),
        ..Sources::default()
    })
    .expect("settings");
    let shutdown = CancellationToken::new();
    let state = bulkops_producer::app::state(&settings, &shutdown)
        .await
        .expect("state");
    let app = bulkops_producer::app::router(state);
    let w = World::new(&env.db, "Router Agency").await;
    let token = w.token();

    // No token, a malformed one: 401 problems, on reads and writes alike.
    for tok in [None, Some("not-a-jwt")] {
        for (method, path) in [
            (Method::GET, "/v1/batches"),
            (Method::POST, "/v1/bulk/sales-records"),
        ] {
            let answer = call(&app, method, path, tok, Some(&json!({}))).await;
            assert_problem(&answer, StatusCode::UNAUTHORIZED, path);
        }
    }
    // A body that is not the request's shape: 400, naming the field.
    let answer = call(
        &app,
        Method::POST,
        "/v1/bulk/sales-records",
        Some(&token),
        Some(&json!({"filter": {}, "record_type_id": "seven"})),
    )
    .await;
    assert_problem(&answer, StatusCode::BAD_REQUEST, "wrong type");
    // A batch that does not exist, a route that does not exist: 404 problems.
    let answer = call(
        &app,
        Method::GET,
        "/v1/batches/999999999",
        Some(&token),
        None,
    )
    .await;
    assert_problem(&answer, StatusCode::NOT_FOUND, "unknown batch");
    let answer = call(&app, Method::GET, "/v1/nowhere", Some(&token), None).await;
    assert_problem(&answer, StatusCode::NOT_FOUND, "unknown route");

    // A search that finds nobody: accepted, and completed by the accepting transaction.
    let answer = call(
        &app,
        Method::POST,
        "/v1/bulk/sales-records",
        Some(&token),
        Some(&json!({"filter": {}, "record_type_id": w.record_type})),
    )
    .await;
    assert_eq!(answer.0, StatusCode::ACCEPTED, "{}", answer.2);
    assert_eq!(answer.2["total"], 0);
    let batch = answer.2["batch_id"].as_i64().expect("batch_id");
    let answer = call(
        &app,
        Method::GET,
        &format!("/v1/batches/{batch}"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(answer.0, StatusCode::OK, "{}", answer.2);
    assert_eq!(answer.2["state"], "completed");
    shutdown.cancel();
    env.finish().await;
}
