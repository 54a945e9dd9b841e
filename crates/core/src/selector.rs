//! Device selectors: which devices a run may be given. One parser serves requests and
//! stored rows alike (a stored selector that does not parse is an error, never "any
//! device"); the SQL function `selector_matches` (migration 0004) applies the same rule
//! as `Selector::matches`.

use serde::{Deserialize, Deserializer, Serialize, de::Error as _};
use serde_json::Value;

use crate::{error::FieldErrors, ids::DeviceId, model::Device};

/// `{"id": uuid}`, `{"serial": s}`, or `{"pool": p, "labels": [..]}` (either may be
/// omitted, not both).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Selector {
    /// One device, by id.
    Id {
        /// The device.
        id: DeviceId,
    },
    /// One device, by serial.
    Serial {
        /// Its serial.
        serial: String,
    },
    /// Any device of a pool having every label.
    Pool {
        /// The pool, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<String>,
        /// Labels the device must all have (sorted, unique).
        labels: Vec<String>,
    },
}

fn one(field: &str, problem: &str) -> FieldErrors {
    FieldErrors::from([(field.to_string(), problem.to_string())])
}

fn join(field: &str, key: &str) -> String {
    if field.is_empty() { key.to_string() } else { format!("{field}.{key}") }
}

impl Selector {
    /// Parses a selector; `field` names it in errors (`device`, `items[2].device`).
    pub fn parse(field: &str, value: &Value) -> Result<Selector, FieldErrors> {
        let obj = value
            .as_object()
            .ok_or_else(|| one(field, "must be an object: {\"id\"}, {\"serial\"} or {\"pool\", \"labels\"}"))?;
        for key in obj.keys() {
            if !matches!(key.as_str(), "id" | "serial" | "pool" | "labels") {
                return Err(one(&join(field, key), "unknown selector field (expected id, serial, pool or labels)"));
            }
        }
        if let Some(id) = obj.get("id") {
            if obj.len() > 1 {
                return Err(one(field, "`id` cannot be combined with other selector fields"));
            }
            let id =
                id.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| one(&join(field, "id"), "must be a UUID"))?;
            return Ok(Selector::Id { id });
        }
        if let Some(serial) = obj.get("serial") {
            if obj.len() > 1 {
                return Err(one(field, "`serial` cannot be combined with other selector fields"));
            }
            let serial = serial
                .as_str()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| one(&join(field, "serial"), "must be a non-empty string"))?;
            return Ok(Selector::Serial { serial: serial.to_string() });
        }
        let pool = match obj.get("pool") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(_) => return Err(one(&join(field, "pool"), "must be a non-empty string")),
        };
        let labels = Self::labels(field, obj.get("labels"))?;
        if pool.is_none() && labels.is_empty() {
            return Err(one(field, "must name an id, a serial, a pool or labels"));
        }
        Ok(Selector::Pool { pool, labels })
    }

    fn labels(field: &str, value: Option<&Value>) -> Result<Vec<String>, FieldErrors> {
        let items = match value {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(one(&join(field, "labels"), "must be an array of strings")),
        };
        let mut labels = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match item.as_str() {
                Some(s) if !s.is_empty() => labels.push(s.to_string()),
                _ => return Err(one(&format!("{}[{i}]", join(field, "labels")), "must be a non-empty string")),
            }
        }
        labels.sort();
        labels.dedup();
        Ok(labels)
    }

    /// The selector as JSON (its stored form), for messages and SQL.
    pub fn to_json(&self) -> Value {
        match self {
            Selector::Id { id } => serde_json::json!({"id": id}),
            Selector::Serial { serial } => serde_json::json!({"serial": serial}),
            Selector::Pool { pool: Some(pool), labels } => serde_json::json!({"pool": pool, "labels": labels}),
            Selector::Pool { pool: None, labels } => serde_json::json!({"labels": labels}),
        }
    }

    /// The same rule the SQL function `selector_matches` applies.
    pub fn matches(&self, device: &Device) -> bool {
        match self {
            Selector::Id { id } => device.id == *id,
            Selector::Serial { serial } => &device.serial == serial,
            Selector::Pool { pool, labels } => {
                pool.as_ref().is_none_or(|p| &device.pool == p) && labels.iter().all(|l| device.labels.contains(l))
            }
        }
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        Selector::parse("", &value).map_err(|errors| {
            let text: Vec<String> =
                errors.iter().map(|(f, p)| if f.is_empty() { p.clone() } else { format!("{f}: {p}") }).collect();
            D::Error::custom(text.join("; "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_three_forms() {
        let id = DeviceId::random();
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
        assert!(Selector::parse("device", &json!({"id": "nope"})).unwrap_err().contains_key("device.id"));
        assert!(Selector::parse("device", &json!({})).unwrap_err().contains_key("device"));
        assert!(
            Selector::parse("device", &json!({"pool": "x", "colour": 1})).unwrap_err().contains_key("device.colour")
        );
    }

    #[test]
    fn stored_selectors_round_trip_and_bad_ones_are_errors() {
        let s = Selector::Pool { pool: Some("p".into()), labels: vec!["x".into()] };
        let back: Selector = serde_json::from_value(s.to_json()).unwrap();
        assert_eq!(back, s);
        let e = serde_json::from_value::<Selector>(json!({"colour": "red"})).unwrap_err().to_string();
        assert!(e.contains("colour: unknown selector field"), "{e}");
    }
}
