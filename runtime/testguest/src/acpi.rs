//! ACPI: find the RSDP (from `hvm_start_info` or by scanning the BIOS area), walk the
//! XSDT/RSDT to the MADT, and list its processors (ACPI 6.5 §5.2.5, §5.2.12).

use core::fmt;

use crate::boot::MAX_CPUS;
use crate::phys;

const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
const SDT_HEADER_SIZE: u64 = 36;
/// ACPI 6.5 §5.2.5.1: the RSDP is on a 16-byte boundary in the BIOS read-only area or in
/// the first KiB of the EBDA.
const BIOS_AREA: (u64, u64) = (0xe_0000, 0x10_0000);
const BDA_EBDA_SEGMENT: u64 = 0x40e;
/// The xAPIC default when the MADT does not say otherwise.
pub const DEFAULT_LAPIC_ADDRESS: u64 = 0xfee0_0000;

#[derive(Debug, Clone, Copy)]
pub enum AcpiError {
    NoRsdp,
    BadTable { signature: [u8; 4], addr: u64 },
    NoMadt,
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRsdp => write!(
                f,
                "no ACPI RSDP (start_info.rsdp_paddr is 0 and none in 0xE0000..0xFFFFF or the EBDA); does the VMM write ACPI tables?"
            ),
            Self::BadTable { signature, addr } => write!(
                f,
                "ACPI table {} at {addr:#x} has a bad length or checksum",
                crate::console::Ascii(signature)
            ),
            Self::NoMadt => write!(
                f,
                "the XSDT/RSDT lists no MADT (\"APIC\"); the VMM must describe its CPUs"
            ),
        }
    }
}

fn rsdp_valid(addr: u64) -> bool {
    phys::is_mapped(addr, 36)
        && (0..8).all(|i| phys::read_u8(addr + i) == RSDP_SIGNATURE[i as usize])
        && phys::byte_sum(addr, 20) == 0
}

fn scan_for_rsdp(start: u64, end: u64) -> Option<u64> {
    (start..end).step_by(16).find(|&a| rsdp_valid(a))
}

/// Finds the RSDP: the loader's hint first, then the EBDA, then the BIOS area.
pub fn find_rsdp(hint: u64) -> Result<u64, AcpiError> {
    if hint != 0 && rsdp_valid(hint) {
        return Ok(hint);
    }
    let ebda = u64::from(phys::read_le16(BDA_EBDA_SEGMENT)) << 4;
    if (0x8_0000..0xa_0000).contains(&ebda)
        && let Some(a) = scan_for_rsdp(ebda, ebda + 1024)
    {
        return Ok(a);
    }
    scan_for_rsdp(BIOS_AREA.0, BIOS_AREA.1).ok_or(AcpiError::NoRsdp)
}

/// A checked system description table: signature, address and total length.
#[derive(Debug, Clone, Copy)]
pub struct Sdt {
    pub signature: [u8; 4],
    pub addr: u64,
    pub len: u64,
}

impl Sdt {
    fn read(addr: u64) -> Result<Self, AcpiError> {
        let mut signature = [0u8; 4];
        if phys::is_mapped(addr, SDT_HEADER_SIZE) {
            for (i, b) in signature.iter_mut().enumerate() {
                *b = phys::read_u8(addr + i as u64);
            }
        } else {
            return Err(AcpiError::BadTable { signature, addr });
        }
        let len = u64::from(phys::read_le32(addr + 4));
        let bad = AcpiError::BadTable { signature, addr };
        if !(SDT_HEADER_SIZE..=1 << 20).contains(&len) || !phys::is_mapped(addr, len) {
            return Err(bad);
        }
        if phys::byte_sum(addr, len) != 0 {
            return Err(bad);
        }
        Ok(Self {
            signature,
            addr,
            len,
        })
    }
}

/// Walks the XSDT (revision >= 2 with an address) or the RSDT for `signature`.
pub fn find_table(rsdp: u64, signature: &[u8; 4]) -> Result<Option<Sdt>, AcpiError> {
    let revision = phys::read_u8(rsdp + 15);
    let xsdt = if revision >= 2 {
        phys::read_le64(rsdp + 24)
    } else {
        0
    };
    let (root, entry_size) = if xsdt != 0 {
        (Sdt::read(xsdt)?, 8)
    } else {
        (Sdt::read(u64::from(phys::read_le32(rsdp + 16)))?, 4)
    };
    let entries = (root.len - SDT_HEADER_SIZE) / entry_size;
    for i in 0..entries {
        let at = root.addr + SDT_HEADER_SIZE + i * entry_size;
        let table = if entry_size == 8 {
            phys::read_le64(at)
        } else {
            u64::from(phys::read_le32(at))
        };
        let sdt = Sdt::read(table)?;
        if &sdt.signature == signature {
            return Ok(Some(sdt));
        }
    }
    Ok(None)
}

/// Processors listed in the MADT.
#[derive(Debug, Clone, Copy)]
pub struct MadtCpus {
    /// Local APIC address (MMIO base of the xAPIC).
    pub lapic_address: u64,
    /// APIC IDs of enabled processors, in MADT order (the first `count`).
    pub apic_ids: [u32; MAX_CPUS],
    pub count: usize,
    /// Enabled processors beyond `MAX_CPUS`, which are ignored.
    pub dropped: usize,
}

impl MadtCpus {
    pub fn ids(&self) -> &[u32] {
        &self.apic_ids[..self.count]
    }
}

/// Finds the MADT and lists its enabled processors (Local APIC and x2APIC entries).
pub fn madt_cpus(rsdp: u64) -> Result<MadtCpus, AcpiError> {
    let madt = find_table(rsdp, b"APIC")?.ok_or(AcpiError::NoMadt)?;
    let mut cpus = MadtCpus {
        lapic_address: u64::from(phys::read_le32(madt.addr + SDT_HEADER_SIZE)),
        apic_ids: [0; MAX_CPUS],
        count: 0,
        dropped: 0,
    };
    if cpus.lapic_address == 0 {
        cpus.lapic_address = DEFAULT_LAPIC_ADDRESS;
    }
    let end = madt.addr + madt.len;
    let mut at = madt.addr + SDT_HEADER_SIZE + 8;
    while at + 2 <= end {
        let kind = phys::read_u8(at);
        let len = u64::from(phys::read_u8(at + 1));
        if len < 2 || at + len > end {
            return Err(AcpiError::BadTable {
                signature: madt.signature,
                addr: madt.addr,
            });
        }
        let enabled_id = match (kind, len) {
            // Processor Local APIC: uid u8, APIC ID u8, flags u32 (bit 0 enabled).
            (0, 8..) if phys::read_le32(at + 4) & 1 != 0 => Some(u32::from(phys::read_u8(at + 3))),
            // Processor Local x2APIC: reserved u16, x2APIC ID u32, flags u32, uid u32.
            (9, 16..) if phys::read_le32(at + 8) & 1 != 0 => Some(phys::read_le32(at + 4)),
            // Local APIC Address Override.
            (5, 12..) => {
                cpus.lapic_address = phys::read_le64(at + 4);
                None
            }
            _ => None,
        };
        if let Some(id) = enabled_id {
            if cpus.count < MAX_CPUS {
                cpus.apic_ids[cpus.count] = id;
                cpus.count += 1;
            } else {
                cpus.dropped += 1;
            }
        }
        at += len;
    }
    Ok(cpus)
}
