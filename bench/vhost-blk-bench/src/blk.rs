//! One vhost-user-blk device seen from the front end: negotiation, its queues, and request
//! slots.
//!
//! The negotiation is what a VMM does for a virtio-blk guest device (QEMU's `vhost-user-blk`
//! order): `SET_OWNER`, `GET_FEATURES`, `GET_PROTOCOL_FEATURES`, `SET_PROTOCOL_FEATURES`,
//! `GET_QUEUE_NUM`, `GET_CONFIG` (capacity, block size), then `SET_FEATURES` (always
//! `VIRTIO_F_VERSION_1` and `VHOST_USER_F_PROTOCOL_FEATURES`), `SET_MEM_TABLE` with the memfd, and
//! for each queue `SET_VRING_NUM`, `SET_VRING_ADDR`, `SET_VRING_BASE`, `SET_VRING_CALL`,
//! `SET_VRING_KICK`, `SET_VRING_ENABLE`.
//!
//! Guest memory holds, from address 0: the queues (each part of each on its own page), then one
//! 128-byte control block per request slot (an indirect table of up to three descriptors at +0,
//! the 16-byte request header at +64, the status byte at +96), then one data buffer per slot.
//! Slot `s` belongs to queue `s % queues` as its local slot `l = s / queues`; its request is
//! either one descriptor `l` pointing at the slot's indirect table
//! (`VIRTIO_RING_F_INDIRECT_DESC`, what Linux's virtio ring uses for every multi-buffer request)
//! or the direct chain `3l, 3l+1, 3l+2`: header (device-readable), data (device-writable for
//! reads), status (device-writable).

use std::os::fd::AsRawFd;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::guest::GuestMem;
use crate::virtq::{
    write_desc, Descriptor, Driver, Layout, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
};
use crate::{Error, Result};

/// Bytes per slot control block.
const CTRL_SIZE: u64 = 128;
/// Header offset inside a control block.
const HDR_OFF: u64 = 64;
/// Status byte offset inside a control block.
const STATUS_OFF: u64 = 96;
/// Status value written before submission, so a request completed without a status shows.
pub const STATUS_UNSET: u8 = 0xff;
/// `VIRTIO_BLK_S_OK`.
pub const S_OK: u8 = 0;

/// How the front end sets the device up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Queue size (a power of two, at most 256).
    pub queue_size: u16,
    /// Queues to set up (the back end must have as many).
    pub queues: u16,
    /// Request slots (the most requests in flight), spread over the queues.
    pub slots: usize,
    /// Data buffer per slot, bytes (a multiple of 4096).
    pub max_io: u32,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` (Linux does).
    pub event_idx: bool,
    /// Use indirect descriptor tables (Linux does for virtio-blk).
    pub indirect: bool,
}

/// A request type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `VIRTIO_BLK_T_IN`: disk → data buffer.
    Read,
    /// `VIRTIO_BLK_T_OUT`: data buffer → disk.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
}

/// A finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Its slot.
    pub slot: usize,
    /// The status byte the device wrote ([`STATUS_UNSET`] if none).
    pub status: u8,
    /// The used ring's length (bytes the device wrote).
    pub len: u32,
}

/// What the back end offered and what was agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Virtio features offered by the back end.
    pub offered: u64,
    /// Virtio features acknowledged.
    pub features: u64,
    /// Protocol features offered.
    pub protocol_offered: u64,
    /// Protocol features acknowledged.
    pub protocol: u64,
    /// Queues the back end has (`GET_QUEUE_NUM`, 1 without `MQ`).
    pub queues: u64,
    /// Disk size in bytes (config space `capacity`), if the back end has `CONFIG`.
    pub capacity: Option<u64>,
    /// Config space `blk_size`, with `VIRTIO_BLK_F_BLK_SIZE`.
    pub blk_size: Option<u32>,
}

/// One queue: its rings and eventfds.
struct Queue {
    drv: Driver,
    kick: EventFd,
    call: EventFd,
    /// Requests added since the last publish.
    added: bool,
}

/// A vhost-user-blk device.
pub struct BlkDevice {
    fe: Frontend,
    mem: GuestMem,
    queues: Vec<Queue>,
    /// The queue [`BlkDevice::complete`] looks at first (round robin).
    next_q: usize,
    cfg: Config,
    ctrl: u64,
    data: u64,
    in_flight: Vec<bool>,
    negotiated: Negotiated,
}

fn vhost(what: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |e| Error::Vhost(what, e)
}

fn mem_err(e: vm_memory::GuestMemoryError) -> Error {
    Error::Memory(e.to_string())
}

const fn bit(b: u32) -> u64 {
    1 << b
}

impl BlkDevice {
    /// Negotiates with the back end at the other end of `fe` and sets up the queues.
    pub fn new(mut fe: Frontend, cfg: Config) -> Result<BlkDevice> {
        let chains = if cfg.indirect { 1 } else { 3 };
        let nq = usize::from(cfg.queues);
        if cfg.slots == 0
            || nq == 0
            || cfg.queue_size > 256
            || cfg.slots.div_ceil(nq) * chains > usize::from(cfg.queue_size)
        {
            return Err(Error::Config(format!(
                "{} slots on {} queues do not fit queues of {} ({} descriptors each)",
                cfg.slots, cfg.queues, cfg.queue_size, chains
            )));
        }
        if cfg.max_io == 0 || cfg.max_io % 4096 != 0 {
            return Err(Error::Config(format!(
                "data buffer of {} bytes: not a positive multiple of 4096",
                cfg.max_io
            )));
        }

        fe.set_owner().map_err(vhost("SET_OWNER"))?;
        let offered = fe.get_features().map_err(vhost("GET_FEATURES"))?;
        let proto = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut features = bit(VIRTIO_F_VERSION_1) | proto;
        if offered & features != features {
            return Err(Error::Backend(format!(
                "features {offered:#x} lack VERSION_1 or PROTOCOL_FEATURES"
            )));
        }
        features |= offered
            & (bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE) | bit(VIRTIO_BLK_F_FLUSH));
        for (on, b, name) in [
            (cfg.event_idx, VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
            (cfg.indirect, VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
        ] {
            if on {
                if offered & bit(b) == 0 {
                    return Err(Error::Backend(format!("no {name} offered")));
                }
                features |= bit(b);
            }
        }

        let pf = fe
            .get_protocol_features()
            .map_err(vhost("GET_PROTOCOL_FEATURES"))?;
        let want = pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ);
        fe.set_protocol_features(want)
            .map_err(vhost("SET_PROTOCOL_FEATURES"))?;
        let queues = if want.contains(VhostUserProtocolFeatures::MQ) {
            fe.get_queue_num().map_err(vhost("GET_QUEUE_NUM"))?
        } else {
            1
        };
        if queues < u64::from(cfg.queues) {
            return Err(Error::Backend(format!(
                "{queues} queues, {} wanted",
                cfg.queues
            )));
        }
        let (capacity, blk_size) = if want.contains(VhostUserProtocolFeatures::CONFIG) {
            // capacity (le64 at 0) .. blk_size (le32 at 20): the part every version has.
            let (_, c) = fe
                .get_config(0, 24, VhostUserConfigFlags::empty(), &[0u8; 24])
                .map_err(vhost("GET_CONFIG"))?;
            let le32 = |at: usize| u32::from_le_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]]);
            let sectors = u64::from(le32(0)) | u64::from(le32(4)) << 32;
            let bs = (features & bit(VIRTIO_BLK_F_BLK_SIZE) != 0).then(|| le32(20));
            (Some(sectors.saturating_mul(512)), bs)
        } else {
            (None, None)
        };
        fe.set_features(features).map_err(vhost("SET_FEATURES"))?;

        let page = |n: u64| n.div_ceil(4096) * 4096;
        let stride = page(Layout::at(0, cfg.queue_size)?.end());
        let layouts = (0..u64::from(cfg.queues))
            .map(|q| Layout::at(q * stride, cfg.queue_size))
            .collect::<Result<Vec<_>>>()?;
        let ctrl = stride * u64::from(cfg.queues);
        let data = page(ctrl + CTRL_SIZE * cfg.slots as u64);
        let size = data + u64::from(cfg.max_io) * cfg.slots as u64;
        let size = usize::try_from(size)
            .map_err(|_| Error::Config(format!("{size} bytes of guest memory")))?;
        let mem = GuestMem::new(size)?;
        fe.set_mem_table(&[mem.region()])
            .map_err(vhost("SET_MEM_TABLE"))?;

        let mut qs = Vec::new();
        for (i, layout) in layouts.into_iter().enumerate() {
            let call = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Io("eventfd", e))?;
            let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Io("eventfd", e))?;
            fe.set_vring_num(i, cfg.queue_size)
                .map_err(vhost("SET_VRING_NUM"))?;
            fe.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: cfg.queue_size,
                    queue_size: cfg.queue_size,
                    flags: 0,
                    desc_table_addr: mem.user_addr(layout.desc.0),
                    used_ring_addr: mem.user_addr(layout.used.0),
                    avail_ring_addr: mem.user_addr(layout.avail.0),
                    log_addr: None,
                },
            )
            .map_err(vhost("SET_VRING_ADDR"))?;
            fe.set_vring_base(i, 0).map_err(vhost("SET_VRING_BASE"))?;
            fe.set_vring_call(i, &call)
                .map_err(vhost("SET_VRING_CALL"))?;
            fe.set_vring_kick(i, &kick)
                .map_err(vhost("SET_VRING_KICK"))?;
            fe.set_vring_enable(i, true)
                .map_err(vhost("SET_VRING_ENABLE"))?;
            qs.push(Queue {
                drv: Driver::new(layout, cfg.event_idx),
                kick,
                call,
                added: false,
            });
        }

        Ok(BlkDevice {
            fe,
            queues: qs,
            next_q: 0,
            mem,
            cfg,
            ctrl,
            data,
            in_flight: vec![false; cfg.slots],
            negotiated: Negotiated {
                offered,
                features,
                protocol_offered: pf.bits(),
                protocol: want.bits(),
                queues,
                capacity,
                blk_size,
            },
        })
    }

    /// What was negotiated.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Guest memory (to fill or check data buffers).
    pub fn mem(&self) -> &GuestMemoryMmap {
        self.mem.mem()
    }

    /// Guest memory size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem.size()
    }

    /// The data buffer of `slot`.
    pub fn data(&self, slot: usize) -> GuestAddress {
        GuestAddress(self.data + slot as u64 * u64::from(self.cfg.max_io))
    }

    /// The vhost-user socket (for tracing).
    pub fn socket_fd(&self) -> i32 {
        self.fe.as_raw_fd()
    }

    /// Puts a request in `slot` on the available ring: `len` bytes at `sector` (ignored for
    /// flushes). Visible to the device after [`BlkDevice::kick`].
    pub fn submit(&mut self, slot: usize, op: Op, sector: u64, len: u32) -> Result<()> {
        if self.in_flight.get(slot) != Some(&false) {
            return Err(Error::Config(format!("slot {slot} busy or out of range")));
        }
        if len > self.cfg.max_io {
            return Err(Error::Config(format!("request of {len} bytes")));
        }
        let nq = self.queues.len();
        let (q, local) = (slot % nq, (slot / nq) as u16);
        let mem = self.mem.mem();
        let cb = self.ctrl + slot as u64 * CTRL_SIZE;
        let (kind, sector) = match op {
            Op::Read => (VIRTIO_BLK_T_IN, sector),
            Op::Write => (VIRTIO_BLK_T_OUT, sector),
            Op::Flush => (VIRTIO_BLK_T_FLUSH, 0),
        };
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(cb + HDR_OFF))
            .map_err(mem_err)?;
        mem.write_obj(STATUS_UNSET, GuestAddress(cb + STATUS_OFF))
            .map_err(mem_err)?;

        let mut chain = [Descriptor {
            addr: cb + HDR_OFF,
            len: 16,
            flags: 0,
            next: 0,
        }; 3];
        let mut n = 1;
        if op != Op::Flush {
            chain[1] = Descriptor {
                addr: self.data(slot).0,
                len,
                flags: if op == Op::Read { DESC_F_WRITE } else { 0 },
                next: 0,
            };
            n = 2;
        }
        chain[n] = Descriptor {
            addr: cb + STATUS_OFF,
            len: 1,
            flags: DESC_F_WRITE,
            next: 0,
        };
        n += 1;
        // In a table the chain starts at 0; in the ring at 3 * local slot.
        let queue = &mut self.queues[q];
        let (table, first, head) = if self.cfg.indirect {
            (GuestAddress(cb), 0u16, local)
        } else {
            let h = local * 3;
            (queue.drv.layout().desc, h, h)
        };
        for (i, d) in chain[..n].iter().enumerate() {
            let i = i as u16;
            let mut d = *d;
            if usize::from(i) + 1 < n {
                d.flags |= DESC_F_NEXT;
                d.next = first + i + 1;
            }
            write_desc(mem, table, first + i, d)?;
        }
        if self.cfg.indirect {
            let d = Descriptor {
                addr: cb,
                len: n as u32 * 16,
                flags: DESC_F_INDIRECT,
                next: 0,
            };
            write_desc(mem, queue.drv.layout().desc, head, d)?;
        }
        queue.drv.add(mem, head)?;
        queue.added = true;
        self.in_flight[slot] = true;
        Ok(())
    }

    /// Makes submitted requests visible and kicks each queue whose device side asked for it;
    /// returns how many kicks it sent.
    pub fn kick(&mut self) -> Result<u32> {
        let mut kicks = 0;
        for q in self.queues.iter_mut().filter(|q| q.added) {
            q.added = false;
            if q.drv.publish(self.mem.mem())? {
                q.kick.write(1).map_err(|e| Error::Io("kick", e))?;
                kicks += 1;
            }
        }
        Ok(kicks)
    }

    /// The next completed request, if any.
    pub fn complete(&mut self) -> Result<Option<Completion>> {
        let nq = self.queues.len();
        let mut found = None;
        for i in 0..nq {
            let q = (self.next_q + i) % nq;
            if let Some(u) = self.queues[q].drv.next_used(self.mem.mem())? {
                found = Some((q, u));
                break;
            }
        }
        let Some((q, (id, len))) = found else {
            return Ok(None);
        };
        self.next_q = (q + 1) % nq;
        let local = if self.cfg.indirect {
            Some(id as usize)
        } else {
            (id % 3 == 0).then_some(id as usize / 3)
        };
        let slot = local.map(|l| l * nq + q);
        let Some(slot) = slot.filter(|s| self.in_flight.get(*s) == Some(&true)) else {
            return Err(Error::Backend(format!(
                "used id {id} on queue {q} is no request in flight"
            )));
        };
        self.in_flight[slot] = false;
        let cb = self.ctrl + slot as u64 * CTRL_SIZE;
        let status: u8 = self
            .mem
            .mem()
            .read_obj(GuestAddress(cb + STATUS_OFF))
            .map_err(mem_err)?;
        Ok(Some(Completion { slot, status, len }))
    }

    /// Sleeps until the device signals a call eventfd (or `timeout` passes), after asking every
    /// queue for an interrupt at its next used entry; returns at once if one is already there.
    /// Returns whether it was woken (false: timed out).
    pub fn wait(&mut self, timeout: Duration) -> Result<bool> {
        let mem = self.mem.mem();
        for q in &self.queues {
            q.drv.arm(mem)?;
        }
        for q in &self.queues {
            if q.drv.pending(mem)? {
                return Ok(true);
            }
        }
        let mut pfds: Vec<libc::pollfd> = self
            .queues
            .iter()
            .map(|q| libc::pollfd {
                fd: q.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: pfds is a live array of pfds.len() pollfds for the duration of the call.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(true);
            }
            return Err(Error::Io("poll(call)", e));
        }
        if rc == 0 {
            return Ok(false);
        }
        for (q, p) in self.queues.iter().zip(&pfds) {
            if p.revents & libc::POLLIN != 0 {
                match q.call.read() {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(Error::Io("read(call)", e)),
                }
            }
        }
        Ok(true)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.iter().filter(|b| **b).count()
    }
}
