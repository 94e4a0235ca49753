//! The `weir` server: the engine that executes statements, its Postgres front door, and HTTP
//! (the web console, health and metrics).
//!
//! # Layout
//!
//! - [`engine`]: [`Engine`], which executes every statement, owns the catalog, the DataFusion
//!   session, and the running pipelines.
//! - [`compat`]: rewrites for Postgres clients' catalog queries (`ARRAY(subquery)`).
//! - [`introspection`]: the rows of SHOW / DESCRIBE / SHOW CREATE / EXPLAIN.
//! - [`pg`]: the pgwire handlers (simple and extended protocol), type mapping and errors.
//! - [`users`]: users, their SCRAM verifiers and privileges (`users.json`).
//! - [`console`]: the web console's API (sessions, notebooks, running blocks, the pipelines
//!   page); its page and scripts are in `server/console/`, embedded.
//! - [`http`]: the HTTP listener: the console, `GET /health` and `GET /metrics`.
//! - `main.rs`: the CLI (`weir serve | run | check`).

pub mod compat;
pub mod console;
pub mod engine;
#[cfg(test)]
mod fuzz;
pub mod http;
pub mod introspection;
pub mod pg;
pub mod users;

pub use engine::{Engine, EngineConfig, Output};
