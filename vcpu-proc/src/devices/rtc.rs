//! MC146818 CMOS RTC at ports 0x70/0x71: the host's wall-clock time (plus whatever offset the
//! guest sets) in BCD or binary, 24- or 12-hour, with the update-in-progress flag raised in the
//! 244 µs before each second ticks, register D's valid-time bit, and 128 bytes of CMOS RAM.
//! No periodic, alarm or update interrupts.

use std::time::{SystemTime, UNIX_EPOCH};

use super::BusDevice;

/// Index port.
pub const INDEX_PORT: u16 = 0x70;
/// Ports the device spans (index, data).
pub const LEN: u64 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

const REG_A_UIP: u8 = 0x80;
const REG_B_SET: u8 = 0x80;
const REG_B_DM_BINARY: u8 = 0x04;
const REG_B_24H: u8 = 0x02;
const REG_D_VRT: u8 = 0x80;
/// The update cycle starts this long before each second boundary.
const UIP_WINDOW_NS: u32 = 244_000;

/// Broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    /// Full year.
    pub year: i64,
    /// 1..=12.
    pub month: u32,
    /// 1..=31.
    pub day: u32,
    /// 0..=23.
    pub hour: u32,
    /// 0..=59.
    pub minute: u32,
    /// 0..=59.
    pub second: u32,
    /// 0 = Sunday.
    pub weekday: u32,
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Broken-down time of `secs` since the epoch.
pub fn civil_from_secs(secs: i64) -> DateTime {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    DateTime {
        year,
        month,
        day,
        hour: (rem / 3600) as u32,
        minute: ((rem / 60) % 60) as u32,
        second: (rem % 60) as u32,
        weekday: (days + 4).rem_euclid(7) as u32,
    }
}

/// Seconds since the epoch of a broken-down time (weekday ignored).
pub fn secs_from_civil(t: &DateTime) -> i64 {
    days_from_civil(t.year, t.month, t.day) * 86_400
        + i64::from(t.hour) * 3600
        + i64::from(t.minute) * 60
        + i64::from(t.second)
}

/// Binary to packed BCD (values 0..=99).
pub fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// Packed BCD to binary; invalid nibbles are clamped rather than trusted.
pub fn from_bcd(v: u8) -> u8 {
    (v >> 4).min(9) * 10 + (v & 0xf).min(9)
}

fn host_now() -> (i64, u32) {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(_) => (0, 0),
    }
}

/// The RTC.
pub struct Rtc {
    index: u8,
    ram: [u8; 128],
    /// Guest time minus host time, in seconds.
    offset: i64,
    clock: fn() -> (i64, u32),
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// An RTC on the host clock.
    pub fn new() -> Self {
        Self::with_clock(host_now)
    }

    /// An RTC on `clock` (seconds and nanoseconds since the epoch); for tests.
    pub fn with_clock(clock: fn() -> (i64, u32)) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A as usize] = 0x26;
        ram[REG_B as usize] = REG_B_24H;
        Rtc {
            index: 0,
            ram,
            offset: 0,
            clock,
        }
    }

    fn binary(&self) -> bool {
        self.ram[REG_B as usize] & REG_B_DM_BINARY != 0
    }

    fn encode(&self, v: u32) -> u8 {
        let v = (v % 100) as u8;
        if self.binary() {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        u32::from(if self.binary() { v } else { from_bcd(v) })
    }

    fn encode_hour(&self, h: u32) -> u8 {
        if self.ram[REG_B as usize] & REG_B_24H != 0 {
            self.encode(h)
        } else {
            let pm = h >= 12;
            let h12 = match h % 12 {
                0 => 12,
                x => x,
            };
            self.encode(h12) | if pm { 0x80 } else { 0 }
        }
    }

    fn decode_hour(&self, v: u8) -> u32 {
        if self.ram[REG_B as usize] & REG_B_24H != 0 {
            self.decode(v).min(23)
        } else {
            let h12 = self.decode(v & 0x7f).clamp(1, 12) % 12;
            h12 + if v & 0x80 != 0 { 12 } else { 0 }
        }
    }

    fn now(&self) -> (DateTime, u32) {
        let (s, ns) = (self.clock)();
        (civil_from_secs(s.saturating_add(self.offset)), ns)
    }

    /// Reads register `reg`.
    pub fn read_reg(&mut self, reg: u8) -> u8 {
        let reg = reg & 0x7f;
        let (t, ns) = self.now();
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_WEEKDAY => self.encode(t.weekday + 1),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u32),
            REG_CENTURY => self.encode(t.year.div_euclid(100).rem_euclid(100) as u32),
            REG_A => {
                let a = self.ram[REG_A as usize] & !REG_A_UIP;
                if ns >= 1_000_000_000 - UIP_WINDOW_NS {
                    a | REG_A_UIP
                } else {
                    a
                }
            }
            REG_C => 0,
            REG_D => REG_D_VRT,
            r => self.ram[r as usize],
        }
    }

    /// Writes register `reg`.
    pub fn write_reg(&mut self, reg: u8, value: u8) {
        let reg = reg & 0x7f;
        let (mut t, _) = self.now();
        match reg {
            REG_SECONDS => t.second = self.decode(value).min(59),
            REG_MINUTES => t.minute = self.decode(value).min(59),
            REG_HOURS => t.hour = self.decode_hour(value),
            REG_DAY => t.day = self.decode(value).clamp(1, 31),
            REG_MONTH => t.month = self.decode(value).clamp(1, 12),
            REG_YEAR => t.year = t.year - t.year.rem_euclid(100) + i64::from(self.decode(value)),
            REG_CENTURY => {
                t.year = i64::from(self.decode(value)) * 100 + t.year.rem_euclid(100);
            }
            REG_A => {
                self.ram[REG_A as usize] = value & !REG_A_UIP;
                return;
            }
            REG_B => {
                self.ram[REG_B as usize] = value & !REG_B_SET | (value & REG_B_SET);
                return;
            }
            REG_C | REG_D | REG_WEEKDAY => return,
            r => {
                self.ram[r as usize] = value;
                return;
            }
        }
        let (host, _) = (self.clock)();
        self.offset = secs_from_civil(&t).saturating_sub(host);
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let v = match offset {
            0 => self.index,
            1 => {
                let i = self.index;
                self.read_reg(i)
            }
            _ => 0xff,
        };
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 is the NMI mask; the index is 7 bits.
            0 => self.index = v & 0x7f,
            1 => {
                let i = self.index;
                self.write_reg(i, v)
            }
            _ => {}
        }
    }

    fn reset(&mut self) {
        // Time, offset and CMOS RAM survive a reset, as on hardware; the index does not.
        self.index = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-02-29 23:59:58 UTC, a Thursday.
    const T: i64 = 1_709_251_198;

    fn fixed() -> (i64, u32) {
        (T, 0)
    }

    fn late() -> (i64, u32) {
        (T, 999_900_000)
    }

    #[test]
    fn civil_roundtrip() {
        let t = civil_from_secs(T);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2024, 2, 29, 23, 59, 58)
        );
        assert_eq!(t.weekday, 4);
        assert_eq!(secs_from_civil(&t), T);
        assert_eq!(civil_from_secs(0).weekday, 4);
        for s in [0i64, 951_782_400, 4_107_542_400, T] {
            assert_eq!(secs_from_civil(&civil_from_secs(s)), s);
        }
    }

    #[test]
    fn bcd() {
        assert_eq!(to_bcd(59), 0x59);
        assert_eq!(from_bcd(0x59), 59);
        assert_eq!(from_bcd(0xff), 99);
    }

    #[test]
    fn reads_bcd_time_through_ports() {
        let mut r = Rtc::with_clock(fixed);
        let mut rd = |reg: u8| {
            r.write(0, &[reg | 0x80]);
            let mut b = [0u8];
            r.read(1, &mut b);
            b[0]
        };
        assert_eq!(rd(0x00), 0x58);
        assert_eq!(rd(0x02), 0x59);
        assert_eq!(rd(0x04), 0x23);
        assert_eq!(rd(0x06), 5);
        assert_eq!(rd(0x07), 0x29);
        assert_eq!(rd(0x08), 0x02);
        assert_eq!(rd(0x09), 0x24);
        assert_eq!(rd(0x32), 0x20);
        assert_eq!(rd(0x0a), 0x26);
        assert_eq!(rd(0x0b), 0x02);
        assert_eq!(rd(0x0d), 0x80);
    }

    #[test]
    fn uip_just_before_the_tick() {
        let mut r = Rtc::with_clock(late);
        assert_eq!(r.read_reg(REG_A) & REG_A_UIP, REG_A_UIP);
        let mut r = Rtc::with_clock(fixed);
        assert_eq!(r.read_reg(REG_A) & REG_A_UIP, 0);
    }

    #[test]
    fn binary_and_12h_modes() {
        let mut r = Rtc::with_clock(fixed);
        r.write_reg(REG_B, REG_B_DM_BINARY);
        assert_eq!(r.read_reg(REG_SECONDS), 58);
        assert_eq!(r.read_reg(REG_HOURS), 11 | 0x80);
    }

    #[test]
    fn guest_sets_the_time() {
        let mut r = Rtc::with_clock(fixed);
        r.write_reg(REG_YEAR, 0x30);
        assert_eq!(r.read_reg(REG_YEAR), 0x30);
        assert_eq!(r.read_reg(REG_SECONDS), 0x58);
        r.write_reg(REG_HOURS, 0x10);
        assert_eq!(r.read_reg(REG_HOURS), 0x10);
        // Garbage does not panic.
        for reg in 0..=255u8 {
            r.write_reg(reg, 0xff);
            let _ = r.read_reg(reg);
        }
    }

    #[test]
    fn cmos_ram() {
        let mut r = Rtc::with_clock(fixed);
        r.write_reg(0x40, 0xab);
        assert_eq!(r.read_reg(0x40), 0xab);
        r.reset();
        assert_eq!(r.read_reg(0x40), 0xab);
    }
}
