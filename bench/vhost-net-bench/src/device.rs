//! One vhost-user-net device as a guest's virtio-net driver plus its VMM would drive it: the
//! negotiation (rust-vmm's [`Frontend`]: features incl. `VIRTIO_NET_F_MRG_RXBUF` when offered,
//! the offloads a Linux guest acks, `CONFIG`), a memfd as guest memory, the rx queue (0) and the
//! tx queue (1) as split virtqueues, kicks and calls by eventfd.
//!
//! Each descriptor `i` of a queue owns a fixed buffer in guest memory (tx: the 12-byte
//! `virtio_net_hdr_mrg_rxbuf` followed by the frame, one descriptor, as Linux sends a linear
//! skb; rx: a [`RX_BUF`]-byte buffer). Used entries are checked against the descriptors in
//! flight; guest memory is only touched through `vm-memory`'s bounds-checked accessors.

use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vhost_blk_bench::guest::GuestMem;
use vhost_blk_bench::virtq::{write_desc, Descriptor, Driver, Layout, DESC_F_WRITE};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// The rx queue.
pub const RX: usize = 0;
/// The tx queue.
pub const TX: usize = 1;
/// Queue size (netd's maximum).
pub const QSIZE: u16 = 256;
/// Size of each rx buffer (what Linux posts for mergeable buffers at MTU 1500 is in this range).
pub const RX_BUF: u32 = 2048;
/// `struct virtio_net_hdr_mrg_rxbuf`.
pub const HDR: usize = 12;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// The features this driver acks when offered: those of a Linux guest with the offloads on
/// (no UFO, which Linux no longer sends).
const WANTED: [u32; 11] = [
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
];

struct Queue {
    drv: Driver,
    kick: EventFd,
    call: EventFd,
    in_flight: Vec<bool>,
}

/// A connected, configured device.
pub struct NetDevice {
    _fe: Frontend,
    mem: GuestMem,
    q: [Queue; 2],
    /// Where tx buffer `i` starts (`tx_base + i * tx_stride`).
    tx_base: u64,
    tx_stride: u64,
    rx_base: u64,
    /// Whether mergeable rx buffers were negotiated.
    pub mrg_rxbuf: bool,
    /// Buffers of the frame being received that are still to come (mergeable buffers).
    rx_rest: u16,
}

fn efd() -> Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK).context("eventfd")
}

impl NetDevice {
    /// Negotiates over `fe`, sets up guest memory with tx buffers of `tx_frame_max` bytes
    /// (after the header) and both queues, and posts every rx buffer.
    pub fn new(mut fe: Frontend, tx_frame_max: usize) -> Result<NetDevice> {
        let v = |w: &'static str| move |e: vhost::Error| anyhow!("vhost-user {w}: {e}");
        fe.set_owner().map_err(v("SET_OWNER"))?;
        let offered = fe.get_features().map_err(v("GET_FEATURES"))?;
        let proto = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut features = bit(VIRTIO_F_VERSION_1) | proto;
        if offered & features != features {
            bail!("features {offered:#x} lack VERSION_1 or PROTOCOL_FEATURES");
        }
        for b in WANTED {
            features |= offered & bit(b);
        }
        let pf = fe
            .get_protocol_features()
            .map_err(v("GET_PROTOCOL_FEATURES"))?;
        let want = pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK);
        fe.set_protocol_features(want)
            .map_err(v("SET_PROTOCOL_FEATURES"))?;
        if want.contains(VhostUserProtocolFeatures::CONFIG) {
            let (_, c) = fe
                .get_config(0, 10, VhostUserConfigFlags::WRITABLE, &[0u8; 10])
                .map_err(v("GET_CONFIG"))?;
            if c.get(6).is_some_and(|s| s & 1 == 0) {
                bail!("link is down");
            }
        }
        fe.set_features(features).map_err(v("SET_FEATURES"))?;

        let page = |n: u64| n.div_ceil(4096) * 4096;
        let stride = page(Layout::at(0, QSIZE).map_err(|e| anyhow!("{e}"))?.end());
        let layouts = [
            Layout::at(0, QSIZE).map_err(|e| anyhow!("{e}"))?,
            Layout::at(stride, QSIZE).map_err(|e| anyhow!("{e}"))?,
        ];
        let tx_stride = ((HDR + tx_frame_max) as u64).div_ceil(64) * 64;
        let tx_base = 2 * stride;
        let rx_base = page(tx_base + tx_stride * u64::from(QSIZE));
        let size = rx_base + u64::from(RX_BUF) * u64::from(QSIZE);
        let mem = GuestMem::new(usize::try_from(size)?).map_err(|e| anyhow!("{e}"))?;
        fe.set_mem_table(&[mem.region()])
            .map_err(v("SET_MEM_TABLE"))?;
        let mut qs = Vec::new();
        for (i, layout) in layouts.into_iter().enumerate() {
            let (kick, call) = (efd()?, efd()?);
            fe.set_vring_num(i, QSIZE).map_err(v("SET_VRING_NUM"))?;
            fe.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: mem.user_addr(layout.desc.0),
                    used_ring_addr: mem.user_addr(layout.used.0),
                    avail_ring_addr: mem.user_addr(layout.avail.0),
                    log_addr: None,
                },
            )
            .map_err(v("SET_VRING_ADDR"))?;
            fe.set_vring_base(i, 0).map_err(v("SET_VRING_BASE"))?;
            fe.set_vring_call(i, &call).map_err(v("SET_VRING_CALL"))?;
            fe.set_vring_kick(i, &kick).map_err(v("SET_VRING_KICK"))?;
            fe.set_vring_enable(i, true)
                .map_err(v("SET_VRING_ENABLE"))?;
            qs.push(Queue {
                drv: Driver::new(layout, false),
                kick,
                call,
                in_flight: vec![false; usize::from(QSIZE)],
            });
        }
        let Ok(q) = <[Queue; 2]>::try_from(qs) else {
            bail!("two queues expected");
        };
        let mut d = NetDevice {
            _fe: fe,
            mem,
            q,
            tx_base,
            tx_stride,
            rx_base,
            mrg_rxbuf: features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
            rx_rest: 0,
        };
        let rx_desc = d.q[RX].drv.layout().desc;
        for i in 0..QSIZE {
            let desc = Descriptor {
                addr: d.rx_base + u64::from(i) * u64::from(RX_BUF),
                len: RX_BUF,
                flags: DESC_F_WRITE,
                next: 0,
            };
            write_desc(d.mem.mem(), rx_desc, i, desc).map_err(|e| anyhow!("{e}"))?;
            d.q[RX]
                .drv
                .add(d.mem.mem(), i)
                .map_err(|e| anyhow!("{e}"))?;
            d.q[RX].in_flight[usize::from(i)] = true;
        }
        d.flush(RX)?;
        Ok(d)
    }

    /// Writes `hdr` + `frame` into every tx buffer and points descriptor `i` at buffer `i`.
    pub fn fill_tx(&mut self, hdr: &[u8; HDR], frame: &[u8]) -> Result<()> {
        if (HDR + frame.len()) as u64 > self.tx_stride {
            bail!("frame of {} bytes larger than the tx buffers", frame.len());
        }
        let mut full = hdr.to_vec();
        full.extend_from_slice(frame);
        let table = self.q[TX].drv.layout().desc;
        for i in 0..QSIZE {
            let at = self.tx_base + u64::from(i) * self.tx_stride;
            self.mem
                .mem()
                .write_slice(&full, GuestAddress(at))
                .map_err(|e| anyhow!("guest memory: {e}"))?;
            let desc = Descriptor {
                addr: at,
                len: u32::try_from(full.len())?,
                flags: 0,
                next: 0,
            };
            write_desc(self.mem.mem(), table, i, desc).map_err(|e| anyhow!("{e}"))?;
        }
        Ok(())
    }

    /// Publishes what was added to queue `q` and kicks if the device wants it.
    fn flush(&mut self, q: usize) -> Result<()> {
        let q = &mut self.q[q];
        if q.drv.publish(self.mem.mem()).map_err(|e| anyhow!("{e}"))? {
            q.kick.write(1).context("kick")?;
        }
        Ok(())
    }

    /// Takes the used entries of queue `q`, returns their `(id, len)`, each checked.
    fn reap(&mut self, q: usize, out: &mut Vec<(u16, u32)>) -> Result<()> {
        out.clear();
        let mem = self.mem.mem();
        let queue = &mut self.q[q];
        while let Some((id, len)) = queue.drv.next_used(mem).map_err(|e| anyhow!("{e}"))? {
            let slot = u16::try_from(id)
                .ok()
                .filter(|&s| queue.in_flight.get(usize::from(s)) == Some(&true))
                .ok_or_else(|| anyhow!("queue {q}: used id {id} is not in flight"))?;
            queue.in_flight[usize::from(slot)] = false;
            out.push((slot, len));
        }
        Ok(())
    }

    /// Puts tx buffers that are not in flight on the ring (all at once, then one publish and
    /// at most one kick: a driver with a full socket queue, `xmit_more`); returns how many.
    pub fn tx_post(&mut self) -> Result<u32> {
        let mut n = 0;
        for i in 0..QSIZE {
            if !self.q[TX].in_flight[usize::from(i)] {
                self.q[TX]
                    .drv
                    .add(self.mem.mem(), i)
                    .map_err(|e| anyhow!("{e}"))?;
                self.q[TX].in_flight[usize::from(i)] = true;
                n += 1;
            }
        }
        if n > 0 {
            self.flush(TX)?;
        }
        Ok(n)
    }

    /// Tx buffers not in flight.
    pub fn tx_free(&self) -> usize {
        self.q[TX].in_flight.iter().filter(|b| !**b).count()
    }

    /// Completed tx frames since the last call.
    pub fn tx_complete(&mut self, scratch: &mut Vec<(u16, u32)>) -> Result<u64> {
        self.reap(TX, scratch)?;
        Ok(scratch.len() as u64)
    }

    /// Received frames and their bytes (without the vnet header) since the last call; the
    /// buffers go straight back on the ring.
    pub fn rx_complete(&mut self, scratch: &mut Vec<(u16, u32)>) -> Result<(u64, u64)> {
        self.reap(RX, scratch)?;
        let (mut frames, mut bytes) = (0u64, 0u64);
        for &(slot, len) in scratch.iter() {
            let at = self.rx_base + u64::from(slot) * u64::from(RX_BUF);
            if len as usize > RX_BUF as usize {
                bail!("rx used length {len} beyond its {RX_BUF}-byte buffer");
            }
            if self.rx_rest == 0 {
                // First buffer of a frame: its header says how many buffers the frame has.
                let mut h = [0u8; HDR];
                if (len as usize) < HDR {
                    bail!("rx used length {len} shorter than the header");
                }
                self.mem
                    .mem()
                    .read_slice(&mut h, GuestAddress(at))
                    .map_err(|e| anyhow!("guest memory: {e}"))?;
                let nb = if self.mrg_rxbuf {
                    u16::from_le_bytes([h[10], h[11]]).max(1)
                } else {
                    1
                };
                self.rx_rest = nb - 1;
                frames += 1;
                bytes += u64::from(len) - HDR as u64;
            } else {
                self.rx_rest -= 1;
                bytes += u64::from(len);
            }
            self.q[RX]
                .drv
                .add(self.mem.mem(), slot)
                .map_err(|e| anyhow!("{e}"))?;
            self.q[RX].in_flight[usize::from(slot)] = true;
        }
        if !scratch.is_empty() {
            self.flush(RX)?;
        }
        Ok((frames, bytes))
    }

    /// Sleeps until queue `q`'s call eventfd fires or `timeout` passes (the guest's interrupt);
    /// returns at once if a used entry is already there.
    pub fn wait(&mut self, q: usize, timeout: Duration) -> Result<()> {
        let queue = &self.q[q];
        if queue
            .drv
            .pending(self.mem.mem())
            .map_err(|e| anyhow!("{e}"))?
        {
            return Ok(());
        }
        let mut pfd = libc::pollfd {
            fd: queue.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one live pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            match queue.call.read() {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(anyhow!("read(call): {e}")),
            }
        }
        Ok(())
    }
}
