//! ACPI tables (built with the `acpi_tables` crate): RSDP, XSDT, a hardware-reduced FADT with
//! sleep control/status and reset registers (as cloud-hypervisor does), a MADT with one local
//! APIC per vCPU and the IOAPIC, an MCFG for the PCI ECAM window, and a DSDT with `_S5_`,
//! the legacy devices and the PCI host bridge (`PNP0A08` with its bus, I/O and MMIO windows). The RSDP sits at [`memory::ACPI_START`]
//! (0xE0000) so a legacy BIOS-area scan finds it; the zero page also points at it.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::{acpi_pm, ged, rtc, serial};
use crate::memory::{self, GuestMem};
use crate::pci;

const OEM_ID: [u8; 6] = *b"BLKHD ";
const OEM_REVISION: u32 = 1;
/// `_S5_` sleep type the DSDT declares and the sleep control register decodes.
pub const S5_SLEEP_TYPE: u8 = 5;
/// IAPC_BOOT_ARCH: VGA not present.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;

/// Errors placing ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Too many vCPUs for 8-bit APIC ids.
    #[error("{0} vCPUs do not fit in xAPIC ids")]
    TooManyCpus(u32),
    /// The tables do not fit in the BIOS area.
    #[error("ACPI tables ({0} bytes) overflow the BIOS area")]
    TooBig(u64),
    /// Writing to guest memory failed.
    #[error("cannot write ACPI tables: {0}")]
    GuestWrite(vm_memory::GuestMemoryError),
}

/// The tables, each with its guest address.
#[derive(Debug, Clone)]
pub struct Tables {
    /// (address, bytes) of each table; the first is the RSDP.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

impl Tables {
    /// Address of the RSDP.
    pub fn rsdp_addr(&self) -> u64 {
        memory::ACPI_START
    }
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// The DSDT: `Name (\_S5_, Package () { 5, 0, 0, 0 })`, COM1 (PNP0501, I/O 0x3f8, GSI 4)
/// and the CMOS RTC (PNP0B00, I/O 0x70). With a hardware-reduced FADT Linux has no legacy
/// PIC and maps ISA interrupts only for devices ACPI describes, so COM1's interrupt must be
/// declared here; the RTC is declared without one (we raise no RTC interrupts).
pub fn dsdt() -> Vec<u8> {
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"BLKHDSDT", OEM_REVISION);
    let zero = 0u8;
    let typ = S5_SLEEP_TYPE;
    let pkg = aml::Package::new(vec![&typ, &zero, &zero, &zero]);
    let s5 = aml::Name::new("_S5_".into(), &pkg);
    t.append_slice(&bytes_of(&s5));

    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_irq = aml::Interrupt::new(true, true, false, false, serial::COM1_GSI);
    let com1_io = aml::IO::new(serial::COM1_PORT, serial::COM1_PORT, 1, serial::LEN as u8);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_irq, &com1_io]);
    let (hid, uid, crs) = (
        aml::Name::new("_HID".into(), &com1_hid),
        aml::Name::new("_UID".into(), &zero),
        aml::Name::new("_CRS".into(), &com1_crs),
    );
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]);
    t.append_slice(&bytes_of(&com1));

    let rtc_hid = aml::EISAName::new("PNP0B00");
    let rtc_io = aml::IO::new(rtc::INDEX_PORT, rtc::INDEX_PORT, 1, rtc::LEN as u8);
    let rtc_crs = aml::ResourceTemplate::new(vec![&rtc_io]);
    let (hid, crs) = (
        aml::Name::new("_HID".into(), &rtc_hid),
        aml::Name::new("_CRS".into(), &rtc_crs),
    );
    let rtc_dev = aml::Device::new("_SB_.RTC0".into(), vec![&hid, &crs]);
    t.append_slice(&bytes_of(&rtc_dev));

    // The PCI host bridge: bus 0, the legacy configuration ports, every other I/O port, and
    // the 32-bit BAR window. No _PRT: the devices use MSI-X only.
    let pci_hid = aml::EISAName::new("PNP0A08");
    let pci_cid = aml::EISAName::new("PNP0A03");
    let buses = aml::AddressSpace::<u16>::new_bus_number(0, 0);
    let cfg_io = aml::IO::new(
        pci::CONFIG_ADDRESS_PORT,
        pci::CONFIG_ADDRESS_PORT,
        1,
        pci::CONFIG_IO_LEN as u8,
    );
    let io_low = aml::AddressSpace::<u16>::new_io(0, pci::CONFIG_ADDRESS_PORT - 1, None);
    let io_high = aml::AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let window = aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        pci::MMIO_WINDOW_START as u32,
        (pci::MMIO_WINDOW_END - 1) as u32,
        None,
    );
    let pci_crs = aml::ResourceTemplate::new(vec![&buses, &cfg_io, &io_low, &io_high, &window]);
    let (hid, cid, adr, seg, uid, bbn, crs) = (
        aml::Name::new("_HID".into(), &pci_hid),
        aml::Name::new("_CID".into(), &pci_cid),
        aml::Name::new("_ADR".into(), &zero),
        aml::Name::new("_SEG".into(), &zero),
        aml::Name::new("_UID".into(), &zero),
        aml::Name::new("_BBN".into(), &zero),
        aml::Name::new("_CRS".into(), &pci_crs),
    );
    // PCI hot-plug (ACPI, as acpiphp expects): the slot-status registers, PCNT notifying
    // slots that came up (device check) or should go (eject request), and one object per
    // slot whose _EJ0 asks the machine to remove it.
    let pcst_base = ged::MMIO_BASE as u32;
    let pcst_len = 12u32;
    let pcst = aml::OpRegion::new(
        "PCST".into(),
        aml::OpRegionSpace::SystemMemory,
        &pcst_base,
        &pcst_len,
    );
    let pcst_fields = aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
        ],
    );
    let slots: Vec<u8> = (1..pci::SLOTS).collect();
    let names: Vec<String> = slots.iter().map(|s| format!("S{s:02X}_")).collect();
    let bits: Vec<u32> = slots.iter().map(|s| 1u32 << s).collect();
    let adrs: Vec<u32> = slots.iter().map(|s| u32::from(*s) << 16).collect();
    let (local0, local1) = (aml::Local(0), aml::Local(1));
    let (pciu, pcid, b0ej) = (
        aml::Path::new("PCIU"),
        aml::Path::new("PCID"),
        aml::Path::new("B0EJ"),
    );
    let (check, eject) = (1u8, 3u8);
    let slot_paths: Vec<aml::Path> = names.iter().map(|n| aml::Path::new(n)).collect();
    let up_tests: Vec<aml::And> = bits
        .iter()
        .map(|b| aml::And::new(&aml::ZERO, &local0, b))
        .collect();
    let down_tests: Vec<aml::And> = bits
        .iter()
        .map(|b| aml::And::new(&aml::ZERO, &local1, b))
        .collect();
    let up_notes: Vec<aml::Notify> = slot_paths
        .iter()
        .map(|p| aml::Notify::new(p, &check))
        .collect();
    let down_notes: Vec<aml::Notify> = slot_paths
        .iter()
        .map(|p| aml::Notify::new(p, &eject))
        .collect();
    let mut ifs = Vec::new();
    for i in 0..slots.len() {
        ifs.push(aml::If::new(&up_tests[i], vec![&up_notes[i]]));
        ifs.push(aml::If::new(&down_tests[i], vec![&down_notes[i]]));
    }
    let load_up = aml::Store::new(&local0, &pciu);
    let load_down = aml::Store::new(&local1, &pcid);
    let mut pcnt_body: Vec<&dyn Aml> = vec![&load_up, &load_down];
    pcnt_body.extend(ifs.iter().map(|i| i as &dyn Aml));
    let pcnt = aml::Method::new("PCNT".into(), 0, true, pcnt_body);
    let ej_stores: Vec<aml::Store> = bits.iter().map(|b| aml::Store::new(&b0ej, b)).collect();
    let ej0s: Vec<aml::Method> = ej_stores
        .iter()
        .map(|st| aml::Method::new("_EJ0".into(), 1, true, vec![st]))
        .collect();
    let slot_adr: Vec<aml::Name> = adrs
        .iter()
        .map(|a| aml::Name::new("_ADR".into(), a))
        .collect();
    let slot_sun: Vec<aml::Name> = slots
        .iter()
        .map(|s| aml::Name::new("_SUN".into(), s))
        .collect();
    let slot_devs: Vec<aml::Device> = (0..slots.len())
        .map(|i| {
            aml::Device::new(
                names[i].as_str().into(),
                vec![&slot_adr[i], &slot_sun[i], &ej0s[i]],
            )
        })
        .collect();
    let mut pci0_body: Vec<&dyn Aml> = vec![
        &hid,
        &cid,
        &adr,
        &seg,
        &uid,
        &bbn,
        &crs,
        &pcst,
        &pcst_fields,
        &pcnt,
    ];
    pci0_body.extend(slot_devs.iter().map(|d| d as &dyn Aml));
    let pci0 = aml::Device::new("_SB_.PCI0".into(), pci0_body);
    t.append_slice(&bytes_of(&pci0));

    // The power button and the Generic Event Device that signals it and PCI hot-plug.
    let pwrb_hid = aml::EISAName::new("PNP0C0C");
    let (hid, uid) = (
        aml::Name::new("_HID".into(), &pwrb_hid),
        aml::Name::new("_UID".into(), &zero),
    );
    let pwrb = aml::Device::new("_SB_.PWRB".into(), vec![&hid, &uid]);
    t.append_slice(&bytes_of(&pwrb));
    let ged_hid: aml::AmlStr = "ACPI0013";
    let ged_irq = aml::Interrupt::new(true, true, false, false, ged::GED_GSI);
    let ged_crs = aml::ResourceTemplate::new(vec![&ged_irq]);
    let gdst_base = (ged::MMIO_BASE + ged::EVENT_OFFSET) as u32;
    let gdst_len = 4u32;
    let gdst = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemMemory,
        &gdst_base,
        &gdst_len,
    );
    let gdst_fields = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 32)],
    );
    let gdat = aml::Path::new("GDAT");
    let load = aml::Store::new(&local0, &gdat);
    let (pb_bit, hp_bit) = (ged::EVENT_POWER_BUTTON, ged::EVENT_PCI_HOTPLUG);
    let pb_test = aml::And::new(&aml::ZERO, &local0, &pb_bit);
    let hp_test = aml::And::new(&aml::ZERO, &local0, &hp_bit);
    let pwrb_path = aml::Path::new("\\_SB_.PWRB");
    let press = 0x80u8;
    let pb_note = aml::Notify::new(&pwrb_path, &press);
    let scan = aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let pb_if = aml::If::new(&pb_test, vec![&pb_note]);
    let hp_if = aml::If::new(&hp_test, vec![&scan]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&load, &pb_if, &hp_if]);
    let (hid, uid, crs) = (
        aml::Name::new("_HID".into(), &ged_hid),
        aml::Name::new("_UID".into(), &zero),
        aml::Name::new("_CRS".into(), &ged_crs),
    );
    let ged_dev = aml::Device::new(
        "_SB_.GED_".into(),
        vec![&hid, &uid, &crs, &gdst, &gdst_fields, &evt],
    );
    t.append_slice(&bytes_of(&ged_dev));

    // The ECAM window as a motherboard resource, so Linux accepts MCFG's range.
    let mres_hid = aml::EISAName::new("PNP0C02");
    let ecam = aml::Memory32Fixed::new(false, pci::ECAM_BASE as u32, pci::ECAM_SIZE as u32);
    let mres_crs = aml::ResourceTemplate::new(vec![&ecam]);
    let one = 1u8;
    let (hid, uid, crs) = (
        aml::Name::new("_HID".into(), &mres_hid),
        aml::Name::new("_UID".into(), &one),
        aml::Name::new("_CRS".into(), &mres_crs),
    );
    let mres = aml::Device::new("_SB_.MRES".into(), vec![&hid, &uid, &crs]);
    t.append_slice(&bytes_of(&mres));
    t.as_slice().to_vec()
}

/// The hardware-reduced FADT.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io8 = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    let mut f = FADTBuilder::new(OEM_ID, *b"BLKHFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.reset_reg = io8(acpi_pm::RESET_PORT);
    f.reset_value = acpi_pm::RESET_VALUE;
    f.sleep_control_reg = io8(acpi_pm::SLEEP_CONTROL_PORT);
    f.sleep_status_reg = io8(acpi_pm::SLEEP_STATUS_PORT);
    f.iapc_boot_arch = IAPC_VGA_NOT_PRESENT.into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"BULKHEAD").into();
    bytes_of(&f.finalize())
}

/// The MADT: local APIC `i` with APIC id `apic_ids[i]`, and the IOAPIC at GSI base 0.
pub fn madt(apic_ids: &[u32]) -> Result<Vec<u8>, Error> {
    let mut m = MADT::new(
        OEM_ID,
        *b"BLKHAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(memory::LAPIC_ADDR),
    );
    for (uid, id) in apic_ids.iter().enumerate() {
        let id8 = u8::try_from(*id).map_err(|_| Error::TooManyCpus(apic_ids.len() as u32))?;
        let uid8 = u8::try_from(uid).map_err(|_| Error::TooManyCpus(apic_ids.len() as u32))?;
        m.add_structure(ProcessorLocalApic::new(uid8, id8, EnabledStatus::Enabled));
    }
    let ioapic_id =
        u8::try_from(apic_ids.len()).map_err(|_| Error::TooManyCpus(apic_ids.len() as u32))?;
    m.add_structure(IoApic::new(ioapic_id, memory::IOAPIC_ADDR, 0));
    Ok(bytes_of(&m))
}

/// The MCFG: segment 0, bus 0 at [`pci::ECAM_BASE`].
pub fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, *b"BLKHMCFG", OEM_REVISION);
    m.add_ecam(pci::ECAM_BASE, 0, 0, 0);
    bytes_of(&m)
}

/// Builds all tables for a machine whose vCPUs have `apic_ids`.
pub fn build(apic_ids: &[u32]) -> Result<Tables, Error> {
    if apic_ids.len() > 254 {
        return Err(Error::TooManyCpus(apic_ids.len() as u32));
    }
    let rsdp_addr = memory::ACPI_START;
    let xsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
    // XSDT with three entries: header + 3 * 8.
    let fadt_addr = align16(xsdt_addr + 36 + 3 * 8);
    let dsdt_bytes = dsdt();
    let fadt_len = FADTBuilder::new(OEM_ID, *b"BLKHFACP", OEM_REVISION).finalize();
    let fadt_len = bytes_of(&fadt_len).len() as u64;
    let dsdt_addr = align16(fadt_addr + fadt_len);
    let madt_addr = align16(dsdt_addr + dsdt_bytes.len() as u64);
    let fadt_bytes = fadt(dsdt_addr);
    let madt_bytes = madt(apic_ids)?;
    let mcfg_addr = align16(madt_addr + madt_bytes.len() as u64);
    let mcfg_bytes = mcfg();
    let end = mcfg_addr + mcfg_bytes.len() as u64;
    if end > crate::boot::RESET_VECTOR {
        return Err(Error::TooBig(end - memory::ACPI_START));
    }
    let mut xsdt = XSDT::new(OEM_ID, *b"BLKHXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    Ok(Tables {
        blobs: vec![
            (rsdp_addr, bytes_of(&Rsdp::new(OEM_ID, xsdt_addr))),
            (xsdt_addr, bytes_of(&xsdt)),
            (fadt_addr, fadt_bytes),
            (dsdt_addr, dsdt_bytes),
            (madt_addr, madt_bytes),
            (mcfg_addr, mcfg_bytes),
        ],
    })
}

/// Writes the tables to guest memory.
pub fn write(mem: &GuestMem, tables: &Tables) -> Result<(), Error> {
    for (addr, bytes) in &tables.blobs {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(Error::GuestWrite)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[off..off + 8]);
        u64::from_le_bytes(a)
    }

    #[test]
    fn checksums_and_lengths() {
        let t = build(&[0, 1, 2, 3]).expect("tables");
        let (rsdp_addr, rsdp) = &t.blobs[0];
        assert_eq!(*rsdp_addr, 0xe0000);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        for (_, b) in &t.blobs[1..] {
            assert_eq!(sum(b), 0, "table {:?}", std::str::from_utf8(&b[..4]));
            assert_eq!(u32_at(b, 4) as usize, b.len());
        }
        // The blobs do not overlap and stay in the BIOS area.
        let mut spans: Vec<(u64, u64)> = t
            .blobs
            .iter()
            .map(|(a, b)| (*a, a + b.len() as u64))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0);
        }
        assert!(spans[spans.len() - 1].1 <= 0x100000);
    }

    #[test]
    fn pointers_link_up() {
        let t = build(&[0, 1]).expect("tables");
        let find = |sig: &[u8]| {
            t.blobs
                .iter()
                .find(|(_, b)| &b[..4] == sig)
                .cloned()
                .expect("table")
        };
        let rsdp = &t.blobs[0].1;
        let xsdt_addr = u64_at(rsdp, 24);
        let (xa, xsdt) = find(b"XSDT");
        assert_eq!(xa, xsdt_addr);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt, o))
            .collect();
        let (fa, fadt) = find(b"FACP");
        let (ma, _) = find(b"APIC");
        let (mc, mcfg) = find(b"MCFG");
        assert_eq!(entries, vec![fa, ma, mc]);
        // One allocation: ECAM base, segment 0, buses 0..=0.
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!(u64_at(&mcfg, 44), pci::ECAM_BASE);
        assert_eq!((mcfg[54], mcfg[55]), (0, 0));
        let (da, _) = find(b"DSDT");
        assert_eq!(u64_at(&fadt, 140), da); // X_DSDT
                                            // Flags: HW_REDUCED_ACPI and RESET_REG_SUP.
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0);
        assert_ne!(flags & (1 << 10), 0);
        // Reset register: system I/O, 8 bits, at the reset port; value follows.
        assert_eq!(fadt[116], 1);
        assert_eq!(fadt[117], 8);
        assert_eq!(u64_at(&fadt, 120), u64::from(acpi_pm::RESET_PORT));
        assert_eq!(fadt[128], acpi_pm::RESET_VALUE);
        // Sleep control and status registers.
        assert_eq!(
            u64_at(&fadt, 244 + 4),
            u64::from(acpi_pm::SLEEP_CONTROL_PORT)
        );
        assert_eq!(
            u64_at(&fadt, 256 + 4),
            u64::from(acpi_pm::SLEEP_STATUS_PORT)
        );
    }

    #[test]
    fn madt_has_one_lapic_per_cpu_and_an_ioapic() {
        let m = madt(&[0, 1, 2]).expect("madt");
        assert_eq!(u32_at(&m, 36), 0xfee0_0000);
        let mut off = 44;
        let mut lapics = vec![];
        let mut ioapics = 0;
        while off < m.len() {
            let (ty, len) = (m[off], m[off + 1] as usize);
            match ty {
                0 => lapics.push((m[off + 2], m[off + 3], u32_at(&m, off + 4))),
                1 => {
                    ioapics += 1;
                    assert_eq!(u32_at(&m, off + 4), 0xfec0_0000);
                }
                _ => panic!("unexpected MADT entry {ty}"),
            }
            off += len;
        }
        assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
        assert_eq!(ioapics, 1);
        assert!(madt(&[0; 300]).is_err());
    }

    #[test]
    fn dsdt_declares_s5() {
        let d = dsdt();
        let body = &d[36..];
        // NameOp, "_S5_", PackageOp.
        assert_eq!(&body[..6], &[0x08, b'_', b'S', b'5', b'_', 0x12]);
        // Package: length, 4 elements, first is BytePrefix 5.
        assert_eq!(body[7], 4);
        assert_eq!(&body[8..10], &[0x0a, 5]);
        // COM1 and the RTC follow as devices with their PNP ids (EISA-encoded).
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"COM1"));
        assert!(has(b"RTC0"));
        assert!(has(&[0x0c, 0x41, 0xd0, 0x05, 0x01])); // DWordPrefix EISAID("PNP0501")
        assert!(has(&[0x0c, 0x41, 0xd0, 0x0b, 0x00])); // DWordPrefix EISAID("PNP0B00")
                                                       // COM1's extended interrupt descriptor names GSI 4, and its I/O range is 0x3f8+8.
        assert!(has(&[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]));
        assert!(has(&[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8]));
        // The PCI host bridge (PNP0A08) with the CF8 ports, and the ECAM motherboard resource.
        assert!(has(b"PCI0"));
        assert!(has(&[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
        assert!(has(&[0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]));
        assert!(has(b"MRES"));
        assert!(has(&[0x0c, 0x41, 0xd0, 0x0c, 0x02]));
    }
}
