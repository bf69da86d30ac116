//! The PCI bus: one root bus (bus 0, function 0 of each slot only) behind a host bridge,
//! reachable through both the legacy `0xCF8`/`0xCFC` configuration mechanism and an ECAM
//! window the MCFG table describes, and the 32-bit MMIO window the devices' BARs live in.
//! [`PciRoot`] owns the devices; [`ConfigIo`], [`Ecam`] and [`MmioWindow`] are its faces on
//! the port-I/O and MMIO buses. Devices are plugged and unplugged by slot while the guest is
//! stopped; no guest access can reach a slot that is empty or a function other than 0.

pub mod config;
pub mod msix;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::devices::BusDevice;
use config::{Header, PciConfig};

/// Legacy configuration address port.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// Ports of the legacy mechanism (address + data).
pub const CONFIG_IO_LEN: u64 = 8;
/// ECAM base (bus 0 only).
pub const ECAM_BASE: u64 = 0xe000_0000;
/// ECAM size for one bus.
pub const ECAM_SIZE: u64 = 1 << 20;
/// The 32-bit MMIO window BARs are placed in.
pub const MMIO_WINDOW_START: u64 = crate::memory::MMIO_HOLE_START;
/// End (exclusive) of the BAR window.
pub const MMIO_WINDOW_END: u64 = ECAM_BASE;
/// The BAR space each slot's device gets at power-on.
pub const SLOT_WINDOW: u64 = 1 << 20;
/// Slots on the bus (0 is the host bridge).
pub const SLOTS: u8 = 32;

const _: () = assert!(MMIO_WINDOW_START + SLOTS as u64 * SLOT_WINDOW <= MMIO_WINDOW_END);

/// A PCI function on the root bus.
pub trait PciDevice: Send {
    /// Configuration read at byte `offset` (0..4096; beyond 256 reads as zero).
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// Configuration write at byte `offset`.
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// BAR0's address and size while memory decoding is on.
    fn bar0(&self) -> Option<(u64, u64)>;
    /// Read at `offset` into BAR0.
    fn bar_read(&mut self, offset: u64, data: &mut [u8]);
    /// Write at `offset` into BAR0.
    fn bar_write(&mut self, offset: u64, data: &[u8]);
    /// Machine reset: back to power-on state.
    fn reset(&mut self);
    /// Unplug: release what the device holds in the VM (irqfds, ioeventfds, routes).
    fn unplug(&mut self) {}
}

/// The host bridge at slot 0.
struct HostBridge {
    config: PciConfig,
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if offset < config::CONFIG_SIZE {
            self.config.read(offset, data);
        } else {
            data.fill(0);
        }
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn bar0(&self) -> Option<(u64, u64)> {
        None
    }
    fn bar_read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _offset: u64, _data: &[u8]) {}
    fn reset(&mut self) {}
}

/// Errors plugging devices.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The slot is outside 1..32.
    #[error("PCI slot {0} is not available (1..=31)")]
    BadSlot(u8),
    /// The slot is taken.
    #[error("PCI slot {0} is already in use")]
    SlotBusy(u8),
    /// Nothing in that slot.
    #[error("PCI slot {0} is empty")]
    SlotEmpty(u8),
}

/// A shared device.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// The root bus.
pub struct PciRoot {
    slots: BTreeMap<u8, SharedPciDevice>,
    config_address: u32,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(d: &SharedPciDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

impl PciRoot {
    /// A bus holding only the host bridge.
    pub fn new() -> Self {
        let bridge = HostBridge {
            config: PciConfig::new(Header {
                // Red Hat's "QEMU PCIe host bridge" id: an id guests know needs no driver.
                vendor: 0x1b36,
                device: 0x0008,
                revision: 0,
                class: 0x06_0000,
                subsystem_vendor: 0x1af4,
                subsystem: 0x1100,
            }),
        };
        let mut slots: BTreeMap<u8, SharedPciDevice> = BTreeMap::new();
        slots.insert(0, Arc::new(Mutex::new(bridge)));
        PciRoot {
            slots,
            config_address: 0,
        }
    }

    /// The power-on BAR0 address for a device in `slot`.
    pub fn slot_bar_base(slot: u8) -> u64 {
        MMIO_WINDOW_START + u64::from(slot) * SLOT_WINDOW
    }

    /// Plugs `dev` into `slot`.
    pub fn plug(&mut self, slot: u8, dev: SharedPciDevice) -> Result<(), Error> {
        if slot == 0 || slot >= SLOTS {
            return Err(Error::BadSlot(slot));
        }
        if self.slots.contains_key(&slot) {
            return Err(Error::SlotBusy(slot));
        }
        self.slots.insert(slot, dev);
        Ok(())
    }

    /// Unplugs the device in `slot`.
    pub fn unplug(&mut self, slot: u8) -> Result<SharedPciDevice, Error> {
        if slot == 0 {
            return Err(Error::BadSlot(0));
        }
        let dev = self.slots.remove(&slot).ok_or(Error::SlotEmpty(slot))?;
        lock(&dev).unplug();
        Ok(dev)
    }

    /// Lowest free slot.
    pub fn free_slot(&self) -> Option<u8> {
        (1..SLOTS).find(|s| !self.slots.contains_key(s))
    }

    /// Resets every device.
    pub fn reset(&mut self) {
        self.config_address = 0;
        for d in self.slots.values() {
            lock(d).reset();
        }
    }

    /// Configuration access to bus 0 `slot`, function `func`.
    fn device(&self, bus: u8, slot: u8, func: u8) -> Option<&SharedPciDevice> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(&slot)
    }

    fn config_read(&self, bus: u8, slot: u8, func: u8, offset: usize, data: &mut [u8]) {
        match self.device(bus, slot, func) {
            Some(d) => lock(d).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    fn config_write(&self, bus: u8, slot: u8, func: u8, offset: usize, data: &[u8]) {
        if let Some(d) = self.device(bus, slot, func) {
            lock(d).config_write(offset, data);
        }
    }

    fn bar_device(&self, addr: u64) -> Option<(SharedPciDevice, u64)> {
        for d in self.slots.values() {
            if let Some((base, size)) = lock(d).bar0() {
                if addr >= base && addr - base < size {
                    return Some((d.clone(), addr - base));
                }
            }
        }
        None
    }
}

/// A shared root bus.
pub type SharedPciRoot = Arc<Mutex<PciRoot>>;

fn lock_root(r: &SharedPciRoot) -> MutexGuard<'_, PciRoot> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// Configuration mechanism #1: `0xCF8` holds the address (enable bit, bus, device, function,
/// register), `0xCFC..0xD00` the data.
pub struct ConfigIo(pub SharedPciRoot);

impl BusDevice for ConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let root = lock_root(&self.0);
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&root.config_address.to_le_bytes());
            } else {
                data.fill(0xff);
            }
            return;
        }
        let a = root.config_address;
        if a & 0x8000_0000 == 0 {
            data.fill(0xff);
            return;
        }
        let (bus, slot, func) = (
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 7) as u8,
        );
        let reg = (a & 0xfc) as usize + (offset as usize - 4);
        root.config_read(bus, slot, func, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut root = lock_root(&self.0);
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                root.config_address =
                    u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & 0x80ff_fffc;
            }
            return;
        }
        let a = root.config_address;
        if a & 0x8000_0000 == 0 {
            return;
        }
        let (bus, slot, func) = (
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 7) as u8,
        );
        let reg = (a & 0xfc) as usize + (offset as usize - 4);
        root.config_write(bus, slot, func, reg, data);
    }
}

/// ECAM: bus 0's 1 MiB of memory-mapped configuration space.
pub struct Ecam(pub SharedPciRoot);

fn ecam_decode(offset: u64) -> (u8, u8, u8, usize) {
    (
        ((offset >> 20) & 0xff) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 7) as u8,
        (offset & 0xfff) as usize,
    )
}

impl BusDevice for Ecam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, slot, func, reg) = ecam_decode(offset);
        lock_root(&self.0).config_read(bus, slot, func, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bus, slot, func, reg) = ecam_decode(offset);
        lock_root(&self.0).config_write(bus, slot, func, reg, data);
    }
}

/// The BAR window: finds the device whose BAR0 decodes an address. The root's lock is released
/// before the device is called, so a device may take its time (a vhost-user round trip)
/// without stalling configuration cycles to other slots.
pub struct MmioWindow(pub SharedPciRoot);

impl BusDevice for MmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let hit = lock_root(&self.0).bar_device(MMIO_WINDOW_START + offset);
        match hit {
            Some((d, off)) => lock(&d).bar_read(off, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let hit = lock_root(&self.0).bar_device(MMIO_WINDOW_START + offset);
        if let Some((d, off)) = hit {
            lock(&d).bar_write(off, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cf8(root: &SharedPciRoot, addr: u32, data: &mut [u8]) {
        let mut io = ConfigIo(root.clone());
        io.write(0, &addr.to_le_bytes());
        io.read(4 + u64::from(addr & 3), data);
    }

    #[test]
    fn host_bridge_answers_both_mechanisms_and_empty_slots_float() {
        let root: SharedPciRoot = Arc::new(Mutex::new(PciRoot::new()));
        let mut b = [0u8; 4];
        cf8(&root, 0x8000_0000, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0008_1b36);
        Ecam(root.clone()).read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0008_1b36);
        cf8(&root, 0x8000_0800, &mut b);
        assert_eq!(b, [0xff; 4]);
        Ecam(root.clone()).read(1 << 15, &mut b);
        assert_eq!(b, [0xff; 4]);
        // Function 1 and bus 1 do not exist.
        Ecam(root.clone()).read(1 << 12, &mut b);
        assert_eq!(b, [0xff; 4]);
        Ecam(root.clone()).read(1 << 20, &mut b);
        assert_eq!(b, [0xff; 4]);
        // The enable bit gates the data port; the address register reads back.
        cf8(&root, 0x0000_0000, &mut b);
        assert_eq!(b, [0xff; 4]);
        let mut io = ConfigIo(root.clone());
        io.write(0, &0x8000_0004u32.to_le_bytes());
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0004);
    }

    #[test]
    fn plug_rules() {
        let mut r = PciRoot::new();
        let dev = || -> SharedPciDevice {
            Arc::new(Mutex::new(HostBridge {
                config: PciConfig::new(Header {
                    vendor: 1,
                    device: 2,
                    revision: 0,
                    class: 0,
                    subsystem_vendor: 0,
                    subsystem: 0,
                }),
            }))
        };
        assert_eq!(r.plug(0, dev()), Err(Error::BadSlot(0)));
        assert_eq!(r.plug(32, dev()), Err(Error::BadSlot(32)));
        assert_eq!(r.free_slot(), Some(1));
        assert!(r.plug(1, dev()).is_ok());
        assert_eq!(r.plug(1, dev()), Err(Error::SlotBusy(1)));
        assert_eq!(r.free_slot(), Some(2));
        assert!(r.unplug(1).is_ok());
        assert!(matches!(r.unplug(1), Err(Error::SlotEmpty(1))));
    }
}
