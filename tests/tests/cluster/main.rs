//! The cluster suite: bulkops on clustered engines that lose nodes.
//!
//! Each scenario starts its own engines from the installed packages, on free ports with
//! data directories of their own, and removes them afterwards (never the machine's
//! services): a 3-node RabbitMQ cluster, a Redis Cluster (3 masters, 3 replicas) or a
//! Sentinel setup (1 master, 1 replica, 3 Sentinels), PgBouncer in front of PostgreSQL, and
//! a PostgreSQL primary/standby pair behind a TCP switch. It runs a real batch with real
//! producer and worker processes, loses a node mid-batch, and ends with the fault suite's
//! history check (one outcome per item, one Sales Record per Individual, events iff
//! commits, counts that add up).
//!
//! Each scenario appends its tally to `target/reliability/cluster.jsonl`;
//! `make test-cluster CLUSTER_RUNS=n` turns it into the cluster table of
//! `docs/RELIABILITY.md`.
//!
//! # Layout
//! - `rabbit`: RabbitMQ cluster scenarios (leader loss, connected node loss, rolling
//!   restart).
//! - `redis`: Redis Cluster and Sentinel scenarios.
//! - `pg`: PgBouncer and PostgreSQL failover scenarios.
//! - `rolling`: rolling restarts of bulkops' own processes on clustered engines.

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod pg;
mod rabbit;
mod redis;
mod rolling;

use bulkops_tests::check::Tally;

/// How many times each scenario runs (`CLUSTER_RUNS`, default 1).
pub fn runs() -> usize {
    bulkops_tests::scenario::runs_from("CLUSTER_RUNS")
}

/// Appends a scenario's tally to the cluster suite's results and asserts it is clean.
pub fn record(fault: &str, tally: Tally) {
    bulkops_tests::scenario::record_to("cluster.jsonl", fault, tally);
}
