//! HTTP handlers, one module per resource.

pub mod batches;
pub mod bulk;
pub mod ops;
pub mod saved;
pub mod search;
