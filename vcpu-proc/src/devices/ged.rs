//! The ACPI Generic Event Device and the PCI hot-plug registers behind it: how the machine
//! tells a running guest that a PCI slot gained or should lose its device, or that its power
//! button was pressed. The DSDT (see `acpi.rs`) declares the GED (`ACPI0013`) with an
//! edge-triggered interrupt on [`GED_GSI`]; its `_EVT` method reads [`EVENT_OFFSET`] (bits:
//! [`EVENT_POWER_BUTTON`], [`EVENT_PCI_HOTPLUG`]) and, for hot-plug, `\_SB.PCI0.PCNT` reads
//! which slots came up ([`PCIU_OFFSET`]) and which should go ([`PCID_OFFSET`]) and notifies
//! those slot objects. The guest ejects a slot by writing its bit to [`B0EJ_OFFSET`] (the
//! slot's `_EJ0`); only slots that were asked to go can be ejected that way, so a guest cannot
//! unplug devices on its own. All registers read-and-clear or are write-only; nothing a guest
//! writes can panic the worker.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// Guest-physical base of the register block (below the IOAPIC, outside the PCI windows).
pub const MMIO_BASE: u64 = 0xfeb0_0000;
/// Length of the register block.
pub const MMIO_LEN: u64 = 0x1000;
/// Slots that came up since the guest last looked (read clears).
pub const PCIU_OFFSET: u64 = 0x0;
/// Slots the guest is asked to eject (read clears; the request stands until ejected).
pub const PCID_OFFSET: u64 = 0x4;
/// The guest ejects the slots whose bits it writes here.
pub const B0EJ_OFFSET: u64 = 0x8;
/// Pending GED events (read clears).
pub const EVENT_OFFSET: u64 = 0x100;
/// GED event: the power button was pressed.
pub const EVENT_POWER_BUTTON: u32 = 1;
/// GED event: PCI slots changed.
pub const EVENT_PCI_HOTPLUG: u32 = 2;
/// The GED's interrupt (edge-triggered, through an irqfd).
pub const GED_GSI: u32 = 11;

/// What the guest ejected: the slot number. Called on the vCPU thread that wrote `B0EJ`.
pub type EjectSink = Arc<dyn Fn(u8) + Send + Sync>;

#[derive(Default)]
struct State {
    up: u32,
    down: u32,
    asked: u32,
    events: u32,
}

/// The registers, shared between the MMIO bus (guest side) and the machine (monitor side).
pub struct Ged {
    state: Mutex<State>,
    irq: EventFd,
    eject: EjectSink,
}

impl Ged {
    /// A GED raising `irq` (registered by the caller as an irqfd on [`GED_GSI`]).
    pub fn new(irq: EventFd, eject: EjectSink) -> Arc<Self> {
        Arc::new(Ged {
            state: Mutex::new(State::default()),
            irq,
            eject,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raise(&self, st: &mut State, event: u32) {
        st.events |= event;
        if let Err(e) = self.irq.write(1) {
            log::warn!("GED interrupt: {e}");
        }
    }

    /// Tells the guest a device now sits in `slot`.
    pub fn slot_up(&self, slot: u8) {
        let bit = slot_bit(slot);
        let mut st = self.lock();
        st.up |= bit;
        st.down &= !bit;
        st.asked &= !bit;
        self.raise(&mut st, EVENT_PCI_HOTPLUG);
    }

    /// Asks the guest to eject the device in `slot`.
    pub fn request_eject(&self, slot: u8) {
        let bit = slot_bit(slot);
        let mut st = self.lock();
        st.down |= bit;
        st.asked |= bit;
        st.up &= !bit;
        self.raise(&mut st, EVENT_PCI_HOTPLUG);
    }

    /// Whether an eject of `slot` is pending.
    pub fn eject_pending(&self, slot: u8) -> bool {
        self.lock().asked & slot_bit(slot) != 0
    }

    /// Presses the power button.
    pub fn power_button(&self) {
        let mut st = self.lock();
        self.raise(&mut st, EVENT_POWER_BUTTON);
    }

    /// Machine reset: nothing pending (devices present at reset are found by enumeration),
    /// and the ejects the guest was asked for and did not do are carried out now, as QEMU's
    /// reset executes pending removals (`acpi_pcihp_update_hotplug_bus`).
    pub fn reset(&self) {
        let asked = std::mem::take(&mut *self.lock()).asked;
        for slot in 0..32u8 {
            if asked & slot_bit(slot) != 0 {
                (self.eject)(slot);
            }
        }
    }

    /// The MMIO face.
    pub fn bus_device(self: &Arc<Self>) -> GedRegisters {
        GedRegisters(self.clone())
    }
}

fn slot_bit(slot: u8) -> u32 {
    1u32.checked_shl(u32::from(slot)).unwrap_or(0)
}

/// The GED registers on the MMIO bus.
pub struct GedRegisters(Arc<Ged>);

impl BusDevice for GedRegisters {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = if data.len() == 4 {
            let mut st = self.0.lock();
            match offset {
                PCIU_OFFSET => std::mem::take(&mut st.up),
                PCID_OFFSET => std::mem::take(&mut st.down),
                EVENT_OFFSET => std::mem::take(&mut st.events),
                _ => 0,
            }
        } else {
            0
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = (v >> (8 * (i % 4))) as u8;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != B0EJ_OFFSET || data.len() != 4 {
            return;
        }
        let bits = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let eject = {
            let mut st = self.0.lock();
            let ok = bits & st.asked;
            st.asked &= !ok;
            ok
        };
        for slot in 0..32u8 {
            if eject & slot_bit(slot) != 0 {
                (self.0.eject)(slot);
            }
        }
    }

    fn reset(&mut self) {
        self.0.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(r: &mut GedRegisters, off: u64) -> u32 {
        let mut b = [0u8; 4];
        r.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn hotplug_handshake_and_guest_cannot_eject_on_its_own() {
        let ejected = Arc::new(Mutex::new(Vec::new()));
        let e2 = ejected.clone();
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let ged = Ged::new(
            irq.try_clone().expect("dup"),
            Arc::new(move |s| e2.lock().expect("lock").push(s)),
        );
        let mut r = ged.bus_device();
        assert_eq!(rd(&mut r, EVENT_OFFSET), 0);
        ged.slot_up(3);
        assert_eq!(irq.read().expect("irq"), 1);
        assert_eq!(rd(&mut r, EVENT_OFFSET), EVENT_PCI_HOTPLUG);
        assert_eq!(rd(&mut r, EVENT_OFFSET), 0, "read clears");
        assert_eq!(rd(&mut r, PCIU_OFFSET), 1 << 3);
        assert_eq!(rd(&mut r, PCIU_OFFSET), 0);
        // Ejecting a slot nobody asked about does nothing.
        r.write(B0EJ_OFFSET, &(1u32 << 3).to_le_bytes());
        assert!(ejected.lock().expect("lock").is_empty());
        ged.request_eject(3);
        assert!(ged.eject_pending(3));
        assert_eq!(rd(&mut r, EVENT_OFFSET), EVENT_PCI_HOTPLUG);
        assert_eq!(rd(&mut r, PCID_OFFSET), 1 << 3);
        r.write(B0EJ_OFFSET, &u32::MAX.to_le_bytes());
        assert_eq!(*ejected.lock().expect("lock"), vec![3]);
        assert!(!ged.eject_pending(3));
        // Twice does not eject twice.
        r.write(B0EJ_OFFSET, &u32::MAX.to_le_bytes());
        assert_eq!(ejected.lock().expect("lock").len(), 1);
        ged.power_button();
        assert_eq!(rd(&mut r, EVENT_OFFSET), EVENT_POWER_BUTTON);
        // A reset carries out the ejects asked for and not done, once.
        ged.request_eject(5);
        ged.reset();
        assert_eq!(*ejected.lock().expect("lock"), vec![3, 5]);
        assert!(!ged.eject_pending(5));
        ged.reset();
        assert_eq!(ejected.lock().expect("lock").len(), 2);
        // Odd accesses.
        let mut b = [0u8; 2];
        r.read(PCIU_OFFSET, &mut b);
        r.write(B0EJ_OFFSET, &[0xff]);
        r.write(0x7ff, &[1, 2, 3, 4]);
        assert_eq!(slot_bit(40), 0);
    }
}
