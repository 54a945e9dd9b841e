pub mod campaigns;
pub mod devices;
pub mod health;
pub mod metrics;
pub mod modules;
pub mod runs;
pub mod schedules;
pub mod workflows;
