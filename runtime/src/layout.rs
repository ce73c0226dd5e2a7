//! Guest physical address map and port assignments of an x86_64 ferrovirt VM.
//!
//! ```text
//! 0x0000_0500  GDT (boot protocol)          0x0000_6000  PVH hvm_start_info + memmap
//! 0x0000_7000  Linux zero page (boot_params) 0x0000_9000  boot page tables (PML4, PDPT, PD)
//! 0x0002_0000  kernel command line          0x000E_0000  ACPI tables (RSDP at 0xE0000)
//! 0x0010_0000  RAM for kernels and initramfs, up to the 32-bit PCI hole
//! 0xC000_0000  32-bit PCI MMIO window (BARs) 0xFEC0_0000  IOAPIC   0xFEE0_0000  LAPIC
//! 4 GiB        RAM above the hole, then the 64-bit PCI MMIO window
//! ```
//! 0x1_0000..0x2_0000 is left to the guest (the test guest puts its AP trampoline there).

pub const GDT_START: u64 = 0x500;
pub const PVH_INFO_START: u64 = 0x6000;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Conventional memory ends here; the EBDA and BIOS area follow.
pub const EBDA_START: u64 = 0x9_fc00;
pub const ACPI_START: u64 = 0xe_0000;
pub const HIGH_RAM_START: u64 = 0x10_0000;

pub const MMIO32_START: u64 = 0xc000_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The 32-bit PCI window ends where the IOAPIC begins.
pub const MMIO32_SIZE: u64 = IOAPIC_START - MMIO32_START;
pub const APIC_START: u64 = 0xfee0_0000;
pub const RAM_64BIT_START: u64 = 1 << 32;
/// Size of the 64-bit PCI window placed above the top of RAM.
pub const MMIO64_SIZE: u64 = 64 << 30;

/// Serial port COM1 and its IOAPIC pin.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// i8042 command port: writing 0xFE pulses the CPU reset line.
pub const I8042_PORT: u16 = 0x60;
/// Bochs/QEMU debug console: each byte written is logged (and timestamped).
pub const DEBUGCON_PORT: u16 = 0xe9;
/// QEMU's isa-debug-exit location: the byte written becomes the VMM's exit status.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// ACPI PM1a control (hardware-reduced sleep control): SLP_TYP=S5|SLP_EN powers off.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ferrovirt's guest-idle port: a 1- or 2-byte write of N parks the writing vCPU for N ms
/// (at most 100). For ring-3 test guests, which cannot halt; see runtime/testguest.
pub const GUEST_IDLE_PORT: u16 = 0x610;
/// PCI configuration mechanism #1.
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xcf8;

/// First GSI handed to MSI vectors; 0..24 are IOAPIC pins.
pub use crate::vm::interrupt::IOAPIC_PINS;
