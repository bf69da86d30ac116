//! The vhost-user-net back end on rust-vmm's `vhost-user-backend` framework.
//!
//! N queue pairs (pair i: rx = queue 2i, tx = queue 2i+1), each on its own tap queue fd (one fd
//! of a multiqueue tap per pair) and served by its own epoll worker thread, which also watches its
//! tap fd (edge-triggered, event [`tap_event`]). A frame the guest sends on pair i goes out on tap
//! queue i; the kernel spreads incoming frames over the tap's attached queues and each arrives on
//! the pair of its queue.
//!
//! * **enable**: only pairs the front end enabled (`SET_VRING_ENABLE`) are served. On a
//!   multiqueue tap, a pair found disabled has its tap queue detached (`TUNSETQUEUE`, so the
//!   kernel steers its frames to the queues that are served rather than queueing them where nobody
//!   reads); once enabled again (the framework then runs the pair's rx handler) it is attached
//!   and served.
//!
//! * **tx**: a kick makes the worker pop every available chain, check it (readable descriptors
//!   only, at most [`MAX_CHAIN_DESCS`] of them, at most [`MAX_FRAME`] bytes after the vnet header,
//!   every range inside guest memory) and `writev` it to the tap straight from guest memory; a
//!   bad chain is returned with length 0 and counted, never written.
//! * **rx**: a tap edge or an rx kick makes the worker read frames (vnet header first) into one
//!   buffer and copy each into guest buffers: with `VIRTIO_NET_F_MRG_RXBUF` across as many chains
//!   as it takes (`num_buffers` in the header), otherwise into one chain (a frame that does not fit
//!   is dropped and counted). **Backpressure**: when the guest has posted too few buffers the frame
//!   stays in netd's buffer, the popped chains are given back (`next_avail` rewound) and the tap is
//!   not read again until the guest kicks the rx queue; the tap queues (and beyond its
//!   `txqueuelen`, the kernel drops and counts) meanwhile. Because the tap is watched
//!   edge-triggered, unread frames wake the worker only when a new frame arrives: no busy loop.
//! * **link**: with the link down ([`NetBackend::set_link`], the monitor's `set_link`) every
//!   frame is dropped both ways: transmit chains are returned unsent, frames from the tap are
//!   read and discarded, nothing reaches the guest's buffers; the config space's status bit
//!   follows.
//! * **features**: `VERSION_1`, MAC and link status in the config space, mergeable rx buffers,
//!   checksum and TSO/UFO offloads both ways; the guest's receive offloads are mapped to
//!   `TUNSETOFFLOAD` and the header size (12 bytes with `VERSION_1` or mergeable buffers, else 10)
//!   to `TUNSETVNETHDRSZ` when the front end sets the features.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::tap::{self, Tap};

/// The receive queue's index within a pair (and its event number in the pair's thread).
pub const RX: usize = 0;
/// The transmit queue's index within a pair.
pub const TX: usize = 1;
/// Virtqueues of one pair.
pub const NUM_QUEUES: usize = 2;
/// Most queue pairs (one tap queue fd each).
pub const MAX_PAIRS: usize = crate::tap::MAX_TAP_QUEUES;
/// Queue size offered to the front end.
pub const QUEUE_SIZE: usize = 256;

/// The epoll event number of a pair's tap fd in its thread, for a back end with `pairs` pairs
/// (the framework reserves 0..=virtqueues).
pub fn tap_event(pairs: usize) -> u16 {
    u16::try_from(2 * pairs + 1).unwrap_or(u16::MAX)
}
/// Largest frame after the vnet header: a 64 KiB GSO packet plus an Ethernet and a VLAN header.
pub const MAX_FRAME: usize = 65535 + 14 + 4;
/// The vnet header with `VERSION_1` or mergeable buffers (`struct virtio_net_hdr_mrg_rxbuf`).
pub const HDR_LEN: usize = 12;
/// The legacy vnet header without mergeable buffers.
pub const LEGACY_HDR_LEN: usize = 10;
/// Most descriptors netd walks in one chain.
pub const MAX_CHAIN_DESCS: usize = QUEUE_SIZE;

/// Guest memory as the framework hands it over.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// What happened on the data path, for the log, the monitor (`QueryStats`) and the tests.
/// Bytes are Ethernet frame bytes, without the vnet header.
#[derive(Debug, Default)]
pub struct Stats {
    /// Frames written to the tap.
    pub tx_frames: AtomicU64,
    /// Guest chains not written to the tap (bad descriptors, oversize, tap errors, link down).
    pub tx_dropped: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frames read from the tap and dropped (no fitting buffer, bad descriptors, link down).
    pub rx_dropped: AtomicU64,
    /// Times rx stopped reading the tap because the guest had posted too few buffers.
    pub rx_stalls: AtomicU64,
    /// Bytes of the frames written to the tap.
    pub tx_bytes: AtomicU64,
    /// Bytes of the frames delivered to the guest.
    pub rx_bytes: AtomicU64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        write!(
            f,
            "tx_frames={} tx_dropped={} rx_frames={} rx_dropped={} rx_stalls={} tx_bytes={} \
             rx_bytes={}",
            g(&self.tx_frames),
            g(&self.tx_dropped),
            g(&self.rx_frames),
            g(&self.rx_dropped),
            g(&self.rx_stalls),
            g(&self.tx_bytes),
            g(&self.rx_bytes)
        )
    }
}

/// A frame read from the tap and not yet delivered.
struct RxState {
    buf: Vec<u8>,
    /// Bytes of `buf` holding the pending frame (0: none).
    len: usize,
}

/// What one rx delivery attempt did.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    /// In the guest's buffers.
    Delivered,
    /// Dropped (chains returned with length 0 where some were taken).
    Dropped,
    /// Too few buffers: nothing taken, frame kept.
    NoBuffers,
}

/// One queue pair's tap queue and state.
struct Pair {
    tap: Tap,
    rx: Mutex<RxState>,
    /// The tap queue is attached (multiqueue taps only detach).
    attached: AtomicBool,
    /// Frames this pair delivered to the guest / wrote to the tap.
    rx_frames: AtomicU64,
    tx_frames: AtomicU64,
}

/// The virtio-net back end for one tap (one queue fd per pair).
pub struct NetBackend {
    pairs: Vec<Pair>,
    multiqueue: bool,
    mac: [u8; 6],
    link_up: AtomicBool,
    hdr_len: AtomicUsize,
    mrg_rxbuf: AtomicBool,
    mem: Mutex<Option<GuestMem>>,
    /// Counters.
    pub stats: Arc<Stats>,
}

/// The `TUN_F_*` offloads matching the receive offloads a guest acked.
pub fn tap_offloads(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let mut f = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        f |= tap::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            f |= tap::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            f |= tap::TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN) && f & (tap::TUN_F_TSO4 | tap::TUN_F_TSO6) != 0 {
            f |= tap::TUN_F_TSO_ECN;
        }
        if has(VIRTIO_NET_F_GUEST_UFO) {
            f |= tap::TUN_F_UFO;
        }
    }
    f
}

/// The vnet header length for the acked features.
pub fn hdr_len(acked: u64) -> usize {
    if acked & (1u64 << VIRTIO_F_VERSION_1) != 0 || acked & (1u64 << VIRTIO_NET_F_MRG_RXBUF) != 0 {
        HDR_LEN
    } else {
        LEGACY_HDR_LEN
    }
}

/// A guest buffer taken from the rx queue: its head and its writable ranges.
struct RxChain {
    head: u16,
    ranges: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

/// Pops one rx chain and checks it: `Ok(None)` when the ring has none, `Err(head)` when it is
/// bad (a readable descriptor, too many descriptors, or no room at all).
fn pop_rx_chain(queue: &mut Queue, mem: &GuestMemoryMmap) -> Option<Result<RxChain, u16>> {
    let chain = queue.pop_descriptor_chain(mem)?;
    let head = chain.head_index();
    let mut ranges = Vec::new();
    let mut capacity = 0usize;
    for d in chain {
        if !d.is_write_only() || ranges.len() >= MAX_CHAIN_DESCS {
            return Some(Err(head));
        }
        let len = d.len() as usize;
        if len == 0 {
            continue;
        }
        ranges.push((d.addr(), len));
        capacity = capacity.saturating_add(len);
    }
    if capacity == 0 {
        return Some(Err(head));
    }
    Some(Ok(RxChain {
        head,
        ranges,
        capacity,
    }))
}

/// Copies `frame` into `chains` in order; returns each chain's used length, or `None` when a
/// range is outside guest memory.
fn copy_into(mem: &GuestMemoryMmap, frame: &[u8], chains: &[RxChain]) -> Option<Vec<u32>> {
    let mut off = 0usize;
    let mut used = Vec::with_capacity(chains.len());
    for c in chains {
        let mut n_chain = 0usize;
        for &(addr, len) in &c.ranges {
            if off >= frame.len() {
                break;
            }
            let n = len.min(frame.len() - off);
            mem.write_slice(&frame[off..off + n], addr).ok()?;
            off += n;
            n_chain += n;
        }
        used.push(u32::try_from(n_chain).ok()?);
    }
    Some(used)
}

impl NetBackend {
    /// A back end on `tap` (one queue pair) with the MAC address `mac`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> NetBackend {
        Self::with_queues(vec![tap], mac)
    }

    /// A back end with one queue pair per tap queue fd in `taps` (1 to [`MAX_PAIRS`]; more than
    /// one must be queues of one multiqueue tap). An empty list gets nothing to serve: callers
    /// check the count first (see [`crate::worker`]).
    pub fn with_queues(taps: Vec<Tap>, mac: [u8; 6]) -> NetBackend {
        let multiqueue = taps.len() > 1;
        NetBackend {
            pairs: taps
                .into_iter()
                .map(|tap| Pair {
                    tap,
                    rx: Mutex::new(RxState {
                        buf: vec![0u8; HDR_LEN + MAX_FRAME],
                        len: 0,
                    }),
                    attached: AtomicBool::new(true),
                    rx_frames: AtomicU64::new(0),
                    tx_frames: AtomicU64::new(0),
                })
                .collect(),
            multiqueue,
            mac,
            link_up: AtomicBool::new(true),
            hdr_len: AtomicUsize::new(HDR_LEN),
            mrg_rxbuf: AtomicBool::new(false),
            mem: Mutex::new(None),
            stats: Arc::new(Stats::default()),
        }
    }

    /// Queue pairs.
    pub fn pairs(&self) -> usize {
        self.pairs.len()
    }

    /// The tap fd of pair 0, for the epoll handler (one pair).
    pub fn tap_fd(&self) -> std::os::fd::RawFd {
        self.tap_fds().first().copied().unwrap_or(-1)
    }

    /// Each pair's tap fd, in pair order: pair i's is watched by epoll handler i with
    /// [`tap_event`].
    pub fn tap_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.pairs.iter().map(|p| p.tap.raw_fd()).collect()
    }

    /// Each pair's (rx frames, tx frames), in pair order.
    pub fn pair_counters(&self) -> Vec<(u64, u64)> {
        self.pairs
            .iter()
            .map(|p| {
                (
                    p.rx_frames.load(Ordering::Relaxed),
                    p.tx_frames.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// The counters for the log: the totals, and per pair with more than one.
    pub fn stats_line(&self) -> String {
        let mut s = self.stats.to_string();
        if self.pairs.len() > 1 {
            for (i, (rx, tx)) in self.pair_counters().into_iter().enumerate() {
                s.push_str(&format!(" pair{i}_rx={rx} pair{i}_tx={tx}"));
            }
        }
        s
    }

    /// Makes the tap queue of pair `i` attached exactly when the pair is `enabled` (multiqueue
    /// taps only; a single-queue tap cannot detach and is left alone).
    fn follow_enable(&self, i: usize, enabled: bool) {
        let Some(p) = self.pairs.get(i) else {
            return;
        };
        if !self.multiqueue || p.attached.load(Ordering::Relaxed) == enabled {
            return;
        }
        match p.tap.set_queue_attached(enabled) {
            Ok(()) => {
                p.attached.store(enabled, Ordering::Relaxed);
                log::debug!(
                    "pair {i}: tap queue {}",
                    if enabled { "attached" } else { "detached" }
                );
            }
            Err(e) => log::warn!("pair {i}: {e}"),
        }
    }

    /// Sets the link state (`set_link`): down drops every frame both ways from the next one the
    /// worker looks at (see the module docs); the config space's status bit follows.
    pub fn set_link(&self, up: bool) {
        self.link_up.store(up, Ordering::Release);
    }

    /// The link state [`NetBackend::set_link`] set (up at start).
    pub fn link_up(&self) -> bool {
        self.link_up.load(Ordering::Acquire)
    }

    /// The virtio-net config space (virtio 1.2, 5.1.4): MAC, status, max_virtqueue_pairs.
    pub fn config_space(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac);
        let status: u16 = if self.link_up.load(Ordering::Relaxed) {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        let pairs = u16::try_from(self.pairs.len()).unwrap_or(1);
        c[8..10].copy_from_slice(&pairs.to_le_bytes());
        c
    }

    fn memory(&self) -> Option<GuestMem> {
        self.mem.lock().ok().and_then(|m| m.clone())
    }

    /// Writes every available tx chain of pair `p` to its tap queue.
    fn process_tx(&self, p: &Pair, vring: &VringRwLock) {
        let Some(mem) = self.memory() else {
            return;
        };
        let mem = mem.memory();
        let hdr_len = self.hdr_len.load(Ordering::Relaxed);
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return;
        }
        let mut used_any = false;
        while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            if !self.link_up() {
                // Link down: the frame is not sent; its buffers go back to the guest.
                self.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = state.add_used(head, 0) {
                    log::warn!("tx: add_used: {e}");
                    break;
                }
                used_any = true;
                continue;
            }
            let mut iov: Vec<libc::iovec> = Vec::new();
            let mut total = 0usize;
            let mut good = true;
            for d in chain {
                let len = d.len() as usize;
                if d.is_write_only() || iov.len() >= MAX_CHAIN_DESCS {
                    good = false;
                    break;
                }
                if len == 0 {
                    continue;
                }
                total = total.saturating_add(len);
                if total > hdr_len + MAX_FRAME {
                    good = false;
                    break;
                }
                match mem.get_slice(d.addr(), len) {
                    Ok(s) => iov.push(libc::iovec {
                        iov_base: s.ptr_guard_mut().as_ptr().cast(),
                        iov_len: len,
                    }),
                    Err(_) => {
                        good = false;
                        break;
                    }
                }
            }
            if good && total > hdr_len {
                // SAFETY: every iovec is a range get_slice checked inside guest memory, which
                // stays mapped while `mem` (the guard) lives, i.e. through this call.
                match unsafe { p.tap.writev(&iov) } {
                    Ok(_) => {
                        let bytes = (total - hdr_len) as u64;
                        self.stats.tx_bytes.fetch_add(bytes, Ordering::Relaxed);
                        p.tx_frames.fetch_add(1, Ordering::Relaxed);
                        self.stats.tx_frames.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        log::debug!("tx: tap write: {e}");
                        self.stats.tx_dropped.fetch_add(1, Ordering::Relaxed)
                    }
                };
            } else {
                self.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = state.add_used(head, 0) {
                log::warn!("tx: add_used: {e}");
                break;
            }
            used_any = true;
        }
        if used_any {
            signal(&mut state);
        }
    }

    /// Moves frames from the tap into the guest's rx buffers until the tap is empty or the guest
    /// has too few buffers (backpressure: the tap is then left unread).
    fn process_rx(&self, p: &Pair, vring: &VringRwLock) {
        if !self.link_up() {
            self.drain_rx(p);
            return;
        }
        let Some(mem) = self.memory() else {
            return;
        };
        let mem = mem.memory();
        let Ok(mut rx) = p.rx.lock() else {
            return;
        };
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return;
        }
        let hdr_len = self.hdr_len.load(Ordering::Relaxed);
        let mrg = self.mrg_rxbuf.load(Ordering::Relaxed);
        let mut used_any = false;
        loop {
            if rx.len == 0 {
                match p.tap.read_frame(&mut rx.buf) {
                    Ok(Some(n)) if n > hdr_len => rx.len = n,
                    Ok(Some(_)) => {
                        self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        log::warn!("rx: tap read: {e}");
                        break;
                    }
                }
            }
            let len = rx.len;
            let outcome = deliver(&mut state, &mem, &mut rx.buf[..len], hdr_len, mrg);
            match outcome {
                Delivery::Delivered => {
                    let bytes = len.saturating_sub(hdr_len) as u64;
                    self.stats.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
                    self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                    p.rx_frames.fetch_add(1, Ordering::Relaxed);
                }
                Delivery::Dropped => {
                    self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Delivery::NoBuffers => {
                    self.stats.rx_stalls.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            rx.len = 0;
            used_any = true;
        }
        if used_any {
            signal(&mut state);
        }
    }

    /// Link down: discards the frame held for the guest and every frame queued on the tap
    /// (each counted in `rx_dropped`), so none is delivered late when the link comes back and
    /// the edge-triggered tap wakes the worker again for the next one.
    fn drain_rx(&self, p: &Pair) {
        if !p.attached.load(Ordering::Relaxed) {
            // A detached queue cannot be read (and holds nothing).
            return;
        }
        let Ok(mut rx) = p.rx.lock() else {
            return;
        };
        if rx.len != 0 {
            rx.len = 0;
            self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
        }
        loop {
            match p.tap.read_frame(&mut rx.buf) {
                Ok(Some(_)) => {
                    self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Ok(None) => break,
                Err(e) => {
                    log::warn!("rx: tap read: {e}");
                    break;
                }
            }
        }
    }
}

/// Puts `frame` (vnet header first) into the guest's rx buffers.
fn deliver(
    state: &mut VringState<GuestMem>,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
    hdr_len: usize,
    mrg: bool,
) -> Delivery {
    let queue = state.get_queue_mut();
    let start = queue.next_avail();
    let max_chains = if mrg { usize::from(queue.size()) } else { 1 };
    let mut chains: Vec<RxChain> = Vec::new();
    let mut capacity = 0usize;
    let mut bad: Option<u16> = None;
    while capacity < frame.len() && chains.len() < max_chains {
        match pop_rx_chain(queue, mem) {
            None => {
                // Too few buffers: give back what was taken, keep the frame.
                queue.set_next_avail(start);
                return Delivery::NoBuffers;
            }
            Some(Err(head)) => {
                bad = Some(head);
                break;
            }
            Some(Ok(c)) => {
                capacity = capacity.saturating_add(c.capacity);
                chains.push(c);
            }
        }
    }
    let mut give_back = |heads: &mut dyn Iterator<Item = u16>| {
        for h in heads {
            if let Err(e) = state.add_used(h, 0) {
                log::warn!("rx: add_used: {e}");
            }
        }
    };
    if bad.is_some() || capacity < frame.len() {
        give_back(&mut chains.iter().map(|c| c.head).chain(bad));
        return Delivery::Dropped;
    }
    if hdr_len == HDR_LEN {
        // num_buffers (1 without mergeable buffers, as VERSION_1 requires).
        let n = u16::try_from(chains.len()).unwrap_or(u16::MAX);
        // (A frame read under a 10-byte header and delivered after the guest renegotiated a
        // 12-byte one may be shorter: nothing to fill then.)
        if let Some(num_buffers) = frame.get_mut(10..12) {
            num_buffers.copy_from_slice(&n.to_le_bytes());
        }
    }
    match copy_into(mem, frame, &chains) {
        Some(used) => {
            for (c, n) in chains.iter().zip(used) {
                if let Err(e) = state.add_used(c.head, n) {
                    log::warn!("rx: add_used: {e}");
                }
            }
            Delivery::Delivered
        }
        None => {
            give_back(&mut chains.iter().map(|c| c.head));
            Delivery::Dropped
        }
    }
}

fn signal(state: &mut VringState<GuestMem>) {
    if state.needs_notification().unwrap_or(true) {
        if let Err(e) = state.signal_used_queue() {
            log::warn!("signalling the used queue: {e}");
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES * self.pairs.len()
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
        ]
        .iter()
        .fold(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), |f, b| {
            f | 1u64 << b
        })
    }

    fn acked_features(&self, features: u64) {
        let len = hdr_len(features);
        self.hdr_len.store(len, Ordering::Relaxed);
        self.mrg_rxbuf.store(
            features & (1u64 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            Ordering::Relaxed,
        );
        let off = tap_offloads(features);
        // Every queue fd of the tap gets the header size and offloads (the kernel keeps both
        // per interface, but a queue detached now would miss a later change otherwise).
        for p in &self.pairs {
            if let Err(e) = p.tap.set_vnet_hdr_size(len) {
                log::error!("{e}");
            }
            if let Err(e) = p.tap.set_offload(off) {
                // Kernels that no longer take UFO refuse the whole set: retry without it.
                log::warn!("{e}; retrying without UFO");
                if let Err(e) = p.tap.set_offload(off & !tap::TUN_F_UFO) {
                    log::error!("{e}");
                }
            }
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let f = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK;
        if self.pairs.len() > 1 {
            // GET_QUEUE_NUM: the front end learns how many queues (2 per pair) netd serves.
            f | VhostUserProtocolFeatures::MQ
        } else {
            f
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // VIRTIO_RING_F_EVENT_IDX is not offered.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config_space();
        let start = (offset as usize).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        let mut v = c[start..end].to_vec();
        v.resize(size as usize, 0);
        v
    }

    fn update_memory(&self, mem: GuestMem) -> std::io::Result<()> {
        let mut m = self
            .mem
            .lock()
            .map_err(|_| std::io::Error::other("memory lock poisoned"))?;
        *m = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One thread per pair: pair i's rx and tx are queues 2i and 2i+1.
        (0..self.pairs.len().max(1))
            .map(|i| 0b11u64 << (NUM_QUEUES * i))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Lets the framework stop the worker thread when the front end goes (without it the
        // daemon's drop waits for the thread forever).
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                log::warn!("exit eventfd: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        // Thread i serves pair i; its vrings are that pair's rx and tx.
        let (Some(rx), Some(tx)) = (vrings.get(RX), vrings.get(TX)) else {
            return Err(std::io::Error::other("fewer vrings than queues"));
        };
        let Some(p) = self.pairs.get(thread_id) else {
            return Err(std::io::Error::other("event for an unknown queue pair"));
        };
        let enabled = rx.get_ref().is_enabled();
        self.follow_enable(thread_id, enabled);
        let tap_ev = tap_event(self.pairs.len());
        match device_event {
            e if e == RX as u16 || e == tap_ev => {
                if e == tap_ev && !evset.contains(EventSet::IN) {
                    log::warn!("tap: unexpected events {evset:?}");
                }
                if enabled {
                    self.process_rx(p, rx);
                }
            }
            e if e == TX as u16 => self.process_tx(p, tx),
            _ => return Err(std::io::Error::other("event for an unknown queue")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_length_follows_version_1_and_mergeable_buffers() {
        assert_eq!(hdr_len(0), LEGACY_HDR_LEN);
        assert_eq!(hdr_len(1 << VIRTIO_F_VERSION_1), HDR_LEN);
        assert_eq!(hdr_len(1 << VIRTIO_NET_F_MRG_RXBUF), HDR_LEN);
    }

    #[test]
    fn offloads_need_guest_checksum() {
        let tso = 1u64 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO6;
        assert_eq!(tap_offloads(tso), 0);
        let all = tso
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_GUEST_ECN
            | 1 << VIRTIO_NET_F_GUEST_UFO;
        assert_eq!(
            tap_offloads(all),
            tap::TUN_F_CSUM
                | tap::TUN_F_TSO4
                | tap::TUN_F_TSO6
                | tap::TUN_F_TSO_ECN
                | tap::TUN_F_UFO
        );
        assert_eq!(
            tap_offloads(1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_ECN),
            tap::TUN_F_CSUM
        );
    }

    #[test]
    fn copy_refuses_ranges_outside_memory() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("guest memory");
        let frame = [7u8; 100];
        let ok = [RxChain {
            head: 0,
            ranges: vec![(GuestAddress(0x10), 60), (GuestAddress(0x100), 60)],
            capacity: 120,
        }];
        assert_eq!(copy_into(&mem, &frame, &ok), Some(vec![100]));
        let bad = [RxChain {
            head: 0,
            ranges: vec![(GuestAddress(0xfc0), 200)],
            capacity: 200,
        }];
        assert_eq!(copy_into(&mem, &frame, &bad), None);
    }
}
