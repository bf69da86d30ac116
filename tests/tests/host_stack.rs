//! The whole stack on this host's own `/dev/kvm`: the release `bulkhead` monitor launches the
//! real, sandboxed `bulkhead-vcpu`, which runs the small layer-1 test guest (hand-assembled
//! 64-bit code, `vcpu-proc/tests/guest/guest.S`, loaded as an ELF "kernel"). A Linux guest
//! cannot run on this host's PVM KVM; the nested tests cover that. What this file adds:
//!
//! - monitor + worker + KVM end to end without a nested VM: boot, serial output, ACPI poweroff
//!   ending the monitor with status 0;
//! - the hardened-host set-up the sandbox issue asks for: the monitor run as an unprivileged
//!   user (65534) that can open `/dev/kvm` and nothing else. The test gives that user a
//!   `/dev/kvm` of its own in a private mount namespace (a device node for the same device,
//!   owned by 65534, bind-mounted over `/dev/kvm`), so the host's node is never touched. The
//!   worker must then be confined as well as under root: its own six namespaces, root inside
//!   mapped to the monitor's own uid outside, no capabilities, the vcpu seccomp filter; and the
//!   guest must run.

#[path = "../../vcpu-proc/tests/common/guest.rs"]
mod guest;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_tests::kit;
use bulkhead_tests::util::scaled;
use bulkhead_tests::Qmp;
use serde_json::Value;

const NOBODY: u32 = 65534;

/// A scratch directory every user may use, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("bulkhead-host-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        Scratch(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm on the host (it runs the layer-1 guest through the real \
         monitor and worker); it does not skip"
    );
}

fn bulkhead() -> PathBuf {
    let p = kit::bin_dir().join("bulkhead");
    assert!(
        p.exists() && kit::bin_dir().join("bulkhead-vcpu").exists(),
        "{} and bulkhead-vcpu are needed: build them first (cargo build --release --bins)",
        p.display()
    );
    p
}

fn write_guest(s: &Scratch) -> PathBuf {
    let p = s.path("guest.elf");
    std::fs::write(&p, guest::elf(&guest::CODE)).expect("write guest");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    p
}

fn wait_for_file_text(path: &Path, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in {} within {limit:?}: {text:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn guest_boots_and_powers_off_through_monitor_and_worker() {
    require_kvm();
    let s = Scratch::new("root");
    let kernel = write_guest(&s);
    let out = s.path("serial.txt");
    let run = Command::new(bulkhead())
        .args(["-m", "64", "-kernel"])
        .arg(&kernel)
        .args(["-append", "p", "-nographic", "-serial"])
        .arg(format!("file:{}", out.display()))
        .stdin(Stdio::null())
        .output()
        .expect("run bulkhead");
    let serial = std::fs::read_to_string(&out).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "bulkhead exited {:?}\nstderr: {stderr}\nserial: {serial:?}",
        run.status
    );
    assert!(
        serial.starts_with("BOOT 1\nCMOS OK"),
        "serial: {serial:?}\nstderr: {stderr}"
    );
    assert!(
        stderr.contains("sandbox entered"),
        "the worker did not report entering its sandbox: {stderr}"
    );
}

fn process<'a>(v: &'a Value, role: &str) -> &'a Value {
    v["processes"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["role"] == role))
        .unwrap_or_else(|| panic!("no {role} process in {v}"))
}

#[test]
fn an_unprivileged_monitor_with_access_to_dev_kvm_confines_its_worker() {
    require_kvm();
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test sets up the unprivileged user's /dev/kvm as root (CI runs as root)"
    );
    let s = Scratch::new("nobody");
    let kernel = write_guest(&s);
    let out = s.path("serial.txt");
    let sock = s.path("qmp.sock");
    let node = s.path("kvm");
    let log = s.path("stderr.txt");
    // In a private mount namespace: a node for the same device (10:232), owned by nobody, over
    // /dev/kvm; then drop to nobody and run the monitor.
    let script = format!(
        "set -e; mknod {node} c 10 232; chown {NOBODY}:{NOBODY} {node}; chmod 600 {node}; \
         mount --bind {node} /dev/kvm; \
         exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups --inh-caps=-all \
         --bounding-set=-all {bh} -m 64 -kernel {kernel} -append c -nographic \
         -serial file:{out} -qmp unix:{sock},server=on,wait=off 2>{log}",
        node = node.display(),
        bh = bulkhead().display(),
        kernel = kernel.display(),
        out = out.display(),
        sock = sock.display(),
        log = log.display(),
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare (util-linux) is needed");
    struct Reap<'a>(&'a mut std::process::Child);
    impl Drop for Reap<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let reap = Reap(&mut child);
    let limit = scaled(Duration::from_secs(20));
    let deadline = Instant::now() + limit;
    while !sock.exists() {
        if let Ok(Some(st)) = reap.0.try_wait() {
            panic!(
                "bulkhead as uid {NOBODY} exited {st:?}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "no QMP socket within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for_file_text(&out, "TICK", limit);
    let mut qmp = Qmp::connect_unix(&sock, limit).expect("QMP");
    let (status, running) = qmp.query_status().expect("query-status");
    assert!(running, "status {status}");
    let v = qmp
        .execute("x-query-sandbox", None)
        .expect("x-query-sandbox");
    let mon = process(&v, "monitor");
    assert_eq!(mon["uid"]["outside"], NOBODY, "monitor: {mon}");
    let w = process(&v, "vcpu");
    // Root inside its user namespace is the monitor's own uid outside: nobody.
    assert_eq!(w["uid"]["inside"], 0, "worker: {w}");
    assert_eq!(w["uid"]["outside"], NOBODY, "worker: {w}");
    assert_eq!(w["gid"]["outside"], NOBODY, "worker: {w}");
    for kind in ["user", "mnt", "pid", "ipc", "uts", "net"] {
        let n = w["namespaces"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["type"] == kind))
            .unwrap_or_else(|| panic!("no {kind} namespace: {w}"));
        assert_eq!(n["differs-from-monitor"], true, "{kind}: {n}");
    }
    for set in [
        "inheritable",
        "permitted",
        "effective",
        "bounding",
        "ambient",
    ] {
        assert_eq!(w["capabilities"][set], 0, "capabilities {set}: {w}");
    }
    assert_eq!(w["no-new-privs"], true, "{w}");
    assert_eq!(w["seccomp"]["mode"], "filter", "{w}");
    assert_ne!(w["landlock"]["status"], "not-enforced", "{w}");
    // The worker's uid as the host's /proc sees it.
    let pid = w["pid"].as_u64().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid_line}"
    );
    qmp.execute("quit", None).expect("quit");
    let deadline = Instant::now() + limit;
    let st = loop {
        if let Some(st) = reap.0.try_wait().expect("wait") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "bulkhead did not exit after quit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        st.success(),
        "exit {st:?}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
