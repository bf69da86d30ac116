//! Worker mode: `bulkhead-blockd --ipc-fd N [--sandbox on|off|allow-weak] [--mem-bytes N]
//! [--queues N]`, the back end of one disk as the monitor launches it.
//!
//! The monitor's launcher starts it in its own namespaces with its end of an ipc
//! `SOCK_SEQPACKET` pair at fd 3 and the violation-report pipe at fd 4, nothing else. Before it
//! reads a single frame it confines itself with the blockd role's whole policy
//! ([`bulkhead_sandbox::enter`]: empty root, no capabilities, rlimits sized by `--mem-bytes` and
//! `--queues`, landlock with no filesystem access, seccomp). It never opens a path: the
//! monitor's [`BlockRequest::Setup`] brings the image fd (opened by the monitor, `O_DIRECT` for
//! `cache=none`), the buffered-tail fd under `cache=none`, and the connected vhost-user socket
//! whose other end is the front end. blockd serves that socket with `vhost-user-backend`
//! (`VhostUserDaemon::start_with_stream`, see third_party/vhost-user-backend) and keeps
//! answering the monitor on the ipc channel: I/O counters ([`Counted`], taken where requests
//! reach the image), `block_resize`, its sandbox report, quit. It exits 0 when the front end
//! hangs up (after a [`BlockEvent::FrontEndGone`]), when the monitor goes, or on `Quit`.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bulkhead_ipc::messages::{
    BlockEvent, BlockProtocol, BlockReply, BlockRequest, BlockSetup, BlockStats, ImageFormat,
    ThrottleLimits,
};
use bulkhead_ipc::{Channel, Frame, Role as IpcRole};
use bulkhead_sandbox::Role;
use bulkhead_worker::sandbox_report;
use bulkhead_worker::setup_err;
pub use bulkhead_worker::{WorkerArgs, WorkerError};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{BlockBackend, MAX_QUEUES};
use crate::errors::Policies;
use crate::format::{DiskImage, Raw, DIRECT_ALIGN};
use crate::iov::GuestIov;
use crate::qcow2::{self, Qcow2};

/// Usage of worker mode.
pub const USAGE: &str = "usage: bulkhead-blockd --ipc-fd N [--sandbox on|off|allow-weak] \
[--mem-bytes N] [--queues N] (launched by the bulkhead monitor)";

/// Worker mode is selected by `--ipc-fd` as the first argument ([`WorkerArgs::parse`], with
/// `--queues` up to [`MAX_QUEUES`]); `None` otherwise (the standalone command line).
pub fn parse_args(args: &[String]) -> Option<Result<WorkerArgs, WorkerError>> {
    WorkerArgs::parse(args, MAX_QUEUES as u32).map(|r| {
        r.map_err(|message| WorkerError::Usage {
            message,
            usage: USAGE,
        })
    })
}

/// One leaky bucket of a [`Throttle`] (QEMU's model): the level drains at `rate` units a
/// second; an operation may start while the level is at most the burst allowance (a tenth of a
/// second's worth), and then adds its cost.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: f64,
    level: f64,
}

impl Bucket {
    fn drain(&mut self, secs: f64) {
        self.level = (self.level - self.rate * secs).max(0.0);
    }

    /// How long until an operation may start (zero: now).
    fn wait(&self) -> f64 {
        let extra = self.level - self.rate / 10.0;
        if extra <= 0.0 {
            0.0
        } else {
            extra / self.rate
        }
    }
}

/// `block_set_io_throttle`'s limits, enforced where requests reach the image: a read or write
/// that would exceed one waits (its queue's thread sleeps) until the buckets have drained.
/// Flushes, discards and write-zeroes are not limited. The decisions take the time as an
/// argument ([`Throttle::admit`]), so they are tested without clocks.
#[derive(Debug)]
pub struct Throttle {
    /// bps total, bps read, bps write, iops total, iops read, iops write (`None`: no limit).
    buckets: [Option<Bucket>; 6],
    last: Instant,
}

impl Throttle {
    /// The buckets for `limits`, empty at `now`.
    pub fn new(limits: &ThrottleLimits, now: Instant) -> Throttle {
        let b = |rate: u64| {
            (rate > 0).then_some(Bucket {
                rate: rate as f64,
                level: 0.0,
            })
        };
        Throttle {
            buckets: [
                b(limits.bps),
                b(limits.bps_rd),
                b(limits.bps_wr),
                b(limits.iops),
                b(limits.iops_rd),
                b(limits.iops_wr),
            ],
            last: now,
        }
    }

    /// At `now`: `None` if a read (`write` false) or write of `bytes` may start (its cost is
    /// then added), else how long to wait before asking again.
    pub fn admit(&mut self, now: Instant, write: bool, bytes: u64) -> Option<std::time::Duration> {
        let secs = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        // The buckets this operation counts in, with its cost in each.
        let (bps_dir, iops_dir) = if write { (2, 5) } else { (1, 4) };
        let costs = [
            (0, bytes as f64),
            (bps_dir, bytes as f64),
            (3, 1.0),
            (iops_dir, 1.0),
        ];
        let mut wait: f64 = 0.0;
        for b in self.buckets.iter_mut().flatten() {
            b.drain(secs);
        }
        for (i, _) in costs {
            if let Some(b) = &self.buckets[i] {
                wait = wait.max(b.wait());
            }
        }
        if wait > 0.0 {
            // At least a microsecond, so a caller never spins.
            return Some(std::time::Duration::from_secs_f64(wait.max(1e-6)));
        }
        for (i, cost) in costs {
            if let Some(b) = &mut self.buckets[i] {
                b.level += cost;
            }
        }
        None
    }
}

/// A disk as the request path sees it, counting every operation that reaches the image
/// ([`BlockStats`]), holding the size `block_resize` may change, and applying
/// `block_set_io_throttle`'s limits ([`Throttle`]).
pub struct Counted {
    inner: Arc<dyn DiskImage>,
    size: AtomicU64,
    stats: Mutex<Counters>,
    /// An fd of the image for `ftruncate` (raw images only).
    resize: Option<File>,
    throttle: Mutex<Option<Throttle>>,
    /// `block-set-write-threshold` (guest offset; 0: off).
    threshold: AtomicU64,
    /// Where [`BlockEvent::WriteThreshold`] goes (the monitor's channel, once serving).
    events: std::sync::OnceLock<Arc<Channel<BlockProtocol>>>,
}

#[derive(Default)]
struct Counters {
    s: BlockStats,
    last: Option<Instant>,
}

#[derive(Clone, Copy)]
enum Op {
    Read,
    Write,
    Flush,
    Unmap,
}

impl Counted {
    /// Wraps `inner`; `resize` is an fd of a raw image that `block_resize` may truncate.
    pub fn new(inner: Arc<dyn DiskImage>, resize: Option<File>) -> Counted {
        Counted {
            size: AtomicU64::new(inner.size()),
            inner,
            stats: Mutex::new(Counters::default()),
            resize,
            throttle: Mutex::new(None),
            threshold: AtomicU64::new(0),
            events: std::sync::OnceLock::new(),
        }
    }

    /// Where write-threshold events go (set once, when serving starts).
    pub fn set_events(&self, chan: Arc<Channel<BlockProtocol>>) {
        let _ = self.events.set(chan);
    }

    /// `block-set-write-threshold`: watch for a write ending beyond `threshold` (0: off).
    pub fn set_write_threshold(&self, threshold: u64) {
        self.threshold.store(threshold, Ordering::Release);
    }

    /// As QEMU before a write: one that ends beyond the threshold is reported once, and the
    /// threshold is off from then on.
    fn check_threshold(&self, offset: u64, len: u64) {
        let t = self.threshold.load(Ordering::Acquire);
        let end = offset.saturating_add(len);
        if t == 0 || end <= t {
            return;
        }
        if self
            .threshold
            .compare_exchange(t, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            log::info!("write threshold {t} passed (a write ends at {end})");
            if let Some(chan) = self.events.get() {
                let _ = chan.send_event(BlockEvent::WriteThreshold { end, threshold: t });
            }
        }
    }

    /// Sets (or, all zero, lifts) the I/O limits.
    pub fn set_throttle(&self, limits: &ThrottleLimits) {
        let t = limits
            .enabled()
            .then(|| Throttle::new(limits, Instant::now()));
        *self.throttle.lock().unwrap_or_else(PoisonError::into_inner) = t;
    }

    /// Waits until the limits let a read or write of `bytes` start.
    fn throttle(&self, write: bool, bytes: u64) {
        loop {
            let wait = {
                let mut t = self.throttle.lock().unwrap_or_else(PoisonError::into_inner);
                match t.as_mut() {
                    None => return,
                    Some(t) => match t.admit(Instant::now(), write, bytes) {
                        None => return,
                        Some(w) => w,
                    },
                }
            };
            std::thread::sleep(wait);
        }
    }

    /// The counters now.
    pub fn stats(&self) -> BlockStats {
        let c = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        let mut s = c.s.clone();
        s.idle_time_ns = c
            .last
            .map(|t| u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        s
    }

    /// Changes the virtual size (`block_resize`): the image file is truncated or extended.
    pub fn resize(&self, size: u64) -> Result<(), String> {
        if self.inner.read_only() {
            return Err("the disk is read-only".into());
        }
        let Some(f) = &self.resize else {
            return Err("resizing this image format is not supported yet (raw only)".into());
        };
        f.set_len(size)
            .map_err(|e| format!("cannot resize the image: {e}"))?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    fn count<T>(&self, op: Op, bytes: u64, start: Instant, r: &crate::Result<T>) {
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut c = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        let s = &mut c.s;
        let ok = r.is_ok();
        let (ops, failed, time, total) = match op {
            Op::Read => (
                &mut s.rd_operations,
                &mut s.failed_rd_operations,
                &mut s.rd_total_time_ns,
                &mut s.rd_bytes,
            ),
            Op::Write => (
                &mut s.wr_operations,
                &mut s.failed_wr_operations,
                &mut s.wr_total_time_ns,
                &mut s.wr_bytes,
            ),
            Op::Flush => {
                if ok {
                    s.flush_operations += 1;
                    s.flush_total_time_ns = s.flush_total_time_ns.saturating_add(ns);
                } else {
                    s.failed_flush_operations += 1;
                }
                c.last = Some(Instant::now());
                return;
            }
            Op::Unmap => (
                &mut s.unmap_operations,
                &mut s.failed_unmap_operations,
                &mut s.unmap_total_time_ns,
                &mut s.unmap_bytes,
            ),
        };
        if ok {
            *ops += 1;
            *time = time.saturating_add(ns);
            *total = total.saturating_add(bytes);
        } else {
            *failed += 1;
        }
        c.last = Some(Instant::now());
    }
}

impl DiskImage for Counted {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
        self.throttle(false, buf.len() as u64);
        let t = Instant::now();
        let r = self.inner.read_at(buf, offset);
        self.count(Op::Read, buf.len() as u64, t, &r);
        r
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> crate::Result<()> {
        self.check_threshold(offset, buf.len() as u64);
        self.throttle(true, buf.len() as u64);
        let t = Instant::now();
        let r = self.inner.write_at(buf, offset);
        self.count(Op::Write, buf.len() as u64, t, &r);
        if r.is_ok() {
            let end = offset.saturating_add(buf.len() as u64);
            let mut c = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            c.s.wr_highest_offset = c.s.wr_highest_offset.max(end);
        }
        r
    }

    fn read_vectored(&self, iov: &GuestIov<'_>, offset: u64) -> crate::Result<()> {
        let len = iov.total() as u64;
        self.throttle(false, len);
        let t = Instant::now();
        let r = self.inner.read_vectored(iov, offset);
        self.count(Op::Read, len, t, &r);
        r
    }

    fn nowait(&self) -> bool {
        self.inner.nowait()
    }

    fn serialized_writes(&self) -> bool {
        self.inner.serialized_writes()
    }

    fn try_vectored(&self, iov: &GuestIov<'_>, offset: u64, write: bool) -> bool {
        // A throttled disk waits for its buckets: never on a queue thread.
        if self
            .throttle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
        {
            return false;
        }
        let len = iov.total() as u64;
        if write {
            self.check_threshold(offset, len);
        }
        let t = Instant::now();
        if !self.inner.try_vectored(iov, offset, write) {
            return false;
        }
        let op = if write { Op::Write } else { Op::Read };
        self.count(op, len, t, &Ok(()));
        if write {
            let end = offset.saturating_add(len);
            let mut c = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            c.s.wr_highest_offset = c.s.wr_highest_offset.max(end);
        }
        true
    }

    fn write_vectored(&self, iov: &GuestIov<'_>, offset: u64) -> crate::Result<()> {
        let len = iov.total() as u64;
        self.check_threshold(offset, len);
        self.throttle(true, len);
        let t = Instant::now();
        let r = self.inner.write_vectored(iov, offset);
        self.count(Op::Write, len, t, &r);
        if r.is_ok() {
            let end = offset.saturating_add(len);
            let mut c = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            c.s.wr_highest_offset = c.s.wr_highest_offset.max(end);
        }
        r
    }

    fn flush(&self) -> crate::Result<()> {
        let t = Instant::now();
        let r = self.inner.flush();
        self.count(Op::Flush, 0, t, &r);
        r
    }

    fn discard(&self, offset: u64, len: u64) -> crate::Result<()> {
        let t = Instant::now();
        let r = self.inner.discard(offset, len);
        self.count(Op::Unmap, len, t, &r);
        r
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> crate::Result<()> {
        self.check_threshold(offset, len);
        let t = Instant::now();
        let r = self.inner.write_zeroes(offset, len, unmap);
        self.count(Op::Unmap, len, t, &r);
        r
    }
}

/// Builds the disk from a setup and its fds (`[image, vhost_user, buffered_tail?, backing...]`):
/// a raw image, or a qcow2 image on its backing chain (each backing file's format is the one
/// its parent's header records; the monitor opened the files, read-only, outermost first).
fn open_disk(s: &BlockSetup, fds: &mut Vec<OwnedFd>) -> Result<Arc<Counted>, String> {
    if s.num_queues == 0 || usize::from(s.num_queues) > MAX_QUEUES {
        return Err(format!("{} queues (1 to {MAX_QUEUES})", s.num_queues));
    }
    let want = 2 + usize::from(s.buffered_tail) + s.backing_files as usize;
    if fds.len() != want {
        return Err(format!("the setup has {} fds, expected {want}", fds.len()));
    }
    // fds: [image, vhost_user, buffered_tail?, backing...]; the vhost-user socket stays at 0.
    let image = File::from(fds.remove(0));
    let tail = s.buffered_tail.then(|| File::from(fds.remove(1)));
    let backing: Vec<File> = fds.drain(1..).map(File::from).collect();
    if s.format == ImageFormat::Raw && !backing.is_empty() {
        return Err("a raw image has no backing file".into());
    }
    let (disk, resize): (Arc<dyn DiskImage>, Option<File>) = match s.format {
        ImageFormat::Raw => {
            let resize = if s.readonly {
                None
            } else {
                Some(
                    image
                        .try_clone()
                        .map_err(|e| format!("dup of the image fd: {e}"))?,
                )
            };
            let mut raw = Raw::new(image, s.readonly, s.direct).map_err(|e| e.to_string())?;
            if let Some(t) = tail {
                raw = raw.with_buffered_tail(t);
            }
            (Arc::new(raw), resize)
        }
        ImageFormat::Qcow2 => {
            let h = qcow2::read_header(&image).map_err(|e| e.to_string())?;
            let chain = open_chain(recorded_format(&h), backing)?;
            let mut q = Qcow2::open(image, chain, s.readonly).map_err(|e| e.to_string())?;
            if let Some(t) = tail {
                q = q.with_buffered_tail(t);
            }
            (Arc::new(q), None)
        }
    };
    Ok(Arc::new(Counted::new(disk, resize)))
}

/// The format a qcow2 header records for its backing file (`None`: no backing file, or no
/// recorded format, which `Qcow2::open`'s chain check then refuses).
fn recorded_format(h: &qcow2::Header) -> Option<ImageFormat> {
    match h.backing.as_ref()?.format.as_deref()? {
        "raw" => Some(ImageFormat::Raw),
        _ => Some(ImageFormat::Qcow2),
    }
}

/// The backing chain from its files (outermost first), each opened read-only in the format its
/// parent's header records (`first`: the image's own record). Whether the chain has exactly
/// the files the headers name is checked by `Qcow2::open` at each level.
fn open_chain(
    first: Option<ImageFormat>,
    files: Vec<File>,
) -> Result<Option<Box<dyn DiskImage>>, String> {
    if files.len() > qcow2::MAX_CHAIN {
        return Err(format!("a backing chain of {} files", files.len()));
    }
    let mut formats = Vec::with_capacity(files.len());
    let mut next = first;
    for (i, f) in files.iter().enumerate() {
        let fmt = next.ok_or_else(|| {
            format!("backing file {i}: its parent names no backing file (or no format)")
        })?;
        formats.push(fmt);
        next = match fmt {
            ImageFormat::Raw => None,
            ImageFormat::Qcow2 => {
                recorded_format(&qcow2::read_header(f).map_err(|e| e.to_string())?)
            }
        };
    }
    let mut below: Option<Box<dyn DiskImage>> = None;
    for (f, fmt) in files.into_iter().zip(formats).rev() {
        below = Some(match fmt {
            ImageFormat::Raw => {
                let direct = is_direct(&f);
                Box::new(Raw::new(f, true, direct).map_err(|e| e.to_string())?)
            }
            ImageFormat::Qcow2 => {
                Box::new(Qcow2::open(f, below.take(), true).map_err(|e| e.to_string())?)
            }
        });
    }
    Ok(below)
}

fn is_direct(f: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL on an fd we own; no memory involved.
    let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    fl >= 0 && fl & libc::O_DIRECT != 0
}

/// The running back end: the daemon's thread serves the front end.
struct Serving {
    disk: Arc<Counted>,
    backend: Arc<BlockBackend>,
}

fn start_serving(
    s: &BlockSetup,
    mut fds: Vec<OwnedFd>,
    chan: &Arc<Channel<BlockProtocol>>,
) -> Result<Serving, String> {
    let disk = open_disk(s, &mut fds)?;
    disk.set_events(chan.clone());
    let vhost = UnixStream::from(fds.remove(0));
    let block_size = if s.direct { DIRECT_ALIGN as u32 } else { 512 };
    let policies = Policies {
        rerror: s.rerror,
        werror: s.werror,
    };
    let backend = Arc::new(
        BlockBackend::new(
            disk.clone(),
            s.serial.clone().into_bytes(),
            usize::from(s.num_queues),
            block_size,
            policies,
        )
        .map_err(|e| format!("creating the back end: {e}"))?,
    );
    backend.errors().set_events(chan.clone());
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("bulkhead-blockd".into(), backend.clone(), mem)
        .map_err(|e| format!("creating the vhost-user daemon: {e}"))?;
    backend
        .attach(&daemon.get_epoll_handlers())
        .map_err(|e| format!("registering the queue threads' wake events: {e}"))?;
    daemon
        .start_with_stream(vhost)
        .map_err(|e| format!("serving the front end: {e}"))?;
    let chan = chan.clone();
    let id = s.id.clone();
    std::thread::Builder::new()
        .name("frontend-wait".into())
        .spawn(move || {
            let r = daemon.wait();
            for h in daemon.get_epoll_handlers() {
                h.send_exit_event();
            }
            match r {
                Ok(()) => log::info!("{id}: the front end hung up"),
                Err(e) => log::info!("{id}: the front end session ended: {e}"),
            }
            let _ = chan.send_event(BlockEvent::FrontEndGone);
            std::process::exit(0);
        })
        .map_err(|e| format!("starting a thread: {e}"))?;
    Ok(Serving { disk, backend })
}

/// Worker mode's `main`: confine, then serve the monitor's requests until it goes or says quit.
pub fn run(a: WorkerArgs) -> Result<(), WorkerError> {
    let report_fd = bulkhead_worker::confine::prepare(a.ipc_fd, &[])?;
    bulkhead_worker::confine::one_malloc_arena()?;
    let report = bulkhead_sandbox::enter(Role::Blockd.policy(), &a.params, a.mode, report_fd)
        .map_err(setup_err("sandbox"))?;
    bulkhead_worker::confine::log_entered(module_path!(), a.mode, &report);
    // SAFETY: the monitor handed us this fd as our end of the ipc socketpair; every other
    // inherited fd but the report pipe was just closed, so nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(a.ipc_fd) };
    let chan = Arc::new(Channel::<BlockProtocol>::from_fd(sock));
    chan.handshake(IpcRole::Block, IpcRole::Monitor)?;
    let mut serving: Option<Serving> = None;
    loop {
        let (frame, fds) = match chan.recv() {
            Ok(v) => v,
            Err(bulkhead_ipc::Error::PeerClosed) => {
                log::info!("the monitor closed the channel; exiting");
                std::process::exit(0);
            }
            Err(e) => return Err(e.into()),
        };
        let (id, req) = match frame {
            Frame::Request { id, body } => (id, body),
            other => {
                return Err(bulkhead_ipc::Error::Protocol(format!(
                    "unexpected frame from the monitor: {other:?}"
                ))
                .into())
            }
        };
        let reply = match req {
            BlockRequest::Setup(s) if serving.is_none() => match start_serving(&s, fds, &chan) {
                Ok(sv) => {
                    let size = sv.disk.size();
                    log::info!(
                        "{}: serving a {} image of {size} bytes{}{}, {} queue(s), rerror={} werror={}",
                        s.id,
                        s.format.name(),
                        if s.readonly { ", read-only" } else { "" },
                        if s.direct { ", cache=none" } else { "" },
                        s.num_queues,
                        s.rerror.name(),
                        s.werror.name(),
                    );
                    serving = Some(sv);
                    BlockReply::Ready { size }
                }
                Err(e) => BlockReply::Error(e),
            },
            BlockRequest::Setup(_) => BlockReply::Error("already set up".into()),
            BlockRequest::QueryStats => match &serving {
                Some(sv) => BlockReply::Stats(sv.disk.stats()),
                None => BlockReply::Error("not set up".into()),
            },
            BlockRequest::Resize { size } => match &serving {
                Some(sv) => match sv.disk.resize(size) {
                    Ok(()) => BlockReply::Ok,
                    Err(e) => BlockReply::Error(e),
                },
                None => BlockReply::Error("not set up".into()),
            },
            BlockRequest::QuerySandbox => BlockReply::Sandbox(sandbox_report()),
            BlockRequest::SetThrottle(l) => match &serving {
                Some(sv) => {
                    sv.disk.set_throttle(&l);
                    log::info!("I/O limits: {l:?}");
                    BlockReply::Ok
                }
                None => BlockReply::Error("not set up".into()),
            },
            BlockRequest::SetWriteThreshold(t) => match &serving {
                Some(sv) => {
                    sv.disk.set_write_threshold(t);
                    log::info!("write threshold: {t}");
                    BlockReply::Ok
                }
                None => BlockReply::Error("not set up".into()),
            },
            BlockRequest::Resume => match &serving {
                Some(sv) => {
                    let held = sv.backend.resume();
                    log::info!("resumed ({held} request(s) still held)");
                    BlockReply::Ok
                }
                None => BlockReply::Ok,
            },
            BlockRequest::Quit => {
                let _ = chan.reply(id, BlockReply::Ok, &[]);
                log::info!("quit");
                std::process::exit(0);
            }
        };
        chan.reply(id, reply, &[])?;
    }
}

/// Logs to stderr (the monitor's log) at the level `BULKHEAD_LOG` names (default info), as
/// every worker does ([`bulkhead_worker::logger`]).
pub fn init_logger() {
    bulkhead_worker::logger::init("bulkhead-blockd");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bulkhead_sandbox::Mode;

    fn args(s: &str) -> Option<Result<WorkerArgs, WorkerError>> {
        let v: Vec<String> = s.split_whitespace().map(String::from).collect();
        parse_args(&v)
    }

    /// The parsing itself is `bulkhead_worker::args`'s (tested there); here, what is this
    /// program's: its standalone command line and its queue bound.
    #[test]
    fn worker_mode_is_chosen_by_ipc_fd_first() {
        assert!(args("--socket /s --file /f").is_none());
        let a = args("--ipc-fd 3 --sandbox allow-weak --queues 16")
            .unwrap()
            .unwrap();
        assert_eq!(
            (a.ipc_fd, a.mode, a.params.queues),
            (3, Mode::AllowWeak, 16)
        );
        for bad in ["--ipc-fd 3 --queues 17", "--ipc-fd 3 --file /f"] {
            assert!(
                matches!(args(bad), Some(Err(WorkerError::Usage { .. }))),
                "{bad}"
            );
        }
    }

    fn temp_image(len: u64) -> (std::path::PathBuf, File) {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "bh-blockd-worker-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(len).unwrap();
        (p, f)
    }

    #[test]
    fn throttling_admits_by_the_buckets() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        // 10 iops: an operation starts while the level is at most a tenth of a second's worth
        // (1 op), as in QEMU: two at once, the third waits 0.1 s for the surplus to drain.
        let mut t = Throttle::new(
            &ThrottleLimits {
                iops: 10,
                ..ThrottleLimits::default()
            },
            t0,
        );
        assert_eq!(t.admit(at(0), false, 512), None);
        assert_eq!(t.admit(at(0), false, 512), None);
        let w = t.admit(at(0), true, 512).expect("waits");
        assert!((w.as_secs_f64() - 0.1).abs() < 1e-6, "{w:?}");
        assert_eq!(t.admit(at(100), true, 512), None);
        // Over a simulated 10 s, about 10 operations a second get in.
        let mut n = 0;
        let mut now = at(100);
        while now < at(10_100) {
            match t.admit(now, n % 2 == 0, 4096) {
                None => n += 1,
                Some(w) => now += w,
            }
        }
        assert!((99..=103).contains(&n), "{n}");
        // 1 MB/s for writes only: reads pass freely, 100 writes of 100 KB take about 10 s.
        let mut t = Throttle::new(
            &ThrottleLimits {
                bps_wr: 1_000_000,
                ..ThrottleLimits::default()
            },
            t0,
        );
        for _ in 0..1000 {
            assert_eq!(t.admit(at(0), false, 1 << 20), None);
        }
        let mut now = at(0);
        let mut done = 0;
        while done < 100 {
            match t.admit(now, true, 100_000) {
                None => done += 1,
                Some(w) => now += w,
            }
        }
        let secs = now.duration_since(t0).as_secs_f64();
        assert!((9.0..=10.1).contains(&secs), "{secs}");
        // A request larger than the burst allowance still gets through (after the wait).
        let mut t = Throttle::new(
            &ThrottleLimits {
                bps: 1000,
                ..ThrottleLimits::default()
            },
            t0,
        );
        assert_eq!(t.admit(at(0), true, 1 << 20), None);
        assert!(t.admit(at(1), false, 1).is_some());
    }

    #[test]
    fn counters_and_resize() {
        let (p, f) = temp_image(1 << 20);
        let resize = f.try_clone().unwrap();
        let raw = Raw::new(f, false, false).unwrap();
        let d = Counted::new(Arc::new(raw), Some(resize));
        assert!(
            d.serialized_writes(),
            "a buffered image's write lane shows through"
        );
        assert_eq!(d.stats(), BlockStats::default());
        d.write_at(&[7u8; 4096], 8192).unwrap();
        let mut buf = [0u8; 512];
        d.read_at(&mut buf, 8192).unwrap();
        assert_eq!(buf, [7u8; 512]);
        d.flush().unwrap();
        d.discard(0, 4096).unwrap();
        let s = d.stats();
        assert_eq!((s.wr_operations, s.wr_bytes), (1, 4096));
        assert_eq!((s.rd_operations, s.rd_bytes), (1, 512));
        assert_eq!(s.flush_operations, 1);
        assert_eq!((s.unmap_operations, s.unmap_bytes), (1, 4096));
        assert_eq!(s.wr_highest_offset, 8192 + 4096);
        // The write threshold: the first write ending beyond it is reported, once.
        let (mine, theirs) = Channel::<BlockProtocol>::pair().expect("pair");
        d.set_events(Arc::new(mine));
        d.set_write_threshold(12 * 1024);
        d.write_at(&[1u8; 4096], 8192)
            .expect("write up to the threshold");
        d.write_at(&[1u8; 512], 12 * 1024).expect("write beyond");
        d.write_zeroes(16 * 1024, 4096, false)
            .expect("zeroes beyond");
        match theirs.recv().expect("event").0 {
            Frame::Event(BlockEvent::WriteThreshold { end, threshold }) => {
                assert_eq!((end, threshold), (12 * 1024 + 512, 12 * 1024));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(d.threshold.load(Ordering::Acquire), 0);
        assert!(s.idle_time_ns.is_some());
        d.resize(2 << 20).unwrap();
        assert_eq!(d.size(), 2 << 20);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 20);
        d.resize(1 << 19).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 19);
        let ro = Counted::new(
            Arc::new(Raw::new(File::open(&p).unwrap(), true, false).unwrap()),
            None,
        );
        assert!(ro.resize(1 << 20).unwrap_err().contains("read-only"));
        let _ = std::fs::remove_file(&p);
    }
}
