//! Conventional PCI: configuration space, BARs, MSI-X, and bus 0 behind a host bridge.
//!
//! The guest reaches configuration space through mechanism #1 ([`PciConfigIo`], put on
//! the port I/O bus at 0xCF8, length 8) and a device's BARs through the MMIO [`Bus`].
//! The VMM plays firmware: [`PciRoot::add_device`] gives every memory BAR an address in
//! the 32-bit window and turns memory decoding on, so a guest that does not enumerate
//! finds devices already usable. When the guest later moves a BAR or toggles memory
//! decoding, the root moves the range on the MMIO bus and re-registers the device's
//! ioeventfds with KVM at the new address.
//!
//! [`Bus`]: crate::devices::bus::Bus

mod allocator;
mod configuration;
mod msix;
mod root;
#[cfg(test)]
pub(crate) mod testing;

pub use allocator::AddressAllocator;
pub use configuration::{
    BarKind, COMMAND_BUS_MASTER, COMMAND_MEMORY, NUM_BARS, PciBar, PciConfiguration, PciHeader,
};
pub use msix::{
    MSIX_CAP_ID, MSIX_CONTROL_OFFSET, MSIX_CONTROL_WRITABLE, MSIX_PBA_ENTRY_BYTES,
    MSIX_TABLE_ENTRY_BYTES, Msix,
};
pub use root::{HostBridge, PciConfigIo, PciRoot, SharedPciDevice};

use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusError;

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("all 31 device slots of PCI bus 0 are taken; remove a device first")]
    NoFreeSlot,
    #[error("BAR {0} does not exist: a type 0 header has BARs 0..=5 and a 64-bit BAR takes two")]
    InvalidBarIndex(usize),
    #[error("BAR {0} is already defined")]
    BarInUse(usize),
    #[error(
        "BAR size {0:#x} is invalid: a memory BAR is a power of two of at least 16 bytes, \
         and a 32-bit one at most 2 GiB"
    )]
    InvalidBarSize(u64),
    #[error(
        "address {addr:#x} does not fit BAR {bar} (misaligned, or above 4 GiB for a 32-bit BAR)"
    )]
    InvalidBarAddress { bar: usize, addr: u64 },
    #[error("no room for a {0}-byte capability in the 256-byte configuration space")]
    CapabilitySpaceFull(usize),
    #[error("a capability needs at least its ID and next-pointer bytes")]
    CapabilityTooShort,
    #[error(
        "the 32-bit PCI MMIO window has no free {0:#x}-byte range left; use fewer or smaller devices"
    )]
    Mmio32Exhausted(u64),
    #[error("cannot place a BAR on the MMIO bus")]
    Bus(#[source] BusError),
    #[error("MSI-X supports 1..=2048 vectors, not {0}")]
    InvalidMsixVectorCount(usize),
}

/// Bus, device and function numbers of a PCI function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciBdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl std::fmt::Display for PciBdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "0000:{:02x}:{:02x}.{}",
            self.bus, self.device, self.function
        )
    }
}

/// A PCI function as bus 0 sees it. Implemented by the virtio-pci transport, and later by
/// VFIO and vhost-user devices.
///
/// Every method gets guest-controlled numbers: an implementation checks them and
/// ignores (with a trace) what it cannot serve, and never panics.
pub trait PciDevice: Send {
    /// The device's configuration space; the root reads BAR definitions and the command
    /// register from it.
    fn config(&self) -> &PciConfiguration;
    fn config_mut(&mut self) -> &mut PciConfiguration;

    /// Reads dword `reg` (0..64) of configuration space. Override for registers with
    /// read side effects.
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config().read_register(reg)
    }

    /// Writes `data` at byte `offset` (0..4) of dword `reg`. The default applies the
    /// register write masks; override to react to capability writes (MSI-X control, ...).
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config_mut().write_register(reg, offset, data);
    }

    /// Reads `data.len()` bytes at `offset` inside BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` inside BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// Eventfds KVM should signal on any guest write at `offset` inside BAR `bar`
    /// (virtio queue notifications). The root registers them wherever the BAR is mapped.
    fn ioeventfds(&self, _bar: usize) -> Vec<(u64, &EventFd)> {
        Vec::new()
    }

    /// Called after BAR `bar` moved on the MMIO bus (`None`: not decoded). Ioeventfds
    /// are already moved; devices with other address-bound state (VFIO mappings) move it
    /// here.
    fn bar_moved(&mut self, _bar: usize, _old: Option<u64>, _new: Option<u64>) {}
}
