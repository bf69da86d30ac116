//! A minimal i8042 keyboard controller: enough for the status polls Linux makes before its
//! reset command, a couple of controller commands, and the 0xFE pulse-reset-line command on
//! port 0x64 that resets the machine.

use std::collections::VecDeque;

use super::{BusDevice, GuestRequest, RequestSink};

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Command/status port.
pub const COMMAND_PORT: u16 = 0x64;
/// Ports from [`DATA_PORT`] the device spans.
pub const LEN: u64 = 5;

const STATUS_OBF: u8 = 1 << 0;
const STATUS_SYS: u8 = 1 << 2;
const STATUS_CMD: u8 = 1 << 3;
const STATUS_UNLOCKED: u8 = 1 << 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_WRITE_OUTPUT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

/// The controller.
pub struct I8042 {
    sink: RequestSink,
    ctr: u8,
    out: VecDeque<u8>,
    pending: Option<u8>,
    last_was_cmd: bool,
}

impl I8042 {
    /// A controller that reports resets to `sink`.
    pub fn new(sink: RequestSink) -> Self {
        I8042 {
            sink,
            ctr: 0,
            out: VecDeque::new(),
            pending: None,
            last_was_cmd: false,
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_SYS | STATUS_UNLOCKED;
        if !self.out.is_empty() {
            s |= STATUS_OBF;
        }
        if self.last_was_cmd {
            s |= STATUS_CMD;
        }
        s
    }

    fn push(&mut self, b: u8) {
        if self.out.len() < 16 {
            self.out.push_back(b);
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT => self.pending = Some(cmd),
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST => self.push(0x00),
            CMD_RESET_CPU => (self.sink)(GuestRequest::Reset),
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            // Output port bit 0 low holds the CPU in reset.
            Some(CMD_WRITE_OUTPUT) if value & 1 == 0 => (self.sink)(GuestRequest::Reset),
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => self.out.pop_front().unwrap_or(0),
            4 => self.status(),
            _ => 0xff,
        };
        data.fill(0xff);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => {
                self.last_was_cmd = false;
                self.data(v);
            }
            4 => {
                log::debug!("i8042: command {v:#x}");
                self.last_was_cmd = true;
                self.command(v);
            }
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.ctr = 0;
        self.out.clear();
        self.pending = None;
        self.last_was_cmd = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn reset_command_and_status() {
        let log = Arc::new(Mutex::new(0));
        let l = log.clone();
        let mut k = I8042::new(Arc::new(move |r| {
            assert_eq!(r, GuestRequest::Reset);
            *l.lock().expect("lock") += 1;
        }));
        let mut b = [0u8];
        k.read(4, &mut b);
        assert_eq!(b[0] & 0x3, 0, "input and output buffers empty");
        k.write(4, &[CMD_SELF_TEST]);
        k.read(4, &mut b);
        assert_eq!(b[0] & STATUS_OBF, STATUS_OBF);
        k.read(0, &mut b);
        assert_eq!(b[0], 0x55);
        k.write(4, &[0x12]); // unknown command: ignored
        k.write(4, &[CMD_WRITE_OUTPUT]);
        k.write(0, &[0x01]); // keep the CPU running
        assert_eq!(*log.lock().expect("lock"), 0);
        k.write(4, &[CMD_RESET_CPU]);
        assert_eq!(*log.lock().expect("lock"), 1);
        k.write(4, &[CMD_WRITE_OUTPUT]);
        k.write(0, &[0x00]);
        assert_eq!(*log.lock().expect("lock"), 2);
        // Flooding commands never grows the queue without bound.
        for _ in 0..100 {
            k.write(4, &[CMD_SELF_TEST]);
        }
        assert!(k.out.len() <= 16);
    }
}
