//! The virtio-pci transport against a real vhost-user back end: blockd's `BlockBackend` served
//! by `vhost-user-backend` on one end of a socketpair, the transport's vhost-user front end on
//! the other, a real KVM VM (irqchip, GSI routing, irqfds, ioeventfds) and guest memory in a
//! memfd. The test plays the guest's virtio driver through the device's PCI configuration and
//! BAR registers, exactly as a vCPU's MMIO exits would reach them, and checks what comes back
//! through the rings in guest memory.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_blockd::backend::BlockBackend;
use bulkhead_blockd::format::{DiskImage, Raw};
use bulkhead_ipc::messages::{VirtioDevice, VirtioKind};
use bulkhead_vcpu::memory::{self, GuestMem};
use bulkhead_vcpu::pci::msix::IrqRouter;
use bulkhead_vcpu::pci::{PciDevice, PciRoot};
use bulkhead_vcpu::virtio::pci::VirtioPciDevice;
use kvm_ioctls::Kvm;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

const SLOT: u8 = 3;
const MEM: u64 = 16 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x10_0000;
const AVAIL: u64 = 0x11_0000;
const USED: u64 = 0x12_0000;
const HDR: u64 = 0x20_0000;
const DATA: u64 = 0x20_1000;
const STATUS: u64 = 0x20_3000;
const IMAGE_SECTORS: u64 = 2048;

// BAR0 offsets of the transport (virtio capabilities say the same; checked below).
const COMMON: u64 = 0;
const NOTIFY: u64 = 0x3000;
const DEVCFG: u64 = 0x2000;

struct Rig {
    dev: VirtioPciDevice,
    mem: GuestMem,
    image: Vec<u8>,
    _daemon: std::thread::JoinHandle<()>,
    _vm: Arc<kvm_ioctls::VmFd>,
    avail_idx: u16,
}

fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name and no flags that affect memory safety.
    let fd = unsafe { libc::memfd_create(c"bulkhead-test-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just created and is owned by nobody else.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(size).expect("size memfd");
    f
}

fn rig() -> Rig {
    bulkhead_worker::logger::init("bulkhead-vcpu");
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let mem = memory::map_memfd(&memfd(MEM), MEM).expect("guest memory");

    // The disk: 1 MiB of a recognisable pattern.
    let mut image = Vec::with_capacity((IMAGE_SECTORS * 512) as usize);
    for i in 0..IMAGE_SECTORS * 512 {
        image.push((i * 7 % 251) as u8);
    }
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!(
        "bulkhead-virtio-blk-{}-{n}.img",
        std::process::id()
    ));
    File::create(&path)
        .and_then(|mut f| f.write_all(&image))
        .expect("image");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open image");
    let _ = std::fs::remove_file(&path);
    let disk: Arc<dyn DiskImage> = Arc::new(Raw::new(file, false, false).expect("raw"));
    let backend = Arc::new(
        BlockBackend::new(
            disk,
            b"TEST-SERIAL".to_vec(),
            1,
            512,
            bulkhead_blockd::errors::Policies::default(),
        )
        .expect("back end"),
    );

    let (front, back) = UnixStream::pair().expect("socketpair");
    let daemon = std::thread::spawn(move || {
        let mut d = VhostUserDaemon::new(
            "test-blockd".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .expect("daemon");
        backend
            .attach(&d.get_epoll_handlers())
            .expect("queue threads' events");
        d.start_with_stream(back).expect("serve");
        let _ = d.wait();
    });

    let router = Arc::new(IrqRouter::new(vm.clone()));
    let desc = VirtioDevice {
        id: "disk0".into(),
        kind: VirtioKind::Block,
        slot: SLOT,
        num_queues: 1,
        queue_size: 256,
    };
    let dev = VirtioPciDevice::new(&desc, OwnedFd::from(front), mem.clone(), router)
        .expect("virtio device");
    Rig {
        dev,
        mem,
        image,
        _daemon: daemon,
        _vm: vm,
        avail_idx: 0,
    }
}

impl Rig {
    fn cfg32(&mut self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        self.dev.config_read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn cfg8(&mut self, off: usize) -> u8 {
        let mut b = [0u8; 1];
        self.dev.config_read(off, &mut b);
        b[0]
    }
    fn rd(&mut self, off: u64, len: usize) -> u64 {
        let mut b = vec![0u8; len];
        self.dev.bar_read(off, &mut b);
        b.iter().rev().fold(0, |a, x| (a << 8) | u64::from(*x))
    }
    fn wr(&mut self, off: u64, len: usize, v: u64) {
        let b: Vec<u8> = (0..len).map(|i| (v >> (8 * i)) as u8).collect();
        self.dev.bar_write(off, &b);
    }

    /// The virtio capabilities by cfg_type: (bar offset, length); and the MSI-X capability.
    fn caps(&mut self) -> (Vec<(u8, u32, u32)>, usize) {
        let mut out = Vec::new();
        let mut msix = 0;
        let mut p = usize::from(self.cfg8(0x34));
        while p != 0 {
            match self.cfg8(p) {
                0x09 => out.push((self.cfg8(p + 3), self.cfg32(p + 8), self.cfg32(p + 12))),
                0x11 => msix = p,
                _ => {}
            }
            p = usize::from(self.cfg8(p + 1));
        }
        (out, msix)
    }

    /// The driver's bring-up, up to and including DRIVER_OK.
    fn bring_up(&mut self, features: u64) -> u8 {
        self.wr(COMMON + 0x14, 1, 0);
        self.wr(COMMON + 0x14, 1, 1 | 2);
        self.wr(COMMON + 0x08, 4, 0);
        self.wr(COMMON + 0x0c, 4, features & 0xffff_ffff);
        self.wr(COMMON + 0x08, 4, 1);
        self.wr(COMMON + 0x0c, 4, features >> 32);
        self.wr(COMMON + 0x14, 1, 1 | 2 | 8);
        assert_eq!(self.rd(COMMON + 0x14, 1) & 8, 8, "FEATURES_OK refused");
        self.wr(COMMON + 0x10, 2, 0); // config vector 0
        self.wr(COMMON + 0x16, 2, 0); // queue 0
        assert_eq!(self.rd(COMMON + 0x18, 2), 256);
        self.wr(COMMON + 0x18, 2, u64::from(QSIZE));
        self.wr(COMMON + 0x1a, 2, 1); // queue vector 1
        assert_eq!(self.rd(COMMON + 0x1a, 2), 1);
        self.wr(COMMON + 0x20, 4, DESC);
        self.wr(COMMON + 0x24, 4, 0);
        self.wr(COMMON + 0x28, 4, AVAIL);
        self.wr(COMMON + 0x2c, 4, 0);
        self.wr(COMMON + 0x30, 4, USED);
        self.wr(COMMON + 0x34, 4, 0);
        self.wr(COMMON + 0x1c, 2, 1);
        // Fresh rings, as a driver allocates them, before DRIVER_OK.
        self.avail_idx = 0;
        self.mem
            .write_obj(0u16, GuestAddress(USED + 2))
            .expect("used idx");
        self.mem
            .write_obj(0u16, GuestAddress(AVAIL + 2))
            .expect("avail idx");
        self.wr(COMMON + 0x14, 1, 1 | 2 | 8 | 4);
        self.rd(COMMON + 0x14, 1) as u8
    }

    /// Puts one request (header, data, status) on queue 0, notifies, and waits for it.
    fn request(&mut self, kind: u32, sector: u64, data_len: u32, device_writes_data: bool) -> u8 {
        let mem = self.mem.clone();
        let m = &mem;
        m.write_obj(kind, GuestAddress(HDR)).expect("hdr");
        m.write_obj(0u32, GuestAddress(HDR + 4)).expect("hdr");
        m.write_obj(sector, GuestAddress(HDR + 8)).expect("hdr");
        m.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let d = DESC + 16 * i;
            m.write_obj(addr, GuestAddress(d)).expect("desc");
            m.write_obj(len, GuestAddress(d + 8)).expect("desc");
            m.write_obj(flags, GuestAddress(d + 12)).expect("desc");
            m.write_obj(next, GuestAddress(d + 14)).expect("desc");
        };
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        if data_len > 0 {
            desc(0, HDR, 16, NEXT, 1);
            desc(
                1,
                DATA,
                data_len,
                NEXT | if device_writes_data { WRITE } else { 0 },
                2,
            );
            desc(2, STATUS, 1, WRITE, 0);
        } else {
            desc(0, HDR, 16, NEXT, 2);
            desc(2, STATUS, 1, WRITE, 0);
        }
        let slot = u64::from(self.avail_idx % QSIZE);
        m.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
            .expect("avail");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        m.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .expect("avail idx");
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.wr(NOTIFY, 2, 0);
        let start = Instant::now();
        loop {
            let used: u16 = m.read_obj(GuestAddress(USED + 2)).expect("used idx");
            if used == self.avail_idx {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "request not completed in 10 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        m.read_obj(GuestAddress(STATUS)).expect("status")
    }
}

const VERSION_1: u64 = 1 << 32;
const BLK_F_FLUSH: u64 = 1 << 9;

#[test]
fn a_driver_reads_writes_and_flushes_through_the_back_end() {
    let mut r = rig();
    // Identity and layout a Linux virtio_pci driver relies on.
    assert_eq!(r.cfg32(0), 0x1042_1af4);
    assert_eq!(r.cfg8(8), 1, "modern devices have revision 1");
    let (caps, msix) = r.caps();
    let find = |t: u8| caps.iter().find(|c| c.0 == t).map(|c| (c.1, c.2));
    assert_eq!(find(1).map(|c| c.0), Some(COMMON as u32));
    assert_eq!(find(2).map(|c| c.0), Some(NOTIFY as u32));
    assert_eq!(find(4).map(|c| c.0), Some(DEVCFG as u32));
    assert!(find(3).is_some());
    assert_ne!(msix, 0, "no MSI-X capability");
    // BAR0 sits at the slot's window; memory decoding on, MSI-X on with vectors programmed.
    let bar = u64::from(r.cfg32(0x10) & !0xf) | (u64::from(r.cfg32(0x14)) << 32);
    assert_eq!(bar, PciRoot::slot_bar_base(SLOT));
    r.dev.config_write(4, &[0x06, 0]);
    assert_eq!(r.dev.bar0().map(|b| b.0), Some(bar));
    for v in 0..2u64 {
        r.wr(0x4000 + 16 * v, 4, 0xfee0_0000);
        r.wr(0x4000 + 16 * v + 4, 4, 0);
        r.wr(0x4000 + 16 * v + 8, 4, 0x40 + v);
        r.wr(0x4000 + 16 * v + 12, 4, 0);
    }
    r.dev.config_write(msix + 3, &[0x80]);

    let offered = r.rd(COMMON + 4, 4); // select 0
    r.wr(COMMON, 4, 1);
    let offered = offered | (r.rd(COMMON + 4, 4) << 32);
    assert_ne!(offered & VERSION_1, 0);
    assert_eq!(
        offered & (1 << 30),
        0,
        "vhost-user's protocol bit must not reach the guest"
    );
    // Capacity from the back end's configuration space.
    assert_eq!(r.rd(DEVCFG, 8), IMAGE_SECTORS);

    let status = r.bring_up(VERSION_1 | BLK_F_FLUSH);
    assert_eq!(status & 0x40, 0, "DEVICE_NEEDS_RESET after DRIVER_OK");

    // Read sector 3.
    assert_eq!(r.request(0, 3, 512, true), 0);
    let mut got = vec![0u8; 512];
    r.mem
        .read_slice(&mut got, GuestAddress(DATA))
        .expect("data");
    assert_eq!(&got[..], &r.image[3 * 512..4 * 512]);

    // Write sector 5, flush, read it back.
    let pattern = vec![0x5au8; 512];
    r.mem
        .write_slice(&pattern, GuestAddress(DATA))
        .expect("data");
    assert_eq!(r.request(1, 5, 512, false), 0);
    assert_eq!(r.request(4, 0, 0, false), 0, "flush");
    r.mem
        .write_slice(&[0u8; 512], GuestAddress(DATA))
        .expect("data");
    assert_eq!(r.request(0, 5, 512, true), 0);
    r.mem
        .read_slice(&mut got, GuestAddress(DATA))
        .expect("data");
    assert_eq!(got, pattern);

    // A read past the end gets an I/O error status, not a crash.
    assert_eq!(r.request(0, IMAGE_SECTORS, 512, true), 1);

    // The driver resets the device and brings it up again (as after a guest reboot).
    r.wr(COMMON + 0x14, 1, 0);
    assert_eq!(r.rd(COMMON + 0x14, 1), 0);
    let status = r.bring_up(VERSION_1);
    assert_eq!(status & 0x40, 0);
    assert_eq!(r.request(0, 5, 512, true), 0);
    r.mem
        .read_slice(&mut got, GuestAddress(DATA))
        .expect("data");
    assert_eq!(
        got, pattern,
        "data written before the reset is there after it"
    );

    // Machine reset: everything back to power-on.
    r.dev.reset();
    assert_eq!(r.rd(COMMON + 0x14, 1), 0);
    assert_eq!(r.dev.bar0(), None, "decoding is off after reset");
}

#[test]
fn nonsense_from_the_driver_is_refused_not_fatal() {
    let mut r = rig();
    r.dev.config_write(4, &[0x06, 0]);
    // Features the device never offered: FEATURES_OK does not stick.
    r.wr(COMMON + 0x14, 1, 1 | 2);
    r.wr(COMMON + 0x08, 4, 1);
    r.wr(COMMON + 0x0c, 4, 1 | (1 << 20));
    r.wr(COMMON + 0x14, 1, 1 | 2 | 8);
    assert_eq!(r.rd(COMMON + 0x14, 1) & 8, 0);
    // Bad queue sizes keep the old one; a vector the device lacks reads back as NO_VECTOR.
    r.wr(COMMON + 0x16, 2, 0);
    r.wr(COMMON + 0x18, 2, 100);
    assert_eq!(r.rd(COMMON + 0x18, 2), 256);
    r.wr(COMMON + 0x18, 2, 65535);
    assert_eq!(r.rd(COMMON + 0x18, 2), 256);
    r.wr(COMMON + 0x1a, 2, 77);
    assert_eq!(r.rd(COMMON + 0x1a, 2), 0xffff);
    // A queue that does not exist reads as zero size.
    r.wr(COMMON + 0x16, 2, 9);
    assert_eq!(r.rd(COMMON + 0x18, 2), 0);
    // Odd widths and offsets anywhere in the BAR are ignored.
    for off in [
        1u64, 3, 0x13, 0x1001, 0x2fff, 0x3ffe, 0x4003, 0x5000, 0x7fff, 0x9000,
    ] {
        r.wr(off, 1, 0xff);
        r.wr(off, 8, u64::MAX);
        let _ = r.rd(off, 2);
    }
    // Rings outside guest RAM: DRIVER_OK ends in DEVICE_NEEDS_RESET, the back end untouched.
    r.wr(COMMON + 0x14, 1, 0);
    r.wr(COMMON + 0x14, 1, 1 | 2);
    r.wr(COMMON + 0x08, 4, 1);
    r.wr(COMMON + 0x0c, 4, 1);
    r.wr(COMMON + 0x14, 1, 1 | 2 | 8);
    r.wr(COMMON + 0x16, 2, 0);
    r.wr(COMMON + 0x20, 4, 0xffff_f000);
    r.wr(COMMON + 0x24, 4, 0xffff);
    r.wr(COMMON + 0x1c, 2, 1);
    r.wr(COMMON + 0x14, 1, 1 | 2 | 8 | 4);
    assert_ne!(
        r.rd(COMMON + 0x14, 1) & 0x40,
        0,
        "expected DEVICE_NEEDS_RESET"
    );
}

fn device_on(sock: UnixStream) -> Result<VirtioPciDevice, String> {
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let mem = memory::map_memfd(&memfd(MEM), MEM).expect("guest memory");
    let desc = VirtioDevice {
        id: "bad".into(),
        kind: VirtioKind::Block,
        slot: 1,
        num_queues: 1,
        queue_size: 256,
    };
    VirtioPciDevice::new(
        &desc,
        OwnedFd::from(sock),
        mem,
        Arc::new(IrqRouter::new(vm)),
    )
    .map_err(|e| e.to_string())
}

/// A back end is not trusted: one that hangs up, one that never answers and one that answers
/// nonsense each fail the device with an error, in bounded time, and never hang the caller.
#[test]
fn misbehaving_back_ends_fail_the_device_not_the_worker() {
    // Hangs up at once.
    let (front, back) = UnixStream::pair().expect("socketpair");
    drop(back);
    let e = device_on(front).err().expect("a closed back end must fail");
    println!("closed: {e}");

    // Never answers: the reply timeout ends the wait.
    let (front, back) = UnixStream::pair().expect("socketpair");
    let start = Instant::now();
    let e = device_on(front).err().expect("a silent back end must fail");
    println!("silent: {e} after {:?}", start.elapsed());
    assert!(start.elapsed() < Duration::from_secs(30));
    drop(back);

    // Answers every message with garbage.
    let (front, mut back) = UnixStream::pair().expect("socketpair");
    let junk = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut back, &mut buf) {
            if n == 0 || back.write_all(&[0xa5; 64]).is_err() {
                break;
            }
        }
    });
    let e = device_on(front)
        .err()
        .expect("a garbage back end must fail");
    println!("garbage: {e}");
    let _ = junk.join();
}
