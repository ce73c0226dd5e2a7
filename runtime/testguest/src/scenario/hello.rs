//! `hello`: what the loader and firmware handed us: command line, start_info, memory map,
//! boot modules (the initramfs) and the CPUs in the MADT.

use super::ScenarioError;
use crate::acpi;
use crate::console::{Ascii, Hex, List};
use crate::phys;
use crate::say;
use crate::start_info::StartInfo;

/// Memory map entries printed one per line (the summary counts them all).
const MAX_PRINTED_ENTRIES: usize = 32;
/// Boot modules printed (a PVH loader passes one initramfs, at most a few).
const MAX_PRINTED_MODULES: usize = 8;
/// Leading bytes of each module shown, so a test can tell it is the file it passed.
const MODULE_HEAD_BYTES: usize = 16;

pub fn run(info: &StartInfo) -> Result<(), ScenarioError> {
    say!("cmdline \"{}\"", Ascii(info.cmdline()));
    say!(
        "start_info version={} flags={:#x} modules={} rsdp={:#x} memmap_entries={}",
        info.version,
        info.flags,
        info.nr_modules,
        info.rsdp_paddr,
        info.memmap_entries
    );
    let mut ram = 0u64;
    let mut entries = 0usize;
    for e in info.memmap() {
        if entries < MAX_PRINTED_ENTRIES {
            say!(
                "memmap {:#012x}-{:#012x} {}",
                e.addr,
                e.addr.saturating_add(e.size),
                e.kind_name()
            );
        }
        if e.kind == 1 {
            ram = ram.saturating_add(e.size);
        }
        entries += 1;
    }
    if entries == 0 {
        say!(
            "memmap none (start_info version {} has no map)",
            info.version
        );
    } else {
        say!(
            "memory ram={}KiB ({}MiB) entries={}",
            ram >> 10,
            ram >> 20,
            entries
        );
    }
    for (i, module) in info.modules().take(MAX_PRINTED_MODULES).enumerate() {
        let mut head = [0u8; MODULE_HEAD_BYTES];
        let len =
            usize::try_from(module.size).map_or(MODULE_HEAD_BYTES, |s| s.min(MODULE_HEAD_BYTES));
        if phys::is_mapped(module.paddr, len as u64) {
            for (j, b) in head[..len].iter_mut().enumerate() {
                *b = phys::read_u8(module.paddr + j as u64);
            }
            say!(
                "module {i} paddr={:#x} size={} head={}",
                module.paddr,
                module.size,
                Hex(&head[..len])
            );
        } else {
            say!(
                "module {i} paddr={:#x} size={} head=unreadable (not below 4 GiB)",
                module.paddr,
                module.size
            );
        }
    }
    let rsdp = acpi::find_rsdp(info.rsdp_paddr)?;
    let cpus = acpi::madt_cpus(rsdp)?;
    say!(
        "acpi rsdp={:#x} lapic={:#x} cpus={} apic_ids={}",
        rsdp,
        cpus.lapic_address,
        cpus.count + cpus.dropped,
        List(cpus.ids())
    );
    say!("cpus={}", cpus.count + cpus.dropped);
    say!("tsc ticks_per_us={}", crate::tsc::ticks_per_us());
    Ok(())
}
