//! The hand-offs of a finish batch: each device the batch released is given the best
//! queued run it can serve, in the batch's transaction, for all of them together.
//!
//! One device alone keeps the three statements of `hand_over` (lock it, pick its run
//! locked, start it). Several share the first two: their devices are locked in one
//! statement, and their candidates read in one, each device's best few in queue order.
//! The picks cannot be locked in that read: `SKIP LOCKED` does not skip rows this
//! transaction already locked, so two devices of one statement could take the same
//! run. So the read takes no lock, `pick_distinct` gives each device, in id order, its
//! best run no earlier device took (what handing them over one by one would do), and
//! the picks are then locked together and decided again on what was locked. A device
//! whose pick was taken meanwhile looks again alone (`hand_over`), after every pick
//! that held was started, so no device stays idle while a run it could serve waits.
//! (Locking every run the read found instead, to pick only among held rows, took the
//! fallbacks from ~2,700 to ~1,500 in a bench round but made the API's dispatch
//! records wait on the extra locks, 1.3 -> 6.0 ms a call: not taken.)

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::leasing::{Claimed, Tried, hand_over, lock_picked, try_start};
use crate::{
    CoreResult,
    ids::{DeviceId, RunId},
    repo::devices,
};

/// One candidate a device could serve, as read without a lock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Ranked {
    /// The device.
    pub device: DeviceId,
    /// The run.
    pub run: RunId,
    /// The run's priority (higher first).
    pub priority: i16,
    /// When it was queued (older first).
    pub queued_at: DateTime<Utc>,
}

/// For each device, in the order given, its best run (priority, then age, then id) that
/// no earlier device took. A device with none left gets none.
pub(super) fn pick_distinct(devices: &[DeviceId], ranked: &[Ranked]) -> HashMap<DeviceId, RunId> {
    let mut by_device: HashMap<DeviceId, Vec<&Ranked>> = HashMap::new();
    for r in ranked {
        by_device.entry(r.device).or_default().push(r);
    }
    let mut taken = std::collections::HashSet::new();
    let mut picks = HashMap::new();
    for device in devices {
        let Some(list) = by_device.get_mut(device) else { continue };
        list.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.queued_at.cmp(&b.queued_at)).then(a.run.cmp(&b.run)));
        if let Some(best) = list.iter().find(|r| !taken.contains(&r.run)) {
            taken.insert(best.run);
            picks.insert(*device, best.run);
        }
    }
    picks
}

/// Hands each released device (`(device, next lease's TTL)`) its best queued run, on
/// the caller's transaction; the devices that got one, with their claims.
pub(super) async fn hand_over_many(
    conn: &mut PgConnection,
    wanted: &[(DeviceId, Duration)],
    owner: &str,
) -> CoreResult<HashMap<DeviceId, Claimed>> {
    let mut handed = HashMap::new();
    if let [(device, ttl)] = wanted {
        if let Some(free) = devices::lock_for_hand_off(conn, *device).await?
            && let Some(claimed) = hand_over(conn, &free, owner, *ttl).await?
        {
            handed.insert(*device, claimed);
        }
        return Ok(handed);
    }
    let ttl: HashMap<DeviceId, Duration> = wanted.iter().copied().collect();
    let mut free = devices::lock_many_for_hand_off(conn, &ttl.keys().copied().collect::<Vec<_>>()).await?;
    if free.is_empty() {
        return Ok(handed);
    }
    free.sort_by_key(|d| d.id);
    let ids: Vec<DeviceId> = free.iter().map(|d| d.id).collect();
    let picks = pick_distinct(&ids, &ranked_candidates(conn, &ids).await?);
    let mut locked = lock_picked(conn, &picks.values().copied().collect::<Vec<_>>()).await?;
    // Every pick that held is started before any device looks again alone: a look
    // again must not find another device's pick, which this transaction locked (so
    // `SKIP LOCKED` would not skip it) but has not started yet.
    let mut again = Vec::new();
    for device in &free {
        let Some(run) = picks.get(&device.id) else { continue };
        let started = match locked.remove(run) {
            Some(c) => try_start(conn, c, device, owner, ttl[&device.id]).await?,
            None => Tried::NotStartable,
        };
        match started {
            Tried::Started(claimed) => {
                handed.insert(device.id, *claimed);
            }
            Tried::NotStartable | Tried::Unreadable => again.push(device),
        }
    }
    for device in again {
        if let Some(claimed) = hand_over(conn, device, owner, ttl[&device.id]).await? {
            handed.insert(device.id, claimed);
        }
    }
    Ok(handed)
}

/// Each locked device's best queued runs, read without locks: as many as there are
/// devices before it in `devices` (the order `pick_distinct` gives them out), plus one.
/// Those earlier devices take at most one run each, so one of them is left for it;
/// reading as many for every device read n² rows for n devices, this half of that.
/// Each device's list walks `runs_queued_idx` in its order, as `next_candidate` does
/// (sorting is off for the transaction since the devices were locked).
async fn ranked_candidates(conn: &mut PgConnection, devices: &[DeviceId]) -> CoreResult<Vec<Ranked>> {
    let rows = sqlx::query!(
        r#"SELECT d.id AS "device: DeviceId", c.id AS "run: RunId", c.priority, c.queued_at
           FROM unnest($1::uuid[]) WITH ORDINALITY AS u(id, n)
           JOIN devices d ON d.id = u.id
           CROSS JOIN LATERAL (
               SELECT r.id, r.priority, r.queued_at FROM runs r
               WHERE r.status = 'queued' AND r.kind <> 'campaign' AND NOT r.held AND NOT r.paused
                 AND (r.not_before IS NULL OR r.not_before <= now()) AND r.selector IS NOT NULL
                 AND selector_matches(r.selector, d)
               ORDER BY r.priority DESC, r.queued_at, r.id LIMIT u.n) c"#,
        devices as &[DeviceId],
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Ranked { device: r.device, run: r.run, priority: r.priority, queued_at: r.queued_at })
        .collect())
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use uuid::Uuid;

    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn ranked(device: u128, run: u128, priority: i16, queued_s: i64) -> Ranked {
        Ranked {
            device: DeviceId(id(device)),
            run: RunId(id(run)),
            priority,
            queued_at: Utc.timestamp_opt(queued_s, 0).unwrap(),
        }
    }

    fn picks(devices: &[u128], rows: &[Ranked]) -> Vec<(u128, Option<u128>)> {
        let ids: Vec<DeviceId> = devices.iter().map(|d| DeviceId(id(*d))).collect();
        let p = pick_distinct(&ids, rows);
        ids.iter().map(|d| (d.0.as_u128(), p.get(d).map(|r| r.0.as_u128()))).collect()
    }

    #[test]
    fn each_device_takes_its_best_run_that_no_earlier_device_took() {
        // Both devices can serve runs 10 and 11; 10 is older. The first takes 10, the
        // second 11, as one-by-one hand-offs in device order would.
        let rows = [ranked(1, 10, 0, 1), ranked(1, 11, 0, 2), ranked(2, 11, 0, 2), ranked(2, 10, 0, 1)];
        assert_eq!(picks(&[1, 2], &rows), [(1, Some(10)), (2, Some(11))]);
    }

    #[test]
    fn priority_comes_before_age_and_id_breaks_ties() {
        let rows = [ranked(1, 10, 0, 1), ranked(1, 12, 5, 9), ranked(1, 11, 5, 9)];
        assert_eq!(picks(&[1], &rows), [(1, Some(11))]);
    }

    #[test]
    fn a_device_whose_runs_were_all_taken_gets_none() {
        let rows = [ranked(1, 10, 0, 1), ranked(2, 10, 0, 1), ranked(3, 12, 0, 1)];
        assert_eq!(picks(&[1, 2, 3, 4], &rows), [(1, Some(10)), (2, None), (3, Some(12)), (4, None)]);
    }

    #[test]
    fn the_order_of_the_rows_read_does_not_matter() {
        let rows = [ranked(2, 10, 0, 1), ranked(1, 11, 0, 2), ranked(2, 11, 0, 2), ranked(1, 10, 0, 1)];
        assert_eq!(picks(&[1, 2], &rows), [(1, Some(10)), (2, Some(11))]);
    }

    #[test]
    fn one_more_run_than_the_devices_before_it_is_enough() {
        // Five devices serving one queue, each reading what `ranked_candidates` reads:
        // the k-th device (from 0) its k + 1 best. Every device gets a run, each its own,
        // as if each had read the whole queue.
        let queue: Vec<(u128, i64)> = (0..5).map(|i| (100 + i, i as i64)).collect();
        let rows: Vec<Ranked> = (0..5u128)
            .flat_map(|k| queue.iter().take(k as usize + 1).map(move |(run, at)| ranked(k + 1, *run, 0, *at)))
            .collect();
        let whole: Vec<Ranked> =
            (0..5u128).flat_map(|k| queue.iter().map(move |(run, at)| ranked(k + 1, *run, 0, *at))).collect();
        let got = picks(&[1, 2, 3, 4, 5], &rows);
        assert_eq!(got, [(1, Some(100)), (2, Some(101)), (3, Some(102)), (4, Some(103)), (5, Some(104))]);
        assert_eq!(got, picks(&[1, 2, 3, 4, 5], &whole));
    }
}
