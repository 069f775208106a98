//! The history check every scenario ends with: exactly one outcome per item, counts that
//! add up, no Individual with two Sales Records, no partial conversion, and an event for
//! every committed change and none without one.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{bail, ensure};

use crate::env::TestEnv;

/// What a batch ended with.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Items in the batch.
    pub total: i64,
    /// Items per status.
    pub by_status: HashMap<String, i64>,
}

async fn summary(env: &TestEnv, batch_id: i64) -> anyhow::Result<Summary> {
    let total = env
        .count(&format!(
            "SELECT total FROM bulk_batches WHERE id = {batch_id}"
        ))
        .await;
    let mut by_status = HashMap::new();
    for st in ["pending", "created", "converted", "skipped", "failed"] {
        let n = env
            .count(&format!(
                "SELECT count(*) FROM bulk_items WHERE batch_id = {batch_id} AND status = '{st}'"
            ))
            .await;
        by_status.insert(st.to_owned(), n);
    }
    Ok(Summary { total, by_status })
}

/// Checks the batch is complete and consistent: no pending item, item count = total,
/// counters = item outcomes, state completed, one `bulk_batch.completed` event.
pub async fn batch_consistent(env: &TestEnv, batch_id: i64) -> anyhow::Result<Summary> {
    let s = summary(env, batch_id).await?;
    ensure!(
        s.by_status["pending"] == 0,
        "batch {batch_id} has pending items: {s:?}"
    );
    let items = env
        .count(&format!(
            "SELECT count(*) FROM bulk_items WHERE batch_id = {batch_id}"
        ))
        .await;
    ensure!(
        items == s.total,
        "batch {batch_id}: {items} items, total {}",
        s.total
    );
    for (col, st) in [
        ("n_created", "created"),
        ("n_converted", "converted"),
        ("n_skipped", "skipped"),
        ("n_failed", "failed"),
    ] {
        let n = env
            .count(&format!(
                "SELECT {col} FROM bulk_batches WHERE id = {batch_id}"
            ))
            .await;
        ensure!(
            n == s.by_status[st],
            "batch {batch_id}: counter {col} = {n}, items {st} = {}",
            s.by_status[st]
        );
    }
    let completed = env
        .count(&format!("SELECT count(*) FROM bulk_batches WHERE id = {batch_id} AND state = 'completed' AND completed_at IS NOT NULL"))
        .await;
    ensure!(completed == 1, "batch {batch_id} is not completed");
    let ok = env
        .events
        .wait_until(Duration::from_secs(30), |evs| {
            evs.iter()
                .any(|e| e.routing_key == "bulk_batch.completed" && e.body["batch_id"] == batch_id)
        })
        .await;
    ensure!(ok, "no bulk_batch.completed event for batch {batch_id}");
    let completions: HashSet<String> = env
        .events
        .of("bulk_batch.completed")
        .await
        .iter()
        .filter(|e| e.body["batch_id"] == batch_id)
        .map(|e| e.body["event_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    ensure!(
        completions.len() == 1,
        "batch {batch_id} completed {} times",
        completions.len()
    );
    Ok(s)
}

/// No Individual has two Sales Records (the unique index says so; this says it held).
pub async fn no_duplicate_sales_records(env: &TestEnv) -> anyhow::Result<()> {
    let dups = env
        .count(
            "SELECT count(*) FROM (SELECT individual_id FROM sales_records WHERE individual_id IS NOT NULL
                GROUP BY individual_id HAVING count(*) > 1) d",
        )
        .await;
    ensure!(
        dups == 0,
        "{dups} Individuals have more than one Sales Record"
    );
    Ok(())
}

/// A bulk create batch: consistent; every `created` item names a Sales Record of its
/// Individual; exactly one `sales_record.created` event (by event_id) per created record
/// and no event for a record that was not created.
pub async fn create_batch(env: &TestEnv, batch_id: i64) -> anyhow::Result<Summary> {
    let s = batch_consistent(env, batch_id).await?;
    no_duplicate_sales_records(env).await?;
    let bad = env
        .count(&format!(
            "SELECT count(*) FROM bulk_items it LEFT JOIN sales_records sr ON sr.id = it.result_id
              WHERE it.batch_id = {batch_id} AND it.status = 'created'
                AND (sr.id IS NULL OR sr.individual_id <> it.target_id)"
        ))
        .await;
    ensure!(
        bad == 0,
        "{bad} created items do not name their Individual's Sales Record"
    );
    let created: HashSet<i64> = crate::fixture::rows(
        &env.db,
        "SELECT to_jsonb(result_id) AS j FROM bulk_items WHERE batch_id = $1 AND status = 'created'",
        vec![batch_id.into()],
    )
    .await
    .iter()
    .filter_map(serde_json::Value::as_i64)
    .collect();
    let want = created.len();
    let ok = env
        .events
        .wait_until(Duration::from_secs(30), |evs| {
            evs.iter()
                .filter(|e| {
                    e.routing_key == "sales_record.created" && e.body["batch_id"] == batch_id
                })
                .map(|e| e.body["event_id"].as_str().unwrap_or_default().to_owned())
                .collect::<HashSet<_>>()
                .len()
                >= want
        })
        .await;
    ensure!(
        ok,
        "missing sales_record.created events for batch {batch_id}"
    );
    let mut per_record: HashMap<i64, HashSet<String>> = HashMap::new();
    for e in env.events.of("sales_record.created").await {
        if e.body["batch_id"] != batch_id {
            continue;
        }
        let id = e.body["sales_record_id"].as_i64().unwrap_or_default();
        per_record
            .entry(id)
            .or_default()
            .insert(e.body["event_id"].as_str().unwrap_or_default().to_owned());
    }
    for (id, ids) in &per_record {
        if !created.contains(id) {
            bail!("event for Sales Record {id}, which batch {batch_id} did not create");
        }
        ensure!(
            ids.len() == 1,
            "Sales Record {id} has {} distinct created events",
            ids.len()
        );
    }
    ensure!(
        per_record.len() == want,
        "{} created records, {} with events",
        want,
        per_record.len()
    );
    Ok(s)
}

/// Child tables owned by a record.
pub const CHILD_TABLES: [&str; 10] = [
    "notes",
    "activities",
    "attachments",
    "call_recordings",
    "sms_messages",
    "prescriptions",
    "providers",
    "change_history",
    "aca_consents",
    "scope_of_appointments",
];

/// A conversion batch: consistent; every converted Sales Record is gone with everything it
/// owned, logged, its Individual exists, and it has exactly one event; every record not
/// converted is untouched (still there, still owning its children and sales policies).
pub async fn convert_batch(
    env: &TestEnv,
    batch_id: i64,
    children_before: &HashMap<i64, i64>,
) -> anyhow::Result<Summary> {
    let s = batch_consistent(env, batch_id).await?;
    let items = crate::fixture::rows(
        &env.db,
        "SELECT to_jsonb(it) AS j FROM bulk_items it WHERE batch_id = $1",
        vec![batch_id.into()],
    )
    .await;
    let converted: HashSet<i64> = items
        .iter()
        .filter(|i| i["status"] == "converted")
        .filter_map(|i| i["target_id"].as_i64())
        .collect();
    let targets: Vec<i64> = items
        .iter()
        .filter_map(|i| i["target_id"].as_i64())
        .collect();
    let owned_now = owned_rows(env, &targets).await;
    let ids_of = |sql: &'static str| {
        let targets = targets.clone();
        async move {
            crate::fixture::rows(&env.db, sql, vec![targets.into()])
                .await
                .iter()
                .filter_map(serde_json::Value::as_i64)
                .collect::<HashSet<i64>>()
        }
    };
    let existing =
        ids_of("SELECT to_jsonb(id) AS j FROM sales_records WHERE id = ANY($1::bigint[])").await;
    let logged =
        ids_of("SELECT to_jsonb(sales_record_id) AS j FROM conversion_log WHERE sales_record_id = ANY($1::bigint[])").await;
    let orphaned = env
        .count(&format!(
            "SELECT count(*) FROM bulk_items it
              WHERE it.batch_id = {batch_id} AND it.status = 'converted'
                AND (NOT EXISTS (SELECT 1 FROM individuals i WHERE i.id = it.result_id)
                     OR NOT EXISTS (SELECT 1 FROM conversion_log c
                                     WHERE c.sales_record_id = it.target_id AND c.individual_id = it.result_id))"
        ))
        .await;
    ensure!(
        orphaned == 0,
        "{orphaned} converted items lack their Individual or their log entry"
    );
    for sr in &targets {
        let owned = owned_now.get(sr).copied().unwrap_or(0);
        if converted.contains(sr) {
            ensure!(
                !existing.contains(sr),
                "converted Sales Record {sr} still exists"
            );
            ensure!(
                owned == 0,
                "converted Sales Record {sr} still owns {owned} rows"
            );
        } else if let Some(before) = children_before.get(sr)
            && !logged.contains(sr)
        {
            // Not converted (by this batch or any other): all or nothing means untouched.
            ensure!(
                existing.contains(sr),
                "unconverted Sales Record {sr} is gone"
            );
            ensure!(
                owned == *before,
                "unconverted Sales Record {sr} owns {owned} rows, had {before}"
            );
        }
    }
    let want = converted.len();
    let ok = env
        .events
        .wait_until(Duration::from_secs(30), |evs| {
            evs.iter()
                .filter(|e| {
                    e.routing_key == "sales_record.converted" && e.body["batch_id"] == batch_id
                })
                .map(|e| e.body["sales_record_id"].as_i64().unwrap_or_default())
                .collect::<HashSet<_>>()
                .len()
                >= want
        })
        .await;
    ensure!(
        ok,
        "missing sales_record.converted events for batch {batch_id}"
    );
    let mut per_record: HashMap<i64, HashSet<String>> = HashMap::new();
    for e in env.events.of("sales_record.converted").await {
        if e.body["batch_id"] != batch_id {
            continue;
        }
        per_record
            .entry(e.body["sales_record_id"].as_i64().unwrap_or_default())
            .or_default()
            .insert(e.body["event_id"].as_str().unwrap_or_default().to_owned());
    }
    for (sr, ids) in &per_record {
        ensure!(
            converted.contains(sr),
            "event for {sr}, which was not converted"
        );
        ensure!(
            ids.len() == 1,
            "{sr} has {} distinct converted events",
            ids.len()
        );
    }
    Ok(s)
}

/// How many rows each Sales Record owns now (children and sales policies), for
/// [`convert_batch`]'s untouched check.
pub async fn owned_rows(env: &TestEnv, sales_records: &[i64]) -> HashMap<i64, i64> {
    let union = CHILD_TABLES
        .iter()
        .map(|t| format!("SELECT owner_id AS id FROM {t} WHERE owner_type = 'sales_record' AND owner_id = ANY($1::bigint[])"))
        .chain(std::iter::once(
            "SELECT sales_record_id AS id FROM sales_policies WHERE sales_record_id = ANY($1::bigint[])".to_owned(),
        ))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let counted = crate::fixture::rows(
        &env.db,
        &format!("SELECT jsonb_build_array(id, count(*)) AS j FROM ({union}) o GROUP BY id"),
        vec![sales_records.to_vec().into()],
    )
    .await;
    let mut out: HashMap<i64, i64> = sales_records.iter().map(|sr| (*sr, 0)).collect();
    for pair in counted {
        if let (Some(id), Some(n)) = (pair[0].as_i64(), pair[1].as_i64()) {
            out.insert(id, n);
        }
    }
    out
}

/// What a fault scenario's history check counts (all must be zero).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    /// Items in the batch.
    pub items: i64,
    /// Items without an outcome, outcomes whose effect is missing, committed changes
    /// without their event, and events whose change is missing.
    pub lost: i64,
    /// Individuals with two Sales Records, changes announced by two distinct events,
    /// batches completed twice.
    pub duplicated: i64,
    /// Conversions half done: a converted Sales Record still there or still owning rows, an
    /// unconverted one that lost rows.
    pub partial: i64,
}

/// Several batches' tallies make one scenario's tally.
impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, other: Tally) {
        self.items += other.items;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.partial += other.partial;
    }
}

async fn event_ids(
    env: &TestEnv,
    routing_key: &str,
    batch_id: i64,
    id_field: &str,
) -> HashMap<i64, HashSet<String>> {
    let mut per: HashMap<i64, HashSet<String>> = HashMap::new();
    for e in env.events.of(routing_key).await {
        if e.body["batch_id"] != batch_id {
            continue;
        }
        per.entry(e.body[id_field].as_i64().unwrap_or_default())
            .or_default()
            .insert(e.body["event_id"].as_str().unwrap_or_default().to_owned());
    }
    per
}

/// The Sales Record ids of a batch's items with `status` (the item's `column`:
/// `result_id` for a created record, `target_id` for a converted one), read once the
/// batch's completion event came, and after waiting (bounded) for an `event` of each.
async fn settled(
    env: &TestEnv,
    batch_id: i64,
    status: &str,
    column: &str,
    event: &str,
) -> HashSet<i64> {
    let _ = env
        .events
        .wait_until(Duration::from_secs(30), |evs| {
            evs.iter()
                .any(|e| e.routing_key == "bulk_batch.completed" && e.body["batch_id"] == batch_id)
        })
        .await;
    let ids: HashSet<i64> = crate::fixture::rows(
        &env.db,
        &format!(
            "SELECT to_jsonb({column}) AS j FROM bulk_items WHERE batch_id = $1 AND status = '{status}'"
        ),
        vec![batch_id.into()],
    )
    .await
    .iter()
    .filter_map(serde_json::Value::as_i64)
    .collect();
    let want = ids.len();
    // Every committed event is in the outbox until the broker confirmed it: once the outbox
    // is empty, whatever the capture still lacks is in its queue or lost. A relay that rode
    // out a node's restart may still be catching up, so the outbox gets its own wait.
    let outbox_drained = crate::scenario::counts_zero_within(
        env,
        "SELECT count(*) FROM outbox",
        Duration::from_secs(120),
    )
    .await;
    let captured = |evs: &[crate::events::Event]| {
        evs.iter()
            .filter(|e| e.routing_key == event && e.body["batch_id"] == batch_id)
            .filter_map(|e| e.body["sales_record_id"].as_i64())
            .collect::<HashSet<_>>()
            .len()
    };
    let complete = env
        .events
        .wait_until(Duration::from_secs(30), |evs| captured(evs) >= want)
        .await;
    if !complete {
        report_missing_events(
            env,
            event,
            want,
            captured(&env.events.all().await),
            outbox_drained,
        )
        .await;
    }
    ids
}

/// Says, for the test's output, where a batch's missing events may be: the outbox, the
/// capture queue, or neither (then the capture's history says what its connection went
/// through).
#[allow(
    clippy::print_stderr,
    reason = "the report of a failing test, in its output"
)]
async fn report_missing_events(
    env: &TestEnv,
    event: &str,
    want: usize,
    got: usize,
    outbox_drained: bool,
) {
    let outbox = env.try_count("SELECT count(*) FROM outbox").await;
    let queue = crate::events::queue_state(
        &env.endpoints.harness_amqp(),
        &format!("{}.capture", env.amqp_prefix),
    )
    .await;
    eprintln!(
        "missing {event} events: {got} of {want} captured; outbox drained: {outbox_drained}, \
         rows now: {outbox:?}; capture queue (ready, consumers): {queue:?}; capture history:\n  {}",
        env.events.history().join("\n  ")
    );
}

/// Events iff commits, for the records `changed` by a batch: returns the changes without
/// their `event` plus the events without their change (lost), and the repeated events
/// (duplicated; distinct `event_id`s for one record).
async fn event_gaps(
    env: &TestEnv,
    batch_id: i64,
    event: &str,
    changed: &HashSet<i64>,
) -> (i64, i64) {
    let events = event_ids(env, event, batch_id, "sales_record_id").await;
    let without_event: Vec<i64> = changed
        .iter()
        .filter(|id| !events.contains_key(id))
        .copied()
        .collect();
    let without_change: Vec<i64> = events
        .keys()
        .filter(|id| !changed.contains(id))
        .copied()
        .collect();
    let dup_events: i64 = events
        .values()
        .map(|ids| (ids.len() as i64 - 1).max(0))
        .sum();
    if !without_event.is_empty() || !without_change.is_empty() {
        report_event_gaps(env, batch_id, event, &without_event, &without_change).await;
    }
    (
        (without_event.len() + without_change.len()) as i64,
        dup_events,
    )
}

/// Says, for the test's output, which records' events do not match their changes, and
/// writes every captured event of the batch to the test's log directory.
#[allow(
    clippy::print_stderr,
    reason = "the report of a failing test, in its output"
)]
async fn report_event_gaps(
    env: &TestEnv,
    batch_id: i64,
    event: &str,
    without_event: &[i64],
    without_change: &[i64],
) {
    let sample = |ids: &[i64]| {
        ids.iter()
            .take(8)
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    // What the database says of the records announced without a change of this batch.
    let described = if without_change.is_empty() {
        String::new()
    } else {
        crate::fixture::rows(
            &env.db,
            "SELECT to_jsonb(d) AS j FROM (
               SELECT sr.id, sr.individual_id,
                      (SELECT string_agg(it.batch_id || ':' || it.status || ':' || coalesce(it.result_id::text, '-'), ' ')
                         FROM bulk_items it WHERE it.target_id = sr.individual_id) AS items
                 FROM sales_records sr WHERE sr.id = ANY($1) ORDER BY sr.id LIMIT 8) d",
            vec![without_change.to_vec().into()],
        )
        .await
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
    };
    let all: Vec<String> = env
        .events
        .all()
        .await
        .iter()
        .filter(|e| e.body["batch_id"] == batch_id)
        .map(|e| {
            format!(
                "{} {} {}",
                e.routing_key,
                e.message_id.clone().unwrap_or_default(),
                e.raw
            )
        })
        .collect();
    let dump = env.log_dir.join(format!("events-batch-{batch_id}.txt"));
    let _ = tokio::fs::write(&dump, all.join("\n")).await;
    eprintln!(
        "batch {batch_id} {event}: {} changes without an event (e.g. {}), {} events without a \
         change (e.g. {}; {described}); {} events of the batch in {}",
        without_event.len(),
        sample(without_event),
        without_change.len(),
        sample(without_change),
        all.len(),
        dump.display()
    );
}

async fn tally_common(env: &TestEnv, batch_id: i64) -> Tally {
    let items = env
        .count(&format!(
            "SELECT count(*) FROM bulk_items WHERE batch_id = {batch_id}"
        ))
        .await;
    let pending = env
        .count(&format!(
            "SELECT count(*) FROM bulk_items WHERE batch_id = {batch_id} AND status = 'pending'"
        ))
        .await;
    let counters_off = env
        .count(&format!(
            "SELECT count(*) FROM bulk_batches b WHERE b.id = {batch_id} AND (
               b.n_created <> (SELECT count(*) FROM bulk_items WHERE batch_id = b.id AND status = 'created') OR
               b.n_converted <> (SELECT count(*) FROM bulk_items WHERE batch_id = b.id AND status = 'converted') OR
               b.n_skipped <> (SELECT count(*) FROM bulk_items WHERE batch_id = b.id AND status = 'skipped') OR
               b.n_failed <> (SELECT count(*) FROM bulk_items WHERE batch_id = b.id AND status = 'failed') OR
               b.state <> 'completed')"
        ))
        .await;
    let completions = env
        .events
        .of("bulk_batch.completed")
        .await
        .iter()
        .filter(|e| e.body["batch_id"] == batch_id)
        .map(|e| e.body["event_id"].as_str().unwrap_or_default().to_owned())
        .collect::<HashSet<_>>()
        .len() as i64;
    Tally {
        items,
        lost: pending + counters_off + i64::from(completions == 0),
        duplicated: (completions - 1).max(0),
        partial: 0,
    }
}

/// Counts a bulk create batch's losses and duplicates (waiting a while for events).
pub async fn tally_create(env: &TestEnv, batch_id: i64) -> Tally {
    let created = settled(
        env,
        batch_id,
        "created",
        "result_id",
        "sales_record.created",
    )
    .await;
    let mut t = tally_common(env, batch_id).await;
    let missing_effect = env
        .count(&format!(
            "SELECT count(*) FROM bulk_items it LEFT JOIN sales_records sr ON sr.id = it.result_id
              WHERE it.batch_id = {batch_id} AND it.status = 'created'
                AND (sr.id IS NULL OR sr.individual_id <> it.target_id)"
        ))
        .await;
    let dup_records = env
        .count(&format!(
            "SELECT count(*) FROM (SELECT sr.individual_id FROM sales_records sr
                JOIN bulk_items it ON it.target_id = sr.individual_id AND it.batch_id = {batch_id}
               GROUP BY sr.individual_id HAVING count(*) > 1) d"
        ))
        .await;
    let (unmatched, dup_events) = event_gaps(env, batch_id, "sales_record.created", &created).await;
    t.lost += missing_effect + unmatched;
    t.duplicated += dup_records + dup_events;
    t
}

/// Counts a conversion batch's losses, duplicates and partial conversions.
pub async fn tally_convert(env: &TestEnv, batch_id: i64, before: &HashMap<i64, i64>) -> Tally {
    let converted = settled(
        env,
        batch_id,
        "converted",
        "target_id",
        "sales_record.converted",
    )
    .await;
    let mut t = tally_common(env, batch_id).await;
    let missing_effect = env
        .count(&format!(
            "SELECT count(*) FROM bulk_items it
              WHERE it.batch_id = {batch_id} AND it.status = 'converted'
                AND (NOT EXISTS (SELECT 1 FROM individuals i WHERE i.id = it.result_id)
                     OR NOT EXISTS (SELECT 1 FROM conversion_log c
                                     WHERE c.sales_record_id = it.target_id AND c.individual_id = it.result_id))"
        ))
        .await;
    let targets: Vec<i64> = before.keys().copied().collect();
    let owned_now = owned_rows(env, &targets).await;
    let existing: HashSet<i64> = crate::fixture::rows(
        &env.db,
        "SELECT to_jsonb(id) AS j FROM sales_records WHERE id = ANY($1::bigint[])",
        vec![targets.clone().into()],
    )
    .await
    .iter()
    .filter_map(serde_json::Value::as_i64)
    .collect();
    let mut partial = 0;
    for sr in &targets {
        let owned = owned_now.get(sr).copied().unwrap_or(0);
        if converted.contains(sr) {
            partial += i64::from(existing.contains(sr) || owned > 0);
        } else {
            partial +=
                i64::from(!existing.contains(sr) || owned != before.get(sr).copied().unwrap_or(0));
        }
    }
    // A Sales Record converted into more than one Individual would show as two Conversion
    // notes or two log entries; the log's key forbids the latter, so count the former.
    let dup_conversions = env
        .count(&format!(
            "SELECT count(*) FROM (SELECT n.owner_id FROM notes n
                JOIN bulk_items it ON it.result_id = n.owner_id AND it.batch_id = {batch_id} AND it.status = 'converted'
               WHERE n.owner_type = 'individual' AND n.subject = 'Conversion'
               GROUP BY n.owner_id HAVING count(*) > 1) d"
        ))
        .await;
    let (unmatched, dup_events) =
        event_gaps(env, batch_id, "sales_record.converted", &converted).await;
    t.lost += missing_effect + unmatched;
    t.duplicated += dup_conversions + dup_events;
    t.partial = partial;
    t
}
