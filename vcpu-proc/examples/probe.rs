//! Probes which KVM capabilities and ioctls this host's /dev/kvm supports (written for PVM).
//! Run: `cargo run -p bulkhead-vcpu-proc --example probe`.

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch};
use vmm_sys_util::eventfd::EventFd;

fn show<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Option<T> {
    match r {
        Ok(v) => {
            println!("  ok    {what}");
            Some(v)
        }
        Err(e) => {
            println!("  FAIL  {what}: {e}");
            None
        }
    }
}

fn main() {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("cannot open /dev/kvm: {e}");
            std::process::exit(1);
        }
    };
    println!("api version {}", kvm.get_api_version());
    println!(
        "max vcpus {} nr vcpus {} memslots {}",
        kvm.get_max_vcpus(),
        kvm.get_nr_vcpus(),
        kvm.get_nr_memslots()
    );
    let caps = [
        ("IRQCHIP", Cap::Irqchip),
        ("HLT", Cap::Hlt),
        ("USER_MEMORY", Cap::UserMemory),
        ("SET_TSS_ADDR", Cap::SetTssAddr),
        ("EXT_CPUID", Cap::ExtCpuid),
        ("PIT2", Cap::Pit2),
        ("PIT_STATE2", Cap::PitState2),
        ("IRQFD", Cap::Irqfd),
        ("IOEVENTFD", Cap::Ioeventfd),
        ("SET_IDENTITY_MAP_ADDR", Cap::SetIdentityMapAddr),
        ("MP_STATE", Cap::MpState),
        ("IMMEDIATE_EXIT", Cap::ImmediateExit),
        ("ADJUST_CLOCK", Cap::AdjustClock),
        ("VCPU_EVENTS", Cap::VcpuEvents),
        ("XSAVE", Cap::Xsave),
        ("XCRS", Cap::Xcrs),
        ("TSC_DEADLINE_TIMER", Cap::TscDeadlineTimer),
        ("SPLIT_IRQCHIP", Cap::SplitIrqchip),
        ("IRQ_ROUTING", Cap::IrqRouting),
        ("SIGNAL_MSI", Cap::SignalMsi),
        ("GET_TSC_KHZ", Cap::GetTscKhz),
        ("TSC_CONTROL", Cap::TscControl),
        ("X2APIC_API", Cap::X2ApicApi),
        ("COALESCED_MMIO", Cap::CoalescedMmio),
        ("DEBUGREGS", Cap::Debugregs),
        ("NR_MEMSLOTS", Cap::NrMemslots),
        ("MAX_VCPUS", Cap::MaxVcpus),
    ];
    println!("capabilities:");
    for (n, c) in caps {
        println!("  {n:24} {}", kvm.check_extension_int(c));
    }
    // KVM_CAP_X86_SMM = 117, KVM_CAP_X86_DISABLE_EXITS = 143, KVM_CAP_SYSTEM_EVENT_DATA 164
    for (n, c) in [
        ("X86_SMM", 117u64),
        ("X86_DISABLE_EXITS", 143),
        ("SYSTEM_EVENT_DATA", 164),
        ("PVCLOCK?KVMCLOCK_CTRL(76)", 76),
    ] {
        println!("  {n:24} {}", kvm.check_extension_raw(c));
    }
    println!("system ioctls:");
    let cpuid = show(
        "KVM_GET_SUPPORTED_CPUID",
        kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
    );
    if let Some(c) = &cpuid {
        println!("        {} entries", c.as_slice().len());
        for e in c.as_slice() {
            if matches!(
                e.function,
                0 | 1 | 7 | 0xb | 0x1f | 0x4000_0000 | 0x4000_0001 | 0x8000_0001
            ) {
                println!(
                    "        leaf {:#x}.{} eax={:#x} ebx={:#x} ecx={:#x} edx={:#x} flags={}",
                    e.function, e.index, e.eax, e.ebx, e.ecx, e.edx, e.flags
                );
            }
        }
    }
    let msrs = show("KVM_GET_MSR_INDEX_LIST", kvm.get_msr_index_list());
    if let Some(m) = &msrs {
        println!("        {} msrs", m.as_slice().len());
    }
    show(
        "KVM_GET_MSR_FEATURE_INDEX_LIST",
        kvm.get_msr_feature_index_list(),
    );
    let vm = match kvm.create_vm() {
        Ok(v) => v,
        Err(e) => {
            println!("create_vm failed: {e}");
            return;
        }
    };
    println!("vm ioctls:");
    show("KVM_SET_TSS_ADDR", vm.set_tss_address(0xfffb_d000));
    show(
        "KVM_SET_IDENTITY_MAP_ADDR",
        vm.set_identity_map_address(0xfffb_c000),
    );
    show("KVM_CREATE_IRQCHIP", vm.create_irq_chip());
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    show("KVM_CREATE_PIT2", vm.create_pit2(pit));
    let mut chip = kvm_bindings::kvm_irqchip {
        chip_id: 2,
        ..Default::default()
    };
    show("KVM_GET_IRQCHIP(ioapic)", vm.get_irqchip(&mut chip));
    show("KVM_SET_IRQCHIP(ioapic)", vm.set_irqchip(&chip));
    if let Some(p) = show("KVM_GET_PIT2", vm.get_pit2()) {
        show("KVM_SET_PIT2", vm.set_pit2(&p));
    }
    if let Some(c) = show("KVM_GET_CLOCK", vm.get_clock()) {
        show("KVM_SET_CLOCK", vm.set_clock(&c));
    }
    let efd = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    show("KVM_IRQFD(gsi 4)", vm.register_irqfd(&efd, 4));
    show("irqfd trigger", efd.write(1));
    let efd2 = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    show(
        "KVM_IOEVENTFD(pio 0x510)",
        vm.register_ioevent(&efd2, &IoEventAddress::Pio(0x510), NoDatamatch),
    );
    show(
        "KVM_IOEVENTFD(mmio)",
        vm.register_ioevent(&efd2, &IoEventAddress::Mmio(0xd000_0000), NoDatamatch),
    );
    show("KVM_IRQ_LINE", vm.set_irq_line(4, true));
    show("KVM_IRQ_LINE(lower)", vm.set_irq_line(4, false));
    let mut vcpu = match vm.create_vcpu(0) {
        Ok(v) => v,
        Err(e) => {
            println!("create_vcpu failed: {e}");
            return;
        }
    };
    let _vcpu1 = show("KVM_CREATE_VCPU(1)", vm.create_vcpu(1));
    println!("vcpu ioctls:");
    if let Some(c) = &cpuid {
        show("KVM_SET_CPUID2", vcpu.set_cpuid2(c));
        show("KVM_GET_CPUID2", vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES));
    }
    if let Some(r) = show("KVM_GET_REGS", vcpu.get_regs()) {
        show("KVM_SET_REGS", vcpu.set_regs(&r));
    }
    if let Some(s) = show("KVM_GET_SREGS", vcpu.get_sregs()) {
        println!(
            "        cr0={:#x} cr4={:#x} efer={:#x} cs.base={:#x} cs.sel={:#x}",
            s.cr0, s.cr4, s.efer, s.cs.base, s.cs.selector
        );
        show("KVM_SET_SREGS", vcpu.set_sregs(&s));
    }
    if let Some(f) = show("KVM_GET_FPU", vcpu.get_fpu()) {
        show("KVM_SET_FPU", vcpu.set_fpu(&f));
    }
    if let Some(l) = show("KVM_GET_LAPIC", vcpu.get_lapic()) {
        show("KVM_SET_LAPIC", vcpu.set_lapic(&l));
    }
    if let Some(m) = show("KVM_GET_MP_STATE", vcpu.get_mp_state()) {
        println!("        mp_state={}", m.mp_state);
        show("KVM_SET_MP_STATE", vcpu.set_mp_state(m));
    }
    if let Some(e) = show("KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events()) {
        show("KVM_SET_VCPU_EVENTS", vcpu.set_vcpu_events(&e));
    }
    if let Some(x) = show("KVM_GET_XCRS", vcpu.get_xcrs()) {
        show("KVM_SET_XCRS", vcpu.set_xcrs(&x));
    }
    if let Some(x) = show("KVM_GET_XSAVE", vcpu.get_xsave()) {
        // SAFETY: the buffer came from KVM_GET_XSAVE for this vCPU.
        show("KVM_SET_XSAVE", unsafe { vcpu.set_xsave(&x) });
    }
    if let Some(d) = show("KVM_GET_DEBUGREGS", vcpu.get_debug_regs()) {
        show("KVM_SET_DEBUGREGS", vcpu.set_debug_regs(&d));
    }
    if let Some(k) = show("KVM_GET_TSC_KHZ", vcpu.get_tsc_khz()) {
        println!("        tsc {k} kHz");
    }
    if let Some(list) = &msrs {
        let wanted = [
            0x174u32,
            0x175,
            0x176,
            0x10,
            0xc000_0081,
            0xc000_0082,
            0xc000_0084,
            0xc000_0102,
            0x1a0,
            0x277,
            0x4b56_4d00,
            0x4b56_4d01,
            0x6e0,
            0x2ff,
        ];
        let entries: Vec<kvm_bindings::kvm_msr_entry> = wanted
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut m = kvm_bindings::Msrs::from_entries(&entries).expect("msrs");
        match vcpu.get_msrs(&mut m) {
            Ok(n) => println!("  ok    KVM_GET_MSRS: {n} of {} read", wanted.len()),
            Err(e) => println!("  FAIL  KVM_GET_MSRS: {e}"),
        }
        match vcpu.set_msrs(&m) {
            Ok(n) => println!("  ok    KVM_SET_MSRS: {n} of {} written", wanted.len()),
            Err(e) => println!("  FAIL  KVM_SET_MSRS: {e}"),
        }
        let supported: Vec<u32> = list.as_slice().to_vec();
        let missing: Vec<String> = wanted
            .iter()
            .filter(|w| !supported.contains(w))
            .map(|w| format!("{w:#x}"))
            .collect();
        println!("        not in index list: {missing:?}");
    }
    vcpu.set_kvm_immediate_exit(1);
    match vcpu.run() {
        Ok(e) => println!("  ??    KVM_RUN with immediate_exit returned {e:?}"),
        Err(e) => println!("  ok    KVM_RUN with immediate_exit: {e} (expected EINTR)"),
    }
    vcpu.set_kvm_immediate_exit(0);
}
