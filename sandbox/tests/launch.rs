//! The real launcher and `enter` on this host: a tiny worker (`bulkhead-sandbox-probe`) is
//! started in a role's namespaces, confines itself, and is inspected from outside through
//! `/proc`; a forbidden system call must kill it by SIGSYS with the call's number reported.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bulkhead_sandbox::launch::{Child, Command, IdMap};
use bulkhead_sandbox::policy::{Resource, WORKER_NAMESPACES};
use bulkhead_sandbox::{Params, Role};

const PROBE: &str = env!("CARGO_BIN_EXE_bulkhead-sandbox-probe");

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a writable array of two ints.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 returned two new fds nobody else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

struct Probe {
    child: Child,
    stdin: Option<std::fs::File>,
    stdout: BufReader<std::fs::File>,
    ready: String,
}

fn start(role: Role, mode: &str, action: &[&str], namespaces: bool) -> Probe {
    let (in_r, in_w) = pipe();
    let (out_r, out_w) = pipe();
    let mut cmd = Command::new(Path::new(PROBE)).expect("command");
    cmd.arg(role.name()).expect("arg").arg(mode).expect("arg");
    for a in action {
        cmd.arg(a).expect("arg");
    }
    cmd.fd(in_r.as_fd(), 0).expect("fd");
    cmd.fd(out_w.as_fd(), 1).expect("fd");
    cmd.fd(std::io::stderr().as_fd(), 2).expect("fd");
    cmd.report_pipe(true);
    if namespaces {
        cmd.namespaces(
            role.policy().namespaces,
            Some(IdMap::for_current_user(None).expect("ids")),
        );
    }
    let child = cmd.spawn().expect("spawn");
    drop(in_r);
    drop(out_w);
    let mut stdout = BufReader::new(std::fs::File::from(out_r));
    let mut ready = String::new();
    stdout.read_line(&mut ready).expect("read");
    Probe {
        child,
        stdin: Some(std::fs::File::from(in_w)),
        stdout,
        ready,
    }
}

fn proc_file(pid: i32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{name}")).expect(name)
}

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{key} missing in {status}"))
        .trim()
}

fn ns(pid: i32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .expect("ns link")
        .display()
        .to_string()
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        assert!(Instant::now() < deadline, "the probe did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn vcpu_role_is_fully_confined_as_seen_from_outside() {
    let mut p = start(Role::Vcpu, "on", &["wait"], true);
    assert!(p.ready.starts_with("READY "), "{:?}", p.ready);
    assert!(!p.ready.contains("WEAKER"), "{:?}", p.ready);
    let pid = p.child.pid();
    let status = proc_file(pid, "status");
    // Its own pid namespace, where it is 1.
    let nspid: Vec<&str> = field(&status, "NSpid").split_whitespace().collect();
    assert_eq!(nspid, [pid.to_string().as_str(), "1"], "{status}");
    assert_eq!(field(&status, "CapInh"), "0000000000000000");
    assert_eq!(field(&status, "CapPrm"), "0000000000000000");
    assert_eq!(field(&status, "CapEff"), "0000000000000000");
    assert_eq!(field(&status, "CapBnd"), "0000000000000000");
    assert_eq!(field(&status, "CapAmb"), "0000000000000000");
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    assert_eq!(field(&status, "Seccomp"), "2");
    // Outside, it is nobody (as root) or the test's own user.
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    let outside = if euid == 0 { 65534 } else { euid };
    let uids: Vec<&str> = field(&status, "Uid").split_whitespace().collect();
    assert_eq!(uids, [outside.to_string().as_str(); 4]);
    if euid == 0 {
        // Root's supplementary groups were dropped.
        assert_eq!(field(&status, "Groups"), "");
    }
    let uid_map: Vec<String> = proc_file(pid, "uid_map")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(uid_map, ["0", outside.to_string().as_str(), "1"]);
    // Every namespace differs from ours.
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    for kind in ["user", "mnt", "pid", "ipc", "uts", "net"] {
        assert_ne!(ns(pid, kind), ns(me, kind), "{kind} namespace is shared");
    }
    assert_eq!(WORKER_NAMESPACES, Role::Vcpu.policy().namespaces);
    // Its root is the empty tmpfs, read-only.
    let root = std::fs::read_dir(format!("/proc/{pid}/root"));
    if let Ok(entries) = root {
        assert_eq!(entries.count(), 0, "the root is not empty");
    }
    let mountinfo = proc_file(pid, "mountinfo");
    let mounts: Vec<&str> = mountinfo.lines().collect();
    assert_eq!(mounts.len(), 1, "{mountinfo}");
    assert!(mounts[0].contains(" / / ro,"), "{mountinfo}");
    assert!(mounts[0].contains(" - tmpfs "), "{mountinfo}");
    // Its limits are the policy's.
    let limits = proc_file(pid, "limits");
    let params = Params {
        mem_bytes: 64 << 20,
        ..Params::default()
    };
    for l in Role::Vcpu.policy().rlimits(&params) {
        let line = limits
            .lines()
            .find(|x| x.starts_with(l.resource.proc_name()))
            .expect("limit line");
        let cols: Vec<&str> = line[l.resource.proc_name().len()..]
            .split_whitespace()
            .collect();
        let want = match l.value {
            Some(v) => v.to_string(),
            None if l.resource == Resource::Fsize => "unlimited".to_string(),
            None => continue,
        };
        assert_eq!(cols[0], want, "{line}");
        assert_eq!(cols[1], want, "{line}");
    }
    // It exits normally when asked.
    drop(p.stdin.take());
    let st = wait_exit(&mut p.child);
    assert_eq!(st.code(), Some(0), "{st:?}");
    assert_eq!(p.child.violation(), None);
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut p.stdout, &mut rest);
}

#[test]
fn a_forbidden_syscall_kills_by_sigsys_and_is_reported() {
    for (nr, name) in [
        (libc::SYS_socket, "socket"),
        (libc::SYS_openat, "openat"),
        (libc::SYS_ptrace, "ptrace"),
        (libc::SYS_execve, "execve"),
    ] {
        let mut p = start(Role::Vcpu, "on", &["syscall", &nr.to_string()], true);
        assert!(p.ready.starts_with("READY "), "{:?}", p.ready);
        let st = wait_exit(&mut p.child);
        assert_eq!(st.signal(), Some(libc::SIGSYS), "{name}: {st:?}");
        let v = p.child.violation().expect("a violation report");
        assert_eq!(v.nr, nr);
        assert_eq!(v.name(), Some(name));
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut p.stdout, &mut rest);
        assert!(!rest.contains("returned"), "{name} ran: {rest}");
    }
}

#[test]
fn a_forbidden_ioctl_kills_and_names_the_request() {
    // TUNSETIFF is netd's business, never vcpu's.
    let tunsetiff: u64 = 0x4004_54ca;
    let mut p = start(
        Role::Vcpu,
        "on",
        &["ioctl", &format!("{tunsetiff:#x}")],
        true,
    );
    let st = wait_exit(&mut p.child);
    assert_eq!(st.signal(), Some(libc::SIGSYS), "{st:?}");
    let v = p.child.violation().expect("a violation report");
    assert_eq!(v.nr, libc::SYS_ioctl);
    assert_eq!(v.args[1] & 0xffff_ffff, tunsetiff);
    assert!(v.to_string().contains("request 0x400454ca"), "{v}");
}

#[test]
fn clone3_is_answered_enosys_not_killed() {
    let mut p = start(
        Role::Vcpu,
        "on",
        &["syscall", &libc::SYS_clone3.to_string()],
        true,
    );
    let mut line = String::new();
    p.stdout.read_line(&mut line).expect("read");
    assert_eq!(
        line.trim(),
        format!("syscall {} returned -1", libc::SYS_clone3)
    );
    let st = wait_exit(&mut p.child);
    assert_eq!(st.code(), Some(0), "{st:?}");
}

#[test]
fn on_refuses_without_namespaces_and_allow_weak_says_what_is_missing() {
    // Launched without namespaces, `on` must refuse before confining anything.
    let mut p = start(Role::Vcpu, "on", &["wait"], false);
    assert_eq!(p.ready, "", "it must not get ready");
    let st = wait_exit(&mut p.child);
    assert_eq!(st.code(), Some(1));
    // allow-weak runs, says what is missing, and still has seccomp and no_new_privs.
    let mut p = start(Role::Vcpu, "allow-weak", &["wait"], false);
    assert!(p.ready.contains("WEAKER THAN THE POLICY"), "{:?}", p.ready);
    assert!(p.ready.contains("own user namespace"), "{:?}", p.ready);
    let status = proc_file(p.child.pid(), "status");
    assert_eq!(field(&status, "Seccomp"), "2");
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    assert_eq!(field(&status, "CapEff"), "0000000000000000");
    if let Some(mut w) = p.stdin.take() {
        let _ = w.write_all(b"bye");
    }
    let st = wait_exit(&mut p.child);
    assert_eq!(st.code(), Some(0));
}

#[test]
fn killing_through_the_pidfd_and_dropping_reap_the_worker() {
    let mut p = start(Role::Vcpu, "on", &["wait"], true);
    let pid = p.child.pid();
    p.child.kill().expect("kill");
    let st = wait_exit(&mut p.child);
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    // A second kill after reaping is harmless.
    p.child.kill().expect("kill again");
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    // Dropping a live child kills and reaps it.
    let p = start(Role::Vcpu, "on", &["wait"], true);
    let pid = p.child.pid();
    drop(p);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn a_missing_binary_is_an_error_naming_it() {
    let e = Command::new(Path::new("/nonexistent/bulkhead-x"))
        .expect("command")
        .spawn()
        .expect_err("must fail");
    assert!(e.to_string().contains("/nonexistent/bulkhead-x"), "{e}");
}

#[test]
fn enter_is_quick() {
    // The report carries how long `enter` took; keep an eye on it (phase 2 benchmarks it).
    let p = start(Role::Vcpu, "on", &["wait"], true);
    let us: u64 = p
        .ready
        .split_whitespace()
        .skip_while(|w| *w != "in")
        .nth(1)
        .and_then(|w| w.parse().ok())
        .expect("elapsed");
    eprintln!("enter took {us} µs: {}", p.ready.trim());
    assert!(us < 200_000, "{}", p.ready);
}
