//! `ticker`: runs until the VMM stops it, printing `tick N` about every 20 ms, so tests
//! can watch a guest that pauses, resumes and is shut down from outside.

use super::ScenarioError;
use crate::say;
use crate::tsc;

const TICK_US: u64 = 20_000;

pub fn run() -> Result<(), ScenarioError> {
    let mut tick = 0u64;
    loop {
        say!("tick {}", tick);
        tick = tick.wrapping_add(1);
        tsc::delay_us(TICK_US);
    }
}
