//! `vhost-net-bench`: packets per second and throughput of a vhost-user-net back end
//! (`bulkhead-netd`) against the ceiling of plain `read`/`write` on the same tap (issue 6).
//!
//! ```text
//! vhost-net-bench --netd PATH [--rounds N] [--duration SECS] [--warmup SECS]
//!                 [--sandbox on|off|allow-weak] [--out FILE.json] [--only KEY,...]
//! ```
//!
//! It makes a network namespace with one tap (`host`), joins it, and per round and workload
//! measures two ways of moving the same frames through that tap:
//!
//! * **netd**: a fresh `bulkhead-netd --socket S --tap TAP --sandbox on` per workload, driven by
//!   this process as a guest's virtio-net driver plus VMM would (`device`: memfd guest memory,
//!   vhost-user negotiation incl. mergeable rx buffers, rx and tx split virtqueues, the 12-byte
//!   vnet header, kicks and calls by eventfd; the driver sleeps on the call eventfd when it has
//!   nothing to do, as a guest waits for its interrupt);
//! * **raw**: this process opens the tap itself (same flags, header size and offloads as netd)
//!   and `write`s / `read`s the same frames, vnet header included: the ceiling.
//!
//! Workloads: 64-byte and 1514-byte Ethernet frames (no FCS) guest→tap and tap→guest, and
//! 64 KiB TCPv4 TSO frames (`VIRTIO_NET_HDR_GSO_TCPV4`, checksum offload) guest→tap. The far
//! side of the tap is a raw `AF_PACKET` socket on the tap interface: guest→tap counts what it
//! sees arrive from the tap (`PACKET_STATISTICS`, never read); tap→guest, another one injects
//! frames as fast as it can on one thread, and the guest side counts what it receives. Every
//! run has a warm-up, then a measured window; the medians over the rounds are printed as a
//! markdown table, and every run's figures go to `--out`.

mod device;
mod host;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use vhost::vhost_user::Frontend;

use device::{NetDevice, HDR, RX, TX};
use host::Netns;

/// The guest's MAC (netd's default).
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// A unicast MAC that is neither the guest's nor the tap's.
const OTHER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x99];
/// An experimental ethertype: the tap's kernel side has no handler for it.
const ETHERTYPE: u16 = 0x88b5;
/// Payload of the TSO frames: IPv4 total length 65480, frame 65494 bytes.
const TSO_PAYLOAD: usize = 65440;
/// The TSO segment size (a 1500-byte MTU's TCP payload with timestamps).
const TSO_MSS: u16 = 1448;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    GuestToTap,
    TapToGuest,
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    /// Short name for `--only`.
    key: &'static str,
    name: &'static str,
    dir: Dir,
    /// Ethernet frame length.
    frame: usize,
    tso: bool,
}

const WORKLOADS: [Workload; 5] = [
    Workload {
        key: "tx64",
        name: "64 B frames",
        dir: Dir::GuestToTap,
        frame: 64,
        tso: false,
    },
    Workload {
        key: "tx1514",
        name: "1514 B frames",
        dir: Dir::GuestToTap,
        frame: 1514,
        tso: false,
    },
    Workload {
        key: "tso",
        name: "64 KiB TSO frames",
        dir: Dir::GuestToTap,
        frame: 14 + 20 + 20 + TSO_PAYLOAD,
        tso: true,
    },
    Workload {
        key: "rx64",
        name: "64 B frames",
        dir: Dir::TapToGuest,
        frame: 64,
        tso: false,
    },
    Workload {
        key: "rx1514",
        name: "1514 B frames",
        dir: Dir::TapToGuest,
        frame: 1514,
        tso: false,
    },
];

struct Options {
    netd: PathBuf,
    rounds: usize,
    duration: Duration,
    warmup: Duration,
    sandbox: String,
    out: Option<PathBuf>,
    /// Workload keys to run (all when empty).
    only: Vec<String>,
    /// A run during which the rest of the host used this many CPUs or more is repeated.
    max_foreign: f64,
    /// How many times.
    retries: usize,
}

const USAGE: &str = "usage: vhost-net-bench --netd PATH [--rounds N (3)] [--duration SECS (3)] \
[--warmup SECS (0.5)] [--sandbox on|off|allow-weak (on)] [--out FILE.json] \
[--only tx64,tx1514,tso,rx64,rx1514] [--max-foreign CPUS (0.25)] [--retries N (5)]";

impl Options {
    fn parse() -> Result<Options> {
        let mut o = Options {
            netd: PathBuf::new(),
            rounds: 3,
            duration: Duration::from_secs(3),
            warmup: Duration::from_millis(500),
            sandbox: "on".into(),
            out: None,
            only: Vec::new(),
            max_foreign: 0.25,
            retries: 5,
        };
        let mut it = std::env::args().skip(1);
        let secs = |v: String| -> Result<Duration> {
            let s: f64 = v.parse().with_context(|| format!("{v}: seconds"))?;
            Duration::try_from_secs_f64(s).map_err(|e| anyhow!("{v}: {e}"))
        };
        while let Some(a) = it.next() {
            let mut val = || {
                it.next()
                    .ok_or_else(|| anyhow!("{a} needs a value\n{USAGE}"))
            };
            match a.as_str() {
                "--netd" => o.netd = val()?.into(),
                "--rounds" => o.rounds = val()?.parse().context("--rounds")?,
                "--duration" => o.duration = secs(val()?)?,
                "--warmup" => o.warmup = secs(val()?)?,
                "--sandbox" => o.sandbox = val()?,
                "--out" => o.out = Some(val()?.into()),
                "--max-foreign" => o.max_foreign = val()?.parse().context("--max-foreign")?,
                "--retries" => o.retries = val()?.parse().context("--retries")?,
                "--only" => o.only = val()?.split(',').map(str::to_owned).collect(),
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0)
                }
                _ => bail!("unknown argument {a}\n{USAGE}"),
            }
        }
        if o.netd.as_os_str().is_empty() || o.rounds == 0 {
            bail!("{USAGE}");
        }
        if let Some(k) = o
            .only
            .iter()
            .find(|k| !WORKLOADS.iter().any(|w| w.key == *k))
        {
            bail!("--only: no workload {k}\n{USAGE}");
        }
        Ok(o)
    }
}

/// An Ethernet frame of `len` bytes with our ethertype and a pattern.
fn eth_frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend((f.len()..len).map(|i| (i as u8).wrapping_mul(7)));
    f
}

/// The internet checksum of `b`.
fn csum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// A 64 KiB TCPv4 frame and the vnet header asking the tap to segment it (TSO) and fill in the
/// TCP checksum (seeded with the pseudo-header sum, as a guest's stack does).
fn tso_frame() -> ([u8; HDR], Vec<u8>) {
    let ip_len = 20 + 20 + TSO_PAYLOAD;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&OTHER_MAC);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let (src, dst) = ([10u8, 77, 0, 2], [10u8, 77, 0, 1]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH ACK
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    // Pseudo-header sum, not inverted (CHECKSUM_PARTIAL).
    let mut ph = Vec::new();
    ph.extend_from_slice(&src);
    ph.extend_from_slice(&dst);
    ph.extend_from_slice(&[0, 6]);
    ph.extend_from_slice(&((20 + TSO_PAYLOAD) as u16).to_be_bytes());
    let p = !csum(&ph);
    tcp[16..18].copy_from_slice(&p.to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend((0..TSO_PAYLOAD).map(|i| (i as u8).wrapping_mul(13)));
    let mut h = [0u8; HDR];
    h[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    h[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
    h[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
    h[4..6].copy_from_slice(&TSO_MSS.to_le_bytes()); // gso_size
    h[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
    h[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    (h, f)
}

/// What the guest side sends for workload `w`: header and frame.
fn tx_frame(w: &Workload) -> ([u8; HDR], Vec<u8>) {
    if w.tso {
        tso_frame()
    } else {
        ([0u8; HDR], eth_frame(OTHER_MAC, GUEST_MAC, w.frame))
    }
}

/// One measured run.
#[derive(Debug, Clone, Default)]
struct Sample {
    /// Frames per second counted on the receiving side (far side for guest→tap, the guest
    /// side for tap→guest).
    pps: f64,
    /// Ethernet frame bits per second, same counting.
    bps: f64,
    /// Frames per second the sending side got rid of (guest→tap: tx completions or successful
    /// writes; tap→guest: frames the injector sent).
    sent_pps: f64,
    /// CPU of netd over the window (1.0 = one CPU), netd runs only.
    netd_cpu: Option<f64>,
    /// CPU of this process over the window (driver + injector).
    own_cpu: f64,
    /// Deltas of the tap's kernel counters over the whole run (rx_packets, tx_packets,
    /// tx_dropped).
    tap: Option<[u64; 3]>,
    /// CPUs used by everything else on the host during the run (warm-up included): busy time
    /// from `/proc/stat` minus this process and netd.
    foreign: f64,
    netd_log: String,
}

/// Busy CPU seconds of the host, this process and (if any) netd, at one moment.
struct Load {
    at: Instant,
    busy: f64,
    own: f64,
    netd: f64,
}

impl Load {
    fn now(netd: Option<u32>) -> Load {
        Load {
            at: Instant::now(),
            busy: host::busy_cpu_seconds().unwrap_or(0.0),
            own: own_cpu(),
            netd: netd.and_then(host::cpu_seconds).unwrap_or(0.0),
        }
    }

    /// CPUs the rest of the host used since `self`.
    fn foreign(&self, netd: Option<u32>) -> f64 {
        let e = Load::now(netd);
        let t = self.at.elapsed().as_secs_f64().max(1e-3);
        ((e.busy - self.busy) - (e.own - self.own) - (e.netd - self.netd)) / t
    }
}

/// The measurement window: warm-up, then `duration`.
struct Window {
    start: Instant,
    warm_end: Instant,
    end: Instant,
    marked: Option<Instant>,
}

impl Window {
    fn new(o: &Options) -> Window {
        let start = Instant::now();
        Window {
            start,
            warm_end: start + o.warmup,
            end: start + o.warmup + o.duration,
            marked: None,
        }
    }

    /// `Some(true)` once, when the warm-up ends; `None` when the window is over.
    fn tick(&mut self) -> Option<bool> {
        let now = Instant::now();
        if now >= self.end {
            return None;
        }
        if self.marked.is_none() && now >= self.warm_end {
            self.marked = Some(now);
            return Some(true);
        }
        Some(false)
    }

    fn elapsed(&self) -> f64 {
        let from = self.marked.unwrap_or(self.start);
        from.elapsed().as_secs_f64()
    }
}

fn own_cpu() -> f64 {
    host::cpu_seconds(std::process::id()).unwrap_or(0.0)
}

/// A started netd, killed on drop. Its stderr is a pipe read by a thread (the sandbox's
/// `RLIMIT_FSIZE` of 0 would kill it with `SIGXFSZ` for writing to a file).
struct Netd {
    child: Child,
    log: Option<std::thread::JoinHandle<String>>,
}

impl Netd {
    fn start(o: &Options, ns: &Netns, sock: &Path) -> Result<(Netd, Frontend)> {
        let _ = std::fs::remove_file(sock);
        let mut child = Command::new(&o.netd)
            .arg("--socket")
            .arg(sock)
            .args(["--tap", &ns.tap, "--sandbox", &o.sandbox])
            .args(["--max-guest-mem-mib", "256"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", o.netd.display()))?;
        let err = child.stderr.take();
        let log = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut e) = err {
                let _ = std::io::Read::read_to_string(&mut e, &mut s);
            }
            s
        });
        let mut n = Netd {
            child,
            log: Some(log),
        };
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = n.child.try_wait() {
                bail!("netd exited with {st}: {}", n.log_text());
            }
            if sock.exists() {
                if let Ok(fe) = Frontend::connect(sock, 2) {
                    return Ok((n, fe));
                }
            }
            if Instant::now() > end {
                bail!("netd never accepted on {}", sock.display());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Its stderr, once it has exited.
    fn log_text(&mut self) -> String {
        self.log
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }

    /// Waits for netd to exit after the front end went away; returns its log.
    fn finish(mut self) -> Result<String> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(self.log_text()),
                Ok(Some(st)) => bail!("netd exited with {st}: {}", self.log_text()),
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
                _ => bail!("netd did not exit after the front end left"),
            }
        }
    }
}

impl Drop for Netd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An injector thread on the far side: sends `frame` into the tap until stopped.
struct Injector {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Injector {
    fn start(ns: &Netns, frame: Vec<u8>) -> Result<Injector> {
        let sock = ns.packet_socket(false)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || host::inject(sock.as_raw_fd(), &frame, &s));
        Ok(Injector {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Guest→tap through netd.
fn netd_tx(o: &Options, ns: &Netns, w: &Workload, dev: &mut NetDevice, pid: u32) -> Result<Sample> {
    let (hdr, frame) = tx_frame(w);
    dev.fill_tx(&hdr, &frame)?;
    let far = ns.packet_socket(true)?;
    let mut scratch = Vec::new();
    let mut win = Window::new(o);
    let (mut done, mut done0, mut cpu0, mut own0) = (0u64, 0u64, 0.0, 0.0);
    while let Some(mark) = win.tick() {
        if mark {
            host::far_side_count(far.as_raw_fd())?;
            done0 = done;
            cpu0 = host::cpu_seconds(pid).unwrap_or(0.0);
            own0 = own_cpu();
        }
        done += dev.tx_complete(&mut scratch)?;
        // Refill once a quarter of the ring is free (fewer, bigger batches, one kick each);
        // otherwise sleep until netd signals completions.
        if dev.tx_free() >= usize::from(device::QSIZE) / 4 {
            dev.tx_post()?;
        } else {
            dev.wait(TX, Duration::from_millis(10))?;
        }
    }
    let t = win.elapsed();
    let seen = host::far_side_count(far.as_raw_fd())? as f64;
    Ok(Sample {
        pps: seen / t,
        bps: seen * frame.len() as f64 * 8.0 / t,
        sent_pps: (done - done0) as f64 / t,
        netd_cpu: host::cpu_seconds(pid).map(|c| (c - cpu0) / t),
        own_cpu: (own_cpu() - own0) / t,
        ..Sample::default()
    })
}

/// Tap→guest through netd.
fn netd_rx(o: &Options, ns: &Netns, w: &Workload, dev: &mut NetDevice, pid: u32) -> Result<Sample> {
    let inj = Injector::start(ns, eth_frame(GUEST_MAC, OTHER_MAC, w.frame))?;
    let mut scratch = Vec::new();
    let mut win = Window::new(o);
    let (mut frames, mut bytes) = (0u64, 0u64);
    let (mut f0, mut b0, mut cpu0, mut own0) = (0u64, 0u64, 0.0, 0.0);
    while let Some(mark) = win.tick() {
        if mark {
            (f0, b0) = (frames, bytes);
            cpu0 = host::cpu_seconds(pid).unwrap_or(0.0);
            own0 = own_cpu();
        }
        let (f, b) = dev.rx_complete(&mut scratch)?;
        frames += f;
        bytes += b;
        if f == 0 {
            dev.wait(RX, Duration::from_millis(10))?;
        }
    }
    let t = win.elapsed();
    let cpu = host::cpu_seconds(pid).map(|c| (c - cpu0) / t);
    let own = (own_cpu() - own0) / t;
    let sent = inj.stop();
    Ok(Sample {
        pps: (frames - f0) as f64 / t,
        bps: (bytes - b0) as f64 * 8.0 / t,
        sent_pps: sent as f64 / win.start.elapsed().as_secs_f64(),
        netd_cpu: cpu,
        own_cpu: own,
        ..Sample::default()
    })
}

/// Guest→tap as plain writes on the tap fd.
fn raw_tx(o: &Options, ns: &Netns, w: &Workload, tap: &OwnedFd) -> Result<Sample> {
    let (hdr, frame) = tx_frame(w);
    // The same working set as the guest's tx buffers: QSIZE copies, written in turn.
    let stride = ((HDR + frame.len()) as u64).div_ceil(64) as usize * 64;
    let mut bufs = vec![0u8; stride * usize::from(device::QSIZE)];
    for b in bufs.chunks_mut(stride) {
        b[..HDR].copy_from_slice(&hdr);
        b[HDR..HDR + frame.len()].copy_from_slice(&frame);
    }
    let len = HDR + frame.len();
    let mut next = 0usize;
    let far = ns.packet_socket(true)?;
    let mut win = Window::new(o);
    let (mut done, mut done0, mut own0) = (0u64, 0u64, 0.0);
    while let Some(mark) = win.tick() {
        if mark {
            host::far_side_count(far.as_raw_fd())?;
            done0 = done;
            own0 = own_cpu();
        }
        for _ in 0..16 {
            let buf = &bufs[next * stride..next * stride + len];
            next = (next + 1) % usize::from(device::QSIZE);
            // SAFETY: writes from a live buffer, at most its length.
            let n = unsafe { libc::write(tap.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            if n > 0 {
                done += 1;
            }
        }
    }
    let t = win.elapsed();
    let seen = host::far_side_count(far.as_raw_fd())? as f64;
    Ok(Sample {
        pps: seen / t,
        bps: seen * frame.len() as f64 * 8.0 / t,
        sent_pps: (done - done0) as f64 / t,
        own_cpu: (own_cpu() - own0) / t,
        ..Sample::default()
    })
}

/// Tap→guest as plain reads on the tap fd.
fn raw_rx(o: &Options, ns: &Netns, w: &Workload, tap: &OwnedFd) -> Result<Sample> {
    let inj = Injector::start(ns, eth_frame(GUEST_MAC, OTHER_MAC, w.frame))?;
    // The same working set as the guest's rx buffers: QSIZE buffers, read into in turn.
    let stride = (HDR + w.frame).max(device::RX_BUF as usize);
    let mut bufs = vec![0u8; stride * usize::from(device::QSIZE)];
    let mut next = 0usize;
    let mut win = Window::new(o);
    let (mut frames, mut bytes, mut f0, mut b0, mut own0) = (0u64, 0u64, 0u64, 0u64, 0.0);
    while let Some(mark) = win.tick() {
        if mark {
            (f0, b0) = (frames, bytes);
            own0 = own_cpu();
        }
        let buf = &mut bufs[next * stride..(next + 1) * stride];
        next = (next + 1) % usize::from(device::QSIZE);
        // SAFETY: reads into our buffer, at most its length.
        let n = unsafe { libc::read(tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > HDR as isize {
            frames += 1;
            bytes += n as u64 - HDR as u64;
        } else if n < 0 {
            let mut pfd = libc::pollfd {
                fd: tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 10) };
        }
    }
    let t = win.elapsed();
    let own = (own_cpu() - own0) / t;
    let sent = inj.stop();
    Ok(Sample {
        pps: (frames - f0) as f64 / t,
        bps: (bytes - b0) as f64 * 8.0 / t,
        sent_pps: sent as f64 / win.start.elapsed().as_secs_f64(),
        own_cpu: own,
        ..Sample::default()
    })
}

fn delta(a: Option<[u64; 3]>, b: Option<[u64; 3]>) -> Option<[u64; 3]> {
    let (a, b) = (a?, b?);
    Some([
        b[0].wrapping_sub(a[0]),
        b[1].wrapping_sub(a[1]),
        b[2].wrapping_sub(a[2]),
    ])
}

fn run_netd(o: &Options, ns: &Netns, w: &Workload, dir: &Path) -> Result<Sample> {
    let sock = dir.join("netd.sock");
    let (netd, fe) = Netd::start(o, ns, &sock)?;
    let pid = netd.child.id();
    let mut dev = NetDevice::new(fe, if w.tso { w.frame } else { 2048 })?;
    if !dev.mrg_rxbuf {
        bail!("netd did not offer VIRTIO_NET_F_MRG_RXBUF");
    }
    let c0 = ns.tap_counters();
    let load = Load::now(Some(pid));
    let mut s = match w.dir {
        Dir::GuestToTap => netd_tx(o, ns, w, &mut dev, pid)?,
        Dir::TapToGuest => netd_rx(o, ns, w, &mut dev, pid)?,
    };
    s.foreign = load.foreign(Some(pid));
    s.tap = delta(c0, ns.tap_counters());
    drop(dev);
    s.netd_log = netd.finish()?;
    let _ = std::fs::remove_file(&sock);
    Ok(s)
}

fn run_raw(o: &Options, ns: &Netns, w: &Workload) -> Result<Sample> {
    let tap = ns.open_tap()?;
    let c0 = ns.tap_counters();
    let load = Load::now(None);
    let mut s = match w.dir {
        Dir::GuestToTap => raw_tx(o, ns, w, &tap)?,
        Dir::TapToGuest => raw_rx(o, ns, w, &tap)?,
    };
    s.foreign = load.foreign(None);
    s.tap = delta(c0, ns.tap_counters());
    Ok(s)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn sample_json(s: &Sample) -> serde_json::Value {
    json!({
        "pps": s.pps, "bps": s.bps, "sent_pps": s.sent_pps, "netd_cpu": s.netd_cpu,
        "own_cpu": s.own_cpu, "tap_rx_tx_txdrop": s.tap, "foreign_cpu": s.foreign,
        "netd_stats": s.netd_log.lines().rev().find(|l| l.contains("tx_frames=")),
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("vhost-net-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let o = Options::parse()?;
    let ns = Netns::enter()?;
    let dir = std::env::temp_dir().join(format!("vhost-net-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("work dir")?;
    eprintln!(
        "vhost-net-bench: namespace {}, tap {}, {} rounds of {:?} (+{:?} warm-up), netd --sandbox {}",
        ns.name, ns.tap, o.rounds, o.duration, o.warmup, o.sandbox
    );
    // results[workload][0 = netd, 1 = raw] = samples
    let mut discarded = Vec::new();
    let mut results: Vec<[Vec<Sample>; 2]> = WORKLOADS.iter().map(|_| [vec![], vec![]]).collect();
    for round in 0..o.rounds {
        for (i, w) in WORKLOADS.iter().enumerate() {
            if !o.only.is_empty() && !o.only.iter().any(|k| k == w.key) {
                continue;
            }
            // Alternate which goes first.
            let order = if round % 2 == 0 { [1, 0] } else { [0, 1] };
            for m in order {
                let mut tries = 0;
                let s = loop {
                    let s = if m == 0 {
                        run_netd(&o, &ns, w, &dir)
                    } else {
                        run_raw(&o, &ns, w)
                    }
                    .with_context(|| {
                        format!(
                            "round {round}, {} {:?}, {}",
                            w.name,
                            w.dir,
                            ["netd", "raw"][m]
                        )
                    })?;
                    eprintln!(
                        "round {round} {:>18} {:?} {:>4}: {:>10.0} pps {:>7.3} Gbit/s (sent {:.0}/s, netd cpu {:?}, own cpu {:.2}, other load {:.2} CPUs, tap {:?})",
                        w.name,
                        w.dir,
                        ["netd", "raw"][m],
                        s.pps,
                        s.bps / 1e9,
                        s.sent_pps,
                        s.netd_cpu.map(|c| (c * 100.0).round() / 100.0),
                        s.own_cpu,
                        s.foreign,
                        s.tap
                    );
                    if s.foreign < o.max_foreign || tries >= o.retries {
                        break s;
                    }
                    tries += 1;
                    eprintln!(
                        "  other load {:.2} CPUs: discarded, again in 3 s",
                        s.foreign
                    );
                    let mode = ["netd", "raw"][m];
                    discarded.push(json!({
                        "workload": w.key, "mode": mode, "round": round,
                        "sample": sample_json(&s),
                    }));
                    std::thread::sleep(Duration::from_secs(3));
                };
                results[i][m].push(s);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!("| workload | direction | netd | raw tap ceiling | netd / ceiling | netd CPU |");
    println!("|---|---|---:|---:|---:|---:|");
    let mut json_rows = Vec::new();
    for (i, w) in WORKLOADS.iter().enumerate() {
        let [netd, raw] = &results[i];
        if netd.is_empty() {
            continue;
        }
        let small = w.frame <= 64;
        let fig = |v: &[Sample]| {
            if small {
                median(v.iter().map(|s| s.pps).collect())
            } else {
                median(v.iter().map(|s| s.bps).collect())
            }
        };
        let (n, r) = (fig(netd), fig(raw));
        let show = |x: f64| {
            if small {
                format!("{:.0} kpps", x / 1e3)
            } else {
                format!("{:.2} Gbit/s", x / 1e9)
            }
        };
        let cpu = median(netd.iter().filter_map(|s| s.netd_cpu).collect());
        let dir = match w.dir {
            Dir::GuestToTap => "guest → tap",
            Dir::TapToGuest => "tap → guest",
        };
        println!(
            "| {} | {dir} | {} | {} | {:.2} | {:.0} % |",
            w.name,
            show(n),
            show(r),
            n / r,
            cpu * 100.0
        );
        json_rows.push(json!({
            "workload": w.name, "direction": dir, "frame_bytes": w.frame, "tso": w.tso,
            "netd": netd.iter().map(sample_json).collect::<Vec<_>>(),
            "raw": raw.iter().map(sample_json).collect::<Vec<_>>(),
        }));
    }
    if let Some(out) = &o.out {
        let doc = json!({
            "rounds": o.rounds, "duration_s": o.duration.as_secs_f64(),
            "warmup_s": o.warmup.as_secs_f64(), "sandbox": o.sandbox, "results": json_rows,
            "max_foreign": o.max_foreign, "discarded": discarded,
        });
        std::fs::write(out, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
