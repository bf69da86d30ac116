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
//! One L1 boot for both scenarios (each L1 boot costs time on a shared 2-core host).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bulkhead_tests::kit::{BLKERR_LEN, BLK_PATTERN_LINE};
use bulkhead_tests::util::scaled;
use bulkhead_tests::{boot_l1_for_bulkhead, spawn_l2_guest, NestedVm, Qmp, L2_BOOT_TIMEOUT};
use serde_json::{json, Value};

const QMP_TIMEOUT: Duration = Duration::from_secs(30);
const EVENT_TIMEOUT: Duration = Duration::from_secs(120);

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
    let d = &ev["data"];
    ensure!(d["device"] == "disk0", "{ev}");
    ensure!(
        d["node-name"]
            .as_str()
            .is_some_and(|n| n.starts_with("#block")),
        "{ev}"
    );
    ensure!(d["operation"] == "write", "{ev}");
    ensure!(d["action"] == action, "{ev}");
    ensure!(d["nospace"] == json!(true), "{ev}");
    ensure!(d["reason"] == "No space left on device", "{ev}");
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
fn werror_stop_pauses_and_cont_completes_the_write_werror_report_fails_it() -> Result<()> {
    let vm = boot_l1_for_bulkhead("blk-errors")?;
    let expected = vm
        .sh_ok(
            &format!("yes {BLK_PATTERN_LINE} | head -c {BLKERR_LEN} | md5sum | cut -d' ' -f1"),
            Duration::from_secs(30),
        )?
        .trim()
        .to_owned();

    // werror=stop.
    let img = tiny_fs(&vm, "/mnt/stop")?;
    let drive = format!("file={img},format=raw,if=virtio,id=disk0,cache=writeback,werror=stop");
    let bh = spawn_l2_guest(&vm, 1, "blkerr", &["-S", "-drive", &drive])?;
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
    ensure!(wrote.contains(&expected), "{wrote} (expected {expected})");
    ensure!(
        head_md5(&vm, &img)? == expected,
        "the image does not hold what the guest wrote"
    );
    qmp.execute("quit", None)?;
    bh.wait_exit(Duration::from_secs(60))?;
    drop(qmp);

    // werror=report.
    let img = tiny_fs(&vm, "/mnt/report")?;
    let drive = format!("file={img},format=raw,if=virtio,id=disk0,cache=writeback,werror=report");
    let bh = spawn_l2_guest(&vm, 1, "blkerr", &["-S", "-drive", &drive])?;
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
