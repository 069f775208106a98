//! Conversion: Sales Records become Individuals, a chunk at a time, each record all or
//! nothing.
//!
//! Everything a chunk does happens in the caller's one transaction, with set-based
//! statements over the chunk's records:
//!
//! 1. lock the pending items, the Sales Records and their sales policies (`FOR UPDATE`)
//!    and the Individuals they merge into; a child row the CRM writes for a locked record
//!    meanwhile either committed before the lock (and is moved) or waits for the
//!    conversion and then fails (the orphan guard triggers of the migrations), so nothing
//!    is left owned by a deleted record; a record already converted (its row gone, its conversion logged) is
//!    `skipped`/`already_converted` naming its Individual, so a redelivered message never
//!    makes a second Individual;
//! 2. classify each item ([`classify`]): convert (merge or new), `forbidden`, `not_found`;
//! 3. new Individuals get reserved ids and rule 4's fields, with agents from the assigned
//!    user's first three Linked Agents (rule 5); merges overwrite with non-NULL values only,
//!    agent slots included (a slot the linked agents do not fill keeps the Individual's
//!    agent), and write a `change_history` row for every value that changes (rule 3);
//! 4. custom field values of every type move to the Individual's fields (rule 6);
//! 5. the ten child tables are re-owned; non-SOA notes become one 'Conversion' note
//!    (rule 7); sales policies in a lead-conversion status become policies with their
//!    custom fields, and all sales policies go (rule 8);
//! 6. the Sales Record is deleted (rule 9), the conversion logged, the item's outcome
//!    recorded and a `sales_record.converted` event written to the outbox (rule 11).
//!
//! A crash anywhere rolls the whole chunk back; the message is redelivered and the chunk
//! runs again from the start.

use std::collections::HashMap;
use std::sync::LazyLock;

use bulkops_shared::batch::BatchKind;
use bulkops_shared::batch::{ItemStatus, reason};
use bulkops_shared::db::stmt;
use bulkops_shared::lock::LockTarget;
use bulkops_shared::mapping::{
    AGENT_COLUMNS, CONVERT_FIELDS, change_rows, insert_lists, merge_set_list,
};
use bulkops_shared::progress::OutcomeDelta;
use futures_util::future::BoxFuture;
use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr};

use crate::job::{Job, Prepared};
use crate::meta::BatchMeta;
use crate::outcomes::Outcome;

/// Conversion as a [`Job`]: an item locks its Sales Record and the Individual it would
/// merge into ([`merge_targets`], read before locking), and [`apply`] runs the chunk.
#[derive(Debug, Clone, Copy)]
pub struct ConvertJob;

impl Job for ConvertJob {
    fn kind(&self) -> BatchKind {
        BatchKind::ConvertSalesRecords
    }

    fn prepare<'a>(
        &'a self,
        db: &'a DatabaseConnection,
        meta: &'a BatchMeta,
        targets: &'a [i64],
    ) -> BoxFuture<'a, Result<Prepared, DbErr>> {
        Box::pin(async move {
            Ok(Prepared {
                touches: merge_targets(db, meta, targets).await?,
            })
        })
    }

    fn lock_targets(&self, target: i64, prepared: &Prepared) -> Vec<LockTarget> {
        let mut keys = vec![LockTarget::SalesRecord(target)];
        if let Some(ind) = prepared.touches.get(&target) {
            keys.push(LockTarget::Individual(*ind));
        }
        keys
    }

    fn apply<'a>(
        &'a self,
        tx: &'a DatabaseTransaction,
        meta: &'a BatchMeta,
        items: &'a [(i64, i64)],
    ) -> BoxFuture<'a, Result<OutcomeDelta, DbErr>> {
        Box::pin(async move {
            let seqs: Vec<i64> = items.iter().map(|(seq, _)| *seq).collect();
            apply(tx, meta, &seqs).await
        })
    }
}

/// The child tables re-owned unchanged (notes are handled apart).
pub const CHILD_TABLES: [&str; 9] = [
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

/// What is known of one pending item's Sales Record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordFacts {
    /// The Sales Record exists in the batch's agency: its type and the Individual it merges
    /// into (when that Individual still exists).
    pub record: Option<(i64, Option<i64>)>,
    /// An earlier conversion of this Sales Record: the Individual it became.
    pub converted_into: Option<i64>,
}

/// What to do with one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Convert, into this existing Individual (merge) or a new one.
    Convert {
        /// The Individual to merge into.
        merge_into: Option<i64>,
    },
    /// Already converted earlier: skipped, naming the Individual.
    AlreadyConverted(i64),
    /// Failed with this reason.
    Fail(&'static str),
}

/// Convert rules 1, 3 and 10 for one item: a record of a type the acting user lacks full
/// rights on is forbidden; one that exists is converted (merging when its Individual still
/// exists); one already converted is skipped naming its Individual; anything else is not
/// found.
pub fn classify(facts: RecordFacts, user_may_convert_type: impl Fn(i64) -> bool) -> Decision {
    match (facts.record, facts.converted_into) {
        (Some((record_type, merge_into)), _) => {
            if user_may_convert_type(record_type) {
                Decision::Convert { merge_into }
            } else {
                Decision::Fail(reason::FORBIDDEN)
            }
        }
        (None, Some(individual)) => Decision::AlreadyConverted(individual),
        (None, None) => Decision::Fail(reason::NOT_FOUND),
    }
}

/// Agents of a Sales Record's assigned user: the first three Linked Agents by position.
const AGENTS_LATERAL: &str = "LEFT JOIN LATERAL (
       SELECT array_agg(ula.agent_id ORDER BY ula.position, ula.agent_id) AS a
         FROM user_linked_agents ula
         JOIN agents ag ON ag.id = ula.agent_id AND ag.agency_id = sr.agency_id
        WHERE ula.user_id = sr.assigned_user_id
     ) linked ON true";

static INSERT_NEW_SQL: LazyLock<String> = LazyLock::new(|| {
    let (targets, exprs) = insert_lists(CONVERT_FIELDS, "sr");
    let agents = AGENT_COLUMNS.join(", ");
    format!(
        "INSERT INTO individuals (id, agency_id, {targets}, {agents})
         SELECT m.ind_id, sr.agency_id, {exprs}, linked.a[1], linked.a[2], linked.a[3]
           FROM unnest($1::bigint[], $2::bigint[]) AS m(sr_id, ind_id)
           JOIN sales_records sr ON sr.id = m.sr_id
           {AGENTS_LATERAL}"
    )
});

static MERGE_SQL: LazyLock<String> = LazyLock::new(|| {
    let set = merge_set_list(CONVERT_FIELDS, "src", "i");
    let data_changes = change_rows(CONVERT_FIELDS, "src", "i");
    // Rule 5 fills the agent slots from the assigned user's first three Linked Agents; rule
    // 3 says a NULL never erases: a slot they do not fill (one or two linked agents, or
    // none, or no assigned user) keeps the Individual's agent. So an agent slot merges
    // like any data field.
    let agent_changes = AGENT_COLUMNS
        .iter()
        .enumerate()
        .map(|(n, col)| format!("('{col}', i.{col}::text, src.a[{k}]::text)", k = n + 1))
        .collect::<Vec<_>>()
        .join(", ");
    let agent_set = AGENT_COLUMNS
        .iter()
        .enumerate()
        .map(|(n, col)| format!("{col} = COALESCE(src.a[{k}], i.{col})", k = n + 1))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "WITH src AS (
           SELECT m.ind_id, sr.*, linked.a
             FROM unnest($1::bigint[], $2::bigint[]) AS m(sr_id, ind_id)
             JOIN sales_records sr ON sr.id = m.sr_id
             {AGENTS_LATERAL}
         ), ch AS (
           INSERT INTO change_history (agency_id, owner_type, owner_id, field, old_value, new_value, changed_by_user_id)
           SELECT i.agency_id, 'individual', i.id, v.field, v.old, v.new, $3
             FROM src JOIN individuals i ON i.id = src.ind_id
            CROSS JOIN LATERAL (VALUES {data_changes}, {agent_changes}) AS v(field, old, new)
            WHERE v.new IS NOT NULL AND v.old IS DISTINCT FROM v.new
           RETURNING 1
         )
         UPDATE individuals i SET {set}, {agent_set}, updated_at = now()
           FROM src WHERE i.id = src.ind_id"
    )
});

const CUSTOM_FIELDS_SQL: &str = "WITH m AS (
       SELECT * FROM unnest($1::bigint[], $2::bigint[]) AS m(sr_id, ind_id)
     ), moved AS (
       SELECT m.ind_id, td.id AS def_id, td.name, v.value
         FROM m
         JOIN custom_field_values v ON v.record_id = m.sr_id
         JOIN custom_field_definitions sd
           ON sd.id = v.definition_id AND sd.entity = 'sales_record' AND sd.agency_id = $3
         JOIN custom_field_definitions td
           ON td.agency_id = $3 AND td.entity = 'individual' AND td.name = sd.name AND td.field_type = sd.field_type
     ), ch AS (
       INSERT INTO change_history (agency_id, owner_type, owner_id, field, old_value, new_value, changed_by_user_id)
       SELECT $3, 'individual', moved.ind_id, 'custom_field:' || moved.name, old.value::text, moved.value::text, $4
         FROM moved JOIN custom_field_values old ON old.definition_id = moved.def_id AND old.record_id = moved.ind_id
        WHERE old.value IS DISTINCT FROM moved.value
       RETURNING 1
     ), up AS (
       INSERT INTO custom_field_values (definition_id, record_id, value)
       SELECT def_id, ind_id, value FROM moved
       ON CONFLICT (definition_id, record_id) DO UPDATE SET value = EXCLUDED.value
       RETURNING 1
     ), del AS (
       DELETE FROM custom_field_values v
        USING custom_field_definitions sd, m
        WHERE v.record_id = m.sr_id AND sd.id = v.definition_id
          AND sd.entity = 'sales_record' AND sd.agency_id = $3
       RETURNING 1
     )
     SELECT (SELECT count(*) FROM up) AS moved, (SELECT count(*) FROM del) AS removed";

/// How each original note appears in the 'Conversion' note: its date, subject and body.
pub const NOTE_ENTRY_SQL: &str = "format(E'[%s] %s\\n%s', to_char(n.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"'), COALESCE(n.subject, '(no subject)'), COALESCE(n.body, ''))";

static CHILDREN_SQL: LazyLock<String> = LazyLock::new(|| {
    let reown = CHILD_TABLES
        .iter()
        .map(|t| {
            format!(
                "r_{t} AS (UPDATE {t} t SET owner_type = 'individual', owner_id = m.ind_id FROM m
                    WHERE t.owner_type = 'sales_record' AND t.owner_id = m.sr_id AND t.agency_id = $3 RETURNING 1)"
            )
        })
        .collect::<Vec<_>>()
        .join(",\n");
    format!(
        "WITH m AS (
           SELECT * FROM unnest($1::bigint[], $2::bigint[]) AS m(sr_id, ind_id)
         ),
         {reown},
         soa AS (
           UPDATE notes t SET owner_type = 'individual', owner_id = m.ind_id FROM m
            WHERE t.owner_type = 'sales_record' AND t.owner_id = m.sr_id AND t.contains_soa AND t.agency_id = $3
           RETURNING 1
         ), combined AS (
           INSERT INTO notes (agency_id, owner_type, owner_id, subject, body, created_by_user_id, contains_soa)
           SELECT $3, 'individual', m.ind_id, 'Conversion',
                  string_agg({NOTE_ENTRY_SQL}, E'\\n\\n' ORDER BY n.created_at, n.id), $4, false
             FROM m JOIN notes n
               ON n.owner_type = 'sales_record' AND n.owner_id = m.sr_id AND NOT n.contains_soa AND n.agency_id = $3
            GROUP BY m.ind_id
           RETURNING 1
         ), gone AS (
           DELETE FROM notes n USING m
            WHERE n.owner_type = 'sales_record' AND n.owner_id = m.sr_id AND NOT n.contains_soa AND n.agency_id = $3
           RETURNING 1
         )
         SELECT (SELECT count(*) FROM combined) AS notes_combined, (SELECT count(*) FROM gone) AS notes_removed"
    )
});

static FINISH_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH m AS (
       SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::boolean[], $4::bigint[]) AS m(sr_id, ind_id, merged, seq)
     ), sp AS (
       SELECT sp.*, m.ind_id, nextval(pg_get_serial_sequence('policies', 'id')) AS new_id
         FROM m
         JOIN sales_policies sp ON sp.sales_record_id = m.sr_id AND sp.agency_id = $5
         JOIN policy_statuses ps ON ps.agency_id = sp.agency_id AND ps.name = sp.status AND ps.lead_conversion
     ), pins AS (
       INSERT INTO policies (id, agency_id, individual_id, coverage_type, status, carrier, carrier_product,
                             effective_date, renewal_date, policy_number)
       SELECT new_id, agency_id, ind_id, coverage_type, status, carrier, carrier_product,
              effective_date, renewal_date, policy_number
         FROM sp
       RETURNING id
     ), pcf AS (
       INSERT INTO custom_field_values (definition_id, record_id, value)
       SELECT td.id, sp.new_id, v.value
         FROM sp
         JOIN custom_field_values v ON v.record_id = sp.id
         JOIN custom_field_definitions sd
           ON sd.id = v.definition_id AND sd.entity = 'sales_policy' AND sd.agency_id = $5
         JOIN custom_field_definitions td
           ON td.agency_id = $5 AND td.entity = 'policy' AND td.name = sd.name AND td.field_type = sd.field_type
       ON CONFLICT DO NOTHING
       RETURNING 1
     ), spcf AS (
       DELETE FROM custom_field_values v
        USING sales_policies x, m, custom_field_definitions sd
        WHERE x.sales_record_id = m.sr_id AND x.agency_id = $5 AND v.record_id = x.id
          AND sd.id = v.definition_id AND sd.entity = 'sales_policy' AND sd.agency_id = $5
       RETURNING 1
     ), spdel AS (
       DELETE FROM sales_policies x USING m WHERE x.sales_record_id = m.sr_id AND x.agency_id = $5
       RETURNING 1
     ), pol AS (
       SELECT m.sr_id, COALESCE(array_agg(sp.new_id ORDER BY sp.id) FILTER (WHERE sp.new_id IS NOT NULL),
                                '{{}}'::bigint[]) AS ids
         FROM m LEFT JOIN sp ON sp.sales_record_id = m.sr_id
        GROUP BY m.sr_id
     ), srdel AS (
       DELETE FROM sales_records x USING m WHERE x.id = m.sr_id RETURNING x.id
     ), logged AS (
       INSERT INTO conversion_log (sales_record_id, agency_id, individual_id, merged, policy_ids, batch_id, converted_by)
       SELECT m.sr_id, $5, m.ind_id, m.merged, pol.ids, $6, $7 FROM m JOIN pol USING (sr_id)
       RETURNING 1
     ), ev AS (
       INSERT INTO outbox (routing_key, events)
       SELECT 'sales_record.converted',
              jsonb_agg(jsonb_build_object('event_id', gen_random_uuid(), {occurred}, 'agency_id', $5::bigint,
                                           'sales_record_id', m.sr_id, 'individual_id', m.ind_id,
                                           'merged', m.merged, 'policy_ids', to_jsonb(pol.ids),
                                           'batch_id', $6::bigint))
         FROM m JOIN pol USING (sr_id)
       HAVING count(*) > 0
       RETURNING 1
     ), upd AS (
       UPDATE bulk_items it
          SET status = 'converted', result_id = m.ind_id, reason = NULL,
              attempts = it.attempts + 1, updated_at = clock_timestamp()
         FROM m WHERE it.batch_id = $6 AND it.seq = m.seq AND it.status = 'pending'
       RETURNING 1
     )
     SELECT (SELECT count(*) FROM upd) AS converted, (SELECT count(*) FROM srdel) AS deleted,
            (SELECT count(*) FROM logged) AS logged, (SELECT count(*) FROM ev) AS events,
            (SELECT count(*) FROM pins) AS policies, (SELECT count(*) FROM pcf) AS policy_fields,
            (SELECT count(*) FROM spcf) AS sales_policy_fields, (SELECT count(*) FROM spdel) AS sales_policies",
        occurred = bulkops_shared::outbox::OCCURRED_AT_SQL
    )
});

/// The Individual each Sales Record of a chunk would merge into, read without locking, so
/// the caller can take the Individuals' Redis locks before the transaction (the
/// transaction's row locks decide if this changed meanwhile).
///
/// # Errors
/// Database errors.
pub async fn merge_targets(
    db: &impl ConnectionTrait,
    meta: &BatchMeta,
    sales_record_ids: &[i64],
) -> Result<HashMap<i64, i64>, DbErr> {
    let rows = db
        .query_all_raw(stmt(
            "SELECT id, individual_id FROM sales_records
              WHERE id = ANY($1::bigint[]) AND agency_id = $2 AND individual_id IS NOT NULL",
            [sales_record_ids.to_vec().into(), meta.agency_id.into()],
        ))
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("", "id")?, r.try_get("", "individual_id")?)))
        .collect()
}

/// Converts the Sales Records of `seqs` (items of `meta`'s batch) in the caller's
/// transaction and records every item's outcome: [`lock_and_classify`], then
/// [`execute`]. Returns the outcomes newly recorded.
///
/// # Errors
/// Database errors; the caller rolls back.
pub async fn apply(
    tx: &impl ConnectionTrait,
    meta: &BatchMeta,
    seqs: &[i64],
) -> Result<OutcomeDelta, DbErr> {
    let plan = lock_and_classify(tx, meta, seqs).await?;
    execute(tx, meta, plan).await
}

/// What a chunk's conversion will do, item by item, once its rows are locked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// (seq, Sales Record, Individual): merges into an existing Individual.
    pub merges: Vec<(i64, i64, i64)>,
    /// (seq, Sales Record): conversions into a new Individual.
    pub news: Vec<(i64, i64)>,
    /// Items decided without converting (skipped or failed).
    pub others: Vec<Outcome>,
}

/// Steps 1 and 2: locks the still-pending items of `seqs`, their Sales Records, sales
/// policies and merge targets, and classifies each item ([`classify`]).
///
/// # Errors
/// Database errors; the caller rolls back.
pub async fn lock_and_classify(
    tx: &impl ConnectionTrait,
    meta: &BatchMeta,
    seqs: &[i64],
) -> Result<Plan, DbErr> {
    // 1. Lock what is still pending, then the records and their merge targets.
    let pending = tx
        .query_all_raw(stmt(
            "SELECT it.seq, it.target_id
               FROM unnest($2::bigint[]) AS s(seq)
               JOIN bulk_items it ON it.batch_id = $1 AND it.seq = s.seq
              WHERE it.status = 'pending'
              ORDER BY it.seq FOR UPDATE OF it",
            [meta.id.into(), seqs.to_vec().into()],
        ))
        .await?;
    if pending.is_empty() {
        return Ok(Plan::default());
    }
    let mut items: Vec<(i64, i64)> = Vec::with_capacity(pending.len());
    for r in &pending {
        items.push((r.try_get("", "seq")?, r.try_get("", "target_id")?));
    }
    let targets: Vec<i64> = items.iter().map(|(_, t)| *t).collect();
    let records = tx
        .query_all_raw(stmt(
            "SELECT sr.id, sr.record_type_id, sr.individual_id FROM sales_records sr
              WHERE sr.id = ANY($1::bigint[]) AND sr.agency_id = $2
              ORDER BY sr.id FOR UPDATE",
            [targets.clone().into(), meta.agency_id.into()],
        ))
        .await?;
    // The records' sales policies too: a custom field value being written for one of them
    // holds a KEY SHARE lock on it (migrations' orphan guard), so the conversion waits for
    // it and then moves it, or the writer waits for the conversion and then fails visibly.
    // Either way no value is left behind on a deleted sales policy.
    tx.execute_raw(stmt(
        "SELECT 1 FROM sales_policies sp
          WHERE sp.sales_record_id = ANY($1::bigint[]) AND sp.agency_id = $2
          ORDER BY sp.id FOR UPDATE",
        [targets.clone().into(), meta.agency_id.into()],
    ))
    .await?;
    let mut found: HashMap<i64, (i64, Option<i64>)> = HashMap::with_capacity(records.len());
    for r in &records {
        found.insert(
            r.try_get("", "id")?,
            (
                r.try_get("", "record_type_id")?,
                r.try_get("", "individual_id")?,
            ),
        );
    }
    let wanted: Vec<i64> = found.values().filter_map(|(_, ind)| *ind).collect();
    let mut merge_ok = std::collections::HashSet::new();
    if !wanted.is_empty() {
        let rows = tx
            .query_all_raw(stmt(
                "SELECT id FROM individuals WHERE id = ANY($1::bigint[]) AND agency_id = $2
                  ORDER BY id FOR UPDATE",
                [wanted.into(), meta.agency_id.into()],
            ))
            .await?;
        for r in &rows {
            merge_ok.insert(r.try_get::<i64>("", "id")?);
        }
    }
    let missing: Vec<i64> = targets
        .iter()
        .copied()
        .filter(|t| !found.contains_key(t))
        .collect();
    let mut logged: HashMap<i64, i64> = HashMap::new();
    if !missing.is_empty() {
        let rows = tx
            .query_all_raw(stmt(
                "SELECT sales_record_id, individual_id FROM conversion_log
                  WHERE sales_record_id = ANY($1::bigint[]) AND agency_id = $2",
                [missing.into(), meta.agency_id.into()],
            ))
            .await?;
        for r in &rows {
            logged.insert(
                r.try_get("", "sales_record_id")?,
                r.try_get("", "individual_id")?,
            );
        }
    }

    // 2. Decide each item.
    let mut merges: Vec<(i64, i64, i64)> = Vec::new(); // (seq, sr, individual)
    let mut news: Vec<(i64, i64)> = Vec::new(); // (seq, sr)
    let mut others: Vec<Outcome> = Vec::new();
    for (seq, target) in &items {
        let facts = RecordFacts {
            record: found
                .get(target)
                .map(|(ty, ind)| (*ty, ind.filter(|i| merge_ok.contains(i)))),
            converted_into: logged.get(target).copied(),
        };
        match classify(facts, |ty| meta.convertible_types.contains(&ty)) {
            Decision::Convert {
                merge_into: Some(ind),
            } => merges.push((*seq, *target, ind)),
            Decision::Convert { merge_into: None } => news.push((*seq, *target)),
            Decision::AlreadyConverted(ind) => others.push(Outcome {
                seq: *seq,
                target: *target,
                status: ItemStatus::Skipped,
                result_id: Some(ind),
                reason: Some(reason::ALREADY_CONVERTED),
            }),
            Decision::Fail(why) => others.push(Outcome {
                seq: *seq,
                target: *target,
                status: ItemStatus::Failed,
                result_id: None,
                reason: Some(why),
            }),
        }
    }
    Ok(Plan {
        merges,
        news,
        others,
    })
}

/// Steps 3 to 6 over locked, classified items: creates or merges the Individuals, moves
/// custom fields, children and policies, deletes the Sales Records, logs the conversions,
/// writes the events and every item's outcome.
///
/// # Errors
/// Database errors; the caller rolls back.
pub async fn execute(
    tx: &impl ConnectionTrait,
    meta: &BatchMeta,
    plan: Plan,
) -> Result<OutcomeDelta, DbErr> {
    let Plan {
        merges,
        news,
        others,
    } = plan;
    let mut delta = OutcomeDelta::default();
    if !merges.is_empty() || !news.is_empty() {
        // 3. New Individuals get ids reserved now, so every later statement can map
        //    Sales Record → Individual without a round trip per record.
        let mut new_ids: Vec<i64> = Vec::with_capacity(news.len());
        if !news.is_empty() {
            let rows = tx
                .query_all_raw(stmt(
                    "SELECT nextval(pg_get_serial_sequence('individuals', 'id')) AS id
                       FROM generate_series(1, $1)",
                    [(news.len() as i64).into()],
                ))
                .await?;
            for r in &rows {
                new_ids.push(r.try_get("", "id")?);
            }
            let sr_ids: Vec<i64> = news.iter().map(|(_, sr)| *sr).collect();
            tx.execute_raw(stmt(
                INSERT_NEW_SQL.as_str(),
                [sr_ids.into(), new_ids.clone().into()],
            ))
            .await?;
        }
        if !merges.is_empty() {
            let sr_ids: Vec<i64> = merges.iter().map(|(_, sr, _)| *sr).collect();
            let ind_ids: Vec<i64> = merges.iter().map(|(_, _, ind)| *ind).collect();
            tx.execute_raw(stmt(
                MERGE_SQL.as_str(),
                [sr_ids.into(), ind_ids.into(), meta.requested_by.into()],
            ))
            .await?;
        }
        let mut map_sr = Vec::with_capacity(merges.len() + news.len());
        let mut map_ind = Vec::with_capacity(merges.len() + news.len());
        let mut map_merged = Vec::with_capacity(merges.len() + news.len());
        let mut map_seq = Vec::with_capacity(merges.len() + news.len());
        for (seq, sr, ind) in &merges {
            map_sr.push(*sr);
            map_ind.push(*ind);
            map_merged.push(true);
            map_seq.push(*seq);
        }
        for ((seq, sr), ind) in news.iter().zip(&new_ids) {
            map_sr.push(*sr);
            map_ind.push(*ind);
            map_merged.push(false);
            map_seq.push(*seq);
        }
        // 4. Custom fields; 5. children and notes; 6. policies, deletion, log, outcome, event.
        tx.execute_raw(stmt(
            CUSTOM_FIELDS_SQL,
            [
                map_sr.clone().into(),
                map_ind.clone().into(),
                meta.agency_id.into(),
                meta.requested_by.into(),
            ],
        ))
        .await?;
        tx.execute_raw(stmt(
            CHILDREN_SQL.as_str(),
            [
                map_sr.clone().into(),
                map_ind.clone().into(),
                meta.agency_id.into(),
                meta.requested_by.into(),
            ],
        ))
        .await?;
        let row = tx
            .query_one_raw(stmt(
                FINISH_SQL.as_str(),
                [
                    map_sr.into(),
                    map_ind.into(),
                    map_merged.into(),
                    map_seq.into(),
                    meta.agency_id.into(),
                    meta.id.into(),
                    meta.requested_by.into(),
                ],
            ))
            .await?
            .ok_or_else(|| DbErr::Custom("conversion statement returned no row".into()))?;
        delta.converted = row.try_get("", "converted")?;
    }
    let written = crate::outcomes::write(tx, meta.id, &others).await?;
    if written.total() != others.len() as i64 {
        return Err(DbErr::Custom("an item changed under its row lock".into()));
    }
    delta.skipped += written.skipped;
    delta.failed += written.failed;
    Ok(delta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(ty: i64) -> bool {
        ty == 1
    }

    #[test]
    fn classification_follows_rules_1_3_and_10() {
        let convert_new = RecordFacts {
            record: Some((1, None)),
            converted_into: None,
        };
        assert_eq!(
            classify(convert_new, allowed),
            Decision::Convert { merge_into: None }
        );
        let merge = RecordFacts {
            record: Some((1, Some(7))),
            converted_into: None,
        };
        assert_eq!(
            classify(merge, allowed),
            Decision::Convert {
                merge_into: Some(7)
            }
        );
        let forbidden = RecordFacts {
            record: Some((2, Some(7))),
            converted_into: None,
        };
        assert_eq!(
            classify(forbidden, allowed),
            Decision::Fail(reason::FORBIDDEN)
        );
        let done = RecordFacts {
            record: None,
            converted_into: Some(9),
        };
        assert_eq!(classify(done, allowed), Decision::AlreadyConverted(9));
        let gone = RecordFacts {
            record: None,
            converted_into: None,
        };
        assert_eq!(classify(gone, allowed), Decision::Fail(reason::NOT_FOUND));
    }

    #[test]
    fn statements_move_every_mapped_field_and_table() {
        for f in CONVERT_FIELDS {
            assert!(
                INSERT_NEW_SQL.contains(&format!("sr.{}", f.from)),
                "{}",
                f.from
            );
            assert!(
                MERGE_SQL.contains(&format!("{} = COALESCE(src.{}, i.{})", f.to, f.from, f.to))
            );
            assert!(MERGE_SQL.contains(&format!(
                "('{}', i.{}::text, src.{}::text)",
                f.to, f.to, f.from
            )));
        }
        for t in CHILD_TABLES {
            assert!(CHILDREN_SQL.contains(&format!("UPDATE {t} t SET owner_type = 'individual'")));
        }
        assert_eq!(CHILD_TABLES.len() + 1, 10, "nine tables plus notes");
        for col in AGENT_COLUMNS {
            assert!(
                MERGE_SQL.contains(&format!("{col} = COALESCE(src.a[")),
                "rule 3: an unfilled agent slot keeps the Individual's value ({col})"
            );
        }
    }
}
