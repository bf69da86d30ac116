//! MSI-X: each device's vector table as the guest programs it, and the VM-wide GSI routing
//! table that turns a vector into a KVM MSI route. A virtio queue's interrupt is a KVM irqfd on
//! the GSI of the vector the guest gave the queue, so the back end's call eventfd raises the
//! guest interrupt without passing through this process.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

/// First GSI handed out for MSI routes (0..24 are the IOAPIC pins).
const FIRST_MSI_GSI: u32 = 24;
/// Last GSI we hand out (KVM allows 4096 routes on x86).
const LAST_MSI_GSI: u32 = 4095;
/// Size of one MSI-X table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Vector control: masked.
const ENTRY_MASKED: u32 = 1;

/// Errors routing interrupts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Every GSI is in use.
    #[error("out of GSIs for MSI routes")]
    NoGsi,
    /// KVM refused the routing table.
    #[error("KVM_SET_GSI_ROUTING failed: {0}")]
    Routing(kvm_ioctls::Error),
    /// The routing table could not be built.
    #[error("cannot build the GSI routing table: {0}")]
    Table(String),
}

/// The VM's GSI routing: KVM's default IOAPIC/PIC routes plus one MSI route per allocated
/// vector. `KVM_SET_GSI_ROUTING` replaces the whole table, so every change rewrites it all.
pub struct IrqRouter {
    vm: Arc<VmFd>,
    inner: Mutex<RouterInner>,
}

struct RouterInner {
    next: u32,
    free: Vec<u32>,
    msi: BTreeMap<u32, (u64, u32)>,
}

impl IrqRouter {
    /// A router with only the default routes.
    pub fn new(vm: Arc<VmFd>) -> Self {
        IrqRouter {
            vm,
            inner: Mutex::new(RouterInner {
                next: FIRST_MSI_GSI,
                free: Vec::new(),
                msi: BTreeMap::new(),
            }),
        }
    }

    /// The VM fd (for irqfd and ioeventfd registration).
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `n` GSIs (routed nowhere until [`IrqRouter::set_msi`]).
    pub fn allocate(&self, n: usize) -> Result<Vec<u32>, Error> {
        let mut g = self.lock();
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let gsi = match g.free.pop() {
                Some(gsi) => gsi,
                None if g.next <= LAST_MSI_GSI => {
                    g.next += 1;
                    g.next - 1
                }
                None => {
                    g.free.extend(out);
                    return Err(Error::NoGsi);
                }
            };
            out.push(gsi);
        }
        Ok(out)
    }

    /// Returns GSIs (their routes go).
    pub fn release(&self, gsis: &[u32]) -> Result<(), Error> {
        let mut g = self.lock();
        for gsi in gsis {
            g.msi.remove(gsi);
            g.free.push(*gsi);
        }
        self.commit(&g)
    }

    /// Routes `gsi` to the MSI message (`address`, `data`), or removes its route (`None`).
    pub fn set_msi(&self, gsi: u32, msg: Option<(u64, u32)>) -> Result<(), Error> {
        let mut g = self.lock();
        let changed = match msg {
            Some(m) => g.msi.insert(gsi, m) != Some(m),
            None => g.msi.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&g)
        } else {
            Ok(())
        }
    }

    fn commit(&self, g: &RouterInner) -> Result<(), Error> {
        let mut entries = default_routes();
        for (gsi, (addr, data)) in &g.msi {
            let mut e = kvm_irq_routing_entry {
                gsi: *gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = *addr as u32;
            e.u.msi.address_hi = (*addr >> 32) as u32;
            e.u.msi.data = *data;
            entries.push(e);
        }
        let mut table =
            KvmIrqRouting::new(entries.len()).map_err(|e| Error::Table(format!("{e:?}")))?;
        table.as_mut_slice().copy_from_slice(&entries);
        self.vm.set_gsi_routing(&table).map_err(Error::Routing)
    }
}

/// KVM's built-in routes: GSI 0..16 to both PICs' pins and the IOAPIC, 16..24 to the IOAPIC.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let chip = |gsi: u32, irqchip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = irqchip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut v = Vec::with_capacity(40);
    for gsi in 0..24 {
        if gsi < 8 {
            v.push(chip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            v.push(chip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        v.push(chip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    v
}

/// One MSI-X table entry as the guest wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Message address.
    pub addr: u64,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            addr: 0,
            data: 0,
            control: ENTRY_MASKED,
        }
    }
}

impl Entry {
    /// Whether the vector is masked.
    pub fn masked(&self) -> bool {
        self.control & ENTRY_MASKED != 0
    }
}

/// A device's MSI-X table. Accesses are dword (or qword) sized and aligned, as the PCI spec
/// requires; anything else reads as zero and writes nothing.
#[derive(Debug, Clone)]
pub struct MsixTable {
    entries: Vec<Entry>,
}

impl MsixTable {
    /// `n` masked entries.
    pub fn new(n: usize) -> Self {
        MsixTable {
            entries: vec![Entry::default(); n],
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entry `v`.
    pub fn entry(&self, v: usize) -> Option<&Entry> {
        self.entries.get(v)
    }

    /// All entries masked and zeroed (function reset).
    pub fn reset(&mut self) {
        self.entries.fill(Entry::default());
    }

    /// Guest read at `offset` into the table.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(words) = self.words(offset, data.len()) else {
            return;
        };
        for (i, w) in words.into_iter().enumerate() {
            data[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
    }

    fn words(&self, offset: u64, len: usize) -> Option<Vec<u32>> {
        if !(len == 4 || len == 8) || offset % len as u64 != 0 {
            return None;
        }
        let e = self.entries.get((offset / ENTRY_SIZE) as usize)?;
        let all = [e.addr as u32, (e.addr >> 32) as u32, e.data, e.control];
        let first = ((offset % ENTRY_SIZE) / 4) as usize;
        Some(all[first..first + len / 4].to_vec())
    }

    /// Guest write at `offset`; returns the index of the entry it changed.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<usize> {
        let len = data.len();
        if !(len == 4 || len == 8) || offset % len as u64 != 0 {
            return None;
        }
        let index = (offset / ENTRY_SIZE) as usize;
        let e = self.entries.get_mut(index)?;
        let before = *e;
        let first = ((offset % ENTRY_SIZE) / 4) as usize;
        for (word, chunk) in (first..).zip(data.chunks_exact(4)) {
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            match word {
                0 => e.addr = (e.addr & !0xffff_ffff) | u64::from(v),
                1 => e.addr = (e.addr & 0xffff_ffff) | (u64::from(v) << 32),
                2 => e.data = v,
                _ => e.control = v & ENTRY_MASKED,
            }
        }
        (*e != before).then_some(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips_and_ignores_bad_accesses() {
        let mut t = MsixTable::new(2);
        assert!(t.entry(0).is_some_and(|e| e.masked()));
        assert_eq!(t.write(16, &0xfee0_0000u32.to_le_bytes()), Some(1));
        assert_eq!(t.write(24, &0x4041u32.to_le_bytes()), Some(1));
        assert_eq!(t.write(28, &0u32.to_le_bytes()), Some(1));
        let e = *t.entry(1).expect("entry 1");
        assert_eq!((e.addr, e.data, e.masked()), (0xfee0_0000, 0x4041, false));
        let mut b = [0u8; 8];
        t.read(16, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0xfee0_0000);
        assert_eq!(t.write(3, &[1, 2, 3, 4]), None);
        assert_eq!(t.write(32, &[1, 2, 3, 4]), None);
        assert_eq!(t.write(16, &[1, 2]), None);
        t.read(1 << 40, &mut b[..4]);
        assert_eq!(&b[..4], &[0, 0, 0, 0]);
        t.reset();
        assert!(t.entry(1).is_some_and(|e| e.masked() && e.addr == 0));
    }

    #[test]
    fn default_routes_cover_the_ioapic_and_pics() {
        let r = default_routes();
        assert_eq!(r.len(), 16 * 2 + 8);
        assert!(r.iter().any(|e| e.gsi == 23));
    }
}
