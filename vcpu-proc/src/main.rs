//! `bulkhead-vcpu --ipc-fd N`: the machine worker the monitor spawns.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use anyhow::{bail, Context};
use bulkhead_ipc::Channel;
use bulkhead_vcpu::control;

fn parse_args() -> anyhow::Result<RawFd> {
    let mut args = std::env::args().skip(1);
    let mut fd = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--ipc-fd" => {
                let v = args.next().context("--ipc-fd needs a value")?;
                fd = Some(v.parse::<RawFd>().context("--ipc-fd takes a number")?);
            }
            other => bail!("unknown argument {other:?} (usage: bulkhead-vcpu --ipc-fd N)"),
        }
    }
    let fd = fd.context("usage: bulkhead-vcpu --ipc-fd N")?;
    if fd < 3 {
        bail!("--ipc-fd must be 3 or more");
    }
    Ok(fd)
}

fn main() -> anyhow::Result<()> {
    bulkhead_vcpu::logger::init();
    let ipc_fd = parse_args()?;
    // SAFETY: getppid has no arguments and cannot fail.
    let parent = unsafe { libc::getppid() };
    bulkhead_sandbox::die_with_parent(parent).context("die_with_parent")?;
    bulkhead_sandbox::set_no_new_privs().context("no_new_privs")?;
    bulkhead_sandbox::close_fds_except(3, &[ipc_fd]).context("closing inherited fds")?;
    // SAFETY: the monitor passed this fd to us as our end of the ipc socketpair; nothing else
    // in this process owns it (every other inherited fd was just closed).
    let sock = unsafe { OwnedFd::from_raw_fd(ipc_fd) };
    let chan = Channel::from_fd(sock);
    let exit = control::serve(chan).context("ipc")?;
    log::info!("exiting: {exit:?}");
    // vCPU threads may still be unwinding out of KVM_RUN; exit without waiting for them.
    std::process::exit(0);
}
