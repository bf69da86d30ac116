//! Host I/O errors under a real Linux guest (L2) through Bulkhead inside L1: the disk's image
//! lives on a 1 MiB tmpfs in L1, so the guest's 4 MiB write (`dd oflag=direct conv=fsync`,
//! kit mode `bulkhead.test=blkerr`) runs into ENOSPC in `bulkhead-blockd`.
//!
//! - `werror=stop`: `BLOCK_IO_ERROR` (action stop, nospace true) and then STOP, `query-status`
//!   `io-error`, `query-block` `io-status` `nospace`; a user `stop` changes nothing; the guest's
//!   dd has not finished. The tmpfs is then grown (`mount -o remount,size=`) and `cont` resumes:
//!   the held write completes, dd succeeds, `io-status` is `ok` again and the image in L1 holds
//!   exactly what the guest wrote.
//! - `werror=report`: `BLOCK_IO_ERROR` (action report), the VM keeps running, and the guest's
//!   dd fails with an I/O error.
//!
//! Reads never fail for want of space, so `rerror` gets a disk whose sectors really fail to
//! read: a memory-backed `null_blk` device in L1 (`/dev/nullb0`, 8 MiB) with a `badblocks`
//! range, the raw image of the guest's `-drive` (`cache=none`: blockd's `O_DIRECT` reads reach
//! the device, no page cache in between). The test writes a pattern on it in L1, marks
//! [`BAD_SECTORS`] bad, and the guest reads the first 4 MiB with `dd iflag=direct` (kit mode
//! `bulkhead.test=blkread`):
//!
//! - `rerror=stop`: `BLOCK_IO_ERROR` (operation read, action stop, nospace false, reason
//!   "Input/output error") then STOP, `io-error`, `io-status` `failed`; the guest's dd has not
//!   finished. The bad range is cleared and `cont` resumes: the held read is retried, dd
//!   succeeds and what it read is the pattern.
//! - `rerror=report`: the event with action report, the VM keeps running, dd fails with an
//!   I/O error.
//! - `rerror=ignore`: the event with action ignore, the VM keeps running, dd "succeeds" (the
//!   guest is told the read worked; its buffer does not hold the pattern's bad range).
//!
//! QEMU 7.2 does the same for reads (`virtio_blk_handle_rw_error` with `is_read`: stop holds
//! the request, report completes it with `VIRTIO_BLK_S_IOERR`, ignore with `VIRTIO_BLK_S_OK`;
//! `blk_error_action` sends the event, `nospace` only for ENOSPC).
//!
//! One L1 boot for all scenarios (each L1 boot costs time on a shared 2-core host).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bulkhead_tests::kit::{BLKERR_LEN, BLK_PATTERN_LINE};
use bulkhead_tests::util::scaled;
use bulkhead_tests::{
    boot_l1_for_bulkhead, spawn_l2_guest, L1Process, NestedVm, Qmp, L2_BOOT_TIMEOUT,
};
use serde_json::{json, Value};

const QMP_TIMEOUT: Duration = Duration::from_secs(30);
const EVENT_TIMEOUT: Duration = Duration::from_secs(120);

/// The null_blk device in L1 (the configfs directory's name is the index-0 device's name
/// whether or not the kernel names the disk after the directory).
const NULLB: &str = "nullb0";
/// Its size in MiB.
const NULLB_MIB: u64 = 8;
/// The sectors (512 bytes, inclusive, null_blk's `badblocks` syntax) that fail to read: 4 KiB
/// at 2 MiB, inside what the guest reads and away from what its partition scan reads.
const BAD_SECTORS: (u64, u64) = (4096, 4103);

/// A 1 MiB tmpfs at `dir` in L1 with an 8 MiB sparse image `disk.img` on it.
fn tiny_fs(vm: &NestedVm, dir: &str) -> Result<String> {
    vm.sh_ok(
        &format!(
            "mkdir -p {dir} && mount -t tmpfs -o size=1m tmpfs {dir} && \
             truncate -s 8M {dir}/disk.img"
        ),
        Duration::from_secs(30),
    )?;
    Ok(format!("{dir}/disk.img"))
}

/// The md5 of the first [`BLKERR_LEN`] bytes of `path` in L1.
fn head_md5(vm: &NestedVm, path: &str) -> Result<String> {
    let out = vm.sh_ok(
        &format!(
            "dd if={path} bs=65536 count={} 2>/dev/null | md5sum | cut -d' ' -f1",
            BLKERR_LEN / 65536
        ),
        Duration::from_secs(30),
    )?;
    Ok(out.trim().to_owned())
}

/// The `io-status` of backend `device` in `query-block`.
fn io_status(qmp: &mut Qmp, device: &str) -> Result<String> {
    let list = qmp.execute("query-block", None)?;
    let b = list
        .as_array()
        .and_then(|l| l.iter().find(|b| b["device"] == device))
        .with_context(|| format!("query-block has no {device}: {list}"))?;
    Ok(b["io-status"].as_str().unwrap_or("").to_owned())
}

/// Checks a `BLOCK_IO_ERROR` for a write on `disk0` that failed with ENOSPC.
fn check_event(ev: &Value, action: &str) -> Result<()> {
    check_event_of(ev, "write", action, true, "No space left on device")
}

/// Checks a `BLOCK_IO_ERROR` for a read on `disk0` that failed with EIO.
fn check_read_event(ev: &Value, action: &str) -> Result<()> {
    check_event_of(ev, "read", action, false, "Input/output error")
}

/// Checks a `BLOCK_IO_ERROR` on `disk0`.
fn check_event_of(
    ev: &Value,
    operation: &str,
    action: &str,
    nospace: bool,
    reason: &str,
) -> Result<()> {
    let d = &ev["data"];
    ensure!(d["device"] == "disk0", "{ev}");
    ensure!(
        d["node-name"]
            .as_str()
            .is_some_and(|n| n.starts_with("#block")),
        "{ev}"
    );
    ensure!(d["operation"] == operation, "{ev}");
    ensure!(d["action"] == action, "{ev}");
    ensure!(d["nospace"] == json!(nospace), "{ev}");
    ensure!(d["reason"] == reason, "{ev}");
    // The members (this client's JSON maps sort them; their order on the wire is checked by
    // the monitor's unit test of the event line).
    let mut keys: Vec<&str> = d
        .as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable();
    ensure!(
        keys == [
            "action",
            "device",
            "node-name",
            "nospace",
            "operation",
            "reason"
        ],
        "members differ from QEMU 7.2's: {keys:?}"
    );
    Ok(())
}

#[test]
fn werror_and_rerror_with_real_host_errors_under_a_linux_guest() -> Result<()> {
    let vm = boot_l1_for_bulkhead("blk-errors")?;
    let expected = vm
        .sh_ok(
            &format!("yes {BLK_PATTERN_LINE} | head -c {BLKERR_LEN} | md5sum | cut -d' ' -f1"),
            Duration::from_secs(30),
        )?
        .trim()
        .to_owned();
    werror_stop(&vm, &expected)?;
    werror_report(&vm)?;
    let dev = bad_disk(&vm, &expected)?;
    rerror_stop(&vm, &dev, &expected)?;
    rerror_report(&vm, &dev)?;
    rerror_ignore(&vm, &dev, &expected)?;
    Ok(())
}

/// `werror=stop`: the write stops the VM, more room and `cont` complete it.
fn werror_stop(vm: &NestedVm, expected: &str) -> Result<()> {
    let img = tiny_fs(vm, "/mnt/stop")?;
    let drive = format!("file={img},format=raw,if=virtio,id=disk0,cache=writeback,werror=stop");
    let bh = spawn_l2_guest(vm, 1, "blkerr", &["-S", "-drive", &drive])?;
    let mut qmp = vm.qmp(QMP_TIMEOUT)?;
    qmp.execute("cont", None)?;
    qmp.wait_event("RESUME", scaled(EVENT_TIMEOUT))?;
    bh.wait_for_console("BULKHEAD-BLKERR-WRITING", L2_BOOT_TIMEOUT)?;
    let ev = qmp.wait_event("BLOCK_IO_ERROR", scaled(EVENT_TIMEOUT))?;
    println!("stop: {ev}");
    check_event(&ev, "stop")?;
    ensure!(
        !qmp.event_names().contains(&"STOP".to_owned()),
        "STOP came before BLOCK_IO_ERROR: {:?}",
        qmp.event_names()
    );
    qmp.wait_event("STOP", scaled(EVENT_TIMEOUT))?;
    ensure!(qmp.query_status()? == ("io-error".to_owned(), false));
    ensure!(io_status(&mut qmp, "disk0")? == "nospace");
    let hmp = qmp.execute(
        "human-monitor-command",
        Some(json!({"command-line": "info status"})),
    )?;
    ensure!(hmp == "VM status: paused (io-error)\r\n", "{hmp}");
    // A user's stop while the error is pending: nothing changes (QEMU's vm_stop of a stopped VM).
    qmp.execute("stop", None)?;
    ensure!(qmp.query_status()? == ("io-error".to_owned(), false));
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        !bh.output_lines()
            .iter()
            .any(|l| l.contains("BULKHEAD-BLKERR-DD=")),
        "the guest's write finished while the VM was stopped for its error"
    );
    // More room, then cont: the held write is retried and completes.
    vm.sh_ok(
        "mount -o remount,size=16m /mnt/stop",
        Duration::from_secs(10),
    )?;
    let more: Vec<String> = qmp
        .take_events()
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("?").to_owned())
        .collect();
    println!("events while stopped: {more:?}");
    ensure!(
        more.iter().all(|e| e == "BLOCK_IO_ERROR"),
        "unexpected events while stopped: {more:?}"
    );
    qmp.execute("cont", None)?;
    qmp.wait_event("RESUME", scaled(EVENT_TIMEOUT))?;
    ensure!(io_status(&mut qmp, "disk0")? == "ok");
    let dd = bh.wait_for_console("BULKHEAD-BLKERR-DD=", scaled(EVENT_TIMEOUT))?;
    println!("stop: guest {dd}");
    ensure!(
        dd.contains("BULKHEAD-BLKERR-DD=0"),
        "the guest's dd failed: {dd}"
    );
    ensure!(qmp.query_status()? == ("running".to_owned(), true));
    let wrote = bh.wait_for_console("BULKHEAD-BLKERR-WROTE=", Duration::from_secs(5))?;
    ensure!(wrote.contains(expected), "{wrote} (expected {expected})");
    ensure!(
        head_md5(vm, &img)? == expected,
        "the image does not hold what the guest wrote"
    );
    qmp.execute("quit", None)?;
    bh.wait_exit(Duration::from_secs(60))?;
    Ok(())
}

/// `werror=report`: the guest's write fails, the VM runs on.
fn werror_report(vm: &NestedVm) -> Result<()> {
    let img = tiny_fs(vm, "/mnt/report")?;
    let drive = format!("file={img},format=raw,if=virtio,id=disk0,cache=writeback,werror=report");
    let bh = spawn_l2_guest(vm, 1, "blkerr", &["-S", "-drive", &drive])?;
    let mut qmp = vm.qmp(QMP_TIMEOUT)?;
    qmp.execute("cont", None)?;
    qmp.wait_event("RESUME", scaled(EVENT_TIMEOUT))?;
    let ev = qmp.wait_event("BLOCK_IO_ERROR", L2_BOOT_TIMEOUT + scaled(EVENT_TIMEOUT))?;
    println!("report: {ev}");
    check_event(&ev, "report")?;
    let dd = bh.wait_for_console("BULKHEAD-BLKERR-DD=", scaled(EVENT_TIMEOUT))?;
    println!("report: guest {dd}");
    ensure!(
        !dd.contains("BULKHEAD-BLKERR-DD=0"),
        "the guest's dd succeeded on a full disk: {dd}"
    );
    ensure!(
        dd.contains("Input/output error"),
        "dd did not fail with an I/O error: {dd}"
    );
    ensure!(qmp.query_status()? == ("running".to_owned(), true));
    ensure!(io_status(&mut qmp, "disk0")? == "ok");
    let names = qmp.event_names();
    ensure!(
        !names.contains(&"STOP".to_owned()),
        "werror=report stopped the VM: {names:?}"
    );
    qmp.execute("quit", None)?;
    bh.wait_exit(Duration::from_secs(60))?;
    Ok(())
}

/// Makes the memory-backed null_blk device [`NULLB`] in L1, writes the pattern of `expected`
/// (md5) at its start and checks it reads back; then marks [`BAD_SECTORS`] bad and checks
/// that L1 itself can no longer read them. Returns the device's path.
fn bad_disk(vm: &NestedVm, expected: &str) -> Result<String> {
    let dev = format!("/dev/{NULLB}");
    let cfg = format!("/sys/kernel/config/nullb/{NULLB}");
    let out = vm.sh_ok(
        &format!(
            "set -e\n\
             modprobe null_blk nr_devices=0\n\
             grep -q ' /sys/kernel/config ' /proc/mounts || \
                 mount -t configfs configfs /sys/kernel/config\n\
             mkdir {cfg}\n\
             echo {NULLB_MIB} > {cfg}/size\n\
             echo 1 > {cfg}/memory_backed\n\
             echo 512 > {cfg}/blocksize\n\
             echo 1 > {cfg}/power\n\
             i=0\n\
             while [ ! -b {dev} ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done\n\
             [ -b {dev} ] || {{ echo 'no {dev}'; ls /dev; exit 1; }}\n\
             yes {BLK_PATTERN_LINE} | head -c {BLKERR_LEN} > /tmp/pattern\n\
             dd if=/tmp/pattern of={dev} bs=65536 oflag=direct conv=notrunc 2>/dev/null\n\
             rm /tmp/pattern\n\
             echo \"size=$(cat /sys/block/{NULLB}/size)\"\n\
             echo \"md5=$(dd if={dev} bs=65536 count={n} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)\"",
            n = BLKERR_LEN / 65536
        ),
        Duration::from_secs(60),
    )?;
    println!("null_blk: {}", out.trim());
    ensure!(
        out.contains(&format!("size={}", NULLB_MIB << 11)),
        "{dev} is not {NULLB_MIB} MiB: {out}"
    );
    ensure!(
        out.contains(&format!("md5={expected}")),
        "{dev} does not read back the pattern: {out}"
    );
    set_bad(vm, true)?;
    let (out, rc) = vm.sh(
        &format!(
            "dd if={dev} of=/dev/null bs=512 skip={} count=1 iflag=direct",
            BAD_SECTORS.0
        ),
        Duration::from_secs(30),
    )?;
    ensure!(
        rc != 0 && out.contains("Input/output error"),
        "reading a bad sector of {dev} in L1 did not fail with EIO ({rc}): {out}"
    );
    Ok(dev)
}

/// Marks [`BAD_SECTORS`] of [`NULLB`] bad (`+start-end`) or good again (`-start-end`).
fn set_bad(vm: &NestedVm, bad: bool) -> Result<()> {
    let (start, end) = BAD_SECTORS;
    let sign = if bad { '+' } else { '-' };
    vm.sh_ok(
        &format!("echo '{sign}{start}-{end}' > /sys/kernel/config/nullb/{NULLB}/badblocks"),
        Duration::from_secs(10),
    )?;
    Ok(())
}

/// Starts Bulkhead in L1 with `dev` as `disk0` (`cache=none`, `rerror=<rerror>`), the guest in
/// kit mode `blkread`, and runs it.
fn spawn_reader<'vm>(vm: &'vm NestedVm, dev: &str, rerror: &str) -> Result<(L1Process<'vm>, Qmp)> {
    let drive = format!("file={dev},format=raw,if=virtio,id=disk0,cache=none,rerror={rerror}");
    let bh = spawn_l2_guest(vm, 1, "blkread", &["-S", "-drive", &drive])?;
    let mut qmp = vm.qmp(QMP_TIMEOUT)?;
    qmp.execute("cont", None)?;
    qmp.wait_event("RESUME", scaled(EVENT_TIMEOUT))?;
    Ok((bh, qmp))
}

/// `rerror=stop`: the read stops the VM; the bad range cleared, `cont` completes it with the
/// right data.
fn rerror_stop(vm: &NestedVm, dev: &str, expected: &str) -> Result<()> {
    let (bh, mut qmp) = spawn_reader(vm, dev, "stop")?;
    bh.wait_for_console("BULKHEAD-BLKREAD-READING", L2_BOOT_TIMEOUT)?;
    let ev = qmp.wait_event("BLOCK_IO_ERROR", scaled(EVENT_TIMEOUT))?;
    println!("rerror=stop: {ev}");
    check_read_event(&ev, "stop")?;
    ensure!(
        !qmp.event_names().contains(&"STOP".to_owned()),
        "STOP came before BLOCK_IO_ERROR: {:?}",
        qmp.event_names()
    );
    qmp.wait_event("STOP", scaled(EVENT_TIMEOUT))?;
    ensure!(qmp.query_status()? == ("io-error".to_owned(), false));
    ensure!(io_status(&mut qmp, "disk0")? == "failed");
    // The monitor sized the block device (by seeking to its end), as QEMU's host_device does.
    let list = qmp.execute("query-block", None)?;
    let size = list
        .as_array()
        .and_then(|l| l.iter().find(|b| b["device"] == "disk0"))
        .map(|b| b["inserted"]["image"]["virtual-size"].clone());
    ensure!(
        size == Some(json!(NULLB_MIB << 20)),
        "query-block's virtual-size of {dev} is not {NULLB_MIB} MiB: {list}"
    );
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        !bh.output_lines()
            .iter()
            .any(|l| l.contains("BULKHEAD-BLKREAD-DD=")),
        "the guest's read finished while the VM was stopped for its error"
    );
    set_bad(vm, false)?;
    let more: Vec<String> = qmp
        .take_events()
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("?").to_owned())
        .collect();
    println!("rerror=stop: events while stopped: {more:?}");
    ensure!(
        more.iter().all(|e| e == "BLOCK_IO_ERROR"),
        "unexpected events while stopped: {more:?}"
    );
    qmp.execute("cont", None)?;
    qmp.wait_event("RESUME", scaled(EVENT_TIMEOUT))?;
    ensure!(io_status(&mut qmp, "disk0")? == "ok");
    let dd = bh.wait_for_console("BULKHEAD-BLKREAD-DD=", scaled(EVENT_TIMEOUT))?;
    println!("rerror=stop: guest {dd}");
    ensure!(
        dd.contains("BULKHEAD-BLKREAD-DD=0"),
        "the guest's dd failed: {dd}"
    );
    let md5 = bh.wait_for_console("BULKHEAD-BLKREAD-MD5=", Duration::from_secs(5))?;
    ensure!(
        md5.contains(expected),
        "the guest read other data: {md5} (expected {expected})"
    );
    ensure!(qmp.query_status()? == ("running".to_owned(), true));
    qmp.execute("quit", None)?;
    bh.wait_exit(Duration::from_secs(60))?;
    Ok(())
}

/// Waits for the read error of a `rerror=report`/`ignore` guest and checks the VM ran on;
/// returns the guest's `BULKHEAD-BLKREAD-DD=` and `-MD5=` lines.
fn read_error_without_stop(vm: &NestedVm, dev: &str, rerror: &str) -> Result<(String, String)> {
    set_bad(vm, true)?;
    let (bh, mut qmp) = spawn_reader(vm, dev, rerror)?;
    let ev = qmp.wait_event("BLOCK_IO_ERROR", L2_BOOT_TIMEOUT + scaled(EVENT_TIMEOUT))?;
    println!("rerror={rerror}: {ev}");
    check_read_event(&ev, rerror)?;
    let dd = bh.wait_for_console("BULKHEAD-BLKREAD-DD=", scaled(EVENT_TIMEOUT))?;
    let md5 = bh.wait_for_console("BULKHEAD-BLKREAD-MD5=", Duration::from_secs(5))?;
    println!("rerror={rerror}: guest {dd} / {md5}");
    ensure!(qmp.query_status()? == ("running".to_owned(), true));
    ensure!(io_status(&mut qmp, "disk0")? == "ok");
    let names = qmp.event_names();
    ensure!(
        !names.contains(&"STOP".to_owned()),
        "rerror={rerror} stopped the VM: {names:?}"
    );
    qmp.execute("quit", None)?;
    bh.wait_exit(Duration::from_secs(60))?;
    Ok((dd, md5))
}

/// `rerror=report`: the guest's read fails with an I/O error, the VM runs on.
fn rerror_report(vm: &NestedVm, dev: &str) -> Result<()> {
    let (dd, _) = read_error_without_stop(vm, dev, "report")?;
    ensure!(
        !dd.contains("BULKHEAD-BLKREAD-DD=0"),
        "the guest's dd succeeded over bad sectors: {dd}"
    );
    ensure!(
        dd.contains("Input/output error"),
        "dd did not fail with an I/O error: {dd}"
    );
    Ok(())
}

/// `rerror=ignore`: the guest is told its read worked, though the bad range was never read.
fn rerror_ignore(vm: &NestedVm, dev: &str, expected: &str) -> Result<()> {
    let (dd, md5) = read_error_without_stop(vm, dev, "ignore")?;
    ensure!(
        dd.contains("BULKHEAD-BLKREAD-DD=0"),
        "the guest's dd failed under rerror=ignore: {dd}"
    );
    // What dd got for the bad range is whatever its buffer held (the previous 64 KiB, a
    // different part of the pattern): not the pattern.
    ensure!(
        !md5.contains(expected),
        "the guest read the bad range's data under rerror=ignore: {md5}"
    );
    Ok(())
}
