//! ferrovirt test guest: a freestanding PVH ELF that runs one scenario (`scenario=NAME` on
//! the command line) in ring 3, reports `testguest: ...` lines on COM1 and ends the VM
//! through the debug-exit port. See README.md for the protocol.

#![no_std]
#![no_main]
// Without an allocator, a failure's message travels by value; it is built once per run.
#![allow(clippy::result_large_err)]

mod acpi;
mod boot;
mod console;
mod dma;
mod lapic;
mod mem;
mod msix;
mod packet;
mod pci;
mod phys;
mod port;
mod scenario;
mod serial;
mod shutdown;
mod start_info;
mod tsc;
mod virtio;

use core::sync::atomic::{AtomicU8, Ordering};

use scenario::Scenario;
use shutdown::ExitCode;
use start_info::StartInfo;

/// The running scenario, for the panic handler's FAIL line.
static CURRENT: AtomicU8 = AtomicU8::new(0);

/// Entry of the boot CPU in ring 3 (called from `bsp_ring3_entry` in boot.rs) with the
/// physical address of `hvm_start_info`.
#[unsafe(no_mangle)]
extern "C" fn bsp_main(start_info_addr: u32) -> ! {
    let info = match StartInfo::read(u64::from(start_info_addr)) {
        Ok(info) => info,
        Err(e) => {
            serial::init();
            say!("FAIL boot: {e}");
            shutdown::exit(ExitCode::BadBootInfo);
        }
    };
    let name = start_info::cmdline_param(info.cmdline(), "scenario").unwrap_or(b"hello");
    let Some(scenario) = Scenario::from_name(name) else {
        serial::init();
        say!(
            "FAIL {}: unknown scenario (known: {})",
            console::Ascii(name),
            scenario::KnownNames
        );
        shutdown::exit(ExitCode::UnknownScenario);
    };
    // The startup benchmark's guest: no serial output, straight to debug-exit.
    if scenario == Scenario::Exit {
        shutdown::exit(ExitCode::Pass);
    }
    CURRENT.store(scenario.index(), Ordering::Relaxed);
    serial::init();
    say!(
        "ferrovirt test guest {} scenario={}",
        env!("CARGO_PKG_VERSION"),
        scenario.name()
    );
    match scenario.run(&info) {
        Ok(()) => {
            say!("PASS {}", scenario.name());
            shutdown::exit(ExitCode::Pass);
        }
        Err(e) => {
            say!("FAIL {}: {e}", scenario.name());
            shutdown::exit(ExitCode::Fail);
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let name = Scenario::from_index(CURRENT.load(Ordering::Relaxed)).map_or("?", Scenario::name);
    match info.location() {
        Some(l) => say!(
            "FAIL {name}: panic at {}:{}: {}",
            l.file(),
            l.line(),
            info.message()
        ),
        None => say!("FAIL {name}: panic: {}", info.message()),
    }
    shutdown::exit(ExitCode::Panic);
}

/// The prebuilt `core` refers to this from its unwind tables; release builds drop the
/// reference through LTO, dev builds link it. With panic=abort nothing unwinds, so it is
/// never called.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}
