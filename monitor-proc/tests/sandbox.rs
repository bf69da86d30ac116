//! The monitor launches its worker sandboxed: the (fake) worker runs in its own namespaces as
//! an unprivileged user, `--sandbox off` says loudly that it is not, `x-query-sandbox` shows
//! both processes as `/proc` does, and a seccomp violation kills only the worker, with the
//! refused system call named in the monitor's log.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn start(s: &Scratch, append: &str, extra: &[&str]) -> (Monitor, String) {
    fake_guest(s, append, extra)
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
    // Nor the monitor itself, and there is no launcher: the worker is the monitor's child.
    assert_eq!(status_field(m.child.id() as i32, "Seccomp"), "0");
    assert_eq!(status_field(m.child.id() as i32, "NoNewPrivs"), "0");
    assert_eq!(status_field(pid, "PPid"), m.child.id().to_string());
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success());
}

#[test]
fn the_monitor_confines_itself_and_starts_workers_through_its_launcher() {
    let s = Scratch::new("sbx-mon");
    let (mut m, sock) = start(&s, "", &[]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let me = m.child.id() as i32;
    assert_eq!(status_field(me, "Seccomp"), "2");
    assert_eq!(status_field(me, "NoNewPrivs"), "1");
    // The worker is the launcher's child; the launcher is the monitor's.
    let pid = worker_pid(&s);
    let launcher: i32 = status_field(pid, "PPid").parse().expect("ppid");
    assert_ne!(launcher, me);
    assert_eq!(status_field(launcher, "PPid"), me.to_string());
    assert_eq!(status_field(launcher, "Seccomp"), "0");
    // Supervision through the launcher: a killed worker is reported with its signal, and
    // system_reset starts a new one through the launcher again, twice.
    // SAFETY: kill with integer arguments, on the worker this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let ev = q.event("X_WORKER_EXITED");
    assert_eq!(ev["data"]["signal"], "SIGKILL", "{ev}");
    for round in 0..2 {
        assert_eq!(
            q.cmd("system_reset"),
            json!({"return": {}}),
            "round {round}"
        );
        assert_eq!(q.cmd("cont"), json!({"return": {}}), "round {round}");
        assert_eq!(q.status(), "running", "round {round}");
    }
    let pids = worker_pids(&s);
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_eq!(status_field(pids[1], "PPid"), launcher.to_string());
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success());
    // The monitor reaped its launcher before exiting: no zombie left behind.
    assert!(
        !std::path::Path::new(&format!("/proc/{launcher}")).exists()
            || status_field(launcher, "PPid") != me.to_string(),
        "launcher {launcher} still there"
    );
    let stderr = std::fs::read_to_string(&m.stderr_path).expect("stderr");
    assert!(!stderr.contains("BULKHEAD-SECCOMP-VIOLATION"), "{stderr}");
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
    // The event names the worker and the call.
    let ev = q.event("X_WORKER_EXITED");
    assert_eq!(ev["data"]["role"], "vcpu", "{ev}");
    assert_eq!(ev["data"]["pid"], pid, "{ev}");
    assert_eq!(ev["data"]["signal"], "SIGSYS", "{ev}");
    assert_eq!(ev["data"]["sandbox-violation"], true, "{ev}");
    assert_eq!(ev["data"]["syscall"], libc::SYS_socket, "{ev}");
    assert_eq!(ev["data"]["syscall-name"], "socket", "{ev}");
    // The monitor goes on serving, in QEMU's state for a dead machine.
    let deadline = std::time::Instant::now() + T;
    while q.status() != "internal-error" {
        assert!(std::time::Instant::now() < deadline, "no internal-error");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success());
}

/// The worker pids `worker.log` has seen so far, in order.
fn worker_pids(s: &Scratch) -> Vec<i32> {
    std::fs::read_to_string(s.path("worker.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("pid ")?.parse().ok())
        .collect()
}

#[test]
fn a_violation_while_running_stops_the_vm_and_system_reset_starts_a_new_worker() {
    let s = Scratch::new("sbx-sigsys-run");
    let (mut m, sock) = start(&s, "fake.sigsys-after=300", &[]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let pid = worker_pid(&s);
    assert_eq!(q.status(), "running");
    let schema = q.cmd("query-qmp-schema")["return"].clone();
    // X_WORKER_EXITED, then STOP, as QEMU reports an internal error's cause before its STOP.
    let ev = q.event("X_WORKER_EXITED");
    let ty = bulkhead_monitor::qmp::schema::event_type_of(&schema, "X_WORKER_EXITED")
        .expect("event in the schema");
    bulkhead_monitor::qmp::schema::check_value(&schema, ty, &ev["data"])
        .unwrap_or_else(|e| panic!("{e}: {ev}"));
    assert_eq!(ev["data"]["pid"], pid, "{ev}");
    assert_eq!(ev["data"]["syscall-name"], "socket", "{ev}");
    assert!(
        ev["data"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("the sandbox refused system call")),
        "{ev}"
    );
    assert!(
        q.events.is_empty(),
        "nothing before X_WORKER_EXITED: {:?}",
        q.events
    );
    q.event("STOP");
    m.wait_stderr(
        &format!("bulkhead-vcpu (pid {pid}) was killed by signal SIGSYS"),
        T,
    );
    assert_eq!(q.status(), "internal-error");
    assert!(error_desc(&q.cmd("cont")).contains("Resetting the Virtual Machine is required"));
    // Only the monitor and its launcher are left.
    let v = query_sandbox(&mut q);
    assert_eq!(v["processes"].as_array().map(Vec::len), Some(2), "{v}");
    // system_reset brings up a fresh worker, paused (prelaunch), that then runs.
    assert_eq!(q.cmd("system_reset"), json!({"return": {}}));
    q.event("RESET");
    assert_eq!(q.status(), "prelaunch");
    let pids = worker_pids(&s);
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_ne!(pids[1], pid);
    let v = query_sandbox(&mut q);
    assert_eq!(v["processes"][2]["pid"], pids[1], "{v}");
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success());
}

/// The `x-query-sandbox` answer, checked against its schema.
fn query_sandbox(q: &mut Qmp) -> serde_json::Value {
    let schema = q.cmd("query-qmp-schema")["return"].clone();
    let r = q.cmd("x-query-sandbox");
    let v = r["return"].clone();
    let ty = bulkhead_monitor::qmp::schema::ret_type_of(&schema, "x-query-sandbox")
        .expect("x-query-sandbox in the schema");
    bulkhead_monitor::qmp::schema::check_value(&schema, ty, &v)
        .unwrap_or_else(|e| panic!("{e}: {r}"));
    v
}

fn ns_id(pid: i32, kind: &str) -> u64 {
    let link = ns(pid, kind);
    bulkhead_monitor::inspect::parse_ns_link(&link)
        .expect("ns link")
        .1
}

#[test]
fn x_query_sandbox_lists_the_monitor_and_the_worker_from_proc() {
    let s = Scratch::new("sbx-query");
    let (mut m, sock) = start(&s, "", &[]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let pid = worker_pid(&s);
    let v = query_sandbox(&mut q);
    assert_eq!(v["mode"], "on", "{v}");
    let procs = v["processes"].as_array().expect("processes");
    assert_eq!(procs.len(), 3, "{v}");
    let (mon, launcher, w) = (&procs[0], &procs[1], &procs[2]);
    assert_eq!(mon["role"], "monitor");
    assert_eq!(mon["pid"], m.child.id());
    // The monitor confined itself once start-up was done: its seccomp filter (two: the errno
    // filter and the allowlist) and its own record of its landlock ruleset.
    assert_eq!(mon["seccomp"]["mode"], "filter", "{mon}");
    assert_eq!(mon["seccomp"]["filters"], 2, "{mon}");
    assert!(
        mon["seccomp"]["instructions"]
            .as_u64()
            .is_some_and(|n| n > 100),
        "{mon}"
    );
    assert_eq!(mon["no-new-privs"], true, "{mon}");
    assert_eq!(mon["landlock"]["source"], "monitor-recorded", "{mon}");
    assert!(
        mon["landlock"]["abi"].as_i64().is_some_and(|a| a >= 1),
        "{mon}"
    );
    assert_ne!(mon["landlock"]["status"], "not-enforced", "{mon}");
    assert_eq!(
        status_field(m.child.id() as i32, "Seccomp"),
        "2",
        "/proc agrees"
    );
    // The launcher: the monitor's child, in its namespaces, without seccomp or landlock (its
    // workers would inherit them), with at most the four capabilities a launch needs.
    assert_eq!(launcher["role"], "launcher", "{launcher}");
    assert_eq!(launcher["seccomp"]["mode"], "disabled", "{launcher}");
    assert_eq!(launcher["landlock"]["status"], "not-enforced", "{launcher}");
    assert_eq!(launcher["no-new-privs"], true, "{launcher}");
    let lpid = launcher["pid"].as_u64().expect("launcher pid") as i32;
    assert_eq!(status_field(lpid, "PPid"), m.child.id().to_string());
    // CAP_DAC_READ_SEARCH 2, CAP_KILL 5, CAP_SETGID 6, CAP_SETUID 7.
    let keep: u64 = (1 << 2) | (1 << 5) | (1 << 6) | (1 << 7);
    for set in ["effective", "permitted", "bounding"] {
        let c = launcher["capabilities"][set].as_u64().expect("caps");
        assert_eq!(c & !keep, 0, "launcher {set} {c:#x}");
    }
    for n in launcher["namespaces"].as_array().expect("namespaces") {
        assert_eq!(n["differs-from-monitor"], false, "{n}");
    }
    assert_eq!(w["role"], "vcpu");
    assert_eq!(w["pid"], pid);
    assert_eq!(w["ns-pid"], 1);
    // Every namespace the launcher creates is the worker's own, with the id /proc shows.
    let by_type = |p: &serde_json::Value, t: &str| {
        p["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .find(|n| n["type"] == t)
            .cloned()
            .unwrap_or_else(|| panic!("no {t} namespace in {p}"))
    };
    for kind in ["user", "mnt", "pid", "ipc", "uts", "net"] {
        let n = by_type(w, kind);
        assert_eq!(n["id"], ns_id(pid, kind), "{kind}");
        assert_eq!(n["differs-from-monitor"], true, "{kind}");
        assert_eq!(by_type(mon, kind)["differs-from-monitor"], false, "{kind}");
    }
    assert_eq!(by_type(w, "cgroup")["differs-from-monitor"], false);
    // uid 0 inside, nobody (or the test's own uid) outside.
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    let outside = if euid == 0 { 65534 } else { euid };
    assert_eq!(w["uid"]["outside"], outside, "{w}");
    assert_eq!(w["uid"]["inside"], 0, "{w}");
    assert_eq!(
        w["uid"]["map"],
        json!([{"inside": 0, "outside": outside, "count": 1}])
    );
    assert_eq!(mon["uid"]["inside"], euid);
    // The fake worker does not confine itself: /proc says so, and so does its own report.
    assert_eq!(w["seccomp"]["mode"], "disabled");
    assert_eq!(w["seccomp"]["filters"], 0);
    assert!(w["seccomp"].get("instructions").is_none(), "{w}");
    assert_eq!(w["landlock"]["source"], "worker-reported");
    assert_eq!(w["landlock"]["status"], "not-enforced");
    assert_eq!(mon["landlock"]["source"], "monitor-recorded");
    // Capabilities and limits as /proc shows them at this moment.
    let cap = |key: &str| u64::from_str_radix(&status_field(pid, key), 16).expect("hex");
    assert_eq!(w["capabilities"]["effective"], cap("CapEff"));
    assert_eq!(w["capabilities"]["bounding"], cap("CapBnd"));
    let files = w["rlimits"]
        .as_array()
        .expect("rlimits")
        .iter()
        .find(|l| l["name"] == "Max open files")
        .cloned()
        .expect("nofile");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("line");
    assert!(
        line.contains(&files["soft"].to_string()),
        "{line} vs {files}"
    );
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success());
}

#[test]
fn x_query_sandbox_under_sandbox_off_shows_shared_namespaces() {
    let s = Scratch::new("sbx-query-off");
    let (mut m, sock) = start(&s, "", &["--sandbox", "off"]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let pid = worker_pid(&s);
    let v = query_sandbox(&mut q);
    assert_eq!(v["mode"], "off", "{v}");
    let w = &v["processes"][1];
    assert_eq!(w["pid"], pid);
    assert_eq!(w["ns-pid"], pid);
    assert!(
        w["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .all(|n| n["differs-from-monitor"] == false),
        "{w}"
    );
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
