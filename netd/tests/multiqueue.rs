//! `bulkhead-netd --tap NAME --queues 2` on a real multiqueue tap (`IFF_MULTI_QUEUE`) in a
//! network namespace of the test's own, driven through vhost-user with two queue pairs: frames
//! the "guest" sends on a pair go out (netd's per-pair counters say on which tap queue), frames
//! from the tap come in on both pairs (the kernel spreads flows over the tap's queues), a
//! disabled pair is not served (its tap queue is detached, so its flows move to the served
//! pair) and is served again once enabled. Needs root (CI is root): fails loudly without it.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

mod common;
use common::{eth_frame, recv_ours_matching, send_frame, Netns};

const QSIZE: u16 = 64;
const MEM_SIZE: usize = 8 << 20;
const VA_BASE: u64 = 0x7000_0000_0000;
const HDR: usize = 12;
const F_WRITE: u16 = 2;
const PAIRS: usize = 2;
const NQ: usize = 2 * PAIRS;
/// Each rx queue's buffers: 32 of 2 KiB from here + queue * 0x10_0000.
const RX_BUF: u64 = 0x40_0000;
const TX_BUF: u64 = 0x20_0000;

fn ring_base(q: usize) -> u64 {
    0x1000 + q as u64 * 0x3000
}

struct Guest {
    fe: Frontend,
    mem: GuestMemoryMmap,
    _memfd: File,
    kick: Vec<EventFd>,
    _call: Vec<EventFd>,
    avail: [u16; NQ],
    next_desc: [u16; NQ],
}

impl Guest {
    fn connect(socket: &str) -> Guest {
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
        let mut fe = Frontend::connect(socket, NQ as u64).expect("connect");
        fe.set_owner().expect("set_owner");
        let features = fe.get_features().expect("get_features");
        fe.set_features(features).expect("set_features");
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
        let kick: Vec<EventFd> = (0..NQ).map(|_| EventFd::new(0).expect("efd")).collect();
        let call: Vec<EventFd> = (0..NQ).map(|_| EventFd::new(0).expect("efd")).collect();
        for q in 0..NQ {
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
        }
        Guest {
            fe,
            mem,
            _memfd: memfd,
            kick,
            _call: call,
            avail: [0; NQ],
            next_desc: [0; NQ],
        }
    }

    /// Enables or disables a pair and returns once netd has handled it: the protocol thread
    /// answers requests in order, so the reply to a `GET_CONFIG` sent after them is the barrier.
    fn enable_pair(&mut self, pair: usize, on: bool) {
        for q in [2 * pair, 2 * pair + 1] {
            self.fe.set_vring_enable(q, on).expect("enable");
        }
        self.fe
            .get_config(
                0,
                10,
                vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
                &[0u8; 10],
            )
            .expect("get_config after set_vring_enable");
    }

    fn write(&self, addr: u64, b: &[u8]) {
        self.mem.write_slice(b, GuestAddress(addr)).expect("write");
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("read");
        v
    }

    /// One chain of one descriptor, made available.
    fn post(&mut self, q: usize, addr: u64, len: u32, flags: u16) {
        let b = ring_base(q);
        let idx = self.next_desc[q];
        let d = b + u64::from(idx) * 16;
        self.write(d, &addr.to_le_bytes());
        self.write(d + 8, &len.to_le_bytes());
        self.write(d + 12, &flags.to_le_bytes());
        self.write(d + 14, &0u16.to_le_bytes());
        self.next_desc[q] = (idx + 1) % QSIZE;
        let a = b + 0x1000;
        let slot = u64::from(self.avail[q] % QSIZE);
        self.write(a + 4 + 2 * slot, &idx.to_le_bytes());
        self.avail[q] = self.avail[q].wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.write(a + 2, &self.avail[q].to_le_bytes());
    }

    fn kick(&self, q: usize) {
        self.kick[q].write(1).expect("kick");
    }

    fn used_idx(&self, q: usize) -> u16 {
        let b = self.read(ring_base(q) + 0x2002, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Posts `n` rx buffers of 2 KiB on pair `pair`'s rx queue.
    fn fill_rx(&mut self, pair: usize, n: usize) {
        let q = 2 * pair;
        for i in 0..n {
            let at = RX_BUF + q as u64 * 0x10_0000 + (i as u64 % 32) * 0x800;
            self.post(q, at, 0x800, F_WRITE);
        }
        self.kick(q);
    }

    /// Sends `frame` on pair `pair`.
    fn transmit(&mut self, pair: usize, frame: &[u8]) {
        let q = 2 * pair + 1;
        let at = TX_BUF + pair as u64 * 0x1_0000 + u64::from(self.next_desc[q]) * 0x100;
        let mut full = vec![0u8; HDR];
        full.extend_from_slice(frame);
        self.write(at, &full);
        self.post(q, at, full.len() as u32, 0);
        self.kick(q);
    }
}

/// An IPv4/UDP frame from 10.77.0.1 port `sport` to the guest's MAC (the kernel hashes the
/// flow to pick a tap queue).
fn udp_frame(dst: [u8; 6], src: [u8; 6], sport: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let payload = [0x5au8; 32];
    let total = 20 + 8 + payload.len();
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
        10,
        77,
        0,
        1,
        10,
        77,
        0,
        2,
    ];
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let ck = !(sum as u16);
    ip[10..12].copy_from_slice(&ck.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&0u16.to_be_bytes());
    f.extend_from_slice(&payload);
    f
}

const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

fn used_total(g: &Guest, pair: usize) -> u16 {
    g.used_idx(2 * pair)
}

/// Sends `n` UDP frames of distinct flows from the tap's side and waits until the guest's rx
/// queues have taken `n` more (or, once `wait` has passed, at least `min`) in total; returns
/// how many each pair got.
fn inbound(
    g: &Guest,
    sock: &OwnedFd,
    tap_mac: [u8; 6],
    first_port: u16,
    n: u16,
    min: u16,
    wait: Duration,
) -> [u16; PAIRS] {
    let before: Vec<u16> = (0..PAIRS).map(|p| used_total(g, p)).collect();
    for i in 0..n {
        send_frame(sock, &udp_frame(MAC, tap_mac, first_port + i));
    }
    let end = Instant::now() + wait;
    loop {
        let got: Vec<u16> = (0..PAIRS)
            .map(|p| used_total(g, p).wrapping_sub(before[p]))
            .collect();
        let sum: u16 = got.iter().sum();
        if sum >= n || (Instant::now() >= end && sum >= min) {
            return [got[0], got[1]];
        }
        assert!(
            Instant::now() < end,
            "only {got:?} of {n} frames arrived within {wait:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The tap's MAC address. Through `ip netns exec`, which mounts a sysfs of the namespace: a
/// thread that only joined the namespace (`Netns::within`) still sees the host's /sys/class/net.
fn tap_mac(ns: &Netns) -> [u8; 6] {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "cat"])
        .arg(format!("/sys/class/net/{}/address", ns.tap))
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "tap address: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).expect("utf-8");
    let mut m = [0u8; 6];
    for (b, p) in m.iter_mut().zip(s.trim().split(':')) {
        *b = u8::from_str_radix(p, 16).expect("mac");
    }
    m
}

struct Netd(Child);

impl Drop for Netd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_queue_pairs_on_a_multiqueue_tap_follow_enable() {
    let exe = env!("CARGO_BIN_EXE_bulkhead-netd");
    let ns = Netns::new("bhnetd", "bht", "mq", None);
    let sock = ns.packet_socket();
    let tmac = tap_mac(&ns);
    let path = format!("/tmp/bulkhead-netd-mq-{}.sock", std::process::id());
    let _ = std::fs::remove_file(&path);
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, exe, "--socket", &path])
        .args([
            "--tap",
            &ns.tap,
            "--queues",
            "2",
            "--mac",
            "02:00:00:00:00:01",
        ])
        .args(["--max-guest-mem-mib", "64"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning bulkhead-netd");
    let mut netd = Netd(child);
    let end = Instant::now() + Duration::from_secs(10);
    while !std::path::Path::new(&path).exists() {
        assert!(Instant::now() < end, "netd never bound {path}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut g = Guest::connect(&path);
    // Its config space says two pairs.
    let (_, cfg) =
        g.fe.get_config(
            0,
            10,
            vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
            &[0u8; 10],
        )
        .expect("get_config");
    assert_eq!(
        u16::from_le_bytes([cfg[8], cfg[9]]),
        2,
        "max_virtqueue_pairs"
    );
    g.enable_pair(0, true);
    g.enable_pair(1, true);
    g.fill_rx(0, 64);
    g.fill_rx(1, 64);

    // Out: one frame on each pair reaches the tap's side.
    for pair in 0..PAIRS {
        let f = eth_frame([0xff; 6], MAC, 60, 0x30 + pair as u8);
        g.transmit(pair, &f);
        let want = f.clone();
        assert!(
            recv_ours_matching(&sock, |x| x == want.as_slice(), Duration::from_secs(5)).is_some(),
            "the frame sent on pair {pair} never reached the tap"
        );
    }

    // In: 40 flows spread over both tap queues, so both pairs receive.
    let got = inbound(&g, &sock, tmac, 1000, 40, 40, Duration::from_secs(10));
    assert!(got[0] > 0 && got[1] > 0, "both pairs receive: {got:?}");

    // Pair 1 disabled: never served. netd detaches its tap queue when it next looks at the pair
    // (its next frame; frames that reached that queue meanwhile are dropped with it, as QEMU's
    // tap_disable purges them); batches go on until one arrives whole on pair 0, however long
    // a loaded host takes to run the pair's thread.
    g.enable_pair(1, false);
    let p1 = used_total(&g, 1);
    let end = Instant::now() + Duration::from_secs(30);
    let mut port = 2000;
    loop {
        let got = inbound(&g, &sock, tmac, port, 20, 0, Duration::from_secs(2));
        assert_eq!(used_total(&g, 1), p1, "a disabled pair was served");
        if got[0] == 20 {
            break;
        }
        assert!(
            Instant::now() < end,
            "pair 1's tap queue was never detached: the last batch gave {got:?}"
        );
        port += 20;
    }

    // Enabled again: pair 1 receives again (its queue is attached when the pair is next looked
    // at; frames around that moment may be dropped as above, so batches go on until pair 1 has
    // taken some).
    g.enable_pair(1, true);
    let end = Instant::now() + Duration::from_secs(30);
    let mut port = 3000;
    loop {
        let got = inbound(&g, &sock, tmac, port, 20, 0, Duration::from_secs(2));
        if got[1] > 0 {
            break;
        }
        assert!(
            Instant::now() < end,
            "pair 1 never served again: the last batch gave {got:?}"
        );
        port += 20;
    }

    drop(g);
    let end = Instant::now() + Duration::from_secs(10);
    while matches!(netd.0.try_wait(), Ok(None)) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = netd.0.try_wait().expect("wait").expect("netd exits");
    let mut err = String::new();
    if let Some(mut e) = netd.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let _ = std::fs::remove_file(&path);
    assert!(status.success(), "netd: {status}: {err}");
    assert!(err.contains("2 queue pairs"), "{err}");
    for key in ["pair0_tx=1 ", "pair1_tx=1"] {
        assert!(err.contains(key), "{key}: {err}");
    }
}
