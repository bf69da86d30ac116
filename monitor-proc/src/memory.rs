//! Guest RAM: one anonymous memfd, sized once and sealed against growing and shrinking.
//!
//! The monitor never maps guest RAM itself. It creates the memfd (`MFD_CLOEXEC |
//! MFD_ALLOW_SEALING`), sizes it with `ftruncate`, then seals it with `F_SEAL_GROW |
//! F_SEAL_SHRINK | F_SEAL_SEAL`, so no worker that maps it `MAP_SHARED` can ever see it change
//! size under its mappings (a shrink would turn guest accesses into `SIGBUS` in the mapper), and
//! nobody can lift or add seals later. The same fd is handed to every worker that needs RAM.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};

/// The seals guest RAM carries.
pub const GUEST_RAM_SEALS: libc::c_int =
    libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is zero or not a multiple of the page size.
    #[error("guest RAM size {0} is not a non-zero multiple of 4 KiB")]
    BadSize(u64),
    /// A system call failed.
    #[error("cannot create guest RAM ({what}): {source}")]
    Sys {
        /// The failing step.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Guest RAM as a sealed memfd.
#[derive(Debug)]
pub struct GuestMemory {
    file: File,
    size: u64,
}

impl GuestMemory {
    /// Creates a memfd of exactly `size` bytes and seals its size.
    pub fn create(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || size % 4096 != 0 {
            return Err(MemoryError::BadSize(size));
        }
        let len = libc::off_t::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let name: &CStr = c"bulkhead-guest-ram";
        // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no other arguments
        // that refer to memory.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(sys("memfd_create"));
        }
        // SAFETY: memfd_create just returned this fd; nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: ftruncate on an fd we own; no memory is passed.
        if unsafe { libc::ftruncate(file.as_raw_fd(), len) } < 0 {
            return Err(sys("ftruncate"));
        }
        // SAFETY: fcntl F_ADD_SEALS with an integer argument on an fd we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, GUEST_RAM_SEALS) } < 0 {
            return Err(sys("F_ADD_SEALS"));
        }
        Ok(GuestMemory { file, size })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The seals currently set on the memfd.
    pub fn seals(&self) -> std::io::Result<libc::c_int> {
        // SAFETY: fcntl F_GET_SEALS on an fd we own; no memory is passed.
        let seals = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(seals)
    }
}

impl AsFd for GuestMemory {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn sys(what: &'static str) -> MemoryError {
    MemoryError::Sys {
        what,
        source: std::io::Error::last_os_error(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_is_sized_sealed_and_cloexec() {
        let mem = GuestMemory::create(2 << 20).expect("create");
        assert_eq!(mem.size(), 2 << 20);
        let meta = mem.file.metadata().expect("metadata");
        assert_eq!(meta.len(), 2 << 20);
        let seals = mem.seals().expect("seals");
        assert_eq!(seals & GUEST_RAM_SEALS, GUEST_RAM_SEALS);
        // SAFETY: F_GETFD on an fd we own.
        let flags = unsafe { libc::fcntl(mem.as_fd().as_raw_fd(), libc::F_GETFD) };
        assert!(flags & libc::FD_CLOEXEC != 0);
        // Growing and shrinking are refused.
        // SAFETY: ftruncate on an fd we own.
        assert!(unsafe { libc::ftruncate(mem.as_fd().as_raw_fd(), 4 << 20) } < 0);
        // SAFETY: as above.
        assert!(unsafe { libc::ftruncate(mem.as_fd().as_raw_fd(), 4096) } < 0);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(
            GuestMemory::create(0),
            Err(MemoryError::BadSize(0))
        ));
        assert!(matches!(
            GuestMemory::create(4095),
            Err(MemoryError::BadSize(4095))
        ));
    }
}
