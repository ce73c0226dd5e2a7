//! Time from the TSC (readable in ring 3), for bounded waits and the INIT/SIPI delays.

use core::arch::x86_64::{__cpuid, _rdtsc};

/// Assumed when CPUID does not tell: high, so that waits last at least as long as asked
/// on any slower CPU.
const FALLBACK_MHZ: u64 = 5000;

pub fn now() -> u64 {
    // SAFETY: RDTSC is allowed in ring 3 (the boot code leaves CR4.TSD clear).
    unsafe { _rdtsc() }
}

/// TSC ticks per microsecond, from the hypervisor timing leaf (0x40000010), CPUID 0x15 or
/// 0x16, else `FALLBACK_MHZ`.
pub fn ticks_per_us() -> u64 {
    let max_hv = __cpuid(0x4000_0000).eax;
    if (0x4000_0010..0x4001_0000).contains(&max_hv) {
        let khz = u64::from(__cpuid(0x4000_0010).eax);
        if khz != 0 {
            return (khz / 1000).max(1);
        }
    }
    let max_leaf = __cpuid(0).eax;
    if max_leaf >= 0x15 {
        let l = __cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return (u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax) / 1_000_000).max(1);
        }
    }
    if max_leaf >= 0x16 {
        let mhz = u64::from(__cpuid(0x16).eax & 0xffff);
        if mhz != 0 {
            return mhz;
        }
    }
    FALLBACK_MHZ
}

/// A deadline `us` microseconds from now.
#[derive(Clone, Copy)]
pub struct Deadline(u64);

impl Deadline {
    pub fn after_us(us: u64) -> Self {
        Self(now().saturating_add(us.saturating_mul(ticks_per_us())))
    }

    pub fn passed(&self) -> bool {
        now() >= self.0
    }
}

/// Busy-waits at least `us` microseconds (ring 3 cannot halt).
pub fn delay_us(us: u64) {
    let deadline = Deadline::after_us(us);
    while !deadline.passed() {
        core::hint::spin_loop();
    }
}

/// Polls `done` until it returns true or `us` microseconds pass; true if it succeeded.
pub fn poll_until(us: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Deadline::after_us(us);
    loop {
        if done() {
            return true;
        }
        if deadline.passed() {
            return false;
        }
        core::hint::spin_loop();
    }
}
