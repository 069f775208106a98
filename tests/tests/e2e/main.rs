//! End-to-end tests: real `bulkops-producer` and `bulkops-worker` processes over HTTP and
//! AMQP, against the machine's PostgreSQL, RabbitMQ and Redis. Each test has its own
//! database, AMQP prefix and Redis prefix (see `bulkops_tests::env`).

// Test code: a failed expectation is a failed test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod api_edges;
mod console;
mod convert;
mod counters;
mod create;
mod exports;
mod handlers;
mod interleave;
mod openapi;
mod ops;
mod privacy;
mod processor;
mod quota;
mod retention;
mod router;
mod traces;

use bulkops_tests::TestEnv;

/// A fresh environment for a test.
pub async fn env(name: &str) -> TestEnv {
    TestEnv::new(name)
        .await
        .unwrap_or_else(|e| panic!("test environment: {e:#}"))
}
