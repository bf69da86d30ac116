//! Bulkhead against the real QEMU: the same QMP conversation with `qemu-system-x86_64 -M none`
//! and `bulkhead -M none`, compared line by line. Most replies must be byte-identical (after
//! masking timestamps); the few known differences are listed with the step that shows them.
//! QEMU must be installed: this test fails, it does not skip, when it is missing.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Compare {
    /// Byte-identical lines (timestamps masked).
    Exact,
    /// Equal as JSON values (QEMU escapes non-ASCII, Bulkhead does not).
    Json,
    /// Same kinds of message, same error classes, same keys.
    Shape,
}

/// The conversation: (what, input, how to compare).
const STEPS: &[(&str, &str, Compare)] = &[
    (
        "command before negotiation",
        r#"{"execute": "query-status"}"#,
        Compare::Exact,
    ),
    (
        "unknown command before negotiation",
        r#"{"execute": "nope", "id": 1}"#,
        Compare::Exact,
    ),
    (
        "negotiation, id echoed",
        r#"{"execute": "qmp_capabilities", "id": [1, {"a": 2}]}"#,
        Compare::Exact,
    ),
    (
        "negotiation again",
        r#"{"execute": "qmp_capabilities"}"#,
        Compare::Exact,
    ),
    (
        "query-status",
        r#"{"execute": "query-status"}"#,
        Compare::Exact,
    ),
    ("stop", r#"{"execute": "stop"}"#, Compare::Exact),
    (
        "query-status when paused",
        r#"{"execute": "query-status"}"#,
        Compare::Exact,
    ),
    (
        "stop when paused",
        r#"{"execute": "stop", "id": "s2"}"#,
        Compare::Exact,
    ),
    ("cont", r#"{"execute": "cont", "id": 5}"#, Compare::Exact),
    (
        "cont when running",
        r#"{"execute": "cont"}"#,
        Compare::Exact,
    ),
    (
        "stop before reset",
        r#"{"execute": "stop"}"#,
        Compare::Exact,
    ),
    (
        "system_reset when paused",
        r#"{"execute": "system_reset"}"#,
        Compare::Exact,
    ),
    (
        "query-status after reset",
        r#"{"execute": "query-status"}"#,
        Compare::Exact,
    ),
    (
        "cont from prelaunch",
        r#"{"execute": "cont"}"#,
        Compare::Exact,
    ),
    (
        "system_reset when running",
        r#"{"execute": "system_reset"}"#,
        Compare::Exact,
    ),
    (
        "query-status running",
        r#"{"execute": "query-status"}"#,
        Compare::Exact,
    ),
    (
        "unknown command",
        r#"{"execute": "nope", "arguments": {"a": 1}, "id": "z"}"#,
        Compare::Exact,
    ),
    (
        "unexpected argument",
        r#"{"execute": "stop", "arguments": {"x": 1}}"#,
        Compare::Exact,
    ),
    (
        "unexpected argument of a query",
        r#"{"execute": "query-version", "arguments": {"a": 1}}"#,
        Compare::Exact,
    ),
    (
        "empty arguments",
        r#"{"execute": "query-status", "arguments": {}}"#,
        Compare::Exact,
    ),
    ("not an object: array", "[1]", Compare::Exact),
    ("not an object: string", r#""str""#, Compare::Exact),
    ("no execute", "{}", Compare::Exact),
    ("no execute, id echoed", r#"{"id": 3}"#, Compare::Exact),
    ("unexpected member", r#"{"foo": 1}"#, Compare::Exact),
    (
        "unexpected member with id",
        r#"{"execute": "stop", "id": 1, "control": {}}"#,
        Compare::Exact,
    ),
    ("execute not a string", r#"{"execute": 1}"#, Compare::Exact),
    (
        "arguments not an object",
        r#"{"execute": "stop", "arguments": []}"#,
        Compare::Exact,
    ),
    (
        "arguments null",
        r#"{"execute": "stop", "arguments": null}"#,
        Compare::Exact,
    ),
    (
        "exec-oob without oob",
        r#"{"exec-oob": "query-status"}"#,
        Compare::Exact,
    ),
    (
        "id null",
        r#"{"execute": "query-status", "id": null}"#,
        Compare::Exact,
    ),
    (
        "id float",
        r#"{"execute": "query-status", "id": 1.5}"#,
        Compare::Exact,
    ),
    (
        "id object",
        r#"{"execute": "query-status", "id": {"k": [true, false]}}"#,
        Compare::Exact,
    ),
    // QEMU writes non-ASCII as \u escapes; Bulkhead echoes the id as sent.
    (
        "id non-ASCII",
        r#"{"execute": "query-status", "id": "é"}"#,
        Compare::Json,
    ),
    // The parser's wording differs ("invalid keyword 'xx'" vs serde_json's message).
    ("not JSON", "xx", Compare::Shape),
    // Duplicate keys are refused by both; the wording differs.
    (
        "duplicate key",
        r#"{"execute": "query-status", "id": 1, "id": 2}"#,
        Compare::Shape,
    ),
    // Version numbers and package differ by design.
    (
        "query-version",
        r#"{"execute": "query-version"}"#,
        Compare::Shape,
    ),
    ("quit", r#"{"execute": "quit"}"#, Compare::Exact),
];

/// Masks the digits of timestamps.
fn mask(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(i) = rest
        .find("\"seconds\": ")
        .or_else(|| rest.find("\"microseconds\": "))
    {
        let key_end = i + rest[i..].find(": ").expect("colon") + 2;
        out.push_str(&rest[..key_end]);
        out.push('N');
        rest = rest[key_end..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let v = if k == "class" { v.clone() } else { shape(v) };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(shape).collect()),
        Value::String(_) => Value::String(String::new()),
        Value::Number(_) => Value::from(0),
        other => other.clone(),
    }
}

/// Runs the conversation; returns, per step, the lines received (events and reply).
fn converse(q: &mut Qmp) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    for (what, input, _) in STEPS {
        q.send_raw(input);
        q.send_raw("\n");
        let mut lines = Vec::new();
        loop {
            let line = q
                .read_line()
                .unwrap_or_else(|| panic!("{what}: connection closed before the reply"));
            let v: Value =
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: {line}: {e}"));
            let is_event = v.get("event").is_some();
            lines.push(line);
            if !is_event {
                break;
            }
        }
        if *what == "quit" {
            // The SHUTDOWN event may follow the reply: collect until EOF.
            while let Some(l) = q.read_line() {
                lines.push(l);
            }
        }
        all.push(lines);
    }
    all
}

struct Killer(Child);

impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn bulkhead_answers_like_qemu_7_2() {
    let s = Scratch::new("qemu");
    let qemu_sock = s.s("qemu.sock");
    let qemu = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "none",
            "-qmp",
            &format!("unix:{qemu_sock},server=on,wait=off"),
            "-nographic",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "qemu-system-x86_64 is required for this test and could not be started ({e}); \
                 install Debian's qemu-system-x86 package"
            )
        });
    let mut qemu = Killer(qemu);
    let bh_sock = s.s("bh.sock");
    let mut bh = Monitor::start(
        &s,
        &[
            "-M",
            "none",
            "-qmp",
            &format!("unix:{bh_sock},server=on,wait=off"),
            "-nographic",
        ],
    );
    wait_for_socket(&qemu_sock, Duration::from_secs(20));
    wait_for_socket(&bh_sock, Duration::from_secs(10));
    let mut q = Qmp::unix(&qemu_sock);
    let mut b = Qmp::unix(&bh_sock);

    // Greeting: same shape; QEMU offers 'oob', Bulkhead offers no capability.
    assert_eq!(
        shape(&q.greeting)["QMP"]["version"],
        shape(&b.greeting)["QMP"]["version"]
    );
    assert!(q.greeting_line.ends_with("\r\n") && b.greeting_line.ends_with("\r\n"));
    assert_eq!(b.greeting["QMP"]["capabilities"], serde_json::json!([]));

    let theirs = converse(&mut q);
    let ours = converse(&mut b);
    // Sanity: the conversation really ran (events seen, quit ended both).
    for side in [&theirs, &ours] {
        assert_eq!(side.len(), STEPS.len());
        assert!(
            side[5].iter().any(|l| l.contains("\"event\": \"STOP\"")),
            "{:?}",
            side[5]
        );
        assert!(side[STEPS.len() - 1]
            .iter()
            .any(|l| l.contains("host-qmp-quit")));
    }
    let mut failures = Vec::new();
    for (((what, input, how), t), o) in STEPS.iter().zip(&theirs).zip(&ours) {
        let tv: Vec<Value> = t
            .iter()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        let ov: Vec<Value> = o
            .iter()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        let same = match how {
            Compare::Exact => {
                let tm: Vec<String> = t.iter().map(|l| mask(l)).collect();
                let om: Vec<String> = o.iter().map(|l| mask(l)).collect();
                tm == om
            }
            Compare::Json => {
                let strip = |v: &Vec<Value>| -> Vec<Value> {
                    v.iter()
                        .map(|x| {
                            let mut x = x.clone();
                            if let Some(m) = x.as_object_mut() {
                                m.remove("timestamp");
                            }
                            x
                        })
                        .collect()
                };
                strip(&tv) == strip(&ov)
            }
            Compare::Shape => {
                tv.iter().map(shape).collect::<Vec<_>>() == ov.iter().map(shape).collect::<Vec<_>>()
            }
        };
        if !same {
            failures.push(format!(
                "step '{what}' ({input}), compared {how:?}:\n  QEMU:     {t:?}\n  Bulkhead: {o:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "differences from QEMU:\n{}",
        failures.join("\n")
    );
    assert!(bh.wait(Duration::from_secs(10)).success());
    let st = qemu.0.wait().expect("wait qemu");
    assert!(st.success());
}
