//! End-to-end tests: a real `weir serve` process driven by real `psql` and tokio-postgres,
//! with results checked against an independent reader (DuckDB) where there is data.
//!
//! One test binary with modules (each integration binary links all of DataFusion).

mod harness;

mod bad_input;
mod catalog;
mod checkpoints;
mod clients;
mod cluster;
mod concurrency;
mod console;
mod dashboards;
mod front_door;
mod grafana;
mod kafka;
mod lake;
mod lookup;
mod prometheus;
mod run_and_check;
mod tail;
mod types;
mod windows;
