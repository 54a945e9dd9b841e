pub mod campaigns;
pub mod devices;
pub mod health;
pub mod modules;
pub mod runs;
pub mod workflows;
