//! The 256-byte configuration space of a type 0 (endpoint) PCI function.
//!
//! Each dword has a write mask: guest writes change only the masked bits, which gives
//! read-only IDs, BAR size probing (write all-ones, read back the size mask) and
//! capability fields that the guest may or may not change, without per-register code.

use super::PciError;

pub const NUM_BARS: usize = 6;
const NUM_REGS: usize = 64;
const COMMAND_REG: usize = 1;
const BAR0_REG: usize = 4;
const CAP_POINTER_OFFSET: usize = 0x34;
const FIRST_CAP_OFFSET: usize = 0x40;
/// Status register bit 4 (bit 20 of dword 1): the capabilities list is valid.
const STATUS_CAP_LIST: u32 = 1 << 20;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_PARITY: u16 = 1 << 6;
const COMMAND_SERR: u16 = 1 << 8;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const COMMAND_WRITABLE: u16 = COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE;

const BAR_MEM_64BIT: u32 = 0b10 << 1;
const BAR_MEM_PREFETCHABLE: u32 = 1 << 3;
const BAR_MEM_FLAGS: u32 = 0xf;

/// IDs and class of a function.
#[derive(Clone, Copy, Debug)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Base class, subclass and programming interface, as the 24-bit class code.
    pub class_code: u32,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Memory32,
    /// Takes two BAR slots: `index` and `index + 1` (upper 32 address bits).
    Memory64,
}

/// A memory BAR: what the device decodes, not where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBar {
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarSlot {
    Unused,
    Bar(PciBar),
    /// Upper half of the 64-bit BAR in the slot below.
    Upper,
}

pub struct PciConfiguration {
    regs: [u32; NUM_REGS],
    writable: [u32; NUM_REGS],
    bars: [BarSlot; NUM_BARS],
    /// Offset of the last capability, whose next pointer links a new one.
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfiguration {
    pub fn new(header: &PciHeader) -> PciConfiguration {
        let mut regs = [0u32; NUM_REGS];
        let mut writable = [0u32; NUM_REGS];
        regs[0] = u32::from(header.device_id) << 16 | u32::from(header.vendor_id);
        writable[COMMAND_REG] = u32::from(COMMAND_WRITABLE);
        regs[2] = (header.class_code & 0xff_ffff) << 8 | u32::from(header.revision);
        // Cache line size and latency timer are plain read/write scratch registers;
        // header type 0, single function.
        writable[3] = 0x0000_ffff;
        regs[11] = u32::from(header.subsystem_id) << 16 | u32::from(header.subsystem_vendor_id);
        // Interrupt line is scratch for the OS; interrupt pin 0: no INTx, MSI-X only.
        writable[15] = 0x0000_00ff;
        PciConfiguration {
            regs,
            writable,
            bars: [BarSlot::Unused; NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAP_OFFSET,
        }
    }

    /// Declares memory BAR `index` (address 0 until set).
    pub fn add_bar(&mut self, index: usize, bar: PciBar) -> Result<(), PciError> {
        let slots = match bar.kind {
            BarKind::Memory32 => 1,
            BarKind::Memory64 => 2,
        };
        if index + slots > NUM_BARS {
            return Err(PciError::InvalidBarIndex(index));
        }
        if self.bars[index..index + slots]
            .iter()
            .any(|s| *s != BarSlot::Unused)
        {
            return Err(PciError::BarInUse(index));
        }
        let too_big = bar.kind == BarKind::Memory32 && bar.size > 1 << 31;
        if !bar.size.is_power_of_two() || bar.size < 16 || too_big {
            return Err(PciError::InvalidBarSize(bar.size));
        }
        let mut flags = 0;
        if bar.kind == BarKind::Memory64 {
            flags |= BAR_MEM_64BIT;
        }
        if bar.prefetchable {
            flags |= BAR_MEM_PREFETCHABLE;
        }
        let mask = !(bar.size - 1);
        self.regs[BAR0_REG + index] = flags;
        self.writable[BAR0_REG + index] = (mask as u32) & !BAR_MEM_FLAGS;
        self.bars[index] = BarSlot::Bar(bar);
        if bar.kind == BarKind::Memory64 {
            self.regs[BAR0_REG + index + 1] = 0;
            self.writable[BAR0_REG + index + 1] = (mask >> 32) as u32;
            self.bars[index + 1] = BarSlot::Upper;
        }
        Ok(())
    }

    /// The BAR defined at `index`, if any (`None` for the upper half of a 64-bit BAR).
    pub fn bar(&self, index: usize) -> Option<PciBar> {
        match self.bars.get(index) {
            Some(BarSlot::Bar(bar)) => Some(*bar),
            _ => None,
        }
    }

    /// Indices and definitions of all BARs.
    pub fn bars(&self) -> impl Iterator<Item = (usize, PciBar)> + '_ {
        (0..NUM_BARS).filter_map(|i| self.bar(i).map(|b| (i, b)))
    }

    /// The address programmed into BAR `index`.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let low = u64::from(self.regs[BAR0_REG + index] & !BAR_MEM_FLAGS);
        Some(match bar.kind {
            BarKind::Memory32 => low,
            BarKind::Memory64 => u64::from(self.regs[BAR0_REG + index + 1]) << 32 | low,
        })
    }

    /// Programs BAR `index` as firmware would.
    pub fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        let bar = self.bar(index).ok_or(PciError::InvalidBarIndex(index))?;
        let misaligned = addr & (bar.size - 1) != 0;
        let too_high = bar.kind == BarKind::Memory32 && addr > u64::from(u32::MAX);
        if misaligned || too_high {
            return Err(PciError::InvalidBarAddress { bar: index, addr });
        }
        let reg = BAR0_REG + index;
        self.regs[reg] = (self.regs[reg] & BAR_MEM_FLAGS) | addr as u32;
        if bar.kind == BarKind::Memory64 {
            self.regs[reg + 1] = (addr >> 32) as u32;
        }
        Ok(())
    }

    pub fn command(&self) -> u16 {
        self.regs[COMMAND_REG] as u16
    }

    pub fn set_command(&mut self, command: u16) {
        let reg = &mut self.regs[COMMAND_REG];
        *reg = (*reg & 0xffff_0000) | u32::from(command & COMMAND_WRITABLE);
    }

    /// Where each BAR is decoded right now: its address while memory decoding is on and
    /// the address is neither 0 nor wrapping past the end of the address space.
    pub fn decoded_bars(&self) -> [Option<u64>; NUM_BARS] {
        let mut out = [None; NUM_BARS];
        if self.command() & COMMAND_MEMORY == 0 {
            return out;
        }
        for (index, bar) in self.bars() {
            let Some(addr) = self.bar_address(index) else {
                continue;
            };
            if addr != 0 && addr.checked_add(bar.size).is_some() {
                out[index] = Some(addr);
            }
        }
        out
    }

    /// Appends a capability. `body` starts with the capability ID; its second byte (the
    /// next pointer) is filled in here. Returns the capability's offset.
    pub fn add_capability(&mut self, body: &[u8]) -> Result<usize, PciError> {
        if body.len() < 2 {
            return Err(PciError::CapabilityTooShort);
        }
        let offset = self.next_cap;
        let end = offset + body.len();
        if end > NUM_REGS * 4 {
            return Err(PciError::CapabilitySpaceFull(body.len()));
        }
        for (i, b) in body.iter().enumerate() {
            self.set_byte(offset + i, *b);
        }
        self.set_byte(offset + 1, 0);
        match self.last_cap {
            Some(last) => self.set_byte(last + 1, offset as u8),
            None => {
                self.set_byte(CAP_POINTER_OFFSET, offset as u8);
                self.regs[COMMAND_REG] |= STATUS_CAP_LIST;
            }
        }
        self.last_cap = Some(offset);
        // Capabilities start dword-aligned (PCI 3.0 §6.7).
        self.next_cap = end.next_multiple_of(4);
        Ok(offset)
    }

    /// Lets the guest change the bits of `mask` in the bytes starting at `offset`.
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        for (i, m) in mask.iter().enumerate() {
            let at = offset + i;
            if let Some(reg) = self.writable.get_mut(at / 4) {
                let shift = (at % 4) * 8;
                *reg = (*reg & !(0xff << shift)) | u32::from(*m) << shift;
            }
        }
    }

    /// Dword `reg`; all-ones beyond the 256-byte space.
    pub fn read_register(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(u32::MAX)
    }

    /// Reads `data.len()` bytes at byte `offset`; zeros past the end.
    pub fn read_bytes(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.byte(offset + i).unwrap_or(0);
        }
    }

    /// Applies a guest write of `data` at byte `offset` of dword `reg`, keeping the
    /// read-only bits. Writes that do not fit the dword are ignored.
    pub fn write_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let fits = reg < NUM_REGS
            && !data.is_empty()
            && offset
                .checked_add(data.len() as u64)
                .is_some_and(|end| end <= 4);
        if !fits {
            tracing::debug!(
                reg,
                offset,
                len = data.len(),
                "ignoring bad PCI config write"
            );
            return;
        }
        let mut value = 0u32;
        let mut mask = 0u32;
        for (i, b) in data.iter().enumerate() {
            let shift = (offset as usize + i) * 8;
            value |= u32::from(*b) << shift;
            mask |= 0xff << shift;
        }
        let mask = mask & self.writable[reg];
        self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
    }

    fn byte(&self, offset: usize) -> Option<u8> {
        let reg = self.regs.get(offset / 4)?;
        Some((reg >> ((offset % 4) * 8)) as u8)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        if let Some(reg) = self.regs.get_mut(offset / 4) {
            let shift = (offset % 4) * 8;
            *reg = (*reg & !(0xff << shift)) | u32::from(value) << shift;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            revision: 1,
            class_code: 0xff_0000,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    fn write32(c: &mut PciConfiguration, reg: usize, v: u32) {
        c.write_register(reg, 0, &v.to_le_bytes());
    }

    #[test]
    fn ids_are_read_only() {
        let mut c = PciConfiguration::new(&header());
        write32(&mut c, 0, 0xdead_beef);
        write32(&mut c, 2, 0);
        assert_eq!(c.read_register(0), 0x1044_1af4);
        assert_eq!(c.read_register(2), 0xff00_0001);
        assert_eq!(c.read_register(11), 0x0040_1af4);
    }

    #[test]
    fn bar_sizing_reports_the_size_mask_and_keeps_the_flags() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(
            0,
            PciBar {
                size: 0x8000,
                kind: BarKind::Memory32,
                prefetchable: false,
            },
        )
        .unwrap();
        c.add_bar(
            2,
            PciBar {
                size: 1 << 33,
                kind: BarKind::Memory64,
                prefetchable: true,
            },
        )
        .unwrap();
        for reg in 4..8 {
            write32(&mut c, reg, u32::MAX);
        }
        assert_eq!(c.read_register(4), 0xffff_8000);
        assert_eq!(
            c.read_register(6),
            0x0000_000c,
            "64-bit prefetchable, 8 GiB"
        );
        assert_eq!(c.read_register(7), 0xffff_fffe);
        write32(&mut c, 6, 0);
        write32(&mut c, 7, 0x4);
        assert_eq!(c.bar_address(2), Some(0x4_0000_0000));
        assert_eq!(c.bar(3), None, "the upper half is not a BAR of its own");
    }

    #[test]
    fn bad_bar_definitions_are_refused() {
        let mut c = PciConfiguration::new(&header());
        let bar = |size, kind| PciBar {
            size,
            kind,
            prefetchable: false,
        };
        assert!(matches!(
            c.add_bar(5, bar(0x1000, BarKind::Memory64)),
            Err(PciError::InvalidBarIndex(5))
        ));
        assert!(matches!(
            c.add_bar(0, bar(0x1800, BarKind::Memory32)),
            Err(PciError::InvalidBarSize(_))
        ));
        assert!(matches!(
            c.add_bar(0, bar(1 << 32, BarKind::Memory32)),
            Err(PciError::InvalidBarSize(_))
        ));
        c.add_bar(0, bar(0x1000, BarKind::Memory64)).unwrap();
        assert!(matches!(
            c.add_bar(1, bar(0x1000, BarKind::Memory32)),
            Err(PciError::BarInUse(1))
        ));
        assert!(c.set_bar_address(0, 0x1800).is_err());
    }

    #[test]
    fn capabilities_are_linked_in_order() {
        let mut c = PciConfiguration::new(&header());
        let a = c.add_capability(&[0x09, 0xaa, 5, 1, 2]).unwrap();
        let b = c.add_capability(&[0x11, 0xbb, 0, 0]).unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_ne!(c.read_register(1) & STATUS_CAP_LIST, 0);
        let mut ptr = [0u8; 1];
        c.read_bytes(CAP_POINTER_OFFSET, &mut ptr);
        assert_eq!(ptr[0], 0x40);
        let mut cap = [0u8; 2];
        c.read_bytes(a, &mut cap);
        assert_eq!(cap, [0x09, 0x48]);
        c.read_bytes(b, &mut cap);
        assert_eq!(cap, [0x11, 0]);
        assert!(matches!(
            c.add_capability(&[0u8; 200]),
            Err(PciError::CapabilitySpaceFull(200))
        ));
    }

    #[test]
    fn writes_that_do_not_fit_a_dword_are_ignored() {
        let mut c = PciConfiguration::new(&header());
        c.write_register(1, 3, &[0xff, 0xff]);
        c.write_register(64, 0, &[0xff]);
        c.write_register(1, u64::MAX, &[0xff]);
        c.write_register(1, 0, &[]);
        assert_eq!(c.command(), 0);
        assert_eq!(c.read_register(64), u32::MAX);
        c.write_register(1, 0, &[0xff, 0xff]);
        assert_eq!(c.command(), COMMAND_WRITABLE);
    }
}
