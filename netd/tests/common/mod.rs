//! Fixtures shared by netd's integration tests: a network namespace with a tap (and its packet
//! socket on the far side), frames of the tests' own ethertype, sending and receiving them.
#![allow(dead_code)]

pub mod guest;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The ethertype of the tests' frames (local experimental).
pub const ETHERTYPE: u16 = 0x88b5;
/// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, as the monitor opens taps.
pub const TAP_FLAGS: u16 = 0x0002 | 0x1000 | 0x4000;

/// Runs a command, panicking with its stderr if it fails.
pub fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e} (iproute2's ip is needed)"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace holding a persistent tap with an address; deleted on drop.
/// A network namespace holding a persistent tap (vnet header) with 10.77.0.1/24; deleted on
/// drop.
pub struct Netns {
    /// The namespace's name.
    pub name: String,
    /// The tap's name.
    pub tap: String,
}

impl Netns {
    /// Makes the namespace `<ns_prefix>-<tag>-<pid>` with the tap `<tap_prefix><tag><pid>`,
    /// with `mtu` if given.
    pub fn new(ns_prefix: &str, tap_prefix: &str, tag: &str, mtu: Option<&str>) -> Netns {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the netd tests need root (ip netns, taps); CI runs as root"
        );
        let id = std::process::id() % 100_000;
        let n = Netns {
            name: format!("{ns_prefix}-{tag}-{id}"),
            tap: format!("{tap_prefix}{tag}{id}"),
        };
        let _ = Command::new("ip")
            .args(["netns", "del", &n.name])
            .stderr(Stdio::null())
            .status();
        run(&["ip", "netns", "add", &n.name]);
        // No IPv6 in the namespace: its router solicitations and MLD reports would be frames on
        // the tap the counters would see.
        n.within(|| {
            for c in ["all", "default"] {
                std::fs::write(format!("/proc/sys/net/ipv6/conf/{c}/disable_ipv6"), "1")
                    .expect("disabling IPv6 in the test namespace");
            }
        });
        let mut add = vec![
            "ip", "tuntap", "add", "dev", &n.tap, "mode", "tap", "vnet_hdr",
        ];
        if tag.starts_with("mq") {
            // Tags starting with "mq": a multiqueue tap (IFF_MULTI_QUEUE).
            add.push("multi_queue");
        }
        n.exec(&add);
        if let Some(mtu) = mtu {
            n.exec(&["ip", "link", "set", &n.tap, "mtu", mtu]);
        }
        n.exec(&["ip", "link", "set", &n.tap, "up"]);
        n.exec(&["ip", "addr", "add", "10.77.0.1/24", "dev", &n.tap]);
        n
    }

    /// Runs `ip netns exec <ns> args...`.
    pub fn exec(&self, args: &[&str]) {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        run(&v);
    }

    /// Runs `f` on a thread that has joined the namespace (network namespaces are per thread).
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("netns file");
            // SAFETY: setns on an fd we own; affects only this thread.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread")
    }

    /// The tap opened as the monitor opens it (`/dev/net/tun` + `TUNSETIFF`), close-on-exec.
    pub fn open_tap(&self) -> OwnedFd {
        let tap = self.tap.clone();
        self.within(move || {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .expect("/dev/net/tun");
            let mut req = [0u8; 40];
            req[..tap.len()].copy_from_slice(tap.as_bytes());
            req[16..18].copy_from_slice(&TAP_FLAGS.to_ne_bytes());
            // SAFETY: TUNSETIFF with a 40-byte ifreq we own.
            let r = unsafe { libc::ioctl(f.as_raw_fd(), 0x4004_54ca, req.as_mut_ptr()) };
            assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            OwnedFd::from(f)
        })
    }

    /// A raw packet socket on the tap, inside the namespace.
    pub fn packet_socket(&self) -> OwnedFd {
        let tap = self.tap.clone();
        self.within(move || {
            let cname = std::ffi::CString::new(tap).expect("name");
            // SAFETY: plain socket creation; the result is checked.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from((libc::ETH_P_ALL as u16).to_be()),
                )
            };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: fd was just created and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: cname is a valid C string.
            let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            assert!(ifindex > 0);
            // SAFETY: zeroed sockaddr_ll is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: binds with a properly sized sockaddr_ll.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: sets a timeval option with its size.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            fd
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Sends one frame on a packet socket.
pub fn send_frame(sock: &OwnedFd, frame: &[u8]) {
    // SAFETY: sends from a live buffer on a bound packet socket.
    let n = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(
        n,
        frame.len() as isize,
        "send: {}",
        std::io::Error::last_os_error()
    );
}

/// The first incoming (not outgoing) frame of our ethertype that `pred` accepts within
/// `timeout`.
pub fn recv_ours_matching(
    sock: &OwnedFd,
    pred: impl Fn(&[u8]) -> bool,
    timeout: Duration,
) -> Option<Vec<u8>> {
    let end = Instant::now() + timeout;
    let mut buf = vec![0u8; 70_000];
    while Instant::now() < end {
        // SAFETY: zeroed sockaddr_ll is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut fl = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: receives into our buffer and address struct with their sizes.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut fl,
            )
        };
        if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        let f = &buf[..n as usize];
        if f.len() >= 14 && u16::from_be_bytes([f[12], f[13]]) == ETHERTYPE && pred(f) {
            return Some(f.to_vec());
        }
    }
    None
}

/// An Ethernet frame of our ethertype with a payload pattern from `seed`.
pub fn eth_frame(dst: [u8; 6], src: [u8; 6], payload_len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload_len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}
