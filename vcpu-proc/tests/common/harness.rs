//! Plays the monitor's part for `bulkhead-vcpu`: opens /dev/kvm, creates a sealed memfd,
//! spawns the worker with its ipc socket at fd 3, sends Setup with the fds in the documented
//! order, and demultiplexes replies (by id) and events. Serial output arrives on a pipe and is
//! collected (and optionally echoed). Shared by the integration tests and `examples/drive.rs`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bulkhead_ipc::messages::{
    CpuTopology, VcpuEvent, VcpuProtocol, VcpuReply, VcpuRequest, VmSetup,
};
use bulkhead_ipc::{Channel, Frame, Role};
use bulkhead_sandbox::launch::{Child, Command, IdMap};
use bulkhead_sandbox::Role as SandboxRole;

/// Collected serial output with a condition variable for waiters.
#[derive(Default)]
pub struct SerialLog {
    buf: Mutex<Vec<u8>>,
    cv: Condvar,
}

impl SerialLog {
    /// Everything received so far, lossily as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Bytes received so far.
    pub fn len(&self) -> usize {
        self.buf.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Waits until the output after byte `from` contains `needle`; returns the end offset of
    /// the match.
    pub fn wait_for(&self, needle: &str, from: usize, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        let mut g = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let start = from.min(g.len());
            if let Some(pos) = find(&g[start..], needle.as_bytes()) {
                return Some(start + pos + needle.len());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A running worker and our end of its channel.
pub struct Worker {
    pub child: Child,
    chan: Arc<Channel<VcpuProtocol>>,
    next_id: u64,
    pending: Arc<Mutex<HashMap<u64, Sender<VcpuReply>>>>,
    pub events: Receiver<(Instant, VcpuEvent)>,
    pub serial: Arc<SerialLog>,
    serial_in: Option<File>,
    pub started: Instant,
}

/// What to boot.
pub struct Boot<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem_mib: u64,
    pub vcpus: u32,
    pub no_reboot: bool,
    pub serial_in: bool,
    pub echo: bool,
}

fn cvt(rc: libc::c_int, what: &str) -> std::io::Result<libc::c_int> {
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        Err(std::io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(rc)
    }
}

/// A sealed (no grow, no shrink) memfd of `size` bytes.
pub fn sealed_memfd(size: u64) -> std::io::Result<OwnedFd> {
    // SAFETY: the name is a valid NUL-terminated string; flags are plain ints.
    let fd = cvt(
        unsafe {
            libc::memfd_create(
                c"bulkhead-guest-ram".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        },
        "memfd_create",
    )?;
    // SAFETY: memfd_create returned a new fd that nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own fd.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
    cvt(rc, "ftruncate")?;
    cvt(
        // SAFETY: fcntl with integer arguments on our own fd.
        unsafe {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        },
        "F_ADD_SEALS",
    )?;
    Ok(fd)
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    cvt(rc, "pipe2")?;
    // SAFETY: pipe2 returned two new fds owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl Worker {
    /// Spawns `worker` the way the monitor does: in the vcpu role's namespaces
    /// (`bulkhead_sandbox::launch`), with its ipc socket at fd 3 and the violation-report pipe at
    /// fd 4, told to confine itself fully (`--sandbox on`) for a guest of `mem_mib` MiB and
    /// `vcpus` vCPUs; then completes the handshake.
    pub fn spawn(worker: &Path, mem_mib: u64, vcpus: u32) -> std::io::Result<Self> {
        Self::spawn_with(worker, mem_mib, vcpus, &[], None, &[])
    }

    /// [`Worker::spawn`] with more arguments, another stdout, and more fds (`(fd, number)`).
    pub fn spawn_with(
        worker: &Path,
        mem_mib: u64,
        vcpus: u32,
        extra_args: &[&str],
        stdout: Option<std::os::fd::BorrowedFd<'_>>,
        extra_fds: &[(std::os::fd::BorrowedFd<'_>, i32)],
    ) -> std::io::Result<Self> {
        let (ours, theirs) = Channel::<VcpuProtocol>::pair().map_err(std::io::Error::other)?;
        let theirs = theirs.into_fd();
        let devnull = File::open("/dev/null")?;
        let policy = SandboxRole::Vcpu.policy();
        let ids = IdMap::for_current_user(None).map_err(std::io::Error::other)?;
        let mut cmd = Command::new(worker).map_err(std::io::Error::other)?;
        let mem = (mem_mib << 20).to_string();
        let n = vcpus.to_string();
        for a in [
            "--ipc-fd",
            "3",
            "--sandbox",
            "on",
            "--mem-bytes",
            mem.as_str(),
            "--vcpus",
            n.as_str(),
        ]
        .iter()
        .chain(extra_args)
        {
            cmd.arg(a).map_err(std::io::Error::other)?;
        }
        if let Ok(level) = std::env::var("BULKHEAD_LOG") {
            cmd.env("BULKHEAD_LOG", level)
                .map_err(std::io::Error::other)?;
        }
        cmd.fd(devnull.as_fd(), 0)
            .and_then(|c| c.fd(stdout.unwrap_or(std::io::stdout().as_fd()), 1))
            .and_then(|c| c.fd(std::io::stderr().as_fd(), 2))
            .and_then(|c| c.fd(theirs.as_fd(), 3))
            .map_err(std::io::Error::other)?;
        for (fd, n) in extra_fds {
            cmd.fd(*fd, *n).map_err(std::io::Error::other)?;
        }
        cmd.namespaces(policy.namespaces, Some(ids))
            .report_pipe(true);
        let child = cmd.spawn().map_err(std::io::Error::other)?;
        drop(theirs);
        ours.handshake(Role::Monitor, Role::Vcpu)
            .map_err(std::io::Error::other)?;
        let chan = Arc::new(ours);
        let pending: Arc<Mutex<HashMap<u64, Sender<VcpuReply>>>> = Default::default();
        let (etx, erx) = mpsc::channel();
        let (c, p) = (chan.clone(), pending.clone());
        std::thread::spawn(move || loop {
            match c.recv() {
                Ok((Frame::Reply { id, body }, _)) => {
                    if let Some(tx) = p.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                        let _ = tx.send(body);
                    }
                }
                Ok((Frame::Event(e), _)) => {
                    let _ = etx.send((Instant::now(), e));
                }
                Ok(_) => {}
                Err(_) => return,
            }
        });
        Ok(Worker {
            child,
            chan,
            next_id: 1,
            pending,
            events: erx,
            serial: Arc::new(SerialLog::default()),
            serial_in: None,
            started: Instant::now(),
        })
    }

    /// Sends `req` with `fds` and waits for its reply.
    pub fn request(
        &mut self,
        req: VcpuRequest,
        fds: &[std::os::fd::BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<VcpuReply, String> {
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = mpsc::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        self.chan
            .send(&Frame::Request { id, body: req }, fds)
            .map_err(|e| format!("send: {e}"))?;
        rx.recv_timeout(timeout)
            .map_err(|e| format!("no reply: {e}"))
    }

    /// Sends a request without fds and expects `Ok`.
    pub fn ok(&mut self, req: VcpuRequest) -> Result<(), String> {
        match self.request(req.clone(), &[], Duration::from_secs(30))? {
            VcpuReply::Ok => Ok(()),
            other => Err(format!("{req:?} -> {other:?}")),
        }
    }

    /// Builds the machine: opens /dev/kvm, the kernel and initrd, creates guest memory and the
    /// serial pipes, and sends Setup.
    pub fn setup(&mut self, b: &Boot<'_>) -> Result<VcpuReply, String> {
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| format!("/dev/kvm: {e}"))?;
        let mem_size = b.mem_mib << 20;
        let mem = sealed_memfd(mem_size).map_err(|e| e.to_string())?;
        let kernel = File::open(b.kernel).map_err(|e| format!("{}: {e}", b.kernel.display()))?;
        let initrd = match b.initrd {
            Some(p) => Some(File::open(p).map_err(|e| format!("{}: {e}", p.display()))?),
            None => None,
        };
        let (out_r, out_w) = pipe().map_err(|e| e.to_string())?;
        let (in_r, in_w) = if b.serial_in {
            let (r, w) = pipe().map_err(|e| e.to_string())?;
            (Some(r), Some(w))
        } else {
            (None, None)
        };
        let setup = VmSetup {
            mem_size,
            vcpus: b.vcpus,
            topology: CpuTopology::flat(b.vcpus),
            cmdline: b.cmdline.to_string(),
            has_initrd: initrd.is_some(),
            serial_in: in_r.is_some(),
            serial_out: true,
            no_reboot: b.no_reboot,
            devices: Vec::new(),
        };
        let mut fds = vec![kvm.as_fd(), mem.as_fd(), kernel.as_fd()];
        if let Some(i) = &initrd {
            fds.push(i.as_fd());
        }
        if let Some(r) = &in_r {
            fds.push(r.as_fd());
        }
        fds.push(out_w.as_fd());
        // Start collecting serial output before the guest can produce any.
        let log = self.serial.clone();
        let echo = b.echo;
        let mut out = File::from(out_r);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if echo {
                            use std::io::Write;
                            let _ = std::io::stdout().write_all(&buf[..n]);
                            let _ = std::io::stdout().flush();
                        }
                        let mut g = log.buf.lock().unwrap_or_else(|p| p.into_inner());
                        g.extend_from_slice(&buf[..n]);
                        log.cv.notify_all();
                    }
                }
            }
        });
        self.serial_in = in_w.map(File::from);
        self.request(VcpuRequest::Setup(setup), &fds, Duration::from_secs(60))
    }

    /// Writes to the guest's serial input.
    pub fn type_serial(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        match &mut self.serial_in {
            Some(f) => f.write_all(bytes),
            None => Err(std::io::Error::other("no serial input")),
        }
    }

    /// Hangs up the ipc socket (as a dying monitor would), without touching the child.
    pub fn hang_up(&self) {
        // SAFETY: shutdown(2) on a socket fd we own; no memory is passed.
        unsafe { libc::shutdown(self.chan.as_fd().as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Waits for the next event.
    pub fn next_event(&self, timeout: Duration) -> Option<(Instant, VcpuEvent)> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Resident set size of the worker, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.pid())).ok()?;
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// The worker's memory counters (VmRSS, RssAnon, RssFile, RssShmem), in KiB. Guest RAM
    /// the worker has touched counts as RssShmem (the memfd); its own overhead is the rest.
    pub fn rss_breakdown(&self) -> String {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.pid()))
            .unwrap_or_default();
        s.lines()
            .filter(|l| {
                ["VmRSS:", "RssAnon:", "RssFile:", "RssShmem:"]
                    .iter()
                    .any(|k| l.starts_with(k))
            })
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Waits for the worker to exit. A death by SIGSYS prints the system call the sandbox
    /// refused (the allowlist lacks it, or the worker misbehaved).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                if s.signal() == Some(libc::SIGSYS) {
                    eprintln!(
                        "bulkhead-vcpu was killed by the sandbox: {:?}",
                        self.child.violation()
                    );
                }
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        match self.child.try_wait() {
            Ok(None) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
            Ok(Some(s)) if s.signal() == Some(libc::SIGSYS) => {
                eprintln!(
                    "bulkhead-vcpu was killed by the sandbox: {:?}",
                    self.child.violation()
                );
            }
            _ => {}
        }
    }
}
