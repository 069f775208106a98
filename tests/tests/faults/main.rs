//! The fault suite: each scenario runs a real bulk create or conversion batch of a few
//! thousand items with several worker processes, injects one kind of fault, and ends with
//! the history check: every item has exactly one outcome, no Individual has two Sales
//! Records, no conversion is partial, every committed change has its event (by event_id)
//! and no event lacks its change, and the batch completes with counts that add up.
//!
//! Faults come from a fault-injecting TCP proxy in front of RabbitMQ, Redis or PostgreSQL
//! (cut every connection, stall traffic, drop connections mid-frame), from signals to the
//! programs (SIGKILL of workers and of a producer while it splits, SIGSTOP past the lock
//! TTL), from restarts of service instances the test started itself on other ports (never
//! the machine's services), and from messages the test publishes (duplicates, garbage).
//!
//! Each scenario appends its tally to `target/reliability/results.jsonl`;
//! `scripts/reliability-table.sh` turns that into the table of `docs/RELIABILITY.md`.

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod partial;
mod scenarios;

use bulkops_tests::check::Tally;
pub use bulkops_tests::scenario::{
    WAIT, assert_mid_batch, bulk_create_all, completed_within, convert_world, create_world,
    finish_convert, finish_create, keep_splitting, mid_batch, start_processes, wait_completed,
    wait_done, worker_api,
};

/// How many times each scenario runs (`FAULT_RUNS`, default 1).
pub fn runs() -> usize {
    bulkops_tests::scenario::runs_from("FAULT_RUNS")
}

/// Appends a scenario's tally to the fault suite's results and asserts it is clean.
pub fn record(fault: &str, tally: Tally) {
    bulkops_tests::scenario::record_to("results.jsonl", fault, tally);
}
