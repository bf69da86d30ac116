//! Comparing Bulkhead with the real QEMU: start `qemu-system-x86_64 -M none` next to
//! `bulkhead -M none`, run the same conversation on both and report every step whose answers
//! differ beyond what the step allows. QEMU must be installed: these helpers panic, they never
//! skip, when it is missing.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{wait_for_socket, Monitor, Qmp, Scratch};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Compare {
    /// Byte-identical lines (timestamps masked).
    Exact,
    /// Equal as JSON values (QEMU escapes non-ASCII, Bulkhead does not).
    Json,
    /// Same kinds of message, same error classes, same keys.
    Shape,
}

/// One step: (what, input, how to compare).
pub type Step = (&'static str, &'static str, Compare);

/// Masks the digits of timestamps.
pub fn mask(line: &str) -> String {
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

pub fn shape(v: &Value) -> Value {
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
pub fn converse(q: &mut Qmp, steps: &[Step]) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    for (what, input, _) in steps {
        // One write: the server may act on a complete object (`quit`) before a separate
        // newline write arrives, which would then fail with EPIPE.
        q.send_raw(&format!("{input}\n"));
        let mut lines = read_step(q, what);
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

/// Reads one step's answer: the events that come first, then the reply (raw lines).
pub fn read_step(q: &mut Qmp, what: &str) -> Vec<String> {
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
            return lines;
        }
    }
}

pub struct Killer(pub Child);

impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `qemu-system-x86_64 -M none` with a QMP socket `qemu.sock` in `s` (plus `extra`
/// arguments); returns it once the socket exists.
pub fn start_qemu(s: &Scratch, extra: &[&str]) -> (Killer, String) {
    let sock = s.s("qemu.sock");
    let mut args = vec![
        "-M".to_string(),
        "none".into(),
        "-qmp".into(),
        format!("unix:{sock},server=on,wait=off"),
        "-nographic".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let child = Command::new("qemu-system-x86_64")
        .args(&args)
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
    let k = Killer(child);
    wait_for_socket(&sock, Duration::from_secs(20));
    (k, sock)
}

/// Starts `bulkhead -M none` with a QMP socket `bh.sock` in `s` (plus `extra` arguments).
pub fn start_bulkhead(s: &Scratch, extra: &[&str]) -> (Monitor, String) {
    let sock = s.s("bh.sock");
    let qmp = format!("unix:{sock},server=on,wait=off");
    let mut args = vec!["-M", "none", "-qmp", &qmp, "-nographic"];
    args.extend_from_slice(extra);
    let m = Monitor::start(s, &args);
    wait_for_socket(&sock, Duration::from_secs(10));
    (m, sock)
}

/// Compares both sides' answers step by step; returns one description per differing step.
pub fn differences(steps: &[Step], theirs: &[Vec<String>], ours: &[Vec<String>]) -> Vec<String> {
    let mut failures = Vec::new();
    for (((what, input, how), t), o) in steps.iter().zip(theirs).zip(ours) {
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
    failures
}
