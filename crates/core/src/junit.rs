//! Reports for CI: a run as a JUnit XML document, and the exit code a `--wait` CLI
//! gives for it. Both are pure: `repo::reports` gathers a run's steps, children and
//! attempts into a `Suite`, `render` writes it, `exit_code` judges the outcomes.
//!
//! The form follows what CI servers parse (`docs/reports.md`): one `testsuite` per run
//! inside `testsuites`; a `testcase` per step (a module run is one step) or per
//! campaign item; `failure` for a failed verdict, `error` for an infrastructure error
//! or a timeout, `skipped` for what never ran; a pass after errored attempts carries
//! them as Surefire's `flakyError` children, which Jenkins shows as flaky.

use std::fmt::Write;

use chrono::{DateTime, Utc};

use crate::model::{RunStatus, StepStatus};

/// How a test case ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// It passed.
    Passed,
    /// A verdict failed: the module reached the device and the check said no.
    Failed {
        /// Why, in a line.
        message: String,
        /// The module's result, as JSON text.
        detail: String,
    },
    /// An infrastructure error or a timeout: the test could not reach a verdict.
    Error {
        /// The error kind (`timeout`, `device_unreachable`, …).
        kind: String,
        /// Said for people.
        message: String,
    },
    /// It never ran (cancelled, or held back by an earlier failure).
    Skipped {
        /// Why.
        message: String,
    },
}

impl Outcome {
    /// A step's outcome from its status, result and error.
    pub fn of_step(status: StepStatus, result: Option<&serde_json::Value>, error: Option<(&str, &str)>) -> Outcome {
        let error_of = |fallback: &str| Outcome::Error {
            kind: error.map_or(fallback, |e| e.0).to_string(),
            message: error.map_or(fallback, |e| e.1).to_string(),
        };
        match status {
            StepStatus::Passed => Outcome::Passed,
            StepStatus::Failed => Outcome::Failed {
                message: result
                    .and_then(|r| r.get("reason").and_then(|v| v.as_str()))
                    .unwrap_or("the module's verdict failed")
                    .to_string(),
                detail: result.map(|r| r.to_string()).unwrap_or_default(),
            },
            StepStatus::Errored => error_of("infrastructure_error"),
            StepStatus::TimedOut => Outcome::Error {
                kind: "timeout".into(),
                message: error.map_or("the step ran out of time", |e| e.1).to_string(),
            },
            StepStatus::Cancelled => Outcome::Skipped { message: "cancelled".into() },
            StepStatus::Skipped => Outcome::Skipped { message: "never ran: an earlier step ended the run".into() },
            StepStatus::Pending | StepStatus::Running => Outcome::Skipped { message: "not finished".into() },
        }
    }

    /// A whole run's outcome from its status (a campaign item).
    pub fn of_run(status: RunStatus, result: Option<&serde_json::Value>, error: Option<(&str, &str)>) -> Outcome {
        match status {
            RunStatus::Succeeded => Outcome::Passed,
            RunStatus::Failed => Outcome::of_step(StepStatus::Failed, result, error),
            RunStatus::Errored => Outcome::of_step(StepStatus::Errored, result, error),
            RunStatus::TimedOut => Outcome::of_step(StepStatus::TimedOut, result, error),
            RunStatus::Cancelled => Outcome::Skipped { message: error.map_or("cancelled", |e| e.1).to_string() },
            RunStatus::Queued | RunStatus::Running => Outcome::Skipped { message: "not finished".into() },
        }
    }
}

/// An earlier attempt that ended in an infrastructure error.
#[derive(Debug, Clone, PartialEq)]
pub struct ErroredAttempt {
    /// The error kind.
    pub kind: String,
    /// Said for people.
    pub message: String,
}

/// One test case.
#[derive(Debug, Clone)]
pub struct Case {
    /// `classname`: the device and the run's target (`SERIAL.workflow`), which GitLab
    /// shows as the suite.
    pub classname: String,
    /// `name`: the module (with its step index in a workflow).
    pub name: String,
    /// Its duration (seconds).
    pub time_s: f64,
    /// How it ended.
    pub outcome: Outcome,
    /// Earlier attempts that errored (shown as flaky when it finally passed).
    pub errored_attempts: Vec<ErroredAttempt>,
    /// Captured log excerpt.
    pub system_out: Option<String>,
}

/// One run as a suite.
#[derive(Debug, Clone)]
pub struct Suite {
    /// The run's target, by name.
    pub name: String,
    /// The run id.
    pub id: String,
    /// When it started (or was created).
    pub timestamp: DateTime<Utc>,
    /// Its duration (seconds).
    pub time_s: f64,
    /// `properties`: device model, build, run URL, …
    pub properties: Vec<(String, String)>,
    /// Its cases.
    pub cases: Vec<Case>,
}

/// The document for `suite`.
pub fn render(suite: &Suite) -> String {
    let count = |f: fn(&Outcome) -> bool| suite.cases.iter().filter(|c| f(&c.outcome)).count();
    let failures = count(|o| matches!(o, Outcome::Failed { .. }));
    let errors = count(|o| matches!(o, Outcome::Error { .. }));
    let skipped = count(|o| matches!(o, Outcome::Skipped { .. }));
    let totals = format!(
        r#"tests="{}" failures="{failures}" errors="{errors}" skipped="{skipped}" time="{:.3}""#,
        suite.cases.len(),
        suite.time_s
    );
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(out, r#"<testsuites name="switchboard" {totals}>"#);
    let _ = writeln!(
        out,
        r#"  <testsuite name="{}" id="{}" timestamp="{}" {totals}>"#,
        attr(&suite.name),
        attr(&suite.id),
        suite.timestamp.format("%Y-%m-%dT%H:%M:%S")
    );
    out.push_str("    <properties>\n");
    for (name, value) in &suite.properties {
        let _ = writeln!(out, r#"      <property name="{}" value="{}"/>"#, attr(name), attr(value));
    }
    out.push_str("    </properties>\n");
    for case in &suite.cases {
        write_case(&mut out, case);
    }
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

fn write_case(out: &mut String, c: &Case) {
    let _ = write!(
        out,
        r#"    <testcase classname="{}" name="{}" time="{:.3}""#,
        attr(&c.classname),
        attr(&c.name),
        c.time_s
    );
    let flaky = matches!(c.outcome, Outcome::Passed) && !c.errored_attempts.is_empty();
    if matches!(c.outcome, Outcome::Passed) && !flaky && c.system_out.is_none() {
        out.push_str("/>\n");
        return;
    }
    out.push_str(">\n");
    match &c.outcome {
        Outcome::Passed => {}
        Outcome::Failed { message, detail } => {
            let _ =
                writeln!(out, r#"      <failure message="{}" type="failed">{}</failure>"#, attr(message), text(detail));
        }
        Outcome::Error { kind, message } => {
            let _ = writeln!(
                out,
                r#"      <error message="{}" type="{}">{}</error>"#,
                attr(message),
                attr(kind),
                text(message)
            );
        }
        Outcome::Skipped { message } => {
            let _ = writeln!(out, r#"      <skipped message="{}"/>"#, attr(message));
        }
    }
    if flaky {
        for a in &c.errored_attempts {
            let _ = writeln!(
                out,
                r#"      <flakyError message="{}" type="{}"><stackTrace>{}</stackTrace></flakyError>"#,
                attr(&a.message),
                attr(&a.kind),
                text(&a.message)
            );
        }
    }
    if let Some(log) = &c.system_out {
        let _ = writeln!(out, "      <system-out>{}</system-out>", text(log));
    }
    out.push_str("    </testcase>\n");
}

/// Text safe inside an element: markup escaped, and characters XML 1.0 cannot carry
/// (most control characters, as a device log may hold) replaced.
fn text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\t' | '\n' | '\r' => out.push(ch),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// Text safe inside a double-quoted attribute (line breaks kept as references).
fn attr(s: &str) -> String {
    text(s).replace('"', "&quot;").replace('\n', "&#10;").replace('\r', "&#13;").replace('\t', "&#9;")
}

/// What `switchboard run --wait` exits with, from the outcomes of a run's parts (its
/// own status for a module or workflow run; its children's for a campaign), in
/// gcloud's codes: 10 if any verdict failed, else 20 if any infrastructure error, else
/// 15 if any timed out, else 19 if any was cancelled, else 0.
pub fn exit_code(statuses: &[RunStatus]) -> i32 {
    let any = |s: RunStatus| statuses.contains(&s);
    if any(RunStatus::Failed) {
        10
    } else if any(RunStatus::Errored) {
        20
    } else if any(RunStatus::TimedOut) {
        15
    } else if any(RunStatus::Cancelled) {
        19
    } else {
        0
    }
}

/// Exit codes of `switchboard run`, besides the outcomes'.
pub mod exit {
    /// Every part passed.
    pub const PASSED: i32 = 0;
    /// A request the API refused (4xx), or a name that matches nothing.
    pub const REFUSED: i32 = 3;
    /// The API could not be reached or failed (5xx).
    pub const UNREACHABLE: i32 = 4;
    /// The report could not be written.
    pub const REPORT: i32 = 5;
    /// `--timeout` ran out before the run ended (the run goes on).
    pub const WAIT_TIMED_OUT: i32 = 15;
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunStatus::*;

    #[test]
    fn mixed_outcomes_take_gclouds_precedence() {
        let cases: &[(&[RunStatus], i32)] = &[
            (&[Succeeded], 0),
            (&[], 0),
            (&[Failed], 10),
            (&[Errored], 20),
            (&[TimedOut], 15),
            (&[Cancelled], 19),
            (&[Succeeded, Errored, Failed], 10),
            (&[Errored, TimedOut, Cancelled], 20),
            (&[TimedOut, Cancelled, Succeeded], 15),
            (&[Cancelled, Succeeded], 19),
        ];
        for (statuses, want) in cases {
            assert_eq!(exit_code(statuses), *want, "{statuses:?}");
        }
    }

    #[test]
    fn steps_map_to_junit_outcomes() {
        let r = serde_json::json!({"reason": "no answer from 1.1.1.1"});
        assert!(matches!(Outcome::of_step(StepStatus::Passed, None, None), Outcome::Passed));
        assert_eq!(
            Outcome::of_step(StepStatus::Failed, Some(&r), None),
            Outcome::Failed { message: "no answer from 1.1.1.1".into(), detail: r.to_string() }
        );
        assert_eq!(
            Outcome::of_step(StepStatus::Errored, None, Some(("device_unreachable", "adb: device offline"))),
            Outcome::Error { kind: "device_unreachable".into(), message: "adb: device offline".into() }
        );
        assert!(
            matches!(Outcome::of_step(StepStatus::TimedOut, None, None), Outcome::Error { kind, .. } if kind == "timeout")
        );
        for s in [StepStatus::Skipped, StepStatus::Cancelled, StepStatus::Pending] {
            assert!(matches!(Outcome::of_step(s, None, None), Outcome::Skipped { .. }), "{s:?}");
        }
    }

    #[test]
    fn markup_and_control_characters_are_escaped() {
        assert_eq!(text("a<b & c>d\u{1}e\n"), "a&lt;b &amp; c&gt;d\u{FFFD}e\n");
        assert_eq!(attr("say \"hi\"\nnow"), "say &quot;hi&quot;&#10;now");
    }

    #[test]
    fn a_pass_after_errored_attempts_is_flaky_and_counts_hold() {
        let case = |outcome, errored: Vec<ErroredAttempt>| Case {
            classname: "SER.wf".into(),
            name: "ping".into(),
            time_s: 1.5,
            outcome,
            errored_attempts: errored,
            system_out: None,
        };
        let lost = ErroredAttempt { kind: "device_unreachable".into(), message: "lost <adb>".into() };
        let suite = Suite {
            name: "wf".into(),
            id: "r1".into(),
            timestamp: DateTime::from_timestamp(0, 0).unwrap(),
            time_s: 3.0,
            properties: vec![("device_model".into(), "Pixel 8".into())],
            cases: vec![
                case(Outcome::Passed, vec![lost]),
                case(Outcome::Failed { message: "no".into(), detail: "{}".into() }, vec![]),
                case(Outcome::Skipped { message: "never ran".into() }, vec![]),
            ],
        };
        let xml = render(&suite);
        assert!(xml.contains(r#"tests="3" failures="1" errors="0" skipped="1""#), "{xml}");
        assert!(xml.contains(r#"<flakyError message="lost &lt;adb&gt;" type="device_unreachable">"#), "{xml}");
        assert!(xml.contains(r#"<property name="device_model" value="Pixel 8"/>"#));
    }
}
