-- The orphan guards (orphan_guard.sql), rewritten so that their cost follows the rows a
-- statement writes, never the size of the owners' tables (issue 13).
--
-- Their queries had no parameters, so PL/pgSQL planned each once per session and kept
-- the plan for the session's life. A worker's connection planned them at its first bulk
-- create, when sales_records was small. There a hashed subplan, one scan of the whole
-- sales_records primary key per statement, was the cheapest way to check a chunk's
-- owners. The plan stayed while the table grew, so every chunk scanned every Sales
-- Record: a 1,000,000-Individual bulk create slowed from 2,100 to 700 records/s as it
-- went, and each chunk's statement took 2 s instead of 0.1 s.
--
-- Now each guard:
-- 1. collects the distinct owner ids of the statement's rows into an array;
-- 2. locks those owners FOR KEY SHARE in id order, by primary key (`id = ANY(ids)`);
-- 3. compares the number of rows it locked with the number of ids. Only when an owner
--    is missing does it look for which one, to name it in the error.
--
-- The ids are a parameter, and `plan_cache_mode = force_custom_plan` plans each lock
-- for the ids at hand and the table's size now, so no plan outlives the sizes it was
-- made for. Step 3 replaces the second pass the old guards made over the owners.
--
-- What the guards promise is unchanged: an owner that does not exist (or is deleted by
-- a conversion this statement waited for) fails the statement with SQLSTATE 23503, and
-- an owner that exists is KEY SHARE locked until the writer commits.

CREATE OR REPLACE FUNCTION bulkops_guard_sales_record_children() RETURNS trigger
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    ids bigint[];
    locked bigint;
    gone bigint;
BEGIN
    ids := ARRAY(SELECT DISTINCT n.owner_id FROM bulkops_new n WHERE n.owner_type = 'sales_record');
    IF cardinality(ids) = 0 THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM sales_records sr WHERE sr.id = ANY (ids) ORDER BY sr.id FOR KEY SHARE OF sr;
    GET DIAGNOSTICS locked = ROW_COUNT;
    IF locked < cardinality(ids) THEN
        SELECT k.id INTO gone FROM unnest(ids) AS k(id)
         WHERE NOT EXISTS (SELECT 1 FROM sales_records sr WHERE sr.id = k.id)
         LIMIT 1;
        RAISE EXCEPTION 'sales record % does not exist (converted or deleted): % rows cannot be owned by it',
                        gone, TG_TABLE_NAME
              USING ERRCODE = 'foreign_key_violation', TABLE = TG_TABLE_NAME;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION bulkops_guard_sales_policies() RETURNS trigger
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    ids bigint[];
    locked bigint;
    gone bigint;
BEGIN
    ids := ARRAY(SELECT DISTINCT n.sales_record_id FROM bulkops_new n);
    IF cardinality(ids) = 0 THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM sales_records sr WHERE sr.id = ANY (ids) ORDER BY sr.id FOR KEY SHARE OF sr;
    GET DIAGNOSTICS locked = ROW_COUNT;
    -- A NULL id counts in the array and never matches: it fails, as it did before.
    IF locked < cardinality(ids) THEN
        SELECT k.id INTO gone FROM unnest(ids) AS k(id)
         WHERE NOT EXISTS (SELECT 1 FROM sales_records sr WHERE sr.id = k.id)
         LIMIT 1;
        RAISE EXCEPTION 'sales record % does not exist (converted or deleted): sales_policies rows cannot be owned by it',
                        gone
              USING ERRCODE = 'foreign_key_violation', TABLE = TG_TABLE_NAME;
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION bulkops_guard_custom_field_values() RETURNS trigger
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    records bigint[];
    policies bigint[];
    locked bigint;
    gone bigint;
BEGIN
    records := ARRAY(SELECT DISTINCT n.record_id FROM bulkops_new n
                       JOIN custom_field_definitions d ON d.id = n.definition_id AND d.entity = 'sales_record');
    policies := ARRAY(SELECT DISTINCT n.record_id FROM bulkops_new n
                        JOIN custom_field_definitions d ON d.id = n.definition_id AND d.entity = 'sales_policy');
    IF cardinality(records) > 0 THEN
        PERFORM 1 FROM sales_records sr WHERE sr.id = ANY (records) ORDER BY sr.id FOR KEY SHARE OF sr;
        GET DIAGNOSTICS locked = ROW_COUNT;
        IF locked < cardinality(records) THEN
            SELECT k.id INTO gone FROM unnest(records) AS k(id)
             WHERE NOT EXISTS (SELECT 1 FROM sales_records sr WHERE sr.id = k.id)
             LIMIT 1;
            RAISE EXCEPTION 'record % does not exist (converted or deleted): custom field values cannot be attached to it',
                            gone
                  USING ERRCODE = 'foreign_key_violation', TABLE = TG_TABLE_NAME;
        END IF;
    END IF;
    IF cardinality(policies) > 0 THEN
        PERFORM 1 FROM sales_policies sp WHERE sp.id = ANY (policies) ORDER BY sp.id FOR KEY SHARE OF sp;
        GET DIAGNOSTICS locked = ROW_COUNT;
        IF locked < cardinality(policies) THEN
            SELECT k.id INTO gone FROM unnest(policies) AS k(id)
             WHERE NOT EXISTS (SELECT 1 FROM sales_policies sp WHERE sp.id = k.id)
             LIMIT 1;
            RAISE EXCEPTION 'record % does not exist (converted or deleted): custom field values cannot be attached to it',
                            gone
                  USING ERRCODE = 'foreign_key_violation', TABLE = TG_TABLE_NAME;
        END IF;
    END IF;
    RETURN NULL;
END $$;
