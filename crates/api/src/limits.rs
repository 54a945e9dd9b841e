//! Rate limits: one budget per calling token and one per client address, each a
//! GCRA ("leaky bucket as a meter", the algorithm behind `governor`): `per_s` requests
//! a second sustained, bursts of up to `burst` at once. Written here rather than taken
//! from `tower_governor` because the per-token key is only known after authentication
//! (inside our middleware, not in a tower layer in front of it), and the whole decision
//! is the dozen lines of `decide`.
//!
//! The budgets are per api process: behind N replicas a caller gets N times as much.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use switchboard_core::config::ApiConfig;

use crate::error::ApiError;

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// A key's state: its theoretical arrival time (when its bucket will next be empty).
type Tat = Instant;

/// What one request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead; the key's new theoretical arrival time.
    Allow(Tat),
    /// Wait this long before trying again.
    Deny(Duration),
}

/// The GCRA decision for one request at `now`: each request moves the key's
/// theoretical arrival time on by `interval` (1 / rate); a request is allowed while
/// that time is no more than `burst − 1` intervals ahead of now.
pub fn decide(tat: Option<Tat>, now: Instant, interval: Duration, burst: u32) -> Decision {
    let tolerance = interval * burst.saturating_sub(1);
    let tat = tat.map_or(now, |t| t.max(now));
    let ahead = tat - now;
    if ahead > tolerance {
        return Decision::Deny(ahead - tolerance);
    }
    Decision::Allow(tat + interval)
}

/// A limit over many keys (tokens, addresses).
#[derive(Debug)]
pub struct Limiter {
    interval: Duration,
    burst: u32,
    keys: Mutex<HashMap<String, Tat>>,
}

/// Keys are forgotten once their bucket has drained (they are then as good as new);
/// the map is swept when it grows past this many.
const SWEEP_AT: usize = 10_000;

impl Limiter {
    /// `per_s` requests a second sustained, bursts of `burst`; `None` when `per_s` is 0
    /// (no limit).
    pub fn new(per_s: u32, burst: u32) -> Option<Limiter> {
        (per_s > 0).then(|| Limiter {
            interval: Duration::from_secs_f64(1.0 / f64::from(per_s)),
            burst: burst.max(1),
            keys: Mutex::new(HashMap::new()),
        })
    }

    /// Counts one request of `key`: `Err(retry_after)` when it is over its budget (and
    /// then it is not counted).
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let Ok(mut keys) = self.keys.lock() else { return Ok(()) };
        if keys.len() >= SWEEP_AT {
            keys.retain(|_, tat| *tat > now);
        }
        match decide(keys.get(key).copied(), now, self.interval, self.burst) {
            Decision::Allow(tat) => {
                keys.insert(key.to_string(), tat);
                Ok(())
            }
            Decision::Deny(wait) => Err(wait),
        }
    }
}

/// The two budgets of an api process.
#[derive(Debug, Default)]
pub struct Limits {
    /// Per calling token (the bootstrap admin token is one key).
    pub token: Option<Limiter>,
    /// Per client address (every request, authenticated or not: it also slows a
    /// guesser of tokens).
    pub address: Option<Limiter>,
}

impl Limits {
    /// The budgets `SWITCHBOARD_RATE_LIMIT_*` and `SWITCHBOARD_ADDRESS_RATE_LIMIT_*` set.
    pub fn new(cfg: &ApiConfig) -> Limits {
        Limits {
            token: Limiter::new(cfg.rate_limit_per_s, cfg.rate_limit_burst),
            address: Limiter::new(cfg.address_rate_limit_per_s, cfg.address_rate_limit_burst),
        }
    }
}

/// The 429 envelope, with `Retry-After`.
pub fn too_many(whose: &str, wait: Duration) -> Response {
    let after = retry_after_s(wait);
    let mut resp = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        format!("rate limit of this {whose} exceeded; retry after {after} s"),
    )
    .with_details(serde_json::json!({"limit": whose, "retry_after_s": after}))
    .into_response();
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(after));
    resp
}

/// The `Retry-After` value for a wait: whole seconds, rounded up, at least 1.
pub fn retry_after_s(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_burst_passes_then_the_sustained_rate_holds() {
        let now = Instant::now();
        let interval = 100 * MS; // 10 a second
        let mut tat = None;
        for i in 0..5 {
            match decide(tat, now, interval, 5) {
                Decision::Allow(t) => tat = Some(t),
                d => panic!("request {i} of the burst: {d:?}"),
            }
        }
        // The sixth at the same instant waits one interval.
        assert_eq!(decide(tat, now, interval, 5), Decision::Deny(100 * MS));
        // One interval later, one more fits, and only one.
        let later = now + 100 * MS;
        let Decision::Allow(t) = decide(tat, later, interval, 5) else { panic!("after an interval") };
        assert_eq!(decide(Some(t), later, interval, 5), Decision::Deny(100 * MS));
    }

    #[test]
    fn an_idle_key_is_as_good_as_new() {
        let now = Instant::now();
        let stale = now - Duration::from_secs(60);
        assert_eq!(decide(Some(stale), now, 100 * MS, 1), Decision::Allow(now + 100 * MS));
        assert_eq!(decide(None, now, 100 * MS, 1), Decision::Allow(now + 100 * MS));
    }

    #[test]
    fn a_burst_of_one_allows_exactly_the_rate() {
        let now = Instant::now();
        let Decision::Allow(t) = decide(None, now, 100 * MS, 1) else { panic!() };
        assert_eq!(decide(Some(t), now + 50 * MS, 100 * MS, 1), Decision::Deny(50 * MS));
        assert!(matches!(decide(Some(t), now + 100 * MS, 100 * MS, 1), Decision::Allow(_)));
    }

    #[test]
    fn keys_have_their_own_budgets_and_zero_means_no_limit() {
        let l = Limiter::new(1, 2).unwrap();
        assert!(l.check("a").is_ok() && l.check("a").is_ok());
        assert!(l.check("a").is_err());
        assert!(l.check("b").is_ok());
        assert!(Limiter::new(0, 100).is_none());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_s(Duration::ZERO), 1);
        assert_eq!(retry_after_s(MS), 1);
        assert_eq!(retry_after_s(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_s(Duration::from_millis(1001)), 2);
    }
}
