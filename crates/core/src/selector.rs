//! Device selectors: which devices a run may be given. Parsed once at the boundary with
//! precise errors; matched in SQL by `repo::devices` with the same rules as `matches`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{CoreError, CoreResult, model::Device};

/// `{"id": uuid}`, `{"serial": s}`, or `{"pool": p, "labels": [..]}` (either may be
/// omitted, not both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Selector {
    Id { id: Uuid },
    Serial { serial: String },
    Pool {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<String>,
        #[serde(default)]
        labels: Vec<String>,
    },
}

impl Selector {
    /// Parses a selector from request JSON; `field` names it in errors (`device`).
    pub fn parse(field: &str, value: &Value) -> CoreResult<Selector> {
        let obj = value
            .as_object()
            .ok_or_else(|| CoreError::invalid(field, "must be an object: {\"id\"}, {\"serial\"} or {\"pool\", \"labels\"}"))?;
        for key in obj.keys() {
            if !matches!(key.as_str(), "id" | "serial" | "pool" | "labels") {
                return Err(CoreError::invalid(format!("{field}.{key}"), "unknown selector field (expected id, serial, pool or labels)"));
            }
        }
        if let Some(id) = obj.get("id") {
            if obj.len() > 1 {
                return Err(CoreError::invalid(field, "`id` cannot be combined with other selector fields"));
            }
            let id = id
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
                .ok_or_else(|| CoreError::invalid(format!("{field}.id"), "must be a UUID"))?;
            return Ok(Selector::Id { id });
        }
        if let Some(serial) = obj.get("serial") {
            if obj.len() > 1 {
                return Err(CoreError::invalid(field, "`serial` cannot be combined with other selector fields"));
            }
            let serial = serial
                .as_str()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| CoreError::invalid(format!("{field}.serial"), "must be a non-empty string"))?;
            return Ok(Selector::Serial { serial: serial.to_string() });
        }
        let pool = match obj.get("pool") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(_) => return Err(CoreError::invalid(format!("{field}.pool"), "must be a non-empty string")),
        };
        let labels = match obj.get("labels") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                let mut labels = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.as_str() {
                        Some(s) if !s.is_empty() => labels.push(s.to_string()),
                        _ => return Err(CoreError::invalid(format!("{field}.labels[{i}]"), "must be a non-empty string")),
                    }
                }
                labels.sort();
                labels.dedup();
                labels
            }
            Some(_) => return Err(CoreError::invalid(format!("{field}.labels"), "must be an array of strings")),
        };
        if pool.is_none() && labels.is_empty() {
            return Err(CoreError::invalid(field, "must name an id, a serial, a pool or labels"));
        }
        Ok(Selector::Pool { pool, labels })
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The same rule the SQL in `repo::devices` applies.
    pub fn matches(&self, device: &Device) -> bool {
        match self {
            Selector::Id { id } => device.id == *id,
            Selector::Serial { serial } => &device.serial == serial,
            Selector::Pool { pool, labels } => {
                pool.as_ref().is_none_or(|p| &device.pool == p)
                    && labels.iter().all(|l| device.labels.contains(l))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_three_forms() {
        let id = Uuid::new_v4();
        assert_eq!(Selector::parse("device", &json!({"id": id.to_string()})).unwrap(), Selector::Id { id });
        assert_eq!(
            Selector::parse("device", &json!({"serial": "abc"})).unwrap(),
            Selector::Serial { serial: "abc".into() }
        );
        assert_eq!(
            Selector::parse("device", &json!({"pool": "lab", "labels": ["b", "a", "a"]})).unwrap(),
            Selector::Pool { pool: Some("lab".into()), labels: vec!["a".into(), "b".into()] }
        );
    }

    #[test]
    fn rejects_with_the_field_named() {
        let err = Selector::parse("device", &json!({"id": "nope"})).unwrap_err();
        assert!(matches!(err, CoreError::Validation { ref fields, .. } if fields.contains_key("device.id")));
        let err = Selector::parse("device", &json!({})).unwrap_err();
        assert!(matches!(err, CoreError::Validation { ref fields, .. } if fields.contains_key("device")));
        let err = Selector::parse("device", &json!({"pool": "x", "colour": 1})).unwrap_err();
        assert!(matches!(err, CoreError::Validation { ref fields, .. } if fields.contains_key("device.colour")));
    }

    #[test]
    fn round_trips_through_json() {
        let s = Selector::Pool { pool: Some("p".into()), labels: vec!["x".into()] };
        let back: Selector = serde_json::from_value(s.to_json()).unwrap();
        assert_eq!(back, s);
    }
}
