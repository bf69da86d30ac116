//! `bulkhead-vcpu --ipc-fd N [--sandbox on|off|allow-weak] [--mem-bytes N] [--vcpus N]`: the
//! machine worker the monitor spawns.
//!
//! Before it reads a single frame from the monitor (and so long before any guest code runs),
//! it confines itself with the vcpu role's policy ([`bulkhead_sandbox::enter`]): the whole
//! sandbox, seccomp included, is in place before the handshake. Guest RAM size and vCPU count
//! come on the command line because the address-space and thread limits depend on them; the
//! `Setup` frame that follows must agree (a bigger guest simply fails to map).
//!
//! Built with the feature `attack-hook` (tests only; it cannot be compiled into a release build)
//! it also takes `--attack NAME --attack-target SPEC --attack-trigger-fd N`: once confined, a
//! thread waits for a byte on fd N (the test sends it after `Setup`, so guest memory is mapped)
//! and then makes attempt NAME of `bulkhead_sandbox::attack`, reporting on stdout.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use anyhow::{bail, Context};
use bulkhead_ipc::Channel;
use bulkhead_sandbox::{Mode, Params, Role, REPORT_FD};
use bulkhead_vcpu::control;

struct Args {
    ipc_fd: RawFd,
    mode: Mode,
    params: Params,
    #[cfg(feature = "attack-hook")]
    attack: Option<Hook>,
}

/// `--attack`: what to attempt, at what, and when.
#[cfg(feature = "attack-hook")]
struct Hook {
    which: bulkhead_sandbox::attack::Attack,
    target: bulkhead_sandbox::attack::Target,
    trigger_fd: RawFd,
}

const USAGE: &str =
    "usage: bulkhead-vcpu --ipc-fd N [--sandbox on|off|allow-weak] [--mem-bytes N] [--vcpus N]";

fn parse_args() -> anyhow::Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut fd = None;
    let mut mode = Mode::On;
    let mut params = Params::default();
    #[cfg(feature = "attack-hook")]
    let (mut attack, mut target, mut trigger) = (None, None, None);
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
            #[cfg(feature = "attack-hook")]
            "--attack" => {
                let v = value()?;
                attack = Some(
                    bulkhead_sandbox::attack::Attack::from_name(&v)
                        .with_context(|| format!("--attack {v:?}: no such attempt"))?,
                );
            }
            #[cfg(feature = "attack-hook")]
            "--attack-target" => {
                let v = value()?;
                target = Some(
                    bulkhead_sandbox::attack::Target::parse(&v)
                        .with_context(|| format!("--attack-target {v:?}"))?,
                );
            }
            #[cfg(feature = "attack-hook")]
            "--attack-trigger-fd" => {
                trigger = Some(
                    value()?
                        .parse::<RawFd>()
                        .context("--attack-trigger-fd takes a number")?,
                )
            }
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
        #[cfg(feature = "attack-hook")]
        attack: match (attack, target, trigger) {
            (None, None, None) => None,
            (Some(which), Some(target), Some(trigger_fd)) => Some(Hook {
                which,
                target,
                trigger_fd,
            }),
            _ => bail!("--attack needs --attack-target and --attack-trigger-fd"),
        },
    })
}

fn main() -> anyhow::Result<()> {
    bulkhead_worker::logger::init("bulkhead-vcpu");
    let args = parse_args()?;
    #[allow(unused_mut)]
    let mut keep = Vec::new();
    #[cfg(feature = "attack-hook")]
    keep.extend(args.attack.as_ref().map(|h| h.trigger_fd));
    let report_fd = bulkhead_worker::confine::prepare(args.ipc_fd, &keep)
        .map_err(|e| anyhow::Error::new(e.source).context(e.what))?;
    let report = bulkhead_sandbox::enter(Role::Vcpu.policy(), &args.params, args.mode, report_fd)
        .context("sandbox")?;
    bulkhead_worker::confine::log_entered(module_path!(), args.mode, &report);
    #[cfg(feature = "attack-hook")]
    if let Some(hook) = args.attack {
        std::thread::Builder::new()
            .name("attack".into())
            .spawn(move || {
                let mut b = 0u8;
                // SAFETY: read(2) of one byte into a local.
                let n = unsafe { libc::read(hook.trigger_fd, (&mut b as *mut u8).cast(), 1) };
                if n == 1 {
                    bulkhead_sandbox::attack::run_and_report(
                        hook.which,
                        Role::Vcpu,
                        &hook.target,
                        libc::STDOUT_FILENO,
                    );
                }
            })
            .context("starting the attack thread")?;
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
