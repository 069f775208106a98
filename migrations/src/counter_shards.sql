-- Counter shards (issue 13): a worker's chunk transaction adds the outcomes it recorded to
-- a row of its own, keyed by its backend's pid, instead of to the batch's row. Two
-- backends never share a pid, so concurrent chunks of one batch no longer queue on the
-- batch row (each held its lock through its commit's flush). Short transactions after
-- the commits fold the shards into bulk_batches' counters and complete the batch
-- (shared::progress::fold): the batch row's counters lag the items by at most what the
-- shards hold (a chunk or two per worker, folded every few hundred milliseconds), and are
-- exact once the batch has completed.
--
-- No foreign key (as for bulk_items): a row lives from a chunk's commit to the next fold.
-- Its updates leave the key alone, so they are HOT; fillfactor leaves room for them.
CREATE TABLE bulk_batch_counts (
    batch_id bigint NOT NULL,
    shard integer NOT NULL,
    n_created bigint NOT NULL DEFAULT 0,
    n_converted bigint NOT NULL DEFAULT 0,
    n_skipped bigint NOT NULL DEFAULT 0,
    n_failed bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (batch_id, shard)
) WITH (fillfactor = 50);

-- What a batch has decided so far, shards included: for readers that must be exact while
-- a batch runs (tests, operators' ad-hoc queries); the API reads the folded counters.
CREATE VIEW bulk_batch_live_counts AS
SELECT b.id AS batch_id,
       b.n_created + COALESCE(sum(c.n_created), 0)::bigint AS n_created,
       b.n_converted + COALESCE(sum(c.n_converted), 0)::bigint AS n_converted,
       b.n_skipped + COALESCE(sum(c.n_skipped), 0)::bigint AS n_skipped,
       b.n_failed + COALESCE(sum(c.n_failed), 0)::bigint AS n_failed
  FROM bulk_batches b
  LEFT JOIN bulk_batch_counts c ON c.batch_id = b.id
 GROUP BY b.id;
