//! The module catalog: every built-in module, its parameter schema, default timeout and
//! retry policy. Drivers implement these ids; the API validates parameters against them.

use serde::Serialize;
use serde_json::{Value, json};

use crate::{error::FieldErrors, schema};

/// One module of the catalog.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ModuleSpec {
    /// Its id (`ping`), used in paths and definitions.
    pub id: &'static str,
    /// Display name.
    pub name: &'static str,
    /// What it does and when it fails.
    pub description: &'static str,
    /// `network`, `radio`, `messaging`, ...
    pub category: &'static str,
    /// JSON Schema of `params`.
    #[schema(value_type = Object)]
    pub params_schema: Value,
    /// Default run timeout (seconds); a run may override it.
    pub default_timeout_s: i32,
    /// Default attempts before a run that keeps hitting infrastructure errors is `errored`.
    pub max_attempts: i32,
    /// False for modules that never talk to the device (`sleep`).
    pub touches_device: bool,
    /// What a `passed` result holds, for readers of the catalog.
    pub result_fields: &'static [&'static str],
}

fn obj(properties: Value, required: &[&str]) -> Value {
    json!({"type": "object", "additionalProperties": false, "properties": properties, "required": required})
}

/// Every built-in module, in a stable order.
pub fn builtin() -> &'static [ModuleSpec] {
    static CATALOG: std::sync::OnceLock<Vec<ModuleSpec>> = std::sync::OnceLock::new();
    CATALOG.get_or_init(|| {
        vec![
            ModuleSpec {
                id: "ping",
                name: "Ping",
                description: "ICMP ping from the device to a host; fails when packet loss exceeds max_loss_pct.",
                category: "network",
                params_schema: obj(json!({
                    "host": {"type": "string", "minLength": 1, "maxLength": 253, "format": "hostname", "default": "8.8.8.8", "description": "host name, IPv4 or IPv6 address to ping"},
                    "count": {"type": "integer", "minimum": 1, "maximum": 100, "default": 4},
                    "interval_ms": {"type": "integer", "minimum": 200, "maximum": 10000, "default": 1000, "description": "Android's ping refuses intervals under 200 ms to non-root users"},
                    "max_loss_pct": {"type": "number", "minimum": 0, "maximum": 100, "default": 0, "description": "highest packet loss that still passes"}
                }), &[]),
                default_timeout_s: 60,
                max_attempts: 3,
                touches_device: true,
                result_fields: &["host", "sent", "received", "loss_pct", "rtt_ms"],
            },
            ModuleSpec {
                id: "airplane_mode",
                name: "Airplane mode",
                description: "Turns airplane mode on or off and verifies the radio state.",
                category: "radio",
                params_schema: obj(json!({"enabled": {"type": "boolean"}}), &["enabled"]),
                default_timeout_s: 30,
                max_attempts: 3,
                touches_device: true,
                result_fields: &["airplane_mode", "changed", "verified"],
            },
            ModuleSpec {
                id: "mobile_data",
                name: "Mobile data",
                description: "Turns mobile data on or off and verifies the data connection state.",
                category: "radio",
                params_schema: obj(json!({"enabled": {"type": "boolean"}}), &["enabled"]),
                default_timeout_s: 30,
                max_attempts: 3,
                touches_device: true,
                result_fields: &["mobile_data", "changed", "verified", "data_state"],
            },
            ModuleSpec {
                id: "wifi",
                name: "Wi-Fi",
                description: "Turns Wi-Fi on or off, optionally checking it joins the given SSID.",
                category: "radio",
                params_schema: obj(json!({
                    "enabled": {"type": "boolean"},
                    "ssid": {"type": "string", "minLength": 1, "maxLength": 32, "format": "ssid", "description": "when enabling: the network the device must join (checked on Android 11+)"}
                }), &["enabled"]),
                default_timeout_s: 60,
                max_attempts: 3,
                touches_device: true,
                result_fields: &["wifi", "changed", "ssid", "rssi_dbm"],
            },
            ModuleSpec {
                id: "send_sms",
                name: "Send SMS",
                description: "Sends an SMS and, by default, confirms it from the device's SMS provider; says unsupported where the device offers no method.",
                category: "messaging",
                params_schema: obj(json!({
                    "to": {"type": "string", "minLength": 3, "maxLength": 21, "format": "phone", "description": "recipient number: an optional '+' then digits"},
                    "body": {"type": "string", "minLength": 1, "maxLength": 918},
                    "expect_delivery": {"type": "boolean", "default": true, "description": "confirm the message from the device's SMS provider before passing"}
                }), &["to", "body"]),
                default_timeout_s: 120,
                max_attempts: 3,
                touches_device: true,
                result_fields: &["message_id", "segments", "sent", "delivered"],
            },
            ModuleSpec {
                id: "voice_call",
                name: "Voice call",
                description: "Places a voice call, holds it for duration_s and hangs up; fails if it does not connect or drops.",
                category: "voice",
                params_schema: obj(json!({
                    "to": {"type": "string", "minLength": 3, "maxLength": 21, "format": "phone"},
                    "duration_s": {"type": "integer", "minimum": 1, "maximum": 3600, "default": 10}
                }), &["to"]),
                default_timeout_s: 600,
                max_attempts: 2,
                touches_device: true,
                result_fields: &["connected", "setup_ms", "duration_s", "dropped"],
            },
            ModuleSpec {
                id: "reboot",
                name: "Reboot",
                description: "Reboots the device and, by default, waits until it has booted.",
                category: "device",
                params_schema: obj(json!({"wait_boot": {"type": "boolean", "default": true}}), &[]),
                default_timeout_s: 300,
                max_attempts: 2,
                touches_device: true,
                result_fields: &["rebooted", "boot_ms"],
            },
            ModuleSpec {
                id: "device_info",
                name: "Device info",
                description: "Reads the device's model, OS version, build, battery and signal strength.",
                category: "device",
                params_schema: obj(json!({}), &[]),
                default_timeout_s: 30,
                max_attempts: 3,
                touches_device: true,
                result_fields: &["model", "manufacturer", "os_version", "api_level", "fingerprint", "battery", "signal"],
            },
            ModuleSpec {
                id: "capture_logs",
                name: "Capture logs",
                description: "Captures the device log (threadtime format) for duration_s seconds; the excerpt is stored with the run, bounded.",
                category: "diagnostics",
                params_schema: obj(json!({
                    "duration_s": {"type": "integer", "minimum": 1, "maximum": 600, "default": 10},
                    "buffer": {"type": "string", "enum": ["main", "radio", "events", "system", "crash", "all"], "default": "main"}
                }), &[]),
                default_timeout_s: 660,
                max_attempts: 3,
                touches_device: true,
                result_fields: &["buffer", "lines", "bytes", "truncated", "capture"],
            },
            ModuleSpec {
                id: "sleep",
                name: "Sleep",
                description: "Waits ms milliseconds and reports the scripted outcome: passed, failed (a verdict) or error (an infrastructure error). Touches no device; runs on every driver.",
                category: "testing",
                params_schema: obj(json!({
                    "ms": {"type": "integer", "minimum": 0, "maximum": 86_400_000},
                    "outcome": {"type": "string", "enum": ["passed", "failed", "error"], "default": "passed"}
                }), &["ms"]),
                default_timeout_s: 3600,
                max_attempts: 3,
                touches_device: false,
                result_fields: &["slept_ms", "outcome"],
            },
        ]
    })
}

/// The module with this id, if the catalog has it.
pub fn find(id: &str) -> Option<&'static ModuleSpec> {
    builtin().iter().find(|m| m.id == id)
}

/// Validates `params` (absent means `{}`) for a module, returning them with defaults
/// filled in. Errors name each bad field under `path` (`params`, `steps[2].params`).
pub fn validate_params(module: &ModuleSpec, params: Option<&Value>, path: &str) -> Result<Value, FieldErrors> {
    let mut value = match params {
        None | Some(Value::Null) => json!({}),
        Some(v) => v.clone(),
    };
    let mut errors = FieldErrors::new();
    schema::validate(&module.params_schema, &value, path, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    schema::apply_defaults(&module.params_schema, &mut value);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keywords_ok(v: &Value) {
        if let Some(o) = v.as_object() {
            for (k, child) in o {
                assert!(schema::SUPPORTED_KEYWORDS.contains(&k.as_str()), "unsupported schema keyword {k}");
                match k.as_str() {
                    "properties" => child.as_object().unwrap().values().for_each(keywords_ok),
                    "items" => keywords_ok(child),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn every_schema_uses_only_supported_keywords_and_defaults_validate() {
        assert_eq!(builtin().len(), 10);
        for m in builtin() {
            keywords_ok(&m.params_schema);
            // Defaults must themselves be valid values.
            let mut v = json!({});
            schema::apply_defaults(&m.params_schema, &mut v);
            let mut e = FieldErrors::new();
            for (k, val) in v.as_object().unwrap() {
                schema::validate(&m.params_schema["properties"][k], val, k, &mut e);
            }
            assert!(e.is_empty(), "{}: {e:?}", m.id);
        }
    }

    #[test]
    fn sleep_params() {
        let sleep = find("sleep").unwrap();
        let v = validate_params(sleep, Some(&json!({"ms": 5})), "params").unwrap();
        assert_eq!(v, json!({"ms": 5, "outcome": "passed"}));
        let e = validate_params(sleep, Some(&json!({"ms": -1})), "params").unwrap_err();
        assert!(e.contains_key("params.ms"));
        let e = validate_params(sleep, Some(&json!({"ms": 5000.0})), "params").unwrap_err();
        assert_eq!(e["params.ms"], "must be an integer (got a number)");
    }
}
