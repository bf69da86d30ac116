//! `bulkhead-vcpu`: the Bulkhead machine worker. It receives /dev/kvm, the guest-memory memfd,
//! the kernel (and initrd and serial fds) from the monitor over ipc, builds a KVM VM that boots
//! Linux through the 64-bit boot protocol, runs one thread per vCPU, emulates the legacy
//! devices a PC guest needs, and answers the monitor's run/pause/reset/query requests.
//!
//! Modules: [`memory`] (guest RAM and layout), [`boot`] (kernel loading and entry state),
//! [`cpuid`], [`msr`], [`acpi`], [`devices`], [`bus`], [`pci`] (root bus, config space,
//! MSI-X), [`virtio`] (virtio-pci devices served by vhost-user back ends), [`vcpu`],
//! [`machine`], [`control`] (the ipc loop). The stderr logger and the sandbox report are
//! every worker's (`bulkhead_worker`).

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod control;
pub mod cpuid;
pub mod devices;
pub mod machine;
pub mod memory;
pub mod msr;
pub mod pci;
pub mod vcpu;
pub mod virtio;
