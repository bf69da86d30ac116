//! PCI hot-plug on a running Linux guest (L2) through Bulkhead inside L1, one boot for every
//! scenario: the guest (kit mode `bulkhead.test=hotplug`) runs, with no disk and no NIC of its
//! own, and watches its `vd*` disks and `eth*` interfaces appear and go (acpiphp, built into the
//! cloud kernel, acts on the GED's hot-plug event and ejects slots through `_EJ0`).
//!
//! 1. `device_add virtio-blk-pci` on a `-drive if=none`: a blockd starts, the guest sees `vda`
//!    and reads the image's checksum; `device_del`: `{}` at once, `DEVICE_DELETED` (backend, then
//!    device) once the guest has ejected it, the blockd gone, `vda` gone in the guest, and the
//!    `-drive` gone with its device (QEMU 7.2's auto-deletion).
//! 2. `device_add virtio-net-pci` on a `-netdev tap` whose far side is L1's stack: a netd starts,
//!    the guest sees `eth0` and pings L1 through it; `device_del`: the same events, netd gone,
//!    `eth0` gone.
//! 3. `system_powerdown`: `POWERDOWN`, the guest's ACPI power button driver reports the key, its
//!    init powers off: `SHUTDOWN` (guest-shutdown) and the monitor exits 0.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use bulkhead_tests::{boot_l1_for_bulkhead, spawn_l2_guest, L1Process, NestedVm, L2_BOOT_TIMEOUT};
use serde_json::json;

const DISK_MIB: u64 = 16;
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const QMP_TIMEOUT: Duration = Duration::from_secs(60);
const MAC: &str = "52:54:00:12:34:77";

/// Waits until `pidof name` in L1 lists `n` processes.
fn wait_pids(vm: &NestedVm, name: &str, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pids = vm.pidof(name)?;
        if pids.len() == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} in L1: {pids:?}, expected {n} process(es)");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The line from the console (seen after `from`) that contains `text`.
fn console_line(bh: &L1Process<'_>, from: bulkhead_tests::Mark, text: &str) -> Result<String> {
    let (_, line) = bh.wait_for_console_from(from, text, STEP_TIMEOUT)?;
    Ok(line)
}

fn deleted(qmp: &mut bulkhead_tests::Qmp, id: &str) -> Result<()> {
    let first = qmp.wait_event("DEVICE_DELETED", STEP_TIMEOUT)?;
    ensure!(
        first["data"] == json!({"path": format!("/machine/peripheral/{id}/virtio-backend")}),
        "first DEVICE_DELETED: {first}"
    );
    let second = qmp.wait_event("DEVICE_DELETED", STEP_TIMEOUT)?;
    ensure!(
        second["data"] == json!({"device": id, "path": format!("/machine/peripheral/{id}")}),
        "second DEVICE_DELETED: {second}"
    );
    Ok(())
}

#[test]
fn linux_guest_takes_hot_plugged_disks_and_nics_and_its_power_button() -> Result<()> {
    let vm = boot_l1_for_bulkhead("hotplug")?;
    let md5 = vm
        .sh_ok(
            &format!(
                "modprobe tun && dd if=/dev/urandom of=/tmp/hp.img bs=1M count={DISK_MIB} \
                 2>/dev/null && md5sum /tmp/hp.img | cut -d' ' -f1"
            ),
            Duration::from_secs(60),
        )?
        .trim()
        .to_owned();
    let bh = spawn_l2_guest(
        &vm,
        1,
        "hotplug",
        &[
            "-drive",
            "file=/tmp/hp.img,format=raw,if=none,id=d1,cache=writeback",
            "-netdev",
            "tap,id=n0,ifname=bhtap0,script=no,downscript=no",
        ],
    )?;
    let mut qmp = vm.qmp(QMP_TIMEOUT)?;
    vm.sh_ok(
        "ip addr add 10.77.0.1/24 dev bhtap0 && ip link set bhtap0 up",
        Duration::from_secs(30),
    )?;
    bh.wait_for_console("BULKHEAD-GUEST-UP", L2_BOOT_TIMEOUT)?;
    bh.wait_for_console("BULKHEAD-HP-READY", STEP_TIMEOUT)?;
    let fails: Vec<String> = bh.lines_with("BULKHEAD-HP-FAIL");
    ensure!(fails.is_empty(), "the guest reported failures: {fails:?}");
    let buttons = bh.wait_for_console("BULKHEAD-HP-BUTTONS=", Duration::from_secs(5))?;
    ensure!(
        !buttons.trim_end().ends_with("=0"),
        "the guest found no power button: {buttons}"
    );
    ensure!(
        vm.pidof("bulkhead-blockd")?.is_empty(),
        "a blockd already runs"
    );

    // 1. A disk.
    let mark = bh.mark();
    let t = Instant::now();
    qmp.execute(
        "device_add",
        Some(json!({"driver": "virtio-blk-pci", "drive": "d1", "id": "hpblk"})),
    )?;
    let line = console_line(&bh, mark, "BULKHEAD-HP-BLK-ADDED")?;
    println!(
        "disk hot-plugged in {:.1} s: {line}",
        t.elapsed().as_secs_f64()
    );
    ensure!(
        line.contains(&format!("vda size={} md5={md5}", DISK_MIB * 2048)),
        "the guest saw another disk: {line}"
    );
    wait_pids(&vm, "bulkhead-blockd", 1)?;
    let mark = bh.mark();
    let t = Instant::now();
    qmp.execute("device_del", Some(json!({"id": "hpblk"})))?;
    deleted(&mut qmp, "hpblk")?;
    println!("disk ejected after {:.1} s", t.elapsed().as_secs_f64());
    console_line(&bh, mark, "BULKHEAD-HP-BLK-GONE vda")?;
    wait_pids(&vm, "bulkhead-blockd", 0)?;
    let blocks = qmp.execute("query-block", None)?;
    ensure!(
        blocks == json!([]),
        "the -drive should go with its device: {blocks}"
    );

    // 2. A NIC.
    let mark = bh.mark();
    let t = Instant::now();
    qmp.execute(
        "device_add",
        Some(json!({"driver": "virtio-net-pci", "netdev": "n0", "id": "hpnic", "mac": MAC})),
    )?;
    let line = console_line(&bh, mark, "BULKHEAD-HP-NET-ADDED")?;
    println!(
        "NIC hot-plugged in {:.1} s: {line}",
        t.elapsed().as_secs_f64()
    );
    ensure!(
        line.contains(&format!("eth0 ping=ok mac={MAC}")),
        "the guest could not use the new NIC: {line}"
    );
    wait_pids(&vm, "bulkhead-netd", 1)?;
    let mark = bh.mark();
    qmp.execute("device_del", Some(json!({"id": "hpnic"})))?;
    deleted(&mut qmp, "hpnic")?;
    console_line(&bh, mark, "BULKHEAD-HP-NET-GONE eth0")?;
    wait_pids(&vm, "bulkhead-netd", 0)?;

    // 3. The power button.
    let mark = bh.mark();
    qmp.execute("system_powerdown", None)?;
    qmp.wait_event("POWERDOWN", STEP_TIMEOUT)?;
    console_line(&bh, mark, "BULKHEAD-POWER-BUTTON")?;
    let shutdown = qmp.wait_event("SHUTDOWN", STEP_TIMEOUT)?;
    ensure!(
        shutdown["data"] == json!({"guest": true, "reason": "guest-shutdown"}),
        "SHUTDOWN: {shutdown}"
    );
    let code = bh.wait_exit(Duration::from_secs(60))?;
    ensure!(code == 0, "bulkhead exited with {code}");
    ensure!(
        vm.pidof("bulkhead-vcpu")?.is_empty(),
        "the vCPU worker outlived the monitor"
    );
    Ok(())
}
