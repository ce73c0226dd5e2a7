//! A guest driver's view of one virtio-pci device, for tests: real KVM VM, guest RAM
//! mapped into it, the device on bus 0, BAR 0 reached through the MMIO bus.

use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use vm_memory::{GuestAddress, GuestAddressSpace};

use super::{VirtioDevice, add_virtio_device};
use crate::devices::bus::Bus;
use crate::devices::pci::PciRoot;
use crate::devices::pci::testing::TestVm;
use crate::memory::{GuestMemoryAtomic, GuestMemoryMmap, GuestRam};

pub const MEM_SIZE: u64 = 16 << 20;

/// Common configuration offsets (virtio 1.2 §4.1.4.3).
pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
pub const DEVICE_FEATURE: u64 = 0x04;
pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
pub const DRIVER_FEATURE: u64 = 0x0c;
pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
pub const NUM_QUEUES: u64 = 0x12;
pub const DEVICE_STATUS: u64 = 0x14;
pub const QUEUE_SELECT: u64 = 0x16;
pub const QUEUE_SIZE: u64 = 0x18;
pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
pub const QUEUE_ENABLE: u64 = 0x1c;
pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
pub const QUEUE_DESC: u64 = 0x20;
pub const QUEUE_DRIVER: u64 = 0x28;
pub const QUEUE_DEVICE: u64 = 0x30;
pub const ISR: u64 = 0x1000;
pub const NOTIFY: u64 = 0x3000;
pub const MSIX_TABLE: u64 = 0x4000;
pub const MSIX_PBA: u64 = 0x6000;

pub const ACKNOWLEDGE: u8 = 1;
pub const DRIVER: u8 = 2;
pub const DRIVER_OK: u8 = 4;
pub const FEATURES_OK: u8 = 8;
pub const NEEDS_RESET: u8 = 64;
pub const FAILED: u8 = 128;
pub const VERSION_1: u64 = 1 << 32;

pub struct TestDriver {
    pub vm: TestVm,
    pub root: Arc<PciRoot>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemoryAtomic,
    pub bar0: u64,
    pub slot: u8,
}

impl TestDriver {
    pub fn new(device: Box<dyn VirtioDevice>) -> TestDriver {
        let vm = TestVm::new();
        let guest = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest RAM");
        vm.map_memory(&guest);
        let mem = GuestMemoryAtomic::new(guest);
        let mmio = Arc::new(Bus::new());
        let root = PciRoot::new(mmio.clone(), vm.vm.clone());
        let bdf = add_virtio_device(&root, device, &vm.router, mem.clone()).expect("plug");
        let bar0 = root.bar_address(bdf.device, 0).expect("BAR 0 mapped");
        TestDriver {
            vm,
            root,
            mmio,
            mem,
            bar0,
            slot: bdf.device,
        }
    }

    /// A driver for a vhost-user device: guest RAM is a memfd the backend can map. The
    /// RAM must outlive the driver.
    pub fn with_shared_memory(device: Box<dyn VirtioDevice>) -> (TestDriver, GuestRam) {
        let vm = TestVm::new();
        let ram = GuestRam::new(MEM_SIZE, false).expect("memfd guest RAM");
        vm.map_memory(&ram.memory.memory());
        let mmio = Arc::new(Bus::new());
        let root = PciRoot::new(mmio.clone(), vm.vm.clone());
        let bdf = add_virtio_device(&root, device, &vm.router, ram.memory.clone()).expect("plug");
        let bar0 = root.bar_address(bdf.device, 0).expect("BAR 0 mapped");
        let driver = TestDriver {
            vm,
            root,
            mmio,
            mem: ram.memory.clone(),
            bar0,
            slot: bdf.device,
        };
        (driver, ram)
    }

    pub fn guest(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap> {
        self.mem.memory()
    }

    /// Reads `len` bytes at `offset` of BAR 0, little endian.
    pub fn read(&self, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        assert!(self.mmio.read(self.bar0 + offset, &mut data[..len]));
        u64::from_le_bytes(data)
    }

    pub fn write(&self, offset: u64, len: usize, value: u64) {
        assert!(
            self.mmio
                .write(self.bar0 + offset, &value.to_le_bytes()[..len])
        );
    }

    pub fn cfg_read(&self, reg: usize) -> u32 {
        self.root.read_config(self.slot, reg)
    }

    pub fn cfg_write(&self, offset: usize, data: &[u8]) {
        self.root
            .write_config(self.slot, offset / 4, (offset % 4) as u64, data);
    }

    pub fn cfg_byte(&self, offset: usize) -> u8 {
        (self.cfg_read(offset / 4) >> ((offset % 4) * 8)) as u8
    }

    /// (offset, capability ID) of every capability, following the list.
    pub fn capabilities(&self) -> Vec<(usize, u8)> {
        let mut out = Vec::new();
        let mut at = usize::from(self.cfg_byte(0x34));
        while at != 0 && out.len() < 48 {
            out.push((at, self.cfg_byte(at)));
            at = usize::from(self.cfg_byte(at + 1));
        }
        out
    }

    pub fn status(&self) -> u8 {
        self.read(DEVICE_STATUS, 1) as u8
    }

    pub fn set_status(&self, status: u8) {
        self.write(DEVICE_STATUS, 1, u64::from(status));
    }

    /// Steps through ACKNOWLEDGE, DRIVER, features, FEATURES_OK; true if accepted.
    pub fn negotiate(&self, features: u64) -> bool {
        self.set_status(ACKNOWLEDGE);
        self.set_status(ACKNOWLEDGE | DRIVER);
        for select in 0..2 {
            self.write(DRIVER_FEATURE_SELECT, 4, select);
            self.write(DRIVER_FEATURE, 4, (features >> (32 * select)) & 0xffff_ffff);
        }
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        self.status() & FEATURES_OK != 0
    }

    pub fn setup_queue(&self, index: u16, size: u16, rings: [u64; 3], vector: u16) {
        self.write(QUEUE_SELECT, 2, u64::from(index));
        self.write(QUEUE_SIZE, 2, u64::from(size));
        for (field, addr) in [QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE]
            .into_iter()
            .zip(rings)
        {
            self.write(field, 4, addr & 0xffff_ffff);
            self.write(field + 4, 4, addr >> 32);
        }
        self.write(QUEUE_MSIX_VECTOR, 2, u64::from(vector));
        self.write(QUEUE_ENABLE, 2, 1);
    }

    /// Turns MSI-X on in the capability and points table entry `vector` at APIC vector
    /// `apic_vector` of CPU 0, unmasked.
    pub fn route_vector(&self, vector: u16, apic_vector: u8) {
        let (cap, _) = *self
            .capabilities()
            .iter()
            .find(|(_, id)| *id == 0x11)
            .expect("MSI-X capability");
        self.cfg_write(cap + 3, &[0x80]);
        let entry = MSIX_TABLE + u64::from(vector) * 16;
        self.write(entry, 4, 0xfee0_0000);
        self.write(entry + 4, 4, 0);
        self.write(entry + 8, 4, u64::from(apic_vector));
        self.write(entry + 12, 4, 0);
    }

    /// Waits up to 5 s for `cond`.
    pub fn wait_for(&self, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}

/// The driver's side of a split queue of `size` entries: descriptor table at `base`,
/// avail ring at `base + 4 KiB`, used ring at `base + 8 KiB` (each fits a page up to
/// 256 entries; no overlap whatever the queue size).
pub struct DriverQueue<'a> {
    pub desc: DescriptorTable<'a, GuestMemoryMmap>,
    pub avail: AvailRing<'a, GuestMemoryMmap>,
    pub used: UsedRing<'a, GuestMemoryMmap>,
    pub rings: [u64; 3],
}

impl<'a> DriverQueue<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> DriverQueue<'a> {
        let rings = [base, base + 0x1000, base + 0x2000];
        DriverQueue {
            desc: DescriptorTable::new(mem, GuestAddress(rings[0]), size),
            avail: AvailRing::new(mem, GuestAddress(rings[1]), size),
            used: UsedRing::new(mem, GuestAddress(rings[2]), size),
            rings,
        }
    }
}

/// A split-ring descriptor as the driver writes it.
pub fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}
