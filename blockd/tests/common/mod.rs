//! What blockd's front-end tests share (`tests/worker.rs`, `tests/hostile.rs`): guest memory
//! as a memfd mapped here and handed to blockd in the memory table, the split-ring descriptor
//! layout, and scratch directories.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Size of the guest memory.
pub const MEM_SIZE: usize = 1 << 20;

/// Guest memory: a shared memfd of [`MEM_SIZE`] bytes, mapped here (for the test's lifetime).
pub struct GuestMem {
    /// Where it is mapped.
    pub base: *mut u8,
    /// The memfd, for the memory table.
    pub memfd: File,
}

impl GuestMem {
    /// A fresh memfd named `name`, mapped.
    pub fn new(name: &CStr) -> GuestMem {
        // SAFETY: memfd_create with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: fd is a fresh descriptor we own from here on.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(MEM_SIZE as u64).expect("ftruncate");
        // SAFETY: a fresh shared mapping of the memfd's MEM_SIZE bytes.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap");
        GuestMem {
            base: base.cast(),
            memfd,
        }
    }

    /// Another handle on the same mapping (the memfd duplicated).
    pub fn share(&self) -> GuestMem {
        GuestMem {
            base: self.base,
            memfd: self.memfd.try_clone().expect("dup memfd"),
        }
    }

    /// The user address of `gpa` (for the vring addresses).
    pub fn ua(&self, gpa: u64) -> u64 {
        self.base as u64 + gpa
    }

    /// Writes `bytes` at `gpa`.
    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= MEM_SIZE);
        // SAFETY: inside the mapping (checked above); the back end only reads what the test
        // publishes after a fence.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(gpa as usize), bytes.len())
        };
    }

    /// Reads `len` bytes at `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= MEM_SIZE);
        let mut v = vec![0u8; len];
        // SAFETY: inside the mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(gpa as usize), v.as_mut_ptr(), len) };
        v
    }

    /// Reads the u16 at `gpa` (aligned), which the back end writes concurrently.
    pub fn read_u16_volatile(&self, gpa: u64) -> u16 {
        assert!(gpa as usize + 2 <= MEM_SIZE && gpa % 2 == 0);
        // SAFETY: an aligned u16 inside the mapping (checked above).
        unsafe { std::ptr::read_volatile(self.base.add(gpa as usize).cast::<u16>()) }
    }

    /// Writes descriptor `i` of the table at `table`.
    pub fn desc_at(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.write(table + u64::from(i) * 16, &d);
    }
}

/// A fresh, empty directory `PREFIX-PID-N` in the target's temporary directory.
pub fn scratch(prefix: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}
