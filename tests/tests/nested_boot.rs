//! Bulkhead boots a real Linux guest (L2) on a standard /dev/kvm inside an L1 VM.
//!
//! These tests need the Bulkhead binaries (`cargo build --release --bins`); they fail loudly
//! when anything they need is missing.

use std::time::Duration;

use anyhow::Result;
use bulkhead_tests::{boot_l1_for_bulkhead, record_timing, spawn_l2_guest, L2_BOOT_TIMEOUT};

#[test]
fn l2_guest_reaches_init() -> Result<()> {
    let vm = boot_l1_for_bulkhead("boot-guest-up")?;
    let bh = spawn_l2_guest(&vm, 1, "idle", &[])?;
    bh.wait_for_console("BULKHEAD-GUEST-UP", L2_BOOT_TIMEOUT)?;
    record_timing(
        "bulkhead start -> L2 BULKHEAD-GUEST-UP",
        bh.started().elapsed().as_secs_f64(),
    );
    bh.wait_for_console("BULKHEAD-NCPUS=1", Duration::from_secs(60))?;
    // The guest keeps running: its 1 s ticks arrive.
    bh.wait_for_console("BULKHEAD-TICK 1 ", Duration::from_secs(60))?;
    let mut qmp = vm.qmp(Duration::from_secs(30))?;
    assert_eq!(qmp.query_status()?, ("running".to_owned(), true));
    Ok(())
}

#[test]
fn smp2_guest_sees_two_cpus() -> Result<()> {
    let vm = boot_l1_for_bulkhead("boot-smp2")?;
    let bh = spawn_l2_guest(&vm, 2, "idle", &[])?;
    bh.wait_for_console("BULKHEAD-GUEST-UP", L2_BOOT_TIMEOUT)?;
    let line = bh.wait_for_console("BULKHEAD-NCPUS=", Duration::from_secs(60))?;
    assert!(
        line.contains("BULKHEAD-NCPUS=2"),
        "guest reported {line:?}, expected 2 CPUs"
    );
    bh.wait_for_console("BULKHEAD-TICK 1 ", Duration::from_secs(60))?;
    Ok(())
}
