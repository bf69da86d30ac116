//! Bulkhead against the real QEMU: the same QMP conversation with `qemu-system-x86_64 -M none`
//! and `bulkhead -M none`, compared line by line. Most replies must be byte-identical (after
//! masking timestamps); the few known differences are listed with the step that shows them.
//! QEMU must be installed: this test fails, it does not skip, when it is missing.

mod common;

use std::time::Duration;

use common::compare::*;
use common::*;

/// The conversation: (what, input, how to compare).
const STEPS: &[Step] = &[
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

#[test]
fn bulkhead_answers_like_qemu_7_2() {
    let s = Scratch::new("qemu");
    let (mut qemu, qemu_sock) = start_qemu(&s, &[]);
    let (mut bh, bh_sock) = start_bulkhead(&s, &[]);
    let mut q = Qmp::unix(&qemu_sock);
    let mut b = Qmp::unix(&bh_sock);

    // Greeting: same shape; QEMU offers 'oob', Bulkhead offers no capability.
    assert_eq!(
        shape(&q.greeting)["QMP"]["version"],
        shape(&b.greeting)["QMP"]["version"]
    );
    assert!(q.greeting_line.ends_with("\r\n") && b.greeting_line.ends_with("\r\n"));
    assert_eq!(b.greeting["QMP"]["capabilities"], serde_json::json!([]));

    let theirs = converse(&mut q, STEPS);
    let ours = converse(&mut b, STEPS);
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
    let failures = differences(STEPS, &theirs, &ours);
    assert!(
        failures.is_empty(),
        "differences from QEMU:\n{}",
        failures.join("\n")
    );
    assert!(bh.wait(Duration::from_secs(10)).success());
    let st = qemu.0.wait().expect("wait qemu");
    assert!(st.success());
}
