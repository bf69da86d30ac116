//! Hostile queues against the real `bulkhead-blockd` binary (sandboxed, `--sandbox on`): this test
//! is the vhost-user front end (rust-vmm's `vhost::vhost_user::Frontend` over the real socket),
//! shares a memfd as guest memory, writes the split rings itself and fills them with bad
//! requests: data outside guest memory, descriptor loops, an oversize indirect chain, unknown
//! request types, wrong directions and lengths, a runaway available index. Each must complete
//! with an error status or be returned with nothing written (dropped) — and afterwards blockd must
//! still be alive and serve good requests.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
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
const INDIRECT: u64 = 0x40000;
const IMAGE_SIZE: usize = 1 << 20;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

struct Blockd(Child);

impl Drop for Blockd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Guest memory ([`GuestMem`]) driving one queue's rings.
struct Guest {
    mem: GuestMem,
    /// Offset of this queue's rings (queue n: n * RING_STRIDE).
    ring: u64,
    avail_idx: u16,
    used_seen: u16,
}

/// Distance between two queues' rings in guest memory.
const RING_STRIDE: u64 = 0x4000;

impl std::ops::Deref for Guest {
    type Target = GuestMem;

    fn deref(&self) -> &GuestMem {
        &self.mem
    }
}

impl Guest {
    fn new() -> Guest {
        Guest {
            mem: GuestMem::new(c"hostile-guest"),
            ring: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// A view of the same memory driving queue `q`'s rings.
    fn queue(&self, q: u64) -> Guest {
        Guest {
            mem: self.mem.share(),
            ring: q * RING_STRIDE,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.desc_at(self.ring + DESC, i, addr, len, flags, next);
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.write(HDR, &h);
    }

    /// Puts `head` on the available ring and kicks.
    fn submit(&mut self, head: u16, kick: &EventFd) {
        self.write(STATUS, &[0xff]);
        let slot = self.ring + AVAIL + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        self.write(slot, &head.to_le_bytes());
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write(self.ring + AVAIL + 2, &self.avail_idx.to_le_bytes());
        fence(Ordering::SeqCst);
        kick.write(1).expect("kick");
    }

    /// Waits for the next used entry: (id, len).
    fn complete(&mut self, blockd: &mut Child) -> (u32, u32) {
        let start = Instant::now();
        while self.read_u16_volatile(self.ring + USED + 2) == self.used_seen {
            if let Ok(Some(st)) = blockd.try_wait() {
                panic!("bulkhead-blockd died: {st}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no completion in 10 s (blockd hung?)"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        fence(Ordering::SeqCst);
        let e = self.read(
            self.ring + USED + 4 + u64::from(self.used_seen % QSIZE) * 8,
            8,
        );
        self.used_seen = self.used_seen.wrapping_add(1);
        (
            u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
            u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
        )
    }

    fn status(&self) -> u8 {
        self.read(STATUS, 1)[0]
    }
}

fn image_bytes() -> Vec<u8> {
    (0..IMAGE_SIZE).map(|i| (i % 253) as u8).collect()
}

fn connect(sock: &Path, blockd: &mut Child) -> Frontend {
    let start = Instant::now();
    loop {
        if sock.exists() {
            if let Ok(f) = Frontend::connect(sock, 1) {
                return f;
            }
        }
        if let Ok(Some(st)) = blockd.try_wait() {
            panic!("bulkhead-blockd exited before accepting: {st}");
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running blockd with `queues` queues set up by the front end: its process, the front end,
/// one guest view and kick eventfd per queue, the scratch dir and image path.
struct Session {
    blockd: Blockd,
    fe: Frontend,
    queues: Vec<(Guest, EventFd)>,
    _calls: Vec<EventFd>,
    dir: PathBuf,
    image: PathBuf,
}

fn start(extra: &[&str], queues: u64) -> Session {
    let dir = scratch("hostile");
    let image = dir.join("disk.raw");
    File::create(&image)
        .and_then(|mut f| f.write_all(&image_bytes()))
        .expect("image");
    start_on(dir, image, extra, queues)
}

/// As [`start`], on an image already made in `dir`.
fn start_on(dir: PathBuf, image: PathBuf, extra: &[&str], queues: u64) -> Session {
    let sock = dir.join("blk.sock");
    let log = File::create(dir.join("blockd.log")).expect("log");
    let mut blockd = Blockd(
        Command::new(env!("CARGO_BIN_EXE_bulkhead-blockd"))
            .arg("--socket")
            .arg(&sock)
            .arg("--file")
            .arg(&image)
            .args(["--serial", "hostile", "--sandbox", "on"])
            .args(["--num-queues", &queues.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn bulkhead-blockd"),
    );
    let mut fe = connect(&sock, &mut blockd.0);
    let g = Guest::new();

    // Negotiation, as QEMU's vhost-user-blk does it.
    fe.set_owner().expect("set_owner");
    let features = fe.get_features().expect("get_features");
    let want = (1u64 << 32) // VIRTIO_F_VERSION_1
        | (1 << 28) // VIRTIO_RING_F_INDIRECT_DESC
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    assert_eq!(features & want, want, "features {features:#x}");
    let pf = fe.get_protocol_features().expect("get_protocol_features");
    assert!(pf.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
    fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ)
        .expect("set_protocol_features");
    assert_eq!(fe.get_queue_num().expect("get_queue_num"), queues);
    fe.set_features(want).expect("set_features");
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: g.ua(0),
        mmap_offset: 0,
        mmap_handle: g.memfd.as_raw_fd(),
    }])
    .expect("set_mem_table");
    let mut out = Vec::new();
    let mut calls = Vec::new();
    for q in 0..queues {
        let view = g.queue(q);
        let (call, kick) = (
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        );
        let i = q as usize;
        fe.set_vring_num(i, QSIZE).expect("set_vring_num");
        fe.set_vring_addr(
            i,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: view.ua(view.ring + DESC),
                used_ring_addr: view.ua(view.ring + USED),
                avail_ring_addr: view.ua(view.ring + AVAIL),
                log_addr: None,
            },
        )
        .expect("set_vring_addr");
        fe.set_vring_base(i, 0).expect("set_vring_base");
        fe.set_vring_call(i, &call).expect("set_vring_call");
        fe.set_vring_kick(i, &kick).expect("set_vring_kick");
        fe.set_vring_enable(i, true).expect("set_vring_enable");
        out.push((view, kick));
        calls.push(call);
    }
    Session {
        blockd,
        fe,
        queues: out,
        _calls: calls,
        dir,
        image,
    }
}

impl Session {
    /// Hangs up and checks blockd ends cleanly, never having hit its filter.
    fn finish(self) {
        let Session {
            mut blockd,
            fe,
            dir,
            ..
        } = self;
        drop(fe);
        let start = Instant::now();
        let status = loop {
            if let Some(st) = blockd.0.try_wait().expect("try_wait") {
                break st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "blockd did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = std::fs::read_to_string(dir.join("blockd.log")).unwrap_or_default();
        assert!(status.success(), "blockd: {status}: {log}");
        assert!(log.contains("sandbox entered"), "{log}");
        assert!(!log.contains("SECCOMP-VIOLATION"), "{log}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn hostile_queues_get_error_statuses_and_blockd_keeps_serving() {
    let mut session = start(&[], 1);
    let image = session.image.clone();
    let (mut g, kick) = session.queues.remove(0);
    let blockd = &mut session.blockd;
    let disk = image_bytes();
    let good_read = |g: &mut Guest, blockd: &mut Child, kick: &EventFd, sector: u64| {
        g.header(T_IN, sector);
        g.write(DATA, &[0u8; 1024]);
        g.desc(0, HDR, 16, F_NEXT, 1);
        g.desc(1, DATA, 1024, F_NEXT | F_WRITE, 2);
        g.desc(2, STATUS, 1, F_WRITE, 0);
        g.submit(0, kick);
        let (id, len) = g.complete(blockd);
        assert_eq!((id, len), (0, 1025), "good read completion");
        assert_eq!(g.status(), S_OK, "good read status");
        let off = sector as usize * 512;
        assert_eq!(g.read(DATA, 1024), disk[off..off + 1024], "good read data");
    };
    good_read(&mut g, &mut blockd.0, &kick, 3);

    // Each bad request: (what, set-up, allowed statuses; None = dropped).
    type Setup = fn(&Guest);
    let cases: Vec<(&str, Setup, &[Option<u8>])> = vec![
        (
            "data outside guest memory",
            |g| {
                g.header(T_IN, 0);
                g.desc(0, HDR, 16, F_NEXT, 1);
                g.desc(1, 0x4000_0000, 512, F_NEXT | F_WRITE, 2);
                g.desc(2, STATUS, 1, F_WRITE, 0);
            },
            &[Some(S_IOERR)],
        ),
        (
            "data straddling the end of guest memory",
            |g| {
                g.header(T_IN, 0);
                g.desc(0, HDR, 16, F_NEXT, 1);
                g.desc(1, MEM_SIZE as u64 - 256, 512, F_NEXT | F_WRITE, 2);
                g.desc(2, STATUS, 1, F_WRITE, 0);
            },
            &[Some(S_IOERR)],
        ),
        (
            "header outside guest memory",
            |g| {
                g.desc(0, 0x4000_0000, 16, F_NEXT, 1);
                g.desc(1, STATUS, 1, F_WRITE, 0);
            },
            &[Some(S_IOERR)],
        ),
        (
            "descriptor loop",
            |g| {
                g.header(T_IN, 0);
                g.desc(0, HDR, 16, F_NEXT, 1);
                g.desc(1, DATA, 512, F_NEXT | F_WRITE, 0);
            },
            &[Some(S_IOERR), None],
        ),
        (
            "next index beyond the queue",
            |g| {
                g.header(T_IN, 0);
                g.desc(0, HDR, 16, F_NEXT, 1);
                g.desc(1, DATA, 512, F_NEXT | F_WRITE, 200);
            },
            &[Some(S_IOERR), None],
        ),
        (
            "oversize indirect chain (1100 descriptors)",
            |g| {
                g.header(T_OUT, 0);
                g.desc_at(INDIRECT, 0, HDR, 16, F_NEXT, 1);
                for i in 1..1099u16 {
                    g.desc_at(INDIRECT, i, DATA, 512, F_NEXT, i + 1);
                }
                g.desc_at(INDIRECT, 1099, STATUS, 1, F_WRITE, 0);
                g.desc(0, INDIRECT, 1100 * 16, F_INDIRECT, 0);
            },
            &[Some(S_IOERR)],
        ),
        (
            "indirect table outside guest memory",
            |g| {
                g.desc(0, 0x4000_0000, 3 * 16, F_INDIRECT, 0);
            },
            &[None],
        ),
        (
            "unknown request type",
            |g| {
                g.header(0x7777, 0);
                g.desc(0, HDR, 16, F_NEXT, 1);
                g.desc(1, STATUS, 1, F_WRITE, 0);
            },
            &[Some(S_UNSUPP)],
        ),
        (
            "read into a device-readable buffer",
            |g| {
                g.header(T_IN, 0);
                g.desc(0, HDR, 16, F_NEXT, 1);
                g.desc(1, DATA, 512, F_NEXT, 2);
                g.desc(2, STATUS, 1, F_WRITE, 0);
            },
            &[Some(S_IOERR)],
        ),
        (
            "write from a device-writable buffer",
            |g| {
                g.header(T_OUT, 0);
                g.desc(0, HDR, 16, F_NEXT, 1);
                g.desc(1, DATA, 512, F_NEXT | F_WRITE, 2);
                g.desc(2, STATUS, 1, F_WRITE, 0);
            },
            &[Some(S_IOERR)],
        ),
        (
            "device-writable header",
            |g| {
                g.header(T_IN, 0);
                g.desc(0, HDR, 16, F_NEXT | F_WRITE, 1);
                g.desc(1, STATUS, 1, F_WRITE, 0);
            },
            &[Some(S_IOERR)],
        ),
        (
            "short header",
            |g| {
                g.header(T_IN, 0);
                g.desc(0, HDR, 8, F_NEXT, 1);
                g.desc(1, STATUS, 1, F_WRITE, 0);
            },
            &[Some(S_IOERR)],
        ),
        (
            "length not a sector multiple",
            |g| {
                g.header(T_IN, 0);
                g.desc(0, HDR, 16, F_NEXT, 1);
                g.desc(1, DATA, 100, F_NEXT | F_WRITE, 2);
                g.desc(2, STATUS, 1, F_WRITE, 0);
            },
            &[Some(S_IOERR)],
        ),
        (
            "read past the end of the disk",
            |g| {
                g.header(T_IN, (IMAGE_SIZE / 512) as u64 - 1);
                g.desc(0, HDR, 16, F_NEXT, 1);
                g.desc(1, DATA, 1024, F_NEXT | F_WRITE, 2);
                g.desc(2, STATUS, 1, F_WRITE, 0);
            },
            &[Some(S_IOERR)],
        ),
        (
            "sector overflow",
            |g| {
                g.header(T_OUT, u64::MAX / 256);
                g.desc(0, HDR, 16, F_NEXT, 1);
                g.desc(1, DATA, 512, F_NEXT, 2);
                g.desc(2, STATUS, 1, F_WRITE, 0);
            },
            &[Some(S_IOERR)],
        ),
        (
            "4 GiB of data",
            |g| {
                g.header(T_OUT, 0);
                g.desc(0, HDR, 16, F_NEXT, 1);
                g.desc(1, DATA, u32::MAX, F_NEXT, 2);
                g.desc(2, DATA, u32::MAX, F_NEXT, 3);
                g.desc(3, STATUS, 1, F_WRITE, 0);
            },
            &[Some(S_IOERR), None],
        ),
        (
            "device-readable status",
            |g| {
                g.header(T_FLUSH, 0);
                g.desc(0, HDR, 16, F_NEXT, 1);
                g.desc(1, STATUS, 1, 0, 0);
            },
            &[None],
        ),
        (
            "empty status",
            |g| {
                g.header(T_FLUSH, 0);
                g.desc(0, HDR, 16, F_NEXT, 1);
                g.desc(1, STATUS, 0, F_WRITE, 0);
            },
            &[None],
        ),
    ];
    for (what, setup, allowed) in cases {
        setup(&g);
        g.submit(0, &kick);
        let (id, len) = g.complete(&mut blockd.0);
        assert_eq!(id, 0, "{what}: used id");
        let st = g.status();
        let got = if st == 0xff { None } else { Some(st) };
        assert!(
            allowed.contains(&got),
            "{what}: status {got:?}, allowed {allowed:?} (used len {len})"
        );
        if allowed == [None] {
            assert_eq!(len, 0, "{what}: a dropped request writes nothing");
        } else {
            // A loop's "last" descriptor is wherever the walk stopped: the status may land
            // there instead, but no data is ever reported as transferred.
            assert!(len <= 1, "{what}: used len {len}");
        }
        // Nothing bad ever reached the image.
        assert_eq!(
            std::fs::read(&image).expect("image"),
            disk,
            "{what}: image changed"
        );
        // Still serving.
        good_read(&mut g, &mut blockd.0, &kick, 5);
    }

    // A runaway available index (more requests announced than the queue holds): nothing is
    // served from it, blockd does not spin or crash, and a sane index brings service back.
    let sane = g.avail_idx;
    g.write(AVAIL + 2, &sane.wrapping_add(1000).to_le_bytes());
    fence(Ordering::SeqCst);
    kick.write(1).expect("kick");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        g.read_u16_volatile(USED + 2),
        g.used_seen,
        "served a runaway index"
    );
    assert!(
        blockd.0.try_wait().expect("try_wait").is_none(),
        "blockd died"
    );
    g.write(AVAIL + 2, &sane.to_le_bytes());
    good_read(&mut g, &mut blockd.0, &kick, 7);

    // A good write and flush land in the file.
    g.header(T_OUT, 16);
    g.write(DATA, &[0xa5; 512]);
    g.desc(0, HDR, 16, F_NEXT, 1);
    g.desc(1, DATA, 512, F_NEXT, 2);
    g.desc(2, STATUS, 1, F_WRITE, 0);
    g.submit(0, &kick);
    assert_eq!(g.complete(&mut blockd.0), (0, 1));
    assert_eq!(g.status(), S_OK);
    g.header(T_FLUSH, 0);
    g.desc(0, HDR, 16, F_NEXT, 1);
    g.desc(1, STATUS, 1, F_WRITE, 0);
    g.submit(0, &kick);
    assert_eq!(g.complete(&mut blockd.0), (0, 1));
    assert_eq!(g.status(), S_OK);
    let after = std::fs::read(&image).expect("image");
    assert!(after[8192..8704].iter().all(|b| *b == 0xa5));
    assert_eq!(after[..8192], disk[..8192]);

    session.finish();
}

/// Sends one request on `q`: header (`kind`, `sector`), `data` descriptors, status; returns
/// (used len, status).
fn request(
    s: &mut Session,
    q: usize,
    kind: u32,
    sector: u64,
    data: &[(u64, u32, u16)],
) -> (u32, u8) {
    let (g, kick) = &mut s.queues[q];
    g.header(kind, sector);
    g.desc(0, HDR, 16, F_NEXT, 1);
    for (i, (addr, len, flags)) in data.iter().enumerate() {
        let i = i as u16 + 1;
        g.desc(i, *addr, *len, flags | F_NEXT, i + 1);
    }
    let last = data.len() as u16 + 1;
    g.desc(last, STATUS, 1, F_WRITE, 0);
    g.submit(0, kick);
    let (id, len) = g.complete(&mut s.blockd.0);
    assert_eq!(id, 0);
    (len, g.status())
}

fn segment(g: &Guest, sector: u64, sectors: u32, flags: u32) {
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&sectors.to_le_bytes());
    seg[12..].copy_from_slice(&flags.to_le_bytes());
    g.write(DATA, &seg);
}

#[test]
fn two_queues_get_id_discard_write_zeroes_and_read_only() {
    const T_GET_ID: u32 = 8;
    const T_DISCARD: u32 = 11;
    const T_WRITE_ZEROES: u32 = 13;
    let disk = image_bytes();

    for cache in ["writeback", "none"] {
        let mut s = start(&["--cache", cache], 2);
        // Both queues serve reads.
        for q in 0..2 {
            s.queues[q].0.write(DATA, &[0u8; 512]);
            let r = request(&mut s, q, T_IN, 9, &[(DATA, 512, F_WRITE)]);
            assert_eq!(r, (513, S_OK), "queue {q}");
            assert_eq!(s.queues[q].0.read(DATA, 512), disk[4608..5120], "queue {q}");
        }
        // GET_ID: the serial, NUL-padded to 20 bytes.
        let r = request(&mut s, 1, T_GET_ID, 0, &[(DATA, 20, F_WRITE)]);
        assert_eq!(r, (21, S_OK));
        assert_eq!(
            &s.queues[1].0.read(DATA, 20)[..],
            b"hostile\0\0\0\0\0\0\0\0\0\0\0\0\0"
        );
        // Write-zeroes (with and without unmap) and discard read back as zeroes.
        segment(&s.queues[0].0, 16, 8, 0);
        assert_eq!(
            request(&mut s, 0, T_WRITE_ZEROES, 0, &[(DATA, 16, 0)]).1,
            S_OK
        );
        segment(&s.queues[0].0, 32, 8, 1);
        assert_eq!(
            request(&mut s, 0, T_WRITE_ZEROES, 0, &[(DATA, 16, 0)]).1,
            S_OK
        );
        segment(&s.queues[1].0, 64, 8, 0);
        assert_eq!(request(&mut s, 1, T_DISCARD, 0, &[(DATA, 16, 0)]).1, S_OK);
        // An unmap flag on discard, two segments, a segment past the end: refused.
        segment(&s.queues[1].0, 64, 8, 1);
        assert_eq!(
            request(&mut s, 1, T_DISCARD, 0, &[(DATA, 16, 0)]).1,
            S_UNSUPP
        );
        assert_eq!(
            request(&mut s, 1, T_DISCARD, 0, &[(DATA, 32, 0)]).1,
            S_IOERR
        );
        segment(&s.queues[1].0, (IMAGE_SIZE / 512) as u64, 1, 0);
        assert_eq!(
            request(&mut s, 1, T_DISCARD, 0, &[(DATA, 16, 0)]).1,
            S_IOERR
        );
        assert_eq!(request(&mut s, 0, T_FLUSH, 0, &[]).1, S_OK);
        let after = std::fs::read(&s.image).expect("image");
        for (sector, what) in [
            (16, "write-zeroes"),
            (32, "write-zeroes+unmap"),
            (64, "discard"),
        ] {
            let o = sector * 512;
            assert!(
                after[o..o + 4096].iter().all(|b| *b == 0),
                "{cache}: {what}"
            );
            assert_eq!(
                after[o + 4096..o + 4608],
                disk[o + 4096..o + 4608],
                "{cache}: {what}"
            );
        }
        assert_eq!(after.len(), IMAGE_SIZE);
        s.finish();
    }

    // Read-only: reads and flushes work, every change is refused, the file is untouched.
    let mut s = start(&["--readonly"], 1);
    let r = request(&mut s, 0, T_IN, 0, &[(DATA, 512, F_WRITE)]);
    assert_eq!(r, (513, S_OK));
    assert_eq!(request(&mut s, 0, T_OUT, 0, &[(DATA, 512, 0)]).1, S_IOERR);
    segment(&s.queues[0].0, 0, 8, 0);
    assert_eq!(
        request(&mut s, 0, T_WRITE_ZEROES, 0, &[(DATA, 16, 0)]).1,
        S_IOERR
    );
    assert_eq!(
        request(&mut s, 0, T_DISCARD, 0, &[(DATA, 16, 0)]).1,
        S_IOERR
    );
    assert_eq!(request(&mut s, 0, T_FLUSH, 0, &[]).1, S_OK);
    assert_eq!(std::fs::read(&s.image).expect("image"), disk);
    s.finish();
}

#[test]
fn a_flushed_write_survives_kill_9_of_blockd() {
    for cache in ["writeback", "none"] {
        let mut s = start(&["--cache", cache], 1);
        s.queues[0].0.write(DATA, &[0x3c; 4096]);
        let r = request(&mut s, 0, T_OUT, 40, &[(DATA, 4096, 0)]);
        assert_eq!(r, (1, S_OK));
        assert_eq!(request(&mut s, 0, T_FLUSH, 0, &[]), (1, S_OK));
        // SAFETY: kill with the pid of our own child, still unreaped.
        let rc = unsafe { libc::kill(s.blockd.0.id() as libc::pid_t, libc::SIGKILL) };
        assert_eq!(rc, 0);
        let st = s.blockd.0.wait().expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGKILL)
        );
        let after = std::fs::read(&s.image).expect("image");
        let o = 40 * 512;
        assert!(after[o..o + 4096].iter().all(|b| *b == 0x3c), "{cache}");
        assert_eq!(after[..o], image_bytes()[..o], "{cache}");
        let _ = std::fs::remove_dir_all(&s.dir);
    }
}

/// Runs qemu-img in `dir`; fails loudly if it is missing (package qemu-utils) or fails.
fn qemu_img(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img could not be run ({e}): install qemu-utils"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A qcow2 image over a raw backing file, through the real sandboxed binary in both cache
/// modes: the chain is opened before the sandbox, reads come from the backing file, a partial
/// cluster write copies the rest of the cluster from it, write-zeroes and discard read back as
/// zeroes, a flush puts the metadata in the file (`qemu-img check` clean, `qemu-img compare`
/// equal to the expected raw contents), and blockd ends with no seccomp violation.
#[test]
fn qcow2_over_a_backing_file_through_the_sandboxed_binary() {
    const T_DISCARD: u32 = 11;
    const T_WRITE_ZEROES: u32 = 13;
    for cache in ["writeback", "none"] {
        let dir = scratch("hostile");
        std::fs::write(dir.join("base.raw"), image_bytes()).expect("base");
        qemu_img(
            &dir,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                "-b",
                "base.raw",
                "-F",
                "raw",
                "disk.qcow2",
            ],
        );
        let image = dir.join("disk.qcow2");
        let mut s = start_on(
            dir.clone(),
            image,
            &["--format", "qcow2", "--cache", cache],
            1,
        );
        let mut want = image_bytes();
        // Backing data.
        let r = request(&mut s, 0, T_IN, 9, &[(DATA, 512, F_WRITE)]);
        assert_eq!(r, (513, S_OK));
        assert_eq!(s.queues[0].0.read(DATA, 512), want[4608..5120]);
        // A partial cluster write, read back with the backing data around it.
        s.queues[0].0.write(DATA, &[0xc3; 512]);
        assert_eq!(request(&mut s, 0, T_OUT, 17, &[(DATA, 512, 0)]), (1, S_OK));
        want[17 * 512..18 * 512].fill(0xc3);
        let r = request(&mut s, 0, T_IN, 16, &[(DATA, 4096, F_WRITE)]);
        assert_eq!(r, (4097, S_OK));
        assert_eq!(s.queues[0].0.read(DATA, 4096), want[8192..12288]);
        // Write-zeroes of a whole cluster (zero flag) and a part of one; discard.
        segment(&s.queues[0].0, 64, 8, 0);
        assert_eq!(
            request(&mut s, 0, T_WRITE_ZEROES, 0, &[(DATA, 16, 0)]).1,
            S_OK
        );
        want[64 * 512..72 * 512].fill(0);
        segment(&s.queues[0].0, 81, 2, 1);
        assert_eq!(
            request(&mut s, 0, T_WRITE_ZEROES, 0, &[(DATA, 16, 0)]).1,
            S_OK
        );
        want[81 * 512..83 * 512].fill(0);
        segment(&s.queues[0].0, 128, 16, 0);
        assert_eq!(request(&mut s, 0, T_DISCARD, 0, &[(DATA, 16, 0)]).1, S_OK);
        want[128 * 512..144 * 512].fill(0);
        let r = request(&mut s, 0, T_IN, 64, &[(DATA, 4096, F_WRITE)]);
        assert_eq!(r, (4097, S_OK));
        assert!(s.queues[0].0.read(DATA, 4096).iter().all(|b| *b == 0));
        assert_eq!(request(&mut s, 0, T_FLUSH, 0, &[]), (1, S_OK));

        let check = qemu_img(&dir, &["check", "--output=json", "disk.qcow2"]);
        assert!(check.contains("\"check-errors\": 0"), "{cache}: {check}");
        assert!(!check.contains("\"leaks\""), "{cache}: {check}");
        std::fs::write(dir.join("want.raw"), &want).expect("want");
        qemu_img(
            &dir,
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "disk.qcow2",
                "want.raw",
            ],
        );
        assert_eq!(
            std::fs::read(dir.join("base.raw")).expect("base"),
            image_bytes(),
            "the backing file is only read"
        );
        s.finish();
    }
}

/// A qcow2 image with a damaged L1 table or header: blockd refuses it before binding its
/// socket, exits 1 and says what is wrong.
#[test]
fn corrupt_qcow2_images_are_refused_with_a_clear_error() {
    let dir = scratch("hostile");
    qemu_img(&dir, &["create", "-f", "qcow2", "disk.qcow2", "1M"]);
    let image = dir.join("disk.qcow2");
    let pristine = std::fs::read(&image).expect("image");
    let l1 = u64::from_be_bytes(pristine[40..48].try_into().expect("8 bytes"));
    let rt = u64::from_be_bytes(pristine[48..56].try_into().expect("8 bytes"));
    for (what, at, bytes, want) in [
        // L1 entry 0 pointing at the refcount table.
        (
            "L1 entry onto the refcount table",
            l1,
            ((1u64 << 63) | rt).to_be_bytes().to_vec(),
            "L2 table of L1 entry 0",
        ),
        // L1 size of 2^30 entries.
        (
            "huge L1",
            36,
            vec![0x40, 0, 0, 0],
            "L1 table of 1073741824 entries",
        ),
        // Cluster bits 40.
        ("cluster bits", 20, vec![0, 0, 0, 40], "cluster_bits 40"),
        // Not qcow2 at all.
        ("magic", 0, b"RAW!".to_vec(), "no qcow2 magic"),
    ] {
        let mut bad = pristine.clone();
        bad[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
        std::fs::write(&image, &bad).expect("damage");
        let sock = dir.join("never.sock");
        let log = dir.join("blockd.log");
        let mut child = Blockd(
            Command::new(env!("CARGO_BIN_EXE_bulkhead-blockd"))
                .arg("--socket")
                .arg(&sock)
                .arg("--file")
                .arg(&image)
                .args(["--format", "qcow2", "--sandbox", "on"])
                .stdin(Stdio::null())
                .stderr(File::create(&log).expect("log"))
                .spawn()
                .expect("run bulkhead-blockd"),
        );
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.0.try_wait().expect("try_wait") {
                break st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{what}: blockd accepted the image and is waiting for a front end"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(status.code(), Some(1), "{what}: {err}");
        assert!(err.contains(want), "{what}: {err:?} lacks {want:?}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert!(!sock.exists(), "{what}: socket bound");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
