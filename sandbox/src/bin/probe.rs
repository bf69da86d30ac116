//! `bulkhead-sandbox-probe ROLE MODE ACTION [ARG]`: a tiny worker for the sandbox crate's
//! integration tests. It enters ROLE's sandbox (`--sandbox` MODE; guest size 64 MiB, 1 vCPU),
//! prints `READY <enter report>` on stdout, then:
//! - `wait`: reads stdin until EOF and exits 0;
//! - `syscall NR`: makes system call NR with zero arguments (a forbidden one kills it by SIGSYS);
//! - `ioctl REQUEST`: `ioctl(0, REQUEST, 0)` (hex or decimal), then prints the result.
//!
//! With the feature `attack-hook` (tests only) also `attack NAME TARGET [LAYERS]`: runs one of
//! `bulkhead_sandbox::attack`'s attempts against TARGET (`pid=…,addr=…,port=…,mnt=…`) and
//! reports it on stdout; LAYERS (`no-seccomp`, `no-seccomp-no-landlock`) leaves layers out of
//! the sandbox, to see what stops the attempt below them.

use std::io::{Read, Write};

use bulkhead_sandbox::{enter, Mode, Params, Role, REPORT_FD};

fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: bulkhead-sandbox-probe ROLE MODE wait|syscall NR|ioctl REQUEST";
    let (Some(role), Some(mode), Some(action)) = (
        args.get(1).and_then(|r| Role::from_name(r)),
        args.get(2).and_then(|m| Mode::from_name(m)),
        args.get(3),
    ) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let arg = args.get(4).and_then(|a| number(a));
    let params = Params {
        mem_bytes: 64 << 20,
        ..Params::default()
    };
    #[cfg(feature = "attack-hook")]
    if action == "attack" {
        attack(role, mode, &params, &args[4..]);
        return;
    }
    let report = match enter(role.policy(), &params, mode, Some(REPORT_FD)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bulkhead-sandbox-probe: {e}");
            std::process::exit(1);
        }
    };
    let mut out = std::io::stdout();
    let _ = writeln!(out, "READY {report}");
    let _ = out.flush();
    match (action.as_str(), arg) {
        ("wait", _) => {
            let mut buf = [0u8; 64];
            while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
        }
        ("syscall", Some(nr)) => {
            // SAFETY: a test of the filter: the call is expected never to run.
            let rc = unsafe { libc::syscall(nr as libc::c_long, 0, 0, 0, 0, 0, 0) };
            let _ = writeln!(out, "syscall {nr} returned {rc}");
        }
        ("ioctl", Some(req)) => {
            // SAFETY: an ioctl on stdin with a null argument; expected to be refused or trapped.
            let rc = unsafe { libc::ioctl(0, req as libc::c_ulong, 0) };
            let _ = writeln!(out, "ioctl {req:#x} returned {rc}");
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}

/// `attack NAME TARGET [LAYERS]`.
#[cfg(feature = "attack-hook")]
fn attack(role: Role, mode: Mode, params: &Params, args: &[String]) {
    use bulkhead_sandbox::attack::{self, Attack, Target};
    let usage = "usage: bulkhead-sandbox-probe ROLE MODE attack NAME TARGET \
                 [no-seccomp|no-seccomp-no-landlock]";
    let (Some(which), Some(target)) = (
        args.first().and_then(|a| Attack::from_name(a)),
        args.get(1).and_then(|t| Target::parse(t)),
    ) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let (no_seccomp, no_landlock) = match args.get(2).map(String::as_str) {
        None => (false, false),
        Some("no-seccomp") => (true, false),
        Some("no-seccomp-no-landlock") => (true, true),
        Some(_) => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let report =
        match attack::enter_without(role, params, mode, Some(REPORT_FD), no_seccomp, no_landlock) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("bulkhead-sandbox-probe: {e}");
                std::process::exit(1);
            }
        };
    let mut out = std::io::stdout();
    let _ = writeln!(out, "READY {report}");
    let _ = out.flush();
    attack::run_and_report(which, role, &target, 1);
}
