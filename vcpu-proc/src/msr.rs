//! Model-specific registers: the values a vCPU boots with, and which MSRs a reset puts back
//! (notably the KVM paravirt MSRs, so the old kernel's kvmclock, steal-time and async-PF areas
//! stop being written once the guest restarts).

use kvm_bindings::{kvm_msr_entry, Msrs};

/// Errors building MSR lists.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The FAM wrapper refused the entries.
    #[error("cannot build the MSR list: {0:?}")]
    Fam(vmm_sys_util::fam::Error),
}

/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// STAR.
pub const MSR_STAR: u32 = 0xc000_0081;
/// LSTAR.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// CSTAR.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// SYSCALL_MASK.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// KERNEL_GS_BASE.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_ADJUST.
pub const MSR_IA32_TSC_ADJUST: u32 = 0x3b;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// MTRRdefType.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// Old KVM wall clock (write-only trigger).
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
/// KVM wall clock (write-only trigger).
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// MSR values every vCPU boots with.
pub fn boot_entries() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Whether a reset should write `index` back to its boot value. The TSC keeps running (writing
/// it per vCPU would skew the vCPUs' TSCs) and the wall-clock MSRs are write-only triggers that
/// would make KVM write to guest memory.
pub fn restore_on_reset(index: u32) -> bool {
    !matches!(
        index,
        MSR_IA32_TSC | MSR_IA32_TSC_ADJUST | MSR_KVM_WALL_CLOCK | MSR_KVM_WALL_CLOCK_NEW
    )
}

/// Wraps entries for KVM_GET_MSRS/KVM_SET_MSRS.
pub fn to_msrs(entries: &[kvm_msr_entry]) -> Result<Msrs, Error> {
    Msrs::from_entries(entries).map_err(Error::Fam)
}

/// Entries (with zero data) for every index in `indices` a reset restores.
pub fn reset_candidates(indices: &[u32]) -> Vec<kvm_msr_entry> {
    indices
        .iter()
        .copied()
        .filter(|&i| restore_on_reset(i))
        .map(|index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_values() {
        let e = boot_entries();
        let get = |i| e.iter().find(|x| x.index == i).map(|x| x.data);
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(MSR_LSTAR), Some(0));
        assert!(to_msrs(&e).is_ok());
    }

    #[test]
    fn reset_skips_tsc_and_triggers() {
        let c = reset_candidates(&[0x10, 0x11, 0x4b56_4d01, 0x4b56_4d00, 0x174]);
        let idx: Vec<u32> = c.iter().map(|e| e.index).collect();
        assert_eq!(idx, vec![0x4b56_4d01, 0x174]);
    }
}
