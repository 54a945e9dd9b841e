//! Logging setup: human-readable by default, JSON with `SWITCHBOARD_LOG_FORMAT=json`.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber (`format`: `text` or `json`); `RUST_LOG` filters.
pub fn init(format: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,apalis=warn,apalis_core=warn,apalis_redis=warn"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if format.eq_ignore_ascii_case("json") {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    let _ = result;
}
