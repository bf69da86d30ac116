//! A real Linux guest (L2) reads and writes a virtio-blk disk through Bulkhead inside L1:
//! vcpu-proc's virtio-pci transport is the vhost-user front end, a sandboxed `bulkhead-blockd`
//! the back end, and the guest's own virtio_pci + virtio_blk drivers do the I/O. The guest
//! (kit mode `bulkhead.test=blk`) prints the disk's size, serial and checksum, writes a pattern,
//! syncs, drops its page cache and reads it back; the test then checks the image file in L1.
//! The same checks hold with a back end nobody here wrote: `qemu-storage-daemon`'s
//! vhost-user-blk export behind `-chardev socket` + `-device vhost-user-blk-pci`.
//! `block_set_io_throttle` and `block_resize` are checked from inside the guest too (kit mode
//! `bulkhead.test=blkctl`): a throttled read takes as long as the limit says, and the driver
//! sees the new size through the config-change interrupt.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bulkhead_tests::kit::{BLKCTL_READ_LEN, BLK_PATTERN_LEN, BLK_PATTERN_LINE, BLK_PATTERN_OFFSET};
use bulkhead_tests::util::scaled;
use bulkhead_tests::{
    boot_l1_for_bulkhead, spawn_l2_guest, L1Process, NestedOpts, NestedVm, L2_BOOT_TIMEOUT,
};
use serde_json::json;

/// Disk size: 16 MiB of random data.
const DISK_MIB: u64 = 16;
const DONE_TIMEOUT: Duration = Duration::from_secs(240);

/// The md5 of `BLK_PATTERN_LEN` bytes of `BLK_PATTERN_LINE` lines, as `yes | head -c` makes it.
fn pattern_md5(vm: &NestedVm) -> Result<String> {
    let out = vm.sh_ok(
        &format!("yes {BLK_PATTERN_LINE} | head -c {BLK_PATTERN_LEN} | md5sum | cut -d' ' -f1"),
        Duration::from_secs(30),
    )?;
    Ok(out.trim().to_owned())
}

/// Makes `/tmp/<name>` with random data in L1 and returns its md5.
fn make_disk(vm: &NestedVm, name: &str) -> Result<String> {
    let out = vm.sh_ok(
        &format!(
            "dd if=/dev/urandom of=/tmp/{name} bs=1M count={DISK_MIB} 2>/dev/null && \
             md5sum /tmp/{name} | cut -d' ' -f1"
        ),
        Duration::from_secs(60),
    )?;
    Ok(out.trim().to_owned())
}

/// Waits for the guest's blk run and checks what it saw against the image it was given.
fn check_guest_run(vm: &NestedVm, bh: &L1Process<'_>, image_md5: &str, serial: &str) -> Result<()> {
    bh.wait_for_console("BULKHEAD-GUEST-UP", L2_BOOT_TIMEOUT)?;
    bh.wait_for_console("BULKHEAD-BLK-DONE", DONE_TIMEOUT)?;
    let fails: Vec<String> = bh.lines_with("BULKHEAD-BLK-FAIL");
    ensure!(fails.is_empty(), "the guest reported failures: {fails:?}");
    let sectors: u64 = bh.marker("BULKHEAD-BLK-SIZE")?.parse()?;
    ensure!(
        sectors == DISK_MIB * 2048,
        "guest sees {sectors} sectors, expected {}",
        DISK_MIB * 2048
    );
    ensure!(
        bh.marker("BULKHEAD-BLK-SERIAL")? == serial,
        "serial mismatch"
    );
    ensure!(
        bh.marker("BULKHEAD-BLK-MD5")? == image_md5,
        "the guest read different data than the image holds"
    );
    let wrote = bh.marker("BULKHEAD-BLK-WROTE")?;
    ensure!(wrote == pattern_md5(vm)?, "pattern checksum mismatch");
    ensure!(
        bh.marker("BULKHEAD-BLK-READBACK")? == wrote,
        "the guest read back something else than it wrote"
    );
    Ok(())
}

/// The pattern's md5 as the image file in L1 holds it now.
fn image_pattern_md5(vm: &NestedVm, name: &str) -> Result<String> {
    let out = vm.sh_ok(
        &format!(
            "dd if=/tmp/{name} bs=4096 skip={} count={} 2>/dev/null | md5sum | cut -d' ' -f1",
            BLK_PATTERN_OFFSET / 4096,
            BLK_PATTERN_LEN / 4096
        ),
        Duration::from_secs(30),
    )?;
    Ok(out.trim().to_owned())
}

#[test]
fn linux_guest_reads_and_writes_a_drive_served_by_blockd() -> Result<()> {
    let vm = boot_l1_for_bulkhead("blk-drive")?;
    let md5 = make_disk(&vm, "disk0.img")?;
    let drive = "file=/tmp/disk0.img,format=raw,if=virtio,id=disk0,serial=BH-DISK-0";
    let bh = spawn_l2_guest(&vm, 1, "blk", &["-drive", drive])?;
    check_guest_run(&vm, &bh, &md5, "BH-DISK-0")?;
    bh.wait_exit(Duration::from_secs(60))?;
    ensure!(
        image_pattern_md5(&vm, "disk0.img")? == pattern_md5(&vm)?,
        "the image file does not hold what the guest wrote and synced"
    );
    Ok(())
}

/// `-blockdev` (file + raw nodes) and `-device virtio-blk-pci` with two queues: the guest's
/// driver uses both (one per vCPU) and the same checks hold. Started with `-S`, a write
/// threshold is set on the raw node first: the guest's pattern write passes it, so
/// `BLOCK_WRITE_THRESHOLD` comes with QEMU's numbers and the threshold is then off.
#[test]
fn blockdev_and_device_with_two_queues() -> Result<()> {
    let vm = boot_l1_for_bulkhead("blk-blockdev-mq")?;
    let md5 = make_disk(&vm, "mq.img")?;
    let bh = spawn_l2_guest(
        &vm,
        2,
        "blk",
        &[
            "-S",
            "-blockdev",
            "driver=file,node-name=f0,filename=/tmp/mq.img",
            "-blockdev",
            "driver=raw,node-name=d0,file=f0",
            "-device",
            "virtio-blk-pci,drive=d0,id=vd0,num-queues=2,serial=BH-MQ",
        ],
    )?;
    let mut qmp = vm.qmp(Duration::from_secs(30))?;
    // One 4 KiB block into the pattern: its write ends at the pattern's end at the latest.
    let threshold = BLK_PATTERN_OFFSET + 4096;
    qmp.execute(
        "block-set-write-threshold",
        Some(json!({"node-name": "d0", "write-threshold": threshold})),
    )?;
    let nodes = qmp.execute("query-named-block-nodes", None)?;
    let d0 = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == "d0"))
        .context("d0 in query-named-block-nodes")?;
    ensure!(
        d0["write_threshold"] == threshold,
        "write_threshold not shown: {d0}"
    );
    qmp.execute("cont", None)?;
    let ev = qmp.wait_event("BLOCK_WRITE_THRESHOLD", scaled(DONE_TIMEOUT))?;
    println!("event: {ev}");
    let data = &ev["data"];
    ensure!(data["node-name"] == "d0", "node-name: {ev}");
    ensure!(
        data["write-threshold"] == threshold,
        "write-threshold: {ev}"
    );
    let exceeded = data["amount-exceeded"]
        .as_u64()
        .context("amount-exceeded")?;
    ensure!(
        exceeded > 0 && exceeded <= BLK_PATTERN_LEN as u64 - 4096,
        "amount-exceeded {exceeded} does not fit a write inside the pattern"
    );
    check_guest_run(&vm, &bh, &md5, "BH-MQ")?;
    let nodes = qmp.execute("query-named-block-nodes", None)?;
    let d0 = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == "d0"))
        .context("d0 in query-named-block-nodes")?;
    ensure!(
        d0["write_threshold"] == 0,
        "the threshold must be off after its event: {d0}"
    );
    drop(qmp);
    bh.wait_exit(Duration::from_secs(60))?;
    let out = vm.sh_ok("ls /sys/block/ 2>/dev/null; true", Duration::from_secs(10))?;
    println!("L1 block devices: {out}");
    ensure!(
        image_pattern_md5(&vm, "mq.img")? == pattern_md5(&vm)?,
        "the image file does not hold what the guest wrote"
    );
    Ok(())
}

/// A write the guest has flushed (`dd conv=fsync`, then `sync`) is in the image after `kill -9`
/// of blockd, of vcpu-proc, and of the monitor, each killed right after the guest confirmed the
/// data (its read-back after dropping its page cache).
#[test]
fn flushed_writes_survive_kill_9_of_each_process() -> Result<()> {
    let vm = boot_l1_for_bulkhead("blk-kill9")?;
    let expected = pattern_md5(&vm)?;
    for victim in ["bulkhead-blockd", "bulkhead-vcpu", "bulkhead"] {
        let img = format!("kill-{victim}.img");
        let md5 = make_disk(&vm, &img)?;
        let drive = format!("file=/tmp/{img},format=raw,if=virtio,id=d0");
        let bh = spawn_l2_guest(&vm, 1, "blk", &["-drive", &drive])?;
        bh.wait_for_console("BULKHEAD-GUEST-UP", L2_BOOT_TIMEOUT)?;
        ensure!(bh.marker("BULKHEAD-BLK-MD5")? == md5, "{victim}: bad read");
        bh.wait_for_console("BULKHEAD-BLK-READBACK=", DONE_TIMEOUT)?;
        let pid = if victim == "bulkhead" {
            bh.pid()
        } else {
            *vm.pidof(victim)?
                .first()
                .with_context(|| format!("no {victim} process in L1"))?
        };
        vm.sh_ok(&format!("kill -9 {pid}"), Duration::from_secs(10))?;
        // Whatever survives goes too (the monitor may also be waiting on a dead worker).
        let _ = bh.kill("KILL");
        bh.wait_exit(Duration::from_secs(60))?;
        let _ = vm.sh(
            "for p in $(pidof bulkhead-blockd bulkhead-vcpu); do kill -9 $p; done; true",
            Duration::from_secs(10),
        );
        ensure!(
            image_pattern_md5(&vm, &img)? == expected,
            "after kill -9 of {victim} the image lacks the flushed write"
        );
        println!("kill -9 {victim}: flushed data intact");
    }
    Ok(())
}

/// `qemu-storage-daemon` (the host's, copied into L1) exports the image as a vhost-user-blk
/// server; Bulkhead connects to it (`-chardev socket,path=`) and gives the guest a
/// `vhost-user-blk-pci` with no blockd at all: vcpu-proc is the front end of QEMU's back end.
/// The guest's run is checked as for `-drive` (the serial is QEMU's fixed `vhost_user_blk`),
/// and the image holds the synced pattern after the guest powers off.
#[test]
fn vhost_user_blk_served_by_qemu_storage_daemon() -> Result<()> {
    let vm = NestedVm::boot(NestedOpts {
        with_host_qemu: true,
        ..NestedOpts::new("blk-qsd")
    })?;
    let md5 = make_disk(&vm, "qsd.img")?;
    let qsd = vm.spawn(&[
        "/usr/bin/qemu-storage-daemon",
        "--blockdev",
        "driver=file,node-name=f,filename=/tmp/qsd.img",
        "--export",
        "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/tmp/qsd.sock,\
         writable=on,num-queues=2",
    ])?;
    vm.sh_ok(
        "n=0; while [ ! -S /tmp/qsd.sock ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done; \
         [ -S /tmp/qsd.sock ]",
        Duration::from_secs(90),
    )
    .context("qemu-storage-daemon did not create its socket")?;
    let bh = spawn_l2_guest(
        &vm,
        2,
        "blk",
        &[
            "-chardev",
            "socket,id=vhost0,path=/tmp/qsd.sock",
            "-device",
            "vhost-user-blk-pci,chardev=vhost0,id=vub0,num-queues=2",
        ],
    )?;
    check_guest_run(&vm, &bh, &md5, "vhost_user_blk")?;
    bh.wait_exit(Duration::from_secs(60))?;
    ensure!(
        qsd.exit_status()?.is_none(),
        "qemu-storage-daemon exited while serving the guest"
    );
    ensure!(
        image_pattern_md5(&vm, "qsd.img")? == pattern_md5(&vm)?,
        "the image file does not hold what the guest wrote and synced"
    );
    qsd.kill("TERM")?;
    Ok(())
}

/// Read limit while the guest reads [`BLKCTL_READ_LEN`] bytes: 1 MiB/s.
const THROTTLE_BPS_RD: u64 = 1 << 20;

/// The six limits `block_set_io_throttle` takes, for `disk0`: only `bps_rd` set.
fn read_limit(bps_rd: u64) -> serde_json::Value {
    json!({"device": "disk0", "bps": 0, "bps_rd": bps_rd, "bps_wr": 0,
           "iops": 0, "iops_rd": 0, "iops_wr": 0})
}

/// Limits set over QMP reach the guest's I/O and a resize reaches its driver. Started with `-S`,
/// the disk gets a 1 MiB/s read limit; the guest (kit mode `blkctl`) reads 4 MiB with
/// `O_DIRECT`, which must take at least 3 s of its own clock (the bucket lets a tenth of a
/// second's worth through at once: a lower bound only, so a slow host cannot fail it). Then the
/// limit goes, `block_resize` doubles the disk, and the guest's virtio_blk, told by the
/// config-change interrupt, must show the new size and read the new end (zeroes); the image
/// file in L1 has grown to match.
#[test]
fn io_throttle_and_resize_reach_a_linux_guest() -> Result<()> {
    let vm = boot_l1_for_bulkhead("blk-ctl")?;
    make_disk(&vm, "ctl.img")?;
    let drive = "file=/tmp/ctl.img,format=raw,if=virtio,id=disk0";
    let bh = spawn_l2_guest(&vm, 1, "blkctl", &["-S", "-drive", drive])?;
    let mut qmp = vm.qmp(Duration::from_secs(30))?;
    qmp.execute("block_set_io_throttle", Some(read_limit(THROTTLE_BPS_RD)))?;
    qmp.execute("cont", None)?;
    bh.wait_for_console("BULKHEAD-GUEST-UP", L2_BOOT_TIMEOUT)?;
    bh.wait_for_console("BULKHEAD-BLKCTL-READ=", DONE_TIMEOUT)?;
    let sectors: u64 = bh.marker("BULKHEAD-BLKCTL-SIZE")?.parse()?;
    ensure!(sectors == DISK_MIB * 2048, "guest sees {sectors} sectors");
    let read = bh.marker("BULKHEAD-BLKCTL-READ")?;
    let (t0, t1) = read.split_once(' ').context("two uptimes")?;
    let secs = t1.parse::<f64>()? - t0.parse::<f64>()?;
    println!("throttled read of {BLKCTL_READ_LEN} bytes at {THROTTLE_BPS_RD} B/s: {secs:.2} s");
    ensure!(
        secs >= 3.0,
        "{BLKCTL_READ_LEN} bytes at {THROTTLE_BPS_RD} B/s took only {secs:.2} s: the limit is not enforced"
    );
    let stats = qmp.execute("query-blockstats", None)?;
    let rd_bytes = stats
        .as_array()
        .and_then(|a| a.iter().find(|d| d["device"] == "disk0"))
        .and_then(|d| d["stats"]["rd_bytes"].as_u64())
        .context("disk0's rd_bytes in query-blockstats")?;
    ensure!(rd_bytes >= BLKCTL_READ_LEN, "rd_bytes {rd_bytes}");

    qmp.execute("block_set_io_throttle", Some(read_limit(0)))?;
    let new_bytes = (2 * DISK_MIB) << 20;
    qmp.execute(
        "block_resize",
        Some(json!({"device": "disk0", "size": new_bytes})),
    )?;
    bh.wait_for_console("BULKHEAD-BLKCTL-DONE", DONE_TIMEOUT)?;
    let fails: Vec<String> = bh.lines_with("BULKHEAD-BLK-FAIL");
    ensure!(fails.is_empty(), "the guest reported failures: {fails:?}");
    let new_sectors: u64 = bh.marker("BULKHEAD-BLKCTL-NEWSIZE")?.parse()?;
    ensure!(
        new_sectors == new_bytes / 512,
        "after block_resize the guest sees {new_sectors} sectors, expected {}",
        new_bytes / 512
    );
    let zeroes = vm.sh_ok(
        "head -c 4096 /dev/zero | md5sum | cut -d' ' -f1",
        Duration::from_secs(10),
    )?;
    ensure!(
        bh.marker("BULKHEAD-BLKCTL-TAIL")? == zeroes.trim(),
        "the grown disk's last 4 KiB do not read as zeroes"
    );
    drop(qmp);
    bh.wait_exit(Duration::from_secs(60))?;
    let size = vm.sh_ok("stat -c %s /tmp/ctl.img", Duration::from_secs(10))?;
    ensure!(
        size.trim() == new_bytes.to_string(),
        "the image file is {} bytes, not {new_bytes}",
        size.trim()
    );
    Ok(())
}
