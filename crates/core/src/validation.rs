//! Checks of values that enter from outside, shared by every door (the API's request
//! structs, the CLI, seeding): text that Postgres can store and that fits, and field
//! errors collected so one answer names every bad field.

use crate::{CoreError, CoreResult, error::FieldErrors};

/// Collects field errors while a request is read.
#[derive(Debug, Default)]
pub struct Problems(pub FieldErrors);

impl Problems {
    /// No problems yet.
    pub fn new() -> Problems {
        Problems::default()
    }

    /// Records that `field` is wrong.
    pub fn add(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.entry(field.into()).or_insert_with(|| problem.into());
    }

    /// Records every problem of a validator.
    pub fn extend(&mut self, errors: FieldErrors) {
        for (field, problem) in errors {
            self.add(field, problem);
        }
    }

    /// The value, or `None` with its problems recorded.
    pub fn take<T>(&mut self, checked: Result<T, FieldErrors>) -> Option<T> {
        checked.map_err(|e| self.extend(e)).ok()
    }

    /// Whether `field` already has a problem.
    pub fn has(&self, field: &str) -> bool {
        self.0.contains_key(field)
    }

    /// A 422 naming every bad field, if any.
    pub fn finish(self) -> CoreResult<()> {
        if self.0.is_empty() { Ok(()) } else { Err(CoreError::invalid_fields(self.0)) }
    }
}

/// A name-like string: not blank, at most `max` characters (Postgres text cannot hold
/// NUL; bodies are checked for it before they are read).
pub fn text(field: &str, value: &str, max: usize) -> Result<String, FieldErrors> {
    let problem = if value.trim().is_empty() {
        "must not be empty".to_string()
    } else if value.chars().count() > max {
        format!("must be at most {max} characters long")
    } else {
        return Ok(value.to_string());
    };
    Err(FieldErrors::from([(field.to_string(), problem)]))
}

/// Labels: non-empty strings of at most 128 characters, sorted and deduplicated.
pub fn labels(field: &str, values: &[String]) -> Result<Vec<String>, FieldErrors> {
    for (i, v) in values.iter().enumerate() {
        if v.trim().is_empty() || v.chars().count() > 128 {
            return Err(FieldErrors::from([(
                format!("{field}[{i}]"),
                "must be a non-empty string of at most 128 characters".into(),
            )]));
        }
    }
    let mut out = values.to_vec();
    out.sort();
    out.dedup();
    Ok(out)
}

/// An integer within `min..=max`.
pub fn int_in(field: &str, value: i64, min: i64, max: i64) -> Result<i64, FieldErrors> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(FieldErrors::from([(field.to_string(), format!("must be between {min} and {max} (got {value})"))]))
    }
}

/// Finds a NUL character in any string of a JSON document (keys included), and names
/// its path: Postgres text and jsonb cannot hold it.
pub fn find_nul(value: &serde_json::Value, path: &str) -> Option<String> {
    use serde_json::Value;
    let join = |key: &str| if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
    match value {
        Value::String(s) if s.contains('\0') => Some(if path.is_empty() { "body".into() } else { path.to_string() }),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, v)| find_nul(v, &format!("{path}[{i}]"))),
        Value::Object(map) => {
            map.iter().find_map(|(k, v)| if k.contains('\0') { Some(join(k)) } else { find_nul(v, &join(k)) })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_characters_are_found_with_their_path() {
        assert_eq!(find_nul(&json!({"metadata": {"note": "a\u{0}b"}}), ""), Some("metadata.note".into()));
        assert_eq!(find_nul(&json!({"items": [{"x": 1}, {"y": ["\u{0}"]}]}), ""), Some("items[1].y[0]".into()));
        assert_eq!(find_nul(&json!({"a\u{0}": 1}), ""), Some("a\u{0}".into()));
        assert_eq!(find_nul(&json!({"fine": "text"}), ""), None);
    }

    #[test]
    fn text_labels_and_ranges() {
        assert!(text("name", " ", 10).is_err());
        assert!(text("name", "abcdefghijk", 10).is_err());
        assert_eq!(labels("labels", &["b".into(), "a".into(), "a".into()]).unwrap(), ["a", "b"]);
        assert!(int_in("priority", 12, 0, 9).unwrap_err()["priority"].contains("between 0 and 9"));
    }
}
