-- The stall sweeper only republishes what is really missing, a bounded number of times.
--
-- resplit_generation counts how often a batch's pending items were published again after
-- its split finished; generations are spaced split.stall_after_secs × 2^generation (the
-- exponent capped at 4), so a batch that stays stuck is retried ever more rarely.
ALTER TABLE bulk_batches
    ADD COLUMN resplit_generation integer NOT NULL DEFAULT 0,
    ADD COLUMN resplit_at timestamptz;

-- Workers waiting for an unreachable dependency say so here (one row per worker, renewed
-- every few seconds while it waits). A batch that does not move while a worker reports an
-- outage is held up, not lost: the sweeper republishes nothing while any report is fresh.
CREATE TABLE bulk_worker_status (
    worker_id uuid PRIMARY KEY,
    waiting_for text[] NOT NULL,
    since timestamptz NOT NULL,
    reported_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
