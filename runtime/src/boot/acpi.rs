//! ACPI tables the guest finds at boot: RSDP → XSDT → FADT (hardware-reduced, with a
//! sleep control register for poweroff) + DSDT (`\_S5`) and MADT (one Local APIC per vCPU
//! and the IOAPIC). Linux reads them for SMP and poweroff; so does the test guest.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, aml};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    ACPI_SLEEP_CONTROL_PORT, ACPI_START, APIC_START, IOAPIC_START, MMIO32_SIZE, MMIO32_START,
    PCI_CONFIG_ADDRESS_PORT,
};
use crate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"FERROV";
const OEM_TABLE_ID: [u8; 8] = *b"FVIRTVMM";
/// The ACPI area ends where the BIOS ROM would begin.
const ACPI_END: u64 = 0x10_0000;
/// SLP_TYP written for S5 (soft off); `\_S5` tells the guest to use it.
pub const S5_SLEEP_TYPE: u8 = 5;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables for {0} vCPUs do not fit below 1 MiB; use fewer vCPUs")]
    TooLarge(u8),
    #[error("cannot write ACPI tables to guest memory; is guest RAM at least 1 MiB?")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// `\_SB.PCI0`: segment 0, bus 0, configuration mechanism #1 at 0xCF8, and the 32-bit
/// window BARs are placed in (PCI Firmware spec 3.3 §4.1.5; ACPI 6.5 §6.4.3.5).
struct PciHostBridge;

impl Aml for PciHostBridge {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        // Conventional PCI (PNP0A03), not PCI Express (PNP0A08): there is no ECAM, only
        // the 256-byte configuration space behind 0xCF8.
        let hid = aml::EISAName::new("PNP0A03");
        let bus_numbers = aml::AddressSpace::new_bus_number(0u16, 0u16);
        let config_ports = aml::IO::new(PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_ADDRESS_PORT, 1, 8);
        let mmio32 = aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            MMIO32_START as u32,
            (MMIO32_START + MMIO32_SIZE - 1) as u32,
            None,
        );
        let crs = aml::ResourceTemplate::new(vec![&bus_numbers, &config_ports, &mmio32]);
        let names = [
            aml::Name::new("_HID".into(), &hid),
            aml::Name::new("_ADR".into(), &aml::ZERO),
            aml::Name::new("_SEG".into(), &aml::ZERO),
            aml::Name::new("_UID".into(), &aml::ZERO),
            aml::Name::new("_BBN".into(), &aml::ZERO),
            aml::Name::new("_CRS".into(), &crs),
        ];
        let children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
        let pci0 = aml::Device::new("_SB_.PCI0".into(), children);
        pci0.to_aml_bytes(sink);
    }
}

fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Writes the tables; returns the RSDP's address (for PVH's `rsdp_paddr`).
pub fn write_acpi_tables(mem: &GuestMemoryMmap, vcpus: u8) -> Result<GuestAddress, AcpiError> {
    // DSDT: `\_S5` so the guest knows how to power off, and the PCI host bridge, without
    // which an ACPI guest (Linux) never scans bus 0.
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    let s5_package = aml::Package::new(vec![&S5_SLEEP_TYPE]);
    dsdt.append_slice(&aml_bytes(&aml::Name::new("_S5_".into(), &s5_package)));
    dsdt.append_slice(&aml_bytes(&PciHostBridge));

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));

    // Tables are laid out one after the other, 16-byte aligned, after the RSDP.
    let mut next = ACPI_START + 64;
    let mut place = |bytes: Vec<u8>| -> Result<(u64, Vec<u8>), AcpiError> {
        let at = next;
        next = (next + bytes.len() as u64).next_multiple_of(16);
        if next > ACPI_END {
            return Err(AcpiError::TooLarge(vcpus));
        }
        Ok((at, bytes))
    };
    let (dsdt_addr, dsdt_bytes) = place(dsdt.as_slice().to_vec())?;

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .flag(Flags::HwReducedAcpi)
        .dsdt_64(dsdt_addr);
    // ACPI 6.5 §4.8.3.7: on hardware-reduced platforms, sleep is entered by writing
    // SLP_TYP and SLP_EN to the sleep control register.
    fadt.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        ACPI_SLEEP_CONTROL_PORT as u64,
    );
    fadt.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        ACPI_SLEEP_CONTROL_PORT as u64 + 1,
    );
    let (fadt_addr, fadt_bytes) = place(aml_bytes(&fadt.finalize()))?;
    let (madt_addr, madt_bytes) = place(aml_bytes(&madt))?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let (xsdt_addr, xsdt_bytes) = place(aml_bytes(&xsdt))?;
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    for (addr, bytes) in [
        (ACPI_START, rsdp),
        (dsdt_addr, dsdt_bytes),
        (fadt_addr, fadt_bytes),
        (madt_addr, madt_bytes),
        (xsdt_addr, xsdt_bytes),
    ] {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(GuestAddress(ACPI_START))
}

#[cfg(test)]
mod tests {
    use vm_memory::{Address, Bytes};

    use super::*;

    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut buf = vec![0u8; len as usize];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        assert_eq!(
            buf.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
            0,
            "checksum"
        );
        buf
    }

    #[test]
    fn madt_lists_one_enabled_lapic_per_vcpu() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = write_acpi_tables(&mem, 3).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, rsdp).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let xsdt_addr: u64 = mem.read_obj(rsdp.unchecked_add(24)).unwrap();
        let xsdt = read_table(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let tables: Vec<Vec<u8>> = entries.iter().map(|&a| read_table(&mem, a)).collect();
        let madt = tables.iter().find(|t| &t[..4] == b"APIC").expect("MADT");
        let mut apic_ids = vec![];
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            if kind == 0 && madt[at + 4] & 1 == 1 {
                apic_ids.push(madt[at + 3]);
            }
            at += len;
        }
        assert_eq!(apic_ids, vec![0, 1, 2]);
        let fadt = tables.iter().find(|t| &t[..4] == b"FACP").expect("FADT");
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = read_table(&mem, dsdt_addr);
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
    }

    /// Disassembles the DSDT with ACPICA's iasl (Debian acpica-tools): an independent
    /// check that the AML is well formed and says what we mean.
    #[test]
    fn acpica_disassembles_the_dsdt_to_s5_and_the_pci_host_bridge() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = write_acpi_tables(&mem, 1).unwrap();
        let xsdt_addr: u64 = mem.read_obj(rsdp.unchecked_add(24)).unwrap();
        let fadt_addr: u64 = mem.read_obj(GuestAddress(xsdt_addr + 36)).unwrap();
        let fadt = read_table(&mem, fadt_addr);
        let dsdt = read_table(&mem, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));

        let dir = std::env::temp_dir().join(format!("fv-dsdt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("dsdt.aml"), &dsdt).unwrap();
        let out = std::process::Command::new("iasl")
            .args(["-d", "dsdt.aml"])
            .current_dir(&dir)
            .output()
            .expect("run iasl: install acpica-tools (scripts/setup.sh does)");
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap_or_default();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for expected in [
            "Name (_S5, Package (0x01)",
            "Device (_SB.PCI0)",
            "Name (_HID, EisaId (\"PNP0A03\")",
            "0x0CF8,             // Range Minimum",
            "0xC0000000,         // Range Minimum",
            "0xFEBFFFFF,         // Range Maximum",
        ] {
            assert!(dsl.contains(expected), "{expected:?} missing from:\n{dsl}");
        }
    }
}
