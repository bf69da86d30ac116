//! `bulkhead-blockd` serves a real Linux virtio-blk driver: Debian's qemu-system-x86_64 under TCG
//! (no KVM) boots the kit's L2 kernel with its guest RAM in a shared memfd and a
//! `vhost-user-blk-pci` device whose back end is the standalone blockd (sandboxed, `--sandbox
//! on`). The guest (`bulkhead.test=blk`) loads virtio-pci and virtio-blk, checksums the whole
//! disk, writes a pattern, syncs and reads it back; the host checks the checksum against the image
//! it made and, after the guest has powered off, finds the pattern in the image file.
//!
//! Missing pieces (qemu, the blockd binary, the kit) fail the test; nothing is skipped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bulkhead_tests::kit::{self, GuestKit};
use bulkhead_tests::util::workspace_root;

/// Image size: 8 MiB.
const IMAGE_SIZE: usize = 8 << 20;

/// Kills and reaps a child on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scratch(name: &str) -> Result<PathBuf> {
    let d = workspace_root()
        .join("target/test-scratch")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

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

fn md5(path: &Path) -> Result<String> {
    let out = Command::new("md5sum")
        .arg(path)
        .output()
        .context("running md5sum")?;
    ensure!(out.status.success(), "md5sum {} failed", path.display());
    let s = String::from_utf8_lossy(&out.stdout);
    Ok(s.split_whitespace().next().unwrap_or_default().to_owned())
}

fn marker<'a>(lines: &'a [String], key: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| l.trim().strip_prefix(key))
}

fn wait_for_socket(path: &Path, blockd: &mut Child) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if let Some(st) = blockd.try_wait()? {
            bail!("bulkhead-blockd exited early: {st}");
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "bulkhead-blockd did not create {} in 10 s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
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
    wait_for_socket(&sock, &mut blockd.0)?;

    let append = bulkhead_tests::l2_append("blk");
    let mut qemu = Reaped(
        Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", "256", "-smp", "1", "-nodefaults"])
            .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
            .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
            .args(["-machine", "memory-backend=mem"])
            .arg("-chardev")
            .arg(format!("socket,id=c0,path={}", sock.display()))
            .args(["-device", "vhost-user-blk-pci,chardev=c0,num-queues=2"])
            .arg("-kernel")
            .arg(&kit.l2_bzimage)
            .arg("-initrd")
            .arg(&kit.l2_initrd)
            .args(["-append", &append])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu-system-x86_64")?,
    );
    let stdout = qemu.0.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + Duration::from_secs(90);
    let mut lines = Vec::new();
    let mut done = false;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => {
                eprintln!("[guest] {l}");
                done |= l.contains("BULKHEAD-BLK-DONE");
                lines.push(l);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if done {
            break;
        }
        if let Some(st) = blockd.0.try_wait()? {
            bail!(
                "bulkhead-blockd exited during the boot ({st}): {}",
                std::fs::read_to_string(dir.join("blockd.log")).unwrap_or_default()
            );
        }
    }
    // Let the guest power off, which closes the vhost-user connection.
    let off = Instant::now();
    while off.elapsed() < Duration::from_secs(15) && qemu.0.try_wait()?.is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    // The front end is gone: blockd ends on its own, successfully.
    let gone = Instant::now();
    let mut blockd_status = None;
    while gone.elapsed() < Duration::from_secs(10) {
        blockd_status = blockd.0.try_wait()?;
        if blockd_status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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
