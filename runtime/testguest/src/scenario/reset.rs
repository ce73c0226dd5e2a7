//! `reset`: asks the i8042 keyboard controller to pulse the CPU reset line, the way a PC
//! (and Linux's `reboot=k`) resets. The VM must end on that write.

use super::{ScenarioError, check_failed};
use crate::port::outb;
use crate::say;
use crate::shutdown::{I8042_COMMAND_PORT, I8042_RESET};
use crate::tsc;

/// How long the VMM gets to stop the vCPU after the write.
const GRACE_US: u64 = 1_000_000;

pub fn run() -> Result<(), ScenarioError> {
    say!("reset via i8042");
    outb(I8042_COMMAND_PORT, I8042_RESET);
    tsc::delay_us(GRACE_US);
    Err(check_failed!(
        "the VMM ignored the i8042 reset ({I8042_RESET:#x} to port {I8042_COMMAND_PORT:#x}; still running 1 s later)"
    ))
}
