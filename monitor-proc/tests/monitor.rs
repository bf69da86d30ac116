//! Integration tests of the real `bulkhead` binary: `-M none` and with the fake worker
//! (`examples/fake_vcpu.rs`), over real unix and TCP sockets.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(10);

fn none_with_qmp(scratch: &Scratch, extra: &[&str]) -> (Monitor, String) {
    let sock = scratch.s("qmp.sock");
    let spec = format!("unix:{sock},server=on,wait=off");
    let mut args = vec!["-M", "none", "-qmp", spec.as_str(), "-nographic"];
    args.extend_from_slice(extra);
    let m = Monitor::start(scratch, &args);
    wait_for_socket(&sock, T);
    (m, sock)
}

#[test]
fn greeting_negotiation_and_basic_commands() {
    let s = Scratch::new("greet");
    let (mut m, sock) = none_with_qmp(&s, &[]);
    let mut q = Qmp::unix(&sock);
    assert_eq!(
        q.greeting_line,
        "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 12, \"major\": 2}, \
         \"package\": \"bulkhead 0.1.0\"}, \"capabilities\": []}}\r\n"
    );
    // Before negotiation everything else is refused, even unknown commands.
    for c in ["query-status", "nope"] {
        let r = q.cmd(c);
        assert_eq!(error_class(&r), "CommandNotFound");
        assert_eq!(
            error_desc(&r),
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        );
    }
    let r = q.raw(r#"{"execute": "qmp_capabilities", "id": [1, {"a": 2}]}"#);
    assert_eq!(r, json!({"return": {}, "id": [1, {"a": 2}]}));
    let r = q.cmd("qmp_capabilities");
    assert_eq!(error_class(&r), "CommandNotFound");
    assert_eq!(
        error_desc(&r),
        "Capabilities negotiation is already complete, command ignored"
    );
    assert_eq!(
        q.cmd("query-status"),
        json!({"return": {"status": "running", "singlestep": false, "running": true}})
    );
    assert_eq!(
        q.cmd("query-version"),
        json!({"return": {"qemu": {"micro": 0, "minor": 12, "major": 2}, "package": "bulkhead 0.1.0"}})
    );
    let r = q.cmd("nope");
    assert_eq!(error_class(&r), "CommandNotFound");
    assert_eq!(error_desc(&r), "The command nope has not been found");
    let r = q.raw(r#"{"execute": "stop", "arguments": {"x": 1}}"#);
    assert_eq!(error_class(&r), "GenericError");
    assert_eq!(error_desc(&r), "Parameter 'x' is unexpected");
    // Every line ends in \r\n, as QEMU's do.
    assert!(q.lines.iter().all(|l| l.ends_with("\r\n")));
    let r = q.cmd("quit");
    assert_eq!(r, json!({"return": {}}));
    let ev = q.event("SHUTDOWN");
    assert_eq!(
        ev["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert!(q.closed());
    assert!(m.wait(T).success());
    assert!(
        !std::path::Path::new(&sock).exists(),
        "socket removed at exit"
    );
}

#[test]
fn run_states_and_events_reach_every_session_over_unix_and_tcp() {
    let s = Scratch::new("events");
    let port = free_tcp_port();
    let tcp = format!("tcp:127.0.0.1:{port},server=on,wait=off");
    let (mut m, sock) = none_with_qmp(&s, &["-S", "-qmp", &tcp]);
    let mut a = Qmp::unix(&sock);
    let mut b = Qmp::tcp(port);
    let mut c = Qmp::unix(&sock); // never negotiates: gets no events
    a.negotiate();
    b.negotiate();
    assert_eq!(a.status(), "prelaunch");
    assert_eq!(a.cmd("cont"), json!({"return": {}}));
    for q in [&mut a, &mut b] {
        let e = q.event("RESUME");
        assert!(e["timestamp"]["seconds"].as_u64().expect("seconds") > 1_600_000_000);
        assert!(e["timestamp"]["microseconds"].as_u64().expect("us") < 1_000_000);
        assert!(e.get("data").is_none());
    }
    assert_eq!(b.status(), "running");
    assert_eq!(b.cmd("stop"), json!({"return": {}}));
    // The event precedes the reply on the issuing session.
    assert_eq!(
        b.events.last().map(|e| e["event"].clone()),
        Some(json!("STOP"))
    );
    b.events.clear();
    a.event("STOP");
    assert_eq!(a.status(), "paused");
    // stop when paused and cont when running are silent no-ops, as in QEMU.
    assert_eq!(a.cmd("stop"), json!({"return": {}}));
    assert_eq!(a.cmd("system_reset"), json!({"return": {}}));
    for q in [&mut a, &mut b] {
        let e = q.event("RESET");
        assert_eq!(
            e["data"],
            json!({"guest": false, "reason": "host-qmp-system-reset"})
        );
    }
    // QEMU 7.2: a reset of a stopped machine leaves it in prelaunch.
    assert_eq!(a.status(), "prelaunch");
    assert_eq!(a.cmd("cont"), json!({"return": {}}));
    assert_eq!(a.cmd("cont"), json!({"return": {}}));
    assert!(a.events.iter().filter(|e| e["event"] == "RESUME").count() == 1);
    b.event("RESUME");
    let r = c.raw(r#"{"execute": "qmp_capabilities"}"#);
    assert_eq!(r, json!({"return": {}}));
    assert!(
        c.events.is_empty(),
        "events before negotiation: {:?}",
        c.events
    );
    assert_eq!(b.cmd("quit"), json!({"return": {}}));
    for q in [&mut a, &mut b, &mut c] {
        let e = q.event("SHUTDOWN");
        assert_eq!(
            e["data"],
            json!({"guest": false, "reason": "host-qmp-quit"})
        );
        assert!(q.closed());
    }
    assert!(m.wait(T).success());
}

#[test]
fn malformed_input_gets_an_error_and_the_session_goes_on() {
    let s = Scratch::new("malformed");
    let (_m, sock) = none_with_qmp(&s, &[]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let cases: &[(&str, &str)] = &[
        ("[1]", "QMP input must be a JSON object"),
        ("\"str\"", "QMP input must be a JSON object"),
        ("{}", "QMP input lacks member 'execute'"),
        (r#"{"foo": 1}"#, "QMP input member 'foo' is unexpected"),
        (
            r#"{"execute": 1}"#,
            "QMP input member 'execute' must be a string",
        ),
        (
            r#"{"execute": "stop", "arguments": []}"#,
            "QMP input member 'arguments' must be an object",
        ),
        (
            r#"{"exec-oob": "query-status"}"#,
            "QMP input member 'exec-oob' is unexpected",
        ),
    ];
    for (input, desc) in cases {
        let r = q.raw(input);
        assert_eq!(error_class(&r), "GenericError", "{input}");
        assert_eq!(error_desc(&r), *desc, "{input}");
    }
    let r = q.raw("notjson");
    assert_eq!(error_class(&r), "GenericError");
    assert!(error_desc(&r).starts_with("JSON parse error"), "{r}");
    // The id of a bad request is still echoed.
    let r = q.raw(r#"{"id": "x7"}"#);
    assert_eq!(r["id"], json!("x7"));
    // Huge input: one error, then the session works.
    let huge = format!(
        r#"{{"execute": "query-status", "id": "{}"}}"#,
        "x".repeat(3 << 20)
    );
    let r = q.raw(&huge);
    assert_eq!(error_desc(&r), "JSON token size limit exceeded");
    // Deep nesting.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let r = q.raw(&deep);
    assert_eq!(error_desc(&r), "JSON nesting depth limit exceeded");
    // A request split over lines, and two on one line.
    q.send_raw("{\"execute\":\n\"query-status\"\n");
    let r = q.raw("}");
    assert_eq!(r["return"]["status"], "running");
    q.send_raw(r#"{"execute": "query-status", "id": 1}{"execute": "query-status", "id": 2}"#);
    let r = q.raw("");
    assert_eq!(r["id"], 1);
    assert_eq!(q.reply()["id"], 2);
    // Ids come back exactly as sent, even where a float would round.
    q.send_raw(r#"{"execute": "query-status", "id": 12345678901234567890123}"#);
    q.send_raw("\n");
    let line = loop {
        let l = q.read_line().expect("line");
        if !l.contains("\"event\"") {
            break l;
        }
    };
    assert!(
        line.ends_with(", \"id\": 12345678901234567890123}\r\n"),
        "{line}"
    );
    // Garbage bytes: 0xff resets the parser.
    q.send_raw("{\"execute\": \u{1}");
    let r = q.raw("\n");
    assert_eq!(error_class(&r), "GenericError");
    assert_eq!(q.status(), "running");
}

#[test]
fn a_stuck_client_does_not_block_other_sessions() {
    let s = Scratch::new("stuck");
    let (_m, sock) = none_with_qmp(&s, &[]);
    // The stuck client negotiates, then never reads again.
    let mut stuck = UnixStream::connect(&sock).expect("connect");
    stuck
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .expect("write");
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let start = Instant::now();
    let mut worst = Duration::ZERO;
    for _ in 0..3000 {
        let t = Instant::now();
        assert_eq!(q.cmd("stop"), json!({"return": {}}));
        assert_eq!(q.cmd("cont"), json!({"return": {}}));
        worst = worst.max(t.elapsed());
        q.events.clear();
    }
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "6000 commands took {:?}",
        start.elapsed()
    );
    assert!(
        worst < Duration::from_secs(2),
        "slowest stop/cont pair: {worst:?}"
    );
    // The stuck session was dropped: reading what was buffered ends in EOF or reset.
    stuck
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0usize;
    loop {
        match stuck.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("stuck session was not dropped ({total} bytes read): {e}"),
        }
    }
    // The server sent well under what the 6000 events would have taken.
    assert!(total < 6000 * 80, "{total} bytes");
    assert_eq!(q.status(), "running");
}

#[test]
fn sigterm_and_sigint_shut_down_like_qemu() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let s = Scratch::new("sig");
        let (mut m, sock) = none_with_qmp(&s, &[]);
        let mut q = Qmp::unix(&sock);
        q.negotiate();
        // SAFETY: kill with the pid of a child we spawned.
        unsafe { libc::kill(m.child.id() as i32, sig) };
        let e = q.event("SHUTDOWN");
        assert_eq!(e["data"], json!({"guest": false, "reason": "host-signal"}));
        assert!(q.closed());
        assert!(m.wait(T).success());
        assert!(m.stderr().contains(&format!("terminating on signal {sig}")));
    }
}

#[test]
fn unsupported_and_invalid_options_exit_1_naming_the_option() {
    for (args, want) in [
        (
            &["-chardev", "pty,id=x"][..],
            "bulkhead: -chardev pty,id=x: chardev backend 'pty' is not supported by bulkhead",
        ),
        (
            &["-mon", "chardev=x"][..],
            "bulkhead: -mon: option not supported by bulkhead",
        ),
        (&["-foo"][..], "bulkhead: -foo: invalid option"),
        (
            &["-M", "q35"][..],
            "bulkhead: -M q35: unsupported machine type 'q35'",
        ),
        (&["-M", "none", "-smp", "2"][..], "Invalid SMP CPUs 2"),
        (&["-m"][..], "bulkhead: -m: requires an argument"),
        (
            &["-M", "none", "-qmp", "unix:/tmp/x.sock"][..],
            "only server sockets are supported",
        ),
    ] {
        let (status, stderr) = run_to_end(args);
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    let (status, out) = run_to_end(&["-h"]);
    assert!(status.success(), "{out}");
}

#[test]
fn pidfile_and_daemonize() {
    let s = Scratch::new("daemon");
    let sock = s.s("qmp.sock");
    let pidfile = s.s("bulkhead.pid");
    let spec = format!("unix:{sock},server=on,wait=off");
    let out = Command::new(BULKHEAD)
        .args([
            "-M",
            "none",
            "-daemonize",
            "-pidfile",
            &pidfile,
            "-qmp",
            &spec,
        ])
        .output()
        .expect("run");
    // The parent returns only once the daemon serves QMP.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut q = Qmp::unix(&sock);
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd"),
        std::path::PathBuf::from("/")
    );
    // SAFETY: getsid with integer arguments.
    let (theirs, ours) = unsafe { (libc::getsid(pid), libc::getsid(0)) };
    assert!(
        theirs > 0 && theirs != ours,
        "the daemon runs in a session of its own"
    );
    assert_ne!(
        theirs, pid,
        "and does not lead it (double fork), so it cannot get a tty back"
    );
    // A second instance cannot take the pid file.
    let (status, stderr) = run_to_end(&["-M", "none", "-pidfile", &pidfile]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("Cannot lock pid file"), "{stderr}");
    // A failing daemon makes the parent exit 1.
    let (status, _) = run_to_end(&[
        "-M",
        "none",
        "-daemonize",
        "-qmp",
        "unix:/nonexistent-dir/q.sock,server=on,wait=off",
    ]);
    assert_eq!(status.code(), Some(1));
    q.negotiate();
    q.cmd("quit");
    assert!(q.closed());
    let deadline = Instant::now() + T;
    while std::path::Path::new(&pidfile).exists() {
        assert!(Instant::now() < deadline, "pid file not removed");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A plain -pidfile without -daemonize.
    let (mut m, sock2) = {
        let sock2 = s.s("qmp2.sock");
        let spec2 = format!("unix:{sock2},server=on,wait=off");
        let m = Monitor::start(&s, &["-M", "none", "-pidfile", &pidfile, "-qmp", &spec2]);
        wait_for_socket(&sock2, T);
        (m, sock2)
    };
    assert_eq!(
        std::fs::read_to_string(&pidfile).expect("pidfile"),
        format!("{}\n", m.child.id())
    );
    let mut q = Qmp::unix(&sock2);
    q.negotiate();
    q.cmd("quit");
    assert!(m.wait(T).success());
    assert!(!std::path::Path::new(&pidfile).exists());
}

#[test]
fn qmp_wait_on_waits_for_a_client_before_starting() {
    let s = Scratch::new("wait");
    let sock = s.s("qmp.sock");
    let spec = format!("unix:{sock},server");
    let mut m = Monitor::start(&s, &["-M", "none", "-S", "-qmp", &spec]);
    m.wait_stderr("waiting for connection on: unix:", T);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    assert_eq!(q.status(), "prelaunch");
    q.cmd("quit");
    assert!(m.wait(T).success());
    // A terminating signal while still waiting ends it cleanly as well.
    let mut m = Monitor::start(&s, &["-M", "none", "-qmp", &spec]);
    m.wait_stderr("waiting for connection on: unix:", T);
    // SAFETY: kill with the pid of a child we spawned.
    unsafe { libc::kill(m.child.id() as i32, libc::SIGTERM) };
    assert!(m.wait(T).success());
    assert!(!std::path::Path::new(&sock).exists());
}

// ---- with the fake worker ----

fn guest(scratch: &Scratch, append: &str, extra: &[&str]) -> (Monitor, String) {
    let mut args = vec!["-smp", "2"];
    args.extend_from_slice(extra);
    fake_guest(scratch, append, &args)
}

fn worker_log(scratch: &Scratch) -> String {
    std::fs::read_to_string(scratch.path("worker.log")).unwrap_or_default()
}

fn worker_pids(scratch: &Scratch) -> Vec<i32> {
    worker_log(scratch)
        .lines()
        .filter_map(|l| l.strip_prefix("pid ")?.parse().ok())
        .collect()
}

#[test]
fn worker_gets_its_fds_and_follows_run_state_commands() {
    let s = Scratch::new("worker");
    // An inherited, non-close-on-exec fd 7 must not reach the worker (which refuses setup if
    // it has any fd but 0-3).
    let sock = s.s("qmp.sock");
    let kernel = s.path("vmlinux");
    std::fs::write(&kernel, b"kernel").expect("kernel");
    let wd = fake_worker_dir(&s);
    let log = s.s("worker.log");
    let script = format!(
        "exec 7</dev/null; exec {BULKHEAD} -kernel {} -m 64 --worker-dir {wd} -append 'fake.log={log}' \
         -qmp unix:{sock},server=on,wait=off -S",
        kernel.display()
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .spawn()
        .expect("sh");
    wait_for_socket(&sock, T);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    assert_eq!(q.status(), "prelaunch");
    assert_eq!(q.cmd("cont"), json!({"return": {}}));
    q.event("RESUME");
    assert_eq!(q.cmd("stop"), json!({"return": {}}));
    q.event("STOP");
    assert_eq!(q.cmd("system_reset"), json!({"return": {}}));
    q.event("RESET");
    assert_eq!(q.status(), "prelaunch");
    assert_eq!(q.cmd("cont"), json!({"return": {}}));
    assert_eq!(q.status(), "running");
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(q.closed());
    let st = child.wait().expect("wait");
    assert!(st.success());
    let log = worker_log(&s);
    let reqs: Vec<&str> = log.lines().filter(|l| !l.starts_with("pid ")).collect();
    assert_eq!(reqs, ["Setup", "Run", "Pause", "Reset", "Run", "Quit"]);
}

#[test]
fn worker_death_is_noticed_and_qmp_keeps_working() {
    let s = Scratch::new("death");
    let (mut m, sock) = guest(&s, "", &[]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    assert_eq!(q.status(), "running");
    let pid = worker_pids(&s)[0];
    // SAFETY: kill with a pid the fake worker reported.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let stop = q.event("STOP");
    assert!(stop.get("data").is_none());
    assert_eq!(q.status(), "internal-error");
    assert_eq!(
        q.cmd("query-status"),
        json!({"return": {"status": "internal-error", "singlestep": false, "running": false}})
    );
    m.wait_stderr(
        &format!("bulkhead-vcpu (pid {pid}) was killed by signal SIGKILL"),
        T,
    );
    let r = q.cmd("cont");
    assert_eq!(error_class(&r), "GenericError");
    assert_eq!(error_desc(&r), "Resetting the Virtual Machine is required");
    assert_eq!(q.cmd("stop"), json!({"return": {}}));
    // A second session works too.
    let mut q2 = Qmp::unix(&sock);
    q2.negotiate();
    assert_eq!(q2.status(), "internal-error");
    // system_reset brings up a fresh worker; cont runs it.
    assert_eq!(q.cmd("system_reset"), json!({"return": {}}));
    assert_eq!(q.status(), "prelaunch");
    assert_eq!(q.cmd("cont"), json!({"return": {}}));
    assert_eq!(q.status(), "running");
    let pids = worker_pids(&s);
    assert_eq!(pids.len(), 2);
    assert_ne!(pids[0], pids[1]);
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success());
}

#[test]
fn worker_exit_status_is_logged() {
    let s = Scratch::new("exit3");
    let (mut m, sock) = guest(&s, "fake.exit-after=300", &[]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    q.event("STOP");
    assert_eq!(q.status(), "internal-error");
    let pid = worker_pids(&s)[0];
    m.wait_stderr(
        &format!("bulkhead-vcpu (pid {pid}) exited with status 3"),
        T,
    );
    q.cmd("quit");
    assert!(m.wait(T).success());
}

#[test]
fn worker_internal_error_stops_the_vm() {
    let s = Scratch::new("interr");
    let (mut m, sock) = guest(&s, "fake.internal-error-after=200", &[]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    q.event("STOP");
    assert_eq!(q.status(), "internal-error");
    m.wait_stderr("fake emulation failure", T);
    assert_eq!(q.cmd("system_reset"), json!({"return": {}}));
    assert_eq!(q.status(), "prelaunch");
    assert_eq!(
        worker_pids(&s).len(),
        1,
        "the live worker was reset, not replaced"
    );
    q.cmd("quit");
    assert!(m.wait(T).success());
}

#[test]
fn guest_poweroff_ends_bulkhead_with_status_0() {
    let s = Scratch::new("poweroff");
    let (mut m, sock) = guest(&s, "fake.shutdown-after=300", &[]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let e = q.event("SHUTDOWN");
    assert_eq!(
        e["data"],
        json!({"guest": true, "reason": "guest-shutdown"})
    );
    assert!(q.closed());
    assert!(m.wait(T).success());
}

#[test]
fn guest_poweroff_under_no_shutdown_stops_in_state_shutdown() {
    let s = Scratch::new("noshutdown");
    let (mut m, sock) = guest(&s, "fake.shutdown-after=300", &["-no-shutdown"]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let e = q.event("SHUTDOWN");
    assert_eq!(
        e["data"],
        json!({"guest": true, "reason": "guest-shutdown"})
    );
    q.event("STOP");
    assert_eq!(q.status(), "shutdown");
    let r = q.cmd("cont");
    assert_eq!(error_desc(&r), "Resetting the Virtual Machine is required");
    // The worker's exit after poweroff is expected, not an error.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(q.status(), "shutdown");
    assert!(
        !m.stderr().contains("bulkhead: bulkhead-vcpu"),
        "{}",
        m.stderr()
    );
    q.cmd("system_reset");
    assert_eq!(q.status(), "prelaunch");
    q.cmd("quit");
    assert!(m.wait(T).success());
}

#[test]
fn guest_reset_is_reported() {
    let s = Scratch::new("greset");
    let (mut m, sock) = guest(&s, "fake.reset-after=300", &[]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let e = q.event("RESET");
    assert_eq!(e["data"], json!({"guest": true, "reason": "guest-reset"}));
    assert_eq!(q.status(), "running");
    q.cmd("quit");
    assert!(m.wait(T).success());
}

#[test]
fn a_worker_refusing_setup_fails_startup() {
    let s = Scratch::new("refuse");
    let kernel = s.path("vmlinux");
    std::fs::write(&kernel, b"kernel").expect("kernel");
    let wd = fake_worker_dir(&s);
    let (status, stderr) = run_to_end(&[
        "-kernel",
        kernel.to_str().expect("utf8"),
        "--worker-dir",
        &wd,
        "-append",
        "fake.refuse-setup",
    ]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("could not set up the VM: refused by fake.refuse-setup"),
        "{stderr}"
    );
    let (status, stderr) = run_to_end(&[
        "-kernel",
        kernel.to_str().expect("utf8"),
        "--worker-dir",
        "/nonexistent",
    ]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("cannot start /nonexistent/bulkhead-vcpu"),
        "{stderr}"
    );
}

#[test]
fn serial_to_file_truncates_and_receives_guest_output() {
    let s = Scratch::new("serfile");
    let out = s.s("serial.log");
    std::fs::write(&out, "stale content that must go\n").expect("write");
    let spec = format!("file:{out}");
    let (mut m, sock) = guest(&s, "fake.serial-hello", &["-serial", &spec]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let deadline = Instant::now() + T;
    while std::fs::read_to_string(&out).unwrap_or_default() != "fake-guest: hello\n" {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            std::fs::read_to_string(&out)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    q.cmd("quit");
    assert!(m.wait(T).success());
}

#[test]
fn serial_over_a_unix_socket_relays_both_ways() {
    let s = Scratch::new("serunix");
    let ser = s.s("serial.sock");
    let spec = format!("unix:{ser},server=on,wait=off");
    let (mut m, sock) = guest(&s, "fake.echo", &["-serial", &spec]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let mut c = UnixStream::connect(&ser).expect("connect serial");
    c.set_read_timeout(Some(T)).expect("timeout");
    std::thread::sleep(Duration::from_millis(100));
    c.write_all(b"ping\n").expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while !got.ends_with(b"ping\n") {
        let n = c.read(&mut buf).expect("read");
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    q.cmd("quit");
    assert!(m.wait(T).success());
    assert!(!std::path::Path::new(&ser).exists());
}

#[test]
fn fds_sent_with_commands_are_closed_after_the_command() {
    use sendfd::SendWithFd;
    use std::os::fd::AsRawFd;
    let s = Scratch::new("scmrights");
    let (m, sock) = none_with_qmp(&s, &[]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let count = || {
        std::fs::read_dir(format!("/proc/{}/fd", m.child.id()))
            .expect("fd dir")
            .count()
    };
    let before = count();
    let file = std::fs::File::open("/dev/null").expect("null");
    let fds = [file.as_raw_fd(); 4];
    let mut c = Qmp::unix(&sock);
    c.negotiate();
    for i in 0..50 {
        let msg = format!("{{\"execute\": \"query-status\", \"id\": {i}}}\n");
        match &c.writer_stream() {
            Stream::Unix(u) => {
                u.send_with_fd(msg.as_bytes(), &fds).expect("sendmsg");
            }
            Stream::Tcp(_) => unreachable!(),
        }
        assert_eq!(c.reply()["id"], i);
    }
    // One session more than before; none of the 200 fds is left open.
    let after = count();
    assert!(after <= before + 2, "fds before {before}, after {after}");
    assert_eq!(q.status(), "running");
}

#[test]
fn serial_stdio_is_the_default_with_nographic() {
    let s = Scratch::new("stdio");
    let sock = s.s("qmp.sock");
    let kernel = s.path("vmlinux");
    std::fs::write(&kernel, b"kernel").expect("kernel");
    let wd = fake_worker_dir(&s);
    let spec = format!("unix:{sock},server=on,wait=off");
    let mut child = Command::new(BULKHEAD)
        .args([
            "-kernel",
            kernel.to_str().expect("utf8"),
            "--worker-dir",
            &wd,
            "-nographic",
            "-append",
            "fake.serial-hello fake.echo",
            "-qmp",
            &spec,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.ends_with(b"fake-guest: hello\n") {
        let n = stdout.read(&mut buf).expect("read");
        assert!(n > 0, "stdout closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    stdin.write_all(b"typed\n").expect("type");
    got.clear();
    while !got.ends_with(b"typed\n") {
        let n = stdout.read(&mut buf).expect("read");
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    q.cmd("quit");
    assert!(child.wait().expect("wait").success());
}
