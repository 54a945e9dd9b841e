//! The simulated driver: every built-in module with plausible results, no hardware.
//!
//! Behaviour comes from the device's `metadata.sim`: `latency_ms` (added to every device
//! module), `fail_rate` (probability of a failed verdict), `error_rate` (probability of
//! an infrastructure error) and `seed` (makes the dice reproducible per run and attempt).

use std::time::Duration;

use futures::{FutureExt, future::BoxFuture};
use serde_json::{Value, json};

use super::{Driver, DriverError, ModuleCall, Verdict};

pub struct SimDriver;

#[derive(Debug, Clone, Copy, Default)]
struct SimSettings {
    latency_ms: f64,
    fail_rate: f64,
    error_rate: f64,
    seed: Option<u64>,
}

impl SimSettings {
    fn from_metadata(metadata: &Value) -> SimSettings {
        let sim = &metadata["sim"];
        SimSettings {
            latency_ms: sim["latency_ms"].as_f64().unwrap_or(0.0).max(0.0),
            fail_rate: sim["fail_rate"].as_f64().unwrap_or(0.0).clamp(0.0, 1.0),
            error_rate: sim["error_rate"].as_f64().unwrap_or(0.0).clamp(0.0, 1.0),
            seed: sim["seed"].as_u64(),
        }
    }
}

impl Driver for SimDriver {
    fn execute<'a>(&'a self, call: ModuleCall<'a>) -> BoxFuture<'a, Result<Verdict, DriverError>> {
        async move {
            let settings = SimSettings::from_metadata(&call.device.metadata);
            let mut rng = match settings.seed {
                // Same seed, run and attempt: same dice.
                Some(seed) => {
                    fastrand::Rng::with_seed(seed ^ (call.run_id.0.as_u128() as u64) ^ ((call.attempt as u64) << 32))
                }
                None => fastrand::Rng::new(),
            };
            if settings.latency_ms > 0.0 {
                let wait = Duration::from_micros((settings.latency_ms * 1000.0) as u64);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = call.cancel.cancelled() => return Err(DriverError::Interrupted),
                }
            }
            if rng.f64() < settings.error_rate {
                return Err(DriverError::Unreachable(format!(
                    "sim: {} did not answer (metadata.sim.error_rate = {})",
                    call.device.serial, settings.error_rate
                )));
            }
            let fail = rng.f64() < settings.fail_rate;
            Ok(simulate(call.module.id, call.params, call.device, fail, &mut rng))
        }
        .boxed()
    }
}

fn simulate(
    module: &str,
    p: &Value,
    device: &switchboard_core::model::Device,
    fail: bool,
    rng: &mut fastrand::Rng,
) -> Verdict {
    let verdict = |result: Value| if fail { Verdict::Failed(result) } else { Verdict::Passed(result) };
    match module {
        "ping" => {
            let count = p["count"].as_u64().unwrap_or(4);
            let received = if fail { rng.u64(0..count) } else { count };
            let loss_pct = 100.0 * (count - received) as f64 / count as f64;
            let avg = 20.0 + rng.f64() * 40.0;
            let mut r = json!({
                "host": p["host"].as_str().unwrap_or("8.8.8.8"),
                "sent": count, "received": received, "loss_pct": loss_pct,
                "rtt_ms": {"min": round(avg * 0.7), "avg": round(avg), "max": round(avg * 1.5)},
            });
            if fail {
                r["reason"] = json!(format!("packet loss {loss_pct:.0}% above max_loss_pct {}", p["max_loss_pct"]));
            }
            verdict(r)
        }
        "airplane_mode" | "mobile_data" => {
            let enabled = p["enabled"].as_bool().unwrap_or(false);
            let mut r = json!({module: enabled, "changed": true, "verified": !fail});
            if module == "mobile_data" {
                r["data_state"] = json!(if enabled && !fail { "connected" } else { "disconnected" });
            }
            if fail {
                r["reason"] = json!(format!("{module} state did not change to {enabled}"));
            }
            verdict(r)
        }
        "wifi" => {
            let enabled = p["enabled"].as_bool().unwrap_or(false);
            let mut r = json!({"wifi": enabled, "changed": true, "ssid": p.get("ssid").cloned().unwrap_or(Value::Null),
                               "rssi_dbm": if enabled { json!(-40 - rng.i64(0..40)) } else { Value::Null }});
            if fail {
                r["reason"] = json!("did not associate with the access point");
            }
            verdict(r)
        }
        "send_sms" => {
            let body = p["body"].as_str().unwrap_or("");
            let segments = body.chars().count().div_ceil(153).max(1);
            let mut r = json!({"message_id": format!("sim-{:08x}", rng.u32(..)), "to": p["to"], "segments": segments,
                               "sent": true, "delivered": !fail,
                               "delivery_status": if fail { "pending" } else { "delivered" },
                               "delivery_ms": if fail { Value::Null } else { json!(800 + rng.u64(0..2500)) }});
            if fail {
                r["reason"] = json!("no delivery report before the timeout");
            }
            verdict(r)
        }
        "voice_call" => {
            let duration = p["duration_s"].as_u64().unwrap_or(10);
            let mut r = json!({"to": p["to"], "connected": !fail, "setup_ms": 1500 + rng.u64(0..3000),
                               "duration_s": if fail { 0 } else { duration }, "dropped": false});
            if fail {
                r["reason"] = json!("call did not connect (busy)");
            }
            verdict(r)
        }
        "reboot" => {
            let mut r = json!({"rebooted": true, "boot_ms": if fail { Value::Null } else { json!(25_000 + rng.u64(0..20_000)) }});
            if fail {
                r["reason"] = json!("device did not report boot completed");
            }
            verdict(r)
        }
        "device_info" => {
            let model = device.model.clone().unwrap_or_else(|| "Pixel 8".to_string());
            let level = 40 + rng.u8(0..60);
            let r = json!({"serial": device.serial, "model": model, "manufacturer": manufacturer(&model),
                           "platform": device.platform, "os_version": "14", "api_level": 34,
                           "fingerprint": format!("sim/{}/sim:14/UQ1A.240205.004/1:user/release-keys", device.serial),
                           "battery": {"level_pct": level, "status": "discharging", "health": "good",
                                       "temperature_c": 29.5, "voltage_mv": 4012, "plugged": "none"},
                           "battery_pct": level,
                           "signal": {"technology": "lte", "dbm": -80 - rng.i64(0..30), "level": 3},
                           "network_operator": "SIM-NET"});
            verdict(r)
        }
        "capture_logs" => {
            let duration = p["duration_s"].as_u64().unwrap_or(10);
            let lines = duration * (50 + rng.u64(0..150));
            let buffer = p["buffer"].as_str().unwrap_or("main");
            let mut r = json!({"buffer": buffer, "lines": lines, "bytes": lines * 96, "truncated": false,
                               "capture": null, "errors": 0, "fatal": 0, "crashes": u64::from(fail)});
            if fail {
                r["reason"] = json!("crash found in log buffer");
            }
            verdict(r)
        }
        other => Verdict::Failed(json!({"reason": format!("sim has no behaviour for module {other}")})),
    }
}

fn manufacturer(model: &str) -> &'static str {
    let m = model.to_ascii_lowercase();
    if m.contains("pixel") {
        "Google"
    } else if m.contains("galaxy") || m.starts_with("sm-") {
        "Samsung"
    } else {
        "Generic"
    }
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_core::catalog;

    fn device(metadata: Value) -> switchboard_core::model::Device {
        serde_json::from_value(json!({
            "id": uuid::Uuid::new_v4(), "serial": "sim-1", "name": "sim-1", "platform": "android", "model": "Pixel 8",
            "pool": "default", "labels": [], "driver": "sim", "host_id": null, "status": "online",
            "status_reason": null, "status_source": "operator",
            "breaker": {"state": "closed", "consecutive_failures": 0, "open_until": null}, "lease": null,
            "metadata": metadata, "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"
        }))
        .unwrap()
    }

    async fn run(module: &str, params: Value, metadata: Value) -> Result<Verdict, DriverError> {
        let d = device(metadata);
        let spec = catalog::find(module).unwrap();
        let params = catalog::validate_params(spec, Some(&params), "params").unwrap();
        SimDriver
            .execute(ModuleCall {
                run_id: switchboard_core::ids::RunId::random(),
                attempt: 1,
                device: &d,
                module: spec,
                params: &params,
                cancel: Default::default(),
                deadline: tokio::time::Instant::now() + std::time::Duration::from_secs(5),
                captures: Default::default(),
            })
            .await
    }

    #[tokio::test]
    async fn every_device_module_answers_plausibly() {
        for m in catalog::builtin().iter().filter(|m| m.touches_device) {
            let params = match m.id {
                "airplane_mode" | "mobile_data" | "wifi" => json!({"enabled": true}),
                "send_sms" => json!({"to": "+33600000000", "body": "hello"}),
                "voice_call" => json!({"to": "+33600000000"}),
                _ => json!({}),
            };
            match run(m.id, params, json!({})).await.unwrap() {
                Verdict::Passed(r) => {
                    for f in m.result_fields {
                        assert!(r.get(*f).is_some(), "{} result lacks {f}: {r}", m.id);
                    }
                }
                v => panic!("{}: {v:?}", m.id),
            }
        }
        let Verdict::Passed(r) = run("ping", json!({"count": 3}), json!({})).await.unwrap() else { panic!() };
        assert_eq!((r["sent"].as_u64(), r["loss_pct"].as_f64()), (Some(3), Some(0.0)));
    }

    #[tokio::test]
    async fn rates_script_failures_and_errors() {
        assert!(matches!(run("ping", json!({}), json!({"sim": {"fail_rate": 1.0}})).await, Ok(Verdict::Failed(_))));
        assert!(matches!(
            run("device_info", json!({}), json!({"sim": {"error_rate": 1.0}})).await,
            Err(DriverError::Unreachable(_))
        ));
    }
}
