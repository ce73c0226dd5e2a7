//! PCI bus 0: the host bridge at 00:00.0, device slots 1..=31, configuration mechanism #1
//! and BAR placement on the MMIO bus.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};

use super::{
    AddressAllocator, COMMAND_MEMORY, NUM_BARS, PciBdf, PciConfiguration, PciDevice, PciError,
    PciHeader,
};
use crate::devices::bus::{Bus, BusDevice};
use crate::layout::{MMIO32_SIZE, MMIO32_START};

const NUM_SLOTS: usize = 32;
const CONFIG_ENABLE: u32 = 1 << 31;
/// Data port offset of mechanism #1 inside the 0xCF8..0xD00 range.
const CONFIG_DATA: u64 = 4;

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

fn lock_device(device: &SharedPciDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    // A device that panicked mid-access is no worse off than one the guest misprogrammed.
    device.lock().unwrap_or_else(|e| e.into_inner())
}

/// The host bridge: IDs and class only, no BARs.
pub struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    pub fn new() -> HostBridge {
        HostBridge {
            config: PciConfiguration::new(&PciHeader {
                // Intel's ID for a host bridge, as other VMMs expose; guests treat any
                // class 06/00 function at 00:00.0 the same way.
                vendor_id: 0x8086,
                device_id: 0x0d57,
                revision: 0,
                class_code: 0x06_00_00,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        tracing::debug!(bar, offset, "host bridge has no BARs");
        data.fill(0xff);
    }
    fn write_bar(&mut self, bar: usize, offset: u64, _data: &[u8]) {
        tracing::debug!(bar, offset, "host bridge has no BARs");
    }
}

/// One BAR of one device, as it sits on the MMIO bus.
struct BarRegion {
    device: SharedPciDevice,
    bar: usize,
}

impl BusDevice for BarRegion {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        lock_device(&self.device).read_bar(self.bar, offset, data);
    }
    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        lock_device(&self.device).write_bar(self.bar, offset, data);
    }
}

struct Slot {
    device: SharedPciDevice,
    /// Where each BAR sits on the MMIO bus now (and its ioeventfds with KVM).
    mapped: [Option<u64>; NUM_BARS],
}

struct RootState {
    slots: Vec<Option<Slot>>,
    mmio32: AddressAllocator,
}

/// Bus 0 of the VM.
pub struct PciRoot {
    mmio_bus: Arc<Bus>,
    vm: Arc<VmFd>,
    state: Mutex<RootState>,
}

impl PciRoot {
    /// Bus 0 with the host bridge at 00:00.0; BARs go on `mmio_bus`, ioeventfds to `vm`.
    pub fn new(mmio_bus: Arc<Bus>, vm: Arc<VmFd>) -> Arc<PciRoot> {
        let mut slots: Vec<Option<Slot>> = (0..NUM_SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            device: Arc::new(Mutex::new(HostBridge::new())),
            mapped: [None; NUM_BARS],
        });
        Arc::new(PciRoot {
            mmio_bus,
            vm,
            state: Mutex::new(RootState {
                slots,
                mmio32: AddressAllocator::new(MMIO32_START, MMIO32_SIZE),
            }),
        })
    }

    /// The VM this bus registers ioeventfds with.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Mechanism #1, to put on the port I/O bus at 0xCF8 with length 8.
    pub fn config_io(self: &Arc<Self>) -> Arc<PciConfigIo> {
        Arc::new(PciConfigIo {
            root: self.clone(),
            address: AtomicU32::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, RootState> {
        // Slot changes are single assignments; a poisoned lock holds consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Plugs `device` into the lowest free slot. As firmware would, gives each BAR an
    /// address in the 32-bit window (naturally aligned) and turns memory decoding on.
    pub fn add_device(&self, device: SharedPciDevice) -> Result<PciBdf, PciError> {
        let mut state = self.lock();
        let slot = (1..NUM_SLOTS)
            .find(|s| state.slots[*s].is_none())
            .ok_or(PciError::NoFreeSlot)?;
        let mut allocated = Vec::new();
        let placed = {
            let mut dev = lock_device(&device);
            let bars: Vec<_> = dev.config().bars().collect();
            let mut result = Ok(());
            for (index, bar) in bars {
                // 64-bit BARs also go below 4 GiB for now: every guest accepts that.
                let Some(addr) = state.mmio32.allocate(bar.size, bar.size) else {
                    result = Err(PciError::Mmio32Exhausted(bar.size));
                    break;
                };
                allocated.push(addr);
                if let Err(e) = dev.config_mut().set_bar_address(index, addr) {
                    result = Err(e);
                    break;
                }
            }
            if result.is_ok() {
                let command = dev.config().command() | COMMAND_MEMORY;
                dev.config_mut().set_command(command);
            }
            result
        };
        if let Err(e) = placed {
            for addr in allocated {
                state.mmio32.free(addr);
            }
            return Err(e);
        }
        state.slots[slot] = Some(Slot {
            device,
            mapped: [None; NUM_BARS],
        });
        let RootState { slots, mmio32 } = &mut *state;
        if let Some(s) = slots[slot].as_mut() {
            self.update_mappings(s, mmio32);
        }
        Ok(PciBdf {
            bus: 0,
            device: slot as u8,
            function: 0,
        })
    }

    /// Where BAR `bar` of the device in `slot` is decoded now.
    pub fn bar_address(&self, slot: u8, bar: usize) -> Option<u64> {
        let state = self.lock();
        let s = state.slots.get(usize::from(slot))?.as_ref()?;
        *s.mapped.get(bar)?
    }

    /// Reads dword `reg` of bus 0, device `slot`, function 0; all-ones if absent.
    pub fn read_config(&self, slot: u8, reg: usize) -> u32 {
        let device = {
            let state = self.lock();
            match state.slots.get(usize::from(slot)) {
                Some(Some(s)) => s.device.clone(),
                _ => return u32::MAX,
            }
        };
        lock_device(&device).read_config_register(reg)
    }

    /// Writes configuration space of bus 0, device `slot`, function 0, then follows any
    /// change of BAR address or memory decoding on the MMIO bus.
    pub fn write_config(&self, slot: u8, reg: usize, offset: u64, data: &[u8]) {
        // The root lock serialises configuration writes, so BAR moves of one device
        // cannot interleave.
        let mut state = self.lock();
        let RootState { slots, mmio32 } = &mut *state;
        let Some(Some(s)) = slots.get_mut(usize::from(slot)) else {
            tracing::debug!(slot, reg, "config write to an empty slot");
            return;
        };
        lock_device(&s.device).write_config_register(reg, offset, data);
        self.update_mappings(s, mmio32);
    }

    /// Brings the MMIO bus and KVM's ioeventfds in line with the device's BAR registers,
    /// and keeps the window allocator in step with where the guest puts BARs so that
    /// ranges handed out later (hotplug) avoid them. That tracking is best effort: a
    /// range outside the window, or over an allocation that is not mapped, is not tracked.
    fn update_mappings(&self, slot: &mut Slot, mmio32: &mut AddressAllocator) {
        let mut dev = lock_device(&slot.device);
        let wanted = dev.config().decoded_bars();
        for (bar, wanted) in wanted.into_iter().enumerate() {
            let old = slot.mapped[bar];
            if wanted == old {
                continue;
            }
            let Some(size) = dev.config().bar(bar).map(|b| b.size) else {
                continue;
            };
            if let Some(addr) = old {
                self.unregister_ioeventfds(&*dev, bar, addr);
            }
            let new = self.move_on_bus(&slot.device, bar, size, old, wanted);
            if let Some(addr) = new {
                self.register_ioeventfds(&*dev, bar, addr);
            }
            if let Some(addr) = old {
                mmio32.free(addr);
            }
            if let Some(addr) = new {
                // Fails harmlessly for the range `add_device` allocated itself.
                mmio32.reserve(addr, size);
            }
            slot.mapped[bar] = new;
            tracing::debug!(bar, ?old, ?new, "BAR moved");
            dev.bar_moved(bar, old, new);
        }
    }

    /// Moves (or adds, or removes) one BAR range; returns where it ended up.
    fn move_on_bus(
        &self,
        device: &SharedPciDevice,
        bar: usize,
        size: u64,
        old: Option<u64>,
        new: Option<u64>,
    ) -> Option<u64> {
        let result = match (old, new) {
            (Some(o), Some(n)) => self.mmio_bus.relocate(o, n).inspect_err(|_| {
                // The guest believes the BAR moved; leaving it at the old address would
                // answer accesses the guest no longer aims at this device.
                let _ = self.mmio_bus.remove(o);
            }),
            (Some(o), None) => self.mmio_bus.remove(o).map(|_| ()),
            (None, Some(n)) => self.mmio_bus.insert(
                n,
                size,
                Arc::new(BarRegion {
                    device: device.clone(),
                    bar,
                }),
            ),
            (None, None) => Ok(()),
        };
        match result {
            Ok(()) => new,
            Err(e) => {
                tracing::debug!(bar, ?new, "BAR left unmapped: {e}");
                None
            }
        }
    }

    fn register_ioeventfds(&self, dev: &dyn PciDevice, bar: usize, base: u64) {
        for (offset, evt) in dev.ioeventfds(bar) {
            let addr = IoEventAddress::Mmio(base + offset);
            if let Err(e) = self.vm.register_ioevent(evt, &addr, NoDatamatch) {
                // Writes still reach the device through the MMIO bus, only slower.
                tracing::warn!(addr = base + offset, "cannot register ioeventfd: {e}");
            }
        }
    }

    fn unregister_ioeventfds(&self, dev: &dyn PciDevice, bar: usize, base: u64) {
        for (offset, evt) in dev.ioeventfds(bar) {
            let addr = IoEventAddress::Mmio(base + offset);
            if let Err(e) = self.vm.unregister_ioevent(evt, &addr, NoDatamatch) {
                tracing::warn!(addr = base + offset, "cannot unregister ioeventfd: {e}");
            }
        }
    }
}

/// Configuration mechanism #1: the address register at 0xCF8 and the data window at
/// 0xCFC..0xD00.
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: AtomicU32,
}

impl PciConfigIo {
    /// Device slot and register selected by the address register, if it targets an
    /// existing function on bus 0.
    fn target(&self) -> Option<(u8, usize)> {
        let a = self.address.load(Ordering::Acquire);
        let bus = (a >> 16) & 0xff;
        let function = (a >> 8) & 0x7;
        if a & CONFIG_ENABLE == 0 || bus != 0 || function != 0 {
            return None;
        }
        Some((((a >> 11) & 0x1f) as u8, ((a >> 2) & 0x3f) as usize))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        if offset < CONFIG_DATA {
            let bytes = self.address.load(Ordering::Acquire).to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
            }
            return;
        }
        let byte = offset - CONFIG_DATA;
        data.fill(0xff);
        if byte + len > 4 {
            tracing::debug!(offset, len, "PCI config read crosses the data window");
            return;
        }
        if let Some((slot, reg)) = self.target() {
            let value = self.root.read_config(slot, reg).to_le_bytes();
            data.copy_from_slice(&value[byte as usize..(byte + len) as usize]);
        }
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if offset < CONFIG_DATA {
            // Only a dword write to 0xCF8 selects a register; byte writes to 0xCF8..0xCFB
            // are how guests probe for mechanism #1 and must leave it alone.
            if offset == 0 && data.len() == 4 {
                let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.address.store(value, Ordering::Release);
            }
            return;
        }
        let byte = offset - CONFIG_DATA;
        if byte + len > 4 {
            tracing::debug!(offset, len, "PCI config write crosses the data window");
            return;
        }
        if let Some((slot, reg)) = self.target() {
            self.root.write_config(slot, reg, byte, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::*;
    use crate::devices::pci::testing::TestVm;
    use crate::devices::pci::{BarKind, PciBar};
    use crate::layout::PCI_CONFIG_ADDRESS_PORT;

    const NOTIFY_OFFSET: u64 = 0x10;

    /// A device with a 32-bit BAR 0 (4 KiB, one ioeventfd) and a 64-bit BAR 2 (64 KiB)
    /// that records BAR accesses and moves.
    struct Probe {
        config: PciConfiguration,
        evt: EventFd,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Probe {
        fn new() -> (Probe, Arc<Mutex<Vec<String>>>) {
            let mut config = PciConfiguration::new(&PciHeader {
                vendor_id: 0x1234,
                device_id: 0x5678,
                revision: 0,
                class_code: 0xff_0000,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            });
            let bar = |size, kind| PciBar {
                size,
                kind,
                prefetchable: false,
            };
            config.add_bar(0, bar(0x1000, BarKind::Memory32)).unwrap();
            config.add_bar(2, bar(0x1_0000, BarKind::Memory64)).unwrap();
            let log = Arc::new(Mutex::new(Vec::new()));
            let probe = Probe {
                config,
                evt: EventFd::new(EFD_NONBLOCK).unwrap(),
                log: log.clone(),
            };
            (probe, log)
        }
    }

    impl PciDevice for Probe {
        fn config(&self) -> &PciConfiguration {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfiguration {
            &mut self.config
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar as u8 + offset as u8);
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .push(format!("write {bar} {offset:#x} {data:?}"));
        }
        fn ioeventfds(&self, bar: usize) -> Vec<(u64, &EventFd)> {
            if bar == 0 {
                vec![(NOTIFY_OFFSET, &self.evt)]
            } else {
                Vec::new()
            }
        }
        fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
            self.log
                .lock()
                .unwrap()
                .push(format!("moved {bar} {old:x?} {new:x?}"));
        }
    }

    struct Fixture {
        vm: TestVm,
        root: Arc<PciRoot>,
        mmio: Arc<Bus>,
        pio: Bus,
    }

    impl Fixture {
        fn new() -> Fixture {
            let vm = TestVm::new();
            let mmio = Arc::new(Bus::new());
            let root = PciRoot::new(mmio.clone(), vm.vm.clone());
            let pio = Bus::new();
            pio.insert(u64::from(PCI_CONFIG_ADDRESS_PORT), 8, root.config_io())
                .unwrap();
            Fixture {
                vm,
                root,
                mmio,
                pio,
            }
        }

        fn select(&self, slot: u8, reg: usize) {
            let addr = CONFIG_ENABLE | u32::from(slot) << 11 | (reg as u32) << 2;
            self.pio.write(0xcf8, &addr.to_le_bytes());
        }

        fn read(&self, slot: u8, reg: usize) -> u32 {
            self.select(slot, reg);
            let mut v = [0u8; 4];
            self.pio.read(0xcfc, &mut v);
            u32::from_le_bytes(v)
        }

        fn write(&self, slot: u8, reg: usize, value: u32) {
            self.select(slot, reg);
            self.pio.write(0xcfc, &value.to_le_bytes());
        }

        /// Whether KVM already has a wildcard ioeventfd at `addr`: registering a second
        /// one there collides (EEXIST).
        fn ioeventfd_at(&self, addr: u64) -> bool {
            let other = EventFd::new(EFD_NONBLOCK).unwrap();
            let at = IoEventAddress::Mmio(addr);
            match self.vm.vm.register_ioevent(&other, &at, NoDatamatch) {
                Ok(()) => {
                    self.vm
                        .vm
                        .unregister_ioevent(&other, &at, NoDatamatch)
                        .unwrap();
                    false
                }
                Err(e) => {
                    assert_eq!(e.errno(), libc::EEXIST);
                    true
                }
            }
        }
    }

    #[test]
    fn host_bridge_answers_at_00_00_0_and_empty_slots_read_all_ones() {
        let f = Fixture::new();
        assert_eq!(f.read(0, 0), 0x0d57_8086);
        assert_eq!(f.read(0, 2) >> 8, 0x06_00_00);
        assert_eq!(f.read(1, 0), u32::MAX);
        // Function 1 and bus 1 do not exist.
        f.pio.write(0xcf8, &(CONFIG_ENABLE | 1 << 8).to_le_bytes());
        let mut v = [0u8; 4];
        f.pio.read(0xcfc, &mut v);
        assert_eq!(v, [0xff; 4]);
        f.pio.write(0xcf8, &(CONFIG_ENABLE | 1 << 16).to_le_bytes());
        f.pio.read(0xcfc, &mut v);
        assert_eq!(v, [0xff; 4]);
        // Without the enable bit nothing is selected.
        f.pio.write(0xcf8, &0u32.to_le_bytes());
        f.pio.read(0xcfc, &mut v);
        assert_eq!(v, [0xff; 4]);
    }

    #[test]
    fn byte_and_word_accesses_reach_the_right_bytes() {
        let f = Fixture::new();
        f.select(0, 0);
        let mut w = [0u8; 2];
        f.pio.read(0xcfe, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0d57);
        let mut b = [0u8; 1];
        f.pio.read(0xcfd, &mut b);
        assert_eq!(b[0], 0x80);
        // Linux's mechanism #1 probe: a byte write to 0xCFB leaves the address alone.
        f.pio.write(0xcfb, &[1]);
        let mut a = [0u8; 4];
        f.pio.read(0xcf8, &mut a);
        assert_eq!(u32::from_le_bytes(a), CONFIG_ENABLE);
    }

    #[test]
    fn devices_get_aligned_bars_in_the_32bit_window_with_decoding_on() {
        let f = Fixture::new();
        let (probe, _) = Probe::new();
        let bdf = f.root.add_device(Arc::new(Mutex::new(probe))).unwrap();
        assert_eq!(bdf.to_string(), "0000:00:01.0");
        let bar0 = f.root.bar_address(1, 0).unwrap();
        let bar2 = f.root.bar_address(1, 2).unwrap();
        for (addr, size) in [(bar0, 0x1000), (bar2, 0x1_0000)] {
            assert!((MMIO32_START..MMIO32_START + MMIO32_SIZE).contains(&addr));
            assert_eq!(addr % size, 0);
        }
        assert_eq!(u64::from(f.read(1, 4)), bar0);
        assert_eq!(f.read(1, 6) & 0xf, 0b0100, "64-bit memory BAR");
        assert_ne!(f.read(1, 1) & u32::from(COMMAND_MEMORY), 0);
        let mut v = [0u8; 1];
        assert!(f.mmio.read(bar2 + 3, &mut v));
        assert_eq!(v[0], 5);
        assert!(f.ioeventfd_at(bar0 + NOTIFY_OFFSET));
    }

    #[test]
    fn bar_sizing_through_cf8_cfc_reports_size_and_restores() {
        let f = Fixture::new();
        let (probe, _) = Probe::new();
        f.root.add_device(Arc::new(Mutex::new(probe))).unwrap();
        let bar0 = f.read(1, 4);
        // Linux turns decoding off while it sizes.
        f.write(1, 1, 0);
        f.write(1, 4, u32::MAX);
        assert_eq!(f.read(1, 4), 0xffff_f000);
        f.write(1, 6, u32::MAX);
        f.write(1, 7, u32::MAX);
        assert_eq!(f.read(1, 6), 0xffff_0004);
        assert_eq!(f.read(1, 7), u32::MAX);
        assert_eq!(f.root.bar_address(1, 0), None, "not decoded while sizing");
        f.write(1, 4, bar0);
        f.write(1, 6, 0xc100_0000);
        f.write(1, 7, 0);
        f.write(1, 1, u32::from(COMMAND_MEMORY));
        assert_eq!(f.root.bar_address(1, 0), Some(u64::from(bar0)));
        assert_eq!(f.root.bar_address(1, 2), Some(0xc100_0000));
    }

    #[test]
    fn moving_a_bar_moves_its_bus_range_and_ioeventfds() {
        let f = Fixture::new();
        let (probe, log) = Probe::new();
        f.root.add_device(Arc::new(Mutex::new(probe))).unwrap();
        let old = f.root.bar_address(1, 0).unwrap();
        let new = 0xd000_0000;
        f.write(1, 4, new as u32);
        assert_eq!(f.root.bar_address(1, 0), Some(new));
        assert!(f.mmio.write(new + 8, &[9]));
        assert!(!f.mmio.write(old + 8, &[9]), "the old range must be gone");
        assert!(f.ioeventfd_at(new + NOTIFY_OFFSET));
        assert!(!f.ioeventfd_at(old + NOTIFY_OFFSET));
        let log = log.lock().unwrap();
        assert!(log.contains(&format!("moved 0 Some({old:x}) Some({new:x})")));
        assert!(log.contains(&"write 0 0x8 [9]".to_string()));

        // A 64-bit BAR may move above 4 GiB.
        drop(log);
        f.write(1, 7, 0x10);
        assert_eq!(f.root.bar_address(1, 2).map(|a| a >> 32), Some(0x10));
    }

    #[test]
    fn turning_memory_decoding_off_unmaps_every_bar() {
        let f = Fixture::new();
        let (probe, _) = Probe::new();
        f.root.add_device(Arc::new(Mutex::new(probe))).unwrap();
        let bar0 = f.root.bar_address(1, 0).unwrap();
        f.write(1, 1, 0);
        assert!(!f.mmio.write(bar0, &[1]));
        assert!(!f.ioeventfd_at(bar0 + NOTIFY_OFFSET));
        f.write(1, 1, u32::from(COMMAND_MEMORY));
        assert!(f.mmio.write(bar0, &[1]));
        assert!(f.ioeventfd_at(bar0 + NOTIFY_OFFSET));
    }

    #[test]
    fn a_bar_moved_onto_another_device_stays_unmapped() {
        let f = Fixture::new();
        let (a, _) = Probe::new();
        let (b, _) = Probe::new();
        f.root.add_device(Arc::new(Mutex::new(a))).unwrap();
        f.root.add_device(Arc::new(Mutex::new(b))).unwrap();
        let a0 = f.root.bar_address(1, 0).unwrap();
        f.write(2, 4, a0 as u32);
        assert_eq!(f.root.bar_address(2, 0), None);
        let mut v = [0u8; 1];
        f.mmio.read(a0 + 1, &mut v);
        assert_eq!(v[0], 1, "device 1 keeps its range");
    }

    #[test]
    fn hostile_config_accesses_are_ignored() {
        let f = Fixture::new();
        let (probe, _) = Probe::new();
        f.root.add_device(Arc::new(Mutex::new(probe))).unwrap();
        f.select(1, 0);
        f.pio.write(0xcfe, &[1, 2, 3, 4]);
        f.pio.write(0xcfd, &[0; 8]);
        let mut big = [0u8; 8];
        f.pio.read(0xcfc, &mut big);
        f.write(1, 0, 0);
        assert_eq!(f.read(1, 0), 0x5678_1234);
        f.write(1, 12, u32::MAX); // expansion ROM: not implemented, stays 0
        assert_eq!(f.read(1, 12), 0);
        f.write(9, 4, 0x1000);
        f.root.write_config(200, 4, 0, &[1]);
        f.root.write_config(1, 999, 0, &[1]);
        assert_eq!(f.root.read_config(200, 0), u32::MAX);
    }

    #[test]
    fn slots_run_out_after_31_devices() {
        let f = Fixture::new();
        for _ in 1..NUM_SLOTS {
            let (p, _) = Probe::new();
            f.root.add_device(Arc::new(Mutex::new(p))).unwrap();
        }
        let (p, _) = Probe::new();
        assert!(matches!(
            f.root.add_device(Arc::new(Mutex::new(p))),
            Err(PciError::NoFreeSlot)
        ));
    }
}
