//! Black-box tests: the real `switchboard` binary against the real Postgres and Redis.
//! One test binary (compile time is scarce); one module per feature.

mod access;
mod correctness;
mod dashboard;
mod durability;
mod feed;
mod foundation;
mod grafana;
mod harness;
mod hosts;
mod limits;
mod observability;
mod orchestration;
mod otlp;
mod phones;
mod reports;
mod scheduling;
mod throughput;
