//! Proof by attack against the real `bulkhead-vcpu`: launched in its namespaces, fully confined
//! (`--sandbox on`) and set up with guest memory on this host's KVM, the worker is made to try
//! each attempt of `bulkhead_sandbox::attack` (`--attack`, a hook compiled only with the
//! feature `attack-hook`), one worker per attempt. Every attempt must fail, and the outcome must
//! be the vcpu column of the "whole sandbox" table in `docs/SECURITY.md` (which
//! `sandbox/tests/attacks.rs` also checks with the probe under the vcpu policy).
//!
//! Run: `cargo test -p bulkhead-vcpu-proc --features attack-hook --test attacks -- --nocapture`.
#![cfg(feature = "attack-hook")]

mod common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_ipc::messages::{VcpuReply, VcpuRequest};
use bulkhead_sandbox::attack::{self, judge, parse_result, pipe, Attack, Layer, Observed, Target};
use common::guest;
use common::harness::{Boot, Worker};

const WORKER: &str = env!("CARGO_BIN_EXE_bulkhead-vcpu");
const TRIGGER_FD: i32 = 5;
const T: Duration = Duration::from_secs(20);

fn guest_file() -> guest::GuestFile {
    guest::GuestFile::new("attack", "guest")
}

/// Runs `a` in a fresh, set-up worker and reports what happened.
fn attempt(a: Attack, target: &Target, kernel: &Path) -> Observed {
    let (out_r, out_w) = pipe();
    let (trig_r, trig_w) = pipe();
    let t = target.to_arg();
    let fd = TRIGGER_FD.to_string();
    let mut w = Worker::spawn_with(
        Path::new(WORKER),
        64,
        1,
        &[
            "--attack",
            a.name(),
            "--attack-target",
            &t,
            "--attack-trigger-fd",
            &fd,
        ],
        Some(out_w.as_fd()),
        &[(trig_r.as_fd(), TRIGGER_FD)],
    )
    .expect("spawn");
    drop(out_w);
    drop(trig_r);
    let reply = w
        .setup(&Boot {
            kernel,
            initrd: None,
            cmdline: "c",
            mem_mib: 64,
            vcpus: 1,
            no_reboot: false,
            serial_in: false,
            echo: false,
        })
        .expect("setup reply");
    assert_eq!(reply, VcpuReply::Ok, "{a:?}");
    // Collect stdout (the attack's lines) until the worker closes it.
    let text = Arc::new(Mutex::new(String::new()));
    let t2 = text.clone();
    let mut out = std::fs::File::from(out_r);
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                return;
            }
            t2.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    std::fs::File::from(trig_w)
        .write_all(b"!")
        .expect("trigger");
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(s) = w.child.try_wait().expect("try_wait") {
            break Some(s);
        }
        let seen = text.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if parse_result(&seen, a).is_some() {
            break None;
        }
        assert!(Instant::now() < deadline, "{a:?}: no outcome: {seen:?}");
        std::thread::sleep(Duration::from_millis(5));
    };
    let status = match status {
        Some(s) => s,
        None => {
            // The attempt returned and the worker lives on: it must still serve the monitor.
            w.ok(VcpuRequest::Quit).expect("quit after the attempt");
            let deadline = Instant::now() + T;
            loop {
                if let Some(s) = w.child.try_wait().expect("try_wait") {
                    break s;
                }
                assert!(Instant::now() < deadline, "{a:?}: no exit after Quit");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    let _ = reader.join();
    let text = text.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(
        attack::began(&text, a),
        "{a:?}: the attempt did not start: {text:?} {status:?}"
    );
    match status.signal() {
        Some(signal) => Observed::Killed {
            signal,
            violation: (signal == libc::SIGSYS)
                .then(|| w.child.violation())
                .flatten(),
        },
        None => match parse_result(&text, a) {
            Some(o) => Observed::Returned(o),
            None => Observed::Vanished(status.code()),
        },
    }
}

#[test]
fn every_attempt_fails_in_the_real_vcpu_worker_as_docs_say() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("/dev/kvm is not usable here ({e}): this test drives the real KVM");
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let canary: &'static mut [u8; 64] = Box::leak(Box::new([0x11u8; 64]));
    let target = Target {
        monitor_pid: std::process::id() as i32,
        monitor_addr: canary.as_ptr() as u64,
        port: listener.local_addr().expect("addr").port(),
        mount_point: "/".into(),
    };
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/SECURITY.md"))
            .expect("docs/SECURITY.md");
    let table = attack::parse_table(
        attack::table_section(&doc, "attacks-full").expect("the attacks-full table"),
    );
    let kernel = guest_file();
    let mut wrong = Vec::new();
    for a in Attack::ALL {
        let observed = attempt(a, &target, &kernel);
        let v = judge(a, &observed, true).unwrap_or_else(|e| panic!("{e}: {observed:?}"));
        eprintln!("{:22} {}", a.name(), v.cell);
        assert_ne!(
            v.layer,
            Layer::NotStopped,
            "{a:?} succeeded in bulkhead-vcpu"
        );
        let documented = table.get(&a).and_then(|row| row.first());
        if documented != Some(&v.cell) {
            wrong.push(format!(
                "{}: observed {:?}, docs/SECURITY.md says {documented:?}",
                a.name(),
                v.cell
            ));
        }
    }
    // SAFETY: a volatile read of our own live buffer (another process may have written it).
    let canary = unsafe { std::ptr::read_volatile(&*canary) };
    assert_eq!(canary, [0x11u8; 64], "the monitor's memory was written");
    drop(listener);
    drop(kernel);
    assert!(wrong.is_empty(), "{wrong:#?}");
}
