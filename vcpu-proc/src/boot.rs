//! Linux boot: loads a bzImage or ELF vmlinux with linux-loader, places the initrd and command
//! line, writes the zero page (`boot_params`, e820 map, RSDP pointer), the boot GDT and the
//! identity-mapped page tables, and computes the 64-bit entry state (long mode, paging on,
//! `rsi` = zero page) the 64-bit boot protocol asks for.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{self, GuestMem};

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// `xloadflags` bit: the kernel has a 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Default `initrd_addr_max` for kernels that do not state one.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Linux's `COMMAND_LINE_SIZE` on x86 for kernels without `cmdline_size` in their header.
const DEFAULT_CMDLINE_SIZE: usize = 2048;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_NE: u64 = 0x20;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel image could not be read.
    #[error("cannot read the kernel image: {0}")]
    KernelRead(std::io::Error),
    /// linux-loader rejected or failed to load the kernel.
    #[error("cannot load the kernel: {0}")]
    KernelLoad(linux_loader::loader::Error),
    /// A bzImage without a 64-bit entry point.
    #[error("the bzImage has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")]
    No64BitEntry,
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// The initrd could not be read.
    #[error("cannot read the initrd: {0}")]
    InitrdRead(std::io::Error),
    /// The initrd does not fit in guest memory.
    #[error("the initrd ({size} bytes) does not fit in guest memory above the kernel (ends {kernel_end:#x})")]
    InitrdTooBig {
        /// Initrd size.
        size: u64,
        /// Highest address the kernel occupies.
        kernel_end: u64,
    },
    /// Writing to guest memory failed.
    #[error("cannot write {what} to guest memory: {source}")]
    GuestWrite {
        /// What was written.
        what: &'static str,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
}

fn write_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> Error {
    move |source| Error::GuestWrite { what, source }
}

/// Physical address of the x86 reset vector (F000:FFF0).
pub const RESET_VECTOR: u64 = 0xf_fff0;
/// What sits at the reset vector in place of a BIOS: `mov al, 0xfe; out 0x64, al; hlt;
/// jmp $-3` (16-bit code). Linux on a hardware-reduced-ACPI machine without EFI reboots by
/// jumping to the BIOS reset vector in real mode (`reboot_type` EFI, then BIOS), so "the BIOS"
/// here pulses the reset line through the i8042 and the machine resets.
pub const RESET_VECTOR_STUB: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// One e820 map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// Type ([`E820_RAM`], [`E820_RESERVED`]).
    pub kind: u32,
}

/// The e820 map of a guest with `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let low_end = memory::low_ram_end(mem_size);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: memory::EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: memory::EBDA_START,
            size: 0xa_0000 - memory::EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: memory::ACPI_START,
            size: memory::BIOS_END - memory::ACPI_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: memory::HIMEM_START,
            size: low_end - memory::HIMEM_START,
            kind: E820_RAM,
        },
        // PCI ECAM: Linux trusts MCFG only for a range the firmware reserved.
        E820Entry {
            addr: crate::pci::ECAM_BASE,
            size: crate::pci::ECAM_SIZE,
            kind: E820_RESERVED,
        },
    ];
    for r in memory::ram_ranges(mem_size).iter().skip(1) {
        map.push(E820Entry {
            addr: r.gpa,
            size: r.len,
            kind: E820_RAM,
        });
    }
    map
}

/// Where the kernel was loaded and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// 64-bit entry point (`rip`).
    pub entry: u64,
    /// Initrd placement, if any: (address, size).
    pub initrd: Option<(u64, u64)>,
}

fn is_elf(kernel: &mut File) -> Result<bool, Error> {
    let mut magic = [0u8; 4];
    kernel.seek(SeekFrom::Start(0)).map_err(Error::KernelRead)?;
    let n = kernel.read(&mut magic).map_err(Error::KernelRead)?;
    Ok(n == 4 && magic == *b"\x7fELF")
}

/// Loads kernel, initrd, command line, zero page, GDT and page tables into `mem`.
pub fn load_linux(
    mem: &GuestMem,
    mem_size: u64,
    kernel: &mut File,
    initrd: Option<&mut File>,
    cmdline: &str,
    rsdp_addr: u64,
) -> Result<Loaded, Error> {
    let himem = Some(GuestAddress(memory::HIMEM_START));
    let elf = is_elf(kernel)?;
    let (entry, kernel_end, header) = if elf {
        let r = Elf::load(mem, None, kernel, himem).map_err(Error::KernelLoad)?;
        (r.kernel_load.0, r.kernel_end, None)
    } else {
        let r = BzImage::load(mem, None, kernel, himem).map_err(Error::KernelLoad)?;
        let hdr = r.setup_header.unwrap_or_default();
        if hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(Error::No64BitEntry);
        }
        // The decompressor needs init_size bytes from the load address.
        let end = r
            .kernel_end
            .max(r.kernel_load.0.saturating_add(u64::from(hdr.init_size)));
        (r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET, end, Some(hdr))
    };

    // Command line.
    let cmdline_cap = match &header {
        Some(h) if h.version >= 0x0206 && h.cmdline_size > 0 => {
            (h.cmdline_size as usize + 1).min(memory::CMDLINE_MAX)
        }
        _ => DEFAULT_CMDLINE_SIZE,
    };
    let cl = Cmdline::try_from(cmdline, cmdline_cap).map_err(Error::Cmdline)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(memory::CMDLINE), &cl)
        .map_err(Error::KernelLoad)?;

    // Initrd at the top of low RAM, page aligned, below the kernel's limit.
    let initrd_place = match initrd {
        Some(f) => {
            let size = f.metadata().map_err(Error::InitrdRead)?.len();
            let max = match &header {
                Some(h) if h.version >= 0x0203 && h.initrd_addr_max != 0 => {
                    u64::from(h.initrd_addr_max)
                }
                Some(_) => DEFAULT_INITRD_ADDR_MAX,
                None => u64::from(u32::MAX >> 1),
            };
            let top = memory::low_ram_end(mem_size).min(max.saturating_add(1));
            let too_big = Error::InitrdTooBig { size, kernel_end };
            let start = top.checked_sub(size).ok_or(too_big)? & !0xfff;
            if start < kernel_end {
                return Err(Error::InitrdTooBig { size, kernel_end });
            }
            f.seek(SeekFrom::Start(0)).map_err(Error::InitrdRead)?;
            let len =
                usize::try_from(size).map_err(|_| Error::InitrdTooBig { size, kernel_end })?;
            mem.read_exact_volatile_from(GuestAddress(start), f, len)
                .map_err(write_err("initrd"))?;
            Some((start, size))
        }
        None => None,
    };

    let cmdline_len = cl.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(0);
    let params = zero_page(header, mem_size, initrd_place, cmdline_len, rsdp_addr);
    mem.write_obj(params, GuestAddress(memory::ZERO_PAGE))
        .map_err(write_err("zero page"))?;
    write_gdt_and_page_tables(mem)?;
    mem.write_slice(&RESET_VECTOR_STUB, GuestAddress(RESET_VECTOR))
        .map_err(write_err("reset vector"))?;
    Ok(Loaded {
        entry,
        initrd: initrd_place,
    })
}

/// Builds the zero page. `header` is the bzImage's setup header (None for ELF).
pub fn zero_page(
    header: Option<setup_header>,
    mem_size: u64,
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
    rsdp_addr: u64,
) -> boot_params {
    let mut p = boot_params::default();
    match header {
        Some(h) => p.hdr = h,
        None => {
            p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            p.hdr.header = KERNEL_HDR_MAGIC;
            p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            p.hdr.cmdline_size = cmdline_len as u32;
        }
    }
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.cmd_line_ptr = memory::CMDLINE as u32;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
        p.ext_ramdisk_image = (addr >> 32) as u32;
        p.ext_ramdisk_size = (size >> 32) as u32;
    }
    p.acpi_rsdp_addr = rsdp_addr;
    let map = e820_map(mem_size);
    for (slot, e) in p.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    p.e820_entries = map.len().min(p.e820_table.len()) as u8;
    p
}

/// A GDT entry from access flags, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment a GDT entry at `index` describes.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT_ENTRIES: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

fn write_gdt_and_page_tables(mem: &GuestMem) -> Result<(), Error> {
    for (i, e) in BOOT_GDT_ENTRIES.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(memory::BOOT_GDT + 8 * i as u64))
            .map_err(write_err("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(memory::BOOT_IDT))
        .map_err(write_err("IDT"))?;
    // Identity-map the first 4 GiB with 2 MiB pages.
    mem.write_obj(memory::PDPT | 0x03, GuestAddress(memory::PML4))
        .map_err(write_err("PML4"))?;
    for i in 1..512u64 {
        mem.write_obj(0u64, GuestAddress(memory::PML4 + i * 8))
            .map_err(write_err("PML4"))?;
    }
    for i in 0..512u64 {
        let v = if i < 4 {
            (memory::PD + i * 0x1000) | 0x03
        } else {
            0
        };
        mem.write_obj(v, GuestAddress(memory::PDPT + i * 8))
            .map_err(write_err("PDPT"))?;
    }
    for i in 0..4 * 512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(memory::PD + i * 8))
            .map_err(write_err("page directory"))?;
    }
    Ok(())
}

/// General registers at the 64-bit entry point.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: memory::BOOT_STACK,
        rbp: memory::BOOT_STACK,
        rsi: memory::ZERO_PAGE,
        ..Default::default()
    }
}

/// Special registers for the 64-bit entry point, starting from KVM's defaults in `sregs`.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(BOOT_GDT_ENTRIES[1], 1);
    let data = segment_from_gdt(BOOT_GDT_ENTRIES[2], 2);
    let tss = segment_from_gdt(BOOT_GDT_ENTRIES[3], 3);
    sregs.gdt.base = memory::BOOT_GDT;
    sregs.gdt.limit = (BOOT_GDT_ENTRIES.len() * 8 - 1) as u16;
    sregs.idt.base = memory::BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = memory::PML4;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// FPU state at reset (x87 control word and MXCSR defaults).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode() {
        assert_eq!(BOOT_GDT_ENTRIES[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT_ENTRIES[2], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(BOOT_GDT_ENTRIES[1], 1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.type_),
            (8, 1, 0, 1, 0xb)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(BOOT_GDT_ENTRIES[2], 2);
        assert_eq!(
            (ds.selector, ds.l, ds.db, ds.s, ds.type_),
            (0x10, 0, 1, 1, 3)
        );
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn e820_small_guest() {
        let m = e820_map(256 << 20);
        assert_eq!(
            m[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(m[2].addr, 0xe0000);
        assert_eq!(m[2].kind, E820_RESERVED);
        assert_eq!(
            m[3],
            E820Entry {
                addr: 0x100000,
                size: (256 << 20) - 0x100000,
                kind: E820_RAM
            }
        );
        assert_eq!(
            m[4],
            E820Entry {
                addr: 0xe000_0000,
                size: 1 << 20,
                kind: E820_RESERVED
            }
        );
        assert_eq!(m.len(), 5);
        // Entries are sorted and disjoint.
        for w in m.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn e820_large_guest_has_high_ram() {
        let m = e820_map(6 << 30);
        let last = m[m.len() - 1];
        assert_eq!(last.addr, 1 << 32);
        assert_eq!(last.size, (6 << 30) - 0xC000_0000);
        let total: u64 = m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(total, (6 << 30) - (0x100000 - 0x9fc00));
    }

    #[test]
    fn zero_page_for_elf() {
        let p = zero_page(None, 64 << 20, Some((0x300_0000, 0x1234)), 10, 0xe0000);
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 5);
    }

    #[test]
    fn reset_vector_stub_is_in_the_reserved_bios_area() {
        let top = RESET_VECTOR + RESET_VECTOR_STUB.len() as u64;
        assert!(RESET_VECTOR >= memory::ACPI_START && top <= memory::BIOS_END);
        let m = e820_map(64 << 20);
        assert!(m
            .iter()
            .any(|e| e.kind == E820_RESERVED && e.addr <= RESET_VECTOR && top <= e.addr + e.size));
        // out 0x64 with 0xfe: the i8042 reset command.
        assert_eq!(&RESET_VECTOR_STUB[..4], &[0xb0, 0xfe, 0xe6, 0x64]);
    }

    #[test]
    fn entry_state_is_long_mode() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.cs.l, 1);
        let r = boot_regs(0x100200);
        assert_eq!(r.rsi, memory::ZERO_PAGE);
        assert_eq!(r.rip, 0x100200);
    }
}
