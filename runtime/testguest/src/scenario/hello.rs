//! `hello`: what the loader and firmware handed us: command line, start_info, memory map,
//! and the CPUs in the MADT.

use super::ScenarioError;
use crate::acpi;
use crate::console::{Ascii, List};
use crate::say;
use crate::start_info::StartInfo;

/// Memory map entries printed one per line (the summary counts them all).
const MAX_PRINTED_ENTRIES: usize = 32;

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
    Ok(())
}
