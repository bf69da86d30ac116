//! Bulkhead driven by real QMP clients nobody here wrote: Python's `qemu.qmp` (its async
//! `QMPClient`, including `send_fd_scm`, and its `qmp-shell` console script), run from the venv
//! `tests/python/setup.sh` makes (`target/pyenv`, or `$BULKHEAD_PYENV`).
//!
//! Each test runs one script of `tests/python/` against `qemu-system-x86_64 -M none` and
//! against `bulkhead -M none`. A script prints a normalised transcript, one `LABEL<TAB>JSON`
//! line per step (reply values or shapes, event names, error classes and texts); the two
//! transcripts must have the same steps and the same values, except for the differences listed
//! in [`ALLOWED`], each with its reason (and an allowed difference that went away is reported
//! too, so the list stays true). Checks on Bulkhead's own transcript make sure the steps really
//! happened (a STOP event was received, an fd set was created, ...).
//!
//! Neither QEMU nor the venv is optional: without them the tests fail and say how to get them.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::compare::{start_bulkhead, start_qemu};
use common::Scratch;

/// A script gets this long before it is killed.
const SCRIPT_LIMIT: Duration = Duration::from_secs(120);

/// A difference between QEMU's and Bulkhead's transcripts that is expected.
struct Allowed {
    script: &'static str,
    label: &'static str,
    qemu: &'static str,
    bulkhead: &'static str,
    why: &'static str,
}

const ALLOWED: &[Allowed] = &[Allowed {
    script: "qmp_client_transcript.py session",
    label: "greeting.capabilities",
    qemu: r#"["oob"]"#,
    bulkhead: "[]",
    why: "Bulkhead offers no out-of-band execution (docs/QMP.md)",
}];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The venv's interpreter; panics with the command that creates it when it is missing.
fn venv_python() -> PathBuf {
    let venv = std::env::var_os("BULKHEAD_PYENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target").join("pyenv"));
    let python = venv.join("bin").join("python");
    let ok = Command::new(&python)
        .args(["-c", "import qemu.qmp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import qemu.qmp: create the venv with `tests/python/setup.sh` (it needs \
         python3 with venv support, and PyPI once; like this test, it honours BULKHEAD_PYENV)",
        python.display()
    );
    python
}

/// Runs `tests/python/<script> <args>`; returns its stdout, or panics with its output when it
/// fails or takes longer than [`SCRIPT_LIMIT`].
fn run_script(script: &str, args: &[&str]) -> String {
    let path = repo_root().join("tests").join("python").join(script);
    let mut child = Command::new(venv_python())
        .arg("-B") // no __pycache__ in the source tree
        .arg(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", path.display()));
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        })
    };
    let out_reader = reader(Box::new(child.stdout.take().expect("stdout")));
    let err_reader = reader(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + SCRIPT_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the script") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            // Not joining the readers: a grandchild (qmp-shell) may still hold the pipes.
            panic!("{script} {args:?} did not finish in {SCRIPT_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    assert!(
        status.success(),
        "{script} {args:?} failed ({status}); stdout:\n{out}\nstderr:\n{err}"
    );
    out
}

/// `LABEL<TAB>JSON` lines.
fn parse_transcript(text: &str) -> Vec<(String, Value)> {
    text.lines()
        .map(|line| {
            let (label, json) = line
                .split_once('\t')
                .unwrap_or_else(|| panic!("not a transcript line: {line:?}\n{text}"));
            let v = serde_json::from_str(json)
                .unwrap_or_else(|e| panic!("bad JSON in {line:?}: {e}\n{text}"));
            (label.to_string(), v)
        })
        .collect()
}

/// Runs the script against QEMU and against Bulkhead; fails unless their transcripts agree
/// but for [`ALLOWED`]. Returns Bulkhead's transcript.
fn compare_with_qemu(tag: &str, script: &str, extra: &[&str]) -> Vec<(String, Value)> {
    let s = Scratch::new(tag);
    let (_qemu, qemu_sock) = start_qemu(&s, &[]);
    let (_bulkhead, bh_sock) = start_bulkhead(&s, &[]);
    let run = |sock: &str| {
        let mut args = vec![sock];
        args.extend_from_slice(extra);
        run_script(script, &args)
    };
    let theirs_raw = run(&qemu_sock);
    let ours_raw = run(&bh_sock);
    let theirs = parse_transcript(&theirs_raw);
    let ours = parse_transcript(&ours_raw);

    let key = format!("{script} {}", extra.join(" "))
        .trim_end()
        .to_string();
    let allowed: Vec<&Allowed> = ALLOWED.iter().filter(|a| a.script == key).collect();
    let mut problems = Vec::new();
    let labels = |t: &[(String, Value)]| t.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>();
    if labels(&theirs) != labels(&ours) {
        problems.push(format!(
            "different steps:\n  QEMU:     {:?}\n  Bulkhead: {:?}",
            labels(&theirs),
            labels(&ours)
        ));
    } else {
        for ((label, t), (_, o)) in theirs.iter().zip(&ours) {
            let allowance = allowed.iter().find(|a| a.label == label);
            match allowance {
                Some(a) => {
                    let want_t: Value = serde_json::from_str(a.qemu).expect("allowed JSON");
                    let want_o: Value = serde_json::from_str(a.bulkhead).expect("allowed JSON");
                    if (t, o) != (&want_t, &want_o) {
                        problems.push(format!(
                            "{label}: allowed difference ({}) is now QEMU {t} / Bulkhead {o}, \
                             expected QEMU {want_t} / Bulkhead {want_o}: update ALLOWED",
                            a.why
                        ));
                    }
                }
                None if t != o => {
                    problems.push(format!("{label}:\n  QEMU:     {t}\n  Bulkhead: {o}"))
                }
                None => {}
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{key}: Bulkhead differs from QEMU ({} problems):\n{}\n\nQEMU transcript:\n{theirs_raw}\
         \nBulkhead transcript:\n{ours_raw}",
        problems.len(),
        problems.join("\n")
    );
    ours
}

/// The value of step `label`.
fn step<'a>(t: &'a [(String, Value)], label: &str) -> &'a Value {
    &t.iter()
        .find(|(l, _)| l == label)
        .unwrap_or_else(|| panic!("no step {label} in {t:?}"))
        .1
}

#[test]
fn qmp_client_session_matches_qemu() {
    let t = compare_with_qemu("py-session", "qmp_client_transcript.py", &["session"]);
    assert_eq!(step(&t, "connected"), &json!("RUNNING"));
    assert_eq!(step(&t, "greeting.capabilities"), &json!([]));
    assert_eq!(step(&t, "stop.event")["event"], "STOP");
    assert_eq!(step(&t, "query-status.paused")["status"], "paused");
    assert_eq!(step(&t, "cont.event")["event"], "RESUME");
    assert_eq!(step(&t, "query-status.running")["status"], "running");
    assert_eq!(step(&t, "events.left"), &json!(true));
    for (label, class) in [
        ("error.unknown-command", "CommandNotFound"),
        ("error.negotiate-again", "CommandNotFound"),
        ("error.unexpected-argument", "GenericError"),
        ("error.missing-argument", "GenericError"),
        ("error.wrong-type", "GenericError"),
    ] {
        assert_eq!(step(&t, label)["error"]["class"], class, "{label}");
    }
    assert_eq!(step(&t, "disconnected"), &json!("IDLE"));
}

#[test]
fn qmp_client_fd_passing_matches_qemu() {
    let t = compare_with_qemu("py-fds", "qmp_client_transcript.py", &["fds"]);
    assert_eq!(step(&t, "getfd"), &json!({}));
    assert_eq!(step(&t, "closefd"), &json!({}));
    assert_eq!(step(&t, "closefd.again")["error"]["class"], "GenericError");
    assert_eq!(
        step(&t, "add-fd"),
        &json!({"fdset-id": 0, "fd": 0}),
        "add-fd's answer, numbers zeroed"
    );
    assert_eq!(step(&t, "add-fd.distinct-fds"), &json!(true));
    let sets = step(&t, "query-fdsets");
    assert_eq!(sets[0]["fds"].as_array().map(Vec::len), Some(2), "{sets}");
    assert_eq!(step(&t, "query-fdsets.empty"), &json!([]));
}

#[test]
fn qmp_shell_matches_qemu() {
    let t = compare_with_qemu("py-shell", "qmp_shell_transcript.py", &[]);
    let text = |label: &str| step(&t, label).to_string();
    assert!(text("banner").contains("Connected to QEMU N.N.N"), "{t:?}");
    assert_eq!(step(&t, "shell[1] stop"), &json!({"return": {}}));
    assert!(text("shell[2] ").contains("'event': 'STOP'"), "{t:?}");
    assert_eq!(
        step(&t, "shell[3] query-status")["return"]["status"],
        "paused"
    );
    assert_eq!(
        step(&t, "shell[4] no-such-command")["error"]["class"],
        "CommandNotFound"
    );
    assert!(text("shell[7] ").contains("'event': 'RESUME'"), "{t:?}");
    assert_eq!(step(&t, "exit"), &json!(0));
    assert_eq!(step(&t, "stderr"), &json!(""));
}
