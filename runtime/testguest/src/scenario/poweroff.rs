//! `poweroff`: powers off the ACPI way of a hardware-reduced platform, as Linux does: the
//! FADT's sleep control register and SLP_TYP from the DSDT's `\_S5`. The VM must end on
//! that write; this scenario never uses debug-exit to pass.

use super::{ScenarioError, check_failed};
use crate::acpi;
use crate::say;
use crate::start_info::StartInfo;
use crate::tsc;

/// SLP_EN in the sleep control register (ACPI 6.5 §4.8.3.7); SLP_TYP is bits 2-4.
const SLP_EN: u32 = 1 << 5;
const SLP_TYP_SHIFT: u32 = 2;
const SLP_TYP_MASK: u32 = 0b111;
/// How long the VMM gets to stop the vCPU after the write.
const GRACE_US: u64 = 1_000_000;

pub fn run(info: &StartInfo) -> Result<(), ScenarioError> {
    let rsdp = acpi::find_rsdp(info.rsdp_paddr)?;
    let fadt = acpi::fadt_sleep(rsdp)?;
    let slp_typ = acpi::s5_sleep_type(fadt.dsdt)?;
    let reg = fadt.sleep_control;
    say!(
        "poweroff sleep_control={:#x} slp_typ={slp_typ}",
        reg.address
    );
    let value = ((u32::from(slp_typ) & SLP_TYP_MASK) << SLP_TYP_SHIFT) | SLP_EN;
    reg.write(value)?;
    tsc::delay_us(GRACE_US);
    Err(check_failed!(
        "the VMM ignored ACPI S5 (wrote {value:#x} to sleep control {:#x}; still running 1 s later)",
        reg.address
    ))
}
