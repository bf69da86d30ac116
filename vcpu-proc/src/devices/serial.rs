//! COM1: a 16550 UART from vm-superio at 0x3f8, its interrupt an eventfd registered as a KVM
//! irqfd on GSI 4. Output goes to the monitor's serial_out fd; an input thread feeds bytes
//! from serial_in into the receive FIFO as room frees up.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// COM1 base port.
pub const COM1_PORT: u16 = 0x3f8;
/// Ports the UART spans.
pub const LEN: u64 = 8;
/// COM1's ISA interrupt / GSI.
pub const COM1_GSI: u32 = 4;

/// Raises the UART interrupt by signalling the irqfd.
#[derive(Clone)]
pub struct IrqTrigger(pub Arc<EventFd>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where transmitted bytes go: the monitor's fd, or nowhere.
#[derive(Clone)]
pub struct SerialOut(pub Option<Arc<File>>);

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.0 {
            Some(f) => (&**f).write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The UART on the bus.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, SerialOut>,
    trigger: IrqTrigger,
    out: SerialOut,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: Arc<EventFd>, out: Option<File>) -> Self {
        let trigger = IrqTrigger(irq);
        let out = SerialOut(out.map(Arc::new));
        SerialDevice {
            uart: Serial::new(trigger.clone(), out.clone()),
            trigger,
            out,
        }
    }

    /// Free room in the receive FIFO.
    pub fn rx_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues received bytes (at most [`Self::rx_room`]); returns how many were taken.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.rx_room());
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("serial: cannot queue input: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            *b = if off < LEN {
                self.uart.read(off as u8)
            } else {
                0xff
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let off = offset + i as u64;
            if off < LEN {
                if let Err(e) = self.uart.write(off as u8, *b) {
                    log::debug!("serial: write failed: {e:?}");
                }
            }
        }
    }

    fn reset(&mut self) {
        self.uart = Serial::new(self.trigger.clone(), self.out.clone());
    }
}

/// Feeds `input` into `dev` until EOF or an error. Runs on its own thread.
pub fn input_loop(dev: Arc<Mutex<SerialDevice>>, mut input: File) {
    let mut buf = [0u8; 64];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::debug!("serial: input closed: {e}");
                return;
            }
        };
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let taken = dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .receive(pending);
            pending = &pending[taken..];
            if taken == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmit_and_receive() {
        let (mut r, w) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        let mut s = SerialDevice::new(irq.clone(), Some(File::from(std::os::fd::OwnedFd::from(w))));
        s.write(0, b"h");
        s.write(0, b"i");
        let mut got = [0u8; 2];
        r.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hi");
        // Enable the received-data interrupt (IER bit 0), then receive.
        s.write(1, &[1]);
        assert_eq!(s.receive(b"xy"), 2);
        assert!(irq.read().expect("irq raised") >= 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'x');
        // Out-of-range offsets and wide accesses do not panic.
        let mut wide = [0u8; 4];
        s.read(6, &mut wide);
        s.write(7, &[1, 2, 3, 4]);
        s.reset();
    }
}
