//! The guest side of netd's integration tests: a memfd as guest memory, an rx and a tx split
//! ring, and the vhost-user-net front end on a connection to netd.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Entries per ring.
pub const QSIZE: u16 = 64;
/// Guest memory.
pub const MEM_SIZE: usize = 4 << 20;
/// Where the front end says guest memory is mapped (any address: netd maps the memfd itself).
pub const VA_BASE: u64 = 0x7000_0000_0000;
/// The vnet header with `num_buffers` (mergeable rx buffers or `VERSION_1`).
pub const HDR: usize = 12;
/// `VRING_DESC_F_NEXT`.
pub const F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub const F_WRITE: u16 = 2;
/// The rx ring's index.
pub const RX: usize = 0;
/// The tx ring's index.
pub const TX: usize = 1;
/// Guest address of the tests' transmit buffers.
pub const TX_BUF: u64 = 0x10_0000;
/// Guest address of the tests' receive buffers (4 KiB each).
pub const RX_BUF: u64 = 0x20_0000;

/// Guest address of ring `q`: descriptors, then avail (+0x1000), then used (+0x2000).
pub fn ring_base(q: usize) -> u64 {
    0x1000 + q as u64 * 0x3000
}

/// The guest side: memory, two rings, and the vhost-user connection.
pub struct Guest {
    pub fe: Frontend,
    /// The features netd offered.
    pub offered: u64,
    mem: GuestMemoryMmap,
    _memfd: File,
    kick: [EventFd; 2],
    _call: [EventFd; 2],
    avail: [u16; 2],
    next_desc: [u16; 2],
}

impl Guest {
    /// Negotiates on `fe` as a vhost-user-net front end, acking every offered feature but those
    /// in `without`, shares fresh guest memory and sets up both rings.
    pub fn negotiate(mut fe: Frontend, without: u64) -> Guest {
        // SAFETY: memfd_create with a literal name; result checked.
        let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd owned by nobody else.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(MEM_SIZE as u64).expect("memfd size");
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(memfd.try_clone().expect("dup"), 0)),
        )])
        .expect("guest memory");
        fe.set_owner().expect("set_owner");
        let offered = fe.get_features().expect("get_features");
        fe.set_features(offered & !without).expect("set_features");
        let pf = fe.get_protocol_features().expect("protocol features");
        fe.set_protocol_features(
            pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK),
        )
        .expect("set protocol features");
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: VA_BASE,
            mmap_offset: 0,
            mmap_handle: memfd.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).expect("set_mem_table");
        let kick = [EventFd::new(0).expect("efd"), EventFd::new(0).expect("efd")];
        let call = [EventFd::new(0).expect("efd"), EventFd::new(0).expect("efd")];
        for q in [RX, TX] {
            let b = ring_base(q);
            fe.set_vring_num(q, QSIZE).expect("num");
            let cfg = VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: VA_BASE + b,
                avail_ring_addr: VA_BASE + b + 0x1000,
                used_ring_addr: VA_BASE + b + 0x2000,
                log_addr: None,
            };
            fe.set_vring_addr(q, &cfg).expect("addr");
            fe.set_vring_base(q, 0).expect("base");
            fe.set_vring_call(q, &call[q]).expect("call");
            fe.set_vring_kick(q, &kick[q]).expect("kick");
            fe.set_vring_enable(q, true).expect("enable");
        }
        Guest {
            fe,
            offered,
            mem,
            _memfd: memfd,
            kick,
            _call: call,
            avail: [0; 2],
            next_desc: [0; 2],
        }
    }

    /// The config space's MAC and status.
    pub fn config(&mut self) -> ([u8; 6], u16) {
        let (_, cfg) = self
            .fe
            .get_config(0, 10, VhostUserConfigFlags::WRITABLE, &[0u8; 10])
            .expect("get_config");
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&cfg[..6]);
        (mac, u16::from_le_bytes([cfg[6], cfg[7]]))
    }

    /// Writes a chain of descriptors (addr, len, flags without NEXT) and makes it available.
    pub fn post(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let b = ring_base(q);
        let first = self.next_desc[q];
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (first + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let next = (idx + 1) % QSIZE;
            let d = b + u64::from(idx) * 16;
            let fl = flags | if last { 0 } else { F_NEXT };
            self.write(d, &addr.to_le_bytes());
            self.write(d + 8, &len.to_le_bytes());
            self.write(d + 12, &fl.to_le_bytes());
            self.write(d + 14, &next.to_le_bytes());
        }
        self.next_desc[q] = (first + descs.len() as u16) % QSIZE;
        self.post_head(q, first);
        first
    }

    /// Puts `head` on the avail ring as is (it may be garbage).
    pub fn post_head(&mut self, q: usize, head: u16) {
        let a = ring_base(q) + 0x1000;
        let slot = u64::from(self.avail[q] % QSIZE);
        self.write(a + 4 + 2 * slot, &head.to_le_bytes());
        self.avail[q] = self.avail[q].wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.write(a + 2, &self.avail[q].to_le_bytes());
    }

    /// Moves queue `q`'s avail index on by `by` without posting anything (a hostile driver).
    pub fn jump_avail(&mut self, q: usize, by: u16) {
        self.avail[q] = self.avail[q].wrapping_add(by);
        self.write(ring_base(q) + 0x1002, &self.avail[q].to_le_bytes());
    }

    pub fn kick(&self, q: usize) {
        self.kick[q].write(1).expect("kick");
    }

    pub fn write(&self, addr: u64, b: &[u8]) {
        self.mem
            .write_slice(b, GuestAddress(addr))
            .expect("guest write");
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("guest read");
        v
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        let b = self.read(ring_base(q) + 0x2002, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// The used element `n` (id, len).
    pub fn used(&self, q: usize, n: u16) -> (u32, u32) {
        let e = self.read(ring_base(q) + 0x2004 + 8 * u64::from(n % QSIZE), 8);
        (
            u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
            u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
        )
    }

    /// Waits until queue `q`'s used index reaches `at_least`, panicking after `timeout`.
    pub fn wait_used(&self, q: usize, at_least: u16, timeout: Duration) {
        let end = Instant::now() + timeout;
        while self.used_idx(q).wrapping_sub(at_least) > 0x8000 {
            assert!(
                Instant::now() < end,
                "queue {q}: used idx {} never reached {at_least}",
                self.used_idx(q)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends `frame` with a zero vnet header: header and frame in two descriptors (a gather
    /// list) written at `at`.
    pub fn transmit(&mut self, at: u64, frame: &[u8]) {
        let mut full = vec![0u8; HDR];
        full.extend_from_slice(frame);
        self.write(at, &full);
        self.post(
            TX,
            &[
                (at, HDR as u32, 0),
                (at + HDR as u64, frame.len() as u32, 0),
            ],
        );
        self.kick(TX);
    }

    /// The frame (without its vnet header) in used rx element `n`, with `num_buffers`; rx
    /// buffers are 4 KiB each from [`RX_BUF`], descriptor `i` at `RX_BUF + i * 4096`.
    pub fn received(&self, n: u16) -> (u16, Vec<u8>) {
        let (id, len) = self.used(RX, n);
        let got = self.read(RX_BUF + u64::from(id) * 0x1000, len as usize);
        assert!(got.len() > HDR, "rx element {n}: {len} bytes");
        (u16::from_le_bytes([got[10], got[11]]), got[HDR..].to_vec())
    }
}
