//! Direct kernel boot: loads an ELF vmlinux (PVH or 64-bit entry) or a bzImage, the
//! initramfs and the command line, and writes what the entry protocol hands the kernel
//! (PVH `hvm_start_info` or the Linux zero page) plus the ACPI tables.

pub mod acpi;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::config::PayloadConfig;
use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIGH_RAM_START, MMIO32_START, PVH_INFO_START,
    RAM_64BIT_START, ZERO_PAGE_START,
};
use crate::memory::GuestMemoryMmap;

/// Used when the user gives no command line: serial console, reboot through the
/// keyboard controller (our i8042), and no waiting on panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Linux boot protocol (Documentation/arch/x86/boot.rst): "HdrS" at 0x202 marks a bzImage.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: u32 = 0x5372_6448;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {what} {path}")]
    Open {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat(std::path::PathBuf),
    #[error(
        "cannot load kernel {path}: it is corrupt, or does not fit in {mem_mib} MiB of guest memory"
    )]
    LoadKernel {
        path: std::path::PathBuf,
        mem_mib: u64,
        #[source]
        source: loader::Error,
    },
    #[error(
        "kernel {path} needs guest memory up to {end:#x} but the VM has {mem_mib} MiB; give the VM more memory"
    )]
    KernelTooLarge {
        path: std::path::PathBuf,
        end: u64,
        mem_mib: u64,
    },
    #[error(
        "initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel; give the VM more memory"
    )]
    InitramfsTooLarge {
        path: std::path::PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot read initramfs")]
    ReadInitramfs(#[source] vm_memory::GuestMemoryError),
    #[error("kernel command line is invalid or longer than {CMDLINE_MAX_SIZE} bytes")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the command line to guest memory")]
    WriteCmdline(#[source] loader::Error),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error("cannot write boot parameters to guest memory")]
    WriteBootParams(#[source] vm_memory::GuestMemoryError),
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// Xen PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh {
        entry: GuestAddress,
        start_info: GuestAddress,
    },
    /// Linux 64-bit boot protocol: long mode, identity-mapped, RSI = zero page.
    Linux64 {
        entry: GuestAddress,
        zero_page: GuestAddress,
    },
}

/// `hvm_start_info` and friends are plain C structs; they lack vm-memory's marker.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: a repr(C) struct of integers without padding-dependent invariants.
unsafe impl ByteValued for StartInfo {}
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: as above.
unsafe impl ByteValued for MemmapEntry {}
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: as above.
unsafe impl ByteValued for ModlistEntry {}

/// The guest's physical memory map: (start, length, E820 type).
pub fn memory_map(ram_size: u64) -> Vec<(u64, u64, u32)> {
    let low_end = ram_size.min(MMIO32_START);
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_RAM_START - EBDA_START, E820_RESERVED),
        (HIGH_RAM_START, low_end - HIGH_RAM_START, E820_RAM),
    ];
    if ram_size > MMIO32_START {
        map.push((RAM_64BIT_START, ram_size - MMIO32_START, E820_RAM));
    }
    map
}

enum KernelFormat {
    Elf,
    BzImage,
}

fn kernel_format(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let mut head = [0u8; 4];
    let unknown = || BootError::UnknownKernelFormat(path.to_owned());
    file.read_exact(&mut head).map_err(|_| unknown())?;
    if head == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))
        .and_then(|_| file.read_exact(&mut magic))
        .map_err(|_| unknown())?;
    if u32::from_le_bytes(magic) == BZIMAGE_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(unknown())
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Loads the payload into `mem` (of `ram_size` bytes) and writes every boot structure.
pub fn load_payload(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    payload: &PayloadConfig,
    vcpus: u8,
) -> Result<EntryPoint, BootError> {
    let mem_mib = ram_size >> 20;
    let kernel_path = &payload.kernel;
    let mut kernel = open("kernel", kernel_path)?;
    let format = kernel_format(&mut kernel, kernel_path)?;
    let load_err = |source| BootError::LoadKernel {
        path: kernel_path.clone(),
        mem_mib,
        source,
    };
    let loaded: KernelLoaderResult = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIGH_RAM_START)))
            .map_err(load_err)?,
        KernelFormat::BzImage => {
            BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIGH_RAM_START)))
                .map_err(load_err)?
        }
    };
    let low_end = ram_size.min(MMIO32_START);
    if loaded.kernel_end > low_end {
        return Err(BootError::KernelTooLarge {
            path: kernel_path.clone(),
            end: loaded.kernel_end,
            mem_mib,
        });
    }

    let initramfs = payload
        .initramfs
        .as_deref()
        .map(|path| load_initramfs(mem, path, loaded.kernel_end, low_end))
        .transpose()?;

    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cmdline
        .insert_str(payload.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE))
        .map_err(BootError::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(BootError::WriteCmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .map_err(BootError::Cmdline)?;

    let rsdp = acpi::write_acpi_tables(mem, vcpus)?;
    let map = memory_map(ram_size);

    match (format, loaded.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            write_pvh_start_info(mem, &map, rsdp, initramfs)?;
            Ok(EntryPoint::Pvh {
                entry,
                start_info: GuestAddress(PVH_INFO_START),
            })
        }
        (format, _) => {
            let mut params = boot_params::default();
            if let Some(header) = loaded.setup_header {
                params.hdr = header;
            }
            params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = BZIMAGE_MAGIC;
            params.hdr.cmd_line_ptr = CMDLINE_START as u32;
            params.hdr.cmdline_size = cmdline_len as u32;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            if let Some((addr, size)) = initramfs {
                params.hdr.ramdisk_image = addr.raw_value() as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            params.acpi_rsdp_addr = rsdp.raw_value();
            for (slot, &(addr, size, r#type)) in params.e820_table.iter_mut().zip(&map) {
                *slot = boot_e820_entry { addr, size, r#type };
            }
            params.e820_entries = map.len() as u8;
            mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
                .map_err(BootError::WriteBootParams)?;
            // The 64-bit entry of a bzImage is 0x200 past the protected-mode code
            // (boot.rst, "64-bit boot protocol"); a vmlinux's ELF entry is startup_64.
            let entry = match format {
                KernelFormat::BzImage => loaded.kernel_load.unchecked_add(0x200),
                KernelFormat::Elf => loaded.kernel_load,
            };
            Ok(EntryPoint::Linux64 {
                entry,
                zero_page: GuestAddress(ZERO_PAGE_START),
            })
        }
    }
}

/// Puts the initramfs at the top of low RAM, page-aligned, above the kernel.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    low_end: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let mut file = open("initramfs", path)?;
    let size = file
        .metadata()
        .map_err(|source| BootError::Open {
            what: "initramfs",
            path: path.to_owned(),
            source,
        })?
        .len();
    let too_large = || BootError::InitramfsTooLarge {
        path: path.to_owned(),
        size,
        limit: low_end,
    };
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end.max(HIGH_RAM_START))
        .ok_or_else(too_large)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(BootError::ReadInitramfs)?;
    Ok((GuestAddress(addr), size))
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    map: &[(u64, u64, u32)],
    rsdp: GuestAddress,
    initramfs: Option<(GuestAddress, u64)>,
) -> Result<(), BootError> {
    let info_size = std::mem::size_of::<StartInfo>() as u64;
    let modlist_addr = GuestAddress(PVH_INFO_START + info_size);
    let memmap_addr = modlist_addr.unchecked_add(std::mem::size_of::<ModlistEntry>() as u64);
    let write = |r: Result<(), vm_memory::GuestMemoryError>| r.map_err(BootError::WriteBootParams);

    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        let entry = MemmapEntry(hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        });
        let at = memmap_addr.unchecked_add((i * std::mem::size_of::<MemmapEntry>()) as u64);
        write(mem.write_obj(entry, at))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.raw_value(),
        memmap_paddr: memmap_addr.raw_value(),
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initramfs {
        let module = ModlistEntry(hvm_modlist_entry {
            paddr: addr.raw_value(),
            size,
            ..Default::default()
        });
        write(mem.write_obj(module, modlist_addr))?;
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr.raw_value();
    }
    write(mem.write_obj(StartInfo(info), GuestAddress(PVH_INFO_START)))?;
    debug_assert!(mem.address_in_range(memmap_addr));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_reserves_the_bios_area_and_skips_the_pci_hole() {
        let map = memory_map(4 << 30);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(
            map[2],
            (HIGH_RAM_START, MMIO32_START - HIGH_RAM_START, E820_RAM)
        );
        assert_eq!(
            map[3],
            (RAM_64BIT_START, (4 << 30) - MMIO32_START, E820_RAM)
        );
    }

    #[test]
    fn a_file_that_is_no_kernel_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("fv-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("not-a-kernel");
        std::fs::write(&path, vec![0x42u8; 4096]).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let payload = PayloadConfig {
            kernel: path.clone(),
            ..Default::default()
        };
        let err = load_payload(&mem, 16 << 20, &payload, 1).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(err, BootError::UnknownKernelFormat(_)), "{err}");
        assert!(err.to_string().contains("not-a-kernel"));
    }
}
