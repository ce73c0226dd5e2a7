//! The PVH `hvm_start_info` handed over in EBX (Xen `arch-x86/hvm/start_info.h`), and the
//! kernel command line it points to.

use core::fmt;

use crate::phys;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// `hvm_start_info` is 56 bytes in version 1 (memmap fields added).
const START_INFO_V1_SIZE: u64 = 56;
const MEMMAP_ENTRY_SIZE: u64 = 24;
/// `hvm_modlist_entry`: paddr, size, cmdline_paddr, reserved (all u64).
const MODLIST_ENTRY_SIZE: u64 = 32;
const CMDLINE_MAX: usize = 4096;

#[derive(Debug, Clone, Copy)]
pub enum StartInfoError {
    /// EBX was zero or outside the identity map.
    BadAddress(u64),
    BadMagic(u32),
}

impl fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadAddress(a) => write!(
                f,
                "hvm_start_info address {a:#x} is not usable; boot through the PVH note with EBX set"
            ),
            Self::BadMagic(m) => write!(
                f,
                "hvm_start_info magic is {m:#x}, not {XEN_HVM_START_MAGIC:#x}; the loader did not use PVH"
            ),
        }
    }
}

/// One `hvm_memmap_table_entry` (E820 types).
#[derive(Debug, Clone, Copy)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl MemmapEntry {
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            1 => "ram",
            2 => "reserved",
            3 => "acpi",
            4 => "nvs",
            5 => "unusable",
            7 => "pmem",
            _ => "other",
        }
    }
}

/// One boot module (`hvm_modlist_entry`): the initramfs, if the loader was given one.
#[derive(Debug, Clone, Copy)]
pub struct Module {
    pub paddr: u64,
    pub size: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct StartInfo {
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    /// Zero for version 0.
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
}

impl StartInfo {
    /// Reads and validates the structure at `addr`.
    pub fn read(addr: u64) -> Result<Self, StartInfoError> {
        if !phys::is_mapped(addr, START_INFO_V1_SIZE) || !addr.is_multiple_of(8) {
            return Err(StartInfoError::BadAddress(addr));
        }
        let magic = phys::read::<u32>(addr);
        if magic != XEN_HVM_START_MAGIC {
            return Err(StartInfoError::BadMagic(magic));
        }
        let version = phys::read::<u32>(addr + 4);
        let (memmap_paddr, memmap_entries) = if version >= 1 {
            (phys::read::<u64>(addr + 40), phys::read::<u32>(addr + 48))
        } else {
            (0, 0)
        };
        Ok(Self {
            version,
            flags: phys::read::<u32>(addr + 8),
            nr_modules: phys::read::<u32>(addr + 12),
            modlist_paddr: phys::read::<u64>(addr + 16),
            cmdline_paddr: phys::read::<u64>(addr + 24),
            rsdp_paddr: phys::read::<u64>(addr + 32),
            memmap_paddr,
            memmap_entries,
        })
    }

    /// The NUL-terminated command line (empty if absent), at most 4 KiB.
    pub fn cmdline(&self) -> &'static [u8] {
        let addr = self.cmdline_paddr;
        if !phys::is_mapped(addr, CMDLINE_MAX as u64) {
            return &[];
        }
        let len = (0..CMDLINE_MAX)
            .find(|&i| phys::read_u8(addr + i as u64) == 0)
            .unwrap_or(CMDLINE_MAX);
        // SAFETY: `addr..addr+len` is identity-mapped (checked above), was written by the
        // loader before entry and is never written again; no Rust object lives there.
        unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
    }

    /// The memory map entries (none if the loader gave no map).
    pub fn memmap(&self) -> impl Iterator<Item = MemmapEntry> {
        let base = self.memmap_paddr;
        let count = if phys::is_mapped(base, u64::from(self.memmap_entries) * MEMMAP_ENTRY_SIZE)
            && base.is_multiple_of(8)
        {
            u64::from(self.memmap_entries)
        } else {
            0
        };
        (0..count).map(move |i| {
            let entry = base + i * MEMMAP_ENTRY_SIZE;
            MemmapEntry {
                addr: phys::read::<u64>(entry),
                size: phys::read::<u64>(entry + 8),
                kind: phys::read::<u32>(entry + 16),
            }
        })
    }

    /// The boot modules (none if the list is absent or not identity-mapped).
    pub fn modules(&self) -> impl Iterator<Item = Module> {
        let base = self.modlist_paddr;
        // QEMU's PVH option ROM (built for i386, where u64 aligns to 4) may leave the list
        // unaligned: read it bytewise.
        let count = if phys::is_mapped(base, u64::from(self.nr_modules) * MODLIST_ENTRY_SIZE) {
            u64::from(self.nr_modules)
        } else {
            0
        };
        (0..count).map(move |i| {
            let entry = base + i * MODLIST_ENTRY_SIZE;
            Module {
                paddr: phys::read_le64(entry),
                size: phys::read_le64(entry + 8),
            }
        })
    }
}

/// The value of `key=value` among the whitespace-separated command-line words.
pub fn cmdline_param<'a>(cmdline: &'a [u8], key: &str) -> Option<&'a [u8]> {
    cmdline
        .split(|b| b.is_ascii_whitespace())
        .find_map(|word| word.strip_prefix(key.as_bytes())?.strip_prefix(b"="))
}
