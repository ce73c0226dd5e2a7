//! `fault`: crashes on purpose, so tests can check how the VMM reports a guest crash.
//! `ud2` raises #UD; the IDT is empty (limit 0), so delivery fails with #GP, then #DF, and
//! the CPU shuts down (triple fault). The ferrovirt VMM exits with status 4.

use crate::say;

pub fn run() -> ! {
    say!("fault: executing ud2 in ring 3");
    // SAFETY: `ud2` touches no memory and never returns: the exception it raises cannot be
    // delivered (boot.rs loads an empty IDT) and ends in a triple fault, which stops the vCPU.
    unsafe { core::arch::asm!("ud2", options(noreturn, nomem, nostack)) }
}
