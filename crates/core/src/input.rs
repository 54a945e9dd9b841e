//! Reading request bodies field by field, so every error names its field.

use std::str::FromStr;

use serde_json::{Map, Value};
use uuid::Uuid;

use crate::{CoreError, CoreResult, error::FieldErrors};

/// A JSON object being read, collecting errors per field.
pub struct Fields<'a> {
    obj: &'a Map<String, Value>,
    pub errors: FieldErrors,
}

impl<'a> Fields<'a> {
    /// Starts reading `body`, which must be an object whose keys are all in `allowed`.
    pub fn new(body: &'a Value, allowed: &[&str]) -> CoreResult<Fields<'a>> {
        let obj = body
            .as_object()
            .ok_or_else(|| CoreError::BadRequest("request body must be a JSON object".into()))?;
        let mut errors = FieldErrors::new();
        for key in obj.keys() {
            if !allowed.contains(&key.as_str()) {
                errors.insert(key.clone(), format!("unknown field (expected one of {})", allowed.join(", ")));
            }
        }
        Ok(Fields { obj, errors })
    }

    pub fn has(&self, key: &str) -> bool {
        self.obj.contains_key(key)
    }

    pub fn raw(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn bad(&mut self, key: &str, msg: impl Into<String>) {
        self.errors.insert(key.to_string(), msg.into());
    }

    /// A required non-empty string (at most `max` characters).
    pub fn string(&mut self, key: &str, max: usize) -> Option<String> {
        match self.opt_string(key, max) {
            Some(s) => Some(s),
            None => {
                if !self.errors.contains_key(key) {
                    self.bad(key, "is required");
                }
                None
            }
        }
    }

    /// An optional non-empty string; absent and null both mean `None`.
    pub fn opt_string(&mut self, key: &str, max: usize) -> Option<String> {
        match self.raw(key) {
            None => None,
            Some(Value::String(s)) if s.trim().is_empty() => {
                self.bad(key, "must not be empty");
                None
            }
            Some(Value::String(s)) if s.chars().count() > max => {
                self.bad(key, format!("must be at most {max} characters long"));
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.bad(key, "must be a string");
                None
            }
        }
    }

    /// An optional value of a string enum.
    pub fn opt_enum<T: FromStr<Err = String>>(&mut self, key: &str) -> Option<T> {
        let s = self.opt_string(key, 64)?;
        match T::from_str(&s) {
            Ok(v) => Some(v),
            Err(e) => {
                self.bad(key, e);
                None
            }
        }
    }

    pub fn opt_uuid(&mut self, key: &str) -> Option<Uuid> {
        let s = self.opt_string(key, 64)?;
        match Uuid::parse_str(&s) {
            Ok(u) => Some(u),
            Err(_) => {
                self.bad(key, "must be a UUID");
                None
            }
        }
    }

    pub fn opt_bool(&mut self, key: &str) -> Option<bool> {
        match self.raw(key) {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                self.bad(key, "must be a boolean");
                None
            }
        }
    }

    /// An optional integer within `min..=max`.
    pub fn opt_int(&mut self, key: &str, min: i64, max: i64) -> Option<i64> {
        match self.raw(key) {
            None => None,
            Some(v) => match v.as_i64() {
                Some(n) if (min..=max).contains(&n) => Some(n),
                Some(n) => {
                    self.bad(key, format!("must be between {min} and {max} (got {n})"));
                    None
                }
                None => {
                    self.bad(key, "must be an integer");
                    None
                }
            },
        }
    }

    /// An optional array of non-empty strings, sorted and deduplicated.
    pub fn opt_string_set(&mut self, key: &str) -> Option<Vec<String>> {
        let v = self.raw(key)?;
        let Some(items) = v.as_array() else {
            self.bad(key, "must be an array of strings");
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match item.as_str() {
                Some(s) if !s.trim().is_empty() && s.len() <= 128 => out.push(s.to_string()),
                _ => {
                    self.bad(&format!("{key}[{i}]"), "must be a non-empty string of at most 128 characters");
                    return None;
                }
            }
        }
        out.sort();
        out.dedup();
        Some(out)
    }

    /// An optional JSON object.
    pub fn opt_object(&mut self, key: &str) -> Option<Value> {
        match self.raw(key) {
            None => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(_) => {
                self.bad(key, "must be an object");
                None
            }
        }
    }

    /// A device selector; `required` makes its absence an error.
    pub fn selector(&mut self, key: &str, required: bool) -> Option<crate::selector::Selector> {
        match self.raw(key) {
            None => {
                if required {
                    self.bad(key, "is required: {\"id\"}, {\"serial\"} or {\"pool\", \"labels\"}");
                }
                None
            }
            Some(v) => match crate::selector::Selector::parse(key, v) {
                Ok(s) => Some(s),
                Err(CoreError::Validation { fields, .. }) => {
                    self.errors.extend(fields);
                    None
                }
                Err(e) => {
                    self.bad(key, e.to_string());
                    None
                }
            },
        }
    }

    /// Ends reading: an error naming every bad field, if any.
    pub fn finish(self) -> CoreResult<()> {
        if self.errors.is_empty() { Ok(()) } else { Err(CoreError::invalid_fields(self.errors)) }
    }
}
