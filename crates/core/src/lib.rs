//! Switchboard's domain core: types, configuration, Postgres repositories, the queue
//! adapter, the module catalog and parameter validation. The `api`, `worker` and
//! `scheduler` crates depend on this one and never on each other.

pub mod breaker;
pub mod catalog;
pub mod config;
pub mod cron_expr;
pub mod db;
pub mod error;
pub mod ids;
pub mod input;
pub mod model;
pub mod pagination;
pub mod queue;
pub mod repo;
pub mod retry;
pub mod schema;
pub mod selector;
pub mod shutdown;
pub mod telemetry;

pub use error::{CoreError, CoreResult};
