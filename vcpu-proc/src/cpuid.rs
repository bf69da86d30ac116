//! Per-vCPU CPUID: KVM_GET_SUPPORTED_CPUID filtered with this vCPU's APIC id and the machine's
//! topology (one socket, `n` cores, one thread per core), the hypervisor bit, and TSC-deadline.
//! Pure functions over entry lists so they can be tested without KVM.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Errors building CPUID.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The FAM wrapper refused the entries (too many).
    #[error("cannot build the CPUID table: {0:?}")]
    Fam(vmm_sys_util::fam::Error),
}

/// The topology the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    /// Threads per core.
    pub threads_per_core: u32,
    /// Cores per socket.
    pub cores_per_socket: u32,
    /// Sockets.
    pub sockets: u32,
}

impl Topology {
    /// `vcpus` cores on one socket, one thread each (what `-smp N` gives).
    pub fn flat(vcpus: u32) -> Self {
        Topology {
            threads_per_core: 1,
            cores_per_socket: vcpus.max(1),
            sockets: 1,
        }
    }

    /// Logical processors per socket.
    pub fn per_socket(&self) -> u32 {
        self.threads_per_core * self.cores_per_socket
    }

    /// (socket, core, thread) of vCPU `index`.
    pub fn place(&self, index: u32) -> (u32, u32, u32) {
        let thread = index % self.threads_per_core;
        let core = (index / self.threads_per_core) % self.cores_per_socket;
        let socket = index / self.per_socket();
        (socket, core, thread)
    }

    /// APIC id of vCPU `index`: bit fields of socket/core/thread, like hardware.
    pub fn apic_id(&self, index: u32) -> u32 {
        let (socket, core, thread) = self.place(index);
        (socket << self.socket_shift()) | (core << self.core_shift()) | thread
    }

    /// Bits of the APIC id used by the thread id.
    pub fn core_shift(&self) -> u32 {
        bits_for(self.threads_per_core)
    }

    /// Bits of the APIC id below the socket id.
    pub fn socket_shift(&self) -> u32 {
        self.core_shift() + bits_for(self.cores_per_socket)
    }
}

/// Number of bits needed to number `n` items.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Filters KVM's supported CPUID for vCPU `index`.
pub fn filter(
    supported: &[kvm_cpuid_entry2],
    index: u32,
    topo: Topology,
    tsc_deadline: bool,
) -> Vec<kvm_cpuid_entry2> {
    let apic_id = topo.apic_id(index);
    let per_socket = topo.per_socket();
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.len() + 4);
    for e in supported {
        let mut e = *e;
        match e.function {
            1 => {
                // ebx: [31:24] initial APIC id, [23:16] logical processors per package,
                // [15:8] CLFLUSH line size in qwords.
                e.ebx = (apic_id << 24) | ((per_socket.min(255)) << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                if per_socket > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                // Deterministic cache parameters: [31:26] cores per package - 1,
                // [25:14] logical processors sharing this cache - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 {
                    per_socket
                } else {
                    topo.threads_per_core
                };
                e.eax &= 0x3fff;
                if e.eax & 0x1f != 0 {
                    e.eax |= ((topo.cores_per_socket - 1).min(63) << 26)
                        | ((sharing - 1).min(0xfff) << 14);
                }
            }
            0xb | 0x1f => {
                // Extended topology; rebuilt below.
                continue;
            }
            0x8000_0008 => {
                // AMD: [7:0] NC = logical processors per package - 1, [15:12] APIC id size.
                e.ecx = (e.ecx & !0xf0ff)
                    | ((per_socket - 1).min(255))
                    | (topo.socket_shift().min(15) << 12);
            }
            0x8000_001d => {
                // AMD cache topology: [25:14] logical processors sharing - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 {
                    per_socket
                } else {
                    topo.threads_per_core
                };
                e.eax = (e.eax & !(0xfff << 14)) | (((sharing - 1).min(0xfff)) << 14);
            }
            0x8000_001e => {
                // AMD extended APIC id, core (compute unit) id and node id.
                let (_, core, _) = topo.place(index);
                e.eax = apic_id;
                e.ebx = (e.ebx & !0xffff) | ((topo.threads_per_core - 1) << 8) | (core & 0xff);
                e.ecx &= !0x7ff;
            }
            _ => {}
        }
        out.push(e);
    }
    // Extended topology leaf 0xb (and 0x1f when KVM offers it).
    let has_1f = supported.iter().any(|e| e.function == 0x1f);
    let max_basic = supported
        .iter()
        .find(|e| e.function == 0)
        .map(|e| e.eax)
        .unwrap_or(0);
    let mut leaves = Vec::new();
    if max_basic >= 0xb {
        leaves.push(0xb);
    }
    if has_1f {
        leaves.push(0x1f);
    }
    for leaf in leaves {
        for sub in 0..3u32 {
            let (eax, ebx, ecx) = match sub {
                // SMT level.
                0 => (topo.core_shift(), topo.threads_per_core, (1 << 8) | sub),
                // Core level.
                1 => (topo.socket_shift(), per_socket, (2 << 8) | sub),
                _ => (0, 0, sub),
            };
            out.push(kvm_cpuid_entry2 {
                function: leaf,
                index: sub,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax,
                ebx,
                ecx,
                edx: apic_id,
                ..Default::default()
            });
        }
    }
    out
}

/// Wraps entries in the FAM structure KVM_SET_CPUID2 takes.
pub fn to_cpuid(entries: &[kvm_cpuid_entry2]) -> Result<CpuId, Error> {
    CpuId::from_entries(entries).map_err(Error::Fam)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0x16, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(1, 0, 0x50657, 0x0102_0800, 0x8120_2000, 0x0f8b_fbff),
            // L1d (level 1, type 1) and L3 (level 3, type 3).
            entry(4, 0, (1 << 5) | 1 | (7 << 26), 0, 0, 0),
            entry(4, 3, (3 << 5) | 3 | (7 << 26) | (15 << 14), 0, 0, 0),
            entry(4, 4, 0, 0, 0, 0),
            entry(0xb, 0, 1, 2, 0x100, 9),
            entry(0x8000_0008, 0, 0x3030, 0, 0xffff, 0),
        ]
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter()
            .find(|e| e.function == f && e.index == i)
            .expect("leaf present")
    }

    #[test]
    fn topology_ids() {
        let t = Topology::flat(4);
        assert_eq!(t.core_shift(), 0);
        assert_eq!(t.socket_shift(), 2);
        assert_eq!(
            (0..4).map(|i| t.apic_id(i)).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        assert_eq!(t.place(3), (0, 3, 0));
        let t = Topology {
            threads_per_core: 2,
            cores_per_socket: 3,
            sockets: 2,
        };
        assert_eq!(t.core_shift(), 1);
        assert_eq!(t.socket_shift(), 3);
        assert_eq!(t.place(7), (1, 0, 1));
        assert_eq!(t.apic_id(7), (1 << 3) | 1);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(5), 3);
    }

    #[test]
    fn leaf1_carries_apic_id_and_counts() {
        let v = filter(&sample(), 1, Topology::flat(2), true);
        let l1 = find(&v, 1, 0);
        assert_eq!(l1.ebx >> 24, 1);
        assert_eq!((l1.ebx >> 16) & 0xff, 2);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let single = filter(&sample(), 0, Topology::flat(1), false);
        let l1 = find(&single, 1, 0);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!((l1.ebx >> 16) & 0xff, 1);
    }

    #[test]
    fn leaf_b_describes_cores() {
        let v = filter(&sample(), 2, Topology::flat(4), false);
        let smt = find(&v, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 2));
        let core = find(&v, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 4, 2, 2));
        let end = find(&v, 0xb, 2);
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
        assert_eq!(v.iter().filter(|e| e.function == 0xb).count(), 3);
    }

    #[test]
    fn leaf4_sharing() {
        let v = filter(&sample(), 0, Topology::flat(4), false);
        let l1d = find(&v, 4, 0);
        assert_eq!(l1d.eax >> 26, 3);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        let l3 = find(&v, 4, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(find(&v, 4, 4).eax, 0);
    }

    #[test]
    fn amd_core_count() {
        let v = filter(&sample(), 0, Topology::flat(2), false);
        let e = find(&v, 0x8000_0008, 0);
        assert_eq!(e.ecx & 0xff, 1);
        assert_eq!((e.ecx >> 12) & 0xf, 1);
        assert_eq!(e.ecx & 0xff0000, 0xff0000 & 0xffff);
    }
}
