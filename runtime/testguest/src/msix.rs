//! MSI-X (PCI Local Bus 3.0 §6.8.2): the capability, the vector table in a memory BAR,
//! and programming an entry to hit a local APIC vector (Intel SDM vol. 3 §11.11).

use core::fmt;

use crate::pci::{Bar, PciDevice, PciError};
use crate::phys;

const CAP_ID_MSIX: u8 = 0x11;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_SIZE: u64 = 16;
const ENTRY_VECTOR_CONTROL_MASKED: u32 = 1;
/// MSI address: the xAPIC message window; destination APIC ID in bits 19:12.
const MSI_ADDRESS_BASE: u32 = 0xfee0_0000;

#[derive(Debug, Clone, Copy)]
pub enum MsixError {
    Pci(PciError),
    NoCapability,
    /// The table's BAR is missing or unassigned.
    TableBar(u8),
    NoSuchEntry {
        entry: u16,
        table_size: u16,
    },
    /// xAPIC MSIs address APIC IDs 0..255 only.
    ApicIdTooLarge(u32),
}

impl fmt::Display for MsixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pci(e) => write!(f, "{e}"),
            Self::NoCapability => write!(f, "the device has no MSI-X capability"),
            Self::TableBar(b) => write!(
                f,
                "the MSI-X table is in BAR{b}, which is absent or not mapped"
            ),
            Self::NoSuchEntry { entry, table_size } => {
                write!(
                    f,
                    "MSI-X entry {entry} requested but the table has {table_size} entries"
                )
            }
            Self::ApicIdTooLarge(id) => {
                write!(f, "APIC ID {id} cannot be an xAPIC MSI destination")
            }
        }
    }
}

impl From<PciError> for MsixError {
    fn from(e: PciError) -> Self {
        Self::Pci(e)
    }
}

/// A device's MSI-X capability with its table located.
#[derive(Debug, Clone, Copy)]
pub struct Msix {
    dev: PciDevice,
    cap: u8,
    table: u64,
    table_size: u16,
}

impl Msix {
    /// Finds the capability; `bars` are the device's assigned BARs.
    pub fn find(dev: PciDevice, bars: &[Option<Bar>; 6]) -> Result<Self, MsixError> {
        let cap = dev
            .find_capability(CAP_ID_MSIX, Some)?
            .ok_or(MsixError::NoCapability)?;
        let control = dev.address.read16(cap + 2);
        let table_reg = dev.address.read32(cap + 4);
        let bir = (table_reg & 7) as u8;
        let table_size = (control & 0x7ff) + 1;
        let bar = bars
            .get(usize::from(bir))
            .copied()
            .flatten()
            .filter(|b| b.addr != 0)
            .ok_or(MsixError::TableBar(bir))?;
        let table = bar.addr + u64::from(table_reg & !7);
        if !phys::is_mapped(table, u64::from(table_size) * ENTRY_SIZE) {
            return Err(MsixError::TableBar(bir));
        }
        Ok(Self {
            dev,
            cap,
            table,
            table_size,
        })
    }

    pub fn table_size(&self) -> u16 {
        self.table_size
    }

    fn set_control(&self, set: u16, clear: u16) {
        let control = self.dev.address.read16(self.cap + 2);
        self.dev
            .address
            .write16(self.cap + 2, (control | set) & !clear);
    }

    /// Enables MSI-X with the whole function masked, so entries can be programmed safely.
    pub fn enable_masked(&self) {
        self.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK, 0);
    }

    /// Lifts the function mask: unmasked entries may now fire.
    pub fn unmask_function(&self) {
        self.set_control(0, CONTROL_FUNCTION_MASK);
    }

    pub fn disable(&self) {
        self.set_control(0, CONTROL_ENABLE);
    }

    /// Points `entry` at `vector` on the CPU with `apic_id` (fixed delivery, edge) and
    /// unmasks it.
    pub fn route(&self, entry: u16, apic_id: u32, vector: u8) -> Result<(), MsixError> {
        if entry >= self.table_size {
            return Err(MsixError::NoSuchEntry {
                entry,
                table_size: self.table_size,
            });
        }
        if apic_id > 0xff {
            return Err(MsixError::ApicIdTooLarge(apic_id));
        }
        let at = self.table + u64::from(entry) * ENTRY_SIZE;
        phys::write::<u32>(at + 12, ENTRY_VECTOR_CONTROL_MASKED);
        phys::write::<u32>(at, MSI_ADDRESS_BASE | (apic_id << 12));
        phys::write::<u32>(at + 4, 0);
        phys::write::<u32>(at + 8, u32::from(vector));
        phys::write::<u32>(at + 12, 0);
        Ok(())
    }
}
