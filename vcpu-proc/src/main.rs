//! `bulkhead-vcpu --ipc-fd N [--sandbox on|off|allow-weak] [--mem-bytes N] [--vcpus N]`: the
//! machine worker the monitor spawns.
//!
//! Before it reads a single frame from the monitor (and so long before any guest code runs),
//! it confines itself with the vcpu role's policy ([`bulkhead_sandbox::enter`]): the whole
//! sandbox, seccomp included, is in place before the handshake. Guest RAM size and vCPU count
//! come on the command line because the address-space and thread limits depend on them; the
//! `Setup` frame that follows must agree (a bigger guest simply fails to map).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use anyhow::{bail, Context};
use bulkhead_ipc::Channel;
use bulkhead_sandbox::{Mode, Params, Role, REPORT_FD};
use bulkhead_vcpu::control;

struct Args {
    ipc_fd: RawFd,
    mode: Mode,
    params: Params,
}

const USAGE: &str =
    "usage: bulkhead-vcpu --ipc-fd N [--sandbox on|off|allow-weak] [--mem-bytes N] [--vcpus N]";

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut fd = None;
    let mut mode = Mode::On;
    let mut params = Params::default();
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--ipc-fd" => {
                fd = Some(
                    value()?
                        .parse::<RawFd>()
                        .context("--ipc-fd takes a number")?,
                )
            }
            "--sandbox" => {
                let v = value()?;
                mode = Mode::from_name(&v)
                    .with_context(|| format!("--sandbox {v:?}: expected on, off or allow-weak"))?;
            }
            "--mem-bytes" => {
                params.mem_bytes = value()?.parse().context("--mem-bytes takes a number")?
            }
            "--vcpus" => params.vcpus = value()?.parse().context("--vcpus takes a number")?,
            other => bail!("unknown argument {other:?} ({USAGE})"),
        }
    }
    let ipc_fd = fd.context(USAGE)?;
    if ipc_fd < 3 || ipc_fd == REPORT_FD {
        bail!("--ipc-fd must be 3 or more, and not {REPORT_FD}");
    }
    Ok(Args {
        ipc_fd,
        mode,
        params,
    })
}

fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD on an integer; no memory involved.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

fn main() -> anyhow::Result<()> {
    bulkhead_vcpu::logger::init();
    let args = parse_args()?;
    // SAFETY: getppid has no arguments and cannot fail.
    let parent = unsafe { libc::getppid() };
    bulkhead_sandbox::die_with_parent(parent).context("die_with_parent")?;
    bulkhead_sandbox::set_no_new_privs().context("no_new_privs")?;
    bulkhead_sandbox::close_fds_except(3, &[args.ipc_fd, REPORT_FD])
        .context("closing inherited fds")?;
    let report_fd = fd_is_open(REPORT_FD).then_some(REPORT_FD);
    let report = bulkhead_sandbox::enter(Role::Vcpu.policy(), &args.params, args.mode, report_fd)
        .context("sandbox")?;
    match args.mode {
        Mode::Off => log::warn!("running WITHOUT a sandbox (--sandbox off)"),
        _ if !report.weak.is_empty() => log::warn!("{report}"),
        _ => log::info!("{report}"),
    }
    // SAFETY: the monitor passed this fd to us as our end of the ipc socketpair; nothing else
    // in this process owns it (every other inherited fd was just closed).
    let sock = unsafe { OwnedFd::from_raw_fd(args.ipc_fd) };
    let chan = Channel::from_fd(sock);
    let exit = control::serve(chan).context("ipc")?;
    log::info!("exiting: {exit:?}");
    // vCPU threads may still be unwinding out of KVM_RUN; exit without waiting for them.
    std::process::exit(0);
}
