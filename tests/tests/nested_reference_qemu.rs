//! Reference run: QEMU with KVM inside L1 boots the same L2 kit that the Bulkhead tests use.
//!
//! This validates the environment independently of Bulkhead (nested KVM in L1 works, the L2
//! kernel and initramfs behave as the Bulkhead tests expect) and gives the baseline L2 boot time
//! to compare Bulkhead with.

use std::time::{Duration, Instant};

use anyhow::Result;
use bulkhead_tests::kit::{L2_BZIMAGE, L2_INITRD};
use bulkhead_tests::{l2_append, record_timing, NestedOpts, NestedVm};

#[test]
fn qemu_kvm_in_l1_boots_the_l2_kit() -> Result<()> {
    let vm = NestedVm::boot(NestedOpts {
        with_bulkhead: false,
        with_host_qemu: true,
        ..NestedOpts::new("reference-qemu")
    })?;
    println!("L1 boot: {:.1}s", vm.boot_time().as_secs_f64());
    let append = l2_append("idle");
    let qemu = vm.spawn(&[
        "/usr/bin/qemu-system-x86_64",
        "-enable-kvm",
        "-cpu",
        "host",
        "-M",
        "q35",
        "-m",
        "256",
        "-smp",
        "2",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        L2_BZIMAGE,
        "-initrd",
        L2_INITRD,
        "-append",
        &append,
        "-serial",
        "stdio",
    ])?;
    let started = Instant::now();
    qemu.wait_for_console("BULKHEAD-GUEST-UP", Duration::from_secs(300))?;
    record_timing(
        "reference: QEMU/KVM start in L1 -> L2 BULKHEAD-GUEST-UP",
        started.elapsed().as_secs_f64(),
    );
    qemu.wait_for_console("BULKHEAD-NCPUS=2", Duration::from_secs(60))?;
    qemu.wait_for_console("BULKHEAD-TICK 2 ", Duration::from_secs(60))?;
    qemu.kill("KILL")?;
    Ok(())
}
