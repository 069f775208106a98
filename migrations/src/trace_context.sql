-- Trace context (issue 12): the W3C `traceparent` a batch was accepted under, and the one
-- each outbox row was written under, so that a batch keeps its trace across producers and
-- restarts and every event carries it to the CRM.
--
-- Both columns default to the transaction's stamp (`SELECT set_config('bulkops.traceparent',
-- …, true)`, issued by a transaction that runs inside a recorded span): no insert names
-- them, and with traces off (no stamp) they stay NULL. `current_setting(…, true)` is NULL
-- when the setting was never set on the connection and '' once a transaction that set it
-- has ended; both mean no context. Adding a column with a non-volatile default and no
-- rewrite is instant, on tables of any size.
ALTER TABLE bulk_batches
    ADD COLUMN IF NOT EXISTS trace_context text
    DEFAULT NULLIF(current_setting('bulkops.traceparent', true), '');

ALTER TABLE outbox
    ADD COLUMN IF NOT EXISTS traceparent text
    DEFAULT NULLIF(current_setting('bulkops.traceparent', true), '');
