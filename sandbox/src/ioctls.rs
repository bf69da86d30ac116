//! The ioctl request numbers the role policies allow, computed the way the kernel headers
//! define them (`_IO`/`_IOR`/`_IOW`/`_IOWR` over the argument type's size), with the argument
//! types from kvm-bindings. Nothing here is a magic number copied from elsewhere; the unit tests
//! check a few against the values every KVM user knows.

use std::mem::size_of;

use kvm_bindings::{
    kvm_cpuid2, kvm_debugregs, kvm_fpu, kvm_ioeventfd, kvm_irq_routing, kvm_irqchip, kvm_irqfd,
    kvm_lapic_state, kvm_mp_state, kvm_msr_list, kvm_msrs, kvm_pit_config, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, KVMIO,
};

const NRSHIFT: u64 = 0;
const TYPESHIFT: u64 = 8;
const SIZESHIFT: u64 = 16;
const DIRSHIFT: u64 = 30;
const NONE: u64 = 0;
const WRITE: u64 = 1;
const READ: u64 = 2;

const fn ioc(dir: u64, ty: u32, nr: u64, size: usize) -> u64 {
    (dir << DIRSHIFT) | ((ty as u64) << TYPESHIFT) | (nr << NRSHIFT) | ((size as u64) << SIZESHIFT)
}
const fn io(ty: u32, nr: u64) -> u64 {
    ioc(NONE, ty, nr, 0)
}
const fn ior(ty: u32, nr: u64, size: usize) -> u64 {
    ioc(READ, ty, nr, size)
}
const fn iow(ty: u32, nr: u64, size: usize) -> u64 {
    ioc(WRITE, ty, nr, size)
}
const fn iowr(ty: u32, nr: u64, size: usize) -> u64 {
    ioc(READ | WRITE, ty, nr, size)
}

/// A named ioctl request number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ioctl {
    /// The kernel header's name.
    pub name: &'static str,
    /// The request number (the kernel compares the low 32 bits).
    pub nr: u64,
}

macro_rules! ioctls {
    ($( $name:ident = $val:expr; )*) => {
        $( #[doc = concat!("`", stringify!($name), "`.")] pub const $name: u64 = $val; )*
    };
}

ioctls! {
    KVM_GET_API_VERSION = io(KVMIO, 0x00);
    KVM_CREATE_VM = io(KVMIO, 0x01);
    KVM_GET_MSR_INDEX_LIST = iowr(KVMIO, 0x02, size_of::<kvm_msr_list>());
    KVM_CHECK_EXTENSION = io(KVMIO, 0x03);
    KVM_GET_VCPU_MMAP_SIZE = io(KVMIO, 0x04);
    KVM_GET_SUPPORTED_CPUID = iowr(KVMIO, 0x05, size_of::<kvm_cpuid2>());
    KVM_CREATE_VCPU = io(KVMIO, 0x41);
    KVM_SET_USER_MEMORY_REGION = iow(KVMIO, 0x46, size_of::<kvm_userspace_memory_region>());
    KVM_SET_TSS_ADDR = io(KVMIO, 0x47);
    KVM_SET_IDENTITY_MAP_ADDR = iow(KVMIO, 0x48, size_of::<u64>());
    KVM_CREATE_IRQCHIP = io(KVMIO, 0x60);
    KVM_GET_IRQCHIP = iowr(KVMIO, 0x62, size_of::<kvm_irqchip>());
    KVM_SET_IRQCHIP = ior(KVMIO, 0x63, size_of::<kvm_irqchip>());
    KVM_SET_GSI_ROUTING = iow(KVMIO, 0x6a, size_of::<kvm_irq_routing>());
    KVM_IRQFD = iow(KVMIO, 0x76, size_of::<kvm_irqfd>());
    KVM_IOEVENTFD = iow(KVMIO, 0x79, size_of::<kvm_ioeventfd>());
    KVM_CREATE_PIT2 = iow(KVMIO, 0x77, size_of::<kvm_pit_config>());
    KVM_RUN = io(KVMIO, 0x80);
    KVM_GET_REGS = ior(KVMIO, 0x81, size_of::<kvm_regs>());
    KVM_SET_REGS = iow(KVMIO, 0x82, size_of::<kvm_regs>());
    KVM_GET_SREGS = ior(KVMIO, 0x83, size_of::<kvm_sregs>());
    KVM_SET_SREGS = iow(KVMIO, 0x84, size_of::<kvm_sregs>());
    KVM_GET_MSRS = iowr(KVMIO, 0x88, size_of::<kvm_msrs>());
    KVM_SET_MSRS = iow(KVMIO, 0x89, size_of::<kvm_msrs>());
    KVM_GET_FPU = ior(KVMIO, 0x8c, size_of::<kvm_fpu>());
    KVM_SET_FPU = iow(KVMIO, 0x8d, size_of::<kvm_fpu>());
    KVM_GET_LAPIC = ior(KVMIO, 0x8e, size_of::<kvm_lapic_state>());
    KVM_SET_LAPIC = iow(KVMIO, 0x8f, size_of::<kvm_lapic_state>());
    KVM_SET_CPUID2 = iow(KVMIO, 0x90, size_of::<kvm_cpuid2>());
    KVM_GET_MP_STATE = ior(KVMIO, 0x98, size_of::<kvm_mp_state>());
    KVM_SET_MP_STATE = iow(KVMIO, 0x99, size_of::<kvm_mp_state>());
    KVM_GET_PIT2 = ior(KVMIO, 0x9f, size_of::<kvm_pit_state2>());
    KVM_SET_PIT2 = iow(KVMIO, 0xa0, size_of::<kvm_pit_state2>());
    KVM_GET_VCPU_EVENTS = ior(KVMIO, 0x9f, size_of::<kvm_vcpu_events>());
    KVM_SET_VCPU_EVENTS = iow(KVMIO, 0xa0, size_of::<kvm_vcpu_events>());
    KVM_GET_DEBUGREGS = ior(KVMIO, 0xa1, size_of::<kvm_debugregs>());
    KVM_SET_DEBUGREGS = iow(KVMIO, 0xa2, size_of::<kvm_debugregs>());
    KVM_GET_XCRS = ior(KVMIO, 0xa6, size_of::<kvm_xcrs>());
    KVM_SET_XCRS = iow(KVMIO, 0xa7, size_of::<kvm_xcrs>());

    // tun/tap (`'T'`), for netd: the monitor opens the tap and sets IFF_*; netd only tunes it;
    // the confined monitor reads a passed tap's name and flags (`TUNGETIFF`).
    TUNSETOFFLOAD = iow(b'T' as u32, 208, size_of::<libc::c_uint>());
    TUNGETIFF = ior(b'T' as u32, 210, size_of::<libc::c_uint>());
    TUNGETVNETHDRSZ = ior(b'T' as u32, 215, size_of::<libc::c_int>());
    TUNSETVNETHDRSZ = iow(b'T' as u32, 216, size_of::<libc::c_int>());
    TUNSETQUEUE = iow(b'T' as u32, 217, size_of::<libc::c_int>());

    // Terminals and sockets, for the monitor: `-serial stdio` puts the terminal in raw mode and
    // restores it at exit; `set_nonblocking` on std sockets.
    TCGETS = 0x5401;
    TCSETS = 0x5402;
    TCSETSW = 0x5403;
    TCSETSF = 0x5404;
    FIONBIO = 0x5421;

    // Block devices (0x12), for blockd when an image is a block device rather than a file.
    BLKSSZGET = io(0x12, 104);
    BLKGETSIZE64 = ior(0x12, 114, size_of::<usize>());
}

macro_rules! list {
    ($( $name:ident ),* $(,)?) => {
        &[ $( Ioctl { name: stringify!($name), nr: $name } ),* ]
    };
}

/// The KVM ioctls `bulkhead-vcpu` issues, on the /dev/kvm, VM and vCPU fds. Found by reading
/// every kvm-ioctls call in vcpu-proc and confirmed by tracing the worker under the host tests
/// and a Linux boot in L1.
pub const VCPU_KVM: &[Ioctl] = list![
    KVM_GET_API_VERSION,
    KVM_CREATE_VM,
    KVM_GET_MSR_INDEX_LIST,
    KVM_CHECK_EXTENSION,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_GET_SUPPORTED_CPUID,
    KVM_CREATE_VCPU,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_TSS_ADDR,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_CREATE_IRQCHIP,
    KVM_GET_IRQCHIP,
    KVM_SET_IRQCHIP,
    KVM_SET_GSI_ROUTING,
    KVM_IRQFD,
    KVM_IOEVENTFD,
    KVM_CREATE_PIT2,
    KVM_RUN,
    KVM_GET_REGS,
    KVM_SET_REGS,
    KVM_GET_SREGS,
    KVM_SET_SREGS,
    KVM_GET_MSRS,
    KVM_SET_MSRS,
    KVM_GET_FPU,
    KVM_SET_FPU,
    KVM_GET_LAPIC,
    KVM_SET_LAPIC,
    KVM_SET_CPUID2,
    KVM_GET_MP_STATE,
    KVM_SET_MP_STATE,
    KVM_GET_PIT2,
    KVM_SET_PIT2,
    KVM_GET_VCPU_EVENTS,
    KVM_SET_VCPU_EVENTS,
    KVM_GET_DEBUGREGS,
    KVM_SET_DEBUGREGS,
    KVM_GET_XCRS,
    KVM_SET_XCRS,
];

/// The tap ioctls netd may issue on the tap fd it is handed, once sandboxed: the offloads and the
/// vnet header size the guest negotiated, and attaching/detaching a multiqueue tap's queue as the
/// guest enables or disables its queue pair (`TUNGETIFF` it uses only before the sandbox).
pub const NETD_TAP: &[Ioctl] = list![TUNSETOFFLOAD, TUNSETVNETHDRSZ, TUNSETQUEUE];

/// The monitor's ioctls after start-up: the terminal of `-serial stdio` (restored at exit),
/// non-blocking mode on sockets, and `TUNGETIFF` (read-only: the interface name and flags of a
/// tap fd a client passed with `getfd`/`add-fd`, so `netdev_add` can check that it is a tap set
/// up for netd and that several fds are queues of one multiqueue tap).
pub const MONITOR_TTY: &[Ioctl] = list![TCGETS, TCSETS, TCSETSW, TCSETSF, FIONBIO, TUNGETIFF];

/// The block-device queries blockd may issue on an image that is a block device.
pub const BLOCKD_BLK: &[Ioctl] = list![BLKSSZGET, BLKGETSIZE64];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_well_known_values() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_CREATE_VM, 0xae01);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_SET_REGS, 0x4090_ae82);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
        assert_eq!(KVM_SET_CPUID2, 0x4008_ae90);
        assert_eq!(KVM_GET_SUPPORTED_CPUID, 0xc008_ae05);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(KVM_CREATE_PIT2, 0x4040_ae77);
        assert_eq!(KVM_GET_LAPIC, 0x8400_ae8e);
        assert_eq!(TUNSETOFFLOAD, 0x4004_54d0);
        assert_eq!(TUNSETVNETHDRSZ, 0x4004_54d8);
        assert_eq!(TUNSETQUEUE, 0x4004_54d9);
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
    }

    #[test]
    fn lists_have_no_duplicates() {
        for list in [VCPU_KVM, NETD_TAP, BLOCKD_BLK] {
            let mut nrs: Vec<u64> = list.iter().map(|i| i.nr).collect();
            nrs.sort_unstable();
            nrs.dedup();
            assert_eq!(nrs.len(), list.len());
        }
    }
}
