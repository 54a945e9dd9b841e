//! Switchboard's domain core: typed ids and models, the run lifecycle and the other
//! pure decisions (breaker, campaign admission, tick planning), configuration, the
//! Postgres repositories, the queue adapter, and the service layer the `api`, `worker`
//! and `scheduler` crates call. They depend on this one and never on each other.

#![warn(missing_docs)]

pub mod breaker;
pub mod campaign;
pub mod catalog;
pub mod config;
pub mod cron_expr;
pub mod db;
pub mod definition;
pub mod error;
pub mod events;
pub mod formats;
pub mod group;
pub mod history;
pub mod ids;
pub mod junit;
pub mod launch;
pub mod lifecycle;
pub mod meters;
pub mod model;
pub mod pagination;
pub mod presence;
pub mod queue;
pub mod repo;
pub mod retry;
pub mod run_error;
pub mod schema;
pub mod selector;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tick;
pub mod validation;

pub use error::{CoreError, CoreResult};
