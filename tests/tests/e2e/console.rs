//! The operator console in a real browser: headless Chromium over WebDriver
//! (`bulkops_tests::browser`) against a real producer and worker.
//!
//! An operator signs in by pasting a token, watches a running batch's progress bar move
//! live (server-sent events, no reload) to completed, filters the failed items, downloads
//! them as CSV, and replays a dead letter after the fix, seeing its item's outcome change.
//! A form posted without its CSRF token is refused; a CRM user's token opens only their
//! agency's batches; without a session every page leads to the login. Screenshots of
//! every step go to `target/console-screenshots/`.

use std::time::{Duration, Instant};

use bulkops_tests::browser::Browser;
use bulkops_tests::console::{ConsoleClient, enable};
use bulkops_tests::fixture::{World, insert, rows};
use fantoccini::Locator;
use reqwest::StatusCode;
use sea_orm::ConnectionTrait;
use serde_json::json;

/// Items of the watched batch, and how many of them the database refuses.
const TOTAL: i64 = 1200;
const REFUSED: i64 = 20;

/// Polls `check` until it gives a value (the deadline only keeps a broken run from
/// hanging; it is no assertion about speed).
async fn until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn progress(b: &Browser) -> Option<(i64, i64, String, bool)> {
    let v = b
        .eval(
            "var p = document.getElementById('progress');
             var s = document.querySelector('h1 .state');
             return p && s ? [p.value, p.max, s.getAttribute('data-state'), window.__stayed === true] : null;",
        )
        .await
        .ok()?;
    let a = v.as_array()?;
    Some((
        a.first()?.as_f64()? as i64,
        a.get(1)?.as_f64()? as i64,
        a.get(2)?.as_str()?.to_owned(),
        a.get(3)?.as_bool()?,
    ))
}

/// Clicks what `css` finds and waits until the page it leads to has loaded (a click returns
/// before the navigation it starts is over).
async fn click_navigating(b: &Browser, css: &str) {
    b.eval("window.__leaving = true; return true;")
        .await
        .expect("mark the page");
    b.client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
    until(
        &format!("the page after clicking {css}"),
        Duration::from_secs(60),
        || async {
            let v = b
                .eval("return window.__leaving !== true && document.readyState === 'complete';")
                .await
                .ok()?;
            v.as_bool().filter(|loaded| *loaded)
        },
    )
    .await;
}

async fn sign_in(b: &Browser, base: &str, token: &str) {
    b.client
        .goto(&format!("{base}/ui/login"))
        .await
        .expect("login page");
    let field = b
        .client
        .find(Locator::Css("#token"))
        .await
        .expect("token field");
    field.send_keys(token).await.expect("type the token");
    click_navigating(b, "#sign-in").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_browser() {
    let began = Instant::now();
    let env = crate::env("console").await;
    let db = &env.db;
    let a = World::new(db, "Console Agency").await;
    let b_agency = World::new(db, "Other Agency").await;
    rows(
        db,
        "WITH ins AS (INSERT INTO individuals (agency_id, first_name)
                      SELECT $1, CASE WHEN g % ($2 / $3) = 0 THEN 'Refused' ELSE 'Fine' END
                        FROM generate_series(1, $2) g RETURNING id)
         SELECT to_jsonb(count(*)) AS j FROM ins",
        vec![a.agency.into(), TOTAL.into(), REFUSED.into()],
    )
    .await;
    for _ in 0..3 {
        insert(
            db,
            "individuals",
            &json!({"agency_id": b_agency.agency, "first_name": "Other"}),
        )
        .await;
    }
    db.execute_unprepared(
        "ALTER TABLE sales_records ADD CONSTRAINT console_no_refused CHECK (first_name IS DISTINCT FROM 'Refused')",
    )
    .await
    .expect("constraint");
    // A metered split and small chunks: the batch runs for several seconds, long enough
    // to be watched.
    env.set("BULKOPS__SPLIT__MAX_IN_FLIGHT_PER_BATCH", 20).await;
    env.set("BULKOPS__SPLIT__CHUNK_SIZE", 20).await;
    env.set("BULKOPS__WORKER__CHUNK_SIZE", 10).await;
    // Without ui.enabled there is no console at all.
    let (_, plain) = env.start_producer().await.expect("producer");
    for path in ["/ui", "/ui/login", "/ui/batches"] {
        let page = ConsoleClient::new(&plain.base, None)
            .get(path)
            .await
            .expect("page");
        assert_eq!(
            page.status,
            StatusCode::NOT_FOUND,
            "{path} without ui.enabled"
        );
    }
    enable(&env).await;
    let (_, api) = env.start_producer().await.expect("producer");
    let base = api.base.clone();
    let batch = api
        .bulk_create(
            &a.token(),
            &json!({"filter": {}, "record_type_id": a.record_type}),
        )
        .await
        .expect("bulk create");
    let other = api
        .bulk_create(
            &b_agency.token(),
            &json!({"filter": {}, "record_type_id": b_agency.record_type}),
        )
        .await
        .expect("other agency's batch");

    // Without a session, every page leads to the login (and back after it).
    let anonymous = ConsoleClient::new(&base, None);
    for path in [
        "/ui".to_owned(),
        "/ui/batches".to_owned(),
        format!("/ui/batches/{batch}"),
        format!("/ui/batches/{batch}/items.csv"),
    ] {
        let page = anonymous.get(&path).await.expect("page");
        assert_eq!(page.status, StatusCode::SEE_OTHER, "{path}");
        assert!(
            page.location
                .as_deref()
                .is_some_and(|l| l.starts_with("/ui/login?next=/ui")),
            "{path}: {:?}",
            page.location
        );
    }

    let browser = Browser::start("console").await.expect("browser");
    let b = &browser;
    b.client
        .set_window_size(1280, 1000)
        .await
        .expect("window size");

    // Sign in as an operator from the batch's own address: the login brings us back.
    b.client
        .goto(&format!("{base}/ui/batches/{batch}"))
        .await
        .expect("batch page");
    assert!(
        b.client
            .current_url()
            .await
            .expect("url")
            .as_str()
            .contains("/ui/login?next="),
        "redirected to the login"
    );
    b.screenshot("01-login").await.expect("screenshot");
    // The operator's token comes from the CLI, as an operator would get it.
    let (ok, minted, err) = env
        .cli(&["token", "--operator", "ops-e2e", "--ttl-secs", "600"])
        .await
        .expect("bulkops token");
    assert!(ok.success(), "{err}");
    let field = b.client.find(Locator::Css("#token")).await.expect("field");
    field.send_keys(minted.trim()).await.expect("type");
    click_navigating(b, "#sign-in").await;
    let url = b.client.current_url().await.expect("url");
    assert!(
        url.path().ends_with(&format!("/ui/batches/{batch}")),
        "back on the batch page: {url}"
    );
    assert_eq!(
        b.text("#signed-in").await.as_deref(),
        Some("Signed in as operator ops-e2e")
    );
    let cookie = b
        .client
        .get_named_cookie("bulkops_ui")
        .await
        .expect("session cookie");
    assert_eq!(cookie.http_only(), Some(true), "HttpOnly");
    assert_eq!(
        format!("{:?}", cookie.same_site()),
        "Some(Strict)",
        "SameSite=Strict"
    );
    assert_eq!(cookie.path(), Some("/ui"));

    // No worker yet: the batch waits. Mark the page, so that a reload would show.
    let (start, max, state, _) =
        until("the progress bar", Duration::from_secs(30), || progress(b)).await;
    assert_eq!(max, TOTAL);
    assert!(start < TOTAL, "nothing processed yet: {start}");
    assert_ne!(state, "completed");
    b.eval("window.__stayed = true; return true;")
        .await
        .expect("mark");
    env.start_worker().await.expect("worker");

    // The bar moves on the same page (server-sent events), then the batch completes and
    // the page reloads once to show the final tables.
    let mut seen = vec![start];
    let mut shot = false;
    let watching = Instant::now();
    loop {
        if let Some((value, _, state, stayed)) = progress(b).await {
            if stayed && value > start && value < TOTAL {
                seen.push(value);
                if !shot {
                    shot = true;
                    b.screenshot("02-batch-running").await.expect("screenshot");
                }
            }
            if state == "completed" && !stayed && value == TOTAL {
                break;
            }
        }
        assert!(
            watching.elapsed() < Duration::from_secs(180),
            "the batch did not complete in the browser: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        seen.len() > 1 && seen.windows(2).all(|w| w[0] <= w[1]),
        "the bar advanced live, without a reload, and never went back: {seen:?}"
    );
    assert_eq!(
        b.text("#count-failed").await.as_deref(),
        Some(REFUSED.to_string().as_str())
    );
    let reasons = b.text("#reasons").await.unwrap_or_default();
    assert!(
        reasons.contains("failed") && reasons.contains("error"),
        "{reasons}"
    );
    b.client
        .set_window_size(1280, 1700)
        .await
        .expect("window size");
    b.screenshot("03-batch-completed")
        .await
        .expect("screenshot");
    b.client
        .set_window_size(1280, 1000)
        .await
        .expect("window size");

    // The failed items, filtered.
    b.client
        .find(Locator::Css("#status"))
        .await
        .expect("status filter")
        .select_by_value("failed")
        .await
        .expect("select failed");
    click_navigating(b, "#filter").await;
    let url = b.client.current_url().await.expect("url");
    assert!(url.as_str().contains("status=failed"), "{url}");
    let statuses = b
        .eval(
            "return Array.from(document.querySelectorAll('#item-table tbody tr')).map(r => r.getAttribute('data-status'));",
        )
        .await
        .expect("rows");
    let statuses: Vec<&str> = statuses
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert_eq!(statuses.len() as i64, REFUSED, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == "failed"), "{statuses:?}");
    b.screenshot("04-failed-items").await.expect("screenshot");

    // Their CSV, downloaded by the browser.
    b.client
        .find(Locator::Css("#csv"))
        .await
        .expect("csv link")
        .click()
        .await
        .expect("download");
    let file = browser
        .downloaded(Duration::from_secs(30))
        .await
        .expect("a download");
    assert_eq!(
        file.file_name().and_then(|n| n.to_str()),
        Some(format!("batch-{batch}-items-failed.csv").as_str())
    );
    let csv = std::fs::read_to_string(&file).expect("csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "seq,target_id,status,result_id,reason");
    assert_eq!(lines.len() as i64, REFUSED + 1, "{csv}");
    assert!(
        lines[1..].iter().all(|l| l.ends_with(",failed,,error")),
        "{csv}"
    );

    // The batch's dead letters, one per failed item; fix the cause, then replay one.
    b.client
        .goto(&format!("{base}/ui/batches/{batch}"))
        .await
        .expect("batch page");
    let dead_seqs = b
        .eval(
            "return Array.from(document.querySelectorAll('#dead-letters tbody tr')).map(r => Number(r.getAttribute('data-seq')));",
        )
        .await
        .expect("dead letters");
    let dead_seqs: Vec<i64> = dead_seqs
        .as_array()
        .expect("array")
        .iter()
        .filter_map(serde_json::Value::as_i64)
        .collect();
    assert_eq!(dead_seqs.len() as i64, REFUSED, "{dead_seqs:?}");
    let dead_text = b.text("#dead-letters").await.unwrap_or_default();
    assert!(
        dead_text.contains("error") && dead_text.contains("db_23514"),
        "{dead_text}"
    );
    db.execute_unprepared("ALTER TABLE sales_records DROP CONSTRAINT console_no_refused")
        .await
        .expect("the fix");
    let seq = dead_seqs[0];

    // A replay posted without its CSRF token is refused, and changes nothing.
    b.eval(&format!(
        "var f = document.createElement('form'); f.method = 'post';
         f.action = '/ui/batches/{batch}/replay';
         var i = document.createElement('input'); i.name = 'seq'; i.value = '{seq}'; f.appendChild(i);
         document.body.appendChild(f); f.submit(); return true;"
    ))
    .await
    .expect("forged post");
    let refused = until("the refusal", Duration::from_secs(30), || async {
        b.text("h1").await.filter(|t| t.starts_with("403"))
    })
    .await;
    assert!(refused.contains("Forbidden"), "{refused}");
    assert!(
        b.text("#error").await.unwrap_or_default().contains("CSRF"),
        "the page says why"
    );
    b.screenshot("05-csrf-refused").await.expect("screenshot");
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM bulk_items WHERE batch_id = {batch} AND seq = {seq} AND status = 'failed'"
        ))
        .await,
        1,
        "the refused post replayed nothing"
    );

    // The replay itself: a button, a confirmation page, then the POST.
    b.client
        .goto(&format!("{base}/ui/batches/{batch}"))
        .await
        .expect("batch page");
    click_navigating(b, &format!("a.replay[data-seq='{seq}']")).await;
    let heading = b.text("h1").await.unwrap_or_default();
    assert!(
        heading.contains(&format!("item {seq} of batch {batch}")),
        "{heading}"
    );
    b.screenshot("06-replay-confirm").await.expect("screenshot");
    click_navigating(b, "#confirm-replay").await;
    let notice = b.text("#notice").await.unwrap_or_default();
    assert!(notice.starts_with("Replayed 1 dead letter"), "{notice}");
    // The item gets its real outcome: the batch completes again with one failure fewer.
    until(
        "the replayed item's outcome",
        Duration::from_secs(120),
        || async {
            b.client
                .goto(&format!("{base}/ui/batches/{batch}"))
                .await
                .ok()?;
            let failed = b.text("#count-failed").await?;
            let state = b
                .client
                .find(Locator::Css("h1 .state"))
                .await
                .ok()?
                .attr("data-state")
                .await
                .ok()??;
            (failed == (REFUSED - 1).to_string() && state == "completed").then_some(())
        },
    )
    .await;
    assert_eq!(
        b.text("#count-created").await.as_deref(),
        Some(bulkops_producer::ui::views::fmt_int(TOTAL - REFUSED + 1).as_str())
    );
    let still_dead = b
        .eval(
            "return Array.from(document.querySelectorAll('#dead-letters tbody tr')).map(r => Number(r.getAttribute('data-seq')));",
        )
        .await
        .expect("dead letters");
    let still_dead: Vec<i64> = still_dead
        .as_array()
        .expect("array")
        .iter()
        .filter_map(serde_json::Value::as_i64)
        .collect();
    assert_eq!(still_dead.len() as i64, REFUSED - 1, "{still_dead:?}");
    assert!(!still_dead.contains(&seq), "{still_dead:?}");
    b.screenshot("07-replayed").await.expect("screenshot");
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM bulk_items i JOIN sales_records s ON s.id = i.result_id
              WHERE i.batch_id = {batch} AND i.seq = {seq} AND i.status = 'created'"
        ))
        .await,
        1,
        "the replayed item created its Sales Record"
    );

    // The overview, for the record.
    b.client
        .goto(&format!("{base}/ui"))
        .await
        .expect("overview");
    let queues = b.text("#queues").await.unwrap_or_default();
    assert!(
        queues.contains("work.bulk") && queues.contains("dead"),
        "{queues}"
    );
    until(
        "the worker's heartbeat",
        Duration::from_secs(30),
        || async {
            b.client.refresh().await.ok()?;
            b.text("#workers")
                .await
                .filter(|t| t.contains("ready"))
                .map(|_| ())
        },
    )
    .await;
    b.screenshot("08-overview").await.expect("screenshot");

    // Sign out; a CRM user of agency A sees A's batches only.
    click_navigating(b, "header form button").await;
    assert!(
        b.client
            .current_url()
            .await
            .expect("url")
            .path()
            .ends_with("/ui/login")
    );
    b.client
        .goto(&format!("{base}/ui"))
        .await
        .expect("overview");
    assert!(
        b.client
            .current_url()
            .await
            .expect("url")
            .path()
            .ends_with("/ui/login"),
        "signed out: back to the login"
    );
    sign_in(b, &base, &a.token()).await;
    assert_eq!(
        b.text("#signed-in").await,
        Some(format!(
            "Signed in as user {} of agency {}",
            a.admin, a.agency
        ))
    );
    b.client
        .goto(&format!("{base}/ui/batches/{other}"))
        .await
        .expect("the other agency's batch");
    assert!(
        b.text("h1").await.unwrap_or_default().starts_with("404"),
        "another agency's batch does not exist"
    );
    assert_eq!(b.text("#error").await.as_deref(), Some("No such batch."));
    b.screenshot("09-other-agency").await.expect("screenshot");
    b.client
        .goto(&format!("{base}/ui/batches"))
        .await
        .expect("batches");
    let listed = b
        .eval(
            "return Array.from(document.querySelectorAll('table.batches tbody tr td:first-child a')).map(a => Number(a.textContent));",
        )
        .await
        .expect("batch ids");
    assert_eq!(listed, json!([batch]), "only the agency's own batch");
    b.client
        .goto(&format!("{base}/ui/batches/{batch}"))
        .await
        .expect("own batch");
    assert!(
        b.client
            .find_all(Locator::Css("a.replay"))
            .await
            .expect("find")
            .is_empty(),
        "no replay for a CRM user"
    );
    b.client
        .goto(&format!(
            "{base}/ui/batches/{batch}/replay?seq={}",
            still_dead[0]
        ))
        .await
        .expect("replay page");
    assert!(
        b.text("h1").await.unwrap_or_default().starts_with("403"),
        "a CRM user may not replay"
    );

    // An operator token signed with the CRM secret, or a CRM token for an inactive user, is
    // refused at the login.
    let forged = bulkops_tests::api::token_with(
        &json!({"sub": "mallory", "role": "operator", "exp": chrono::Utc::now().timestamp() + 600}),
        bulkops_tests::env::SECRET,
    );
    sign_in(b, &base, &forged).await;
    assert!(
        b.text("#login-error")
            .await
            .unwrap_or_default()
            .starts_with("The token was refused"),
        "a forged operator token is refused"
    );

    browser.close().await;
    // The history holds (the batch completed twice, around the replay, so the one-completion
    // check of check::create_batch does not apply).
    bulkops_tests::check::no_duplicate_sales_records(&env)
        .await
        .expect("no duplicates");
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM bulk_batches b WHERE id = {batch} AND state = 'completed'
                AND n_created = (SELECT count(*) FROM bulk_items WHERE batch_id = {batch} AND status = 'created')
                AND n_failed = (SELECT count(*) FROM bulk_items WHERE batch_id = {batch} AND status = 'failed')
                AND n_created + n_skipped + n_failed = total"
        ))
        .await,
        1,
        "counters equal the items' outcomes"
    );
    let took = began.elapsed();
    std::fs::write(
        bulkops_tests::browser::screenshot_dir().join("duration.txt"),
        format!("{:.1} s\n", took.as_secs_f64()),
    )
    .expect("duration");
    env.finish().await;
}

/// The throughput history: whichever producer locks the cursor first takes a period's
/// sample, from the batches' counters (workers' outcomes only), and the others leave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_samples_are_taken_once_per_period_from_batch_counters() {
    use bulkops_producer::ui::sampler;
    let env = crate::env("console-samples").await;
    let db = &env.db;
    let batch = |id: i64, total: i64, created: i64, presettled: i64, done: bool| {
        format!(
            "INSERT INTO bulk_batches (id, agency_id, kind, state, lane, requested_by, total, n_created, n_skipped, n_presettled, completed_at)
             VALUES ({id}, 1, 'create_sales_records', '{}', 'bulk', 1, {total}, {created}, {presettled}, {presettled}, {})",
            if done { "completed" } else { "running" },
            if done { "now()" } else { "NULL" }
        )
    };
    db.execute_unprepared(&batch(1, 100, 10, 5, false))
        .await
        .expect("batch");
    // The first call starts the history from the batches as they are; within the period
    // nobody samples again.
    assert!(!sampler::sample(db).await.expect("sample"), "too soon");
    let age = "UPDATE throughput_cursor SET at = at - interval '10 seconds'";
    db.execute_unprepared(age).await.expect("age the cursor");
    // Batch 1 moves by 30 and completes; batch 2 is accepted with 7 settled at once and 20
    // decided by workers since.
    db.execute_unprepared(
        "UPDATE bulk_batches SET n_created = 40, n_skipped = 60, state = 'completed', completed_at = now() WHERE id = 1",
    )
    .await
    .expect("progress");
    db.execute_unprepared(&batch(2, 50, 20, 7, false))
        .await
        .expect("batch");
    // Two producers at once: one sample.
    let (a, b) = tokio::join!(sampler::sample(db), sampler::sample(db));
    assert_eq!(
        [a.expect("a"), b.expect("b")]
            .iter()
            .filter(|w| **w)
            .count(),
        1,
        "exactly one producer sampled"
    );
    assert_eq!(
        env.count("SELECT items FROM throughput_samples").await,
        (40 + 60 - 5) - 10 + 20
    );
    // Batch 1 is no longer watched; batch 2 is, from where it is.
    db.execute_unprepared(age).await.expect("age the cursor");
    db.execute_unprepared("UPDATE bulk_batches SET n_created = 25 WHERE id = 2")
        .await
        .expect("progress");
    assert!(sampler::sample(db).await.expect("sample"));
    assert_eq!(
        env.count("SELECT items FROM throughput_samples ORDER BY at DESC LIMIT 1")
            .await,
        5
    );
    let (_, bars) = sampler::recent(db, Duration::from_secs(900))
        .await
        .expect("recent");
    assert_eq!(
        bars.iter().map(|b| b.items).collect::<Vec<_>>(),
        vec![105, 5]
    );
    env.finish().await;
}
