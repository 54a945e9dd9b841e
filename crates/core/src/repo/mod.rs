//! Postgres repositories, one module per table family: they take typed values, lock
//! and write rows, and hold every SQL statement of the product. Handlers never write
//! SQL; `service` composes repositories into the operations roles call.

pub mod campaign_runs;
pub mod campaigns;
pub mod captures;
pub mod dashboard;
pub mod devices;
pub mod events;
pub mod feed;
pub mod hosts;
pub mod presence;
pub mod processes;
pub mod reports;
pub mod retention;
pub mod rollup;
pub mod runs;
pub mod schedules;
pub mod search;
pub mod stats;
pub mod tokens;
pub mod workflows;
