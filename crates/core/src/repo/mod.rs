//! Postgres repositories, one module per table family. Handlers never write SQL.

pub mod devices;
pub mod events;
pub mod processes;
pub mod runs;
pub mod schedules;
pub mod workflows;
pub mod campaigns;
