//! Guest physical memory: the monitor's memfd mapped `MAP_SHARED`, split around the 32-bit
//! PCI/IOAPIC/LAPIC hole, and registered as KVM memory slots. Also owns the guest physical
//! layout constants every other module places things by.

use std::fs::File;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The guest memory type used throughout the worker.
pub type GuestMem = vm_memory::GuestMemoryMmap<()>;

/// Start of the 32-bit MMIO hole (PCI, IOAPIC, LAPIC); RAM above it moves to [`HIGH_RAM_START`].
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// RAM that does not fit below the hole continues here (4 GiB).
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Boot GDT.
pub const BOOT_GDT: u64 = 0x500;
/// Boot IDT (one null entry).
pub const BOOT_IDT: u64 = 0x520;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4.
pub const PML4: u64 = 0x9000;
/// Identity-mapping page tables: PDPT.
pub const PDPT: u64 = 0xa000;
/// Identity-mapping page tables: four page directories of 2 MiB pages (0xb000..0xf000).
pub const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x2_0000;
/// Largest command line we place (bytes, including the NUL).
pub const CMDLINE_MAX: usize = 0x1_0000;
/// Start of the extended BIOS data area, reserved in the e820 map.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables live in the BIOS area; the RSDP sits at its start so a legacy scan finds it.
pub const ACPI_START: u64 = 0xe_0000;
/// End of the BIOS area (1 MiB).
pub const BIOS_END: u64 = 0x10_0000;
/// Where bzImage/ELF kernels may start (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// LAPIC MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// TSS address KVM needs on Intel (three pages below the identity-map page).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// KVM's EPT identity-map page on Intel.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// Smallest guest we build: room for the low area, a kernel and its tables.
pub const MIN_MEM_SIZE: u64 = 4 << 20;

/// Errors building guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested size is unusable.
    #[error(
        "guest memory size {0:#x} is invalid (must be a multiple of 4 KiB and at least 4 MiB)"
    )]
    BadSize(u64),
    /// The memfd's size differs from the requested size.
    #[error("guest memory fd holds {actual:#x} bytes, setup says {expected:#x}")]
    SizeMismatch {
        /// The memfd's size.
        actual: u64,
        /// `VmSetup::mem_size`.
        expected: u64,
    },
    /// fstat on the memfd failed.
    #[error("cannot stat the guest memory fd: {0}")]
    Stat(std::io::Error),
    /// Mapping failed.
    #[error("cannot map guest memory: {0}")]
    Map(String),
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    Slot(kvm_ioctls::Error),
}

// The fixed layout must not overlap itself.
const _: () = assert!(BOOT_IDT + 8 <= 0x1000);
const _: () = assert!(PD + 4 * 0x1000 <= CMDLINE);
const _: () = assert!(ZERO_PAGE + 0x1000 <= BOOT_STACK);
const _: () = assert!(CMDLINE + CMDLINE_MAX as u64 <= EBDA_START);

/// One contiguous piece of guest RAM: guest address, length, offset in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// Guest physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of this range in the memfd.
    pub file_offset: u64,
}

/// Splits `size` bytes of RAM around the 32-bit hole.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    if size <= MMIO_HOLE_START {
        vec![RamRange {
            gpa: 0,
            len: size,
            file_offset: 0,
        }]
    } else {
        vec![
            RamRange {
                gpa: 0,
                len: MMIO_HOLE_START,
                file_offset: 0,
            },
            RamRange {
                gpa: HIGH_RAM_START,
                len: size - MMIO_HOLE_START,
                file_offset: MMIO_HOLE_START,
            },
        ]
    }
}

/// End (exclusive) of the RAM below the hole.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

/// Maps the memfd (shared) as guest memory of `size` bytes.
pub fn map_memfd(file: &File, size: u64) -> Result<GuestMem, Error> {
    if size < MIN_MEM_SIZE || size % 4096 != 0 || usize::try_from(size).is_err() {
        return Err(Error::BadSize(size));
    }
    let actual = file.metadata().map_err(Error::Stat)?.len();
    if actual != size {
        return Err(Error::SizeMismatch {
            actual,
            expected: size,
        });
    }
    let mut ranges = Vec::new();
    for r in ram_ranges(size) {
        let dup = file.try_clone().map_err(|e| Error::Map(e.to_string()))?;
        let len = usize::try_from(r.len).map_err(|_| Error::BadSize(size))?;
        ranges.push((
            GuestAddress(r.gpa),
            len,
            Some(FileOffset::new(dup, r.file_offset)),
        ));
    }
    GuestMem::from_ranges_with_files(ranges).map_err(|e| Error::Map(e.to_string()))
}

/// Registers every region of `mem` as a KVM memory slot (slot numbers from 0).
pub fn register_slots(vm: &VmFd, mem: &GuestMem) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Map(e.to_string()))?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the machine keeps alive
        // (and never unmaps) for as long as the VM fd exists; slots do not overlap.
        unsafe { vm.set_user_memory_region(desc) }.map_err(Error::Slot)?;
    }
    Ok(())
}

/// Whether `[gpa, gpa+len)` lies inside guest RAM.
pub fn is_ram(mem: &GuestMem, gpa: u64, len: u64) -> bool {
    if len == 0 {
        return true;
    }
    match gpa.checked_add(len - 1) {
        Some(last) => mem
            .iter()
            .any(|r| r.start_addr().raw_value() <= gpa && last <= r.last_addr().raw_value()),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(
            ram_ranges(256 << 20),
            vec![RamRange {
                gpa: 0,
                len: 256 << 20,
                file_offset: 0
            }]
        );
        assert_eq!(low_ram_end(256 << 20), 256 << 20);
    }

    #[test]
    fn large_guest_skips_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].len, MMIO_HOLE_START);
        assert_eq!(r[1].gpa, HIGH_RAM_START);
        assert_eq!(r[1].len, (4 << 30) - MMIO_HOLE_START);
        assert_eq!(r[1].file_offset, MMIO_HOLE_START);
        assert_eq!(low_ram_end(4 << 30), MMIO_HOLE_START);
    }
}
