//! `GET /api/v1/dashboard/*`: the run history's figures for ops dashboards. Every
//! route takes the same window and filters (`HistoryQuery`); the figures and their
//! definitions are core's (`repo::dashboard`, `docs/dashboard.md`).

use std::collections::HashMap;

use axum::{
    Json,
    extract::{Query, State},
};
use serde::Serialize;
use switchboard_core::{
    events::Event,
    history::{HistoryFilter, Window},
    repo::dashboard::{self, DeviceFigures, FlakyFailure, ModuleFigures, Summary},
};

use crate::{AppState, error::ApiResult, extract::QueryParams};

/// The window and filters every dashboard route takes.
#[derive(Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Runs that finished in the last `window`: a number and a unit, `m`, `h`, `d` or
    /// `w` (`24h`, `7d`); 1m to 400d, default 24h. Queue and device figures are "now".
    pub window: Option<String>,
    /// Runs on devices of this pool (or, never placed on one, whose selector asked for it).
    pub pool: Option<String>,
    /// Runs on devices with this label.
    pub label: Option<String>,
    /// Runs this schedule started.
    pub schedule_id: Option<uuid::Uuid>,
    /// Runs of this kind; default module and workflow runs (campaign children
    /// included), so a campaign is not counted with its children.
    pub kind: Option<switchboard_core::model::RunKind>,
}

const FILTERS: [&str; 5] = ["window", "pool", "label", "schedule_id", "kind"];

/// Reads the window and filters, refusing what it does not know.
fn history(raw: HashMap<String, String>, more: &[&str]) -> ApiResult<(HistoryFilter, QueryParams)> {
    let allowed: Vec<&str> = FILTERS.iter().chain(more).copied().collect();
    let q = QueryParams::new(raw, &allowed)?;
    let filter = HistoryFilter {
        window: q.parse::<Window>("window")?.unwrap_or_default(),
        pool: q.str("pool").map(str::to_string),
        label: q.str("label").map(str::to_string),
        schedule_id: q.id("schedule_id")?,
        kind: q.parse("kind")?,
    };
    Ok((filter, q))
}

/// Rows of a dashboard table, with the window they cover.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Rows<T> {
    /// The window, as given (`24h`).
    pub window: String,
    /// One row each.
    pub items: Vec<T>,
}

/// Runs by status, success rate, duration p50/p95, the queue, devices by status and
/// open breakers.
#[utoipa::path(get, path = "/api/v1/dashboard/summary", operation_id = "dashboardSummary", tag = "dashboard",
    params(HistoryQuery),
    responses((status = 200, description = "The summary of the window", body = Summary)))]
pub async fn summary(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Summary>> {
    let (filter, _) = history(q, &[])?;
    Ok(Json(dashboard::summary(&state.engine.pool, &filter).await?))
}

/// Per device: runs, success rate, mean duration, infrastructure errors, breaker and
/// when it was last seen.
#[utoipa::path(get, path = "/api/v1/dashboard/devices", operation_id = "dashboardDevices", tag = "dashboard",
    params(HistoryQuery),
    responses((status = 200, description = "One row per device of the pool and label", body = Rows<DeviceFigures>)))]
pub async fn devices(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Rows<DeviceFigures>>> {
    let (filter, _) = history(q, &[])?;
    let items = dashboard::devices(&state.engine.pool, &filter).await?;
    Ok(Json(Rows { window: filter.window.to_string(), items }))
}

/// Per module: runs (its steps, a module run being one), pass rate and flaky count.
/// The window's whole UTC days are read from the day rollup the scheduler keeps, the
/// rest counted live; the figures are the same either way (docs/dashboard.md).
#[utoipa::path(get, path = "/api/v1/dashboard/modules", operation_id = "dashboardModules", tag = "dashboard",
    params(HistoryQuery),
    responses((status = 200, description = "One row per module that ran in the window", body = Rows<ModuleFigures>)))]
pub async fn modules(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Rows<ModuleFigures>>> {
    let (filter, _) = history(q, &[])?;
    let items = dashboard::modules(&state.engine.pool, &filter).await?;
    Ok(Json(Rows { window: filter.window.to_string(), items }))
}

/// A page of flaky failures, with the window it covers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FlakyRows {
    /// The window, as given (`24h`).
    pub window: String,
    /// Newest first (then by run and step).
    pub items: Vec<FlakyFailure>,
    /// Pass it as `cursor` for the next page; null on the last one.
    pub next_cursor: Option<String>,
}

/// The window's flaky failed verdicts, newest first, a page at a time, each with the
/// passing runs that make it flaky.
#[utoipa::path(get, path = "/api/v1/dashboard/flaky", operation_id = "dashboardFlaky", tag = "dashboard",
    params(HistoryQuery,
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "How many (default 50)"),
        ("cursor" = Option<String>, Query, description = "A previous page's `next_cursor`")),
    responses((status = 200, description = "Flaky failures, newest first", body = FlakyRows)))]
pub async fn flaky(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<FlakyRows>> {
    let (filter, q) = history(q, &["limit", "cursor"])?;
    let after = q.str("cursor").map(dashboard::FlakyCursor::decode).transpose()?;
    let page = dashboard::flaky(&state.engine.pool, &filter, q.limit()?, after).await?;
    Ok(Json(FlakyRows {
        window: filter.window.to_string(),
        items: page.items,
        next_cursor: page.next.map(|c| c.encode()),
    }))
}

/// The latest events of every kind, schedules' skipped and missed ticks included.
#[utoipa::path(get, path = "/api/v1/dashboard/activity/recent", operation_id = "dashboardRecentActivity",
    tag = "dashboard",
    params(HistoryQuery, ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "How many (default 50)")),
    responses((status = 200, description = "Events, newest first", body = Rows<Event>)))]
pub async fn recent(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Rows<Event>>> {
    let (filter, q) = history(q, &["limit"])?;
    let items = dashboard::recent(&state.engine.pool, &filter, q.limit()?).await?;
    Ok(Json(Rows { window: filter.window.to_string(), items }))
}
