//! Proof by attack, vcpu and monitor roles ([`PROBED`]): `bulkhead-sandbox-probe` is launched by
//! the real launcher in a role's namespaces, enters the role's sandbox and makes one attempt of
//! `bulkhead_sandbox::attack` (one process per attempt: a killed attempt takes its process
//! with it). Each attempt is run twice: under the whole sandbox (what stops it first) and with
//! seccomp left out (what stops it below seccomp); an attempt landlock stops there is run a third
//! time without landlock too, to prove it was landlock. The outcomes must match the two tables
//! in `docs/SECURITY.md`, those roles' columns (`BULKHEAD_BLESS_SECURITY_MD=1` rewrites those
//! columns from what was observed), and no worker attempt may succeed under the whole sandbox.
//!
//! Run: `cargo test -p bulkhead-sandbox --features attack-hook --test attacks -- --nocapture`.
#![cfg(feature = "attack-hook")]

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bulkhead_sandbox::attack::{
    self, began, judge, parse_result, pipe, sealed_memfd, Attack, Layer, Observed, Target, Verdict,
};
use bulkhead_sandbox::launch::{Child, Command, IdMap};
use bulkhead_sandbox::Role;

const PROBE: &str = env!("CARGO_BIN_EXE_bulkhead-sandbox-probe");
/// The roles whose columns the probe gives. blockd and netd columns come from the real
/// standalone workers (blockd/tests/attacks.rs, netd/tests/attacks.rs); the vcpu column of the
/// "whole sandbox" table is also checked against the real `bulkhead-vcpu`
/// (vcpu-proc/tests/attacks.rs).
const PROBED: [Role; 2] = [Role::Vcpu, Role::Monitor];
/// The fd at which a probe finds the (sealed) guest-memory memfd.
const MEM_FD: i32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Full,
    NoSeccomp,
    NoSeccompNoLandlock,
}

impl Variant {
    fn arg(self) -> Option<&'static str> {
        match self {
            Variant::Full => None,
            Variant::NoSeccomp => Some("no-seccomp"),
            Variant::NoSeccompNoLandlock => Some("no-seccomp-no-landlock"),
        }
    }
}

struct World {
    target_worker: Target,
    target_monitor: Target,
    mem: OwnedFd,
    _listener: std::net::TcpListener,
    canary: &'static mut [u8; 64],
    scratch: PathBuf,
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        assert!(Instant::now() < deadline, "the probe did not exit");
        std::thread::sleep(Duration::from_millis(2));
    }
}

struct Run {
    observed: Observed,
    ready: String,
    landlock_on: bool,
}

fn run(w: &World, role: Role, variant: Variant, a: Attack) -> Run {
    let target = if role.policy().namespaces == 0 {
        &w.target_monitor
    } else {
        &w.target_worker
    };
    let (out_r, out_w) = pipe();
    let devnull = std::fs::File::open("/dev/null").expect("/dev/null");
    let mut cmd = Command::new(Path::new(PROBE)).expect("command");
    let t = target.to_arg();
    let mut args = vec![role.name(), "on", "attack", a.name(), t.as_str()];
    args.extend(variant.arg());
    for x in args {
        cmd.arg(x).expect("arg");
    }
    cmd.fd(devnull.as_fd(), 0).expect("fd");
    cmd.fd(out_w.as_fd(), 1).expect("fd");
    cmd.fd(std::io::stderr().as_fd(), 2).expect("fd");
    cmd.fd(w.mem.as_fd(), MEM_FD).expect("fd");
    cmd.report_pipe(true);
    let policy = role.policy();
    if policy.namespaces != 0 {
        cmd.namespaces(
            policy.namespaces,
            Some(IdMap::for_current_user(None).expect("ids")),
        );
    }
    let mut child = cmd.spawn().expect("spawn");
    drop(out_w);
    let mut text = String::new();
    std::fs::File::from(out_r)
        .read_to_string(&mut text)
        .expect("read");
    let status = wait_exit(&mut child);
    let ready = text
        .lines()
        .find(|l| l.starts_with("READY "))
        .unwrap_or_else(|| panic!("{role:?} {variant:?} {a:?}: never ready: {text:?} {status:?}"))
        .to_string();
    assert!(
        began(&text, a),
        "{role:?} {variant:?} {a:?}: the attempt did not start: {text:?}"
    );
    let observed = match status.signal() {
        Some(signal) => Observed::Killed {
            signal,
            violation: (signal == libc::SIGSYS)
                .then(|| child.violation())
                .flatten(),
        },
        None => match parse_result(&text, a) {
            Some(o) => Observed::Returned(o),
            None => Observed::Vanished(status.code()),
        },
    };
    let landlock_on = !ready.contains("landlock ABI 0");
    Run {
        observed,
        ready,
        landlock_on,
    }
}

fn judged(role: Role, variant: Variant, a: Attack, r: &Run) -> Verdict {
    judge(a, &r.observed, r.landlock_on).unwrap_or_else(|e| {
        panic!(
            "{role:?} {variant:?}: {e}\n  observed {:?}\n  {}",
            r.observed, r.ready
        )
    })
}

fn security_md() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/SECURITY.md")
}

#[test]
fn every_attempt_fails_in_the_probed_roles_and_docs_say_what_stops_it() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let canary: &'static mut [u8; 64] = Box::leak(Box::new([0x11u8; 64]));
    let scratch = std::env::temp_dir().join(format!("bulkhead-attack-mnt-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let pid = std::process::id() as i32;
    let addr = canary.as_ptr() as u64;
    let w = World {
        target_worker: Target {
            monitor_pid: pid,
            monitor_addr: addr,
            port,
            mount_point: "/".into(),
        },
        target_monitor: Target {
            monitor_pid: pid,
            monitor_addr: addr,
            port,
            mount_point: scratch.display().to_string(),
        },
        mem: sealed_memfd(),
        _listener: listener,
        canary,
        scratch,
    };
    assert!(Path::new("/etc/passwd").exists() && Path::new("/bin/sh").exists());

    let mut full: [BTreeMap<Attack, String>; PROBED.len()] = Default::default();
    let mut below: [BTreeMap<Attack, String>; PROBED.len()] = Default::default();
    let mut failures = Vec::new();
    for (col, role) in PROBED.into_iter().enumerate() {
        for a in Attack::ALL {
            let r = run(&w, role, Variant::Full, a);
            let v = judged(role, Variant::Full, a, &r);
            let worker = role.policy().namespaces != 0;
            if worker && v.layer == Layer::NotStopped {
                failures.push(format!("{role:?} {a:?} succeeded: {}", v.cell));
            }
            eprintln!("{:8} {:22} full:   {}", role.name(), a.name(), v.cell);
            full[col].insert(a, v.cell);

            let r = run(&w, role, Variant::NoSeccomp, a);
            let v = judged(role, Variant::NoSeccomp, a, &r);
            assert!(r.ready.contains("seccomp 0 BPF"), "{}", r.ready);
            eprintln!("{:8} {:22} below:  {}", role.name(), a.name(), v.cell);
            if v.layer == Layer::Landlock {
                // Prove it: the same attempt without landlock gets further.
                let r2 = run(&w, role, Variant::NoSeccompNoLandlock, a);
                assert!(!r2.landlock_on, "landlock still applied: {}", r2.ready);
                let v2 = judged(role, Variant::NoSeccompNoLandlock, a, &r2);
                eprintln!("{:8} {:22} no LL:  {}", role.name(), a.name(), v2.cell);
                assert_ne!(v2.layer, Layer::Landlock, "{role:?} {a:?}");
            }
            below[col].insert(a, v.cell);
        }
    }
    // Nothing reached the monitor's buffer.
    // SAFETY: a volatile read of our own live buffer (another process may have written it).
    let canary = unsafe { std::ptr::read_volatile(&*w.canary) };
    assert_eq!(canary, [0x11u8; 64], "the monitor's memory was written");
    let _ = std::fs::remove_dir(&w.scratch);
    assert!(failures.is_empty(), "{failures:#?}");

    let full: Vec<_> = PROBED.into_iter().zip(full.iter()).collect();
    let below: Vec<_> = PROBED.into_iter().zip(below.iter()).collect();
    let errs: Vec<String> = [
        attack::check_columns(&security_md(), "attacks-full", &full),
        attack::check_columns(&security_md(), "attacks-below-seccomp", &below),
    ]
    .into_iter()
    .filter_map(Result::err)
    .collect();
    assert!(errs.is_empty(), "{}", errs.join("\n\n"));
}
