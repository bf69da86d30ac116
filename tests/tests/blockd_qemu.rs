//! `bulkhead-blockd` serves a real Linux virtio-blk driver: Debian's qemu-system-x86_64 under TCG
//! (no KVM) boots the kit's L2 kernel with its guest RAM in a shared memfd and a
//! `vhost-user-blk-pci` device whose back end is the standalone blockd (sandboxed, `--sandbox
//! on`). The guest (`bulkhead.test=blk`) loads virtio-pci and virtio-blk, checksums the whole
//! disk, writes a pattern, syncs and reads it back; the host checks the checksum against the image
//! it made and, after the guest has powered off, finds the pattern in the image file.
//!
//! Missing pieces (qemu, the blockd binary, the kit) fail the test; nothing is skipped.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bulkhead_tests::kit::{self, GuestKit};
use bulkhead_tests::tcg_frontend::{
    marker, md5, scratch, wait_exit, wait_for_socket, Reaped, TcgGuest,
};

/// Image size: 8 MiB.
const IMAGE_SIZE: usize = 8 << 20;

/// Deterministic, non-repeating image contents.
fn image_bytes() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..IMAGE_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn linux_virtio_blk_through_blockd_writeback() -> Result<()> {
    linux_driver_reads_and_writes_through_blockd("writeback")
}

#[test]
fn linux_virtio_blk_through_blockd_cache_none() -> Result<()> {
    linux_driver_reads_and_writes_through_blockd("none")
}

/// One boot against blockd in cache mode `cache`.
fn linux_driver_reads_and_writes_through_blockd(cache: &str) -> Result<()> {
    let started = Instant::now();
    kit::ensure_tools(&[("qemu-system-x86_64", "qemu-system-x86")])?;
    let kit = GuestKit::get()?;
    let blockd_bin = kit::bin_dir().join("bulkhead-blockd");
    ensure!(
        blockd_bin.is_file(),
        "{} is missing: build it (cargo build --release -p bulkhead-blockd-proc) or set \
         BULKHEAD_BIN_DIR",
        blockd_bin.display()
    );
    let dir = scratch(&format!("blockd-qemu-{cache}"))?;
    let image = dir.join("disk.raw");
    std::fs::write(&image, image_bytes())?;
    let want_md5 = md5(&image)?;
    let sock = dir.join("blk.sock");

    let blockd_log = std::fs::File::create(dir.join("blockd.log"))?;
    let mut blockd = Reaped(
        Command::new(&blockd_bin)
            .args(["--socket".as_ref(), sock.as_os_str()])
            .args(["--file".as_ref(), image.as_os_str()])
            .args(["--serial", "bulkhead-test-disk", "--num-queues", "2"])
            .args(["--cache", cache, "--sandbox", "on"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(blockd_log)
            .spawn()
            .with_context(|| format!("starting {}", blockd_bin.display()))?,
    );
    let log_path = dir.join("blockd.log");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_for_socket(&sock, &mut blockd.0, "bulkhead-blockd", log)?;

    let mut guest = TcgGuest::spawn(
        &kit,
        "blk",
        &[
            "-chardev".to_owned(),
            format!("socket,id=c0,path={}", sock.display()),
            "-device".to_owned(),
            "vhost-user-blk-pci,chardev=c0,num-queues=2".to_owned(),
        ],
    )?;
    let console = guest.run_until(
        "BULKHEAD-BLK-DONE",
        Duration::from_secs(90),
        &mut blockd.0,
        "bulkhead-blockd",
        log,
    )?;
    let (lines, done) = (console.lines, console.done);
    // Let the guest power off, which closes the vhost-user connection.
    guest.wait_exit(Duration::from_secs(15))?;
    // The front end is gone: blockd ends on its own, successfully.
    let blockd_status = wait_exit(&mut blockd.0, Duration::from_secs(10))?;
    let blockd_log = std::fs::read_to_string(dir.join("blockd.log")).unwrap_or_default();
    eprintln!("[blockd log]\n{blockd_log}");
    ensure!(
        done,
        "the guest did not finish the blk test (no BULKHEAD-BLK-DONE); console:\n{}",
        lines.join("\n")
    );
    for l in &lines {
        ensure!(!l.contains("BULKHEAD-BLK-FAIL"), "guest reported: {l}");
    }
    ensure!(
        blockd_status.is_some_and(|s| s.success()),
        "bulkhead-blockd did not exit successfully after the guest powered off: {blockd_status:?}"
    );
    ensure!(
        blockd_log.contains("sandbox entered"),
        "blockd did not report entering its sandbox: {blockd_log}"
    );
    ensure!(
        !blockd_log.contains("SECCOMP-VIOLATION"),
        "blockd hit its seccomp filter: {blockd_log}"
    );

    let sectors = marker(&lines, "BULKHEAD-BLK-SIZE=").context("no size marker")?;
    ensure!(
        sectors == (IMAGE_SIZE / 512).to_string(),
        "guest sees {sectors} sectors"
    );
    let serial = marker(&lines, "BULKHEAD-BLK-SERIAL=").context("no serial marker")?;
    ensure!(
        serial == "bulkhead-test-disk",
        "guest sees serial {serial:?}"
    );
    let got_md5 = marker(&lines, "BULKHEAD-BLK-MD5=").context("no md5 marker")?;
    ensure!(
        got_md5 == want_md5,
        "the guest read md5 {got_md5}, the image has {want_md5}"
    );
    let wrote = marker(&lines, "BULKHEAD-BLK-WROTE=").context("no wrote marker")?;
    let readback = marker(&lines, "BULKHEAD-BLK-READBACK=").context("no readback marker")?;
    ensure!(wrote == readback, "wrote {wrote}, read back {readback}");

    // The pattern is in the file on the host, and nothing else changed.
    let after = std::fs::read(&image)?;
    let before = image_bytes();
    let off = kit::BLK_PATTERN_OFFSET as usize;
    let mut pattern = Vec::new();
    while pattern.len() < kit::BLK_PATTERN_LEN {
        pattern.extend_from_slice(kit::BLK_PATTERN_LINE.as_bytes());
        pattern.push(b'\n');
    }
    pattern.truncate(kit::BLK_PATTERN_LEN);
    ensure!(after.len() == IMAGE_SIZE, "image size changed");
    ensure!(
        after[off..off + pattern.len()] == pattern[..],
        "the guest's pattern is not in the image at {off}"
    );
    ensure!(
        after[..off] == before[..off]
            && after[off + pattern.len()..] == before[off + pattern.len()..],
        "bytes outside the pattern changed"
    );
    eprintln!(
        "blockd (cache={cache}) under QEMU/TCG: md5 {got_md5} matches, pattern on disk, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
