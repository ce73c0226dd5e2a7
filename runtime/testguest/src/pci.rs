//! PCI on bus 0 through configuration mechanism #1 (ports 0xCF8/0xCFC): enumeration,
//! BARs (read, sized, assigned when the platform left them unassigned), the command
//! register and the capability list (PCI Local Bus 3.0 §6).
//!
//! Each config access costs two port exits, so nothing here touches config space more than
//! it has to.

use core::fmt;

use crate::phys;
use crate::port::{inb, inl, inw, outb, outl, outw};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

const REG_VENDOR_DEVICE: u8 = 0x00;
const REG_COMMAND: u8 = 0x04;
const REG_STATUS: u8 = 0x06;
const REG_CLASS: u8 = 0x08;
const REG_HEADER_TYPE: u8 = 0x0e;
const REG_BAR0: u8 = 0x10;
const REG_CAPABILITIES: u8 = 0x34;

const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES: u16 = 1 << 4;

/// The 32-bit MMIO window of the ferrovirt address map (and inside the PCI hole of QEMU's
/// pc/q35 with little RAM), used when a BAR must be assigned.
const MMIO32_WINDOW: (u64, u64) = (0xc000_0000, 0xfec0_0000);

#[derive(Debug, Clone, Copy)]
pub enum PciError {
    /// No unassigned space left for a BAR.
    NoMmioSpace {
        bar: u8,
        size: u64,
    },
    BadCapabilityList,
}

impl fmt::Display for PciError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoMmioSpace { bar, size } => write!(
                f,
                "cannot place BAR{bar} ({size:#x} bytes) in the 32-bit MMIO window 0xc0000000..0xfec00000"
            ),
            Self::BadCapabilityList => write!(
                f,
                "the capability list loops or points outside config space"
            ),
        }
    }
}

/// Bus 0 device/function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciAddress {
    pub device: u8,
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00:{:02x}.{}", self.device, self.function)
    }
}

impl PciAddress {
    fn select(&self, offset: u8) {
        let address = 0x8000_0000
            | (u32::from(self.device) << 11)
            | (u32::from(self.function) << 8)
            | u32::from(offset & 0xfc);
        outl(CONFIG_ADDRESS, address);
    }

    pub fn read32(&self, offset: u8) -> u32 {
        self.select(offset);
        inl(CONFIG_DATA)
    }

    pub fn read16(&self, offset: u8) -> u16 {
        self.select(offset);
        inw(CONFIG_DATA + u16::from(offset & 2))
    }

    pub fn read8(&self, offset: u8) -> u8 {
        self.select(offset);
        inb(CONFIG_DATA + u16::from(offset & 3))
    }

    pub fn write32(&self, offset: u8, value: u32) {
        self.select(offset);
        outl(CONFIG_DATA, value);
    }

    pub fn write16(&self, offset: u8, value: u16) {
        self.select(offset);
        outw(CONFIG_DATA + u16::from(offset & 2), value);
    }

    #[allow(dead_code, reason = "config-space API completeness; drivers to come")]
    pub fn write8(&self, offset: u8, value: u8) {
        self.select(offset);
        outb(CONFIG_DATA + u16::from(offset & 3), value);
    }
}

/// A present function on bus 0.
#[derive(Clone, Copy, Debug)]
pub struct PciDevice {
    pub address: PciAddress,
    pub vendor: u16,
    pub device: u16,
    /// Class, subclass, programming interface.
    pub class: u32,
    pub header_type: u8,
}

/// Most functions listed on bus 0.
pub const MAX_DEVICES: usize = 64;

/// The functions found on bus 0.
pub struct DeviceList {
    devices: [Option<PciDevice>; MAX_DEVICES],
    len: usize,
}

impl DeviceList {
    pub fn iter(&self) -> impl Iterator<Item = &PciDevice> {
        self.devices[..self.len].iter().flatten()
    }

    pub fn find(&self, vendor: u16, device: u16) -> Option<PciDevice> {
        self.iter()
            .find(|d| d.vendor == vendor && d.device == device)
            .copied()
    }

    fn push(&mut self, dev: PciDevice) {
        if self.len < MAX_DEVICES {
            self.devices[self.len] = Some(dev);
            self.len += 1;
        }
    }
}

fn probe(address: PciAddress) -> Option<PciDevice> {
    let id = address.read32(REG_VENDOR_DEVICE);
    let vendor = id as u16;
    if vendor == 0xffff || vendor == 0 {
        return None;
    }
    let class_rev = address.read32(REG_CLASS);
    Some(PciDevice {
        address,
        vendor,
        device: (id >> 16) as u16,
        class: class_rev >> 8,
        header_type: address.read8(REG_HEADER_TYPE),
    })
}

/// Lists the functions on bus 0 (functions 1..7 only for multi-function devices).
pub fn enumerate_bus0() -> DeviceList {
    let mut list = DeviceList {
        devices: [None; MAX_DEVICES],
        len: 0,
    };
    for device in 0..32 {
        let Some(dev) = probe(PciAddress {
            device,
            function: 0,
        }) else {
            continue;
        };
        list.push(dev);
        if dev.header_type & 0x80 != 0 {
            for function in 1..8 {
                if let Some(f) = probe(PciAddress { device, function }) {
                    list.push(f);
                }
            }
        }
    }
    list
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    Mem64,
}

/// A sized BAR.
#[derive(Clone, Copy, Debug)]
pub struct Bar {
    pub index: u8,
    pub kind: BarKind,
    /// Bus address (0 when unassigned).
    pub addr: u64,
    pub size: u64,
}

/// Bump allocator for BARs in the 32-bit MMIO window that avoids the BARs already there.
pub struct MmioAllocator {
    next: u64,
    taken: [(u64, u64); 32],
    taken_len: usize,
}

impl MmioAllocator {
    /// Records every assigned memory BAR below 4 GiB on bus 0 (sizing them) so new
    /// assignments do not overlap.
    pub fn avoiding(devices: &DeviceList) -> Self {
        let mut alloc = Self {
            next: MMIO32_WINDOW.0,
            taken: [(0, 0); 32],
            taken_len: 0,
        };
        for dev in devices.iter().filter(|d| d.header_type & 0x7f == 0) {
            for bar in dev.bars().iter().flatten() {
                if bar.kind != BarKind::Io && bar.addr != 0 && alloc.taken_len < alloc.taken.len() {
                    alloc.taken[alloc.taken_len] = (bar.addr, bar.addr + bar.size);
                    alloc.taken_len += 1;
                }
            }
        }
        alloc
    }

    /// A naturally aligned range of `size` bytes (a power of two).
    fn alloc(&mut self, size: u64) -> Option<u64> {
        let mut at = self.next.next_multiple_of(size);
        'retry: loop {
            if at + size > MMIO32_WINDOW.1 {
                return None;
            }
            for &(start, end) in &self.taken[..self.taken_len] {
                if at < end && start < at + size {
                    at = end.next_multiple_of(size);
                    continue 'retry;
                }
            }
            self.next = at + size;
            return Some(at);
        }
    }
}

impl PciDevice {
    pub fn command(&self) -> u16 {
        self.address.read16(REG_COMMAND)
    }

    /// Enables memory decoding and bus mastering (DMA and MSI writes), disables INTx.
    pub fn enable_memory_and_bus_master(&self) {
        let cmd = self.command();
        self.address.write16(
            REG_COMMAND,
            cmd | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE,
        );
    }

    /// Reads and sizes the six BARs of a type-0 header. Memory decoding is off while a BAR
    /// holds all-ones, then the command register is restored.
    pub fn bars(&self) -> [Option<Bar>; 6] {
        let mut bars = [None; 6];
        let cmd = self.command();
        self.address
            .write16(REG_COMMAND, cmd & !(COMMAND_MEMORY | 1));
        let mut index = 0u8;
        while index < 6 {
            let reg = REG_BAR0 + index * 4;
            let low = self.address.read32(reg);
            self.address.write32(reg, 0xffff_ffff);
            let low_mask = self.address.read32(reg);
            self.address.write32(reg, low);
            if low_mask == 0 {
                index += 1;
                continue;
            }
            let bar = if low & 1 != 0 {
                let mask = low_mask & 0xffff_fffc;
                Bar {
                    index,
                    kind: BarKind::Io,
                    addr: u64::from(low & 0xffff_fffc),
                    size: u64::from((!mask).wrapping_add(1) & 0xffff),
                }
            } else if (low >> 1) & 3 == 2 && index < 5 {
                let high_reg = reg + 4;
                let high = self.address.read32(high_reg);
                self.address.write32(high_reg, 0xffff_ffff);
                let high_mask = self.address.read32(high_reg);
                self.address.write32(high_reg, high);
                let mask = (u64::from(high_mask) << 32) | u64::from(low_mask & 0xffff_fff0);
                Bar {
                    index,
                    kind: BarKind::Mem64,
                    addr: (u64::from(high) << 32) | u64::from(low & 0xffff_fff0),
                    size: (!mask).wrapping_add(1),
                }
            } else {
                let mask = low_mask & 0xffff_fff0;
                Bar {
                    index,
                    kind: BarKind::Mem32,
                    addr: u64::from(low & 0xffff_fff0),
                    size: u64::from((!mask).wrapping_add(1)),
                }
            };
            bars[usize::from(index)] = Some(bar);
            index += if bar.kind == BarKind::Mem64 { 2 } else { 1 };
        }
        self.address.write16(REG_COMMAND, cmd);
        bars
    }

    /// Sizes the BARs and gives every memory BAR that is unassigned, or above the 4 GiB
    /// identity map, an address in the 32-bit MMIO window. Returns the final BARs.
    pub fn assign_memory_bars(
        &self,
        alloc: &mut MmioAllocator,
    ) -> Result<[Option<Bar>; 6], PciError> {
        let mut bars = self.bars();
        let cmd = self.command();
        for bar in bars.iter_mut().flatten() {
            let usable = bar.addr != 0 && phys::is_mapped(bar.addr, bar.size);
            if bar.kind == BarKind::Io || usable || bar.size == 0 || !bar.size.is_power_of_two() {
                continue;
            }
            let addr = alloc
                .alloc(bar.size.max(4096))
                .ok_or(PciError::NoMmioSpace {
                    bar: bar.index,
                    size: bar.size,
                })?;
            self.address.write16(REG_COMMAND, cmd & !COMMAND_MEMORY);
            let reg = REG_BAR0 + bar.index * 4;
            let flags = self.address.read32(reg) & 0xf;
            self.address.write32(reg, addr as u32 | flags);
            if bar.kind == BarKind::Mem64 {
                self.address.write32(reg + 4, 0);
            }
            self.address.write16(REG_COMMAND, cmd);
            bar.addr = addr;
        }
        Ok(bars)
    }

    /// Offsets of capabilities with ID `id`, in list order, passed to `f` until it
    /// returns `Some`.
    pub fn find_capability<T>(
        &self,
        id: u8,
        mut f: impl FnMut(u8) -> Option<T>,
    ) -> Result<Option<T>, PciError> {
        if self.address.read16(REG_STATUS) & STATUS_CAPABILITIES == 0 {
            return Ok(None);
        }
        let mut ptr = self.address.read8(REG_CAPABILITIES) & 0xfc;
        // A config space has room for at most 48 capabilities.
        for _ in 0..48 {
            if ptr == 0 {
                return Ok(None);
            }
            if ptr < 0x40 {
                return Err(PciError::BadCapabilityList);
            }
            let header = self.address.read16(ptr);
            if header as u8 == id
                && let Some(found) = f(ptr)
            {
                return Ok(Some(found));
            }
            ptr = (header >> 8) as u8 & 0xfc;
        }
        Err(PciError::BadCapabilityList)
    }
}
