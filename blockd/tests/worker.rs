//! `bulkhead-blockd` in worker mode, as the monitor launches it: started by
//! `bulkhead_sandbox::launch` in its own namespaces with only the ipc socket (fd 3) and the
//! violation-report pipe (fd 4), confined by the whole blockd role policy before it reads a frame,
//! given the image fd and a connected vhost-user socket over ipc, and driven here both as the
//! monitor (ipc: setup, stats, resize, sandbox report, quit) and as the vhost-user front end
//! (`vhost::vhost_user::Frontend` on the other end of the socketpair, a memfd as guest memory,
//! one ring written by hand).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use bulkhead_ipc::messages::{
    BlockEvent, BlockProtocol, BlockReply, BlockRequest, BlockSetup, ErrorAction, ErrorPolicy,
    ImageFormat, ThrottleLimits,
};
use bulkhead_ipc::{Channel, Frame, Role as IpcRole};
use bulkhead_sandbox::launch::{Child, Command, IdMap};
use bulkhead_sandbox::Role;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

mod common;
use common::{scratch, GuestMem, MEM_SIZE};

const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;
const IMAGE_SIZE: u64 = 1 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// Guest memory ([`GuestMem`]) with one queue's rings at `DESC`, `AVAIL` and `USED`.
struct Guest {
    mem: GuestMem,
    avail_idx: u16,
    used_seen: u16,
}

impl std::ops::Deref for Guest {
    type Target = GuestMem;

    fn deref(&self) -> &GuestMem {
        &self.mem
    }
}

impl Guest {
    fn new() -> Guest {
        Guest {
            mem: GuestMem::new(c"worker-guest"),
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn used_idx(&self) -> u16 {
        self.read_u16_volatile(USED + 2)
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.desc_at(DESC, i, addr, len, flags, next);
    }

    /// Makes one request available without waiting for it: descriptors `first`.. (header at
    /// `hdr`, data at `data` if `len` > 0, status at `status`), then kicks.
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        kick: &EventFd,
        first: u16,
        kind: u32,
        sector: u64,
        (hdr, data, status): (u64, u64, u64),
        len: u32,
    ) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.write(hdr, &h);
        self.desc(first, hdr, 16, F_NEXT, first + 1);
        let last = if len > 0 {
            let flags = if kind == 0 { F_WRITE } else { 0 };
            self.desc(first + 1, data, len, flags | F_NEXT, first + 2);
            first + 2
        } else {
            first + 1
        };
        self.desc(last, status, 1, F_WRITE, 0);
        self.write(status, &[0xff]);
        let slot = AVAIL + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        self.write(slot, &first.to_le_bytes());
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write(AVAIL + 2, &self.avail_idx.to_le_bytes());
        fence(Ordering::SeqCst);
        kick.write(1).expect("kick");
    }

    /// The next used-ring entry (head, len) within `within`, or `None`.
    fn next_used(&mut self, child: &mut Child, within: Duration) -> Option<(u16, u32)> {
        let start = Instant::now();
        while self.used_idx() == self.used_seen {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("bulkhead-blockd died: {st:?}");
            }
            if start.elapsed() >= within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        fence(Ordering::SeqCst);
        let e = self.read(USED + 4 + u64::from(self.used_seen % QSIZE) * 8, 8);
        self.used_seen = self.used_seen.wrapping_add(1);
        let id = u32::from_le_bytes(e[..4].try_into().expect("4"));
        let len = u32::from_le_bytes(e[4..].try_into().expect("4"));
        Some((u16::try_from(id).expect("head"), len))
    }

    /// One request: header, one data descriptor (if `len` > 0), status; returns the status.
    fn request(
        &mut self,
        kick: &EventFd,
        child: &mut Child,
        kind: u32,
        sector: u64,
        len: u32,
    ) -> u8 {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.write(HDR, &h);
        self.desc(0, HDR, 16, F_NEXT, 1);
        let last = if len > 0 {
            let flags = if kind == 0 { F_WRITE } else { 0 };
            self.desc(1, DATA, len, flags | F_NEXT, 2);
            2
        } else {
            1
        };
        self.desc(last, STATUS, 1, F_WRITE, 0);
        self.write(STATUS, &[0xff]);
        let slot = AVAIL + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        self.write(slot, &0u16.to_le_bytes());
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write(AVAIL + 2, &self.avail_idx.to_le_bytes());
        fence(Ordering::SeqCst);
        kick.write(1).expect("kick");
        let start = Instant::now();
        while self.used_idx() == self.used_seen {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("bulkhead-blockd died: {st:?}");
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no completion");
            std::thread::sleep(Duration::from_millis(1));
        }
        fence(Ordering::SeqCst);
        self.used_seen = self.used_seen.wrapping_add(1);
        self.read(STATUS, 1)[0]
    }
}

/// A launched blockd and the monitor's end of its channel.
struct Worker {
    child: Child,
    chan: Channel<BlockProtocol>,
    next_id: u64,
    /// Events that came while waiting for a reply.
    events: std::collections::VecDeque<BlockEvent>,
}

impl Worker {
    fn launch(queues: u32) -> Worker {
        let (mine, theirs) = Channel::<BlockProtocol>::pair().expect("pair");
        let theirs = theirs.into_fd();
        let mut cmd =
            Command::new(Path::new(env!("CARGO_BIN_EXE_bulkhead-blockd"))).expect("command");
        for a in [
            "--ipc-fd".to_string(),
            "3".into(),
            "--sandbox".into(),
            "on".into(),
            "--mem-bytes".into(),
            (2 * MEM_SIZE).to_string(),
            "--queues".into(),
            queues.to_string(),
        ] {
            cmd.arg(a).expect("arg");
        }
        let devnull = File::open("/dev/null").expect("null");
        cmd.fd(devnull.as_fd(), 0).expect("fd");
        cmd.fd(std::io::stderr().as_fd(), 1).expect("fd");
        cmd.fd(std::io::stderr().as_fd(), 2).expect("fd");
        cmd.fd(theirs.as_fd(), 3).expect("fd");
        cmd.report_pipe(true);
        cmd.namespaces(
            Role::Blockd.policy().namespaces,
            Some(IdMap::for_current_user(None).expect("ids")),
        );
        let child = cmd.spawn().expect("spawn bulkhead-blockd");
        drop(theirs);
        mine.handshake(IpcRole::Monitor, IpcRole::Block)
            .expect("handshake");
        Worker {
            child,
            chan: mine,
            next_id: 1,
            events: Default::default(),
        }
    }

    fn call(&mut self, req: BlockRequest, fds: &[std::os::fd::BorrowedFd<'_>]) -> BlockReply {
        let id = self.next_id;
        self.next_id += 1;
        self.chan
            .send(&Frame::Request { id, body: req }, fds)
            .expect("send");
        loop {
            match self.recv_within(Duration::from_secs(10)) {
                Some(Frame::Reply { id: got, body }) => {
                    assert_eq!(got, id);
                    return body;
                }
                // Events (I/O errors) may come before the reply: kept for next_event.
                Some(Frame::Event(e)) => self.events.push_back(e),
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next frame from blockd within `within` (`None`: nothing came).
    fn recv_within(&mut self, within: Duration) -> Option<Frame<BlockProtocol>> {
        let mut p = libc::pollfd {
            fd: self.chan.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(within.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one pollfd on the stack, for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
        (n > 0).then(|| self.chan.recv().expect("recv").0)
    }

    /// The next event from blockd within `within`.
    fn next_event(&mut self, within: Duration) -> Option<BlockEvent> {
        if let Some(e) = self.events.pop_front() {
            return Some(e);
        }
        match self.recv_within(within)? {
            Frame::Event(e) => Some(e),
            other => panic!("unexpected frame {other:?}"),
        }
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "blockd did not exit"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn proc_status(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status")
}

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{key} missing"))
        .trim()
}

fn setup(serial: &str, readonly: bool) -> BlockSetup {
    BlockSetup {
        id: "disk0".into(),
        format: ImageFormat::Raw,
        readonly,
        direct: false,
        buffered_tail: false,
        serial: serial.into(),
        num_queues: 1,
        backing_files: 0,
        rerror: ErrorPolicy::Report,
        werror: ErrorPolicy::Report,
    }
}

/// The front end's negotiation and one queue, as a vhost-user-blk front end does it.
fn front_end(sock: UnixStream, g: &Guest) -> (Frontend, EventFd, EventFd) {
    let mut fe = Frontend::from_stream(sock, 1);
    fe.set_owner().expect("set_owner");
    let features = fe.get_features().expect("get_features");
    fe.get_protocol_features().expect("get_protocol_features");
    fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ)
        .expect("set_protocol_features");
    fe.set_features(features & ((1u64 << 32) | (1 << 30)))
        .expect("set_features");
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: g.ua(0),
        mmap_offset: 0,
        mmap_handle: g.memfd.as_raw_fd(),
    }])
    .expect("set_mem_table");
    let call = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    fe.set_vring_num(0, QSIZE).expect("set_vring_num");
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: g.ua(DESC),
            used_ring_addr: g.ua(USED),
            avail_ring_addr: g.ua(AVAIL),
            log_addr: None,
        },
    )
    .expect("set_vring_addr");
    fe.set_vring_base(0, 0).expect("set_vring_base");
    fe.set_vring_call(0, &call).expect("set_vring_call");
    fe.set_vring_kick(0, &kick).expect("set_vring_kick");
    fe.set_vring_enable(0, true).expect("set_vring_enable");
    (fe, kick, call)
}

fn capacity(fe: &mut Frontend) -> u64 {
    let (_, c) = fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .expect("get_config");
    u64::from_le_bytes(c[..8].try_into().expect("8 bytes"))
}

#[test]
fn a_launched_blockd_is_confined_serves_the_handed_socket_and_answers_the_monitor() {
    let dir = scratch("worker");
    let path = dir.join("disk.raw");
    File::create(&path)
        .and_then(|mut f| f.write_all(&vec![0x5a; IMAGE_SIZE as usize]))
        .expect("image");
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open image");

    let mut w = Worker::launch(1);
    let pid = w.child.pid();
    // Confined before the first frame: own namespaces (pid 1 inside), seccomp, no_new_privs, no
    // capabilities, and only stdio, the ipc socket and the report pipe open.
    let status = proc_status(pid);
    assert_eq!(field(&status, "Seccomp"), "2", "{status}");
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    assert_eq!(field(&status, "CapEff"), "0000000000000000");
    let nspid: Vec<&str> = field(&status, "NSpid").split_whitespace().collect();
    assert_eq!(nspid.last(), Some(&"1"), "{status}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let nproc = limits
        .lines()
        .find(|l| l.starts_with("Max processes"))
        .expect("nproc");
    assert!(nproc.split_whitespace().nth(2) == Some("37"), "{nproc}");
    for ns in ["mnt", "pid", "net", "user"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("ns");
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("ns");
        assert_ne!(theirs, ours, "{ns}");
    }

    // Stats before setup are refused; the setup brings the image and the vhost-user socket.
    assert!(matches!(
        w.call(BlockRequest::QueryStats, &[]),
        BlockReply::Error(_)
    ));
    let (fe_sock, be_sock) = UnixStream::pair().expect("socketpair");
    let reply = w.call(
        BlockRequest::Setup(setup("worker-serial", false)),
        &[image.as_fd(), be_sock.as_fd()],
    );
    assert_eq!(reply, BlockReply::Ready { size: IMAGE_SIZE });
    drop(be_sock);
    match w.call(BlockRequest::QuerySandbox, &[]) {
        BlockReply::Sandbox(r) => {
            assert!(r.entered, "{r:?}");
            assert_eq!(r.mode, "on");
            assert!(r.seccomp_instructions > 100, "{r:?}");
            assert!(r.landlock_abi >= 1, "{r:?}");
        }
        other => panic!("{other:?}"),
    }

    // The front end on the other end of the socketpair: write, read back, flush.
    let mut g = Guest::new();
    let (mut fe, kick, _call) = front_end(fe_sock, &g);
    assert_eq!(capacity(&mut fe), IMAGE_SIZE / 512);
    g.write(DATA, &[0xa5; 4096]);
    assert_eq!(g.request(&kick, &mut w.child, 1, 8, 4096), 0, "write");
    g.write(DATA, &[0; 4096]);
    assert_eq!(g.request(&kick, &mut w.child, 0, 8, 1024), 0, "read");
    assert_eq!(g.read(DATA, 1024), vec![0xa5; 1024]);
    assert_eq!(g.request(&kick, &mut w.child, 4, 0, 0), 0, "flush");
    // A read past the end fails (S_IOERR) before it reaches the image: not an image operation.
    assert_eq!(g.request(&kick, &mut w.child, 0, IMAGE_SIZE / 512, 512), 1);
    match w.call(BlockRequest::QueryStats, &[]) {
        BlockReply::Stats(s) => {
            assert_eq!((s.wr_operations, s.wr_bytes), (1, 4096), "{s:?}");
            assert_eq!((s.rd_operations, s.rd_bytes), (1, 1024), "{s:?}");
            assert_eq!(s.flush_operations, 1, "{s:?}");
            assert_eq!(s.wr_highest_offset, 8 * 512 + 4096);
            assert_eq!(s.failed_rd_operations, 0);
            assert!(s.wr_total_time_ns > 0 && s.idle_time_ns.is_some(), "{s:?}");
        }
        other => panic!("{other:?}"),
    }
    let on_disk = std::fs::read(&path).expect("read image");
    assert_eq!(&on_disk[4096..8192], &[0xa5; 4096][..]);

    // block_resize: the file grows, the config space says so, the new end is readable.
    assert_eq!(
        w.call(
            BlockRequest::Resize {
                size: 2 * IMAGE_SIZE
            },
            &[]
        ),
        BlockReply::Ok
    );
    assert_eq!(std::fs::metadata(&path).expect("md").len(), 2 * IMAGE_SIZE);
    assert_eq!(capacity(&mut fe), 2 * IMAGE_SIZE / 512);
    assert_eq!(
        g.request(&kick, &mut w.child, 0, 2 * IMAGE_SIZE / 512 - 1, 512),
        0
    );

    // I/O limits (generous here: enforcement is unit-tested with a simulated clock) are
    // accepted and requests still complete; all zero lifts them.
    let limits = ThrottleLimits {
        bps: 1 << 30,
        iops_wr: 100_000,
        ..ThrottleLimits::default()
    };
    assert_eq!(
        w.call(BlockRequest::SetThrottle(limits), &[]),
        BlockReply::Ok
    );
    assert_eq!(
        g.request(&kick, &mut w.child, 0, 8, 512),
        0,
        "throttled read"
    );
    assert_eq!(
        w.call(BlockRequest::SetThrottle(ThrottleLimits::default()), &[]),
        BlockReply::Ok
    );

    // The front end hangs up: blockd says so and exits 0, never having hit its filter.
    drop(fe);
    assert_eq!(
        w.next_event(Duration::from_secs(10)),
        Some(BlockEvent::FrontEndGone)
    );
    let st = w.wait();
    assert_eq!(st.code(), Some(0), "{st:?}");
    assert!(w.child.violation().is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_read_only_disk_refuses_resize_and_quit_ends_the_worker() {
    let dir = scratch("worker");
    let path = dir.join("disk.raw");
    File::create(&path)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("image");
    let image = File::open(&path).expect("open image");
    let mut w = Worker::launch(2);
    let (_fe_sock, be_sock) = UnixStream::pair().expect("socketpair");
    let mut s = setup("ro", true);
    s.num_queues = 2;
    // A raw file given as qcow2 is refused (and blockd can still be set up).
    let mut q = s.clone();
    q.format = ImageFormat::Qcow2;
    let image2: OwnedFd = image.try_clone().expect("dup").into();
    match w.call(BlockRequest::Setup(q), &[image2.as_fd(), be_sock.as_fd()]) {
        BlockReply::Error(e) => assert!(!e.is_empty()),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        w.call(BlockRequest::Setup(s), &[image.as_fd(), be_sock.as_fd()]),
        BlockReply::Ready { size: IMAGE_SIZE }
    );
    match w.call(
        BlockRequest::Resize {
            size: 2 * IMAGE_SIZE,
        },
        &[],
    ) {
        BlockReply::Error(e) => assert!(e.contains("read-only"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::metadata(&path).expect("md").len(), IMAGE_SIZE);
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", w.child.pid())).expect("limits");
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max processes") && l.split_whitespace().nth(2) == Some("38")),
        "{limits}"
    );
    assert_eq!(w.call(BlockRequest::Quit, &[]), BlockReply::Ok);
    let st = w.wait();
    assert_eq!(st.code(), Some(0), "{st:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn qemu_img(args: &[&str]) {
    let st = std::process::Command::new("qemu-img")
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("qemu-img is needed (Debian's qemu-utils): {e}"));
    assert!(st.success(), "qemu-img {args:?}");
}

#[test]
fn a_qcow2_image_is_served_on_the_backing_file_the_monitor_opened() {
    let dir = scratch("worker");
    let base = dir.join("base.raw");
    let mut bytes = vec![0u8; IMAGE_SIZE as usize];
    bytes[8192..12288].fill(0x3c);
    std::fs::write(&base, &bytes).expect("base");
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        base.to_str().expect("utf8"),
        top.to_str().expect("utf8"),
    ]);
    // The monitor's part: the image read-write, its backing file read-only.
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&top)
        .expect("top");
    let backing = File::open(&base).expect("base");
    let mut w = Worker::launch(1);
    let (fe_sock, be_sock) = UnixStream::pair().expect("socketpair");
    let mut s = setup("q", false);
    s.format = ImageFormat::Qcow2;
    s.backing_files = 1;
    assert_eq!(
        w.call(
            BlockRequest::Setup(s),
            &[image.as_fd(), be_sock.as_fd(), backing.as_fd()]
        ),
        BlockReply::Ready { size: IMAGE_SIZE }
    );
    drop(be_sock);
    let mut g = Guest::new();
    let (mut fe, kick, _call) = front_end(fe_sock, &g);
    assert_eq!(capacity(&mut fe), IMAGE_SIZE / 512);
    // Read through to the backing file; a write lands in the overlay only.
    assert_eq!(g.request(&kick, &mut w.child, 0, 16, 4096), 0, "read");
    assert_eq!(g.read(DATA, 4096), vec![0x3c; 4096]);
    g.write(DATA, &[0x77; 4096]);
    assert_eq!(g.request(&kick, &mut w.child, 1, 16, 4096), 0, "write");
    assert_eq!(g.request(&kick, &mut w.child, 4, 0, 0), 0, "flush");
    g.write(DATA, &[0; 4096]);
    assert_eq!(g.request(&kick, &mut w.child, 0, 16, 4096), 0, "read back");
    assert_eq!(g.read(DATA, 4096), vec![0x77; 4096]);
    assert_eq!(
        std::fs::read(&base).expect("base"),
        bytes,
        "backing file untouched"
    );
    // qcow2 is not resized yet.
    match w.call(
        BlockRequest::Resize {
            size: 2 * IMAGE_SIZE,
        },
        &[],
    ) {
        BlockReply::Error(e) => assert!(e.contains("raw only"), "{e}"),
        other => panic!("{other:?}"),
    }
    drop(fe);
    let st = w.wait();
    assert_eq!(st.code(), Some(0), "{st:?}");
    // qemu-img agrees with what the guest wrote.
    let out = std::process::Command::new("qemu-io")
        .args(["-c", "read -P 0x77 8192 4096", "-f", "qcow2"])
        .arg(&top)
        .output()
        .expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("read 4096/4096"), "{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tmpfs mounted on a directory (the test runs as root, as the suite does: without it this
/// fails, it does not skip), lazily unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, kib: u64) -> Tmpfs {
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount(8)");
        assert!(st.success(), "mounting a tmpfs on {dir:?} (needs root)");
        Tmpfs(dir.to_path_buf())
    }

    fn resize(&self, kib: u64) {
        let st = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={kib}k")])
            .arg(&self.0)
            .status()
            .expect("mount(8)");
        assert!(st.success(), "remounting {:?}", self.0);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes `path` until its file system is full (ENOSPC).
fn fill(path: &Path) {
    let mut f = File::create(path).expect("filler");
    let chunk = [0x11u8; 4096];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
}

/// A launched blockd serving the raw image at `path` with these policies, and its front end.
fn serve_with(
    path: &Path,
    rerror: ErrorPolicy,
    werror: ErrorPolicy,
) -> (Worker, Guest, Frontend, EventFd) {
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open image");
    let mut w = Worker::launch(1);
    let (fe_sock, be_sock) = UnixStream::pair().expect("socketpair");
    let mut s = setup("errors", false);
    s.rerror = rerror;
    s.werror = werror;
    assert_eq!(
        w.call(BlockRequest::Setup(s), &[image.as_fd(), be_sock.as_fd()]),
        BlockReply::Ready { size: IMAGE_SIZE }
    );
    drop(be_sock);
    let g = Guest::new();
    let (fe, kick, _call) = front_end(fe_sock, &g);
    (w, g, fe, kick)
}

fn enospc(action: ErrorAction) -> BlockEvent {
    BlockEvent::IoError {
        write: true,
        action,
        nospace: true,
        reason: "No space left on device".into(),
    }
}

const T_IN: u32 = 0;
const T_OUT: u32 = 1;

/// Real failing I/O: a raw image on a full tmpfs makes writes fail with ENOSPC on the host.
/// `report` fails the request (S_IOERR), `ignore` completes it, both with a BLOCK_IO_ERROR
/// event; `stop` holds it off the used ring (and takes nothing else from the queue) until
/// `Resume`, which retries it (still full: held again, another event), and once the tmpfs is
/// bigger completes it with its data on disk, then serves what was kicked meanwhile. Guest
/// errors (a read past the end) keep S_IOERR and send no event under any policy.
#[test]
fn host_io_errors_follow_werror_with_events_and_stop_holds_until_resume() {
    let dir = scratch("ioerr");
    let fs = Tmpfs::mount(&dir, 256);
    let path = dir.join("disk.raw");
    File::create(&path)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("sparse image");
    fill(&dir.join("filler"));
    let quiet = Duration::from_millis(300);

    for (werror, status, action) in [
        (ErrorPolicy::Report, 1, ErrorAction::Report),
        (ErrorPolicy::Ignore, 0, ErrorAction::Ignore),
    ] {
        let (mut w, mut g, fe, kick) = serve_with(&path, ErrorPolicy::Report, werror);
        g.write(DATA, &[0xa5; 4096]);
        assert_eq!(
            g.request(&kick, &mut w.child, T_OUT, 8, 4096),
            status,
            "{werror:?}"
        );
        assert_eq!(
            w.next_event(Duration::from_secs(5)),
            Some(enospc(action)),
            "{werror:?}"
        );
        assert_eq!(
            g.request(&kick, &mut w.child, T_IN, IMAGE_SIZE / 512, 512),
            1
        );
        assert_eq!(w.next_event(quiet), None, "a guest error is no I/O error");
        match w.call(BlockRequest::QueryStats, &[]) {
            BlockReply::Stats(s) => assert_eq!(s.failed_wr_operations, 1, "{s:?}"),
            other => panic!("{other:?}"),
        }
        drop(fe);
        assert_eq!(
            w.next_event(Duration::from_secs(5)),
            Some(BlockEvent::FrontEndGone)
        );
        assert_eq!(w.wait().code(), Some(0));
    }

    let (mut w, mut g, fe, kick) = serve_with(&path, ErrorPolicy::Report, ErrorPolicy::Stop);
    assert_eq!(
        g.request(&kick, &mut w.child, T_IN, IMAGE_SIZE / 512, 512),
        1
    );
    assert_eq!(w.next_event(quiet), None);
    // The write fails and is held: an event, nothing on the used ring, status untouched.
    g.write(DATA, &[0xa5; 4096]);
    g.submit(&kick, 0, T_OUT, 8, (HDR, DATA, STATUS), 4096);
    assert_eq!(
        w.next_event(Duration::from_secs(5)),
        Some(enospc(ErrorAction::Stop))
    );
    assert_eq!(
        g.next_used(&mut w.child, quiet),
        None,
        "held, not completed"
    );
    assert_eq!(g.read(STATUS, 1), vec![0xff]);
    // A read kicked while stopped is not taken.
    let (hdr2, data2, status2) = (HDR + 0x1000, DATA + 0x4000, STATUS + 0x1000);
    g.write(data2, &[0; 4096]);
    g.submit(&kick, 3, T_IN, 8, (hdr2, data2, status2), 4096);
    assert_eq!(g.next_used(&mut w.child, quiet), None, "stopped");
    // Resumed while the disk is still full: retried, held again, another event.
    assert_eq!(w.call(BlockRequest::Resume, &[]), BlockReply::Ok);
    assert_eq!(
        w.next_event(Duration::from_secs(5)),
        Some(enospc(ErrorAction::Stop))
    );
    assert_eq!(g.next_used(&mut w.child, quiet), None, "held again");
    // Space made: the held write completes, then the read kicked meanwhile sees its data.
    fs.resize(4096);
    assert_eq!(w.call(BlockRequest::Resume, &[]), BlockReply::Ok);
    let five = Duration::from_secs(5);
    assert_eq!(g.next_used(&mut w.child, five), Some((0, 1)));
    assert_eq!(g.read(STATUS, 1), vec![0]);
    assert_eq!(g.next_used(&mut w.child, five), Some((3, 4097)));
    assert_eq!(g.read(status2, 1), vec![0]);
    assert_eq!(g.read(data2, 4096), vec![0xa5; 4096]);
    assert_eq!(w.next_event(quiet), None);
    // The queue is served as before.
    assert_eq!(g.request(&kick, &mut w.child, 4, 0, 0), 0, "flush");
    let on_disk = std::fs::read(&path).expect("image");
    assert_eq!(&on_disk[4096..8192], &[0xa5; 4096][..]);
    drop(fe);
    assert_eq!(w.next_event(five), Some(BlockEvent::FrontEndGone));
    assert_eq!(w.wait().code(), Some(0));
    drop(fs);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same with several requests in flight at once (they reach the I/O threads): four writes
/// on a full tmpfs under `werror=stop` are all held, each with its event, none completed; after
/// the tmpfs grows, one `Resume` completes all four with their data, and the queue serves on.
#[test]
fn concurrent_failed_writes_are_all_held_and_all_complete_on_resume() {
    let dir = scratch("ioerr-qd");
    let fs = Tmpfs::mount(&dir, 256);
    let path = dir.join("disk.raw");
    File::create(&path)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("sparse image");
    fill(&dir.join("filler"));
    let (mut w, mut g, fe, kick) = serve_with(&path, ErrorPolicy::Report, ErrorPolicy::Stop);
    // Four writes made available before one kick, so blockd pops them together.
    let slot = |i: u64| (HDR + i * 0x100, DATA + i * 0x1000, STATUS + i * 0x10);
    for i in 0..4u64 {
        let (hdr, data, status) = slot(i);
        g.write(data, &[0x40 + i as u8; 4096]);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&(8 * (i + 1)).to_le_bytes());
        g.write(hdr, &h);
        let first = (3 * i) as u16;
        g.desc(first, hdr, 16, F_NEXT, first + 1);
        g.desc(first + 1, data, 4096, F_NEXT, first + 2);
        g.desc(first + 2, status, 1, F_WRITE, 0);
        g.write(status, &[0xff]);
        let s = AVAIL + 4 + u64::from(g.avail_idx % QSIZE) * 2;
        g.write(s, &first.to_le_bytes());
        g.avail_idx = g.avail_idx.wrapping_add(1);
    }
    fence(Ordering::SeqCst);
    g.write(AVAIL + 2, &g.avail_idx.to_le_bytes());
    fence(Ordering::SeqCst);
    kick.write(1).expect("kick");
    for _ in 0..4 {
        assert_eq!(
            w.next_event(Duration::from_secs(5)),
            Some(enospc(ErrorAction::Stop))
        );
    }
    let quiet = Duration::from_millis(300);
    assert_eq!(w.next_event(quiet), None);
    assert_eq!(g.next_used(&mut w.child, quiet), None, "all held");
    fs.resize(4096);
    assert_eq!(w.call(BlockRequest::Resume, &[]), BlockReply::Ok);
    let mut heads = Vec::new();
    for _ in 0..4 {
        let (head, len) = g
            .next_used(&mut w.child, Duration::from_secs(5))
            .expect("completed");
        assert_eq!(len, 1);
        heads.push(head);
    }
    heads.sort_unstable();
    assert_eq!(heads, vec![0, 3, 6, 9]);
    for i in 0..4u64 {
        assert_eq!(g.read(slot(i).2, 1), vec![0], "status {i}");
    }
    let on_disk = std::fs::read(&path).expect("image");
    for i in 0..4u64 {
        let at = (4096 * (i + 1)) as usize;
        assert_eq!(
            &on_disk[at..at + 4096],
            &[0x40 + i as u8; 4096][..],
            "write {i}"
        );
    }
    match w.call(BlockRequest::QueryStats, &[]) {
        BlockReply::Stats(s) => assert_eq!(s.wr_operations, 4, "{s:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(g.request(&kick, &mut w.child, 4, 0, 0), 0, "flush");
    drop(fe);
    assert_eq!(
        w.next_event(Duration::from_secs(5)),
        Some(BlockEvent::FrontEndGone)
    );
    assert_eq!(w.wait().code(), Some(0));
    drop(fs);
    let _ = std::fs::remove_dir_all(&dir);
}
