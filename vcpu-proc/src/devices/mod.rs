//! Emulated platform devices on the port-I/O bus: the 16550 serial port (vm-superio), the
//! MC146818 CMOS RTC, the i8042 (only as far as its CPU-reset command) and the ACPI
//! sleep/reset registers; on MMIO the ACPI Generic Event Device with the PCI hot-plug
//! registers ([`ged`]). Guest-initiated machine events leave a device through a
//! [`RequestSink`]; nothing a guest writes to a register can panic the worker.

pub mod acpi_pm;
pub mod ged;
pub mod i8042;
pub mod rtc;
pub mod serial;

use std::sync::Arc;

/// A machine-level request a guest made through a device or a vCPU exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestRequest {
    /// Power off (ACPI S5).
    Shutdown,
    /// Reset (ACPI reset register, i8042 0xFE).
    Reset,
    /// The vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// The vCPU cannot continue.
    InternalError(String),
}

/// Where devices send [`GuestRequest`]s; called on the vCPU thread that made the access.
pub type RequestSink = Arc<dyn Fn(GuestRequest) + Send + Sync>;

/// A device on a port-I/O (or MMIO) bus. `offset` is relative to the device's base.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// Puts the device back in its power-on state (machine reset).
    fn reset(&mut self) {}
}
