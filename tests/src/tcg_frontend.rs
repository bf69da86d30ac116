//! QEMU under TCG as the vhost-user front end of a standalone Bulkhead back end (blockd,
//! netd): Debian's `qemu-system-x86_64` boots the kit's L2 kernel with its RAM in a shared
//! memfd (`memory-backend-memfd,share=on`, which vhost-user needs) and the caller's device
//! arguments, with the guest's console on QEMU's stdout. This module owns that QEMU process, the
//! console reading, and the small process plumbing such tests share (reaping children, collecting
//! a back end's stderr, waiting for its socket and for exits, scratch directories, checksums).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::kit::GuestKit;
use crate::util::workspace_root;

/// Guest RAM of the TCG guest, MiB.
const GUEST_MIB: u32 = 256;

/// A child that is killed and reaped on drop.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh `target/test-scratch/<name>-<pid>` directory.
pub fn scratch(name: &str) -> Result<PathBuf> {
    let d = workspace_root()
        .join("target/test-scratch")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

/// The md5 of a file, as `md5sum` prints it.
pub fn md5(path: &Path) -> Result<String> {
    let out = Command::new("md5sum")
        .arg(path)
        .output()
        .context("running md5sum")?;
    ensure!(out.status.success(), "md5sum {} failed", path.display());
    let s = String::from_utf8_lossy(&out.stdout);
    Ok(s.split_whitespace().next().unwrap_or_default().to_owned())
}

/// What follows `key` on the first console line that starts with it.
pub fn marker<'a>(lines: &'a [String], key: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| l.trim().strip_prefix(key))
}

/// A pipe's lines, collected on a thread of their own.
#[derive(Clone)]
pub struct PipeLog(Arc<Mutex<String>>);

impl PipeLog {
    /// Starts collecting `r`.
    pub fn collect(r: impl Read + Send + 'static) -> PipeLog {
        let out = Arc::new(Mutex::new(String::new()));
        let o = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                let mut g = o.lock().unwrap_or_else(|e| e.into_inner());
                g.push_str(&line);
                g.push('\n');
            }
        });
        PipeLog(out)
    }

    /// What was collected so far.
    pub fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Waits up to 10 s for the back end `child` (`what`) to create its socket `path`; `log` is its
/// output so far, for the error.
pub fn wait_for_socket(
    path: &Path,
    child: &mut Child,
    what: &str,
    log: impl Fn() -> String,
) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if let Some(st) = child.try_wait()? {
            bail!("{what} exited early ({st}): {}", log());
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "{what} did not create {} in 10 s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Waits up to `timeout` for `child` to exit; `None` if it still runs.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if start.elapsed() >= timeout {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The guest's console up to the end of a run.
pub struct Console {
    /// Every line the guest printed.
    pub lines: Vec<String>,
    /// The done marker was among them.
    pub done: bool,
}

/// QEMU under TCG booting the kit's L2 guest in a kit mode, with the caller's devices.
pub struct TcgGuest {
    qemu: Reaped,
    console: mpsc::Receiver<String>,
    /// QEMU's stderr.
    pub stderr: PipeLog,
}

impl TcgGuest {
    /// Starts QEMU (`-accel tcg`, one vCPU, memfd RAM, `-no-reboot`) booting the kit's L2
    /// kernel in mode `mode` (`bulkhead.test=<mode>`) with `devices` (chardevs, netdevs,
    /// devices) added to its command line.
    pub fn spawn(kit: &GuestKit, mode: &str, devices: &[String]) -> Result<TcgGuest> {
        let append = crate::l2_append(mode);
        let mut qemu = Reaped(
            Command::new("qemu-system-x86_64")
                .args(["-accel", "tcg", "-m", &GUEST_MIB.to_string(), "-smp", "1"])
                .args(["-nodefaults", "-display", "none", "-serial", "stdio"])
                .arg("-no-reboot")
                .arg("-object")
                .arg(format!(
                    "memory-backend-memfd,id=mem,size={GUEST_MIB}M,share=on"
                ))
                .args(["-machine", "memory-backend=mem"])
                .args(devices)
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
        let stderr = PipeLog::collect(qemu.0.stderr.take().context("qemu stderr")?);
        let stdout = qemu.0.stdout.take().context("qemu stdout")?;
        let (tx, console) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(TcgGuest {
            qemu,
            console,
            stderr,
        })
    }

    /// Reads the console (echoing it as `[guest] ...`) until a line contains `done`, the
    /// console ends, or `timeout` passes. The back end `backend` (`what`, output `log`) must
    /// live until `done`: its exit before that is an error.
    pub fn run_until(
        &mut self,
        done: &str,
        timeout: Duration,
        backend: &mut Child,
        what: &str,
        log: impl Fn() -> String,
    ) -> Result<Console> {
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        let mut seen = false;
        while Instant::now() < deadline && !seen {
            match self.console.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => {
                    eprintln!("[guest] {l}");
                    seen |= l.contains(done);
                    lines.push(l);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if !seen {
                if let Some(st) = backend.try_wait()? {
                    bail!(
                        "{what} exited during the boot ({st}): {}\nconsole:\n{}",
                        log(),
                        lines.join("\n")
                    );
                }
            }
        }
        Ok(Console { lines, done: seen })
    }

    /// Waits up to `timeout` for QEMU to exit (the guest powers off with `-no-reboot`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        wait_exit(&mut self.qemu.0, timeout)
    }
}
