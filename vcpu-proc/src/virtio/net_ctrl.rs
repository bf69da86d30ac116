//! The virtio-net control virtqueue, served by the front end (this process), never by the
//! vhost-user back end: as in QEMU with vhost-user, the rx filter, the MAC address and the number
//! of active queue pairs are device state the guest sets here, and netd only moves frames.
//!
//! [`NetCtrl`] owns that state and executes one command (pure logic, QEMU 7.2's
//! `virtio_net_handle_ctrl` semantics: rx mode, MAC table set, MAC address set, VLAN add/del,
//! `VQ_PAIRS_SET`, announce ack). [`process`] walks the control queue's available chains in guest
//! memory through `virtio-queue` (every descriptor bounds-checked against guest memory, chain
//! loops cut by the crate) and answers each with `VIRTIO_NET_OK` or `VIRTIO_NET_ERR`. The queue
//! is hostile input: a command too large, cut short or unknown gets `VIRTIO_NET_ERR`; a chain with
//! no room for the status byte or with descriptors outside memory is returned with length 0
//! (QEMU exits on the first and breaks the device on the second; a guest here only hurts itself).

use bulkhead_ipc::messages::RxFilter;
use virtio_queue::{Queue, QueueT};

use crate::memory::GuestMem;

/// `VIRTIO_NET_OK`.
pub const OK: u8 = 0;
/// `VIRTIO_NET_ERR`.
pub const ERR: u8 = 1;

/// Command classes.
const CLASS_RX: u8 = 0;
const CLASS_MAC: u8 = 1;
const CLASS_VLAN: u8 = 2;
const CLASS_ANNOUNCE: u8 = 3;
const CLASS_MQ: u8 = 4;

/// `VIRTIO_NET_CTRL_RX_*`.
const RX_PROMISC: u8 = 0;
const RX_ALLMULTI: u8 = 1;
const RX_ALLUNI: u8 = 2;
const RX_NOMULTI: u8 = 3;
const RX_NOUNI: u8 = 4;
const RX_NOBCAST: u8 = 5;
/// `VIRTIO_NET_CTRL_MAC_*`.
const MAC_TABLE_SET: u8 = 0;
const MAC_ADDR_SET: u8 = 1;
/// `VIRTIO_NET_CTRL_VLAN_*`.
const VLAN_ADD: u8 = 0;
const VLAN_DEL: u8 = 1;
/// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`.
const MQ_VQ_PAIRS_SET: u8 = 0;
/// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX`.
const MQ_PAIRS_MAX: u16 = 0x8000;

/// MAC table entries (unicast and multicast together), as QEMU.
pub const MAC_TABLE_ENTRIES: usize = 64;
/// VLAN ids.
pub const MAX_VLAN: u16 = 4096;
/// Largest command (header and payload) the device reads; a longer one gets `VIRTIO_NET_ERR`.
/// A MAC table of 10,000 addresses fits; Linux sends its whole lists even past the table size.
pub const MAX_COMMAND: usize = 64 * 1024;

// Feature bits the control state depends on.
const F_CTRL_VLAN: u64 = 1 << 19;
const F_MQ: u64 = 1 << 22;

/// What a command changed besides its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing visible outside.
    None,
    /// The rx filter (rx mode, tables, MAC address or VLANs) changed.
    Filter,
    /// The guest asked for this many active queue pairs.
    Pairs(u16),
}

/// The control state of one virtio-net device.
#[derive(Debug, Clone)]
pub struct NetCtrl {
    filter: RxFilter,
    configured_mac: [u8; 6],
    vlans: Vec<u32>,
    ctrl_vlan: bool,
    max_pairs: u16,
    mq: bool,
    curr_pairs: u16,
}

impl NetCtrl {
    /// The state after reset for a device with `mac` and up to `max_pairs` queue pairs.
    pub fn new(mac: [u8; 6], max_pairs: u16) -> NetCtrl {
        NetCtrl {
            filter: RxFilter::reset(mac),
            configured_mac: mac,
            vlans: vec![0; usize::from(MAX_VLAN / 32)],
            ctrl_vlan: false,
            max_pairs: max_pairs.max(1),
            mq: false,
            curr_pairs: 1,
        }
    }

    /// Device reset (QEMU's `virtio_net_reset`): promiscuous, tables flushed, the configured
    /// MAC back, one queue pair.
    pub fn reset(&mut self) {
        *self = NetCtrl::new(self.configured_mac, self.max_pairs);
    }

    /// The driver's features are set (FEATURES_OK): multiqueue, and VLAN filtering (without
    /// `CTRL_VLAN` every VLAN passes, as QEMU's `virtio_net_set_features`).
    pub fn set_features(&mut self, features: u64) {
        self.mq = features & F_MQ != 0;
        self.ctrl_vlan = features & F_CTRL_VLAN != 0;
        let fill = if self.ctrl_vlan { 0 } else { u32::MAX };
        self.vlans.iter_mut().for_each(|w| *w = fill);
    }

    /// The MAC address the device has now.
    pub fn mac(&self) -> [u8; 6] {
        self.filter.mac
    }

    /// Active queue pairs.
    pub fn curr_pairs(&self) -> u16 {
        self.curr_pairs
    }

    /// The filter as the monitor and `query-rx-filter` see it.
    pub fn filter(&self) -> RxFilter {
        let mut f = self.filter.clone();
        f.vlan_filtering = self.ctrl_vlan;
        f.vlans = if self.ctrl_vlan {
            (0..MAX_VLAN).filter(|v| self.vlan_set(*v)).collect()
        } else {
            Vec::new()
        };
        f
    }

    fn vlan_set(&self, vid: u16) -> bool {
        self.vlans
            .get(usize::from(vid >> 5))
            .is_some_and(|w| w & (1 << (vid & 0x1f)) != 0)
    }

    /// Executes one command: `out` is everything the driver wrote (class, command, payload).
    pub fn command(&mut self, out: &[u8]) -> (u8, Effect) {
        let [class, cmd, payload @ ..] = out else {
            return (ERR, Effect::None);
        };
        let r = match *class {
            CLASS_RX => self.rx_mode(*cmd, payload),
            CLASS_MAC => self.mac_cmd(*cmd, payload),
            CLASS_VLAN => self.vlan(*cmd, payload),
            // The device never sets VIRTIO_NET_S_ANNOUNCE (nothing migrates), so there is
            // nothing to acknowledge: QEMU answers an ack without a pending announce with ERR.
            CLASS_ANNOUNCE => None,
            CLASS_MQ => self.mq_cmd(*cmd, payload),
            // VIRTIO_NET_CTRL_GUEST_OFFLOADS (not offered) and anything unknown.
            _ => None,
        };
        match r {
            Some(effect) => (OK, effect),
            None => (ERR, Effect::None),
        }
    }

    fn rx_mode(&mut self, cmd: u8, payload: &[u8]) -> Option<Effect> {
        // QEMU reads one byte and ignores anything after it.
        let on = *payload.first()? != 0;
        let f = &mut self.filter;
        let flag = match cmd {
            RX_PROMISC => &mut f.promisc,
            RX_ALLMULTI => &mut f.allmulti,
            RX_ALLUNI => &mut f.alluni,
            RX_NOMULTI => &mut f.nomulti,
            RX_NOUNI => &mut f.nouni,
            RX_NOBCAST => &mut f.nobcast,
            _ => return None,
        };
        *flag = on;
        Some(Effect::Filter)
    }

    fn mac_cmd(&mut self, cmd: u8, payload: &[u8]) -> Option<Effect> {
        match cmd {
            MAC_ADDR_SET => {
                self.filter.mac = <[u8; 6]>::try_from(payload).ok()?;
                Some(Effect::Filter)
            }
            MAC_TABLE_SET => {
                let (uni, rest, uni_overflow) = mac_list(payload, MAC_TABLE_ENTRIES)?;
                let room = MAC_TABLE_ENTRIES - uni.len();
                let (multi, rest, multi_overflow) = mac_list(rest, room)?;
                // The multicast list must end the command exactly (the unicast one need not).
                if !rest.is_empty() {
                    return None;
                }
                let f = &mut self.filter;
                f.unicast = uni;
                f.multicast = multi;
                f.unicast_overflow = uni_overflow;
                f.multicast_overflow = multi_overflow;
                Some(Effect::Filter)
            }
            _ => None,
        }
    }

    fn vlan(&mut self, cmd: u8, payload: &[u8]) -> Option<Effect> {
        let vid = u16::from_le_bytes([*payload.first()?, *payload.get(1)?]);
        if vid >= MAX_VLAN {
            return None;
        }
        let word = self.vlans.get_mut(usize::from(vid >> 5))?;
        let bit = 1u32 << (vid & 0x1f);
        match cmd {
            VLAN_ADD => *word |= bit,
            VLAN_DEL => *word &= !bit,
            _ => return None,
        }
        Some(Effect::Filter)
    }

    fn mq_cmd(&mut self, cmd: u8, payload: &[u8]) -> Option<Effect> {
        let pairs = u16::from_le_bytes([*payload.first()?, *payload.get(1)?]);
        if cmd != MQ_VQ_PAIRS_SET
            || !(1..=MQ_PAIRS_MAX).contains(&pairs)
            || pairs > self.max_pairs
            || !self.mq
        {
            return None;
        }
        self.curr_pairs = pairs;
        Some(Effect::Pairs(pairs))
    }
}

/// A parsed MAC list: the addresses kept, what follows it, and whether it overflowed.
type MacList<'a> = (Vec<[u8; 6]>, &'a [u8], bool);

/// One `struct virtio_net_ctrl_mac` (`le32 entries; u8 macs[entries][6]`) at the start of
/// `data`: the addresses if at most `room` (else none, and overflow), the rest of `data`.
/// `None` when `data` is shorter than the list says.
fn mac_list(data: &[u8], room: usize) -> Option<MacList<'_>> {
    let (count, rest) = data.split_first_chunk::<4>()?;
    let entries = usize::try_from(u32::from_le_bytes(*count)).ok()?;
    let bytes = entries.checked_mul(6)?;
    if bytes > rest.len() {
        return None;
    }
    let (list, rest) = rest.split_at(bytes);
    if entries > room {
        return Some((Vec::new(), rest, true));
    }
    let macs = list
        .chunks_exact(6)
        .filter_map(|c| <[u8; 6]>::try_from(c).ok())
        .collect();
    Some((macs, rest, false))
}

/// What one pass over the control queue did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Processed {
    /// Chains returned to the driver.
    pub chains: usize,
    /// Chains that were malformed (returned with length 0, no status).
    pub malformed: usize,
    /// Some command changed the rx filter.
    pub filter_changed: bool,
    /// The last `VQ_PAIRS_SET` that succeeded.
    pub pairs: Option<u16>,
    /// The driver wants an interrupt.
    pub notify: bool,
}

/// Answers every chain available on the control queue `queue`. Never reads or writes outside
/// guest memory, never loops on a malformed ring: a ring the crate cannot walk ends the pass.
pub fn process(queue: &mut Queue, mem: &GuestMem, ctrl: &mut NetCtrl) -> Processed {
    let mut done = Processed::default();
    // At most one queue's worth per kick: a driver that keeps refilling cannot hold the vCPU.
    for _ in 0..queue.size() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let (status, written) = match one(&chain, mem, ctrl, &mut done) {
            Some(s) => s,
            None => {
                done.malformed += 1;
                (ERR, 0)
            }
        };
        log::trace!("control command on chain {head}: status {status}");
        if let Err(e) = queue.add_used(mem, head, written) {
            log::warn!("control queue: cannot return chain {head}: {e}");
            break;
        }
        done.chains += 1;
    }
    if done.chains > 0 {
        done.notify = queue.needs_notification(mem).unwrap_or(true);
    }
    done
}

/// One chain: the command from its readable part, the status into its writable part. `None`
/// when the chain cannot be used at all (descriptors outside memory, no room for the status).
fn one(
    chain: &virtio_queue::DescriptorChain<&GuestMem>,
    mem: &GuestMem,
    ctrl: &mut NetCtrl,
    done: &mut Processed,
) -> Option<(u8, u32)> {
    use std::io::Read;
    let mut reader = chain.clone().reader(mem).ok()?;
    let mut writer = chain.clone().writer(mem).ok()?;
    if writer.available_bytes() < 1 {
        return None;
    }
    let status = if reader.available_bytes() > MAX_COMMAND {
        ERR
    } else {
        let mut out = Vec::with_capacity(reader.available_bytes());
        reader.read_to_end(&mut out).ok()?;
        let (status, effect) = ctrl.command(&out);
        match effect {
            Effect::None => {}
            Effect::Filter => done.filter_changed = true,
            Effect::Pairs(n) => done.pairs = Some(n),
        }
        status
    };
    writer.write_obj(status).ok()?;
    Some((status, 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn cmd(class: u8, cmd: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![class, cmd];
        v.extend_from_slice(payload);
        v
    }

    fn table(uni: &[[u8; 6]], multi: &[[u8; 6]]) -> Vec<u8> {
        let mut v = Vec::new();
        for list in [uni, multi] {
            v.extend_from_slice(&(list.len() as u32).to_le_bytes());
            for m in list {
                v.extend_from_slice(m);
            }
        }
        v
    }

    #[test]
    fn rx_modes_set_and_clear_each_flag() {
        let mut c = NetCtrl::new(MAC, 1);
        assert!(c.filter().promisc);
        assert_eq!(c.command(&cmd(0, 0, &[0])), (OK, Effect::Filter));
        assert!(!c.filter().promisc);
        for (n, get) in [
            (1u8, (|f: &RxFilter| f.allmulti) as fn(&RxFilter) -> bool),
            (2, |f| f.alluni),
            (3, |f| f.nomulti),
            (4, |f| f.nouni),
            (5, |f| f.nobcast),
        ] {
            assert_eq!(c.command(&cmd(0, n, &[1])), (OK, Effect::Filter));
            assert!(get(&c.filter()), "flag {n}");
            c.command(&cmd(0, n, &[0]));
            assert!(!get(&c.filter()), "flag {n}");
        }
        // Unknown rx command, missing payload, missing command byte.
        assert_eq!(c.command(&cmd(0, 6, &[1])).0, ERR);
        assert_eq!(c.command(&cmd(0, 0, &[])).0, ERR);
        assert_eq!(c.command(&[0]).0, ERR);
        assert_eq!(c.command(&[]).0, ERR);
    }

    #[test]
    fn mac_table_follows_qemu_s_rules() {
        let mut c = NetCtrl::new(MAC, 1);
        let u = [2, 0, 0, 0, 0, 1];
        let m1 = [0x01, 0x00, 0x5e, 0, 0, 1];
        let m2 = [0x33, 0x33, 0, 0, 0, 1];
        assert_eq!(c.command(&cmd(1, 0, &table(&[u], &[m1, m2]))).0, OK);
        let f = c.filter();
        assert_eq!((f.unicast, f.multicast), (vec![u], vec![m1, m2]));
        // Trailing bytes after the multicast list: refused, state kept.
        let mut t = table(&[], &[m1]);
        t.push(0);
        assert_eq!(c.command(&cmd(1, 0, &t)).0, ERR);
        assert_eq!(c.filter().multicast, vec![m1, m2]);
        // A list longer than the data: refused.
        let mut t = table(&[], &[]);
        t[0] = 2;
        assert_eq!(c.command(&cmd(1, 0, &t)).0, ERR);
        // Huge counts cannot overflow the arithmetic.
        let mut t = vec![0xff; 4];
        t.extend_from_slice(&[0; 4]);
        assert_eq!(c.command(&cmd(1, 0, &t)).0, ERR);
        // Cut short.
        assert_eq!(c.command(&cmd(1, 0, &[1, 0])).0, ERR);
        // Overflow: more than 64 unicast entries are dropped and flagged.
        let many: Vec<[u8; 6]> = (0..65u8).map(|i| [2, 0, 0, 0, 1, i]).collect();
        assert_eq!(c.command(&cmd(1, 0, &table(&many, &[m1]))).0, OK);
        let f = c.filter();
        assert!(f.unicast_overflow && !f.multicast_overflow);
        assert_eq!((f.unicast.len(), f.multicast), (0, vec![m1]));
        // Multicast overflow counts the room the unicast list left.
        let sixty: Vec<[u8; 6]> = many[..60].to_vec();
        let five: Vec<[u8; 6]> = (0..5u8).map(|i| [1, 0, 0x5e, 0, 0, i]).collect();
        assert_eq!(c.command(&cmd(1, 0, &table(&sixty, &five))).0, OK);
        let f = c.filter();
        assert!(!f.unicast_overflow && f.multicast_overflow);
        assert_eq!((f.unicast.len(), f.multicast.len()), (60, 0));
    }

    #[test]
    fn mac_address_set_needs_exactly_six_bytes_and_reset_restores_it() {
        let mut c = NetCtrl::new(MAC, 1);
        let new = [2, 1, 2, 3, 4, 5];
        assert_eq!(c.command(&cmd(1, 1, &new)), (OK, Effect::Filter));
        assert_eq!(c.mac(), new);
        assert_eq!(c.command(&cmd(1, 1, &new[..5])).0, ERR);
        assert_eq!(c.command(&cmd(1, 1, &[0; 7])).0, ERR);
        assert_eq!(c.command(&cmd(1, 2, &new)).0, ERR);
        c.command(&cmd(0, 0, &[0]));
        c.reset();
        assert_eq!(c.filter(), RxFilter::reset(MAC));
    }

    #[test]
    fn vlans_filter_only_with_ctrl_vlan() {
        let mut c = NetCtrl::new(MAC, 1);
        c.set_features(F_CTRL_VLAN);
        assert!(c.filter().vlan_filtering && c.filter().vlans.is_empty());
        assert_eq!(c.command(&cmd(2, 0, &100u16.to_le_bytes())).0, OK);
        assert_eq!(c.command(&cmd(2, 0, &4095u16.to_le_bytes())).0, OK);
        assert_eq!(c.command(&cmd(2, 0, &4096u16.to_le_bytes())).0, ERR);
        assert_eq!(c.command(&cmd(2, 0, &[1])).0, ERR);
        assert_eq!(c.command(&cmd(2, 2, &5u16.to_le_bytes())).0, ERR);
        assert_eq!(c.filter().vlans, vec![100, 4095]);
        assert_eq!(c.command(&cmd(2, 1, &100u16.to_le_bytes())).0, OK);
        assert_eq!(c.filter().vlans, vec![4095]);
        c.set_features(0);
        assert!(!c.filter().vlan_filtering);
    }

    #[test]
    fn queue_pairs_need_mq_and_a_count_in_range() {
        let mut c = NetCtrl::new(MAC, 4);
        let set = |n: u16| cmd(4, 0, &n.to_le_bytes());
        assert_eq!(c.command(&set(2)).0, ERR, "MQ not negotiated");
        c.set_features(F_MQ);
        assert_eq!(c.command(&set(2)), (OK, Effect::Pairs(2)));
        assert_eq!(c.curr_pairs(), 2);
        for bad in [0, 5, 0x8001, u16::MAX] {
            assert_eq!(c.command(&set(bad)).0, ERR, "{bad}");
        }
        assert_eq!(c.command(&cmd(4, 1, &2u16.to_le_bytes())).0, ERR, "RSS");
        assert_eq!(c.command(&cmd(4, 0, &[1])).0, ERR, "short");
        assert_eq!(c.command(&cmd(3, 0, &[])).0, ERR, "announce");
        assert_eq!(c.command(&cmd(5, 0, &[0; 8])).0, ERR, "offloads");
        assert_eq!(c.command(&cmd(0xff, 0, &[])).0, ERR);
        c.reset();
        assert_eq!(c.curr_pairs(), 1);
    }

    // --- The queue walk, on real guest memory with hostile rings. ---

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const QSIZE: u16 = 8;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory")
    }

    fn queue() -> Queue {
        let mut q = Queue::new(QSIZE).expect("queue");
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        q
    }

    fn desc(mem: &GuestMem, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(table + 16 * u64::from(i));
        mem.write_obj(addr, at).expect("addr");
        mem.write_obj(len, GuestAddress(at.0 + 8)).expect("len");
        mem.write_obj(flags, GuestAddress(at.0 + 12))
            .expect("flags");
        mem.write_obj(next, GuestAddress(at.0 + 14)).expect("next");
    }

    /// Makes `heads` available.
    fn publish(mem: &GuestMem, heads: &[u16]) {
        for (i, h) in heads.iter().enumerate() {
            mem.write_obj(*h, GuestAddress(AVAIL + 4 + 2 * i as u64))
                .expect("ring");
        }
        mem.write_obj(heads.len() as u16, GuestAddress(AVAIL + 2))
            .expect("idx");
    }

    fn used(mem: &GuestMem, i: u64) -> (u32, u32) {
        let at = USED + 4 + 8 * i;
        (
            mem.read_obj(GuestAddress(at)).expect("id"),
            mem.read_obj(GuestAddress(at + 4)).expect("len"),
        )
    }

    #[test]
    fn a_well_formed_command_is_answered_and_reported() {
        let m = mem();
        let mut q = queue();
        let mut c = NetCtrl::new(MAC, 1);
        // Header and payload in two descriptors, status in a third.
        m.write_slice(&[0, 0], GuestAddress(0x8000)).expect("hdr");
        m.write_slice(&[0], GuestAddress(0x8100)).expect("on");
        m.write_obj(0xaau8, GuestAddress(0x8200)).expect("status");
        desc(&m, DESC, 0, 0x8000, 2, F_NEXT, 1);
        desc(&m, DESC, 1, 0x8100, 1, F_NEXT, 2);
        desc(&m, DESC, 2, 0x8200, 1, F_WRITE, 0);
        publish(&m, &[0]);
        let p = process(&mut q, &m, &mut c);
        assert_eq!((p.chains, p.malformed, p.filter_changed), (1, 0, true));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x8200)).expect("st"), OK);
        assert_eq!(used(&m, 0), (0, 1));
        assert!(!c.filter().promisc);
    }

    #[test]
    fn hostile_chains_get_errors_or_length_zero_never_a_hang() {
        let m = mem();
        let mut q = queue();
        let mut c = NetCtrl::new(MAC, 1);
        // 0: no writable descriptor at all.
        m.write_slice(&[0, 0, 1], GuestAddress(0x8000))
            .expect("cmd");
        desc(&m, DESC, 0, 0x8000, 3, 0, 0);
        // 1: a loop (1 -> 2 -> 1).
        desc(&m, DESC, 1, 0x8000, 3, F_NEXT, 2);
        desc(&m, DESC, 2, 0x8000, 3, F_NEXT, 1);
        // 3: a readable descriptor outside guest memory, then a status byte.
        desc(&m, DESC, 3, 0xffff_0000, 3, F_NEXT, 4);
        desc(&m, DESC, 4, 0x8200, 1, F_WRITE, 0);
        // 5: an unknown class with a status byte: ERR.
        m.write_slice(&[9, 9], GuestAddress(0x8300)).expect("cmd");
        desc(&m, DESC, 5, 0x8300, 2, F_NEXT, 6);
        desc(&m, DESC, 6, 0x8400, 1, F_WRITE, 0);
        // 7: an indirect table pointing outside memory.
        desc(&m, DESC, 7, 0xffff_f000, 64, F_INDIRECT, 0);
        publish(&m, &[0, 1, 3, 5, 7]);
        let p = process(&mut q, &m, &mut c);
        assert_eq!(p.chains, 5, "{p:?}");
        assert!(!p.filter_changed, "{p:?}");
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x8400)).expect("st"), ERR);
        assert_eq!(used(&m, 0), (0, 0));
        assert_eq!(used(&m, 3), (5, 1));
        assert!(c.filter().promisc, "no command took effect");
        // An avail index far beyond the ring size is refused by the crate: nothing popped.
        m.write_obj(1000u16, GuestAddress(AVAIL + 2)).expect("idx");
        let p = process(&mut q, &m, &mut c);
        assert_eq!(p.chains, 0);
    }

    #[test]
    fn an_oversize_command_gets_err_without_being_read() {
        let m = mem();
        let mut q = queue();
        let mut c = NetCtrl::new(MAC, 1);
        desc(&m, DESC, 0, 0x10000, (MAX_COMMAND + 1) as u32, F_NEXT, 1);
        desc(&m, DESC, 1, 0x8200, 1, F_WRITE, 0);
        publish(&m, &[0]);
        let p = process(&mut q, &m, &mut c);
        assert_eq!((p.chains, p.malformed), (1, 0));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x8200)).expect("st"), ERR);
    }
}
