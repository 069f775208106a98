//! Cluster scenarios: pg (see main.rs).
