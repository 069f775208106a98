//! Bulk create: one Sales Record per Individual, for a chunk of items at a time.
//!
//! For the chunk's still-pending items, one `INSERT … SELECT` copies rule 4's fields from
//! each Individual of the batch's agency, sets the assigned user from the servicing agent's
//! linked user (rule 5), and inserts with `ON CONFLICT ON CONSTRAINT
//! sales_records_individual_id_key DO NOTHING`: the unique index is the final guard of the
//! skip-existing rule, whatever a Redis lock did. The same statement copies the custom
//! fields rule 6 allows and writes a `sales_record.created` event to the outbox for each
//! record it created; a second statement records each item's outcome, only where the item
//! is still `pending`.
//!
//! The items a chunk decides are locked first (`FOR UPDATE`, in seq order, as conversion
//! does), so nothing else can decide them between the insert's snapshot and the outcome
//! update: without the lock, a duplicate delivery's dead-lettering could commit `failed`
//! in that gap while this chunk still created the Sales Record and its event, and the
//! ledger would contradict the records. A concurrent writer (the dead-letter watcher, a
//! duplicate chunk) waits for the lock and then finds the item decided. The unique index
//! stays the final guard of the skip-existing rule across batches. The caller commits all
//! of it with the batch counters; nothing is acknowledged before that commit.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use bulkops_shared::batch::BatchKind;
use bulkops_shared::batch::{ItemStatus, reason};
use bulkops_shared::db::stmt;
use bulkops_shared::lock::LockTarget;
use bulkops_shared::mapping::{CREATE_FIELDS, create_copied_types, insert_lists};
use bulkops_shared::progress::OutcomeDelta;
use futures_util::future::BoxFuture;
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr};

use crate::job::{Job, Prepared};
use crate::meta::BatchMeta;
use crate::outcomes::Outcome;

/// Bulk create as a [`Job`]: an item locks its Individual, and [`apply`] runs the chunk.
#[derive(Debug, Clone, Copy)]
pub struct CreateJob;

impl Job for CreateJob {
    fn kind(&self) -> BatchKind {
        BatchKind::CreateSalesRecords
    }

    fn lock_targets(&self, target: i64, _prepared: &Prepared) -> Vec<LockTarget> {
        vec![LockTarget::Individual(target)]
    }

    fn apply<'a>(
        &'a self,
        tx: &'a DatabaseTransaction,
        meta: &'a BatchMeta,
        items: &'a [(i64, i64)],
    ) -> BoxFuture<'a, Result<OutcomeDelta, DbErr>> {
        Box::pin(apply(tx, meta, items))
    }
}

/// The statement, generated once from the mapping data. For the chunk's pending items it
/// inserts their Sales Records, copies custom fields and writes the events, and returns ids
/// only: the records it created (Individual → Sales Record) and the targets that are not
/// Individuals of the agency. Deciding the outcomes is left to [`decide`], so that no join
/// over the statement's own results depends on the planner's guesses about them.
static CREATE_SQL: LazyLock<String> = LazyLock::new(|| {
    let (targets, exprs) = insert_lists(CREATE_FIELDS, "src");
    format!(
        "WITH todo AS (
           SELECT it.seq, it.target_id
             FROM unnest($2::bigint[]) AS s(seq)
             JOIN bulk_items it ON it.batch_id = $1 AND it.seq = s.seq
            WHERE it.status = 'pending'
         ), defs AS (
           SELECT sd.id AS src_def, td.id AS dst_def
             FROM custom_field_definitions sd
             JOIN custom_field_definitions td
               ON td.agency_id = sd.agency_id AND td.entity = 'sales_record'
              AND td.name = sd.name AND td.field_type = sd.field_type
            WHERE sd.agency_id = $3 AND sd.entity = 'individual' AND sd.field_type = ANY($5::text[])
         ), src AS (
           SELECT i.* FROM todo JOIN individuals i ON i.id = todo.target_id AND i.agency_id = $3
         ), ins AS (
           INSERT INTO sales_records (agency_id, record_type_id, individual_id, assigned_user_id, {targets})
           SELECT src.agency_id, $4, src.id, u.id, {exprs}
             FROM src
             LEFT JOIN user_linked_agents ula ON ula.agent_id = src.servicing_agent_id
             LEFT JOIN users u ON u.id = ula.user_id AND u.agency_id = src.agency_id
            ORDER BY src.id
           ON CONFLICT ON CONSTRAINT sales_records_individual_id_key DO NOTHING
           RETURNING id, individual_id
         ), cf AS (
           -- The records are new: no value can exist for them yet.
           INSERT INTO custom_field_values (definition_id, record_id, value)
           SELECT defs.dst_def, ins.id, v.value
             FROM ins
            CROSS JOIN defs
             JOIN custom_field_values v ON v.definition_id = defs.src_def AND v.record_id = ins.individual_id
           RETURNING 1
         ), ev AS (
           INSERT INTO outbox (routing_key, events)
           SELECT 'sales_record.created',
                  jsonb_agg(jsonb_build_object('event_id', gen_random_uuid(), {occurred}, 'agency_id', $3::bigint,
                                               'sales_record_id', ins.id, 'individual_id', ins.individual_id,
                                               'record_type_id', $4::bigint, 'batch_id', $1::bigint))
             FROM ins
           HAVING count(*) > 0
           RETURNING 1
         )
         SELECT true AS created, individual_id AS a, id AS b FROM ins
         UNION ALL
         SELECT false, todo.target_id, 0 FROM todo
          WHERE NOT EXISTS (SELECT 1 FROM individuals i WHERE i.id = todo.target_id AND i.agency_id = $3)",
        occurred = bulkops_shared::outbox::OCCURRED_AT_SQL
    )
});

/// Locks the chunk's still-pending items, in seq order (one order for every writer, so
/// two chunks over the same items cannot deadlock on them).
const LOCK_SQL: &str = "SELECT it.seq, it.target_id
       FROM unnest($2::bigint[]) AS s(seq)
       JOIN bulk_items it ON it.batch_id = $1 AND it.seq = s.seq
      WHERE it.status = 'pending'
      ORDER BY it.seq FOR UPDATE OF it";

/// The Sales Records that exist now for Individuals whose insert found one (only asked
/// when there are such skips, which acceptance makes rare).
const EXISTING_SQL: &str =
    "SELECT individual_id, id FROM sales_records WHERE individual_id = ANY($1::bigint[])";

/// Create rules 3 and 9 (tenancy) per item: the Individual got a new Sales Record
/// (`created`), is not in the batch's agency (`failed`/`not_found`), or already has one
/// (`skipped`/`already_has_sales_record`, naming it when known).
pub fn decide(
    seq: i64,
    target: i64,
    missing: &HashSet<i64>,
    created: &HashMap<i64, i64>,
    existing: &HashMap<i64, i64>,
) -> Outcome {
    if let Some(sr) = created.get(&target) {
        Outcome {
            seq,
            target,
            status: ItemStatus::Created,
            result_id: Some(*sr),
            reason: None,
        }
    } else if missing.contains(&target) {
        Outcome {
            seq,
            target,
            status: ItemStatus::Failed,
            result_id: None,
            reason: Some(reason::NOT_FOUND),
        }
    } else {
        Outcome {
            seq,
            target,
            status: ItemStatus::Skipped,
            result_id: existing.get(&target).copied(),
            reason: Some(reason::ALREADY_HAS_SALES_RECORD),
        }
    }
}

/// Creates the Sales Records of `items` (seq, target) of `meta`'s batch in the caller's
/// transaction and records their outcomes. Returns the outcomes newly recorded. An item
/// no longer pending, or whose target is not the one frozen in the batch, is left as it is.
///
/// # Errors
/// Database errors; the caller rolls back.
pub async fn apply(
    tx: &impl ConnectionTrait,
    meta: &BatchMeta,
    items: &[(i64, i64)],
) -> Result<OutcomeDelta, DbErr> {
    let record_type = meta
        .record_type_id
        .ok_or_else(|| DbErr::Custom(format!("batch {} has no record type", meta.id)))?;
    let wanted: Vec<i64> = items.iter().map(|(seq, _)| *seq).collect();
    let locked = tx
        .query_all_raw(stmt(LOCK_SQL, [meta.id.into(), wanted.into()]))
        .await?;
    let mut frozen: HashMap<i64, i64> = HashMap::with_capacity(locked.len());
    for r in &locked {
        frozen.insert(r.try_get("", "seq")?, r.try_get("", "target_id")?);
    }
    // Only pending items whose frozen target is the one the message names: a message that
    // does not match its batch decides nothing (and creates nothing).
    let items: Vec<(i64, i64)> = items
        .iter()
        .copied()
        .filter(|(seq, target)| frozen.get(seq) == Some(target))
        .collect();
    if items.is_empty() {
        return Ok(OutcomeDelta::default());
    }
    let seqs: Vec<i64> = items.iter().map(|(seq, _)| *seq).collect();
    let rows = tx
        .query_all_raw(stmt(
            CREATE_SQL.as_str(),
            [
                meta.id.into(),
                seqs.into(),
                meta.agency_id.into(),
                record_type.into(),
                create_copied_types().into(),
            ],
        ))
        .await?;
    let mut created = HashMap::with_capacity(items.len());
    let mut missing = HashSet::new();
    for r in &rows {
        let was_created: bool = r.try_get("", "created")?;
        let a: i64 = r.try_get("", "a")?;
        if was_created {
            created.insert(a, r.try_get::<i64>("", "b")?);
        } else {
            missing.insert(a);
        }
    }
    let skipped: Vec<i64> = items
        .iter()
        .map(|(_, t)| *t)
        .filter(|t| !created.contains_key(t) && !missing.contains(t))
        .collect();
    let mut existing = HashMap::new();
    if !skipped.is_empty() {
        for r in tx
            .query_all_raw(stmt(EXISTING_SQL, [skipped.into()]))
            .await?
        {
            existing.insert(r.try_get("", "individual_id")?, r.try_get("", "id")?);
        }
    }
    let outcomes: Vec<Outcome> = items
        .iter()
        .map(|(seq, target)| decide(*seq, *target, &missing, &created, &existing))
        .collect();
    crate::outcomes::write(tx, meta.id, &outcomes).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_the_rules() {
        let missing = HashSet::from([4]);
        let created = HashMap::from([(1, 100)]);
        let existing = HashMap::from([(2, 200)]);
        assert_eq!(
            decide(7, 1, &missing, &created, &existing).status,
            ItemStatus::Created
        );
        assert_eq!(
            decide(7, 1, &missing, &created, &existing).result_id,
            Some(100)
        );
        let skipped = decide(8, 2, &missing, &created, &existing);
        assert_eq!(
            (skipped.status, skipped.result_id, skipped.reason),
            (
                ItemStatus::Skipped,
                Some(200),
                Some("already_has_sales_record")
            )
        );
        // A conflict with a record that is gone again by the time it is looked up: unnamed.
        assert_eq!(decide(9, 3, &missing, &created, &existing).result_id, None);
        let not_found = decide(10, 4, &missing, &created, &existing);
        assert_eq!(
            (not_found.status, not_found.reason),
            (ItemStatus::Failed, Some("not_found"))
        );
    }

    #[test]
    fn the_statement_copies_exactly_the_mapped_fields() {
        let sql = CREATE_SQL.as_str();
        for f in CREATE_FIELDS {
            assert!(sql.contains(&format!("src.{}", f.from)), "{}", f.from);
        }
        assert!(
            sql.contains("ON CONFLICT ON CONSTRAINT sales_records_individual_id_key DO NOTHING")
        );
        assert!(
            LOCK_SQL.contains("ORDER BY it.seq FOR UPDATE OF it"),
            "the chunk locks the items it decides, in one order"
        );
        assert!(
            !sql.contains("src.lead_date"),
            "create rule 4 does not copy lead_date"
        );
    }
}
