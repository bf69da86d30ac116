//! fd passing through the real `bulkhead`: `SCM_RIGHTS` over real unix sockets, `getfd` /
//! `closefd`, `add-fd` / `remove-fd` / `query-fdsets`, `-add-fd`, `/dev/fdset/N` as `-kernel`,
//! `-initrd` and `-serial file:` (with the fake worker), and a 10,000-cycle leak check of the
//! monitor's fd table.

mod common;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

fn none_with_qmp(s: &Scratch, extra: &[&str]) -> (Monitor, String) {
    let sock = s.s("qmp.sock");
    let spec = format!("unix:{sock},server=on,wait=off");
    let mut args = vec!["-M", "none", "-qmp", spec.as_str(), "-nographic"];
    args.extend_from_slice(extra);
    let m = Monitor::start(s, &args);
    wait_for_socket(&sock, T);
    (m, sock)
}

fn session(sock: &str) -> Qmp {
    let mut q = Qmp::unix(sock);
    q.negotiate();
    q
}

/// A file named `name` in the scratch dir with `content`, opened read-only.
fn file(s: &Scratch, name: &str, content: &str) -> File {
    std::fs::write(s.path(name), content).expect("write");
    File::open(s.path(name)).expect("open")
}

fn file_rw(s: &Scratch, name: &str) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(s.path(name))
        .expect("open rw")
}

/// The monitor's fds that point at `path`.
fn fds_on(m: &Monitor, path: &std::path::Path) -> Vec<i32> {
    let p = path.to_str().expect("utf8");
    m.fds()
        .into_iter()
        .filter(|(_, t)| t == p)
        .map(|(fd, _)| fd)
        .collect()
}

/// Waits until the monitor's fd table equals `want` (closing after a disconnect is async).
fn wait_fds(m: &Monitor, want: &BTreeMap<i32, String>) {
    let deadline = Instant::now() + T;
    loop {
        let now = m.fds();
        if &now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "fd table never returned to {want:?}; now {now:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ok() -> Value {
    json!({"return": {}})
}

fn err(desc: &str) -> Value {
    json!({"error": {"class": "GenericError", "desc": desc}})
}

const GETFD_A: &str = r#"{"execute": "getfd", "arguments": {"fdname": "a"}}"#;
const CLOSEFD_A: &str = r#"{"execute": "closefd", "arguments": {"fdname": "a"}}"#;

#[test]
fn getfd_naming_rules_and_reuse_closes_the_old_fd() {
    let s = Scratch::new("getfd");
    let (m, sock) = none_with_qmp(&s, &[]);
    let mut q = session(&sock);
    let before = m.fds();
    let one = file(&s, "one", "1");
    let two = file(&s, "two", "2");

    // A name starting with a digit is refused and the fd closed.
    let r = q.cmd_with_fds(
        r#"{"execute": "getfd", "arguments": {"fdname": "7up"}}"#,
        &[one.as_raw_fd()],
        FdsOn::Command,
    );
    assert_eq!(
        r,
        err("Parameter 'fdname' expects a name not starting with a digit")
    );
    assert_eq!(m.fds(), before);
    // QEMU accepts every other name, the empty one included.
    for name in ["", " x", "-1", "é", "a"] {
        let cmd = json!({"execute": "getfd", "arguments": {"fdname": name}}).to_string();
        assert_eq!(
            q.cmd_with_fds(&cmd, &[one.as_raw_fd()], FdsOn::Command),
            ok(),
            "{name:?}"
        );
    }
    assert_eq!(fds_on(&m, &s.path("one")).len(), 5);
    // Re-using a name closes the fd it named.
    let a_before = m.fds();
    assert_eq!(
        q.cmd_with_fds(GETFD_A, &[two.as_raw_fd()], FdsOn::Command),
        ok()
    );
    assert_eq!(fds_on(&m, &s.path("one")).len(), 4);
    assert_eq!(fds_on(&m, &s.path("two")).len(), 1);
    assert_eq!(m.fds().len(), a_before.len());
    // closefd closes; a second closefd and an unknown name are errors.
    assert_eq!(q.raw(CLOSEFD_A), ok());
    assert!(fds_on(&m, &s.path("two")).is_empty());
    assert_eq!(q.raw(CLOSEFD_A), err("File descriptor named 'a' not found"));
    assert_eq!(
        q.raw(r#"{"execute": "closefd", "arguments": {"fdname": "nope"}}"#),
        err("File descriptor named 'nope' not found")
    );
    for name in ["", " x", "-1", "é"] {
        let cmd = json!({"execute": "closefd", "arguments": {"fdname": name}}).to_string();
        assert_eq!(q.raw(&cmd), ok(), "{name:?}");
    }
    assert_eq!(m.fds(), before);
    // Argument errors as QEMU's.
    assert_eq!(
        q.raw(r#"{"execute": "closefd"}"#),
        err("Parameter 'fdname' is missing")
    );
    assert_eq!(
        q.cmd_with_fds(
            r#"{"execute": "getfd", "arguments": {"fdname": 1}}"#,
            &[one.as_raw_fd()],
            FdsOn::Command
        ),
        err("Invalid parameter type for 'fdname', expected: string")
    );
    assert_eq!(m.fds(), before, "fds with a refused command are closed");
}

#[test]
fn named_fds_belong_to_their_session_and_close_with_it() {
    let s = Scratch::new("getfd-session");
    let (m, sock) = none_with_qmp(&s, &[]);
    let mut other = session(&sock);
    let idle = m.fds();
    let mut q = session(&sock);
    let f = file(&s, "f", "f");
    assert_eq!(
        q.cmd_with_fds(GETFD_A, &[f.as_raw_fd()], FdsOn::Command),
        ok()
    );
    assert_eq!(
        other.raw(CLOSEFD_A),
        err("File descriptor named 'a' not found")
    );
    assert_eq!(fds_on(&m, &s.path("f")).len(), 1);
    drop(q);
    wait_fds(&m, &idle);
}

#[test]
fn getfd_and_add_fd_without_an_fd_and_over_tcp() {
    let s = Scratch::new("nofd");
    let port = free_tcp_port();
    let tcp = format!("tcp:127.0.0.1:{port},server=on,wait=off");
    let (_m, sock) = none_with_qmp(&s, &["-qmp", &tcp]);
    let mut u = session(&sock);
    let none = err("No file descriptor supplied via SCM_RIGHTS");
    assert_eq!(u.raw(GETFD_A), none);
    assert_eq!(u.raw(r#"{"execute": "add-fd"}"#), none);
    // The missing fd is reported before a bad name or set id, as QEMU does.
    assert_eq!(
        u.raw(r#"{"execute": "getfd", "arguments": {"fdname": "1"}}"#),
        none
    );
    assert_eq!(
        u.raw(r#"{"execute": "add-fd", "arguments": {"fdset-id": -1}}"#),
        none
    );
    let mut t = Qmp::tcp(port);
    t.negotiate();
    assert_eq!(t.raw(GETFD_A), none);
    assert_eq!(
        t.raw(r#"{"execute": "add-fd", "arguments": {"fdset-id": 1}}"#),
        none
    );
    assert_eq!(t.cmd("query-fdsets"), json!({"return": []}));
}

#[test]
fn fds_on_a_lone_whitespace_byte_reach_the_next_command() {
    let s = Scratch::new("lone");
    let (m, sock) = none_with_qmp(&s, &[]);
    let mut q = session(&sock);
    let f = file(&s, "f", "f");
    assert_eq!(
        q.cmd_with_fds(GETFD_A, &[f.as_raw_fd()], FdsOn::LoneSpace),
        ok()
    );
    assert_eq!(fds_on(&m, &s.path("f")).len(), 1);
    let r = q.cmd_with_fds(
        r#"{"execute": "add-fd", "arguments": {"fdset-id": 2}}"#,
        &[f.as_raw_fd()],
        FdsOn::LoneSpace,
    );
    let fd = r["return"]["fd"].as_i64().expect("fd");
    assert_eq!(r, json!({"return": {"fd": fd, "fdset-id": 2}}));
    assert_eq!(m.fds().get(&(fd as i32)), Some(&s.s("f")));
    // The fds of a lone space are the next command's only: unclaimed, they are closed.
    let before = m.fds();
    assert_eq!(
        q.cmd_with_fds(
            r#"{"execute": "query-status"}"#,
            &[f.as_raw_fd()],
            FdsOn::LoneSpace
        )["return"]["status"],
        "running"
    );
    assert_eq!(
        q.raw(r#"{"execute": "getfd", "arguments": {"fdname": "b"}}"#),
        err("No file descriptor supplied via SCM_RIGHTS")
    );
    assert_eq!(m.fds(), before);
}

#[test]
fn unclaimed_fds_are_closed() {
    let s = Scratch::new("unclaimed");
    let (m, sock) = none_with_qmp(&s, &[]);
    let mut q = session(&sock);
    let before = m.fds();
    let f = file(&s, "f", "f");
    let fd = f.as_raw_fd();
    // With a command that takes none.
    let r = q.cmd_with_fds(
        r#"{"execute": "query-status"}"#,
        &[fd, fd, fd],
        FdsOn::Command,
    );
    assert!(r.get("return").is_some(), "{r}");
    assert_eq!(m.fds(), before);
    // With an unknown command, a bad request, bad JSON.
    for text in [
        r#"{"execute": "nope"}"#,
        r#"{"exec": 1}"#,
        r#"{"execute": }"#,
    ] {
        let r = q.cmd_with_fds(text, &[fd], FdsOn::Command);
        assert!(r.get("error").is_some(), "{text}: {r}");
        assert_eq!(m.fds(), before, "{text}");
    }
    // getfd with three fds keeps the first only.
    let g = file(&s, "g", "g");
    assert_eq!(
        q.cmd_with_fds(GETFD_A, &[g.as_raw_fd(), fd, fd], FdsOn::Command),
        ok()
    );
    assert_eq!(fds_on(&m, &s.path("g")).len(), 1);
    assert!(fds_on(&m, &s.path("f")).is_empty());
    assert_eq!(q.raw(CLOSEFD_A), ok());
    assert_eq!(m.fds(), before);
    // Fds sent ahead of a command that never comes: closed when the session ends.
    q.send_with_fds("", &[fd, fd], FdsOn::LoneSpace);
    let deadline = Instant::now() + T;
    while fds_on(&m, &s.path("f")).len() < 2 {
        assert!(Instant::now() < deadline, "the fds never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(q);
    let deadline = Instant::now() + T;
    while !fds_on(&m, &s.path("f")).is_empty() {
        assert!(
            Instant::now() < deadline,
            "fds of a closed session stay open"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn fd_sets_are_shared_by_all_sessions() {
    let s = Scratch::new("shared");
    let port = free_tcp_port();
    let tcp = format!("tcp:127.0.0.1:{port},server=on,wait=off");
    let (m, sock) = none_with_qmp(&s, &["-qmp", &tcp]);
    let mut a = session(&sock);
    let mut t = Qmp::tcp(port);
    t.negotiate();
    let f = file(&s, "f", "f");
    let r = a.cmd_with_fds(
        r#"{"execute": "add-fd", "arguments": {"opaque": "from a"}}"#,
        &[f.as_raw_fd()],
        FdsOn::Command,
    );
    let fd = r["return"]["fd"].as_i64().expect("fd");
    assert_eq!(r, json!({"return": {"fd": fd, "fdset-id": 0}}));
    assert_eq!(
        t.cmd("query-fdsets"),
        json!({"return": [{"fds": [{"fd": fd, "opaque": "from a"}], "fdset-id": 0}]})
    );
    // A set outlives the session that filled it.
    drop(a);
    let mut b = session(&sock);
    assert_eq!(
        b.cmd("query-fdsets")["return"][0]["fds"][0]["fd"],
        json!(fd)
    );
    let rm = format!(r#"{{"execute": "remove-fd", "arguments": {{"fdset-id": 0, "fd": {fd}}}}}"#);
    assert_eq!(t.raw(&rm), ok());
    assert_eq!(b.cmd("query-fdsets"), json!({"return": []}));
    assert!(fds_on(&m, &s.path("f")).is_empty());
    assert!(!m.fds().contains_key(&(fd as i32)));
}

#[test]
fn query_fdsets_shape_opaque_and_id_choice() {
    let s = Scratch::new("ids");
    let (_m, sock) = none_with_qmp(&s, &[]);
    let mut q = session(&sock);
    let f = file(&s, "f", "f");
    let mut add = |args: &str| -> (i64, i64) {
        let text = format!(r#"{{"execute": "add-fd", "arguments": {args}}}"#);
        let r = q.cmd_with_fds(&text, &[f.as_raw_fd()], FdsOn::Command);
        let line = q.lines.last().expect("line").clone();
        let fd = r["return"]["fd"]
            .as_i64()
            .unwrap_or_else(|| panic!("{args}: {r}"));
        let set = r["return"]["fdset-id"].as_i64().expect("set");
        // QEMU's member order.
        assert_eq!(
            line,
            format!("{{\"return\": {{\"fd\": {fd}, \"fdset-id\": {set}}}}}\r\n")
        );
        (set, fd)
    };
    let (s0, a) = add("{}");
    let (s5, b) = add(r#"{"fdset-id": 5, "opaque": "rdwr:/x"}"#);
    let (s5b, c) = add(r#"{"fdset-id": 5}"#);
    let (s1, d) = add(r#"{"opaque": ""}"#);
    let (s2, e) = add(r#"{"fdset-id": 9223372036854775807}"#);
    assert_eq!((s0, s5, s5b, s1, s2), (0, 5, 5, 1, i64::MAX));
    let r = q.cmd("query-fdsets");
    assert_eq!(
        r,
        json!({"return": [
            {"fds": [{"fd": e}], "fdset-id": i64::MAX},
            {"fds": [{"fd": b, "opaque": "rdwr:/x"}, {"fd": c}], "fdset-id": 5},
            {"fds": [{"fd": d, "opaque": ""}], "fdset-id": 1},
            {"fds": [{"fd": a}], "fdset-id": 0},
        ]})
    );
    assert_eq!(
        q.lines.last().expect("line"),
        &format!(
            "{{\"return\": [{{\"fds\": [{{\"fd\": {e}}}], \"fdset-id\": 9223372036854775807}}, \
             {{\"fds\": [{{\"fd\": {b}, \"opaque\": \"rdwr:/x\"}}, {{\"fd\": {c}}}], \"fdset-id\": 5}}, \
             {{\"fds\": [{{\"fd\": {d}, \"opaque\": \"\"}}], \"fdset-id\": 1}}, \
             {{\"fds\": [{{\"fd\": {a}}}], \"fdset-id\": 0}}]}}\r\n"
        )
    );
    // Bad ids.
    for (args, desc) in [
        (
            r#"{"fdset-id": -1}"#,
            "Parameter 'fdset-id' expects a non-negative value",
        ),
        (
            r#"{"fdset-id": "1"}"#,
            "Invalid parameter type for 'fdset-id', expected: integer",
        ),
        (
            r#"{"fdset-id": 18446744073709551615}"#,
            "Invalid parameter type for 'fdset-id', expected: integer",
        ),
        (
            r#"{"fdset-id": 1.5}"#,
            "Invalid parameter type for 'fdset-id', expected: integer",
        ),
        (
            r#"{"opaque": 1}"#,
            "Invalid parameter type for 'opaque', expected: string",
        ),
        (r#"{"fd": 1}"#, "Parameter 'fd' is unexpected"),
    ] {
        let text = format!(r#"{{"execute": "add-fd", "arguments": {args}}}"#);
        assert_eq!(
            q.cmd_with_fds(&text, &[f.as_raw_fd()], FdsOn::Command),
            err(desc),
            "{args}"
        );
    }
    // After removing set 0 its id is the lowest free one again; set 2 is next after that.
    assert_eq!(
        q.raw(r#"{"execute": "remove-fd", "arguments": {"fdset-id": 0}}"#),
        ok()
    );
    let add2 = |q: &mut Qmp| {
        q.cmd_with_fds(r#"{"execute": "add-fd"}"#, &[f.as_raw_fd()], FdsOn::Command)["return"]
            ["fdset-id"]
            .clone()
    };
    assert_eq!(add2(&mut q), json!(0));
    assert_eq!(add2(&mut q), json!(2));
}

#[test]
fn remove_fd_rules() {
    let s = Scratch::new("remove");
    let (m, sock) = none_with_qmp(&s, &[]);
    let mut q = session(&sock);
    let before = m.fds();
    let f = file(&s, "f", "f");
    let add = |q: &mut Qmp, set: i64| {
        let text = format!(r#"{{"execute": "add-fd", "arguments": {{"fdset-id": {set}}}}}"#);
        q.cmd_with_fds(&text, &[f.as_raw_fd()], FdsOn::Command)["return"]["fd"]
            .as_i64()
            .expect("fd")
    };
    let a = add(&mut q, 3);
    let b = add(&mut q, 3);
    let rm = |set: i64, fd: Option<i64>| match fd {
        Some(fd) => {
            format!(r#"{{"execute": "remove-fd", "arguments": {{"fdset-id": {set}, "fd": {fd}}}}}"#)
        }
        None => format!(r#"{{"execute": "remove-fd", "arguments": {{"fdset-id": {set}}}}}"#),
    };
    assert_eq!(
        q.raw(&rm(9, None)),
        err("File descriptor named 'fdset-id:9' not found")
    );
    assert_eq!(
        q.raw(&rm(9, Some(a))),
        err(&format!(
            "File descriptor named 'fdset-id:9, fd:{a}' not found"
        ))
    );
    assert_eq!(
        q.raw(&rm(3, Some(999))),
        err("File descriptor named 'fdset-id:3, fd:999' not found")
    );
    assert_eq!(
        q.raw(&rm(-5, None)),
        err("File descriptor named 'fdset-id:-5' not found")
    );
    assert_eq!(
        q.raw(r#"{"execute": "remove-fd"}"#),
        err("Parameter 'fdset-id' is missing")
    );
    assert_eq!(
        q.raw(r#"{"execute": "remove-fd", "arguments": {"fdset-id": 3, "fd": "1"}}"#),
        err("Invalid parameter type for 'fd', expected: integer")
    );
    // One fd: closed at once, the set stays with the other.
    assert_eq!(q.raw(&rm(3, Some(a))), ok());
    assert!(!m.fds().contains_key(&(a as i32)));
    assert_eq!(
        q.cmd("query-fdsets"),
        json!({"return": [{"fds": [{"fd": b}], "fdset-id": 3}]})
    );
    assert_eq!(
        q.raw(&rm(3, Some(a))),
        err(&format!(
            "File descriptor named 'fdset-id:3, fd:{a}' not found"
        ))
    );
    // The last fd: the set (with no dup open) goes.
    assert_eq!(q.raw(&rm(3, Some(b))), ok());
    assert_eq!(q.cmd("query-fdsets"), json!({"return": []}));
    assert_eq!(
        q.raw(&rm(3, None)),
        err("File descriptor named 'fdset-id:3' not found")
    );
    // Without fd: all of them.
    add(&mut q, 4);
    add(&mut q, 4);
    assert_eq!(q.raw(&rm(4, None)), ok());
    assert_eq!(q.cmd("query-fdsets"), json!({"return": []}));
    assert_eq!(m.fds(), before);
}

#[test]
fn add_fd_command_line_errors() {
    let s = Scratch::new("addfd-cli");
    let f = file(&s, "f", "f");
    let run = |spec: &str, inherit: &[(RawFd, RawFd)]| -> String {
        let m = Monitor::start_with_fds(&s, &["-M", "none", "-add-fd", spec], inherit);
        let mut m = m;
        let status = m.wait(T);
        assert_eq!(status.code(), Some(1), "{spec}: {}", m.stderr());
        m.stderr().lines().next().unwrap_or_default().to_string()
    };
    let fd = f.as_raw_fd();
    for (spec, inherit, want) in [
        ("fd=1,set=1", vec![], "-add-fd fd=1,set=1: fd cannot be a standard I/O stream"),
        ("fd=-1,set=1", vec![], "-add-fd fd=-1,set=1: fd option is required and must be non-negative"),
        ("set=1", vec![], "-add-fd set=1: fd option is required and must be non-negative"),
        ("", vec![], "-add-fd : fd option is required and must be non-negative"),
        ("fd=2147483650,set=1", vec![], "-add-fd fd=2147483650,set=1: fd option is required and must be non-negative"),
        ("fd=50,set=1", vec![], "-add-fd fd=50,set=1: fd is not valid or already in use"),
        ("fd=50", vec![(fd, 50)], "-add-fd fd=50: set option is required and must be non-negative"),
        ("fd=50,set=-2", vec![(fd, 50)], "-add-fd fd=50,set=-2: set option is required and must be non-negative"),
        ("fd=abc,set=1", vec![], "-add-fd fd=abc,set=1: Parameter 'fd' expects a number"),
        ("fd=50,set=abc", vec![], "-add-fd fd=50,set=abc: Parameter 'set' expects a number"),
        ("fd=50,set=1,foo=bar", vec![], "-add-fd fd=50,set=1,foo=bar: Invalid parameter 'foo'"),
        ("fd=50,set=99999999999999999999", vec![], "-add-fd fd=50,set=99999999999999999999: Value '99999999999999999999' is too large for parameter 'set'"),
    ] {
        assert_eq!(run(spec, &inherit), format!("bulkhead: {want}"), "{spec}");
    }
}

#[test]
fn add_fd_on_the_command_line_fills_sets() {
    let s = Scratch::new("addfd");
    let sock = s.s("qmp.sock");
    let spec = format!("unix:{sock},server=on,wait=off");
    let ro = file(&s, "ro", "ro");
    let rw = file_rw(&s, "rw");
    let m = Monitor::start_with_fds(
        &s,
        &[
            "-M",
            "none",
            "-qmp",
            &spec,
            "-add-fd",
            "fd=40,set=2,opaque=read-only",
            "-add-fd",
            "fd=41,set=2",
            "-add-fd",
            "fd=0x28,set=7,opaque=a,,b",
        ],
        &[(ro.as_raw_fd(), 40), (rw.as_raw_fd(), 41)],
    );
    wait_for_socket(&sock, T);
    let mut q = session(&sock);
    let r = q.cmd("query-fdsets");
    let fdnum = |set: usize, i: usize| r["return"][set]["fds"][i]["fd"].as_i64().expect("fd");
    assert_eq!(
        r,
        json!({"return": [
            {"fds": [{"fd": fdnum(0, 0), "opaque": "a,b"}], "fdset-id": 7},
            {"fds": [{"fd": fdnum(1, 0), "opaque": "read-only"}, {"fd": fdnum(1, 1)}], "fdset-id": 2},
        ]})
    );
    // The inherited originals are closed; the sets hold close-on-exec duplicates.
    let fds = m.fds();
    assert!(!fds.contains_key(&40) && !fds.contains_key(&41), "{fds:?}");
    assert_eq!(fds_on(&m, &s.path("ro")).len(), 2);
    assert_eq!(fds_on(&m, &s.path("rw")).len(), 1);
    let pid = m.child.id();
    let flags =
        std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fdnum(1, 1))).expect("fdinfo");
    let flags = flags
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .expect("flags")
        .trim();
    let flags = u32::from_str_radix(flags, 8).expect("octal");
    assert_ne!(flags & libc::O_CLOEXEC as u32, 0, "close-on-exec");
    assert_eq!(flags & libc::O_ACCMODE as u32, libc::O_RDWR as u32);
}

// ---- with the fake worker ----

fn worker_log(s: &Scratch) -> String {
    std::fs::read_to_string(s.path("files.log")).unwrap_or_default()
}

fn wait_log(s: &Scratch, text: &str, count: usize) -> String {
    let deadline = Instant::now() + T;
    loop {
        let log = worker_log(s);
        if log.matches(text).count() >= count {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "worker log never had {count} × {text:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn dev_fdset_as_kernel_initrd_and_serial_file_reaches_the_worker() {
    let s = Scratch::new("fdset-guest");
    let sock = s.s("qmp.sock");
    let spec = format!("unix:{sock},server=on,wait=off");
    let wd = fake_worker_dir(&s);
    let append = format!(
        "fake.files={} fake.serial-hello fake.exit-after=400",
        s.s("files.log")
    );
    // The kernel set holds a write-only fd too: the read-only one must be picked. The files
    // are removed from the directory: only the passed fds reach them.
    let kernel_ro = file(&s, "kernel", "\x7fELF kernel through an fd set");
    let kernel_wo = OpenOptions::new()
        .write(true)
        .open(s.path("kernel"))
        .expect("wo");
    let initrd = file(&s, "initrd", "initrd through an fd set");
    std::fs::write(s.path("serial"), "old serial content, to be truncated").expect("write");
    let serial = OpenOptions::new()
        .write(true)
        .open(s.path("serial"))
        .expect("serial");
    let serial_ro = File::open(s.path("serial")).expect("serial ro");
    std::fs::remove_file(s.path("kernel")).expect("rm");
    std::fs::remove_file(s.path("initrd")).expect("rm");
    let m = Monitor::start_with_fds(
        &s,
        &[
            "-kernel",
            "/dev/fdset/3",
            "-initrd",
            "/dev/fdset/4",
            "-serial",
            "file:/dev/fdset/5",
            "-add-fd",
            "fd=40,set=3,opaque=kernel",
            "-add-fd",
            "fd=41,set=3,opaque=kernel-wo",
            "-add-fd",
            "fd=42,set=4",
            "-add-fd",
            "fd=43,set=5",
            "-add-fd",
            "fd=44,set=5,opaque=serial-ro",
            "-S",
            "-m",
            "64M",
            "--worker-dir",
            &wd,
            "-append",
            &append,
            "-qmp",
            &spec,
        ],
        &[
            (kernel_ro.as_raw_fd(), 40),
            (kernel_wo.as_raw_fd(), 41),
            (initrd.as_raw_fd(), 42),
            (serial.as_raw_fd(), 43),
            (serial_ro.as_raw_fd(), 44),
        ],
    );
    drop((kernel_ro, kernel_wo, initrd, serial, serial_ro));
    wait_for_socket(&sock, T);
    let mut q = session(&sock);
    let log = wait_log(&s, "kernel: ", 1);
    assert!(
        log.contains("kernel: \x7fELF kernel through an fd set"),
        "{log}"
    );
    assert!(log.contains("initrd: initrd through an fd set"), "{log}");
    // The serial file was truncated through the set's write-only fd.
    assert_eq!(std::fs::read_to_string(s.path("serial")).expect("read"), "");
    // Remove every fd of the kernel's set: its fds close, but the monitor's duplicate keeps the
    // set alive (empty) and the kernel available for a new worker.
    assert_eq!(
        q.raw(r#"{"execute": "remove-fd", "arguments": {"fdset-id": 3}}"#),
        ok()
    );
    let sets = q.cmd("query-fdsets")["return"].clone();
    let set3 = sets
        .as_array()
        .expect("list")
        .iter()
        .find(|s| s["fdset-id"] == 3)
        .unwrap_or_else(|| panic!("set 3 is gone: {sets}"))
        .clone();
    assert_eq!(set3["fds"], json!([]));
    // add-fd without an id does not take 3 (nor 4, 5); add-fd to 3 refills it.
    let f = file(&s, "more", "more");
    let r = q.cmd_with_fds(r#"{"execute": "add-fd"}"#, &[f.as_raw_fd()], FdsOn::Command);
    assert_eq!(r["return"]["fdset-id"], 0);
    // The guest writes to the serial file; then the worker exits (fake.exit-after) and
    // system_reset starts a new one from the monitor's duplicate of the kernel.
    assert_eq!(q.cmd("cont"), ok());
    let deadline = Instant::now() + T;
    while std::fs::read_to_string(s.path("serial")).expect("read") != "fake-guest: hello\n" {
        assert!(
            Instant::now() < deadline,
            "serial: {:?}",
            std::fs::read_to_string(s.path("serial"))
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    q.event("STOP");
    assert_eq!(q.status(), "internal-error");
    assert_eq!(q.cmd("system_reset"), ok());
    let log = wait_log(&s, "kernel: \x7fELF kernel through an fd set", 2);
    assert_eq!(
        log.matches("initrd: initrd through an fd set").count(),
        2,
        "{log}"
    );
    drop(m);
}

#[test]
fn dev_fdset_without_a_matching_access_mode_is_refused() {
    let s = Scratch::new("fdset-access");
    let wd = fake_worker_dir(&s);
    std::fs::write(s.path("kernel"), "kernel").expect("write");
    let wo = OpenOptions::new()
        .write(true)
        .open(s.path("kernel"))
        .expect("wo");
    let mut m = Monitor::start_with_fds(
        &s,
        &[
            "-kernel",
            "/dev/fdset/1",
            "-add-fd",
            "fd=40,set=1",
            "--worker-dir",
            &wd,
        ],
        &[(wo.as_raw_fd(), 40)],
    );
    assert_eq!(m.wait(T).code(), Some(1));
    assert_eq!(
        m.stderr().lines().last().unwrap_or_default(),
        "bulkhead: could not open kernel '/dev/fdset/1': fd set 1 holds no file descriptor \
         opened read-only"
    );
    let mut m = Monitor::start(&s, &["-kernel", "/dev/fdset/2", "--worker-dir", &wd]);
    assert_eq!(m.wait(T).code(), Some(1));
    assert_eq!(
        m.stderr().lines().last().unwrap_or_default(),
        "bulkhead: could not open kernel '/dev/fdset/2': fd set 2 does not exist"
    );
    let mut m = Monitor::start(&s, &["-kernel", "/dev/fdset/x", "--worker-dir", &wd]);
    assert_eq!(m.wait(T).code(), Some(1));
    assert_eq!(
        m.stderr().lines().last().unwrap_or_default(),
        "bulkhead: could not open kernel '/dev/fdset/x': Could not parse fdset /dev/fdset/x"
    );
}

// ---- nothing leaks ----

#[test]
fn ten_thousand_cycles_leave_the_fd_table_as_it_was() {
    const CYCLES: usize = 10_000;
    const BATCH: usize = 50;
    let s = Scratch::new("leak");
    let (m, sock) = none_with_qmp(&s, &[]);
    let mut q = session(&sock);
    let f = file(&s, "f", "f");
    let fd = f.as_raw_fd();
    let before = m.fds();
    let started = Instant::now();
    let getfd = r#"{"execute": "getfd", "arguments": {"fdname": "cycle"}}"#;
    let closefd = r#"{"execute": "closefd", "arguments": {"fdname": "cycle"}}"#;
    let add = r#"{"execute": "add-fd", "arguments": {"fdset-id": 7, "opaque": "cycle"}}"#;
    let remove = r#"{"execute": "remove-fd", "arguments": {"fdset-id": 7}}"#;
    let mut done = 0;
    while done < CYCLES {
        // Pipelined: a batch of cycles in flight, each command with its own sendmsg.
        for _ in 0..BATCH {
            q.send_with_fds(getfd, &[fd], FdsOn::Command);
            q.send_raw(&format!("{closefd}\n"));
            q.send_with_fds(add, &[fd], FdsOn::Command);
            q.send_raw(&format!("{remove}\n"));
        }
        for i in 0..BATCH {
            let replies = [q.reply(), q.reply(), q.reply(), q.reply()];
            let cycle = done + i;
            assert_eq!(replies[0], ok(), "cycle {cycle} getfd");
            assert_eq!(replies[1], ok(), "cycle {cycle} closefd");
            assert_eq!(
                replies[2]["return"]["fdset-id"], 7,
                "cycle {cycle} add-fd: {}",
                replies[2]
            );
            assert_eq!(replies[3], ok(), "cycle {cycle} remove-fd");
        }
        done += BATCH;
    }
    assert_eq!(m.fds(), before);
    assert_eq!(q.cmd("query-fdsets"), json!({"return": []}));
    assert_eq!(
        q.raw(closefd),
        err("File descriptor named 'cycle' not found")
    );
    eprintln!(
        "{CYCLES} cycles (4 commands each) in {:?}",
        started.elapsed()
    );
}

#[test]
fn at_most_sixteen_fds_per_message_the_rest_closed() {
    let s = Scratch::new("many");
    let (m, sock) = none_with_qmp(&s, &[]);
    let mut q = session(&sock);
    let before = m.fds();
    let f = file(&s, "f", "f");
    // 16 fds: one named, fifteen closed.
    let sixteen = vec![f.as_raw_fd(); 16];
    assert_eq!(q.cmd_with_fds(GETFD_A, &sixteen, FdsOn::Command), ok());
    assert_eq!(fds_on(&m, &s.path("f")).len(), 1);
    assert_eq!(q.raw(CLOSEFD_A), ok());
    // 40 fds: the kernel truncates the message to 16 and closes the rest; nothing leaks and the
    // command still gets its fd.
    let forty = vec![f.as_raw_fd(); 40];
    assert_eq!(q.cmd_with_fds(GETFD_A, &forty, FdsOn::Command), ok());
    assert_eq!(fds_on(&m, &s.path("f")).len(), 1);
    assert_eq!(q.raw(CLOSEFD_A), ok());
    assert_eq!(m.fds(), before);
}
