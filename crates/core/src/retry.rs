//! Durable retry delays: exponential backoff with jitter (`backon`, the maintained
//! successor of `backoff`). The delay is stored as the run's `not_before` in Postgres,
//! so a retry survives any process.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Delay before attempt `failed_attempt + 1`: `base * 2^(failed_attempt - 1)`, capped at
/// `max`, with up to 100% jitter added by backon (so it never falls below the base curve).
pub fn delay_after(failed_attempt: i32, base: Duration, max: Duration) -> Duration {
    let n = failed_attempt.max(1) as usize;
    ExponentialBuilder::default()
        .with_min_delay(base)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .with_max_times(n)
        .build()
        .nth(n - 1)
        .unwrap_or(max)
        .min(max * 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let d1 = delay_after(1, base, max);
        let d3 = delay_after(3, base, max);
        assert!(d1 >= base && d1 <= base * 2, "{d1:?}");
        assert!(d3 >= base * 4, "{d3:?}");
        assert!(delay_after(30, base, max) <= max * 2);
    }
}
