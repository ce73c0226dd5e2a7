//! ACPI: find the RSDP (from `hvm_start_info` or by scanning the BIOS area), walk the
//! XSDT/RSDT to the MADT and list its processors (ACPI 6.5 §5.2.5, §5.2.12), or to the FADT
//! and DSDT for the hardware-reduced way to power off (§4.8.3.7, §5.2.9, §7.4.2).

use core::fmt;

use crate::boot::MAX_CPUS;
use crate::phys;
use crate::port::{outb, outl, outw};

const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
const SDT_HEADER_SIZE: u64 = 36;
/// ACPI 6.5 §5.2.5.1: the RSDP is on a 16-byte boundary in the BIOS read-only area or in
/// the first KiB of the EBDA.
const BIOS_AREA: (u64, u64) = (0xe_0000, 0x10_0000);
const BDA_EBDA_SEGMENT: u64 = 0x40e;
/// The xAPIC default when the MADT does not say otherwise.
pub const DEFAULT_LAPIC_ADDRESS: u64 = 0xfee0_0000;
/// FADT offsets (ACPI 6.5 Table 5.9): DSDT (u32), X_DSDT (u64), SLEEP_CONTROL_REG (GAS).
const FADT_DSDT: u64 = 40;
const FADT_X_DSDT: u64 = 140;
const FADT_SLEEP_CONTROL_REG: u64 = 244;
const GAS_SIZE: u64 = 12;
/// GAS address space ID of port I/O.
const GAS_SYSTEM_IO: u8 = 1;
/// AML opcodes (ACPI 6.5 §20.2) that can start `\_S5`'s package and its first element.
const AML_PACKAGE_OP: u8 = 0x12;
const AML_ZERO_OP: u8 = 0x00;
const AML_ONE_OP: u8 = 0x01;
const AML_BYTE_PREFIX: u8 = 0x0a;

#[derive(Debug, Clone, Copy)]
pub enum AcpiError {
    NoRsdp,
    BadTable {
        signature: [u8; 4],
        addr: u64,
    },
    NoMadt,
    NoFadt,
    /// The FADT ends before SLEEP_CONTROL_REG (it is older than ACPI 5.0).
    NoSleepControl {
        fadt_len: u64,
    },
    /// SLEEP_CONTROL_REG is in an address space other than port I/O (or has no address).
    UnsupportedRegister(Gas),
    /// The DSDT has no `_S5_` name followed by a package.
    NoS5,
    /// `\_S5`'s first element is not an integer this parser reads.
    BadS5 {
        opcode: u8,
    },
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
            Self::NoFadt => write!(
                f,
                "the XSDT/RSDT lists no FADT (\"FACP\"); the VMM must provide one to power off"
            ),
            Self::NoSleepControl { fadt_len } => write!(
                f,
                "the FADT is {fadt_len} bytes, too short for SLEEP_CONTROL_REG at {FADT_SLEEP_CONTROL_REG}; a hardware-reduced VMM needs an ACPI 5+ FADT"
            ),
            Self::UnsupportedRegister(gas) => write!(
                f,
                "SLEEP_CONTROL_REG is space {} address {:#x} width {} access {}; this guest writes only port I/O (space 1) registers",
                gas.space, gas.address, gas.bit_width, gas.access_size
            ),
            Self::NoS5 => write!(
                f,
                "the DSDT has no _S5_ package; the VMM must define \\_S5 to say how to power off"
            ),
            Self::BadS5 { opcode } => write!(
                f,
                "the first element of \\_S5 starts with AML opcode {opcode:#04x}; expected BytePrefix, ZeroOp or OneOp"
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

/// An ACPI Generic Address Structure (ACPI 6.5 §5.2.3.2).
#[derive(Debug, Clone, Copy)]
pub struct Gas {
    pub space: u8,
    pub bit_width: u8,
    pub bit_offset: u8,
    /// 0 undefined (use `bit_width`), 1 byte, 2 word, 3 dword, 4 qword.
    pub access_size: u8,
    pub address: u64,
}

impl Gas {
    fn read(addr: u64) -> Self {
        Self {
            space: phys::read_u8(addr),
            bit_width: phys::read_u8(addr + 1),
            bit_offset: phys::read_u8(addr + 2),
            access_size: phys::read_u8(addr + 3),
            address: phys::read_le64(addr + 4),
        }
    }

    /// Writes `value` (shifted to `bit_offset`) to a port I/O register with its access size.
    pub fn write(&self, value: u32) -> Result<(), AcpiError> {
        let unsupported = AcpiError::UnsupportedRegister(*self);
        let port = u16::try_from(self.address).map_err(|_| unsupported)?;
        if self.space != GAS_SYSTEM_IO || port == 0 {
            return Err(unsupported);
        }
        let value = value
            .checked_shl(u32::from(self.bit_offset))
            .ok_or(unsupported)?;
        match (self.access_size, self.bit_width) {
            (1, _) | (0, 8) => outb(port, value as u8),
            (2, _) | (0, 16) => outw(port, value as u16),
            (3, _) | (0, 32) => outl(port, value),
            _ => return Err(unsupported),
        }
        Ok(())
    }
}

/// What the FADT says about sleeping: the sleep control register and the DSDT's address.
#[derive(Debug, Clone, Copy)]
pub struct FadtSleep {
    pub sleep_control: Gas,
    pub dsdt: u64,
}

/// Reads SLEEP_CONTROL_REG and the DSDT address (X_DSDT, else DSDT) from the FADT.
pub fn fadt_sleep(rsdp: u64) -> Result<FadtSleep, AcpiError> {
    let fadt = find_table(rsdp, b"FACP")?.ok_or(AcpiError::NoFadt)?;
    if fadt.len < FADT_SLEEP_CONTROL_REG + GAS_SIZE {
        return Err(AcpiError::NoSleepControl { fadt_len: fadt.len });
    }
    let x_dsdt = phys::read_le64(fadt.addr + FADT_X_DSDT);
    let dsdt = if x_dsdt != 0 {
        x_dsdt
    } else {
        u64::from(phys::read_le32(fadt.addr + FADT_DSDT))
    };
    Ok(FadtSleep {
        sleep_control: Gas::read(fadt.addr + FADT_SLEEP_CONTROL_REG),
        dsdt,
    })
}

/// SLP_TYP for S5: the first element of `Name (_S5, Package () { typ, ... })` in the DSDT.
///
/// A pattern match on the AML, not an interpreter: it finds the name `_S5_` directly
/// followed by PackageOp, skips the PkgLength and NumElements, and reads an integer given
/// as BytePrefix + byte, ZeroOp or OneOp.
pub fn s5_sleep_type(dsdt_addr: u64) -> Result<u8, AcpiError> {
    let dsdt = Sdt::read(dsdt_addr)?;
    let end = dsdt.addr + dsdt.len;
    let byte = |at: u64| (at < end).then(|| phys::read_u8(at)).ok_or(AcpiError::NoS5);
    let name = (dsdt.addr + SDT_HEADER_SIZE..end.saturating_sub(4))
        .find(|&at| {
            (0..4).all(|i| phys::read_u8(at + i) == b"_S5_"[i as usize])
                && phys::read_u8(at + 4) == AML_PACKAGE_OP
        })
        .ok_or(AcpiError::NoS5)?;
    // PkgLength: bits 7-6 of the lead byte count the bytes that follow it (ACPI 6.5 §20.2.4).
    let pkg_length = name + 5;
    let num_elements = pkg_length + 1 + u64::from(byte(pkg_length)? >> 6);
    if byte(num_elements)? == 0 {
        return Err(AcpiError::NoS5);
    }
    let element = num_elements + 1;
    match byte(element)? {
        AML_BYTE_PREFIX => byte(element + 1),
        AML_ZERO_OP => Ok(0),
        AML_ONE_OP => Ok(1),
        opcode => Err(AcpiError::BadS5 { opcode }),
    }
}
