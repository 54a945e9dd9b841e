//! The day rollup of step outcomes (`step_days`, migration 0015), which the per-module
//! figures read for a window's whole days. The scheduler rolls up each day once it can
//! no longer change; the figures count live whatever is not rolled up yet, so the
//! rollup being late makes them slower, never different.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::CoreResult;

/// Rolls up the next day that can no longer change, and returns it; `None` when the
/// rollup is current (today has not ended, or a transaction that began before the
/// next day's end is still open). One short transaction per day.
pub async fn roll_next_day(pool: &PgPool) -> CoreResult<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar!(r#"SELECT roll_step_day() AS "day""#).fetch_one(pool).await?)
}
