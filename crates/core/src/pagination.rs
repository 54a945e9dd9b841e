//! Opaque keyset cursors for list endpoints: newest first, stable under inserts.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{CoreError, CoreResult};

/// Items per page when `limit` is not given.
pub const DEFAULT_LIMIT: i64 = 50;
/// Most items per page.
pub const MAX_LIMIT: i64 = 500;

/// Position after which the next page starts: (created_at, id) of the last item seen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cursor {
    /// When the last item seen was created.
    pub created_at: DateTime<Utc>,
    /// Its id (ties on `created_at` are ordered by id).
    pub id: Uuid,
}

/// The opaque form of a cursor's text, as clients see it.
pub fn seal(raw: &str) -> String {
    URL_SAFE_NO_PAD.encode(raw)
}

/// The error for a `cursor` this API did not return.
pub fn bad_cursor() -> CoreError {
    CoreError::invalid("cursor", "is not a cursor this API returned")
}

/// The text of a cursor sealed by `seal` (422 for anything else).
pub fn open(sealed: &str) -> CoreResult<String> {
    let raw = URL_SAFE_NO_PAD.decode(sealed).map_err(|_| bad_cursor())?;
    String::from_utf8(raw).map_err(|_| bad_cursor())
}

/// Up to `limit + 1` rows cut to `limit`, with the key of the last one kept when the
/// extra row says a next page exists.
pub fn split<T, K>(mut rows: Vec<T>, limit: i64, key: impl Fn(&T) -> K) -> (Vec<T>, Option<K>) {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit.max(0) as usize);
    let next = if more { rows.last().map(key) } else { None };
    (rows, next)
}

impl Cursor {
    /// The opaque form clients pass back.
    pub fn encode(&self) -> String {
        seal(&format!("{}|{}", self.created_at.timestamp_micros(), self.id))
    }

    /// Reads a cursor this API returned (422 otherwise).
    pub fn decode(s: &str) -> CoreResult<Cursor> {
        let bad = bad_cursor;
        let raw = open(s)?;
        let (ts, id) = raw.split_once('|').ok_or_else(bad)?;
        let micros: i64 = ts.parse().map_err(|_| bad())?;
        Ok(Cursor {
            created_at: DateTime::from_timestamp_micros(micros).ok_or_else(bad)?,
            id: Uuid::parse_str(id).map_err(|_| bad())?,
        })
    }
}

/// Checks `limit` (default 50, 1..=500).
pub fn limit(requested: Option<i64>) -> CoreResult<i64> {
    match requested {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(CoreError::invalid("limit", format!("must be between 1 and {MAX_LIMIT} (got {n})"))),
    }
}

/// A page of items and the cursor of the next page, if any.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    /// This page's items.
    pub items: Vec<T>,
    /// The cursor of the next page; null on the last one.
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` rows (the extra one says a next page exists).
    pub fn from_rows(rows: Vec<T>, limit: i64, key: impl Fn(&T) -> Cursor) -> Page<T> {
        let (items, next) = split(rows, limit, key);
        Page { items, next_cursor: next.map(|c| c.encode()) }
    }
}

/// A page of a fixed, ordered list (the module catalog): the cursor is the position
/// after the last item seen, encoded like the keyset cursors.
pub fn slice<T: Clone>(items: &[T], limit: i64, cursor: Option<&str>) -> CoreResult<Page<T>> {
    let start = match cursor {
        None => 0,
        Some(c) => open(c)?
            .strip_prefix("at|")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n <= items.len())
            .ok_or_else(bad_cursor)?,
    };
    let end = (start + limit as usize).min(items.len());
    let next_cursor = (end < items.len()).then(|| seal(&format!("at|{end}")));
    Ok(Page { items: items[start..end].to_vec(), next_cursor })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_rejects_garbage() {
        let c =
            Cursor { created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(), id: Uuid::new_v4() };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        assert!(Cursor::decode("!!").is_err());
        assert!(Cursor::decode(&URL_SAFE_NO_PAD.encode("x|y")).is_err());
        assert!(limit(Some(0)).is_err());
        assert_eq!(limit(None).unwrap(), 50);
    }

    #[test]
    fn fixed_lists_page_by_position() {
        let items = [1, 2, 3, 4, 5];
        let first = slice(&items, 2, None).unwrap();
        assert_eq!(first.items, [1, 2]);
        let second = slice(&items, 2, first.next_cursor.as_deref()).unwrap();
        assert_eq!(second.items, [3, 4]);
        let last = slice(&items, 2, second.next_cursor.as_deref()).unwrap();
        assert_eq!((last.items.as_slice(), last.next_cursor), (&[5][..], None));
        assert!(slice(&items, 2, Some("garbage")).is_err());
    }
}
