//! The hardware-reduced ACPI sleep control/status and reset registers the FADT points at.
//! Writing `SLP_EN | SLP_TYP=5` (`_S5_`) to the sleep control register powers off; writing
//! [`RESET_VALUE`] to the reset register resets.

use super::{BusDevice, GuestRequest, RequestSink};

/// First port of the block.
pub const BASE_PORT: u16 = 0x600;
/// Sleep control register (FADT SLEEP_CONTROL_REG).
pub const SLEEP_CONTROL_PORT: u16 = BASE_PORT;
/// Sleep status register (FADT SLEEP_STATUS_REG).
pub const SLEEP_STATUS_PORT: u16 = BASE_PORT + 1;
/// Reset register (FADT RESET_REG).
pub const RESET_PORT: u16 = BASE_PORT + 2;
/// Value that resets when written to [`RESET_PORT`] (FADT RESET_VALUE).
pub const RESET_VALUE: u8 = 1;
/// Ports the block decodes.
pub const LEN: u64 = 3;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The register block.
pub struct AcpiPm {
    sink: RequestSink,
}

impl AcpiPm {
    /// A block that reports to `sink`.
    pub fn new(sink: RequestSink) -> Self {
        AcpiPm { sink }
    }
}

/// What a write of `value` to the sleep control register asks for.
pub fn decode_sleep(value: u8) -> Option<u8> {
    if value & SLP_EN != 0 {
        Some((value >> SLP_TYP_SHIFT) & SLP_TYP_MASK)
    } else {
        None
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status never shows WAK_STS; control and reset read as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        log::debug!("acpi: write {value:#x} at offset {offset}");
        match offset {
            0 => match decode_sleep(value) {
                Some(t) if t == crate::acpi::S5_SLEEP_TYPE => (self.sink)(GuestRequest::Shutdown),
                Some(t) => log::debug!("acpi: ignoring request for sleep type {t}"),
                None => {}
            },
            2 if value == RESET_VALUE => (self.sink)(GuestRequest::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn recorder() -> (RequestSink, Arc<Mutex<Vec<GuestRequest>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let sink: RequestSink = Arc::new(move |r| l.lock().expect("lock").push(r));
        (sink, log)
    }

    #[test]
    fn s5_powers_off_and_reset_resets() {
        let (sink, log) = recorder();
        let mut pm = AcpiPm::new(sink);
        pm.write(1, &[0x80]); // clear WAK_STS: nothing
        pm.write(0, &[5 << 2]); // SLP_TYP without SLP_EN: nothing
        pm.write(0, &[3 << 2 | 0x20]); // S3: ignored
        pm.write(2, &[7]); // wrong reset value
        assert!(log.lock().expect("lock").is_empty());
        pm.write(0, &[5 << 2 | 0x20]);
        pm.write(2, &[RESET_VALUE]);
        pm.write(0, &[]);
        assert_eq!(
            *log.lock().expect("lock"),
            vec![GuestRequest::Shutdown, GuestRequest::Reset]
        );
        let mut b = [0xffu8; 2];
        pm.read(1, &mut b);
        assert_eq!(b, [0, 0]);
    }
}
