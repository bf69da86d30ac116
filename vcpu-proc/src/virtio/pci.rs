//! A modern (virtio 1.x, non-transitional) virtio-pci device whose work is done by a vhost-user
//! back end. The guest's driver talks to the registers here (common configuration, ISR, device
//! configuration, MSI-X table); once it sets `DRIVER_OK` the rings go to the back end, each
//! queue's notify address becomes a KVM ioeventfd on the back end's kick eventfd and each
//! queue's MSI-X vector a KVM irqfd on its call eventfd, so the data path never enters this
//! process. Everything the guest writes is checked against what the device offered; a driver
//! that sets up nonsense gets `DEVICE_NEEDS_RESET`, never a crash.
//!
//! virtio-net is the one exception to "the back end serves every queue": its control
//! virtqueue (the last queue, or queue 2 without `VIRTIO_NET_F_MQ`) gets no ioeventfd, so the
//! driver's notify traps here and [`super::net_ctrl`] answers it on the vCPU thread; the rx
//! filter it sets is reported through the [`RxFilterSink`], the MAC address it sets appears in
//! the configuration space, and `VQ_PAIRS_SET` enables or disables the back end's queue pairs
//! (`SET_VRING_ENABLE`), as QEMU's virtio-net does with a vhost-user back end.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use bulkhead_ipc::messages::{RxFilter, VirtioDevice, VirtioKind};
use kvm_ioctls::{IoEventAddress, NoDatamatch};
use virtio_queue::{Queue as VirtQueue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::net_ctrl::{self, NetCtrl};
use super::vhost::{Backend, RingSetup};
use crate::memory::GuestMem;
use crate::pci::config::{Header, PciConfig, CONFIG_SIZE};
use crate::pci::msix::{IrqRouter, MsixTable, ENTRY_SIZE};
use crate::pci::{PciDevice, PciRoot};

/// Red Hat / virtio vendor id.
const VIRTIO_VENDOR: u16 = 0x1af4;
/// Modern device ids are 0x1040 + the virtio device type.
const MODERN_DEVICE_BASE: u16 = 0x1040;
/// virtio device types.
const TYPE_NET: u16 = 1;
const TYPE_BLOCK: u16 = 2;

// BAR0 layout.
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x40;
const ISR: u64 = 0x1000;
const ISR_LEN: u64 = 4;
const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u64 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
const BAR_SIZE: u64 = 0x8000;

// virtio_pci_cap cfg_type values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const MSIX_ENABLE: u8 = 0x80;
const MSIX_FUNCTION_MASK: u8 = 0x40;

/// Device status bits.
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_NEEDS_RESET: u8 = 0x40;
/// No MSI-X vector.
const NO_VECTOR: u16 = 0xffff;

// Transport feature bits.
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;
/// Device-specific feature bits (0..24) plus the transport bits this transport implements.
const TRANSPORT_FEATURES: u64 = F_INDIRECT_DESC | F_EVENT_IDX | F_VERSION_1;
const DEVICE_FEATURES: u64 = (1 << 24) - 1;

// virtio-net bits the front end owns or refuses.
const NET_F_CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
const NET_F_MAC: u64 = 1 << 5;
const NET_F_STATUS: u64 = 1 << 16;
const NET_F_CTRL_VQ: u64 = 1 << 17;
const NET_F_CTRL_RX: u64 = 1 << 18;
const NET_F_CTRL_VLAN: u64 = 1 << 19;
const NET_F_CTRL_RX_EXTRA: u64 = 1 << 20;
const NET_F_GUEST_ANNOUNCE: u64 = 1 << 21;
const NET_F_MQ: u64 = 1 << 22;
const NET_F_CTRL_MAC_ADDR: u64 = 1 << 23;
/// Everything that lives on the control queue: the front end's, whatever the back end offers.
const NET_F_CTRL_FAMILY: u64 = NET_F_CTRL_GUEST_OFFLOADS
    | NET_F_CTRL_VQ
    | NET_F_CTRL_RX
    | NET_F_CTRL_VLAN
    | NET_F_CTRL_RX_EXTRA
    | NET_F_GUEST_ANNOUNCE
    | NET_F_MQ
    | NET_F_CTRL_MAC_ADDR;
/// What the front end's control queue serves. `GUEST_ANNOUNCE` is left out: the device would
/// only ask for an announcement after a migration, which bulkhead does not do.
const NET_F_CTRL_SERVED: u64 =
    NET_F_CTRL_VQ | NET_F_CTRL_RX | NET_F_CTRL_VLAN | NET_F_CTRL_RX_EXTRA | NET_F_CTRL_MAC_ADDR;
const NET_S_LINK_UP: u16 = 1;
const NET_CONFIG_LEN: usize = 12;
const NET_MAX_PAIRS_OFFSET: usize = 8;
/// Most queue pairs a net device may have (QEMU's `VIRTIO_QUEUE_MAX` / 2 - 1 is 511; the
/// transport's 64 queues make it 31 here).
pub const NET_MAX_PAIRS: u16 = 31;
/// virtio-blk: `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding.
const BLK_CONFIG_LEN: usize = 60;
const BLK_F_MQ: u64 = 1 << 12;
const BLK_NUM_QUEUES_OFFSET: usize = 34;

/// Largest queue size the transport accepts.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Told of every rx-filter change of a net device: its id, the new filter, and whether a
/// device reset (rather than a guest command) changed it.
pub type RxFilterSink = Arc<dyn Fn(&str, RxFilter, bool) + Send + Sync>;

/// What a net device keeps for its control queue.
struct NetState {
    ctrl: NetCtrl,
    max_pairs: u16,
    /// The control queue while the device runs: its index and its ring.
    vq: Option<(usize, VirtQueue)>,
    sink: Option<RxFilterSink>,
}

/// Errors creating a device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Talking to the back end failed.
    #[error(transparent)]
    Vhost(#[from] super::vhost::Error),
    /// The back end does not do virtio 1.
    #[error("the back end does not offer VIRTIO_F_VERSION_1 (virtio-pci here is modern-only)")]
    NotModern,
    /// Routing the device's vectors failed.
    #[error(transparent)]
    Irq(#[from] crate::pci::msix::Error),
    /// An eventfd could not be made.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// The description is unusable.
    #[error("device {id}: {why}")]
    Invalid {
        /// Device id.
        id: String,
        /// Why.
        why: String,
    },
    /// The PCI configuration space could not be built.
    #[error(transparent)]
    Config(#[from] crate::pci::config::Error),
}

#[derive(Debug, Clone, Copy)]
struct Queue {
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl Queue {
    fn new(max: u16) -> Self {
        Queue {
            size: max,
            vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// A virtio-pci device backed by vhost-user.
pub struct VirtioPciDevice {
    id: String,
    kind: VirtioKind,
    config: PciConfig,
    config_init: PciConfig,
    msix_cap: usize,
    msix: MsixTable,
    gsis: Vec<u32>,
    router: Arc<IrqRouter>,
    mem: GuestMem,
    backend: Backend,
    broken: bool,
    offered: u64,
    max_queue_size: u16,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    config_evt: EventFd,
    irqfds: Vec<Option<u32>>,
    ioevents: Option<u64>,
    active: bool,
    // Common configuration registers.
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_vector: u16,
    status: u8,
    generation: u8,
    queue_select: u16,
    isr: u8,
    device_config: Vec<u8>,
    link_up: bool,
    net: Option<NetState>,
}

fn le(data: &[u8]) -> u64 {
    let mut v = 0u64;
    for (i, b) in data.iter().take(8).enumerate() {
        v |= u64::from(*b) << (8 * i);
    }
    v
}

fn put(data: &mut [u8], v: u64) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = if i < 8 { (v >> (8 * i)) as u8 } else { 0 };
    }
}

fn vendor_cap(cfg_type: u8, offset: u64, len: u64, extra: Option<u32>) -> Vec<u8> {
    let cap_len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut v = vec![CAP_VENDOR, 0, cap_len, cfg_type, 0, 0, 0, 0];
    v.extend_from_slice(&(offset as u32).to_le_bytes());
    v.extend_from_slice(&(len as u32).to_le_bytes());
    if let Some(x) = extra {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

impl VirtioPciDevice {
    /// Connects to the back end on `sock`, negotiates, and builds the device for `desc`.
    pub fn new(
        desc: &VirtioDevice,
        sock: OwnedFd,
        mem: GuestMem,
        router: Arc<IrqRouter>,
    ) -> Result<Self, Error> {
        let invalid = |why: String| Error::Invalid {
            id: desc.id.clone(),
            why,
        };
        if desc.queue_size == 0
            || !desc.queue_size.is_power_of_two()
            || desc.queue_size > MAX_QUEUE_SIZE
        {
            return Err(invalid(format!(
                "queue size {} is not a power of two in 1..={MAX_QUEUE_SIZE}",
                desc.queue_size
            )));
        }
        // A net device has `num_queues / 2` queue pairs on the back end, plus the control
        // queue here.
        let pairs = (desc.num_queues / 2).max(1);
        if matches!(desc.kind, VirtioKind::Net { .. }) && pairs > NET_MAX_PAIRS {
            return Err(invalid(format!(
                "{pairs} queue pairs (at most {NET_MAX_PAIRS})"
            )));
        }
        let wanted = match desc.kind {
            VirtioKind::Block => usize::from(desc.num_queues.max(1)),
            VirtioKind::Net { .. } => 2 * usize::from(pairs),
        };
        if wanted > 64 {
            return Err(invalid(format!("{wanted} queues (at most 64)")));
        }
        let mut backend = Backend::connect(sock, wanted)?;
        if backend.features & F_VERSION_1 == 0 {
            return Err(Error::NotModern);
        }
        let nq = match desc.kind {
            VirtioKind::Block => backend.max_queues.min(wanted),
            VirtioKind::Net { .. } => {
                if backend.max_queues < wanted {
                    return Err(invalid(format!(
                        "the back end serves {} queues, fewer than the {wanted} of {pairs} \
                         queue pair(s)",
                        backend.max_queues
                    )));
                }
                wanted + 1
            }
        };
        let mut offered = backend.features & (DEVICE_FEATURES | TRANSPORT_FEATURES);
        let (dev_type, class, config_len) = match desc.kind {
            VirtioKind::Block => (TYPE_BLOCK, 0x01_8000, BLK_CONFIG_LEN),
            VirtioKind::Net { .. } => {
                offered = (offered & !NET_F_CTRL_FAMILY)
                    | NET_F_MAC
                    | NET_F_STATUS
                    | NET_F_CTRL_SERVED
                    | if pairs > 1 { NET_F_MQ } else { 0 };
                (TYPE_NET, 0x02_0000, NET_CONFIG_LEN)
            }
        };
        let device_config = if backend.has_config() {
            backend.get_config(config_len)?
        } else if matches!(desc.kind, VirtioKind::Block) {
            return Err(invalid(
                "the block back end does not serve its configuration (no CONFIG protocol feature)"
                    .into(),
            ));
        } else {
            vec![0; config_len]
        };

        let mut config = PciConfig::new(Header {
            vendor: VIRTIO_VENDOR,
            device: MODERN_DEVICE_BASE + dev_type,
            revision: 1,
            class,
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: 0x40,
        });
        config.set_bar0_mem64(PciRoot::slot_bar_base(desc.slot), BAR_SIZE)?;
        config.add_capability(&vendor_cap(CAP_COMMON, COMMON, COMMON_LEN, None), &[])?;
        config.add_capability(&vendor_cap(CAP_ISR, ISR, ISR_LEN, None), &[])?;
        config.add_capability(&vendor_cap(CAP_DEVICE, DEVICE, DEVICE_LEN, None), &[])?;
        config.add_capability(
            &vendor_cap(
                CAP_NOTIFY,
                NOTIFY,
                NOTIFY_LEN,
                Some(NOTIFY_MULTIPLIER as u32),
            ),
            &[],
        )?;
        let nvec = nq + 1;
        let mut msix = vec![CAP_MSIX, 0];
        msix.extend_from_slice(&((nvec - 1) as u16).to_le_bytes());
        msix.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes());
        msix.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        let msix_cap =
            config.add_capability(&msix, &[0, 0, 0, MSIX_ENABLE | MSIX_FUNCTION_MASK])?;

        let gsis = router.allocate(nvec)?;
        let ev = || EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd);
        let mut kicks = Vec::with_capacity(nq);
        let mut calls = Vec::with_capacity(nq);
        for _ in 0..nq {
            kicks.push(ev()?);
            calls.push(ev()?);
        }
        let (link_up, kind, net) = match &desc.kind {
            VirtioKind::Net { link_up, mac } => (
                *link_up,
                desc.kind.clone(),
                Some(NetState {
                    ctrl: NetCtrl::new(*mac, pairs),
                    max_pairs: pairs,
                    vq: None,
                    sink: None,
                }),
            ),
            VirtioKind::Block => (true, VirtioKind::Block, None),
        };
        let mut dev = VirtioPciDevice {
            id: desc.id.clone(),
            kind,
            config_init: config.clone(),
            config,
            msix_cap,
            msix: MsixTable::new(nvec),
            gsis,
            router,
            mem,
            backend,
            broken: false,
            offered,
            max_queue_size: desc.queue_size,
            queues: vec![Queue::new(desc.queue_size); nq],
            kicks,
            calls,
            config_evt: ev()?,
            irqfds: vec![None; nq + 1],
            ioevents: None,
            active: false,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_vector: NO_VECTOR,
            status: 0,
            generation: 0,
            queue_select: 0,
            isr: 0,
            device_config,
            link_up,
            net,
        };
        dev.fix_config();
        Ok(dev)
    }

    /// The device id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where a net device's rx-filter changes go (the machine's control loop).
    pub fn set_rx_filter_sink(&mut self, sink: RxFilterSink) {
        if let Some(net) = self.net.as_mut() {
            net.sink = Some(sink);
        }
    }

    /// A net device's rx filter as the guest set it.
    pub fn rx_filter(&self) -> Option<RxFilter> {
        self.net.as_ref().map(|n| n.ctrl.filter())
    }

    /// Overlays what the front end owns on the back end's configuration space.
    fn fix_config(&mut self) {
        match &self.kind {
            VirtioKind::Net { mac, .. } => {
                let status = if self.link_up { NET_S_LINK_UP } else { 0 };
                let (mac, pairs) = match &self.net {
                    Some(n) => (n.ctrl.mac(), n.max_pairs),
                    None => (*mac, 1),
                };
                self.device_config[..6].copy_from_slice(&mac);
                self.device_config[6..8].copy_from_slice(&status.to_le_bytes());
                self.device_config[NET_MAX_PAIRS_OFFSET..NET_MAX_PAIRS_OFFSET + 2]
                    .copy_from_slice(&pairs.to_le_bytes());
            }
            VirtioKind::Block => {
                if self.offered & BLK_F_MQ != 0 {
                    let n = self.queues.len() as u16;
                    self.device_config[BLK_NUM_QUEUES_OFFSET..BLK_NUM_QUEUES_OFFSET + 2]
                        .copy_from_slice(&n.to_le_bytes());
                }
            }
        }
    }

    /// Re-reads the back end's configuration and tells the guest it changed.
    pub fn config_changed(&mut self) -> Result<(), Error> {
        if self.backend.has_config() {
            let len = self.device_config.len();
            match self.backend.get_config(len) {
                Ok(c) => self.device_config = c,
                Err(e) => {
                    self.fail(&e.to_string());
                    return Err(e.into());
                }
            }
        }
        self.fix_config();
        self.raise_config();
        Ok(())
    }

    /// Sets a net device's link status (and tells the guest).
    pub fn set_link(&mut self, up: bool) -> Result<(), Error> {
        if !matches!(self.kind, VirtioKind::Net { .. }) {
            return Err(Error::Invalid {
                id: self.id.clone(),
                why: "not a network device".into(),
            });
        }
        if self.link_up != up {
            self.link_up = up;
            self.fix_config();
            self.raise_config();
        }
        Ok(())
    }

    fn raise_config(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.isr |= 2;
        if let Err(e) = self.config_evt.write(1) {
            log::warn!("{}: cannot raise the configuration interrupt: {e}", self.id);
        }
    }

    fn fail(&mut self, why: &str) {
        log::error!("{}: device broken: {why}", self.id);
        self.broken = true;
        self.status |= STATUS_NEEDS_RESET;
        self.raise_config();
    }

    fn msix_state(&self) -> (bool, bool) {
        let ctl = self.config.byte(self.msix_cap + 3);
        (ctl & MSIX_ENABLE != 0, ctl & MSIX_FUNCTION_MASK != 0)
    }

    /// Registers or unregisters each interrupt source's irqfd to match the vectors, the
    /// MSI-X table and the enable/mask bits.
    fn sync_irqfds(&mut self) {
        let (enabled, fmask) = self.msix_state();
        let nq = self.queues.len();
        for src in 0..=nq {
            let vector = if src < nq {
                self.queues[src].vector
            } else {
                self.config_vector
            };
            let want = if !enabled || fmask || vector == NO_VECTOR {
                None
            } else {
                match self.msix.entry(usize::from(vector)) {
                    Some(e) if !e.masked() => self.gsis.get(usize::from(vector)).copied(),
                    _ => None,
                }
            };
            if want == self.irqfds[src] {
                continue;
            }
            let evt = if src < nq {
                &self.calls[src]
            } else {
                &self.config_evt
            };
            if let Some(old) = self.irqfds[src].take() {
                if let Err(e) = self.router.vm().unregister_irqfd(evt, old) {
                    log::warn!("{}: KVM_IRQFD deassign: {e}", self.id);
                }
            }
            if let Some(gsi) = want {
                match self.router.vm().register_irqfd(evt, gsi) {
                    Ok(()) => self.irqfds[src] = Some(gsi),
                    Err(e) => log::warn!("{}: KVM_IRQFD: {e}", self.id),
                }
            }
        }
    }

    fn unregister_ioevents(&mut self) {
        if let Some(base) = self.ioevents.take() {
            for (q, kick) in self.kicks.iter().enumerate() {
                let addr = IoEventAddress::Mmio(base + NOTIFY + q as u64 * NOTIFY_MULTIPLIER);
                if let Err(e) = self
                    .router
                    .vm()
                    .unregister_ioevent(kick, &addr, NoDatamatch)
                {
                    log::debug!("{}: ioeventfd {q} deassign: {e}", self.id);
                }
            }
        }
    }

    /// Puts each queue's notify address on its kick eventfd while the device is active and
    /// its BAR decodes.
    fn sync_ioevents(&mut self) {
        let want = if self.active {
            self.bar0().map(|(b, _)| b)
        } else {
            None
        };
        if want == self.ioevents {
            return;
        }
        self.unregister_ioevents();
        if let Some(base) = want {
            let ctrl = self.ctrl_index();
            for (q, kick) in self.kicks.iter().enumerate() {
                // The control queue's notify must trap: this process serves it.
                if !self.queues[q].enabled || Some(q) == ctrl {
                    continue;
                }
                let addr = IoEventAddress::Mmio(base + NOTIFY + q as u64 * NOTIFY_MULTIPLIER);
                if let Err(e) = self.router.vm().register_ioevent(kick, &addr, NoDatamatch) {
                    log::warn!("{}: KVM_IOEVENTFD for queue {q}: {e}", self.id);
                }
            }
            self.ioevents = Some(base);
        }
    }

    /// A net device's control queue index while the driver uses one: the last queue with
    /// `VIRTIO_NET_F_MQ`, queue 2 without (virtio 1.2, 5.1.2).
    fn ctrl_index(&self) -> Option<usize> {
        let net = self.net.as_ref()?;
        if self.driver_features & NET_F_CTRL_VQ == 0 {
            return None;
        }
        Some(if self.driver_features & NET_F_MQ != 0 {
            2 * usize::from(net.max_pairs)
        } else {
            2
        })
    }

    /// Builds the control queue's ring from the driver's registers; `false` if it is unusable.
    fn start_ctrl_queue(&mut self) -> bool {
        let Some(q) = self.ctrl_index() else {
            return true;
        };
        let event_idx = self.driver_features & F_EVENT_IDX != 0;
        let features = self.driver_features;
        let Some(setup) = self.queues.get(q).copied() else {
            return false;
        };
        let Some(net) = self.net.as_mut() else {
            return true;
        };
        net.ctrl.set_features(features);
        if !setup.enabled {
            // A driver that negotiated the control queue but did not set it up sends nothing.
            return true;
        }
        let Ok(mut vq) = VirtQueue::new(setup.size) else {
            return false;
        };
        vq.set_size(setup.size);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(setup.desc);
        vq.set_desc_table_address(lo, hi);
        let (lo, hi) = split(setup.avail);
        vq.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(setup.used);
        vq.set_used_ring_address(lo, hi);
        vq.set_event_idx(event_idx);
        vq.set_ready(true);
        if !vq.is_valid(&self.mem) {
            return false;
        }
        net.vq = Some((q, vq));
        true
    }

    /// Answers what the driver put on the control queue (its notify trapped here).
    fn process_ctrl(&mut self) {
        let Some(net) = self.net.as_mut() else {
            return;
        };
        let Some((q, vq)) = net.vq.as_mut() else {
            return;
        };
        let q = *q;
        let done = net_ctrl::process(vq, &self.mem, &mut net.ctrl);
        if done.malformed > 0 {
            log::warn!(
                "{}: {} malformed control-queue chain(s) returned unanswered",
                self.id,
                done.malformed
            );
        }
        if let Some(pairs) = done.pairs {
            self.apply_pairs(pairs);
        }
        if done.filter_changed {
            // The MAC address may have changed: the configuration space shows the current one.
            self.fix_config();
            self.report_filter(false);
        }
        if done.notify {
            if let Some(c) = self.calls.get(q) {
                let _ = c.write(1);
            }
        }
    }

    fn report_filter(&self, reset: bool) {
        if let Some(net) = &self.net {
            let filter = net.ctrl.filter();
            log::debug!("{}: rx filter now {filter:?}", self.id);
            if let Some(sink) = &net.sink {
                sink(&self.id, filter, reset);
            }
        }
    }

    /// Enables the back end's first `pairs` queue pairs and disables the others.
    fn apply_pairs(&mut self, pairs: u16) {
        let Some(max) = self.net.as_ref().map(|n| n.max_pairs) else {
            return;
        };
        for p in 0..usize::from(max) {
            let on = p < usize::from(pairs);
            for q in [2 * p, 2 * p + 1] {
                if let Err(e) = self.backend.set_vring_enable(q, on) {
                    self.fail(&e.to_string());
                    return;
                }
            }
        }
        log::info!("{}: {pairs} of {max} queue pair(s) active", self.id);
    }

    fn activate(&mut self) {
        if self.broken {
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        if !self.start_ctrl_queue() {
            self.fail("the control virtqueue's rings are not in guest RAM");
            return;
        }
        // The back end gets the data queues: a net device's pairs (without MQ only the first),
        // never the control queue.
        let data_queues = match &self.net {
            Some(n) if self.driver_features & NET_F_MQ != 0 => 2 * usize::from(n.max_pairs),
            Some(_) => 2,
            None => self.queues.len(),
        };
        let enabled_below = match &self.net {
            Some(n) => 2 * usize::from(n.ctrl.curr_pairs()),
            None => usize::MAX,
        };
        let mut rings = Vec::new();
        for (q, queue) in self.queues.iter().enumerate() {
            if !queue.enabled || q >= data_queues {
                continue;
            }
            rings.push((
                q,
                RingSetup {
                    size: queue.size,
                    desc: queue.desc,
                    avail: queue.avail,
                    used: queue.used,
                },
            ));
        }
        let with_fds: Vec<_> = rings
            .iter()
            .map(|(q, r)| (*q, *r, &self.kicks[*q], &self.calls[*q]))
            .collect();
        let res = self
            .backend
            .start(self.driver_features, &self.mem, &with_fds, enabled_below);
        match res {
            Ok(()) => {
                self.active = true;
                self.sync_ioevents();
                // Commands the driver queued before DRIVER_OK.
                self.process_ctrl();
                log::info!(
                    "{}: started, {} queue(s), features {:#x}",
                    self.id,
                    rings.len(),
                    self.driver_features
                );
            }
            Err(e) => {
                let _ = self.backend.stop();
                self.fail(&e.to_string());
            }
        }
    }

    /// Device reset (status 0 or machine reset): rings stopped and every register back to
    /// its initial value.
    fn device_reset(&mut self) {
        if self.active {
            self.active = false;
            self.sync_ioevents();
        }
        if let Err(e) = self.backend.stop() {
            self.fail(&e.to_string());
        }
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.config_vector = NO_VECTOR;
        self.status = if self.broken { STATUS_NEEDS_RESET } else { 0 };
        self.queue_select = 0;
        self.isr = 0;
        self.queues = vec![Queue::new(self.max_queue_size); self.queues.len()];
        let mut filter_was_set = false;
        if let Some(net) = self.net.as_mut() {
            let before = net.ctrl.filter();
            net.ctrl.reset();
            net.vq = None;
            filter_was_set = before != net.ctrl.filter();
        }
        if filter_was_set {
            self.fix_config();
            self.report_filter(true);
        }
        for c in &self.calls {
            let _ = c.read();
        }
        let _ = self.config_evt.read();
        self.sync_irqfds();
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let nq = self.queues.len() as u64;
        let q = self.queues.get(usize::from(self.queue_select)).copied();
        let v: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.offered & 0xffff_ffff,
                1 => self.offered >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.config_vector),
            (0x12, 2) => nq,
            (0x14, 1) => u64::from(self.status),
            (0x15, 1) => u64::from(self.generation),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size)),
            (0x1a, 2) => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.enabled)),
            (0x1e, 2) => q.map_or(0, |_| u64::from(self.queue_select)),
            (0x20, 4) => q.map_or(0, |q| q.desc & 0xffff_ffff),
            (0x24, 4) => q.map_or(0, |q| q.desc >> 32),
            (0x28, 4) => q.map_or(0, |q| q.avail & 0xffff_ffff),
            (0x2c, 4) => q.map_or(0, |q| q.avail >> 32),
            (0x30, 4) => q.map_or(0, |q| q.used & 0xffff_ffff),
            (0x34, 4) => q.map_or(0, |q| q.used >> 32),
            (0x20, 8) => q.map_or(0, |q| q.desc),
            (0x28, 8) => q.map_or(0, |q| q.avail),
            (0x30, 8) => q.map_or(0, |q| q.used),
            _ => 0,
        };
        put(data, v);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let v = le(data);
        let live = self.status & STATUS_DRIVER_OK != 0;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v as u32,
            (0x08, 4) => self.driver_feature_select = v as u32,
            (0x0c, 4) if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            (0x10, 2) => {
                self.config_vector = self.checked_vector(v as u16);
                self.sync_irqfds();
            }
            (0x14, 1) => self.write_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18, 2) if !live => {
                let max = self.max_queue_size;
                if let Some(q) = self.queue() {
                    // A size the transport cannot take keeps the old one; the driver reads
                    // back what it got.
                    let n = v as u16;
                    if n != 0 && n.is_power_of_two() && n <= max {
                        q.size = n;
                    }
                }
            }
            (0x1a, 2) => {
                let vector = self.checked_vector(v as u16);
                if let Some(q) = self.queue() {
                    q.vector = vector;
                }
                self.sync_irqfds();
            }
            (0x1c, 2) if !live => {
                if let Some(q) = self.queue() {
                    q.enabled = v & 1 == 1;
                }
            }
            (0x20..=0x37, 4) | (0x20 | 0x28 | 0x30, 8) if !live => {
                let field = (offset - 0x20) / 8;
                let high = offset % 8 == 4;
                if let Some(q) = self.queue() {
                    let slot = match field {
                        0 => &mut q.desc,
                        1 => &mut q.avail,
                        _ => &mut q.used,
                    };
                    *slot = match (data.len(), high) {
                        (8, _) => v,
                        (_, false) => (*slot & !0xffff_ffff) | v,
                        (_, true) => (*slot & 0xffff_ffff) | (v << 32),
                    };
                }
            }
            _ => log::debug!(
                "{}: ignored common-config write at {offset:#x} ({} bytes)",
                self.id,
                data.len()
            ),
        }
    }

    /// A vector the device can honour, or `NO_VECTOR` (the driver reads it back to learn).
    fn checked_vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.msix.len() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.device_reset();
            return;
        }
        let mut v = v & !STATUS_NEEDS_RESET;
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let ok = self.driver_features & !self.offered == 0
                && self.driver_features & F_VERSION_1 != 0;
            if !ok {
                v &= !STATUS_FEATURES_OK;
            }
        }
        let was_live = self.status & STATUS_DRIVER_OK != 0;
        self.status = v | (self.status & STATUS_NEEDS_RESET);
        if v & STATUS_DRIVER_OK != 0 && !was_live {
            if v & STATUS_FEATURES_OK == 0 {
                self.fail("DRIVER_OK without FEATURES_OK");
                return;
            }
            self.activate();
        }
    }

    fn device_read(&mut self, offset: u64, data: &mut [u8]) {
        let start = offset as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.device_config.get(start + i).copied().unwrap_or(0);
        }
    }

    fn device_write(&mut self, offset: u64, data: &[u8]) {
        let start = offset as usize;
        if start + data.len() > self.device_config.len() {
            return;
        }
        match self.kind {
            // virtio-blk's writeback toggle is the back end's business.
            VirtioKind::Block => {
                if self.backend.has_config() {
                    match self.backend.set_config(start as u32, data) {
                        Ok(()) => {
                            self.device_config[start..start + data.len()].copy_from_slice(data)
                        }
                        Err(e) => log::warn!("{}: SET_CONFIG: {e}", self.id),
                    }
                }
            }
            // The net configuration space is read-only for the driver.
            VirtioKind::Net { .. } => {}
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if offset < CONFIG_SIZE {
            self.config.read(offset, data);
        } else {
            data.fill(0);
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if offset >= CONFIG_SIZE {
            return;
        }
        self.config.write(offset, data);
        // BAR moves, decoding switches and MSI-X enable/mask all land here.
        self.sync_ioevents();
        self.sync_irqfds();
    }

    fn bar0(&self) -> Option<(u64, u64)> {
        if self.config.memory_enabled() {
            self.config.bar0()
        } else {
            None
        }
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if (COMMON..COMMON + COMMON_LEN).contains(&o) => self.common_read(o - COMMON, data),
            o if (ISR..ISR + ISR_LEN).contains(&o) => {
                data.fill(0);
                if o == ISR {
                    data[0] = std::mem::take(&mut self.isr);
                }
            }
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => self.device_read(o - DEVICE, data),
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.len() as u64 * ENTRY_SIZE).contains(&o) => {
                self.msix.read(o - MSIX_TABLE, data)
            }
            // Pending bits: interrupts of masked vectors wait in their eventfds instead.
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if (COMMON..COMMON + COMMON_LEN).contains(&o) => self.common_write(o - COMMON, data),
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => self.device_write(o - DEVICE, data),
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.len() as u64 * ENTRY_SIZE).contains(&o) => {
                if let Some(v) = self.msix.write(o - MSIX_TABLE, data) {
                    if let (Some(e), Some(gsi)) = (self.msix.entry(v), self.gsis.get(v)) {
                        if let Err(err) = self.router.set_msi(*gsi, Some((e.addr, e.data))) {
                            log::warn!("{}: MSI route for vector {v}: {err}", self.id);
                        }
                    }
                    self.sync_irqfds();
                }
            }
            // A notify that reaches us (no ioeventfd yet: the driver kicked before DRIVER_OK)
            // has nothing to start; the kick is replayed once the rings run.
            o if (NOTIFY..NOTIFY + NOTIFY_LEN).contains(&o) => {
                let q = ((o - NOTIFY) / NOTIFY_MULTIPLIER) as usize;
                if self.active && Some(q) == self.ctrl_index() {
                    self.process_ctrl();
                } else if let Some(k) = self.kicks.get(q) {
                    let _ = k.write(1);
                }
            }
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.device_reset();
        self.config = self.config_init.clone();
        self.msix.reset();
        for gsi in &self.gsis {
            if let Err(e) = self.router.set_msi(*gsi, None) {
                log::warn!("{}: MSI route reset: {e}", self.id);
            }
        }
        self.sync_ioevents();
        self.sync_irqfds();
    }

    fn unplug(&mut self) {
        self.reset();
        if let Err(e) = self.router.release(&self.gsis) {
            log::warn!("{}: releasing GSIs: {e}", self.id);
        }
        self.gsis.clear();
    }
}
