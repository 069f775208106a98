//! Bulk create: one Sales Record per Individual, for a chunk of items in one statement.
//!
//! For the chunk's still-pending items (locked `FOR UPDATE`, so a duplicate delivery
//! waits and then finds nothing to do), one `INSERT … SELECT` copies rule 4's fields from
//! each Individual of the batch's agency, sets the assigned user from the servicing agent's
//! linked user (rule 5), and inserts with `ON CONFLICT ON CONSTRAINT
//! sales_records_individual_id_key DO NOTHING`: the unique index is the final guard of the
//! skip-existing rule, whatever a Redis lock did. The same statement copies the custom
//! fields rule 6 allows, records each item's outcome, and writes a `sales_record.created`
//! event to the outbox for each record created. The caller commits it together with the
//! batch counters; nothing is acknowledged before that commit.

use std::sync::LazyLock;

use bulkops_shared::batch::reason;
use bulkops_shared::db::stmt;
use bulkops_shared::mapping::{CREATE_FIELDS, create_copied_types, insert_lists};
use bulkops_shared::progress::OutcomeDelta;
use sea_orm::{ConnectionTrait, DbErr};

use crate::meta::BatchMeta;

/// The statement, generated once from the mapping data.
static CREATE_SQL: LazyLock<String> = LazyLock::new(|| {
    let (targets, exprs) = insert_lists(CREATE_FIELDS, "src");
    format!(
        "WITH todo AS (
           SELECT it.seq, it.target_id FROM bulk_items it
            WHERE it.batch_id = $1 AND it.seq = ANY($2::bigint[]) AND it.status = 'pending'
            ORDER BY it.target_id
              FOR UPDATE
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
           INSERT INTO custom_field_values (definition_id, record_id, value)
           SELECT td.id, ins.id, v.value
             FROM ins
             JOIN custom_field_values v ON v.record_id = ins.individual_id
             JOIN custom_field_definitions sd
               ON sd.id = v.definition_id AND sd.entity = 'individual' AND sd.agency_id = $3
             JOIN custom_field_definitions td
               ON td.agency_id = $3 AND td.entity = 'sales_record'
              AND td.name = sd.name AND td.field_type = sd.field_type
            WHERE sd.field_type = ANY($5::text[])
           ON CONFLICT DO NOTHING
           RETURNING 1
         ), ev AS (
           INSERT INTO outbox (routing_key, payload)
           SELECT 'sales_record.created',
                  jsonb_build_object('agency_id', $3::bigint, 'sales_record_id', ins.id,
                                     'individual_id', ins.individual_id,
                                     'record_type_id', $4::bigint, 'batch_id', $1::bigint)
             FROM ins
           RETURNING 1
         ), upd AS (
           UPDATE bulk_items it
              SET status = CASE WHEN ins.id IS NOT NULL THEN 'created'
                                WHEN src.id IS NULL THEN 'failed' ELSE 'skipped' END,
                  result_id = ins.id,
                  reason = CASE WHEN ins.id IS NOT NULL THEN NULL
                                WHEN src.id IS NULL THEN '{not_found}' ELSE '{already}' END,
                  attempts = it.attempts + 1,
                  updated_at = clock_timestamp()
             FROM todo
             LEFT JOIN ins ON ins.individual_id = todo.target_id
             LEFT JOIN src ON src.id = todo.target_id
            WHERE it.batch_id = $1 AND it.seq = todo.seq
           RETURNING it.status
         )
         SELECT status, count(*) AS n, (SELECT count(*) FROM cf) AS custom_values,
                (SELECT count(*) FROM ev) AS events
           FROM upd GROUP BY status",
        not_found = reason::NOT_FOUND,
        already = reason::ALREADY_HAS_SALES_RECORD,
    )
});

/// Names, for items skipped because a concurrent transaction created the Sales Record
/// after this statement's snapshot, the record that exists now.
const SKIPPED_RESULTS_SQL: &str = "UPDATE bulk_items it SET result_id = sr.id
    FROM sales_records sr
   WHERE it.batch_id = $1 AND it.seq = ANY($2::bigint[]) AND it.status = 'skipped'
     AND it.result_id IS NULL AND sr.individual_id = it.target_id";

/// Creates the Sales Records of `seqs` (items of `meta`'s batch) in the caller's
/// transaction and records their outcomes. Returns the outcomes newly recorded.
///
/// # Errors
/// Database errors; the caller rolls back.
pub async fn apply(
    tx: &impl ConnectionTrait,
    meta: &BatchMeta,
    seqs: &[i64],
) -> Result<OutcomeDelta, DbErr> {
    let record_type = meta
        .record_type_id
        .ok_or_else(|| DbErr::Custom(format!("batch {} has no record type", meta.id)))?;
    let rows = tx
        .query_all_raw(stmt(
            CREATE_SQL.as_str(),
            [
                meta.id.into(),
                seqs.to_vec().into(),
                meta.agency_id.into(),
                record_type.into(),
                create_copied_types().into(),
            ],
        ))
        .await?;
    let mut delta = OutcomeDelta::default();
    for r in &rows {
        let status: String = r.try_get("", "status")?;
        let n: i64 = r.try_get("", "n")?;
        delta.add(&status, n);
    }
    if delta.skipped > 0 {
        tx.execute_raw(stmt(
            SKIPPED_RESULTS_SQL,
            [meta.id.into(), seqs.to_vec().into()],
        ))
        .await?;
    }
    Ok(delta)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            !sql.contains("src.lead_date"),
            "create rule 4 does not copy lead_date"
        );
    }
}
