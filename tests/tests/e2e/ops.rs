//! Operating it: the `bulkops` CLI driven end to end against real services (batches,
//! items, dead letters listed and replayed after a fix), and both programs' metrics checked
//! by `promtool check metrics` and against the Grafana dashboard's queries.

use std::time::Duration;

use bulkops_tests::fixture::{World, rows};
use bulkops_tests::process::workspace_root;
use serde_json::json;

async fn metrics_file(env: &bulkops_tests::TestEnv, base: &str, name: &str) -> std::path::PathBuf {
    let body = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let path = env.log_dir.join(format!("{name}.prom"));
    tokio::fs::write(&path, body).await.expect("write");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_batches_dead_letters_and_metrics() {
    let env = crate::env("ops").await;
    let w = World::new(&env.db, "Ops Agency").await;
    rows(
        &env.db,
        "WITH ins AS (INSERT INTO individuals (agency_id, first_name)
                      SELECT $1, CASE WHEN g % 10 = 0 THEN 'Refused' ELSE 'Fine' END FROM generate_series(1, 200) g
                      RETURNING id) SELECT to_jsonb(count(*)) AS j FROM ins",
        vec![w.agency.into()],
    )
    .await;
    // Data the database refuses today: twenty items fail permanently and are dead-lettered.
    use sea_orm::ConnectionTrait;
    env.db
        .execute_unprepared("ALTER TABLE sales_records ADD CONSTRAINT ops_no_refused CHECK (first_name IS DISTINCT FROM 'Refused')")
        .await
        .expect("constraint");
    let (_, api) = env.start_producer().await.expect("producer");
    let worker = env.start_worker().await.expect("worker");
    let other_worker = env.start_worker().await.expect("worker");
    let t = w.token();
    let batch = api
        .bulk_create(&t, &json!({"filter": {}, "record_type_id": w.record_type}))
        .await
        .expect("create");
    let done = api
        .wait_completed(&t, batch, Duration::from_secs(120))
        .await
        .expect("completed");
    assert_eq!(done["counts"]["created"], 180, "{done}");
    assert_eq!(done["counts"]["failed"], 20, "{done}");

    let b = batch.to_string();
    let (ok, list, err) = env
        .cli(&["batch", "list", "--agency", &w.agency.to_string()])
        .await
        .expect("cli");
    assert!(ok.success(), "{err}");
    assert!(
        list.contains(&format!("batch {batch} create_sales_records completed")),
        "{list}"
    );
    let (ok, show, err) = env.cli(&["batch", "show", &b]).await.expect("cli");
    assert!(ok.success(), "{err}");
    let shown: serde_json::Value = serde_json::from_str(&show).expect("JSON");
    assert_eq!(shown["counts"]["failed"], 20);
    let (ok, csv, err) = env
        .cli(&["batch", "items", &b, "--status", "failed", "--csv"])
        .await
        .expect("cli");
    assert!(ok.success(), "{err}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "seq,target_id,status,result_id,reason");
    assert_eq!(lines.len(), 21, "{csv}");
    assert!(
        lines[1..].iter().all(|l| l.ends_with(",failed,,error")),
        "{csv}"
    );

    let (ok, dead, err) = env.cli(&["dlq", "list", "--batch", &b]).await.expect("cli");
    assert!(ok.success(), "{err}");
    let entries: Vec<&str> = dead
        .lines()
        .filter(|l| l.starts_with(&format!("batch {batch} ")))
        .collect();
    assert_eq!(entries.len(), 20, "{dead}");
    assert!(
        entries
            .iter()
            .all(|l| l.contains("reason error") && l.contains("db_23514")),
        "{dead}"
    );

    // The fix, then the replay: the items get a real outcome and the batch completes again.
    env.db
        .execute_unprepared("ALTER TABLE sales_records DROP CONSTRAINT ops_no_refused")
        .await
        .expect("fix");
    let (ok, replayed, err) = env
        .cli(&["dlq", "replay", "--batch", &b])
        .await
        .expect("cli");
    assert!(ok.success(), "{err}");
    assert!(replayed.contains("replayed 20"), "{replayed}");
    let (ok, watched, err) = env.cli(&["batch", "watch", &b]).await.expect("cli");
    assert!(ok.success(), "{err}");
    assert!(
        watched.contains("created 200") && watched.contains("failed 0"),
        "{watched}"
    );
    let after = api
        .get(&format!("/v1/batches/{batch}"), &t)
        .await
        .expect("batch")
        .json;
    assert_eq!(
        after["counts"],
        json!({"pending": 0, "created": 200, "converted": 0, "skipped": 0, "failed": 0})
    );
    bulkops_tests::check::no_duplicate_sales_records(&env)
        .await
        .expect("no duplicates");
    let (ok, dead_after, _) = env.cli(&["dlq", "list", "--batch", &b]).await.expect("cli");
    assert!(ok.success());
    assert_eq!(
        dead_after
            .lines()
            .filter(|l| l.starts_with("batch "))
            .count(),
        0,
        "{dead_after}"
    );

    // Metrics: valid exposition (promtool), and every metric the dashboard queries exists.
    let worker_addr = worker.lock().await.addr.clone().expect("worker metrics");
    let other_addr = other_worker
        .lock()
        .await
        .addr
        .clone()
        .expect("worker metrics");
    let files = [
        metrics_file(&env, &api.base, "producer").await,
        metrics_file(&env, &format!("http://{worker_addr}"), "worker-1").await,
        metrics_file(&env, &format!("http://{other_addr}"), "worker-2").await,
    ];
    for f in &files {
        let out = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(f).expect("metrics file"))
            .output()
            .expect("promtool is installed (Debian package prometheus; .ci/run installs it)");
        assert!(
            out.status.success(),
            "promtool check metrics {}: {}{}",
            f.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let exposition: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap_or_default())
        .collect();
    for family in [
        "bulkops_items_processed_total",
        "bulkops_dead_lettered_total",
        "bulkops_batches_accepted_total",
        "bulkops_split_published_total",
        "bulkops_queue_messages",
        "bulkops_lane_backlog_items",
        "bulkops_chunk_duration_seconds",
    ] {
        assert!(
            exposition.contains(&format!("# TYPE {family} ")),
            "{family} exported"
        );
    }
    let out = std::process::Command::new("python3")
        .arg(workspace_root().join("tests/chart/check_dashboard.py"))
        .arg(workspace_root().join("helm/bulkops/dashboards/bulkops.json"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    env.finish().await;
}
