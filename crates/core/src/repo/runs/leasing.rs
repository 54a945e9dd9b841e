//! The worker's side of a run: claim (run and device in one transaction), renew the
//! lease, record steps, and finish, each fenced by the attempt number.
//!
//! Waiting without lost wake-ups: a claimer that finds no device commits, then checks
//! again whether a matching device is free (and retries); a releaser commits the
//! release, then looks for the best waiting run (`claim_for_device`). Each side
//! publishes its state before it looks at the other's, so one of them always sees the
//! other.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use crate::{
    CoreResult, breaker,
    definition::{RunDefinition, from_stored},
    events::{EventKind, Subject},
    ids::{DeviceId, RunId},
    lifecycle::{self, Abandon, Command, Decision, Ending, run_state},
    model::{BreakerState, Device, Run, RunKind, RunStatus, RunStep},
    repo::{
        devices::{self, BreakerPolicy},
        events,
        runs::transitions::{self, Locked, RequeueReason},
    },
    run_error::{ErrorKind, RunError},
    selector::Selector,
};

/// A run this worker now holds, with its device.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The run (its definition read and typed).
    pub run: Run,
    /// The leased device.
    pub device: Device,
    /// The fencing token: every later write must carry it.
    pub attempt: i32,
    /// True when this run is the half-open probe of the device's breaker.
    pub probe: bool,
}

impl Claimed {
    /// Whether executing the run talks to the device.
    pub fn touches_device(&self) -> bool {
        self.run.definition.touches_device()
    }
}

/// What a delivery found.
#[derive(Debug)]
pub enum ClaimOutcome {
    /// Claimed: execute it.
    Claimed(Box<Claimed>),
    /// Queued, but no matching device is free: left queued, holding nothing.
    NoDevice,
    /// Queued with a `not_before` in the future (a retry backing off).
    NotYet(DateTime<Utc>),
    /// Someone else holds it, or it is no longer claimable: nothing to do.
    NotClaimable,
    /// Its stored snapshot or selector is unreadable: it was ended `errored`.
    Unreadable(RunError),
}

/// A run locked for claiming, with its stored selector and snapshot still raw.
pub(super) struct Candidate {
    locked: Locked,
    due: bool,
    not_before: Option<DateTime<Utc>>,
    selector: Option<Value>,
    definition: Value,
}

/// The columns a claim reads.
struct CandidateRow {
    id: RunId,
    status: RunStatus,
    kind: RunKind,
    attempt: i32,
    max_attempts: i32,
    paused: bool,
    cancel_requested: bool,
    held: bool,
    device_id: Option<DeviceId>,
    lease_owner: Option<String>,
    not_before: Option<DateTime<Utc>>,
    due: bool,
    selector: Option<Value>,
    definition: Value,
}

impl From<CandidateRow> for Candidate {
    fn from(r: CandidateRow) -> Candidate {
        Candidate {
            locked: Locked { id: r.id, state: run_state!(r), device_id: r.device_id, lease_owner: r.lease_owner },
            due: r.due,
            not_before: r.not_before,
            selector: r.selector,
            definition: r.definition,
        }
    }
}

/// Locks the runs to claim, in id order (two claimers never wait on each other in a
/// cycle).
async fn lock_candidates(conn: &mut PgConnection, ids: &[RunId]) -> CoreResult<HashMap<RunId, Candidate>> {
    // Wait for the rows rather than SKIP LOCKED: every other writer of a run row (the
    // API recording its dispatch, a cancel, another claimer) holds it for a moment,
    // and skipping would drop this delivery while the run stays queued.
    let rows = sqlx::query_as!(
        CandidateRow,
        r#"SELECT id, status, kind, attempt, max_attempts, paused, cancel_requested, held, device_id, lease_owner,
                  not_before, (not_before IS NULL OR not_before <= now()) AS "due!",
                  selector AS "selector: Value", definition AS "definition: Value"
           FROM runs WHERE id = ANY ($1) ORDER BY id FOR UPDATE"#,
        ids as &[RunId]
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, Candidate::from(r))).collect())
}

/// Locks the runs a batch of hand-offs picked (`hand_off`) that are still queued.
/// `SKIP LOCKED`: a run another claimer holds now is left to it, and its device looks
/// again on its own (`hand_over`).
pub(super) async fn lock_picked(conn: &mut PgConnection, ids: &[RunId]) -> CoreResult<HashMap<RunId, Candidate>> {
    let rows = sqlx::query_as!(
        CandidateRow,
        r#"SELECT id, status, kind, attempt, max_attempts, paused, cancel_requested, held, device_id, lease_owner,
                  not_before, (not_before IS NULL OR not_before <= now()) AS "due!",
                  selector AS "selector: Value", definition AS "definition: Value"
           FROM runs WHERE id = ANY ($1) AND status = 'queued' FOR UPDATE SKIP LOCKED"#,
        ids as &[RunId]
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, Candidate::from(r))).collect())
}

/// The best queued run (priority, then age) a locked device can serve, locked
/// (`SKIP LOCKED`: a run another claimer holds is left to it).
///
/// The plan must walk `runs_queued_idx` in its order and stop at the first run that
/// fits, whatever the statistics say. They are often wrong here: a table analyzed
/// when it had few queued runs, or a long history where `queued` is a sliver, makes
/// the planner expect two rows and read *every* queued run, then sort them for the
/// one it wants: 250 ms a call with 10,000 queued, per run handed over (seen with
/// auto_explain under `bench --backlog 10000`). Sorting is switched off for the
/// transaction by `devices::lock_for_hand_off`, which locked the device first (a
/// `SET LOCAL`, so it ends with the transaction the caller commits next): that leaves
/// the ordered index scan as the only way to the ORDER BY.
async fn next_candidate(conn: &mut PgConnection, device: DeviceId) -> CoreResult<Option<Candidate>> {
    let row = sqlx::query_as!(
        CandidateRow,
        r#"SELECT r.id, r.status, r.kind, r.attempt, r.max_attempts, r.paused, r.cancel_requested, r.held, r.device_id,
                  r.lease_owner, r.not_before, (r.not_before IS NULL OR r.not_before <= now()) AS "due!",
                  r.selector AS "selector: Value", r.definition AS "definition: Value"
           FROM runs r, devices d
           WHERE d.id = $1 AND r.status = 'queued' AND r.kind <> 'campaign' AND NOT r.held AND NOT r.paused
             AND (r.not_before IS NULL OR r.not_before <= now()) AND r.selector IS NOT NULL
             AND selector_matches(r.selector, d)
           ORDER BY r.priority DESC, r.queued_at, r.id LIMIT 1 FOR UPDATE OF r SKIP LOCKED"#,
        device as DeviceId
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(Candidate::from))
}

fn unreadable(what: &str, e: String) -> RunError {
    RunError::new(ErrorKind::Unreadable, format!("the run's stored {what} is unreadable: {e}"))
}

/// A candidate's stored selector. Unreadable is an error naming it, never "any device".
fn selector_of(c: &Candidate) -> Result<Selector, RunError> {
    match &c.selector {
        None => Err(unreadable("selector", "it has none".into())),
        Some(v) => from_stored::<Selector>(v.clone()).map_err(|e| unreadable("selector", e)),
    }
}

/// A candidate's stored snapshot. Unreadable is an error naming it, never "no steps".
fn definition_of(c: &Candidate) -> Result<RunDefinition, RunError> {
    let definition = from_stored::<RunDefinition>(c.definition.clone()).map_err(|e| unreadable("definition", e))?;
    if definition.kind() != c.locked.state.kind {
        let problem = format!("it is a {} snapshot on a {} run", definition.kind(), c.locked.state.kind);
        return Err(unreadable("definition", problem));
    }
    Ok(definition)
}

/// Claims the delivered runs, each with a free matching device; per run, in order,
/// what its delivery found.
///
/// The runs are read first without a lock, in one statement: a delivery whose run is
/// no longer claimable (most often one a release hand-off already started, see
/// `finish_many`) or not yet due is answered from that read, with no transaction and no
/// wait for a row lock the hand-off still holds (12.5 ms a delivery on average under
/// `bench`, before). Only the runs that look claimable are claimed under their locks,
/// together (`claim_locked`), each decided again on what was locked.
pub async fn claim_many(pool: &PgPool, runs: &[RunId], owner: &str, ttl: Duration) -> CoreResult<Vec<ClaimOutcome>> {
    let rows = sqlx::query!(
        r#"SELECT id, status AS "status: RunStatus", kind AS "kind: RunKind", attempt, max_attempts, paused,
                  cancel_requested, held, not_before, (not_before IS NULL OR not_before <= now()) AS "due!"
           FROM runs WHERE id = ANY ($1)"#,
        runs as &[RunId]
    )
    .fetch_all(pool)
    .await?;
    let rows: HashMap<RunId, _> = rows.into_iter().map(|r| (r.id, r)).collect();
    let mut outcomes: Vec<Option<ClaimOutcome>> = Vec::with_capacity(runs.len());
    let mut claimable = Vec::new();
    for run in runs {
        outcomes.push(match rows.get(run) {
            None => Some(ClaimOutcome::NotClaimable),
            Some(r) => match lifecycle::decide(run_state!(r), Command::Claim { due: r.due }) {
                Decision::Start => {
                    claimable.push(*run);
                    None
                }
                Decision::NotYet => Some(ClaimOutcome::NotYet(r.not_before.unwrap_or_else(Utc::now))),
                _ => Some(ClaimOutcome::NotClaimable),
            },
        });
    }
    let mut locked = claim_locked(pool, &claimable, owner, ttl).await?.into_iter();
    Ok(outcomes.into_iter().map(|o| o.or_else(|| locked.next()).unwrap_or(ClaimOutcome::NotClaimable)).collect())
}

/// `claim_many` under the runs' row locks, in one transaction: each run is decided on
/// what was locked, a device picked and leased, the run started. A snapshot is read
/// only once a device is found (most deliveries of a busy pool find none).
async fn claim_locked(pool: &PgPool, runs: &[RunId], owner: &str, ttl: Duration) -> CoreResult<Vec<ClaimOutcome>> {
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = pool.begin().await?;
    let mut candidates = lock_candidates(&mut tx, runs).await?;
    let mut outcomes = Vec::with_capacity(runs.len());
    for run in runs {
        let outcome = match candidates.remove(run) {
            Some(c) => claim_candidate(&mut tx, c, owner, ttl).await?,
            // Gone, or the same run delivered twice: claimed by its first delivery.
            None => ClaimOutcome::NotClaimable,
        };
        outcomes.push(outcome);
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// One locked run of `claim_locked`: decided, given a device, started.
async fn claim_candidate(
    conn: &mut PgConnection,
    c: Candidate,
    owner: &str,
    ttl: Duration,
) -> CoreResult<ClaimOutcome> {
    match lifecycle::decide(c.locked.state, Command::Claim { due: c.due }) {
        Decision::Start => {}
        Decision::NotYet => return Ok(ClaimOutcome::NotYet(c.not_before.unwrap_or_else(Utc::now))),
        _ => return Ok(ClaimOutcome::NotClaimable),
    }
    let selector = match selector_of(&c) {
        Ok(s) => s,
        Err(error) => return abandon_unreadable(conn, &c, error).await,
    };
    let Some(device) = devices::pick_claimable(conn, &selector).await? else {
        return Ok(ClaimOutcome::NoDevice);
    };
    let definition = match definition_of(&c) {
        Ok(d) => d,
        Err(error) => return abandon_unreadable(conn, &c, error).await,
    };
    let claimed = assign(conn, c.locked.id, &device, owner, ttl, definition.touches_device()).await?;
    Ok(ClaimOutcome::Claimed(Box::new(claimed)))
}

async fn abandon_unreadable(conn: &mut PgConnection, c: &Candidate, error: RunError) -> CoreResult<ClaimOutcome> {
    tracing::error!(run_id = %c.locked.id, error = %error.message, "ending a run whose stored data is unreadable");
    if lifecycle::decide(c.locked.state, Command::Abandon(Abandon::Unreadable)) == Decision::End(RunStatus::Errored) {
        transitions::end(conn, &[c.locked.id], RunStatus::Errored, None, Some(&error)).await?;
    }
    Ok(ClaimOutcome::Unreadable(error))
}

/// Whether a device that `run` (still queued) could use is free now: after a claim
/// that found none committed, a device released meanwhile may have missed this run
/// while the claim held its row, so the claimer looks once more.
pub async fn free_device_for(pool: &PgPool, run: RunId) -> CoreResult<bool> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM runs r WHERE r.id = $1 AND r.status = 'queued' AND EXISTS (
               SELECT 1 FROM devices d WHERE device_claimable(d) AND selector_matches(r.selector, d))) AS "free!""#,
        run as RunId
    )
    .fetch_one(pool)
    .await?)
}

/// After a device is released: the best queued run it can serve (priority, then age),
/// claimed with that device.
pub async fn claim_for_device(
    pool: &PgPool,
    device: DeviceId,
    owner: &str,
    ttl: Duration,
) -> CoreResult<Option<Claimed>> {
    let mut tx = pool.begin().await?;
    let Some(device) = devices::lock_for_hand_off(&mut tx, device).await? else { return Ok(None) };
    let claimed = hand_over(&mut tx, &device, owner, ttl).await?;
    tx.commit().await?;
    Ok(claimed)
}

/// Gives a device locked by `devices::lock_for_hand_off` to the best queued run it can
/// serve, on the caller's transaction; a candidate whose stored data is unreadable is
/// ended on the way.
pub(super) async fn hand_over(
    conn: &mut PgConnection,
    device: &Device,
    owner: &str,
    ttl: Duration,
) -> CoreResult<Option<Claimed>> {
    loop {
        let Some(c) = next_candidate(conn, device.id).await? else { return Ok(None) };
        match try_start(conn, c, device, owner, ttl).await? {
            Tried::Started(claimed) => return Ok(Some(*claimed)),
            // The query applies the same rule; should they ever disagree, hand nothing
            // over rather than pick the same row again.
            Tried::NotStartable => return Ok(None),
            Tried::Unreadable => continue,
        }
    }
}

/// What giving a device to one locked candidate did.
pub(super) enum Tried {
    /// Started on the device.
    Started(Box<Claimed>),
    /// Decided not startable on what was locked (not due, held, no longer queued).
    NotStartable,
    /// Its stored selector or snapshot is unreadable: it was ended `errored`.
    Unreadable,
}

/// Starts a locked candidate on a locked, claimable device, if it is still startable.
pub(super) async fn try_start(
    conn: &mut PgConnection,
    c: Candidate,
    device: &Device,
    owner: &str,
    ttl: Duration,
) -> CoreResult<Tried> {
    if lifecycle::decide(c.locked.state, Command::Claim { due: c.due }) != Decision::Start {
        return Ok(Tried::NotStartable);
    }
    match selector_of(&c).and_then(|_| definition_of(&c)) {
        Ok(definition) => {
            let claimed = assign(conn, c.locked.id, device, owner, ttl, definition.touches_device()).await?;
            Ok(Tried::Started(Box::new(claimed)))
        }
        Err(error) => {
            tracing::error!(run_id = %c.locked.id, error = %error.message, "ending a run whose stored data is unreadable");
            transitions::end(conn, &[c.locked.id], RunStatus::Errored, None, Some(&error)).await?;
            Ok(Tried::Unreadable)
        }
    }
}

/// Leases the (locked, claimable) device and starts the (locked, queued) run, in one
/// statement. The device as the claim holds it is the locked row with that lease and
/// breaker: nothing else of it changes in the statement.
async fn assign(
    conn: &mut PgConnection,
    run: RunId,
    device: &Device,
    owner: &str,
    ttl: Duration,
    touches: bool,
) -> CoreResult<Claimed> {
    let (breaker, probe) = devices::leased_breaker(device, touches);
    let started = json!({"device_id": device.id, "serial": device.serial, "worker": owner, "probe": probe});
    let run = transitions::start(conn, run, device, owner, ttl, breaker, started).await?;
    if probe {
        crate::meters::breaker_transition(device.id, "half_open");
    }
    let mut device = device.clone();
    device.breaker.state = breaker;
    // The same lease as the run's: same holder, same `now() + ttl`.
    device.lease = run.lease.clone();
    device.updated_at = run.updated_at;
    Ok(Claimed { attempt: run.attempt, run, device, probe })
}

/// Result of a lease renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours; what was requested meanwhile.
    Held {
        /// The run was cancelled: stop.
        cancel_requested: bool,
        /// The workflow is paused: wait before the next step.
        paused: bool,
    },
    /// The run is no longer ours (recovered, cancelled, finished): stop working on it.
    Lost,
}

/// Extends the run's and the device's leases, if `owner` still holds attempt `attempt`.
pub async fn renew(pool: &PgPool, run: RunId, attempt: i32, owner: &str, ttl: Duration) -> CoreResult<Renewal> {
    let mut tx = pool.begin().await?;
    // The WHERE clause is the fence: a row comes back only while we hold the lease.
    let row = sqlx::query!(
        "UPDATE runs SET lease_expires_at = now() + make_interval(secs => $4)
         WHERE id = $1 AND status = 'running' AND attempt = $2 AND lease_owner = $3
         RETURNING status, kind, attempt, max_attempts, paused, cancel_requested, held",
        run as RunId,
        attempt,
        owner,
        ttl.as_secs_f64(),
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(r) = row else { return Ok(Renewal::Lost) };
    devices::renew_lease(&mut tx, run, owner, ttl).await?;
    tx.commit().await?;
    let state = run_state!(r);
    Ok(match lifecycle::decide(state, Command::Renew { holds: true }) {
        Decision::Hold { cancel_requested, paused } => Renewal::Held { cancel_requested, paused },
        _ => Renewal::Lost,
    })
}

/// Records a workflow step's progress (and its `run.step` event), only while `owner`
/// still holds attempt `attempt` of the run. `Ok(false)`: the run is no longer ours.
pub async fn record_step(pool: &PgPool, claimed: &Claimed, owner: &str, step: &RunStep) -> CoreResult<bool> {
    let mut tx = pool.begin().await?;
    let held = transitions::lock(&mut tx, claimed.run.id).await?.is_some_and(|l| l.held_by(owner, claimed.attempt));
    if !held {
        return Ok(false);
    }
    transitions::write_step(&mut tx, claimed.run.id, step).await?;
    let data = json!({"index": step.index, "module": step.module, "status": step.status, "attempt": step.attempt,
                      "result": step.result, "error": step.error});
    events::append(&mut tx, EventKind::RunStep, Subject::run(claimed.run.id, Some(claimed.device.id)), data).await?;
    tx.commit().await?;
    Ok(true)
}

/// How an attempt ended, with what to record.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The ending, for the lifecycle.
    pub ending: Ending,
    /// The run's result (verdicts).
    pub result: Option<Value>,
    /// The run's error (everything else).
    pub error: Option<RunError>,
    /// Whether the part of the run that decided the ending talked to the device.
    pub touched_device: bool,
}

/// What `finish_many` did to a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    /// The run ended in this status.
    Ended(RunStatus),
    /// The run went back to the queue, to be delivered at `not_before` (at once when
    /// `None`: a hand-back).
    Requeued {
        /// When its next attempt may start.
        not_before: Option<DateTime<Utc>>,
    },
    /// This worker no longer holds the run (fencing): nothing was changed.
    Refused,
}

/// Retry and breaker settings a finishing worker applies.
#[derive(Debug, Clone, Copy)]
pub struct FinishPolicy {
    /// The device's breaker.
    pub breaker: BreakerPolicy,
    /// First retry delay; doubles per attempt, with jitter.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

/// One attempt's outcome to write (`finish_many`).
#[derive(Debug, Clone)]
pub struct FinishRequest {
    /// The run as claimed (its attempt is the fencing token).
    pub claimed: Claimed,
    /// How the attempt ended.
    pub outcome: Outcome,
    /// Its steps, as they ended.
    pub steps: Vec<RunStep>,
    /// The next lease's TTL, to hand the released device over in the same commit;
    /// `None` when the worker is stopping.
    pub hand_off: Option<Duration>,
}

/// Writes the outcomes of attempts: for each, its steps and events, the release of
/// its device and its breaker's update, only if `owner` still holds attempt `attempt`.
/// The outcomes a worker has ready together share one transaction, with one statement
/// per kind of write (lock the runs, end them, write their steps, release their
/// devices) instead of one per run: the commit and the round trips are shared. Each
/// run is still decided on its own locked row and fenced by its own attempt. Per
/// request, in order: what happened to its run and the run its device was handed over
/// to.
///
/// With `hand_off` (the next lease's TTL), the same transaction then gives each
/// released device, if it is still claimable, to the best queued run it can serve:
/// one commit ends a run and starts the next, instead of two. Should that commit be
/// lost after all, the next run's lease expires unrenewed and the reconciler requeues
/// it, as after any worker crash.
///
/// An error fails the whole transaction: nothing is written, and the caller can try
/// each request alone.
pub async fn finish_many(
    pool: &PgPool,
    owner: &str,
    policy: FinishPolicy,
    requests: &[FinishRequest],
) -> CoreResult<Vec<(Finished, Option<Claimed>)>> {
    let mut tx = pool.begin().await?;
    let mut locked = lock_for_finish(&mut tx, requests, owner).await?;
    let (mut finished, mut refused) = (Vec::with_capacity(requests.len()), Vec::new());
    let (mut endings, mut steps, mut releases) = (Vec::new(), Vec::new(), Vec::new());
    for request in requests {
        let (claimed, outcome) = (&request.claimed, &request.outcome);
        let Some((run, seen)) = locked.remove(&claimed.run.id) else {
            finished.push(Finished::Refused);
            continue;
        };
        let holds = run.held_by(owner, claimed.attempt);
        let done = match lifecycle::decide(run.state, Command::Finish { holds, ending: outcome.ending }) {
            Decision::Requeue { spend_attempt, backoff } => {
                let delay =
                    backoff.then(|| crate::retry::delay_after(claimed.attempt, policy.retry_base, policy.retry_max));
                let reason = if spend_attempt { RequeueReason::Retry } else { RequeueReason::HandedBack };
                let error =
                    outcome.error.clone().unwrap_or_else(|| RunError::new(ErrorKind::Interrupted, "the attempt ended"));
                let not_before = transitions::requeue(&mut tx, run.id, spend_attempt, delay, &error, reason).await?;
                Finished::Requeued { not_before }
            }
            Decision::End(status) => {
                let (result, error) = (outcome.result.as_ref(), outcome.error.as_ref());
                endings.push(transitions::RunEnd { id: run.id, status, result, error });
                Finished::Ended(status)
            }
            _ => {
                refused.push(request);
                finished.push(Finished::Refused);
                continue;
            }
        };
        finished.push(done);
        steps.extend(request.steps.iter().map(|s| (run.id, s)));
        let effect = breaker::effect(outcome.ending, outcome.touched_device, outcome.error.as_ref().map(|e| e.kind));
        releases.push(devices::Release { device: claimed.device.id, run: run.id, effect, seen });
    }
    transitions::end_each(&mut tx, &endings).await?;
    transitions::write_steps(&mut tx, &steps).await?;
    devices::release_each(&mut tx, owner, policy.breaker, &releases).await?;
    let wanted: Vec<(DeviceId, Duration)> = requests
        .iter()
        .zip(&finished)
        .filter_map(|(request, done)| match (done, request.hand_off) {
            (Finished::Refused, _) | (_, None) => None,
            (_, Some(ttl)) => Some((request.claimed.device.id, ttl)),
        })
        .collect();
    let mut handed = super::hand_off::hand_over_many(&mut tx, &wanted, owner).await?;
    tx.commit().await?;
    let next: Vec<Option<Claimed>> = requests.iter().map(|r| handed.remove(&r.claimed.device.id)).collect();
    for request in refused {
        // Only an event: the outcomes above are committed, and must be reported as such.
        if let Err(e) = refuse(pool, &request.claimed, owner, &request.outcome).await {
            tracing::warn!(run_id = %request.claimed.run.id, error = %e, "could not record a refused late write");
        }
    }
    Ok(finished.into_iter().zip(next).collect())
}

/// `transitions::lock` for a finish: the runs locked (in id order, so that two
/// finishes never wait on each other in a cycle), and in the same statement the
/// breaker of the device each leases to `owner` (unlocked) with the transaction's
/// clock, so that the release decides without reading the devices again.
async fn lock_for_finish(
    conn: &mut PgConnection,
    requests: &[FinishRequest],
    owner: &str,
) -> CoreResult<HashMap<RunId, (Locked, Option<devices::SeenBreaker>)>> {
    let rows = sqlx::query!(
        r#"SELECT r.id, r.status, r.kind, r.attempt, r.max_attempts, r.paused, r.cancel_requested, r.held,
                  r.device_id, r.lease_owner, d.breaker_state AS "breaker_state?: BreakerState",
                  d.breaker_failures AS "breaker_failures?", d.breaker_trips AS "breaker_trips?",
                  d.breaker_open_until, now() AS "now!"
           FROM unnest($1::uuid[], $2::uuid[]) AS x(run, device)
           JOIN runs r ON r.id = x.run
           LEFT JOIN devices d ON d.id = x.device AND d.lease_run_id = r.id AND d.lease_owner = $3
           ORDER BY r.id FOR UPDATE OF r"#,
        &requests.iter().map(|r| r.claimed.run.id.0).collect::<Vec<_>>(),
        &requests.iter().map(|r| r.claimed.device.id.0).collect::<Vec<_>>(),
        owner,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let seen = match (r.breaker_state, r.breaker_failures, r.breaker_trips) {
                (Some(state), Some(failures), Some(trips)) => Some(devices::SeenBreaker {
                    row: breaker::BreakerRow { state, failures, trips, open_until: r.breaker_open_until },
                    now: r.now,
                }),
                _ => None,
            };
            let locked = Locked { id: r.id, state: run_state!(r), device_id: r.device_id, lease_owner: r.lease_owner };
            (r.id, (locked, seen))
        })
        .collect())
}

/// Records a refused late write (a zombie worker): logged and kept as an event.
async fn refuse(pool: &PgPool, claimed: &Claimed, owner: &str, outcome: &Outcome) -> CoreResult<()> {
    tracing::warn!(run_id = %claimed.run.id, attempt = claimed.attempt, owner, ending = ?outcome.ending,
        "late write refused: this worker no longer holds the run");
    crate::meters::fencing_refused();
    let mut conn = pool.acquire().await?;
    let data = json!({"attempt": claimed.attempt, "worker": owner, "wanted": format!("{:?}", outcome.ending)});
    events::append(
        &mut conn,
        EventKind::RunLateWriteRefused,
        Subject::run(claimed.run.id, Some(claimed.device.id)),
        data,
    )
    .await?;
    Ok(())
}
