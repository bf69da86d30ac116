//! Port-I/O and MMIO dispatch: maps an address to the device whose range holds it and calls
//! it with the offset into that range. An access nobody claims reads as all-ones and its
//! write is dropped; such accesses are logged at debug level, rate-limited.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::devices::BusDevice;

/// Errors building a bus.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two devices claim overlapping ranges.
    #[error("device range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// Empty or wrapping range.
    #[error("invalid device range {base:#x}+{len:#x}")]
    BadRange {
        /// Base.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// A shared device handle.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    dev: SharedDevice,
}

/// An address space of devices.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `dev` at `[base, base+len)`.
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), Error> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::BadRange { base, len })?;
        let overlaps_prev = self
            .devices
            .range(..=base)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        let overlaps_next = self.devices.range(base..end).next().is_some();
        if overlaps_prev || overlaps_next {
            return Err(Error::Overlap { base, len });
        }
        self.devices.insert(base, Entry { len, dev });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (base, e) = self.devices.range(..=addr).next_back()?;
        let off = addr - base;
        (off < e.len).then_some((off, e))
    }

    /// Dispatches a read; false if no device claims `addr` (`data` is then all-ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, e)) => {
                e.dev
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; false if no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, e)) => {
                e.dev
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }

    /// Resets every device once.
    pub fn reset_all(&self) {
        for e in self.devices.values() {
            e.dev.lock().unwrap_or_else(|p| p.into_inner()).reset();
        }
    }
}

/// Allows `burst` events per second; counts what it suppresses.
#[derive(Debug)]
pub struct RateLimit {
    burst: u64,
    window: AtomicU64,
    count: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// A limiter of `burst` events per second.
    pub const fn new(burst: u64) -> Self {
        RateLimit {
            burst,
            window: AtomicU64::new(0),
            count: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether an event at second `now` may be logged; returns how many were suppressed since
    /// the last allowed one.
    pub fn allow_at(&self, now: u64) -> Option<u64> {
        if self.window.swap(now, Ordering::Relaxed) != now {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < self.burst {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// [`Self::allow_at`] with the current time.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.allow_at(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rec(Vec<(u64, u8)>);
    impl BusDevice for Rec {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn dispatch_by_range() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Rec(vec![])));
        bus.insert(0x3f8, 8, a.clone()).expect("insert");
        bus.insert(0x70, 2, Arc::new(Mutex::new(Rec(vec![]))))
            .expect("insert");
        assert!(bus.insert(0x3fc, 8, a.clone()).is_err());
        assert!(bus.insert(0x3f0, 9, a.clone()).is_err());
        assert!(bus.insert(0x3f0, 8, a.clone()).is_ok());
        assert!(bus.insert(5, 0, a.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, a.clone()).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x3f9, &[7]));
        assert!(!bus.write(0x72, &[7]));
        assert_eq!(a.lock().expect("lock").0, vec![(1, 7)]);
    }

    #[test]
    fn rate_limit() {
        let r = RateLimit::new(2);
        assert_eq!(r.allow_at(10), Some(0));
        assert_eq!(r.allow_at(10), Some(0));
        assert_eq!(r.allow_at(10), None);
        assert_eq!(r.allow_at(10), None);
        assert_eq!(r.allow_at(11), Some(2));
    }
}
