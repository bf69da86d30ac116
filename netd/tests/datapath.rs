//! The real `bulkhead-netd` binary driven through vhost-user as a front end would drive it
//! (`vhost::vhost_user::Frontend`, a memfd as guest memory, rings built here), on a real tap in a
//! network namespace the test makes itself (`ip netns add`): all traffic stays in it. The far
//! side is a raw `AF_PACKET` socket on the tap inside that namespace. Needs root (CI is root):
//! fails loudly without it, never skips.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend};

mod common;
use common::guest::*;
use common::{eth_frame, recv_ours_matching, send_frame, Netns, ETHERTYPE};

const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];

/// Waits for an incoming frame of our ethertype that `pred` accepts.
fn recv_matching(sock: &OwnedFd, pred: impl Fn(&[u8]) -> bool, timeout: Duration) -> Vec<u8> {
    recv_ours_matching(sock, pred, timeout)
        .unwrap_or_else(|| panic!("no matching frame within {timeout:?}"))
}

/// The netd process (stderr collected), killed on drop.
struct Netd {
    child: Child,
}

impl Netd {
    fn start(ns: &Netns, socket: &str) -> Netd {
        let exe = env!("CARGO_BIN_EXE_bulkhead-netd");
        let child = Command::new("ip")
            .args([
                "netns", "exec", &ns.name, exe, "--socket", socket, "--tap", &ns.tap,
            ])
            .args(["--mac", "02:00:00:00:00:01", "--max-guest-mem-mib", "64"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning bulkhead-netd");
        let end = Instant::now() + Duration::from_secs(10);
        while !std::path::Path::new(socket).exists() {
            assert!(Instant::now() < end, "netd never bound {socket}");
            std::thread::sleep(Duration::from_millis(10));
        }
        Netd { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// utime + stime in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("stat");
        let rest = &s[s.rfind(')').expect("comm") + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
    }

    /// Waits for exit and returns stderr.
    fn finish(mut self) -> String {
        let end = Instant::now() + Duration::from_secs(10);
        while self.alive() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.alive() {
            for t in std::fs::read_dir(format!("/proc/{}/task", self.pid()))
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = t.path();
                let sc = std::fs::read_to_string(p.join("syscall")).unwrap_or_default();
                let st = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
                let w = std::fs::read_to_string(p.join("wchan")).unwrap_or_default();
                eprintln!("HUNG task {:?}: syscall {sc} wchan {w} stat {st}", p);
            }
            let _ = self.child.kill();
        }
        let status = self.child.wait().expect("wait");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        assert!(status.success(), "netd exited with {status}: {err}");
        err
    }
}

impl Drop for Netd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    fn connect(socket: &str) -> Guest {
        Guest::connect_without(socket, 0)
    }

    /// Connects and acks every offered feature but those in `without`.
    fn connect_without(socket: &str, without: u64) -> Guest {
        let g = Guest::negotiate(Frontend::connect(socket, 2).expect("connect"), without);
        assert!(g.offered & (1 << 15) != 0, "mergeable rx buffers offered");
        g
    }
}

/// A socket path, removed on drop (netd, sandboxed, cannot unlink it itself).
struct SockPath(String);

impl std::ops::Deref for SockPath {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Drop for SockPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn socket_path(tag: &str) -> SockPath {
    let p = format!("/tmp/bulkhead-netd-{tag}-{}.sock", std::process::id());
    let _ = std::fs::remove_file(&p);
    SockPath(p)
}

#[test]
fn frames_flow_both_ways_through_the_sandboxed_netd() {
    let ns = Netns::new("bhnetd", "bht", "f", Some("9000"));
    let sock = ns.packet_socket();
    let path = socket_path("f");
    let netd = Netd::start(&ns, &path);
    let mut g = Guest::connect(&path);

    // Config space: the MAC and link up.
    let (_, cfg) =
        g.fe.get_config(0, 10, VhostUserConfigFlags::WRITABLE, &[0u8; 10])
            .expect("get_config");
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]) & 1, 1, "link up");

    // The sandbox as /proc shows it: seccomp filter, no_new_privs, not in the test's netns.
    let status = std::fs::read_to_string(format!("/proc/{}/status", netd.pid())).expect("status");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let netd_ns = std::fs::read_link(format!("/proc/{}/ns/net", netd.pid())).expect("ns");
    let test_ns = ns.within(|| std::fs::read_link("/proc/thread-self/ns/net").expect("ns"));
    assert_ne!(
        netd_ns, test_ns,
        "netd left the tap's namespace for an empty one"
    );

    // guest → tap: appears on the far side intact.
    let out = eth_frame([0xff; 6], MAC, 200, 1);
    g.transmit(TX_BUF, &out);
    let seen = recv_matching(&sock, |f| f == out.as_slice(), Duration::from_secs(5));
    assert_eq!(seen, out);
    g.wait_used(TX, 1, Duration::from_secs(5));

    // tap → guest: one 2 KiB buffer per frame.
    for i in 0..4u64 {
        g.post(RX, &[(RX_BUF + i * 0x1000, 2048, F_WRITE)]);
    }
    g.kick(RX);
    let inbound = eth_frame(MAC, [0x02, 0, 0, 0, 0, 9], 300, 2);
    send_frame(&sock, &inbound);
    g.wait_used(RX, 1, Duration::from_secs(5));
    let (id, len) = g.used(RX, 0);
    assert_eq!(len as usize, HDR + inbound.len());
    let got = g.read(RX_BUF + u64::from(id) * 0x1000, len as usize);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[HDR..], inbound.as_slice());

    // A 6000-byte frame (MTU 9000) spans mergeable buffers: 2048 + 2048 + 1916... in the
    // three buffers left, num_buffers 3.
    let big = eth_frame(MAC, [0x02, 0, 0, 0, 0, 9], 5986, 3);
    send_frame(&sock, &big);
    g.wait_used(RX, 4, Duration::from_secs(5));
    let mut assembled = Vec::new();
    for n in 1..4 {
        let (id, len) = g.used(RX, n);
        assembled.extend(g.read(RX_BUF + u64::from(id) * 0x1000, len as usize));
    }
    assert_eq!(u16::from_le_bytes([assembled[10], assembled[11]]), 3);
    assert_eq!(&assembled[HDR..], big.as_slice());

    drop(g);
    let err = netd.finish();
    assert!(err.contains("tx_frames=1 tx_dropped=0 rx_frames="), "{err}");
    assert!(err.contains("seccomp"), "{err}");
}

#[test]
fn hostile_descriptors_are_dropped_and_netd_keeps_serving() {
    let ns = Netns::new("bhnetd", "bht", "h", Some("9000"));
    let sock = ns.packet_socket();
    let path = socket_path("h");
    let mut netd = Netd::start(&ns, &path);
    let mut g = Guest::connect(&path);

    // tx: a write-only descriptor, an address outside guest memory, a range crossing its end,
    // an oversize frame, a header-only chain, a head index beyond the ring, a descriptor loop.
    g.post(TX, &[(TX_BUF, 100, F_WRITE)]);
    g.post(TX, &[(0x7fff_0000_0000, 100, 0)]);
    g.post(TX, &[(MEM_SIZE as u64 - 50, 100, 0)]);
    g.post(TX, &[(TX_BUF, 0x2_0000, 0)]);
    g.post(TX, &[(TX_BUF, HDR as u32, 0)]);
    g.post_head(TX, QSIZE + 7);
    let head = g.post(TX, &[(TX_BUF, 64, 0)]);
    let d = ring_base(TX) + u64::from(head) * 16;
    g.write(d + 12, &F_NEXT.to_le_bytes());
    g.write(d + 14, &head.to_le_bytes());
    g.kick(TX);
    std::thread::sleep(Duration::from_millis(200));
    assert!(netd.alive(), "netd died on bad tx descriptors");

    // rx: a read-only buffer and one outside memory are dropped with the frame they were for.
    g.post(RX, &[(RX_BUF, 2048, 0)]);
    g.post(RX, &[(0x7fff_0000_0000, 2048, F_WRITE)]);
    g.kick(RX);
    send_frame(&sock, &eth_frame(MAC, [2, 0, 0, 0, 0, 9], 100, 4));
    send_frame(&sock, &eth_frame(MAC, [2, 0, 0, 0, 0, 9], 100, 5));
    g.wait_used(RX, 2, Duration::from_secs(5));
    assert_eq!(g.used(RX, 0).1, 0);
    assert_eq!(g.used(RX, 1).1, 0);
    assert!(netd.alive());

    // Still serving both ways.
    let out = eth_frame([0xff; 6], MAC, 500, 6);
    g.transmit(TX_BUF + 0x1000, &out);
    recv_matching(&sock, |f| f == out.as_slice(), Duration::from_secs(5));
    g.post(RX, &[(RX_BUF + 0x4000, 2048, F_WRITE)]);
    g.kick(RX);
    let inbound = eth_frame(MAC, [2, 0, 0, 0, 0, 9], 120, 7);
    send_frame(&sock, &inbound);
    g.wait_used(RX, 3, Duration::from_secs(5));
    let (_, len) = g.used(RX, 2);
    assert_eq!(
        &g.read(RX_BUF + 0x4000 + HDR as u64, len as usize - HDR),
        &inbound
    );

    // An avail index far beyond the ring: the queue is refused, netd neither dies nor spins.
    let before = netd.cpu_ticks();
    g.jump_avail(TX, 1000);
    g.kick(TX);
    std::thread::sleep(Duration::from_millis(500));
    assert!(netd.alive(), "netd died on a bogus avail index");
    assert!(
        netd.cpu_ticks() - before < 10,
        "netd spins on a bogus avail index"
    );

    drop(g);
    let err = netd.finish();
    // Dropped: write-only, outside memory, crossing its end, oversize, header only, head beyond
    // the ring. The descriptor loop is walked at most a ring's worth of times (virtio-queue
    // bounds a chain by the queue size) and sent as one 4 KiB frame: bounded, not an error.
    assert!(err.contains("tx_frames=2 tx_dropped=6"), "{err}");
}

#[test]
fn rx_without_buffers_backs_off_without_spinning_and_recovers() {
    let ns = Netns::new("bhnetd", "bht", "b", Some("9000"));
    let sock = ns.packet_socket();
    let path = socket_path("b");
    let mut netd = Netd::start(&ns, &path);
    let mut g = Guest::connect(&path);

    // No rx buffers posted: 3000 frames over about a second.
    let before = netd.cpu_ticks();
    let t0 = Instant::now();
    for i in 0..3000u32 {
        send_frame(&sock, &eth_frame(MAC, [2, 0, 0, 0, 0, 9], 60, i as u8));
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(30));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let busy = netd.cpu_ticks() - before;
    let wall = t0.elapsed();
    // Idle with frames pending: not a tick.
    let idle0 = netd.cpu_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let idle = netd.cpu_ticks() - idle0;
    eprintln!("netd CPU: {busy} ticks over {wall:?} of inbound frames, {idle} ticks idle for 1 s");
    assert!(busy < 30, "netd used {busy} ticks without rx buffers");
    assert!(
        idle <= 1,
        "netd spins with a frame pending: {idle} ticks in 1 s"
    );
    assert!(netd.alive());

    // Buffers come: frames flow again, the held one first.
    for i in 0..32u64 {
        g.post(RX, &[(RX_BUF + i * 0x1000, 2048, F_WRITE)]);
    }
    g.kick(RX);
    g.wait_used(RX, 32, Duration::from_secs(5));
    let (id, len) = g.used(RX, 0);
    let first = g.read(
        RX_BUF + u64::from(id) * 0x1000 + HDR as u64,
        len as usize - HDR,
    );
    assert_eq!(&first[12..14], &ETHERTYPE.to_be_bytes());
    // And new frames after that.
    for i in 32..40u64 {
        g.post(RX, &[(RX_BUF + i * 0x1000, 2048, F_WRITE)]);
    }
    g.kick(RX);
    g.wait_used(RX, 40, Duration::from_secs(5));
    assert!(netd.alive());
    drop(g);
    let err = netd.finish();
    assert!(err.contains("rx_stalls="), "{err}");
}

/// Opens the namespace's tap from the test (TUNSETIFF with `flags`); close-on-exec stays set
/// (tests run as threads of one process, and a tap fd leaked into another test's child would
/// keep the tap attached): [`with_tap_fd`] gives it to one child only.
fn inheritable_tap(ns: &Netns, flags: u16) -> OwnedFd {
    let tap = ns.tap.clone();
    ns.within(move || {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("/dev/net/tun");
        let mut req = [0u8; 40];
        req[..tap.len()].copy_from_slice(tap.as_bytes());
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF with a 40-byte ifreq we own.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), 0x4004_54ca, req.as_mut_ptr()) };
        assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        OwnedFd::from(f)
    })
}

/// The fd number the child gets the tap as.
const CHILD_TAP_FD: i32 = 100;

/// `exe --tap-fd 100 ARGS` with `fd` duplicated to 100 in the child only.
fn with_tap_fd(exe: &str, fd: &OwnedFd, args: &[&str]) -> Command {
    use std::os::unix::process::CommandExt;
    let raw = fd.as_raw_fd();
    let mut c = Command::new(exe);
    c.args(args).args(["--tap-fd", &CHILD_TAP_FD.to_string()]);
    // SAFETY: dup2 is async-signal-safe; the closure touches no memory of the parent's.
    unsafe {
        c.pre_exec(move || {
            if libc::dup2(raw, CHILD_TAP_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

#[test]
fn an_inherited_tap_fd_is_served_and_one_without_vnet_header_refused() {
    let exe = env!("CARGO_BIN_EXE_bulkhead-netd");
    let ns = Netns::new("bhnetd", "bht", "i", Some("9000"));
    let sock = ns.packet_socket();

    // Without IFF_VNET_HDR: refused before anything is served.
    let plain = inheritable_tap(&ns, 0x0002 | 0x1000);
    let path = socket_path("i0");
    let out = with_tap_fd(exe, &plain, &["--socket", &path])
        .output()
        .expect("netd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("IFF_VNET_HDR"),
        "{err}"
    );
    drop(plain);

    // With it: netd, started in the test's (host) namespace, serves the namespace's tap.
    let fd = inheritable_tap(&ns, 0x0002 | 0x1000 | 0x4000);
    let path = socket_path("i");
    let child = with_tap_fd(exe, &fd, &["--socket", &path])
        .stderr(Stdio::piped())
        .spawn()
        .expect("netd");
    drop(fd);
    let end = Instant::now() + Duration::from_secs(10);
    while !std::path::Path::new(&*path).exists() {
        assert!(Instant::now() < end, "netd never bound {}", &*path);
        std::thread::sleep(Duration::from_millis(10));
    }
    let netd = Netd { child };
    let mut g = Guest::connect(&path);
    let out = eth_frame([0xff; 6], MAC, 64, 9);
    g.transmit(TX_BUF, &out);
    recv_matching(&sock, |f| f == out.as_slice(), Duration::from_secs(5));
    drop(g);
    let err = netd.finish();
    assert!(err.contains("tx_frames=1"), "{err}");
}

#[test]
fn legacy_header_without_mergeable_buffers_and_oversize_frames_dropped() {
    let ns = Netns::new("bhnetd", "bht", "l", Some("9000"));
    let sock = ns.packet_socket();
    let path = socket_path("l");
    let netd = Netd::start(&ns, &path);
    // Neither VERSION_1 nor MRG_RXBUF: the 10-byte legacy header, one chain per frame.
    let mut g = Guest::connect_without(&path, 1 << 32 | 1 << 15);
    const LEGACY: usize = 10;

    // tx with a 10-byte header.
    let out = eth_frame([0xff; 6], MAC, 100, 11);
    let mut full = vec![0u8; LEGACY];
    full.extend_from_slice(&out);
    g.write(TX_BUF, &full);
    g.post(TX, &[(TX_BUF, full.len() as u32, 0)]);
    g.kick(TX);
    recv_matching(&sock, |f| f == out.as_slice(), Duration::from_secs(5));

    // rx: a 4000-byte frame does not fit a 2 KiB buffer: dropped, the chain returned empty;
    // the next frame that fits arrives with the 10-byte header.
    g.post(RX, &[(RX_BUF, 2048, F_WRITE)]);
    g.post(RX, &[(RX_BUF + 0x1000, 2048, F_WRITE)]);
    g.kick(RX);
    send_frame(&sock, &eth_frame(MAC, [2, 0, 0, 0, 0, 9], 3986, 12));
    let small = eth_frame(MAC, [2, 0, 0, 0, 0, 9], 200, 13);
    send_frame(&sock, &small);
    g.wait_used(RX, 2, Duration::from_secs(5));
    assert_eq!(g.used(RX, 0).1, 0, "oversize frame dropped");
    let (id, len) = g.used(RX, 1);
    assert_eq!(len as usize, LEGACY + small.len());
    let got = g.read(RX_BUF + u64::from(id) * 0x1000, len as usize);
    assert_eq!(&got[LEGACY..], small.as_slice());

    drop(g);
    let err = netd.finish();
    assert!(err.contains("rx_frames=1 rx_dropped=1"), "{err}");
}
