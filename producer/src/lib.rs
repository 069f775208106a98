//! The bulkops producer: the HTTP API the CRM calls, and the part of the pipeline beside
//! it (freezing batches, splitting them into per-record messages, relaying events).
//!
//! # Layout
//! - [`app`]: router, middleware, background tasks and `run`.
//! - [`listener`]: accepted connections with TCP keepalives and a write timeout.
//! - [`routes`]: one module per resource (search, saved searches, bulk, batches, operations).
//! - [`auth`]: JWT authentication into a [`auth::Caller`] with the user's rights.
//! - [`extract`], [`problem`]: typed request parsing and RFC 9457 errors.
//! - [`accept`]: accepting a batch in one transaction (freeze, pre-settle, idempotency).
//! - [`quota`]: the per-agency limit on items in flight.
//! - [`fair`]: fair shares of the bulk lane, per agency then per batch.
//! - [`retention`]: the pruner of finished batches' items, old keys and logs.
//! - [`split`]: resumable, metered, fair splitting into messages.
//! - [`spans`]: the request span (continuing the CRM's `traceparent`) and the split
//!   chunks' spans (continuing the batch's stored context).
//! - [`monitor`]: gauges for dashboards and autoscalers.
//! - [`openapi`]: the generated OpenAPI document.
//! - [`ui`]: the operator console under `/ui` (`ui.enabled`).

pub mod accept;
pub mod app;
pub mod auth;
pub mod extract;
pub mod fair;
pub mod listener;
pub mod monitor;
pub mod openapi;
pub mod problem;
pub mod quota;
pub mod retention;
pub mod routes;
pub mod spans;
pub mod split;
pub mod state;
pub mod ui;

pub use app::{router, run, serve};
