//! Reference run: QEMU with KVM inside L1 boots the same L2 kit that the Bulkhead tests use.
//!
//! This validates the environment independently of Bulkhead (nested KVM in L1 works, the L2
//! kernel and initramfs behave as the Bulkhead tests expect) and gives the baseline L2 boot time
//! to compare Bulkhead with.

use std::time::{Duration, Instant};

use anyhow::Result;
use bulkhead_tests::{qemu_l2_argv, record_timing, NestedOpts, NestedVm};

#[test]
fn qemu_kvm_in_l1_boots_the_l2_kit() -> Result<()> {
    let vm = NestedVm::boot(NestedOpts {
        with_bulkhead: false,
        with_host_qemu: true,
        ..NestedOpts::new("reference-qemu")
    })?;
    println!("L1 boot: {:.1}s", vm.boot_time().as_secs_f64());
    let argv = qemu_l2_argv(2, "idle");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let qemu = vm.spawn(&argv)?;
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
