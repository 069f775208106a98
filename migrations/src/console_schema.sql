-- What the operator console reads beside the batches: workers' readiness and a shared
-- throughput history. Both are small and bounded; neither is read from bulk_items.

-- One row per running worker process, refreshed every few seconds with the answer of its
-- own readiness check (worker/src/heartbeat.rs) and deleted when it stops cleanly. A row
-- that stops being refreshed is a worker that is gone or cannot reach the database; the
-- console says so from seen_at. Rows unseen for a day are deleted by the workers.
CREATE TABLE worker_heartbeats (
    worker_id uuid PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    version text NOT NULL,
    started_at timestamptz NOT NULL,
    seen_at timestamptz NOT NULL,
    ready boolean NOT NULL,
    broker boolean NOT NULL,
    redis boolean NOT NULL,
    inflight bigint NOT NULL DEFAULT 0,
    draining boolean NOT NULL DEFAULT false
);

-- Items given their outcome by workers per interval, for the console's chart. Whichever
-- producer takes the cursor's row lock first writes the sample of that interval, so any
-- number of producers write one history between them (producer/src/ui/sampler.rs).
CREATE TABLE throughput_samples (
    at timestamptz PRIMARY KEY,
    seconds double precision NOT NULL CHECK (seconds > 0),
    items bigint NOT NULL CHECK (items >= 0)
);

-- Where the last sample left off: when it was taken, the highest batch id it knew, and the
-- worker-decided count of every batch it watched (active then), to take differences from.
CREATE TABLE throughput_cursor (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    at timestamptz NOT NULL,
    max_batch_id bigint NOT NULL,
    done jsonb NOT NULL CHECK (jsonb_typeof(done) = 'object')
);
