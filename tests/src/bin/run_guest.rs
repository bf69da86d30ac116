//! `run_guest`: boots the default guest (Debian's cloud kernel with the kit's busybox
//! initramfs) through Bulkhead, shows its console and tells where its QMP socket is.
//!
//! On a host with a standard Intel/AMD `/dev/kvm`, Bulkhead runs directly with QMP on
//! `./bulkhead.qmp` and the console on this terminal. On a PVM host (`/sys/module/kvm_pvm`),
//! whose KVM cannot boot an unmodified Linux, Bulkhead runs inside an L1 VM under QEMU/TCG
//! (kvm_amd there gives a standard `/dev/kvm`); the L2 console is streamed here and QMP is
//! forwarded to a loopback TCP port on this host.
//!
//! `scripts/run-guest.sh` builds everything and runs this.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use bulkhead_tests::kit::{self, GuestKit};

fn main() -> anyhow::Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "idle".into());
    let kit = GuestKit::get().context("building the guest kit")?;
    if Path::new("/sys/module/kvm_pvm").exists() {
        nested(&mode)
    } else if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        direct(&kit, &mode)
    } else {
        bail!("/dev/kvm is missing or not usable: Bulkhead needs KVM")
    }
}

/// Standard KVM: exec Bulkhead on this terminal.
fn direct(kit: &GuestKit, mode: &str) -> anyhow::Result<()> {
    let bin = kit::bin_dir().join("bulkhead");
    let kernel = kit.l2_bzimage.to_string_lossy().into_owned();
    let initrd = kit.l2_initrd.to_string_lossy().into_owned();
    let append = format!("console=ttyS0 bulkhead.test={mode}");
    eprintln!("run_guest: QMP at unix:./bulkhead.qmp; console follows (quit with QMP `quit`)");
    let err = std::process::Command::new(&bin)
        .args([
            "-m", "256", "-kernel", &kernel, "-initrd", &initrd, "-append", &append,
        ])
        .args(["-nographic", "-serial", "stdio"])
        .args(["-qmp", "unix:./bulkhead.qmp,server=on,wait=off"])
        .exec();
    Err(err).with_context(|| format!("exec {}", bin.display()))
}

/// PVM host: Bulkhead inside an L1 VM, console streamed here.
fn nested(mode: &str) -> anyhow::Result<()> {
    eprintln!(
        "run_guest: this host's /dev/kvm is PVM, which cannot boot an unmodified Linux: \
         running Bulkhead inside an L1 VM (QEMU/TCG with kvm_amd)"
    );
    let vm = bulkhead_tests::boot_l1_for_bulkhead("run-guest")?;
    let args = bulkhead_tests::bulkhead_l2_args(1, mode, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    eprintln!("run_guest: in L1: bulkhead {}", args.join(" "));
    let guest = vm.spawn_bulkhead(&args)?;
    eprintln!(
        "run_guest: QMP at tcp:127.0.0.1:{} (forwarded into L1); console follows; \
         Ctrl-C ends it",
        vm.qmp_port()
    );
    let out = vm.bulkhead_output();
    let mut mark = guest.start_mark();
    loop {
        for line in out.lines_since(mark) {
            println!("{line}");
        }
        mark = out.mark();
        if let Some(status) = guest.exit_status()? {
            eprintln!("run_guest: bulkhead exited with status {status}");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
