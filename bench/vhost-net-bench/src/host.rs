//! The host side of the benchmark: a network namespace of its own holding one persistent tap,
//! the tap's "far side" (raw `AF_PACKET` sockets bound to the tap interface inside the namespace:
//! one counts what the kernel receives from the tap, one injects frames into it), and the plain
//! tap fd the ceiling is measured on.
//!
//! The whole process joins the namespace at start ([`Netns::enter`]): threads and children
//! (netd) made afterwards are in it too, so no traffic leaves it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// `TUNSETIFF`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETOFFLOAD`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
const TAP_FLAGS: u16 = 0x0002 | 0x1000 | 0x4000;
/// `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN`: what netd sets for the receive
/// offloads this benchmark's driver acks (see `device`).
pub const TAP_OFFLOADS: libc::c_ulong = 0x01 | 0x02 | 0x04 | 0x08;
/// `SOL_PACKET`.
const SOL_PACKET: libc::c_int = 263;
/// `PACKET_STATISTICS`.
const PACKET_STATISTICS: libc::c_int = 6;
/// `PACKET_QDISC_BYPASS`.
const PACKET_QDISC_BYPASS: libc::c_int = 20;

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?} (iproute2's ip is needed)"))?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn last_os(what: &str) -> anyhow::Error {
    anyhow::Error::new(std::io::Error::last_os_error()).context(what.to_owned())
}

/// The benchmark's namespace and its tap; the namespace is deleted on drop.
pub struct Netns {
    /// Namespace name (`ip netns`).
    pub name: String,
    /// Tap interface name.
    pub tap: String,
    ifindex: i32,
}

impl Netns {
    /// Makes the namespace, moves this process (its only thread so far) into it, and creates
    /// the tap there (persistent, with a vnet header, up, no address, IPv6 off so the kernel
    /// sends nothing of its own on it).
    pub fn enter() -> Result<Netns> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("needs root (ip netns, taps)");
        }
        let id = std::process::id() % 100_000;
        let name = format!("bhnetbench-{id}");
        let tap = format!("bhnb{id}");
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(&["ip", "netns", "add", &name])?;
        let ns = File::open(format!("/var/run/netns/{name}")).context("opening the netns")?;
        // SAFETY: setns on an fd we own; the process is still single-threaded, so every thread
        // and child made later is in the namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
            return Err(last_os("setns"));
        }
        let mut n = Netns {
            name,
            tap,
            ifindex: 0,
        };
        for c in ["all", "default"] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{c}/disable_ipv6"), "1")
                .context("disabling IPv6 in the namespace")?;
        }
        run(&[
            "ip", "tuntap", "add", "dev", &n.tap, "mode", "tap", "vnet_hdr",
        ])?;
        run(&["ip", "link", "set", &n.tap, "up"])?;
        let cname = std::ffi::CString::new(n.tap.clone()).context("tap name")?;
        // SAFETY: cname is a valid C string.
        let idx = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        n.ifindex = i32::try_from(idx).context("ifindex")?;
        if n.ifindex == 0 {
            bail!("no interface {}", n.tap);
        }
        Ok(n)
    }

    /// Opens the tap as netd does (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, 12-byte header, the
    /// same offloads), non-blocking: the ceiling's fd.
    pub fn open_tap(&self) -> Result<OwnedFd> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .context("opening /dev/net/tun")?;
        let fd = OwnedFd::from(f);
        let mut req = [0u8; 40];
        req[..self.tap.len()].copy_from_slice(self.tap.as_bytes());
        req[16..18].copy_from_slice(&TAP_FLAGS.to_ne_bytes());
        // SAFETY: TUNSETIFF with a 40-byte ifreq we own.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) } != 0 {
            return Err(last_os("TUNSETIFF"));
        }
        let mut sz: libc::c_int = 12;
        // SAFETY: TUNSETVNETHDRSZ reads an int we own.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &mut sz) } != 0 {
            return Err(last_os("TUNSETVNETHDRSZ"));
        }
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, TAP_OFFLOADS) } != 0 {
            return Err(last_os("TUNSETOFFLOAD"));
        }
        // SAFETY: fcntl with integer arguments on an fd we own.
        let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if fl < 0 {
            return Err(last_os("fcntl(F_GETFL)"));
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(last_os("fcntl(F_SETFL)"));
        }
        Ok(fd)
    }

    /// A raw packet socket bound to the tap: `protocol` `ETH_P_ALL` to count what arrives from
    /// the tap, 0 to only send (with the qdisc bypassed, as a traffic generator would).
    pub fn packet_socket(&self, count: bool) -> Result<OwnedFd> {
        let proto = if count {
            (libc::ETH_P_ALL as u16).to_be()
        } else {
            0
        };
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(last_os("AF_PACKET socket"));
        }
        // SAFETY: fd was just created and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = self.ifindex;
        // SAFETY: binds with a properly sized sockaddr_ll.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(last_os("bind(AF_PACKET)"));
        }
        if !count {
            let one: libc::c_int = 1;
            // SAFETY: an int option with its size.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    SOL_PACKET,
                    PACKET_QDISC_BYPASS,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
        }
        Ok(fd)
    }

    /// The tap's kernel counters (`rx_packets`, `tx_packets`, `tx_dropped`) from sysfs, which
    /// `ip netns exec` mounts for the namespace.
    pub fn tap_counters(&self) -> Option<[u64; 3]> {
        let script = format!(
            "cd /sys/class/net/{}/statistics && cat rx_packets tx_packets tx_dropped",
            self.tap
        );
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", &script])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let v: Vec<u64> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        Some([*v.first()?, *v.get(1)?, *v.get(2)?])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `struct tpacket_stats`.
#[repr(C)]
#[derive(Default)]
struct TpacketStats {
    packets: u32,
    drops: u32,
}

/// Frames that reached the counting socket since the last call (the kernel resets the
/// counters on every read), including those it dropped for want of buffer space: the socket is
/// never read, only counted.
pub fn far_side_count(sock: RawFd) -> Result<u64> {
    let mut st = TpacketStats::default();
    let mut len = std::mem::size_of::<TpacketStats>() as libc::socklen_t;
    // SAFETY: reads a tpacket_stats into our struct with its size.
    let r = unsafe {
        libc::getsockopt(
            sock,
            SOL_PACKET,
            PACKET_STATISTICS,
            (&mut st as *mut TpacketStats).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(last_os("getsockopt(PACKET_STATISTICS)"));
    }
    // tp_packets already includes tp_drops (the kernel adds them when reporting).
    Ok(u64::from(st.packets))
}

/// Sends `frame` on a packet socket until `stop`; returns how many were sent.
pub fn inject(sock: RawFd, frame: &[u8], stop: &std::sync::atomic::AtomicBool) -> u64 {
    let mut sent = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for _ in 0..64 {
            // SAFETY: sends from a live buffer on a bound packet socket.
            let n = unsafe { libc::send(sock, frame.as_ptr().cast(), frame.len(), 0) };
            if n > 0 {
                sent += 1;
            }
        }
    }
    sent
}

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.get(s.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / hz.max(1) as f64)
}

/// CPU time all CPUs spent busy so far in user and system mode and stolen by the hypervisor,
/// from `/proc/stat`, in seconds. Interrupt and softirq time are left out: the tap's own
/// receive processing runs there (also when deferred to ksoftirqd, or not charged to the task at
/// all with `CONFIG_IRQ_TIME_ACCOUNTING`), and it is this benchmark's load, not other load.
pub fn busy_cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(7)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(busy as f64 / hz.max(1) as f64)
}
