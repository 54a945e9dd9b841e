//! Validation of module parameters against their JSON Schema.
//!
//! The catalog's schemas use a small, well-defined subset of JSON Schema (draft 2020-12):
//! `type`, `properties`, `required`, `additionalProperties: false`, `enum`, `minimum`,
//! `maximum`, `minLength`, `maxLength`, `format` (the strict formats of `formats`), `items`,
//! `minItems`, `maxItems` and `default`.
//! This validator implements exactly that subset, so every error can name the field
//! (`params.count`) and say what is wrong. A schema keyword outside the subset is a bug in
//! the catalog, caught by the catalog's unit test.

use serde_json::{Map, Value};

use crate::error::FieldErrors;

/// Keywords this validator understands.
pub const SUPPORTED_KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "format",
    "items",
    "minItems",
    "maxItems",
    "default",
    "description",
    "title",
    "examples",
];

/// Validates `value` against `schema`, collecting one message per bad field under `path`.
pub fn validate(schema: &Value, value: &Value, path: &str, errors: &mut FieldErrors) {
    let Some(schema) = schema.as_object() else { return };
    if let Some(ty) = schema.get("type").and_then(Value::as_str)
        && !type_matches(ty, value)
    {
        errors.insert(path.to_string(), format!("must be {} (got {})", article(ty), describe(value)));
        return;
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        let list: Vec<String> = options.iter().map(|o| o.to_string()).collect();
        errors.insert(path.to_string(), format!("must be one of {} (got {})", list.join(", "), value));
        return;
    }
    match value {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && x < min
            {
                errors.insert(path.to_string(), format!("must be >= {} (got {})", num(min), n));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && x > max
            {
                errors.insert(path.to_string(), format!("must be <= {} (got {})", num(max), n));
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && len < min
            {
                errors.insert(path.to_string(), format!("must be at least {min} characters long"));
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && len > max
            {
                errors.insert(path.to_string(), format!("must be at most {max} characters long"));
            }
            if let Some(format) = schema.get("format").and_then(Value::as_str)
                && !errors.contains_key(path)
                && let Some(why) = crate::formats::check(format, s)
            {
                errors.insert(path.to_string(), why);
            }
        }
        Value::Array(items) => {
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                errors.insert(path.to_string(), format!("must have at least {min} items"));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && (items.len() as u64) > max
            {
                errors.insert(path.to_string(), format!("must have at most {max} items"));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate(item_schema, item, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(obj) => validate_object(schema, obj, path, errors),
        _ => {}
    }
}

fn validate_object(schema: &Map<String, Value>, obj: &Map<String, Value>, path: &str, errors: &mut FieldErrors) {
    let empty = Map::new();
    let properties = schema.get("properties").and_then(Value::as_object).unwrap_or(&empty);
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for name in required.iter().filter_map(Value::as_str) {
            if !obj.contains_key(name) {
                errors.insert(join(path, name), "is required".to_string());
            }
        }
    }
    let closed = schema.get("additionalProperties") == Some(&Value::Bool(false));
    for (key, value) in obj {
        match properties.get(key) {
            Some(prop) => validate(prop, value, &join(path, key), errors),
            None if closed => {
                let mut known: Vec<&str> = properties.keys().map(String::as_str).collect();
                known.sort();
                let hint = if known.is_empty() {
                    "takes no parameters".to_string()
                } else {
                    format!("expected one of {}", known.join(", "))
                };
                errors.insert(join(path, key), format!("unknown parameter ({hint})"));
            }
            None => {}
        }
    }
}

/// Fills in `default` values of absent top-level properties, so a run's snapshot says
/// exactly what it executes.
pub fn apply_defaults(schema: &Value, value: &mut Value) {
    let (Some(props), Some(obj)) = (schema.get("properties").and_then(Value::as_object), value.as_object_mut()) else {
        return;
    };
    for (name, prop) in props {
        if !obj.contains_key(name)
            && let Some(default) = prop.get("default")
        {
            obj.insert(name.clone(), default.clone());
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

fn type_matches(ty: &str, v: &Value) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "number" => v.is_number(),
        // A whole-number float (`5000.0`) is not an integer: a driver reading it as one
        // would get nothing.
        "integer" => v.as_i64().is_some() || v.as_u64().is_some(),
        "null" => v.is_null(),
        _ => true,
    }
}

fn article(ty: &str) -> String {
    match ty {
        "object" | "array" | "integer" => format!("an {ty}"),
        _ => format!("a {ty}"),
    }
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn num(x: f64) -> String {
    if x.fract() == 0.0 { format!("{}", x as i64) } else { x.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(schema: Value, value: Value) -> FieldErrors {
        let mut e = FieldErrors::new();
        validate(&schema, &value, "params", &mut e);
        e
    }

    #[test]
    fn names_each_bad_field() {
        let schema = json!({"type": "object", "additionalProperties": false, "required": ["host"],
            "properties": {"host": {"type": "string", "minLength": 1},
                           "count": {"type": "integer", "minimum": 1, "maximum": 100}}});
        assert!(check(schema.clone(), json!({"host": "x", "count": 3})).is_empty());
        let e = check(schema.clone(), json!({"count": 0, "colour": 1}));
        assert_eq!(e["params.host"], "is required");
        assert_eq!(e["params.count"], "must be >= 1 (got 0)");
        assert!(e["params.colour"].starts_with("unknown parameter"));
        let e = check(schema, json!({"host": "x", "count": "3"}));
        assert_eq!(e["params.count"], "must be an integer (got a string)");
    }

    #[test]
    fn enums_arrays_and_defaults() {
        let schema = json!({"type": "object", "properties": {
            "outcome": {"type": "string", "enum": ["passed", "failed"], "default": "passed"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}}});
        let e = check(schema.clone(), json!({"outcome": "maybe", "tags": ["a", 1, "c"]}));
        assert!(e["params.outcome"].contains("must be one of"));
        assert_eq!(e["params.tags"], "must have at most 2 items");
        assert_eq!(e["params.tags[1]"], "must be a string (got an integer)");
        let mut v = json!({});
        apply_defaults(&schema, &mut v);
        assert_eq!(v, json!({"outcome": "passed"}));
    }
}
