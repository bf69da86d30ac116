//! The monitor launches its worker sandboxed: the (fake) worker runs in its own namespaces as
//! an unprivileged user, `--sandbox off` says loudly that it is not, and a seccomp violation
//! kills only the worker, with the refused system call named in the monitor's log.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn start(s: &Scratch, append: &str, extra: &[&str]) -> (Monitor, String) {
    let sock = s.s("qmp.sock");
    let kernel = s.path("vmlinux");
    std::fs::write(&kernel, b"\x7fELF fake kernel").expect("kernel");
    let spec = format!("unix:{sock},server=on,wait=off");
    let wd = fake_worker_dir(s);
    let append = format!("fake.log={} {append}", s.s("worker.log"));
    let kernel = kernel.to_str().expect("utf8").to_string();
    let mut args = vec![
        "-kernel",
        kernel.as_str(),
        "-m",
        "64M",
        "--worker-dir",
        wd.as_str(),
        "-append",
        append.as_str(),
        "-qmp",
        spec.as_str(),
    ];
    args.extend_from_slice(extra);
    let m = Monitor::start(s, &args);
    wait_for_socket(&sock, T);
    (m, sock)
}

fn worker_pid(s: &Scratch) -> i32 {
    let deadline = std::time::Instant::now() + T;
    loop {
        let log = std::fs::read_to_string(s.path("worker.log")).unwrap_or_default();
        if let Some(pid) = log
            .lines()
            .find_map(|l| l.strip_prefix("pid ")?.parse().ok())
        {
            return pid;
        }
        assert!(std::time::Instant::now() < deadline, "no worker pid");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status_field(pid: i32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{key} missing"))
        .trim()
        .to_string()
}

fn ns(pid: i32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .expect("ns")
        .display()
        .to_string()
}

#[test]
fn the_worker_runs_in_its_own_namespaces_as_an_unprivileged_user() {
    let s = Scratch::new("sbx-on");
    let (mut m, sock) = start(&s, "", &[]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let pid = worker_pid(&s);
    let nspid: Vec<String> = status_field(pid, "NSpid")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(nspid, [pid.to_string(), "1".to_string()]);
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    let outside = if euid == 0 { 65534 } else { euid };
    assert_eq!(
        status_field(pid, "Uid"),
        format!("{outside}\t{outside}\t{outside}\t{outside}")
    );
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    for kind in ["user", "mnt", "pid", "ipc", "uts", "net"] {
        assert_ne!(ns(pid, kind), ns(me, kind), "{kind}");
    }
    assert!(!m.stderr().contains("WARNING"), "{}", m.stderr());
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success());
}

#[test]
fn sandbox_off_warns_loudly_and_confines_nothing() {
    let s = Scratch::new("sbx-off");
    let (mut m, sock) = start(&s, "", &["--sandbox", "off"]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let stderr = m.wait_stderr("WARNING", T);
    assert!(stderr.contains("--sandbox off"), "{stderr}");
    assert!(stderr.contains("WITHOUT"), "{stderr}");
    let pid = worker_pid(&s);
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    assert_eq!(ns(pid, "user"), ns(me, "user"));
    assert_eq!(status_field(pid, "Seccomp"), "0");
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success());
}

#[test]
fn a_seccomp_violation_kills_only_the_worker_and_names_the_call() {
    let s = Scratch::new("sbx-sigsys");
    let (mut m, sock) = start(&s, "fake.sigsys", &["-S"]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let pid = worker_pid(&s);
    assert_eq!(q.status(), "prelaunch");
    // The worker dies while answering `cont`.
    let r = q.cmd("cont");
    assert!(r.get("error").is_some(), "{r}");
    let stderr = m.wait_stderr(
        &format!(
            "bulkhead-vcpu (pid {pid}) was killed by signal SIGSYS: the sandbox refused \
             system call {} (socket)",
            libc::SYS_socket
        ),
        T,
    );
    assert!(stderr.contains("args [0x2, 0x1, 0x0"), "{stderr}");
    // The monitor goes on serving, in QEMU's state for a dead machine.
    let deadline = std::time::Instant::now() + T;
    while q.status() != "internal-error" {
        assert!(std::time::Instant::now() < deadline, "no internal-error");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success());
}

#[test]
fn bad_sandbox_options_exit_1() {
    let (status, stderr) = run_to_end(&["-M", "none", "--sandbox", "maybe"]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("on, off or allow-weak"), "{stderr}");
    let (status, stderr) = run_to_end(&["-M", "none", "--sandbox-user", "0:0"]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("UID:GID"), "{stderr}");
}
