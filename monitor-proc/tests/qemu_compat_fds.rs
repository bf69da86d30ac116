//! fd passing, Bulkhead against the real QEMU: the same getfd / closefd / add-fd / remove-fd /
//! query-fdsets conversation, with real fds passed by `SCM_RIGHTS`, on
//! `qemu-system-x86_64 -M none` and `bulkhead -M none`, compared line by line; then `-add-fd`
//! on both command lines (the sets it fills, and its error messages). fd numbers are per
//! process, so each side's numbers are masked in the order they first appear (`$F0`, `$F1`,
//! ...) and commands that name one are written with the side's own number. Known differences
//! are asserted as such, not hidden. QEMU must be installed: these tests fail, never skip,
//! when it is missing.

mod common;

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use common::compare::*;
use common::*;
use serde_json::Value;

/// What a step sends along with its command.
#[derive(Clone, Copy, Debug)]
enum Fds {
    /// Nothing.
    No,
    /// The read-only file, in the command's own `sendmsg`.
    Ro,
    /// The read-write file.
    Rw,
    /// Both, in one `sendmsg` (the first is used, the second closed).
    Two,
    /// The read-only file on a lone space ahead of the command.
    RoLone,
}

/// (what, input with `$Fn` for the side's n-th fd number, fds, how to compare).
type FdStep = (&'static str, &'static str, Fds, Compare);

const STEPS: &[FdStep] = &[
    (
        "negotiation",
        r#"{"execute": "qmp_capabilities"}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "getfd without an fd",
        r#"{"execute": "getfd", "arguments": {"fdname": "a"}}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "getfd, name starting with a digit",
        r#"{"execute": "getfd", "arguments": {"fdname": "1a"}}"#,
        Fds::Ro,
        Compare::Exact,
    ),
    (
        "getfd",
        r#"{"execute": "getfd", "arguments": {"fdname": "a"}, "id": 1}"#,
        Fds::Ro,
        Compare::Exact,
    ),
    (
        "getfd, name reused",
        r#"{"execute": "getfd", "arguments": {"fdname": "a"}}"#,
        Fds::Rw,
        Compare::Exact,
    ),
    (
        "getfd, empty name, two fds",
        r#"{"execute": "getfd", "arguments": {"fdname": ""}}"#,
        Fds::Two,
        Compare::Exact,
    ),
    (
        "getfd, fd on a lone space",
        r#"{"execute": "getfd", "arguments": {"fdname": "-c"}}"#,
        Fds::RoLone,
        Compare::Exact,
    ),
    (
        "closefd",
        r#"{"execute": "closefd", "arguments": {"fdname": "a"}}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "closefd again",
        r#"{"execute": "closefd", "arguments": {"fdname": "a"}}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "closefd, empty name",
        r#"{"execute": "closefd", "arguments": {"fdname": ""}}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "closefd, lone-space name",
        r#"{"execute": "closefd", "arguments": {"fdname": "-c"}}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "closefd without a name",
        r#"{"execute": "closefd"}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        // No fd here: QEMU would keep one for the next command (see the known difference).
        "getfd, name of the wrong type",
        r#"{"execute": "getfd", "arguments": {"fdname": 1}}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "add-fd without an fd",
        r#"{"execute": "add-fd"}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "add-fd, new set",
        r#"{"execute": "add-fd"}"#,
        Fds::Ro,
        Compare::Exact,
    ),
    (
        "add-fd, set 5 with opaque",
        r#"{"execute": "add-fd", "arguments": {"fdset-id": 5, "opaque": "rdwr:/x"}}"#,
        Fds::Rw,
        Compare::Exact,
    ),
    (
        "add-fd, set 5 again",
        r#"{"execute": "add-fd", "arguments": {"fdset-id": 5}, "id": "x"}"#,
        Fds::Ro,
        Compare::Exact,
    ),
    (
        "add-fd, lowest free id",
        r#"{"execute": "add-fd", "arguments": {"opaque": ""}}"#,
        Fds::Ro,
        Compare::Exact,
    ),
    (
        "add-fd, negative id",
        r#"{"execute": "add-fd", "arguments": {"fdset-id": -1}}"#,
        Fds::Ro,
        Compare::Exact,
    ),
    (
        "add-fd, id of the wrong type",
        r#"{"execute": "add-fd", "arguments": {"fdset-id": "1"}}"#,
        Fds::Ro,
        Compare::Exact,
    ),
    (
        "add-fd, id beyond int64",
        r#"{"execute": "add-fd", "arguments": {"fdset-id": 18446744073709551615}}"#,
        Fds::Ro,
        Compare::Exact,
    ),
    (
        "add-fd, id int64 max, fd on a lone space",
        r#"{"execute": "add-fd", "arguments": {"fdset-id": 9223372036854775807}}"#,
        Fds::RoLone,
        Compare::Exact,
    ),
    (
        "query-fdsets",
        r#"{"execute": "query-fdsets"}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "remove-fd, fd of another set",
        r#"{"execute": "remove-fd", "arguments": {"fdset-id": 5, "fd": $F0}}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "remove-fd, unknown fd",
        r#"{"execute": "remove-fd", "arguments": {"fdset-id": 5, "fd": 999999}}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "remove-fd, unknown set",
        r#"{"execute": "remove-fd", "arguments": {"fdset-id": 77}}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "remove-fd, negative set",
        r#"{"execute": "remove-fd", "arguments": {"fdset-id": -5, "fd": 3}}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "remove-fd without a set",
        r#"{"execute": "remove-fd"}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "remove-fd, fd of the wrong type",
        r#"{"execute": "remove-fd", "arguments": {"fdset-id": 5, "fd": "3"}}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "remove-fd, one fd",
        r#"{"execute": "remove-fd", "arguments": {"fdset-id": 5, "fd": $F1}}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "query-fdsets after removing one fd",
        r#"{"execute": "query-fdsets"}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "remove-fd, the same fd again",
        r#"{"execute": "remove-fd", "arguments": {"fdset-id": 5, "fd": $F1}}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "remove-fd, whole set 0",
        r#"{"execute": "remove-fd", "arguments": {"fdset-id": 0}}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "add-fd reuses id 0",
        r#"{"execute": "add-fd"}"#,
        Fds::Rw,
        Compare::Exact,
    ),
    (
        "remove-fd, whole set 5",
        r#"{"execute": "remove-fd", "arguments": {"fdset-id": 5}}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "query-fdsets at the end",
        r#"{"execute": "query-fdsets"}"#,
        Fds::No,
        Compare::Exact,
    ),
    (
        "an fd with a command that takes none",
        r#"{"execute": "query-status"}"#,
        Fds::Ro,
        Compare::Exact,
    ),
];

/// Replaces fd numbers in `"fd": N` and `fd:N'` by `"$Fk"` and `$Fk`, where k is the token `seen` gives
/// N (the latest, since numbers are reused once closed). With `fresh`, every `"fd": N` is a new
/// fd (an `add-fd` reply) and gets a new token; otherwise numbers without a token stay as they
/// are (say, a number the command made up).
fn mask_fds(line: &str, seen: &mut Vec<String>, fresh: bool) -> String {
    let mut out = String::new();
    let mut rest = line;
    loop {
        let next = ["\"fd\": ", "fd:"]
            .iter()
            .filter_map(|p| rest.find(p).map(|i| (i, *p)))
            .min();
        let Some((i, pat)) = next else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..i + pat.len()]);
        rest = &rest[i + pat.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if digits.is_empty() {
            continue;
        }
        let token = if fresh && pat.starts_with('"') {
            seen.push(digits.clone());
            Some(seen.len() - 1)
        } else {
            seen.iter().rposition(|d| *d == digits)
        };
        // Inside a JSON value the token is a string, so the line stays JSON.
        match (token, pat.starts_with('"')) {
            (Some(k), true) => out.push_str(&format!("\"$F{k}\"")),
            (Some(k), false) => out.push_str(&format!("$F{k}")),
            (None, _) => out.push_str(&digits),
        }
        rest = &rest[digits.len()..];
    }
}

fn fill(template: &str, seen: &[String]) -> String {
    let mut s = template.to_string();
    for (k, n) in seen.iter().enumerate().rev() {
        s = s.replace(&format!("$F{k}"), n);
    }
    s
}

/// Runs the conversation; returns, per step, the masked lines received.
fn run(q: &mut Qmp, ro: &File, rw: &File) -> Vec<Vec<String>> {
    let mut seen = Vec::new();
    let mut all = Vec::new();
    for (what, template, fds, _) in STEPS {
        let text = fill(template, &seen);
        assert!(!text.contains("$F"), "{what}: no fd number yet for {text}");
        match fds {
            Fds::No => q.send_raw(&format!("{text}\n")),
            Fds::Ro => q.send_with_fds(&text, &[ro.as_raw_fd()], FdsOn::Command),
            Fds::Rw => q.send_with_fds(&text, &[rw.as_raw_fd()], FdsOn::Command),
            Fds::Two => q.send_with_fds(&text, &[ro.as_raw_fd(), rw.as_raw_fd()], FdsOn::Command),
            Fds::RoLone => q.send_with_fds(&text, &[ro.as_raw_fd()], FdsOn::LoneSpace),
        }
        let lines = read_step(q, what)
            .into_iter()
            .map(|line| {
                let v: Value = serde_json::from_str(&line).expect("json");
                let fresh = text.contains("add-fd") && v.get("return").is_some();
                mask_fds(&line, &mut seen, fresh)
            })
            .collect();
        all.push(lines);
    }
    all
}

fn files(s: &Scratch) -> (File, File) {
    std::fs::write(s.path("data"), "data").expect("write");
    let ro = File::open(s.path("data")).expect("ro");
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(s.path("data"))
        .expect("rw");
    (ro, rw)
}

#[test]
fn fd_commands_answer_like_qemu_7_2() {
    let s = Scratch::new("qemu-fds");
    let (ro, rw) = files(&s);
    let (_qemu, qemu_sock) = start_qemu(&s, &[]);
    let (_bh, bh_sock) = start_bulkhead(&s, &[]);
    let mut q = Qmp::unix(&qemu_sock);
    let mut b = Qmp::unix(&bh_sock);
    let theirs = run(&mut q, &ro, &rw);
    let ours = run(&mut b, &ro, &rw);
    if std::env::var_os("SHOW_TRANSCRIPT").is_some() {
        for ((step, t), o) in STEPS.iter().zip(&theirs).zip(&ours) {
            eprintln!("{}\n  QEMU:     {t:?}\n  Bulkhead: {o:?}", step.0);
        }
    }
    // Sanity: the fds really went through (add-fd answered with a number on both sides).
    for side in [&theirs, &ours] {
        assert_eq!(
            side[14],
            vec!["{\"return\": {\"fd\": \"$F0\", \"fdset-id\": 0}}\r\n"]
        );
    }
    let steps: Vec<Step> = STEPS.iter().map(|(w, i, _, c)| (*w, *i, *c)).collect();
    let failures = differences(&steps, &theirs, &ours);
    assert!(
        failures.is_empty(),
        "differences from QEMU:\n{}",
        failures.join("\n")
    );

    // The known difference: QEMU 7.2 keeps fds that came with a command that did not take them
    // until a later command does (or newer fds arrive); Bulkhead closes them once that command
    // has run. So a getfd without fds after the last step above succeeds on QEMU only.
    let getfd = r#"{"execute": "getfd", "arguments": {"fdname": "late"}}"#;
    assert_eq!(q.raw(getfd), serde_json::json!({"return": {}}));
    assert_eq!(
        b.raw(getfd),
        serde_json::json!({"error": {"class": "GenericError",
            "desc": "No file descriptor supplied via SCM_RIGHTS"}})
    );
}

/// Starts `program args` with `(fd, target)` inherited, its stderr captured; waits for its
/// exit if `wait`.
fn spawn_with_fds(program: &str, args: &[&str], fds: &[(RawFd, RawFd)]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let fds = fds.to_vec();
    // SAFETY: the closure runs in the forked child before exec and only calls dup2, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            for &(fd, target) in &fds {
                if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

#[test]
fn add_fd_on_the_command_line_like_qemu_7_2() {
    let s = Scratch::new("qemu-addfd");
    let (ro, rw) = files(&s);
    let inherit = [(ro.as_raw_fd(), 40), (rw.as_raw_fd(), 41)];
    let add = [
        "-add-fd",
        "fd=40,set=2,opaque=read-only",
        "-add-fd",
        "fd=41,set=2",
        "-add-fd",
        "fd=0x28,set=7,opaque=a,,b",
        "-add-fd",
        "fd=41,set=0",
    ];
    let qemu_sock = s.s("qemu.sock");
    let bh_sock = s.s("bh.sock");
    let q_qmp = format!("unix:{qemu_sock},server=on,wait=off");
    let b_qmp = format!("unix:{bh_sock},server=on,wait=off");
    let mut q_args = vec!["-M", "none", "-display", "none", "-qmp", &q_qmp];
    q_args.extend_from_slice(&add);
    let mut b_args = vec!["-M", "none", "-qmp", &b_qmp];
    b_args.extend_from_slice(&add);
    let qemu = spawn_with_fds("qemu-system-x86_64", &q_args, &inherit)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("qemu-system-x86_64 is required for this test and could not be started ({e})")
        });
    let _qemu = Killer(qemu);
    let bh = spawn_with_fds(BULKHEAD, &b_args, &inherit)
        .spawn()
        .expect("bulkhead");
    let _bh = Killer(bh);
    // No probing connection: QEMU 7.2 empties the sets when a QMP client disconnects (below).
    // Qmp::unix retries until the socket is there.
    let answer = |c: &mut Qmp| {
        c.cmd("query-fdsets");
        let line = c.lines.last().expect("reply").clone();
        mask_fds(&line, &mut Vec::new(), true)
    };
    let mut qc = Qmp::unix(&qemu_sock);
    qc.negotiate();
    let mut bc = Qmp::unix(&bh_sock);
    bc.negotiate();
    let theirs = answer(&mut qc);
    assert_eq!(
        theirs,
        "{\"return\": [{\"fds\": [{\"fd\": \"$F0\", \"opaque\": \"a,b\"}], \"fdset-id\": 7}, \
         {\"fds\": [{\"fd\": \"$F1\", \"opaque\": \"read-only\"}, {\"fd\": \"$F2\"}], \"fdset-id\": 2}, \
         {\"fds\": [{\"fd\": \"$F3\"}], \"fdset-id\": 0}]}\r\n"
    );
    assert_eq!(answer(&mut bc), theirs);

    // The known difference: when a QMP client disconnects from a running QEMU 7.2, every fd of
    // a set without an open duplicate is closed (mon_refcount == 0 in monitor_fdset_cleanup).
    // QEMU 9.1 stopped doing that; Bulkhead follows 9.1 and keeps the sets.
    drop(qc);
    drop(bc);
    let mut qc = Qmp::unix(&qemu_sock);
    qc.negotiate();
    let mut bc = Qmp::unix(&bh_sock);
    bc.negotiate();
    assert_eq!(answer(&mut qc), "{\"return\": []}\r\n");
    assert_eq!(answer(&mut bc), theirs);
}

#[test]
fn add_fd_errors_read_like_qemu_7_2() {
    let s = Scratch::new("qemu-addfd-err");
    let (ro, _rw) = files(&s);
    let fd = ro.as_raw_fd();
    let cases: &[(&str, &[(RawFd, RawFd)])] = &[
        ("fd=1,set=1", &[]),
        ("fd=-1,set=1", &[]),
        ("set=1", &[]),
        ("", &[]),
        ("fd=2147483650,set=1", &[]),
        ("fd=50,set=1", &[]),
        ("fd=50", &[(fd, 50)]),
        ("fd=50,set=-2", &[(fd, 50)]),
        ("fd=abc,set=1", &[]),
        ("fd=50,set=abc", &[]),
        ("fd=50,set=1k", &[]),
        ("fd=,set=1", &[]),
        ("fd=50,set=1,foo=bar", &[]),
        ("fd=50,set=99999999999999999999", &[]),
        ("fd=50,fd=51,set=1", &[(fd, 50)]),
    ];
    for (spec, inherit) in cases {
        let first_error = |program: &str, extra: &[&str]| -> (Option<i32>, String) {
            let mut args = vec!["-M", "none"];
            args.extend_from_slice(extra);
            args.extend_from_slice(&["-add-fd", spec]);
            let out = spawn_with_fds(program, &args, inherit)
                .output()
                .unwrap_or_else(|e| panic!("{program} could not be started: {e}"));
            let text = String::from_utf8_lossy(&out.stderr).into_owned();
            let line = text.lines().next().unwrap_or_default().to_string();
            (out.status.code(), line)
        };
        let (qcode, qline) = first_error("qemu-system-x86_64", &["-display", "none"]);
        let (bcode, bline) = first_error(BULKHEAD, &[]);
        assert_eq!(
            (qcode, bcode),
            (Some(1), Some(1)),
            "{spec}: {qline} / {bline}"
        );
        let qmsg = qline
            .strip_prefix("qemu-system-x86_64: ")
            .unwrap_or_else(|| panic!("QEMU said {qline:?}"));
        let bmsg = bline
            .strip_prefix("bulkhead: ")
            .unwrap_or_else(|| panic!("bulkhead said {bline:?}"));
        assert_eq!(bmsg, qmsg, "-add-fd {spec}");
    }
}

#[test]
fn remove_fd_while_not_running_differs_from_qemu_7_2_as_documented() {
    let s = Scratch::new("qemu-fds-paused");
    let (ro, _rw) = files(&s);
    let (_qemu, qemu_sock) = start_qemu(&s, &["-S"]);
    let (_bh, bh_sock) = start_bulkhead(&s, &["-S"]);
    let mut answers = Vec::new();
    for sock in [&qemu_sock, &bh_sock] {
        let mut c = Qmp::unix(sock);
        c.negotiate();
        assert_eq!(c.status(), "prelaunch");
        let add = r#"{"execute": "add-fd", "arguments": {"fdset-id": 1}}"#;
        let r = c.cmd_with_fds(add, &[ro.as_raw_fd()], FdsOn::Command);
        assert_eq!(r["return"]["fdset-id"], 1, "{r}");
        let rm = r#"{"execute": "remove-fd", "arguments": {"fdset-id": 1}}"#;
        assert_eq!(c.raw(rm), serde_json::json!({"return": {}}));
        c.cmd("query-fdsets");
        let line = c.lines.last().expect("reply").clone();
        answers.push(mask_fds(&line, &mut Vec::new(), true));
    }
    // QEMU 7.2 closes removed fds only while the VM runs (runstate_is_running() in
    // monitor_fdset_cleanup), so in prelaunch the fd stays listed and open; QEMU 9.1 and
    // Bulkhead close it at once.
    assert_eq!(
        answers[0],
        "{\"return\": [{\"fds\": [{\"fd\": \"$F0\"}], \"fdset-id\": 1}]}\r\n"
    );
    assert_eq!(answers[1], "{\"return\": []}\r\n");
}

#[test]
fn named_fds_across_reconnection_differ_from_qemu_7_2_as_documented() {
    let s = Scratch::new("qemu-fds-reconnect");
    let (ro, _rw) = files(&s);
    let (_qemu, qemu_sock) = start_qemu(&s, &[]);
    let (_bh, bh_sock) = start_bulkhead(&s, &[]);
    let mut answers = Vec::new();
    for sock in [&qemu_sock, &bh_sock] {
        let mut c = Qmp::unix(sock);
        c.negotiate();
        let getfd = r#"{"execute": "getfd", "arguments": {"fdname": "keep"}}"#;
        let r = c.cmd_with_fds(getfd, &[ro.as_raw_fd()], FdsOn::Command);
        assert_eq!(r, serde_json::json!({"return": {}}));
        drop(c);
        let mut c = Qmp::unix(sock);
        c.negotiate();
        answers.push(c.raw(r#"{"execute": "closefd", "arguments": {"fdname": "keep"}}"#));
    }
    // A QEMU monitor is one chardev: its named fds survive the client's reconnection.
    // Bulkhead's names belong to a session and are closed with it.
    assert_eq!(answers[0], serde_json::json!({"return": {}}));
    assert_eq!(
        answers[1],
        serde_json::json!({"error": {"class": "GenericError",
            "desc": "File descriptor named 'keep' not found"}})
    );
}

#[test]
fn add_fd_number_beyond_int_differs_from_qemu_7_2_as_documented() {
    let s = Scratch::new("qemu-addfd-int");
    let (ro, _rw) = files(&s);
    // 2^32 + 45: QEMU truncates it to int 45 and takes the inherited fd 45.
    let spec = "fd=4294967341,set=1";
    let inherit = [(ro.as_raw_fd(), 45)];
    let sock = s.s("qemu.sock");
    let qmp = format!("unix:{sock},server=on,wait=off");
    let qemu = spawn_with_fds(
        "qemu-system-x86_64",
        &[
            "-M", "none", "-display", "none", "-qmp", &qmp, "-add-fd", spec,
        ],
        &inherit,
    )
    .spawn()
    .unwrap_or_else(|e| {
        panic!("qemu-system-x86_64 is required for this test and could not be started ({e})")
    });
    let _qemu = Killer(qemu);
    let mut c = Qmp::unix(&sock);
    c.negotiate();
    assert_eq!(c.cmd("query-fdsets")["return"][0]["fdset-id"], 1);
    let out = spawn_with_fds(BULKHEAD, &["-M", "none", "-add-fd", spec], &inherit)
        .output()
        .expect("bulkhead");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().next(),
        Some(
            "bulkhead: -add-fd fd=4294967341,set=1: fd option is required and must be non-negative"
        )
    );
}
