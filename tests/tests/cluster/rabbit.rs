//! Cluster scenarios: rabbit (see main.rs).
