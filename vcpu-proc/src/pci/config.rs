//! One PCI function's 256-byte configuration space: the type-0 header, its BARs (sized by the
//! usual write-all-ones probe), and a capability list. Every register has a mask of the bits
//! the guest may change; everything else reads back as the device set it, so no guest write
//! can turn the header into something the device did not describe.

/// Size of the conventional configuration space.
pub const CONFIG_SIZE: usize = 256;
const REGS: usize = CONFIG_SIZE / 4;

/// Command register: I/O space, memory space, bus master, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0000_0407;
/// Command register bit: memory space decoding.
pub const COMMAND_MEMORY: u16 = 0x2;
/// Status register bit: the capability list is valid.
const STATUS_CAP_LIST: u32 = 0x0010_0000;
/// Header: first capability pointer register.
const CAP_PTR_REG: usize = 0x34 / 4;
/// Where the first capability goes.
const FIRST_CAP: usize = 0x40;
/// BAR0's register index.
const BAR0_REG: usize = 4;
/// Memory BAR type bits: 64-bit.
const BAR_MEM_64: u32 = 0x4;
/// Interrupt line (writable scratch byte) in register 15.
const INTERRUPT_LINE_WRITABLE: u32 = 0xff;

/// Errors describing a configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The capability list is full.
    #[error("no room for a {0}-byte capability")]
    NoRoom(usize),
    /// A BAR size must be a power of two of at least 4 KiB.
    #[error("BAR size {0:#x} is not a power of two >= 4 KiB")]
    BadBarSize(u64),
}

/// Identity of a function: what the header's read-only fields hold.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Revision.
    pub revision: u8,
    /// Class code, subclass and programming interface (24 bits).
    pub class: u32,
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem: u16,
}

/// A function's configuration space.
#[derive(Clone)]
pub struct PciConfig {
    regs: [u32; REGS],
    writable: [u32; REGS],
    next_cap: usize,
    last_cap_next: Option<usize>,
    bar0_size: Option<u64>,
}

impl PciConfig {
    /// A header with `h`'s identity, no BARs and no capabilities.
    pub fn new(h: Header) -> Self {
        let mut c = PciConfig {
            regs: [0; REGS],
            writable: [0; REGS],
            next_cap: FIRST_CAP,
            last_cap_next: None,
            bar0_size: None,
        };
        c.regs[0] = u32::from(h.vendor) | (u32::from(h.device) << 16);
        c.regs[2] = u32::from(h.revision) | ((h.class & 0xff_ffff) << 8);
        c.regs[11] = u32::from(h.subsystem_vendor) | (u32::from(h.subsystem) << 16);
        c.writable[1] = COMMAND_WRITABLE;
        c.writable[15] = INTERRUPT_LINE_WRITABLE;
        c
    }

    /// Declares BAR0 as a 64-bit, non-prefetchable memory BAR of `size` bytes at `addr`.
    pub fn set_bar0_mem64(&mut self, addr: u64, size: u64) -> Result<(), Error> {
        if !size.is_power_of_two() || size < 0x1000 {
            return Err(Error::BadBarSize(size));
        }
        let mask = !(size - 1);
        self.regs[BAR0_REG] = ((addr & mask) as u32 & 0xffff_fff0) | BAR_MEM_64;
        self.regs[BAR0_REG + 1] = ((addr & mask) >> 32) as u32;
        self.writable[BAR0_REG] = (mask as u32) & 0xffff_fff0;
        self.writable[BAR0_REG + 1] = (mask >> 32) as u32;
        self.bar0_size = Some(size);
        Ok(())
    }

    /// BAR0's current address and size, if it is a memory BAR.
    pub fn bar0(&self) -> Option<(u64, u64)> {
        let size = self.bar0_size?;
        let lo = u64::from(self.regs[BAR0_REG] & 0xffff_fff0);
        let hi = u64::from(self.regs[BAR0_REG + 1]);
        Some(((hi << 32) | lo, size))
    }

    /// Whether the guest enabled memory decoding.
    pub fn memory_enabled(&self) -> bool {
        self.regs[1] as u16 & COMMAND_MEMORY != 0
    }

    /// Appends a capability: `body` starts with the capability id; the next-pointer byte
    /// (`body[1]`) is filled in here. `writable` masks the bits the guest may change, byte for
    /// byte over `body`. Returns the capability's offset.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> Result<usize, Error> {
        let len = (body.len() + 3) & !3;
        let off = self.next_cap;
        if body.len() < 2 || off + len > CONFIG_SIZE {
            return Err(Error::NoRoom(body.len()));
        }
        for (i, b) in body.iter().enumerate() {
            self.set_byte(off + i, if i == 1 { 0 } else { *b });
            let w = writable.get(i).copied().unwrap_or(0);
            let r = (off + i) / 4;
            let shift = ((off + i) % 4) * 8;
            self.writable[r] = (self.writable[r] & !(0xff << shift)) | (u32::from(w) << shift);
        }
        match self.last_cap_next {
            None => {
                self.set_byte(CAP_PTR_REG * 4, off as u8);
                self.regs[1] |= STATUS_CAP_LIST;
            }
            Some(prev) => self.set_byte(prev, off as u8),
        }
        self.last_cap_next = Some(off + 1);
        self.next_cap = off + len;
        Ok(off)
    }

    fn set_byte(&mut self, off: usize, v: u8) {
        let r = off / 4;
        let shift = (off % 4) * 8;
        self.regs[r] = (self.regs[r] & !(0xff << shift)) | (u32::from(v) << shift);
    }

    /// The byte at `off` (0 past the end).
    pub fn byte(&self, off: usize) -> u8 {
        match self.regs.get(off / 4) {
            Some(r) => (r >> ((off % 4) * 8)) as u8,
            None => 0,
        }
    }

    /// Reads the dword register `reg` (0..64; 0 outside).
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Guest write of `data` (1, 2 or 4 bytes) at byte `offset`; bits the mask does not allow
    /// are kept. Accesses that straddle a dword or leave the space are ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let len = data.len();
        if !matches!(len, 1 | 2 | 4) || offset % 4 + len > 4 || offset + len > CONFIG_SIZE {
            return;
        }
        let reg = offset / 4;
        let shift = (offset % 4) * 8;
        let mut v = 0u32;
        for (i, b) in data.iter().enumerate() {
            v |= u32::from(*b) << (8 * i);
        }
        let field = if len == 4 {
            u32::MAX
        } else {
            ((1u32 << (8 * len)) - 1) << shift
        };
        let mask = self.writable[reg] & field;
        self.regs[reg] = (self.regs[reg] & !mask) | ((v << shift) & mask);
    }

    /// Guest read of `data.len()` bytes at byte `offset` (all-ones for bad accesses).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        let len = data.len();
        if !matches!(len, 1 | 2 | 4) || offset % 4 + len > 4 || offset + len > CONFIG_SIZE {
            data.fill(0xff);
            return;
        }
        let v = self.regs[offset / 4] >> ((offset % 4) * 8);
        for (i, b) in data.iter_mut().enumerate() {
            *b = (v >> (8 * i)) as u8;
        }
    }

    /// Rewrites a dword the device owns (e.g. MSI-X message control's read-only bits), keeping
    /// the guest-writable bits as they are.
    pub fn set_reg_device_bits(&mut self, reg: usize, value: u32) {
        if let (Some(r), Some(w)) = (self.regs.get_mut(reg), self.writable.get(reg)) {
            *r = (*r & *w) | (value & !*w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr() -> Header {
        Header {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01_8000,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    fn rd32(c: &PciConfig, off: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = PciConfig::new(hdr());
        assert_eq!(rd32(&c, 0), 0x1042_1af4);
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(rd32(&c, 0), 0x1042_1af4);
        assert_eq!(rd32(&c, 8) >> 8, 0x01_8000);
    }

    #[test]
    fn bar_probe_reports_size_and_keeps_type_bits() {
        let mut c = PciConfig::new(hdr());
        c.set_bar0_mem64(0xc010_0000, 0x8000).expect("bar");
        assert_eq!(c.bar0(), Some((0xc010_0000, 0x8000)));
        c.write(0x10, &u32::MAX.to_le_bytes());
        c.write(0x14, &u32::MAX.to_le_bytes());
        assert_eq!(rd32(&c, 0x10), 0xffff_8004);
        assert_eq!(rd32(&c, 0x14), 0xffff_ffff);
        c.write(0x10, &0xd000_0000u32.to_le_bytes());
        c.write(0x14, &0u32.to_le_bytes());
        assert_eq!(c.bar0(), Some((0xd000_0000, 0x8000)));
    }

    #[test]
    fn capability_chain_links_and_masks() {
        let mut c = PciConfig::new(hdr());
        let a = c.add_capability(&[0x09, 0xee, 4, 1], &[]).expect("cap");
        let b = c
            .add_capability(&[0x11, 0xee, 0, 0], &[0, 0, 0, 0xc0])
            .expect("cap");
        assert_eq!(c.byte(0x34) as usize, a);
        assert_eq!(c.byte(a + 1) as usize, b);
        assert_eq!(c.byte(b + 1), 0);
        assert_ne!(rd32(&c, 4) & STATUS_CAP_LIST, 0);
        c.write(b + 2, &[0xff, 0xff]);
        assert_eq!(c.byte(b + 3), 0xc0);
        assert_eq!(c.byte(b + 2), 0);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let mut c = PciConfig::new(hdr());
        c.write(3, &[1, 2]);
        c.write(254, &[1, 2, 3, 4]);
        let mut b = [0u8; 4];
        c.read(255, &mut b);
        assert_eq!(b, [0xff; 4]);
        c.read(1000, &mut b[..1]);
        assert!(c.add_capability(&[0; 300], &[]).is_err());
    }
}
