-- No orphans (contract rule 7: a converted Sales Record's children move with it).
--
-- The CRM's schema has no foreign keys, and its owned child tables are polymorphic
-- (owner_type, owner_id), so a plain foreign key cannot say "owner_id is a Sales Record".
-- These triggers stand in for one, beside the CRM's tables: every statement that inserts
-- or re-owns rows pointing at a Sales Record (or, for custom field values, at a Sales
-- Record or a sales policy) takes a KEY SHARE lock on each owner and fails with SQLSTATE
-- 23503 (foreign_key_violation) when an owner does not exist.
--
-- With the conversion's row locks this closes the race. A conversion locks its Sales
-- Records and their sales policies FOR UPDATE before it reads any child. A child written
-- before that lock holds the KEY SHARE lock until it commits, so the conversion waits and
-- then sees (and moves) it. A child written after it waits for the conversion, then finds
-- its owner deleted and fails visibly instead of becoming an orphan.
--
-- The triggers are statement-level with transition tables: a bulk create that copies
-- thousands of custom field values pays one set-based check per statement, not one per row.

CREATE FUNCTION bulkops_guard_sales_record_children() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    gone bigint;
BEGIN
    PERFORM 1 FROM sales_records sr
     WHERE sr.id IN (SELECT n.owner_id FROM bulkops_new n WHERE n.owner_type = 'sales_record')
     ORDER BY sr.id
       FOR KEY SHARE OF sr;
    SELECT n.owner_id INTO gone
      FROM bulkops_new n
     WHERE n.owner_type = 'sales_record'
       AND NOT EXISTS (SELECT 1 FROM sales_records sr WHERE sr.id = n.owner_id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'sales record % does not exist (converted or deleted): % rows cannot be owned by it',
                        gone, TG_TABLE_NAME
              USING ERRCODE = 'foreign_key_violation', TABLE = TG_TABLE_NAME;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION bulkops_guard_sales_policies() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    gone bigint;
BEGIN
    PERFORM 1 FROM sales_records sr
     WHERE sr.id IN (SELECT n.sales_record_id FROM bulkops_new n)
     ORDER BY sr.id
       FOR KEY SHARE OF sr;
    SELECT n.sales_record_id INTO gone
      FROM bulkops_new n
     WHERE NOT EXISTS (SELECT 1 FROM sales_records sr WHERE sr.id = n.sales_record_id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'sales record % does not exist (converted or deleted): sales_policies rows cannot be owned by it',
                        gone
              USING ERRCODE = 'foreign_key_violation', TABLE = TG_TABLE_NAME;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION bulkops_guard_custom_field_values() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    gone bigint;
BEGIN
    PERFORM 1 FROM sales_records sr
     WHERE sr.id IN (SELECT n.record_id FROM bulkops_new n
                       JOIN custom_field_definitions d ON d.id = n.definition_id AND d.entity = 'sales_record')
     ORDER BY sr.id
       FOR KEY SHARE OF sr;
    PERFORM 1 FROM sales_policies sp
     WHERE sp.id IN (SELECT n.record_id FROM bulkops_new n
                       JOIN custom_field_definitions d ON d.id = n.definition_id AND d.entity = 'sales_policy')
     ORDER BY sp.id
       FOR KEY SHARE OF sp;
    SELECT n.record_id INTO gone
      FROM bulkops_new n
      JOIN custom_field_definitions d ON d.id = n.definition_id
     WHERE (d.entity = 'sales_record' AND NOT EXISTS (SELECT 1 FROM sales_records sr WHERE sr.id = n.record_id))
        OR (d.entity = 'sales_policy' AND NOT EXISTS (SELECT 1 FROM sales_policies sp WHERE sp.id = n.record_id))
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'record % does not exist (converted or deleted): custom field values cannot be attached to it',
                        gone
              USING ERRCODE = 'foreign_key_violation', TABLE = TG_TABLE_NAME;
    END IF;
    RETURN NULL;
END $$;

-- A trigger with transition tables serves one event, hence one trigger for INSERT and one
-- for UPDATE per table.
DO $$
DECLARE
    t text;
    f text;
BEGIN
    FOR t, f IN
        SELECT x, 'bulkops_guard_sales_record_children'
          FROM unnest(ARRAY['notes', 'activities', 'attachments', 'call_recordings', 'sms_messages',
                            'prescriptions', 'providers', 'change_history', 'aca_consents',
                            'scope_of_appointments']) AS x
        UNION ALL SELECT 'sales_policies', 'bulkops_guard_sales_policies'
        UNION ALL SELECT 'custom_field_values', 'bulkops_guard_custom_field_values'
    LOOP
        EXECUTE format('CREATE TRIGGER bulkops_owner_exists_ins AFTER INSERT ON %I
                          REFERENCING NEW TABLE AS bulkops_new
                          FOR EACH STATEMENT EXECUTE FUNCTION %I()', t, f);
        EXECUTE format('CREATE TRIGGER bulkops_owner_exists_upd AFTER UPDATE ON %I
                          REFERENCING NEW TABLE AS bulkops_new
                          FOR EACH STATEMENT EXECUTE FUNCTION %I()', t, f);
    END LOOP;
END $$;
