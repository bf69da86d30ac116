//! Proof by attack against the real, standalone `bulkhead-blockd`: started on a 1 MiB image with
//! `--sandbox on`, it opens the image, binds its socket and enters the blockd sandbox, and then,
//! instead of accepting a front end, makes one attempt of `bulkhead_sandbox::attack`
//! (`--attack`, a hook compiled only with the feature `attack-hook`), one worker per attempt.
//! It holds what it holds in service at that point (the image fds, the listening socket) plus a
//! sealed 1 MiB memfd the test hands it in place of the guest memory a front end would send.
//! Each attempt runs under the whole sandbox and again with seccomp left out
//! (`--attack-without seccomp`; where landlock stops it there, a third time without landlock
//! too, which must get further). No attempt may succeed under the whole sandbox, and the
//! outcomes must be the blockd columns of both tables in `docs/SECURITY.md`
//! (`BULKHEAD_BLESS_SECURITY_MD=1` rewrites those two columns from what was observed).
//!
//! Run: `cargo test -p bulkhead-blockd-proc --features attack-hook --test attacks -- --nocapture`.
#![cfg(feature = "attack-hook")]

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use bulkhead_sandbox::attack::{self, pipe, sealed_memfd, Attack, Observed, Target};
use bulkhead_sandbox::launch::Command;
use bulkhead_sandbox::Role;

const WORKER: &str = env!("CARGO_BIN_EXE_bulkhead-blockd");

fn attempt(a: Attack, extra: &[&str], target: &Target, dir: &Path, mem: &OwnedFd) -> Observed {
    let image = dir.join("disk.img");
    let socket = dir.join(format!("{}.sock", a.name()));
    let _ = std::fs::remove_file(&socket);
    let (out_r, out_w) = pipe();
    let devnull = std::fs::File::open("/dev/null").expect("/dev/null");
    let mut cmd = Command::new(Path::new(WORKER)).expect("command");
    let t = target.to_arg();
    for x in [
        "--socket",
        socket.to_str().expect("utf-8 path"),
        "--file",
        image.to_str().expect("utf-8 path"),
        "--sandbox",
        "on",
        "--attack",
        a.name(),
        "--attack-target",
        &t,
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        cmd.arg(x).expect("arg");
    }
    cmd.fd(devnull.as_fd(), 0).expect("fd");
    cmd.fd(out_w.as_fd(), 1).expect("fd");
    cmd.fd(std::io::stderr().as_fd(), 2).expect("fd");
    cmd.fd(mem.as_fd(), 5).expect("fd");
    cmd.report_pipe(true);
    let child = cmd.spawn().expect("spawn");
    drop(out_w);
    let observed =
        attack::observe(child, out_r, a, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_file(&socket);
    observed
}

#[test]
fn every_attempt_fails_in_the_real_blockd_and_docs_say_what_stops_it() {
    let dir = std::env::temp_dir().join(format!("bulkhead-blockd-attack-{}", std::process::id()));
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).expect("temp dirs");
    std::fs::write(dir.join("disk.img"), vec![0u8; 1 << 20]).expect("image");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let canary: &'static mut [u8; 64] = Box::leak(Box::new([0x11u8; 64]));
    let target = Target {
        monitor_pid: std::process::id() as i32,
        monitor_addr: canary.as_ptr() as u64,
        port: listener.local_addr().expect("addr").port(),
        // The standalone worker shares the host's mounts: aim `mount` at a scratch directory.
        mount_point: mnt.display().to_string(),
    };
    let mem = sealed_memfd();
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/SECURITY.md");
    let proved = attack::prove_standalone(Role::Blockd, &doc, |a, extra| {
        attempt(a, extra, &target, &dir, &mem)
    });
    // SAFETY: a volatile read of our own live buffer (another process may have written it).
    let canary = unsafe { std::ptr::read_volatile(&*canary) };
    assert_eq!(canary, [0x11u8; 64], "the monitor's memory was written");
    drop(listener);
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = proved {
        panic!("{e}");
    }
}
