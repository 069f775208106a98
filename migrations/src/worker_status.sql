-- One row per running worker, one mechanism (worker/src/status.rs): the worker's own
-- readiness, refreshed every few seconds for the operator console, and, while some chunk
-- of it waits for an unreachable dependency, what it waits for, renewed every few seconds
-- for the producers' stall sweeper (a batch that does not move while a report is fresh is
-- held up, not lost). Until now these were two tables written by two tasks
-- (worker_heartbeats and bulk_worker_status) about the same process.
ALTER TABLE worker_heartbeats RENAME TO worker_status;
ALTER TABLE worker_status
    ADD COLUMN waiting_for text[] NOT NULL DEFAULT '{}',
    ADD COLUMN waiting_since timestamptz,
    ADD COLUMN waiting_reported_at timestamptz;
CREATE INDEX worker_status_waiting ON worker_status (waiting_reported_at)
    WHERE waiting_reported_at IS NOT NULL;

-- Outage reports in flight are not carried over: a waiting worker renews its report
-- within seconds, and one of the previous release cannot (see the views below).
DROP TABLE bulk_worker_status;

-- The old names, as views, for the programs of the previous release during a rolling
-- upgrade: its producers read both; its workers upsert into worker_heartbeats, a simple
-- updatable view (their outage reports fail until they are replaced). No program of this
-- release uses them; a later migration drops them.
CREATE VIEW worker_heartbeats AS
SELECT worker_id, host, pid, version, started_at, seen_at, ready, broker, redis, inflight, draining
  FROM worker_status;
CREATE VIEW bulk_worker_status AS
SELECT worker_id, waiting_for, waiting_since AS since, waiting_reported_at AS reported_at
  FROM worker_status
 WHERE waiting_reported_at IS NOT NULL;
