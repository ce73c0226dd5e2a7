//! Ending the run: QEMU's isa-debug-exit protocol at port 0xF4, which the ferrovirt VMM
//! implements too (status v; QEMU reports (v << 1) | 1).

use crate::port::outb;

const DEBUG_EXIT_PORT: u16 = 0xf4;
/// ACPI hardware-reduced sleep control register of the ferrovirt VMM.
const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// SLP_TYP = 5 (the VMM's `\_S5`) << 2 | SLP_EN.
const ACPI_SLEEP_S5: u8 = (5 << 2) | (1 << 5);
/// i8042 command port and its "pulse the reset line" command.
pub const I8042_COMMAND_PORT: u16 = 0x64;
pub const I8042_RESET: u8 = 0xfe;

/// Exit statuses written to the debug-exit port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    Pass = 0,
    /// A scenario's check failed.
    Fail = 32,
    /// The guest panicked (a bug in the guest or impossible hardware state).
    Panic = 33,
    /// `scenario=` named no scenario this guest knows.
    UnknownScenario = 34,
    /// EBX did not point at a valid `hvm_start_info`.
    BadBootInfo = 35,
}

/// Ends the VM with `code`. Without a debug-exit device, falls back to ACPI S5 power-off
/// (for a pass) or an i8042 reset (for a failure, so it is not mistaken for success).
pub fn exit(code: ExitCode) -> ! {
    outb(DEBUG_EXIT_PORT, code as u8);
    if code == ExitCode::Pass {
        outb(ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_S5);
    } else {
        outb(I8042_COMMAND_PORT, I8042_RESET);
    }
    // Ring 3 cannot halt; nothing else can stop us.
    loop {
        core::hint::spin_loop();
    }
}
