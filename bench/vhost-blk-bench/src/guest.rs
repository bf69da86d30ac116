//! Guest memory: one memfd, mapped `MAP_SHARED` here (through `vm-memory`) and described to the
//! back end in `SET_MEM_TABLE`, which maps the same pages. Guest physical addresses start at 0.

use std::fs::File;
use std::os::fd::FromRawFd;

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::{Error, Result};

/// The shared guest memory.
pub struct GuestMem {
    mem: GuestMemoryMmap,
    region: VhostUserMemoryRegionInfo,
}

impl GuestMem {
    /// `size` bytes of zeroed guest memory (pages are allocated when first touched).
    pub fn new(size: usize) -> Result<GuestMem> {
        // SAFETY: memfd_create with a NUL-terminated name and flags only.
        let fd =
            unsafe { libc::memfd_create(c"vhost-blk-bench-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Io("memfd_create", std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)
            .map_err(|e| Error::Io("ftruncate(memfd)", e))?;
        let region =
            GuestRegionMmap::from_range(GuestAddress(0), size, Some(FileOffset::new(file, 0)))
                .map_err(|e| Error::Memory(format!("mapping the memfd: {e}")))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(&region)
            .map_err(|e| Error::Vhost("memory region", e))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| Error::Memory(format!("{e}")))?;
        Ok(GuestMem { mem, region: info })
    }

    /// The memory, for `vm-memory`'s accessors.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The region as `SET_MEM_TABLE` describes it (its fd stays open as long as `self`).
    pub fn region(&self) -> VhostUserMemoryRegionInfo {
        self.region
    }

    /// The address of guest physical address `gpa` in this process (what `SET_VRING_ADDR` takes).
    pub fn user_addr(&self, gpa: u64) -> u64 {
        self.region.userspace_addr + gpa
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.region.memory_size
    }
}
