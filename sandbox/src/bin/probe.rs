//! `bulkhead-sandbox-probe ROLE MODE ACTION [ARG]`: a tiny worker for the sandbox crate's
//! integration tests. It enters ROLE's sandbox (`--sandbox` MODE; guest size 64 MiB, 1 vCPU),
//! prints `READY <enter report>` on stdout, then:
//! - `wait`: reads stdin until EOF and exits 0;
//! - `syscall NR`: makes system call NR with zero arguments (a forbidden one kills it by SIGSYS);
//! - `ioctl REQUEST`: `ioctl(0, REQUEST, 0)` (hex or decimal), then prints the result.

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
        vcpus: 1,
    };
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
