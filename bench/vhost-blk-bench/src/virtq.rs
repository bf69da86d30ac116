//! The driver half of a split virtqueue (virtio 1.2, 2.7): this side writes descriptors and the
//! available ring and reads the used ring, as a guest's virtio driver does.
//!
//! Notifications follow the spec both ways. Without `VIRTIO_RING_F_EVENT_IDX` a kick is needed
//! unless the device set `VRING_USED_F_NO_NOTIFY`, and the device interrupts after every batch.
//! With it, the driver kicks only when the new available index passes the device's
//! `avail_event`, and asks for an interrupt at the next used entry by writing `used_event` before
//! it sleeps (what Linux's `virtqueue_enable_cb` does).

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{Error, Result};

/// `VRING_DESC_F_NEXT`.
pub const DESC_F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`: the device writes the buffer.
pub const DESC_F_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`: the buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;
/// `VRING_USED_F_NO_NOTIFY`.
const USED_F_NO_NOTIFY: u16 = 1;
/// Size of one descriptor.
pub const DESC_SIZE: u64 = 16;

/// One descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Its length.
    pub len: u32,
    /// `DESC_F_*`.
    pub flags: u16,
    /// Next descriptor of the chain (with `DESC_F_NEXT`).
    pub next: u16,
}

/// Writes descriptor `i` of the table at `table`.
pub fn write_desc(mem: &GuestMemoryMmap, table: GuestAddress, i: u16, d: Descriptor) -> Result<()> {
    let mut b = [0u8; DESC_SIZE as usize];
    b[..8].copy_from_slice(&d.addr.to_le_bytes());
    b[8..12].copy_from_slice(&d.len.to_le_bytes());
    b[12..14].copy_from_slice(&d.flags.to_le_bytes());
    b[14..].copy_from_slice(&d.next.to_le_bytes());
    let at = GuestAddress(table.0 + u64::from(i) * DESC_SIZE);
    mem.write_slice(&b, at).map_err(mem_err)
}

fn mem_err(e: vm_memory::GuestMemoryError) -> Error {
    Error::Memory(e.to_string())
}

/// Where a queue's three parts live in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Number of entries (a power of two).
    pub size: u16,
    /// Descriptor table (`16 * size` bytes, 16-byte aligned).
    pub desc: GuestAddress,
    /// Available ring (`6 + 2 * size` bytes, 2-byte aligned).
    pub avail: GuestAddress,
    /// Used ring (`6 + 8 * size` bytes, 4-byte aligned).
    pub used: GuestAddress,
}

impl Layout {
    /// The three parts one after another from `base` (page aligned), each starting on a page.
    pub fn at(base: u64, size: u16) -> Result<Layout> {
        if !size.is_power_of_two() {
            return Err(Error::Config(format!(
                "queue size {size} is not a power of two"
            )));
        }
        let page = |n: u64| n.div_ceil(4096) * 4096;
        let s = u64::from(size);
        let desc = base;
        let avail = desc + page(DESC_SIZE * s);
        let used = avail + page(6 + 2 * s);
        Ok(Layout {
            size,
            desc: GuestAddress(desc),
            avail: GuestAddress(avail),
            used: GuestAddress(used),
        })
    }

    /// First byte after the used ring.
    pub fn end(&self) -> u64 {
        self.used.0 + 6 + 8 * u64::from(self.size)
    }

    fn avail_ring(&self, i: u16) -> GuestAddress {
        GuestAddress(self.avail.0 + 4 + 2 * u64::from(i % self.size))
    }

    /// `used_event`, after the available ring's entries.
    fn used_event(&self) -> GuestAddress {
        GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.size))
    }

    fn used_ring(&self, i: u16) -> GuestAddress {
        GuestAddress(self.used.0 + 4 + 8 * u64::from(i % self.size))
    }

    /// `avail_event`, after the used ring's entries.
    fn avail_event(&self) -> GuestAddress {
        GuestAddress(self.used.0 + 4 + 8 * u64::from(self.size))
    }
}

/// `vring_need_event`: whether moving an index from `old` to `new` passes `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The driver's view of one queue.
#[derive(Debug)]
pub struct Driver {
    layout: Layout,
    event_idx: bool,
    /// Next available index to fill (the shadow of `avail.idx`).
    next_avail: u16,
    /// `avail.idx` as last published.
    published: u16,
    /// Next used index to read.
    next_used: u16,
}

impl Driver {
    /// A driver for a queue at `layout` whose rings are zeroed (fresh guest memory).
    pub fn new(layout: Layout, event_idx: bool) -> Driver {
        Driver {
            layout,
            event_idx,
            next_avail: 0,
            published: 0,
            next_used: 0,
        }
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Puts chain `head` on the available ring (not yet visible to the device).
    pub fn add(&mut self, mem: &GuestMemoryMmap, head: u16) -> Result<()> {
        mem.write_obj(head.to_le(), self.layout.avail_ring(self.next_avail))
            .map_err(mem_err)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(())
    }

    /// Publishes what [`Driver::add`] put on the ring; returns whether the device wants a kick.
    pub fn publish(&mut self, mem: &GuestMemoryMmap) -> Result<bool> {
        let (old, new) = (self.published, self.next_avail);
        if old == new {
            return Ok(false);
        }
        // Descriptors and ring entries before the index (virtio_wmb).
        fence(Ordering::SeqCst);
        mem.store(
            new.to_le(),
            GuestAddress(self.layout.avail.0 + 2),
            Ordering::Release,
        )
        .map_err(mem_err)?;
        self.published = new;
        // The index before reading the device's suppression state (virtio_mb).
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event: u16 = mem
                .load(self.layout.avail_event(), Ordering::Acquire)
                .map_err(mem_err)?;
            Ok(need_event(u16::from_le(event), new, old))
        } else {
            let flags: u16 = mem
                .load(self.layout.used, Ordering::Acquire)
                .map_err(mem_err)?;
            Ok(u16::from_le(flags) & USED_F_NO_NOTIFY == 0)
        }
    }

    /// The next used entry, `(id, len)`, if the device has put one there.
    pub fn next_used(&mut self, mem: &GuestMemoryMmap) -> Result<Option<(u32, u32)>> {
        let idx: u16 = mem
            .load(GuestAddress(self.layout.used.0 + 2), Ordering::Acquire)
            .map_err(mem_err)?;
        if u16::from_le(idx) == self.next_used {
            return Ok(None);
        }
        // The entry after the index (virtio_rmb).
        fence(Ordering::Acquire);
        let mut e = [0u8; 8];
        mem.read_slice(&mut e, self.layout.used_ring(self.next_used))
            .map_err(mem_err)?;
        self.next_used = self.next_used.wrapping_add(1);
        Ok(Some((
            u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
            u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
        )))
    }

    /// Whether a used entry is waiting (without taking it).
    pub fn pending(&self, mem: &GuestMemoryMmap) -> Result<bool> {
        let idx: u16 = mem
            .load(GuestAddress(self.layout.used.0 + 2), Ordering::Acquire)
            .map_err(mem_err)?;
        Ok(u16::from_le(idx) != self.next_used)
    }

    /// Asks for an interrupt at the next used entry (with `EVENT_IDX`; without it the device
    /// interrupts anyway). Call before sleeping, then look at the used ring once more.
    pub fn arm(&self, mem: &GuestMemoryMmap) -> Result<()> {
        if self.event_idx {
            mem.store(
                self.next_used.to_le(),
                self.layout.used_event(),
                Ordering::Release,
            )
            .map_err(mem_err)?;
            // used_event before the re-check of used.idx (virtio_mb).
            fence(Ordering::SeqCst);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_the_spec_formula() {
        // Device wants a kick when the index passes 5.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 8, 3));
        assert!(!need_event(5, 5, 3));
        assert!(!need_event(9, 8, 3));
        // Across the wrap.
        assert!(need_event(65535, 2, 65534));
        assert!(!need_event(3, 2, 65534));
    }

    #[test]
    fn layout_puts_each_part_on_its_own_page() {
        let l = Layout::at(0, 256).expect("layout");
        assert_eq!(l.desc.0, 0);
        assert_eq!(l.avail.0, 4096);
        assert_eq!(l.used.0, 8192);
        assert_eq!(l.end(), 8192 + 6 + 8 * 256);
        assert!(Layout::at(0, 100).is_err());
    }
}
