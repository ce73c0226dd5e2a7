//! `idle`: runs until the VMM stops it, spending its time asleep in the ferrovirt VMM's
//! guest-idle port (a write of N parks the vCPU for N ms): ring 0, where a guest would halt,
//! is too slow on nested test machines, so this is how many running test guests share a host
//! at almost no CPU. Prints `idle N` about every second. Under a VMM without the port it
//! spins instead.

use super::ScenarioError;
use crate::port;
use crate::say;

/// The ferrovirt VMM's guest-idle port (`GUEST_IDLE_PORT` in runtime/src/layout.rs).
const GUEST_IDLE_PORT: u16 = 0x610;
const SLEEP_MS: u16 = 100;

pub fn run() -> Result<(), ScenarioError> {
    let mut second = 0u64;
    loop {
        say!("idle {}", second);
        second = second.wrapping_add(1);
        for _ in 0..(1000 / SLEEP_MS) {
            port::outw(GUEST_IDLE_PORT, SLEEP_MS);
        }
    }
}
