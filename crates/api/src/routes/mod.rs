pub mod devices;
pub mod health;
pub mod modules;
pub mod runs;
