//! Cluster scenarios: redis (see main.rs).
