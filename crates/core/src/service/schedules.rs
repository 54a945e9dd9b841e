//! Schedules: writing them (their target checked against the database), previewing
//! and triggering them, and the tick that fires due ones.
//!
//! Exactly once: a tick locks a due schedule row (`FOR UPDATE SKIP LOCKED`), inserts
//! its run(s) with a unique `(schedule_id, scheduled_for)` and advances `next_fire_at`
//! in the same transaction. Any number of schedulers can tick at once; a scheduler
//! that dies mid-tick rolls back and another one fires the tick. `tick::plan` decides
//! what each tick does; this writes it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use serde_json::json;
use sqlx::PgConnection;
use tracing::Instrument;

use crate::{
    CoreError, CoreResult,
    cron_expr::{CronExpr, parse_tz},
    definition::Target,
    events::{EventKind, Subject},
    ids::{RunId, ScheduleId},
    launch::RunOptions,
    meters,
    model::{Misfire, Overlap, Run, Trigger},
    repo::{
        campaigns, devices, events, runs,
        schedules::{self, Schedule, ScheduleFields, TickRecord},
        workflows,
    },
    service::Engine,
    tick::{self, Action, TickInput},
};

/// A schedule to create, validated (its target is checked against the database).
#[derive(Debug, Clone)]
pub struct NewSchedule {
    /// Unique name.
    pub name: String,
    /// What it starts.
    pub target: Target,
    /// The cron expression (parsed).
    pub cron: CronExpr,
    /// An IANA time zone (parsed).
    pub timezone: String,
    /// Whether it fires (default true).
    pub enabled: bool,
    /// What to do about missed ticks (default `skip`).
    pub misfire: Misfire,
    /// What to do while its previous run is active (default `allow`).
    pub overlap: Overlap,
}

/// The fields of a schedule a PATCH changes.
#[derive(Debug, Clone, Default)]
pub struct SchedulePatch {
    /// New name.
    pub name: Option<String>,
    /// New target.
    pub target: Option<Target>,
    /// New cron expression.
    pub cron: Option<CronExpr>,
    /// New time zone.
    pub timezone: Option<String>,
    /// Enable or disable.
    pub enabled: Option<bool>,
    /// New misfire policy.
    pub misfire: Option<Misfire>,
    /// New overlap policy.
    pub overlap: Option<Overlap>,
}

/// One upcoming fire time.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Upcoming {
    /// In UTC.
    pub at: DateTime<Utc>,
    /// In the schedule's time zone.
    pub local: String,
}

/// A stored schedule's cron and time zone. They were valid when written: one that no
/// longer parses is unreadable data, never "no more ticks".
fn timing(s: &Schedule) -> Result<(CronExpr, Tz), String> {
    let expr = CronExpr::parse(&s.cron).map_err(|e| format!("schedule {}: stored cron {:?}: {e}", s.id, s.cron))?;
    let tz = parse_tz(&s.timezone).map_err(|e| format!("schedule {}: stored time zone {:?}: {e}", s.id, s.timezone))?;
    Ok((expr, tz))
}

/// The target must exist, its devices must exist, and a workflow's params must apply
/// to its steps. The workflow or campaign row is locked `FOR SHARE` until the caller's
/// transaction ends, so a concurrent delete waits and then sees this schedule (409).
async fn check_target(conn: &mut PgConnection, target: &Target) -> CoreResult<()> {
    let device = match target {
        Target::Module { device, .. } => Some(device),
        Target::Workflow { id, params, device } => {
            if !workflows::lock_shared(conn, *id).await? {
                return Err(CoreError::invalid("target.id", format!("no workflow {id}")));
            }
            if let (Some(w), Some(params)) = (workflows::find(conn, *id).await?, params) {
                workflows::apply_params(&w.steps, params, "target.params").map_err(CoreError::invalid_fields)?;
            }
            Some(device)
        }
        Target::Campaign { id } => {
            if !campaigns::lock_shared(conn, *id).await? {
                return Err(CoreError::invalid("target.id", format!("no campaign {id}")));
            }
            None
        }
    };
    if let Some(device) = device
        && !devices::any_matching(conn, device).await?
    {
        return Err(CoreError::invalid("target.device", "no registered device matches this selector"));
    }
    Ok(())
}

fn next_fire(
    expr: &CronExpr,
    timezone: &str,
    enabled: bool,
    after: DateTime<Utc>,
) -> CoreResult<Option<DateTime<Utc>>> {
    if !enabled {
        return Ok(None);
    }
    let tz = parse_tz(timezone).map_err(|e| CoreError::invalid("timezone", e))?;
    Ok(expr.next_after(tz, after))
}

impl Engine {
    /// `POST /schedules`.
    pub async fn create_schedule(&self, s: &NewSchedule) -> CoreResult<Schedule> {
        let mut tx = self.pool.begin().await?;
        check_target(&mut tx, &s.target).await?;
        let next = next_fire(&s.cron, &s.timezone, s.enabled, Utc::now())?;
        let fields = ScheduleFields {
            name: s.name.clone(),
            target: s.target.clone(),
            cron: s.cron.source().to_string(),
            timezone: s.timezone.clone(),
            enabled: s.enabled,
            misfire: s.misfire,
            overlap: s.overlap,
        };
        let id = schedules::insert(&mut tx, &fields, next).await?;
        tx.commit().await?;
        schedules::get(&self.pool, id).await
    }

    /// `PATCH /schedules/{id}`: changes only what is given. A new cron, time zone, or
    /// enabling computes `next_fire_at` from now (time spent disabled is not downtime
    /// to catch up).
    pub async fn update_schedule(&self, id: ScheduleId, p: &SchedulePatch) -> CoreResult<Schedule> {
        let mut tx = self.pool.begin().await?;
        if let Some(t) = &p.target {
            check_target(&mut tx, t).await?;
        }
        let cur = schedules::lock(&mut tx, id).await?;
        let cron = match &p.cron {
            Some(c) => c.clone(),
            None => timing(&cur).map_err(CoreError::Unreadable)?.0,
        };
        let fields = ScheduleFields {
            name: p.name.clone().unwrap_or_else(|| cur.name.clone()),
            target: p.target.clone().unwrap_or_else(|| cur.target.clone()),
            cron: cron.source().to_string(),
            timezone: p.timezone.clone().unwrap_or_else(|| cur.timezone.clone()),
            enabled: p.enabled.unwrap_or(cur.enabled),
            misfire: p.misfire.unwrap_or(cur.misfire),
            overlap: p.overlap.unwrap_or(cur.overlap),
        };
        let recompute = p.cron.is_some() || p.timezone.is_some() || !cur.enabled || !fields.enabled;
        let next =
            if recompute { next_fire(&cron, &fields.timezone, fields.enabled, Utc::now())? } else { cur.next_fire_at };
        schedules::rewrite(&mut tx, id, &fields, next).await?;
        tx.commit().await?;
        schedules::get(&self.pool, id).await
    }

    /// `GET /schedules/{id}/preview`: the next `count` fire times.
    pub async fn preview_schedule(&self, id: ScheduleId, count: usize) -> CoreResult<(Schedule, Vec<Upcoming>)> {
        let s = schedules::get(&self.pool, id).await?;
        let (expr, tz) = timing(&s).map_err(CoreError::Unreadable)?;
        let mut out = Vec::with_capacity(count);
        let mut cursor = Utc::now();
        while out.len() < count {
            let Some(t) = expr.next_after(tz, cursor) else { break };
            out.push(Upcoming { at: t, local: t.with_timezone(&tz).to_rfc3339() });
            cursor = t;
        }
        Ok((s, out))
    }

    /// `POST /schedules/{id}/trigger`: a run now (`trigger: schedule`, no
    /// `scheduled_for`), whatever the overlap policy.
    pub async fn trigger_schedule(&self, id: ScheduleId) -> CoreResult<Run> {
        let mut tx = self.pool.begin().await?;
        let s = schedules::lock(&mut tx, id).await?;
        let options = RunOptions { trigger: Trigger::Schedule, schedule_id: Some(id), ..RunOptions::default() };
        let (run, push) = Engine::start_target(&mut tx, &s.target, &options).await?;
        events::append(
            &mut tx,
            EventKind::ScheduleFired,
            Subject::schedule(id, Some(run)),
            json!({"manual": true, "run_id": run}),
        )
        .await?;
        let record = TickRecord {
            fired: 1,
            skipped: 0,
            missed: 0,
            next_fire_at: s.next_fire_at,
            last_fired_at: s.last_fired_at,
            buffered_for: s.buffered_for,
            enabled: s.enabled,
        };
        schedules::record_tick(&mut tx, id, &record).await?;
        tx.commit().await?;
        self.dispatch_started(run, &push).await;
        runs::get(&self.pool, run).await
    }

    /// Fires every schedule with work to do (due ticks, and buffered ticks whose
    /// blocker ended), then pushes the runs. `grace`: a tick this late or less is on
    /// time; later ones were missed (downtime) and follow `misfire`. Returns the runs
    /// started.
    pub async fn tick(&self, grace: Duration) -> CoreResult<usize> {
        let grace = chrono::Duration::from_std(grace).map_err(|e| CoreError::Internal(e.to_string()))?;
        let mut started = 0;
        for _ in 0..100 {
            let mut tx = self.pool.begin().await?;
            let Some(id) = schedules::lock_next_due(&mut tx).await? else { break };
            let s = match schedules::lock(&mut tx, id).await {
                Ok(s) => s,
                // One damaged schedule must not hold back the others.
                Err(CoreError::Unreadable(problem)) => {
                    disable(&mut tx, id, &problem).await?;
                    tx.commit().await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let now: DateTime<Utc> =
                sqlx::query_scalar!(r#"SELECT clock_timestamp() AS "now!""#).fetch_one(&mut *tx).await?;
            // A span (and trace) per schedule with a tick due, not per pass: the runs
            // it fires keep its trace context, and an idle scheduler exports nothing.
            let span = tracing::info_span!("schedule.tick", schedule_id = %s.id, schedule = %s.name,
                trace_id = tracing::field::Empty);
            crate::telemetry::record_trace_id(&span);
            match fire(&mut tx, &s, now, grace).instrument(span).await {
                Ok(fired) => {
                    tx.commit().await?;
                    for (run, push) in &fired {
                        self.dispatch_started(*run, push).await;
                    }
                    started += fired.len();
                }
                Err(e) => {
                    tx.rollback().await?;
                    // One broken schedule must not hold back the others.
                    self.record_failure(&s, &e).await?;
                }
            }
        }
        Ok(started)
    }

    /// A schedule whose tick could not fire (its target vanished, say): record it as an
    /// event and a missed tick, drop any buffered tick and move to the next one, so it
    /// is not retried in a loop ahead of every other schedule. Errors of Postgres or
    /// Redis themselves are returned instead: the tick stays due and is tried again.
    async fn record_failure(&self, s: &Schedule, e: &CoreError) -> CoreResult<()> {
        if matches!(e, CoreError::Unavailable(_) | CoreError::Database(_) | CoreError::Redis(_)) {
            return Err(CoreError::Unavailable(e.to_string()));
        }
        tracing::error!(schedule_id = %s.id, error = %e, "schedule tick failed; skipping to the next tick");
        let next = timing(s).ok().and_then(|(expr, tz)| expr.next_after(tz, Utc::now()));
        let mut tx = self.pool.begin().await?;
        let data = json!({"error": e.to_string(), "scheduled_for": s.next_fire_at, "buffered_for": s.buffered_for, "next_fire_at": next});
        events::append(&mut tx, EventKind::ScheduleError, Subject::schedule(s.id, None), data).await?;
        let record = TickRecord {
            next_fire_at: next,
            last_fired_at: s.last_fired_at,
            buffered_for: None,
            fired: 0,
            skipped: 0,
            missed: 1,
            enabled: s.enabled && next.is_some(),
        };
        schedules::record_tick(&mut tx, s.id, &record).await?;
        tx.commit().await?;
        meters::schedule_tick(s.id, &s.name, "error", 1);
        Ok(())
    }
}

/// Fires one locked schedule (see `tick::plan`); returns each run started and what to
/// push for it.
async fn fire(
    conn: &mut PgConnection,
    s: &Schedule,
    now: DateTime<Utc>,
    grace: chrono::Duration,
) -> CoreResult<Vec<(RunId, Vec<RunId>)>> {
    let (expr, tz) = match timing(s) {
        Ok(t) => t,
        // Cannot happen for schedules written through the API; never loop on it.
        Err(e) => return disable(conn, s.id, &e).await.map(|()| Vec::new()),
    };
    let due = s.next_fire_at.filter(|t| *t <= now);
    let mut ticks: Vec<DateTime<Utc>> = due.into_iter().collect();
    if let Some(d) = due {
        ticks.extend(expr.between(tz, d, now, 10_000));
    }
    let active = schedules::active_run(conn, s.id).await?;
    let (misfire, overlap, buffered_for) = (s.misfire, s.overlap, s.buffered_for);
    let plan = tick::plan(&TickInput { ticks, now, grace, misfire, overlap, buffered_for, active: active.is_some() });
    if let Some(m) = &plan.missed {
        let data =
            json!({"count": m.count, "first": m.first, "last": m.last, "misfire": misfire, "catch_up": m.catch_up});
        events::append(conn, EventKind::ScheduleMissed, Subject::schedule(s.id, None), data).await?;
    }
    let fired = carry_out(conn, s, &plan.actions, active, now).await?;
    let last_fired = plan.actions.iter().rev().find_map(|a| match a {
        Action::Fire { tick, .. } => Some(*tick),
        _ => None,
    });
    let record = TickRecord {
        next_fire_at: if due.is_some() { expr.next_after(tz, now) } else { s.next_fire_at },
        last_fired_at: last_fired.or(s.last_fired_at),
        buffered_for: plan.buffered_for,
        fired: plan.fired(),
        skipped: plan.skipped(),
        missed: plan.missed_count(),
        enabled: s.enabled,
    };
    schedules::record_tick(conn, s.id, &record).await?;
    for (decision, n) in [("fired", plan.fired()), ("skipped", plan.skipped()), ("missed", plan.missed_count())] {
        meters::schedule_tick(s.id, &s.name, decision, n as u64);
    }
    if plan.buffered_for.is_some() && s.buffered_for.is_none() {
        meters::schedule_tick(s.id, &s.name, "buffered", 1);
    }
    Ok(fired)
}

/// Writes each of a tick's actions: a run started (and `schedule.fired`), or the
/// `schedule.skipped` / `schedule.buffered` decision naming the run still active.
async fn carry_out(
    conn: &mut PgConnection,
    s: &Schedule,
    actions: &[Action],
    mut active: Option<RunId>,
    now: DateTime<Utc>,
) -> CoreResult<Vec<(RunId, Vec<RunId>)>> {
    let subject = Subject::schedule(s.id, None);
    let mut fired = Vec::new();
    for action in actions {
        let (kind, subject, data) = match *action {
            Action::Fire { tick, buffered } => {
                let options = RunOptions {
                    trigger: Trigger::Schedule,
                    schedule_id: Some(s.id),
                    scheduled_for: Some(tick),
                    ..RunOptions::default()
                };
                let (run, push) = Engine::start_target(conn, &s.target, &options).await?;
                fired.push((run, push));
                active = Some(run);
                let data = if buffered {
                    json!({"scheduled_for": tick, "run_id": run, "buffered": true})
                } else {
                    meters::fire_lag((now - tick).to_std().unwrap_or_default());
                    json!({"scheduled_for": tick, "run_id": run, "lag_ms": (now - tick).num_milliseconds()})
                };
                (EventKind::ScheduleFired, Subject::schedule(s.id, Some(run)), data)
            }
            Action::Skip(tick) => {
                let data = json!({"scheduled_for": tick, "reason": "overlap", "active_run_id": active});
                (EventKind::ScheduleSkipped, subject, data)
            }
            Action::Buffer(tick) => {
                (EventKind::ScheduleBuffered, subject, json!({"scheduled_for": tick, "active_run_id": active}))
            }
        };
        events::append(conn, kind, subject, data).await?;
    }
    Ok(fired)
}

/// A stored schedule that no longer reads (its cron, time zone or target): disabled,
/// with a `schedule.error` event, so it is never retried in a loop.
async fn disable(conn: &mut PgConnection, id: ScheduleId, problem: &str) -> CoreResult<()> {
    tracing::error!(schedule_id = %id, problem, "disabling a schedule whose stored data is unreadable");
    events::append(conn, EventKind::ScheduleError, Subject::schedule(id, None), json!({"error": problem})).await?;
    schedules::disable(conn, id).await
}
