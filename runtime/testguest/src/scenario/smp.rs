//! `smp`: start every application processor in the MADT with INIT-SIPI-SIPI (from ring 3,
//! through the xAPIC ICR). Each AP runs the trampoline in `boot` up to ring 3, checks in
//! here with its APIC ID and the result of a little floating-point work, then spins.

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::{ScenarioError, check_failed};
use crate::acpi;
use crate::boot::{self, MAX_CPUS};
use crate::console::List;
use crate::lapic::LocalApic;
use crate::say;
use crate::start_info::StartInfo;
use crate::tsc;

/// Intel SDM vol. 3 §9.4.4.1 (MP initialization example): 10 ms after INIT, 200 us
/// between the two SIPIs.
const INIT_DELAY_US: u64 = 10_000;
const SIPI_DELAY_US: u64 = 200;
/// How long APs get to reach ring 3 and check in (their ring-0 steps are emulated slowly).
const CHECK_IN_TIMEOUT_US: u64 = 5_000_000;

/// LAPIC MMIO base for the APs (from the MADT).
static LAPIC_BASE: AtomicU64 = AtomicU64::new(acpi::DEFAULT_LAPIC_ADDRESS);
/// Next free check-in slot.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
/// APs whose slot is fully written.
static CHECKED_IN: AtomicUsize = AtomicUsize::new(0);
static AP_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static AP_RESULTS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// The APs' "bit of computation": a partial harmonic sum whose length depends on the APIC
/// ID, in SSE2 floating point (proves the AP enabled SSE). The BSP recomputes it.
#[inline(never)]
fn work(apic_id: u32) -> u64 {
    let mut sum = 0.0f64;
    for k in 1..=(20_000 + apic_id) {
        sum += 1.0 / f64::from(k);
    }
    sum.to_bits()
}

/// Entry of every AP in ring 3 (called from `ap_ring3_entry` in boot.rs).
#[unsafe(no_mangle)]
extern "C" fn ap_main() -> ! {
    let id = LocalApic::new(LAPIC_BASE.load(Ordering::Acquire)).id();
    let result = work(id);
    let slot = NEXT_SLOT.fetch_add(1, Ordering::AcqRel);
    if slot < MAX_CPUS {
        AP_IDS[slot].store(id, Ordering::Relaxed);
        AP_RESULTS[slot].store(result, Ordering::Relaxed);
        CHECKED_IN.fetch_add(1, Ordering::Release);
    }
    // Ring 3 cannot halt; spin until the BSP ends the VM.
    loop {
        core::hint::spin_loop();
    }
}

pub fn run(info: &StartInfo) -> Result<(), ScenarioError> {
    let rsdp = acpi::find_rsdp(info.rsdp_paddr)?;
    let cpus = acpi::madt_cpus(rsdp)?;
    if cpus.dropped != 0 {
        return Err(check_failed!(
            "MADT lists {} CPUs; this guest handles {MAX_CPUS}",
            cpus.count + cpus.dropped
        ));
    }
    let lapic = LocalApic::new(cpus.lapic_address);
    lapic.enable();
    let bsp = lapic.id();
    if !cpus.ids().contains(&bsp) {
        return Err(check_failed!(
            "BSP APIC ID {bsp} is not in the MADT ({})",
            List(cpus.ids())
        ));
    }
    if let Some(&id) = cpus.ids().iter().find(|&&id| id > 0xfe) {
        return Err(check_failed!(
            "APIC ID {id} needs x2APIC, which this guest does not drive"
        ));
    }
    let aps = || cpus.ids().iter().copied().filter(move |&id| id != bsp);
    let expected = aps().count();
    say!("smp bsp={bsp} starting {expected} APs");

    LAPIC_BASE.store(cpus.lapic_address, Ordering::Release);
    let vector = boot::install_ap_trampoline();
    if expected as u64 > boot::ap_stacks_left() {
        return Err(check_failed!(
            "{expected} APs but only {} AP stacks",
            boot::ap_stacks_left()
        ));
    }
    for id in aps() {
        if !lapic.send_init(id) {
            return Err(check_failed!("INIT IPI to APIC {id} stayed pending"));
        }
    }
    tsc::delay_us(INIT_DELAY_US);
    for round in 0..2 {
        for id in aps() {
            if !lapic.send_startup(id, vector) {
                return Err(check_failed!("SIPI {round} to APIC {id} stayed pending"));
            }
        }
        tsc::delay_us(SIPI_DELAY_US);
    }
    let all_in = tsc::poll_until(CHECK_IN_TIMEOUT_US, || {
        CHECKED_IN.load(Ordering::Acquire) >= expected
    });
    let checked_in = CHECKED_IN.load(Ordering::Acquire).min(MAX_CPUS);

    let mut ids = [0u32; MAX_CPUS];
    ids[0] = bsp;
    let mut n = 1;
    for slot in 0..checked_in {
        let id = AP_IDS[slot].load(Ordering::Relaxed);
        let result = AP_RESULTS[slot].load(Ordering::Relaxed);
        if result != work(id) {
            return Err(check_failed!(
                "AP {id} computed {result:#x}, expected {:#x}",
                work(id)
            ));
        }
        if n < MAX_CPUS {
            ids[n] = id;
            n += 1;
        }
    }
    ids[..n].sort_unstable();
    say!("smp cpus={n} apic_ids={}", List(&ids[..n]));
    if !all_in {
        return Err(check_failed!(
            "only {checked_in} of {expected} APs checked in within {} ms (MADT: {})",
            CHECK_IN_TIMEOUT_US / 1000,
            List(cpus.ids())
        ));
    }
    for id in cpus.ids() {
        if !ids[..n].contains(id) {
            return Err(check_failed!(
                "APIC {id} is in the MADT but did not check in"
            ));
        }
    }
    if n != cpus.count {
        return Err(check_failed!(
            "{n} CPUs checked in but the MADT lists {}",
            cpus.count
        ));
    }
    Ok(())
}
