//! Route handlers, one module per resource. They parse requests (`extract`,
//! `requests`), call core, and map the result; none imports another.

pub mod campaigns;
pub mod dashboard;
pub mod devices;
pub mod feed;
pub mod health;
pub mod hosts;
pub mod metrics;
pub mod modules;
pub mod runs;
pub mod schedules;
pub mod search;
pub mod system;
pub mod tokens;
pub mod workflows;
