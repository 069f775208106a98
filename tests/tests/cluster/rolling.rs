//! Cluster scenarios: rolling (see main.rs).
