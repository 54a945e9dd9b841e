//! `GET /api/v1/search?q=`: devices (serial, name, labels), modules, workflows,
//! campaigns, schedules and hosts by name, and runs by id prefix or idempotency key;
//! ranked and bounded. Names are matched through trigram indexes (migration 0011; a
//! device's searched fields are copied to `device_search` for them, migration 0016):
//! a substring, or a near miss by trigram similarity. Modules live in the catalog, not
//! in a table, and are matched here.

use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{CoreError, CoreResult, catalog};

/// One thing found.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Hit {
    /// `device`, `module`, `workflow`, `campaign`, `schedule`, `host` or `run`.
    pub kind: String,
    /// Its id (a module's is its name).
    pub id: String,
    /// Its name (a run's target).
    pub name: String,
    /// What matched, or what tells it apart (a device's serial, a run's status).
    pub detail: String,
    /// How well it matched, 0 to 1: 1 for an exact name or id, then prefixes,
    /// substrings and near misses.
    pub score: f64,
}

/// The longest query taken.
pub const MAX_QUERY: usize = 200;

/// What matches `q`, best first, at most `limit`.
pub async fn search(pool: &PgPool, q: &str, limit: i64) -> CoreResult<Vec<Hit>> {
    let q = q.trim();
    if q.is_empty() || q.chars().count() > MAX_QUERY {
        return Err(CoreError::BadRequest(format!("q must be 1 to {MAX_QUERY} characters")));
    }
    let (lo, hi) = id_range(q).unzip();
    let mut hits = sqlx::query_as!(
        Hit,
        r#"WITH p AS (SELECT $1::text AS q, '%' || $2::text || '%' AS pat, $2::text || '%' AS pre)
           SELECT kind AS "kind!", id AS "id!", name AS "name!", detail AS "detail!", score AS "score!" FROM (
             (SELECT 'device' AS kind, d.id::text AS id, d.name,
                     d.serial || CASE WHEN p.q = ANY (d.labels) THEN ' [' || p.q || ']' ELSE '' END AS detail,
                     CASE WHEN lower(d.serial) = lower(p.q) OR lower(d.name) = lower(p.q) THEN 1.0
                          WHEN d.serial ILIKE p.pre OR d.name ILIKE p.pre THEN 0.9
                          WHEN p.q = ANY (d.labels) THEN 0.85
                          WHEN d.serial ILIKE p.pat OR d.name ILIKE p.pat THEN 0.8
                          ELSE 0.7 * greatest(similarity(d.serial, p.q), similarity(d.name, p.q)) END::float8 AS score
              FROM device_search d, p
              WHERE d.serial ILIKE p.pat OR d.name ILIKE p.pat OR d.serial % p.q OR d.name % p.q
                 OR d.labels @> ARRAY[p.q] LIMIT $5)
             UNION ALL
             (SELECT 'workflow', w.id::text, w.name, 'version ' || w.version, 0.0 FROM workflows w, p
              WHERE w.name ILIKE p.pat OR w.name % p.q LIMIT $5)
             UNION ALL
             (SELECT 'campaign', c.id::text, c.name, 'version ' || c.version, 0.0 FROM campaigns c, p
              WHERE c.name ILIKE p.pat OR c.name % p.q LIMIT $5)
             UNION ALL
             (SELECT 'schedule', s.id::text, s.name, s.cron, 0.0 FROM schedules s, p
              WHERE s.name ILIKE p.pat OR s.name % p.q LIMIT $5)
             UNION ALL
             (SELECT 'host', h.id::text, h.name, h.url, 0.0 FROM hosts h, p
              WHERE h.name ILIKE p.pat OR h.name % p.q LIMIT $5)
             UNION ALL
             (SELECT 'run', r.id::text, r.target, r.status::text, 0.95 FROM runs r
              WHERE $3::uuid IS NOT NULL AND r.id BETWEEN $3 AND $4 ORDER BY r.id LIMIT $5)
             UNION ALL
             (SELECT 'run', r.id::text, r.target, 'idempotency key', 1.0 FROM runs r
              WHERE r.idempotency_key = $1 ORDER BY r.created_at DESC LIMIT $5)
           ) found"#,
        q,
        like_escape(q),
        lo,
        hi,
        limit,
    )
    .fetch_all(pool)
    .await?;
    for h in &mut hits {
        if h.kind != "device" && h.kind != "run" {
            h.score = name_score(&h.name, q);
        }
    }
    hits.extend(
        catalog::builtin()
            .iter()
            .map(|m| (m, name_score(m.id, q).max(name_score(m.name, q))))
            .filter(|(_, score)| *score >= 0.5)
            .map(|(m, score)| Hit {
                kind: "module".into(),
                id: m.id.into(),
                name: m.name.into(),
                detail: m.category.into(),
                score,
            }),
    );
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.name.cmp(&b.name)));
    hits.truncate(limit.max(0) as usize);
    Ok(hits)
}

/// How well a name matches `q`, by the same ladder as devices: exact 1, prefix 0.9,
/// substring 0.8, else a share of the longest common run of characters.
fn name_score(name: &str, q: &str) -> f64 {
    let (name, q) = (name.to_lowercase(), q.to_lowercase());
    if name == q {
        1.0
    } else if name.starts_with(&q) {
        0.9
    } else if name.contains(&q) {
        0.8
    } else {
        let common =
            (1..=q.len()).rev().find(|n| q.as_bytes().windows(*n).any(|w| name.as_bytes().windows(*n).any(|v| v == w)));
        0.7 * common.unwrap_or(0) as f64 / q.len().max(name.len()).max(1) as f64
    }
}

/// The UUIDs a run-id prefix covers (`3f2a` → `3f2a0000-…` to `3f2affff-…`): the
/// primary key's own index answers it. `None` unless `q` reads as at least 4 hex
/// digits (hyphens allowed).
fn id_range(q: &str) -> Option<(Uuid, Uuid)> {
    let hex: String = q.chars().filter(|c| *c != '-').collect();
    if hex.len() < 4 || hex.len() > 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let pad = |fill: &str| format!("{hex}{}", fill.repeat(32 - hex.len()));
    Some((Uuid::parse_str(&pad("0")).ok()?, Uuid::parse_str(&pad("f")).ok()?))
}

/// `q` with LIKE's wildcards (and its escape) escaped.
fn like_escape(q: &str) -> String {
    q.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_id_prefixes_become_ranges_of_the_key() {
        let (lo, hi) = id_range("3f2a").unwrap();
        assert_eq!(lo.to_string(), "3f2a0000-0000-0000-0000-000000000000");
        assert_eq!(hi.to_string(), "3f2affff-ffff-ffff-ffff-ffffffffffff");
        let (lo, hi) = id_range("3F2A9C10-77").unwrap();
        assert_eq!(lo.to_string(), "3f2a9c10-7700-0000-0000-000000000000");
        assert_eq!(hi.to_string(), "3f2a9c10-77ff-ffff-ffff-ffffffffffff");
        for not_an_id in ["3f2", "ping", "3f2a-xyz", ""] {
            assert!(id_range(not_an_id).is_none(), "{not_an_id}");
        }
        let whole = "3f2a9c10-7700-4000-8000-000000000001";
        assert_eq!(id_range(whole).unwrap(), (whole.parse().unwrap(), whole.parse().unwrap()));
    }

    #[test]
    fn names_rank_exact_then_prefix_then_substring_then_near() {
        assert_eq!(name_score("ping", "PING"), 1.0);
        assert_eq!(name_score("ping_sweep", "ping"), 0.9);
        assert_eq!(name_score("call_ping", "ping"), 0.8);
        assert!(name_score("airplane_mode", "airplan3") < 0.8 && name_score("airplane_mode", "airplan3") > 0.0);
        assert_eq!(like_escape("50%_a\\b"), "50\\%\\_a\\\\b");
    }
}
