-- Quotas, fair shares and retention (issue 10).

-- Retention: a finished batch keeps its row (counts, who asked, the filter, timestamps) for
-- ever; its items are pruned after retention.items_days. items_pruned_at is set when the
-- pruner takes them away (from then on the API answers 410 for them); items_prune_done
-- once every item row is deleted.
ALTER TABLE bulk_batches
    ADD COLUMN items_pruned_at timestamptz,
    ADD COLUMN items_prune_done boolean NOT NULL DEFAULT false;
-- Completed batches whose items are still there, oldest first: the pruner's candidates.
CREATE INDEX bulk_batches_prunable_idx ON bulk_batches (completed_at)
    WHERE completed_at IS NOT NULL AND items_pruned_at IS NULL;
-- Batches being pruned.
CREATE INDEX bulk_batches_pruning_idx ON bulk_batches (id)
    WHERE items_pruned_at IS NOT NULL AND NOT items_prune_done;
-- The quota and the splitter's per-agency share read an agency's unfinished batches.
CREATE INDEX bulk_batches_agency_active_idx ON bulk_batches (agency_id)
    WHERE completed_at IS NULL;

CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);
CREATE INDEX conversion_log_converted_at_idx ON conversion_log (converted_at);

-- Leases of jobs that run in one process at a time (the retention pruner): a process holds
-- the lease named `name` until `until`, renewing it as it works; any process takes it
-- over once it has expired.
CREATE TABLE bulkops_leases (
    name text PRIMARY KEY,
    owner uuid NOT NULL,
    until timestamptz NOT NULL
);
