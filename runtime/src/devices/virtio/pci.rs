//! The modern virtio-pci transport (virtio 1.2 §4.1): vendor capabilities pointing into
//! BAR 0, common configuration, notifications, ISR, device configuration and MSI-X.
//!
//! BAR 0 is a 32-bit, non-prefetchable memory BAR of 32 KiB:
//!
//! ```text
//! 0x0000 common cfg   0x1000 ISR   0x2000 device cfg   0x3000 notify (4 bytes per queue)
//! 0x4000 MSI-X table (up to 512 vectors)               0x6000 MSI-X PBA
//! ```
//!
//! Non-prefetchable because reading the ISR clears it (a prefetchable BAR promises reads
//! without side effects); 32-bit because non-prefetchable windows live below 4 GiB on
//! every platform and the BAR is small.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{
    Activation, ActiveQueue, VIRTIO_MSI_NO_VECTOR, VirtioDevice, VirtioError, VirtioInterrupt,
};
use crate::devices::pci::{
    BarKind, MSIX_CONTROL_OFFSET, MSIX_CONTROL_WRITABLE, Msix, PciBar, PciConfiguration, PciDevice,
    PciError, PciHeader,
};
use crate::memory::GuestMemoryAtomic;

/// Queues per device: one notify dword each in a 4 KiB region would allow 1024, and one
/// MSI-X vector each (plus config) in the 8 KiB table 511; 256 is plenty.
pub const MAX_QUEUES: usize = 256;

const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + device type (virtio 1.2 §4.1.2.1).
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x40;

const BAR0: usize = 0;
const BAR0_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
/// struct virtio_pci_common_cfg up to queue_device (virtio 1.2 §4.1.4.3).
const COMMON_LEN: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const NOTIFY_OFFSET: u64 = 0x3000;
/// queue_notify_off is the queue index, so each queue has its own notify address.
const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
const REGION_LEN: u64 = 0x1000;
const MSIX_TABLE_LEN: u64 = 0x2000;

const VENDOR_CAP_ID: u8 = 0x09;
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// Offsets inside struct virtio_pci_cap / virtio_pci_cfg_cap.
const CAP_BAR: usize = 4;
const CAP_OFFSET: usize = 8;
const CAP_LENGTH: usize = 12;
const CAP_PCI_CFG_DATA: usize = 16;

const STATUS_ACKNOWLEDGE: u8 = VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
const STATUS_DRIVER: u8 = VIRTIO_CONFIG_S_DRIVER as u8;
const STATUS_FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
const STATUS_DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
const STATUS_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
const STATUS_FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;

/// Vectors a device with `queues` queues gets: one per queue and one for config changes.
pub(super) fn msix_vectors_for(queues: usize) -> Result<u16, VirtioError> {
    if queues == 0 || queues > MAX_QUEUES {
        return Err(VirtioError::QueueCount(queues));
    }
    Ok(queues as u16 + 1)
}

struct QueueSlot {
    queue: Queue,
    msix_vector: u16,
    kick: EventFd,
}

/// A [`VirtioDevice`] as a PCI function.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryAtomic,
    msix: Arc<Msix>,
    msix_cap: usize,
    pci_cfg_cap: usize,
    queues: Vec<QueueSlot>,
    offered_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_msix_vector: u16,
    queue_select: u16,
    isr: Arc<AtomicU8>,
    config_generation: Arc<AtomicU8>,
    active: bool,
}

/// struct virtio_pci_cap, followed by `extra` (notify multiplier, pci_cfg_data).
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut cap = vec![
        VENDOR_CAP_ID,
        0,
        (16 + extra.len()) as u8,
        cfg_type,
        BAR0 as u8,
        0,
        0,
        0,
    ];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    cap.extend_from_slice(extra);
    cap
}

impl VirtioPciDevice {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        msix: Arc<Msix>,
        mem: GuestMemoryAtomic,
    ) -> Result<VirtioPciDevice, VirtioError> {
        let sizes = device.queue_max_sizes().to_vec();
        let vectors = msix_vectors_for(sizes.len())?;
        if msix.num_vectors() < vectors {
            return Err(VirtioError::Pci(PciError::InvalidMsixVectorCount(
                usize::from(msix.num_vectors()),
            )));
        }
        let config_size = device.config_size();
        if config_size as u64 > REGION_LEN {
            return Err(VirtioError::ConfigTooLarge(config_size));
        }
        let mut queues = Vec::with_capacity(sizes.len());
        for (i, size) in sizes.iter().enumerate() {
            let queue = Queue::new(*size).map_err(|_| VirtioError::QueueMaxSize {
                queue: i,
                size: *size,
            })?;
            queues.push(QueueSlot {
                queue,
                msix_vector: VIRTIO_MSI_NO_VECTOR,
                kick: EventFd::new(EFD_NONBLOCK).map_err(VirtioError::EventFd)?,
            });
        }

        let device_type = device.device_type();
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(device_type as u16),
            // Revision 1 marks a modern-only (non-transitional) device.
            revision: 1,
            class_code: class_code(device_type),
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        });
        config
            .add_bar(
                BAR0,
                PciBar {
                    size: BAR0_SIZE,
                    kind: BarKind::Memory32,
                    prefetchable: false,
                },
            )
            .map_err(VirtioError::Pci)?;
        let notify_len = sizes.len() as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
        let mut caps = vec![
            virtio_cap(CAP_COMMON_CFG, COMMON_OFFSET, COMMON_LEN, &[]),
            virtio_cap(
                CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                notify_len,
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
            virtio_cap(CAP_ISR_CFG, ISR_OFFSET, 1, &[]),
        ];
        if config_size > 0 {
            caps.push(virtio_cap(
                CAP_DEVICE_CFG,
                DEVICE_OFFSET,
                config_size as u64,
                &[],
            ));
        }
        for cap in caps {
            config.add_capability(&cap).map_err(VirtioError::Pci)?;
        }
        // virtio 1.2 §4.1.4.9: the device MUST present a PCI configuration access
        // capability; its bar, offset and length fields are the driver's to set.
        let pci_cfg_cap = config
            .add_capability(&virtio_cap(CAP_PCI_CFG, 0, 0, &[0; 4]))
            .map_err(VirtioError::Pci)?;
        config.set_writable(pci_cfg_cap + CAP_BAR, &[0xff]);
        config.set_writable(pci_cfg_cap + CAP_OFFSET, &[0xff; 8]);
        let msix_cap = config
            .add_capability(&Msix::capability(
                vectors,
                BAR0 as u8,
                MSIX_TABLE_OFFSET as u32,
                BAR0 as u8,
                MSIX_PBA_OFFSET as u32,
            ))
            .map_err(VirtioError::Pci)?;
        config.set_writable(
            msix_cap + MSIX_CONTROL_OFFSET,
            &MSIX_CONTROL_WRITABLE.to_le_bytes(),
        );

        Ok(VirtioPciDevice {
            config,
            offered_features: device.features() | 1 << VIRTIO_F_VERSION_1,
            device,
            mem,
            msix,
            msix_cap,
            pci_cfg_cap,
            queues,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_msix_vector: VIRTIO_MSI_NO_VECTOR,
            queue_select: 0,
            isr: Arc::new(AtomicU8::new(0)),
            config_generation: Arc::new(AtomicU8::new(0)),
            active: false,
        })
    }

    /// The device status byte, as the driver reads it.
    pub fn status(&self) -> u8 {
        self.status
    }

    fn selected_queue(&self) -> Option<&QueueSlot> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn read_common(&self, offset: u64, len: usize) -> Option<u64> {
        let q = self.selected_queue();
        let queue_addr = |f: fn(&Queue) -> u64| q.map_or(0, |q| f(&q.queue));
        Some(match (offset, len) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => feature_word(self.offered_features, self.device_feature_select),
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => feature_word(self.driver_features, self.driver_feature_select),
            (0x10, 2) => u64::from(self.config_msix_vector),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status),
            (0x15, 1) => u64::from(self.config_generation.load(Ordering::Acquire)),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.queue.size())),
            (0x1a, 2) => q.map_or(u64::from(VIRTIO_MSI_NO_VECTOR), |q| {
                u64::from(q.msix_vector)
            }),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.queue.ready())),
            (0x1e, 2) => q.map_or(0, |_| u64::from(self.queue_select)),
            (0x20..0x28, _) => split_u64(queue_addr(|q| q.desc_table()), offset - 0x20, len)?,
            (0x28..0x30, _) => split_u64(queue_addr(|q| q.avail_ring()), offset - 0x28, len)?,
            (0x30..0x38, _) => split_u64(queue_addr(|q| q.used_ring()), offset - 0x30, len)?,
            _ => return None,
        })
    }

    fn write_common(&mut self, offset: u64, len: usize, value: u64) {
        let ok = match (offset, len) {
            (0x00, 4) => {
                self.device_feature_select = value as u32;
                true
            }
            (0x08, 4) => {
                self.driver_feature_select = value as u32;
                true
            }
            (0x0c, 4) => self.write_driver_features(value as u32),
            (0x10, 2) => {
                self.config_msix_vector = self.checked_vector(value as u16);
                true
            }
            (0x14, 1) => {
                self.write_status(value as u8);
                true
            }
            (0x16, 2) => {
                self.queue_select = value as u16;
                true
            }
            (0x18, 2) => self.write_queue(|q| q.queue.try_set_size(value as u16).is_ok()),
            (0x1a, 2) => {
                let vector = self.checked_vector(value as u16);
                let open = self.status & STATUS_DRIVER_OK == 0;
                match self.queues.get_mut(usize::from(self.queue_select)) {
                    Some(q) if open => {
                        q.msix_vector = vector;
                        true
                    }
                    _ => false,
                }
            }
            // virtio 1.2 §4.1.4.3.2: the driver MUST NOT write 0 to queue_enable.
            (0x1c, 2) if value == 1 => self.write_queue(|q| {
                q.queue.set_ready(true);
                true
            }),
            (0x20..0x38, 4 | 8) if offset.is_multiple_of(4) => {
                self.write_queue_address(offset, len, value)
            }
            _ => false,
        };
        if !ok {
            tracing::debug!(
                offset,
                len,
                value,
                status = self.status,
                queue = self.queue_select,
                "ignoring virtio common config write"
            );
        }
    }

    /// Applies `f` to the selected queue while the driver may still configure it.
    fn write_queue(&mut self, f: impl FnOnce(&mut QueueSlot) -> bool) -> bool {
        let open = self.status & STATUS_DRIVER_OK == 0;
        match self.queues.get_mut(usize::from(self.queue_select)) {
            Some(q) if open && !q.queue.ready() => f(q),
            _ => false,
        }
    }

    fn write_queue_address(&mut self, offset: u64, len: usize, value: u64) -> bool {
        let field = (offset - 0x20) / 8;
        let half = (offset - 0x20) % 8;
        self.write_queue(|q| {
            let current = match field {
                0 => q.queue.desc_table(),
                1 => q.queue.avail_ring(),
                _ => q.queue.used_ring(),
            };
            let addr = match (half, len) {
                (0, 8) => value,
                (0, _) => (current & !0xffff_ffff) | (value & 0xffff_ffff),
                (_, 4) => (current & 0xffff_ffff) | value << 32,
                _ => return false,
            };
            let addr = GuestAddress(addr);
            // Misaligned rings are refused here and leave the old address in place.
            match field {
                0 => q.queue.try_set_desc_table_address(addr).is_ok(),
                1 => q.queue.try_set_avail_ring_address(addr).is_ok(),
                _ => q.queue.try_set_used_ring_address(addr).is_ok(),
            }
        })
    }

    fn write_driver_features(&mut self, value: u32) -> bool {
        // virtio 1.2 §3.1.1: features are written after DRIVER and before FEATURES_OK.
        let open = self.status & STATUS_DRIVER != 0 && self.status & STATUS_FEATURES_OK == 0;
        let shift = match self.driver_feature_select {
            0 => 0,
            1 => 32,
            _ => return false,
        };
        if !open {
            return false;
        }
        self.driver_features =
            (self.driver_features & !(0xffff_ffff << shift)) | u64::from(value) << shift;
        true
    }

    fn checked_vector(&self, vector: u16) -> u16 {
        // virtio 1.2 §4.1.5.1.2: an unmappable vector reads back as NO_VECTOR.
        if vector < self.msix.num_vectors() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    /// The device status state machine (virtio 1.2 §2.1, §3.1.1).
    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set.
        let value = (value & !STATUS_NEEDS_RESET) | (self.status & STATUS_NEEDS_RESET);
        if value & self.status != self.status {
            tracing::debug!(
                old = self.status,
                new = value,
                "driver cleared status bits without a reset; ignored"
            );
            return;
        }
        let added = value & !self.status;
        if added & STATUS_FAILED != 0 {
            tracing::info!(
                device_type = self.device.device_type(),
                "the driver gave up on the device (FAILED)"
            );
            self.status |= STATUS_FAILED;
            return;
        }
        for bit in [
            STATUS_ACKNOWLEDGE,
            STATUS_DRIVER,
            STATUS_FEATURES_OK,
            STATUS_DRIVER_OK,
        ] {
            if added & bit == 0 {
                continue;
            }
            let allowed = match bit {
                STATUS_ACKNOWLEDGE => true,
                STATUS_DRIVER => self.status & STATUS_ACKNOWLEDGE != 0,
                STATUS_FEATURES_OK => {
                    self.status & STATUS_DRIVER != 0 && self.features_acceptable()
                }
                _ => {
                    self.status & STATUS_FEATURES_OK != 0
                        && self.status & STATUS_NEEDS_RESET == 0
                        && self.activate()
                }
            };
            if !allowed {
                tracing::debug!(
                    status = self.status,
                    bit,
                    "refusing device status bit out of order or after a failed check"
                );
                return;
            }
            self.status |= bit;
        }
    }

    fn features_acceptable(&self) -> bool {
        let unoffered = self.driver_features & !self.offered_features;
        if unoffered != 0 {
            tracing::debug!(
                unoffered,
                "driver accepted features the device did not offer"
            );
            return false;
        }
        // No legacy interface: a driver must speak virtio 1.x.
        self.driver_features & 1 << VIRTIO_F_VERSION_1 != 0
    }

    /// Starts the device; on failure flags DEVICE_NEEDS_RESET and tells the driver.
    fn activate(&mut self) -> bool {
        match self.try_activate() {
            Ok(()) => {
                self.active = true;
                true
            }
            Err(e) => {
                tracing::warn!(
                    device_type = self.device.device_type(),
                    "virtio device not started: {e}"
                );
                self.status |= STATUS_NEEDS_RESET;
                // virtio 1.2 §2.1.2: the device notifies the driver of NEEDS_RESET with a
                // configuration change notification.
                self.isr.fetch_or(super::ISR_CONFIG, Ordering::AcqRel);
                if self.config_msix_vector != VIRTIO_MSI_NO_VECTOR
                    && let Err(e) = self.msix.trigger(self.config_msix_vector)
                {
                    tracing::warn!("cannot signal DEVICE_NEEDS_RESET: {e}");
                }
                false
            }
        }
    }

    fn try_activate(&mut self) -> Result<(), VirtioError> {
        let event_idx = self.driver_features & 1 << VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::new();
        {
            let mem = self.mem.memory();
            for (index, slot) in self.queues.iter().enumerate() {
                let index = index as u16;
                if !slot.queue.ready() {
                    continue;
                }
                if !slot.queue.is_valid(&*mem) {
                    return Err(VirtioError::QueueInvalid(index));
                }
                let mut state = slot.queue.state();
                state.event_idx_enabled = event_idx;
                let queue = Queue::try_from(state).map_err(|_| VirtioError::QueueInvalid(index))?;
                let kick = slot.kick.try_clone().map_err(VirtioError::EventFd)?;
                queues.push(ActiveQueue { index, queue, kick });
            }
        }
        let interrupt = Arc::new(VirtioInterrupt {
            msix: self.msix.clone(),
            isr: self.isr.clone(),
            config_generation: self.config_generation.clone(),
            config_vector: self.config_msix_vector,
            queue_vectors: self.queues.iter().map(|q| q.msix_vector).collect(),
        });
        self.device.activate(Activation {
            mem: self.mem.clone(),
            features: self.driver_features,
            queues,
            interrupt,
        })
    }

    /// Device reset (status 0): stop the device and return to the power-on state. The
    /// MSI-X table belongs to the PCI function and survives.
    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.queue.reset();
            q.msix_vector = VIRTIO_MSI_NO_VECTOR;
            // Drop kicks left over from the previous driver (EAGAIN when there are none).
            let _ = q.kick.read();
        }
        self.isr.store(0, Ordering::Release);
    }

    fn read_device_config(&self, offset: u64, data: &mut [u8]) {
        let fits = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= self.device.config_size() as u64);
        if fits {
            self.device.read_config(offset, data);
        } else {
            data.fill(0);
        }
    }

    fn write_device_config(&mut self, offset: u64, data: &[u8]) {
        let fits = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= self.device.config_size() as u64);
        if fits {
            self.device.write_config(offset, data);
        } else {
            tracing::debug!(
                offset,
                len = data.len(),
                "ignoring write past device config"
            );
        }
    }

    /// The BAR 0 access of the PCI configuration access capability.
    fn pci_cfg_access(&self) -> Option<(u64, usize)> {
        let mut field = [0u8; 4];
        self.config
            .read_bytes(self.pci_cfg_cap + CAP_BAR, &mut field[..1]);
        if usize::from(field[0]) != BAR0 {
            return None;
        }
        self.config
            .read_bytes(self.pci_cfg_cap + CAP_OFFSET, &mut field);
        let offset = u64::from(u32::from_le_bytes(field));
        self.config
            .read_bytes(self.pci_cfg_cap + CAP_LENGTH, &mut field);
        let len = u32::from_le_bytes(field) as usize;
        (matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len as u64)).then_some((offset, len))
    }
}

/// Class codes guests use to pick drivers before binding virtio (others: unclassified).
fn class_code(device_type: u32) -> u32 {
    match device_type {
        super::TYPE_NET => 0x02_00_00,
        super::TYPE_BLOCK => 0x01_80_00,
        _ => 0xff_00_00,
    }
}

fn feature_word(features: u64, select: u32) -> u64 {
    match select {
        0 => features & 0xffff_ffff,
        1 => features >> 32,
        _ => 0,
    }
}

/// A 64-bit field read whole (8 bytes at 0) or by 32-bit halves.
fn split_u64(value: u64, at: u64, len: usize) -> Option<u64> {
    match (at, len) {
        (0, 8) => Some(value),
        (0, 4) => Some(value & 0xffff_ffff),
        (4, 4) => Some(value >> 32),
        _ => None,
    }
}

fn le_value(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(bytes)
}

/// Which region of BAR 0 an access hits, with the offset inside it; `None` if it
/// straddles a region boundary or leaves the BAR.
fn bar0_region(offset: u64, len: usize) -> Option<(u64, u64)> {
    let regions = [
        (COMMON_OFFSET, REGION_LEN),
        (ISR_OFFSET, REGION_LEN),
        (DEVICE_OFFSET, REGION_LEN),
        (NOTIFY_OFFSET, REGION_LEN),
        (MSIX_TABLE_OFFSET, MSIX_TABLE_LEN),
        (MSIX_PBA_OFFSET, REGION_LEN),
    ];
    let end = offset.checked_add(len as u64)?;
    regions
        .into_iter()
        .find(|(start, size)| offset >= *start && end <= start + size)
        .map(|(start, _)| (start, offset - start))
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config_register(&mut self, reg: usize) -> u32 {
        if reg * 4 == self.pci_cfg_cap + CAP_PCI_CFG_DATA {
            let mut data = [0u8; 4];
            if let Some((offset, len)) = self.pci_cfg_access() {
                self.read_bar(BAR0, offset, &mut data[..len]);
            }
            return u32::from_le_bytes(data);
        }
        self.config.read_register(reg)
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let at = reg * 4 + offset as usize;
        if reg * 4 == self.pci_cfg_cap + CAP_PCI_CFG_DATA {
            match self.pci_cfg_access() {
                Some((bar_offset, len)) if offset == 0 && data.len() >= len => {
                    self.write_bar(BAR0, bar_offset, &data[..len]);
                }
                _ => tracing::debug!(offset, "ignoring bad pci_cfg_data write"),
            }
            return;
        }
        self.config.write_register(reg, offset, data);
        let control = self.msix_cap + MSIX_CONTROL_OFFSET;
        if at < control + 2 && at + data.len() > control {
            let mut word = [0u8; 2];
            self.config.read_bytes(control, &mut word);
            self.msix.set_control(u16::from_le_bytes(word));
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let region = if bar == BAR0 {
            bar0_region(offset, data.len())
        } else {
            None
        };
        let Some((region, at)) = region else {
            tracing::debug!(
                bar,
                offset,
                len = data.len(),
                "ignoring bad virtio BAR read"
            );
            return;
        };
        match region {
            COMMON_OFFSET => match self.read_common(at, data.len()) {
                Some(v) => data.copy_from_slice(&v.to_le_bytes()[..data.len()]),
                None => tracing::debug!(at, len = data.len(), "bad common config read"),
            },
            ISR_OFFSET if at == 0 => {
                // virtio 1.2 §4.1.4.5: reading the ISR clears it.
                data[0] = self.isr.swap(0, Ordering::AcqRel);
            }
            DEVICE_OFFSET => self.read_device_config(at, data),
            MSIX_TABLE_OFFSET => self.msix.read_table(at, data),
            MSIX_PBA_OFFSET => self.msix.read_pba(at, data),
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let region = if bar == BAR0 && !data.is_empty() {
            bar0_region(offset, data.len())
        } else {
            None
        };
        let Some((region, at)) = region else {
            tracing::debug!(
                bar,
                offset,
                len = data.len(),
                "ignoring bad virtio BAR write"
            );
            return;
        };
        match region {
            COMMON_OFFSET if data.len() <= 8 => self.write_common(at, data.len(), le_value(data)),
            DEVICE_OFFSET => self.write_device_config(at, data),
            NOTIFY_OFFSET => {
                // Only reached when the ioeventfd is not registered (or through the
                // pci_cfg capability): do what KVM would have done.
                let queue = at / u64::from(NOTIFY_OFF_MULTIPLIER);
                match self.queues.get(queue as usize) {
                    Some(q) => {
                        if let Err(e) = q.kick.write(1) {
                            tracing::warn!(queue, "cannot signal queue notification: {e}");
                        }
                    }
                    None => tracing::debug!(queue, "notification for a missing queue"),
                }
            }
            MSIX_TABLE_OFFSET => self.msix.write_table(at, data),
            _ => tracing::debug!(offset, "ignoring write to a read-only virtio region"),
        }
    }

    fn ioeventfds(&self, bar: usize) -> Vec<(u64, &EventFd)> {
        if bar != BAR0 {
            return Vec::new();
        }
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                (
                    NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                    &q.kick,
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::testing::*;

    fn rng_driver() -> TestDriver {
        TestDriver::new(Box::new(Rng::new(Rng::DEFAULT_SOURCE).unwrap()))
    }

    fn le32(d: &TestDriver, offset: usize) -> u32 {
        u32::from_le_bytes(std::array::from_fn(|i| d.cfg_byte(offset + i)))
    }

    #[test]
    fn ids_and_bar0_follow_the_modern_virtio_pci_layout() {
        let d = rng_driver();
        assert_eq!(d.cfg_read(0), 0x1044_1af4, "vendor 1af4, device 0x1040 + 4");
        assert_eq!(d.cfg_read(2) & 0xff, 1, "revision 1: non-transitional");
        assert_eq!(d.cfg_read(11) >> 16, 0x40);
        // Size probing: 32 KiB, 32-bit, non-prefetchable.
        let bar = d.cfg_read(4);
        assert_eq!(u64::from(bar), d.bar0);
        d.cfg_write(0x10, &u32::MAX.to_le_bytes());
        assert_eq!(d.cfg_read(4), 0xffff_8000);
        d.cfg_write(0x10, &bar.to_le_bytes());
        assert_eq!(d.root.bar_address(d.slot, 0), Some(d.bar0));
    }

    #[test]
    fn capability_walk_finds_every_virtio_structure_and_msix() {
        let d = rng_driver();
        let caps = d.capabilities();
        let vendor: Vec<(u8, u8, u32, u32)> = caps
            .iter()
            .filter(|(_, id)| *id == VENDOR_CAP_ID)
            .map(|(at, _)| {
                (
                    d.cfg_byte(at + 3),
                    d.cfg_byte(at + CAP_BAR),
                    le32(&d, at + CAP_OFFSET),
                    le32(&d, at + CAP_LENGTH),
                )
            })
            .collect();
        assert_eq!(
            vendor,
            vec![
                (CAP_COMMON_CFG, 0, 0, 0x38),
                (CAP_NOTIFY_CFG, 0, 0x3000, 4),
                (CAP_ISR_CFG, 0, 0x1000, 1),
                (CAP_PCI_CFG, 0, 0, 0),
            ],
            "rng has no device configuration, so no device cfg capability"
        );
        let (notify, _) = caps[1];
        assert_eq!(d.cfg_byte(notify + 2), 20);
        assert_eq!(le32(&d, notify + 16), NOTIFY_OFF_MULTIPLIER);

        let (msix, id) = *caps.last().unwrap();
        assert_eq!(id, 0x11);
        let control = le32(&d, msix) >> 16;
        assert_eq!(control & 0x7ff, 1, "two vectors: queue 0 and configuration");
        assert_eq!(le32(&d, msix + 4), 0x4000, "table in BAR 0 at 0x4000");
        assert_eq!(le32(&d, msix + 8), 0x6000, "PBA in BAR 0 at 0x6000");
        assert!(caps.iter().all(|(at, _)| at % 4 == 0 && *at >= 0x40));
    }

    #[test]
    fn features_are_negotiated_through_common_cfg() {
        let d = rng_driver();
        d.write(DEVICE_FEATURE_SELECT, 4, 1);
        assert_eq!(d.read(DEVICE_FEATURE, 4), 1, "VERSION_1 is bit 32");
        d.write(DEVICE_FEATURE_SELECT, 4, 0);
        let low = d.read(DEVICE_FEATURE, 4);
        assert_ne!(low & 1 << VIRTIO_RING_F_EVENT_IDX, 0);
        d.write(DEVICE_FEATURE_SELECT, 4, 7);
        assert_eq!(d.read(DEVICE_FEATURE, 4), 0);

        // Before DRIVER, feature writes are ignored.
        d.write(DRIVER_FEATURE, 4, low);
        assert_eq!(d.read(DRIVER_FEATURE, 4), 0);

        assert!(!d.negotiate(low), "a driver without VERSION_1 is refused");
        d.set_status(0);
        assert!(
            !d.negotiate(VERSION_1 | 1 << 5),
            "features not offered are refused"
        );
        d.set_status(0);
        assert!(d.negotiate(VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX));
        // After FEATURES_OK the set is frozen.
        d.write(DRIVER_FEATURE_SELECT, 4, 0);
        d.write(DRIVER_FEATURE, 4, 0);
        assert_eq!(d.read(DRIVER_FEATURE, 4), 1 << VIRTIO_RING_F_EVENT_IDX);
    }

    #[test]
    fn status_bits_must_come_in_order() {
        let d = rng_driver();
        d.set_status(DRIVER);
        assert_eq!(d.status(), 0, "DRIVER needs ACKNOWLEDGE first");
        d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(
            d.status(),
            ACKNOWLEDGE | DRIVER,
            "no features accepted yet: stops before FEATURES_OK"
        );
        d.set_status(ACKNOWLEDGE);
        assert_eq!(d.status(), ACKNOWLEDGE | DRIVER, "bits only clear by reset");
        d.set_status(ACKNOWLEDGE | DRIVER | DRIVER_OK);
        assert_eq!(d.status() & DRIVER_OK, 0, "DRIVER_OK needs FEATURES_OK");
        d.set_status(ACKNOWLEDGE | DRIVER | NEEDS_RESET);
        assert_eq!(
            d.status() & NEEDS_RESET,
            0,
            "the driver cannot set NEEDS_RESET"
        );
        d.set_status(ACKNOWLEDGE | DRIVER | FAILED);
        assert_eq!(d.status(), ACKNOWLEDGE | DRIVER | FAILED);
        d.set_status(0);
        assert_eq!(d.status(), 0);
    }

    #[test]
    fn queue_configuration_is_validated() {
        let d = rng_driver();
        assert_eq!(d.read(NUM_QUEUES, 2), 1);
        d.write(QUEUE_SELECT, 2, 0);
        assert_eq!(d.read(QUEUE_SIZE, 2), 256);
        for bad in [0u64, 3, 100, 512, 0xffff] {
            d.write(QUEUE_SIZE, 2, bad);
            assert_eq!(d.read(QUEUE_SIZE, 2), 256, "size {bad} must be refused");
        }
        d.write(QUEUE_SIZE, 2, 64);
        assert_eq!(d.read(QUEUE_SIZE, 2), 64);
        assert_eq!(d.read(QUEUE_NOTIFY_OFF, 2), 0);

        d.write(QUEUE_DESC, 4, 0x1_0001);
        assert_eq!(
            d.read(QUEUE_DESC, 8),
            0,
            "misaligned descriptor table refused"
        );
        d.write(QUEUE_DESC, 4, 0x1_0000);
        d.write(QUEUE_DESC + 4, 4, 0x2);
        assert_eq!(d.read(QUEUE_DESC, 8), 0x2_0001_0000);
        assert_eq!(d.read(QUEUE_DESC + 4, 4), 0x2);
        d.write(QUEUE_DEVICE, 8, 0x3000);
        assert_eq!(d.read(QUEUE_DEVICE, 8), 0x3000);

        d.write(QUEUE_MSIX_VECTOR, 2, 99);
        assert_eq!(
            d.read(QUEUE_MSIX_VECTOR, 2),
            u64::from(VIRTIO_MSI_NO_VECTOR)
        );
        d.write(QUEUE_MSIX_VECTOR, 2, 1);
        assert_eq!(d.read(QUEUE_MSIX_VECTOR, 2), 1);
        d.write(CONFIG_MSIX_VECTOR, 2, 2);
        assert_eq!(
            d.read(CONFIG_MSIX_VECTOR, 2),
            u64::from(VIRTIO_MSI_NO_VECTOR)
        );

        d.write(QUEUE_ENABLE, 2, 0);
        assert_eq!(d.read(QUEUE_ENABLE, 2), 0);
        d.write(QUEUE_ENABLE, 2, 1);
        assert_eq!(d.read(QUEUE_ENABLE, 2), 1);
        d.write(QUEUE_SIZE, 2, 32);
        assert_eq!(d.read(QUEUE_SIZE, 2), 64, "an enabled queue is frozen");

        // A queue that does not exist reads as absent and ignores writes.
        d.write(QUEUE_SELECT, 2, 5);
        assert_eq!(d.read(QUEUE_SIZE, 2), 0);
        d.write(QUEUE_SIZE, 2, 16);
        d.write(QUEUE_ENABLE, 2, 1);
        assert_eq!(d.read(QUEUE_ENABLE, 2), 0);

        // Reset brings every queue back.
        d.set_status(0);
        d.write(QUEUE_SELECT, 2, 0);
        assert_eq!(d.read(QUEUE_SIZE, 2), 256);
        assert_eq!(d.read(QUEUE_ENABLE, 2), 0);
        assert_eq!(
            d.read(QUEUE_MSIX_VECTOR, 2),
            u64::from(VIRTIO_MSI_NO_VECTOR)
        );
    }

    #[test]
    fn pci_cfg_capability_reaches_bar0() {
        let d = rng_driver();
        let (cap, _) = d.capabilities()[3];
        let set = |offset: u32, len: u32| {
            d.cfg_write(cap + CAP_OFFSET, &offset.to_le_bytes());
            d.cfg_write(cap + CAP_LENGTH, &len.to_le_bytes());
        };
        set(NUM_QUEUES as u32, 2);
        assert_eq!(d.cfg_read((cap + CAP_PCI_CFG_DATA) / 4), 1);
        set(DEVICE_STATUS as u32, 1);
        d.cfg_write(cap + CAP_PCI_CFG_DATA, &[ACKNOWLEDGE, 0, 0, 0]);
        assert_eq!(d.status(), ACKNOWLEDGE);
        // A length that is not 1, 2 or 4, or another BAR, does nothing.
        set(DEVICE_STATUS as u32, 3);
        d.cfg_write(cap + CAP_PCI_CFG_DATA, &[0, 0, 0, 0]);
        assert_eq!(d.status(), ACKNOWLEDGE);
        set(DEVICE_STATUS as u32, 1);
        d.cfg_write(cap + CAP_BAR, &[2]);
        d.cfg_write(cap + CAP_PCI_CFG_DATA, &[0, 0, 0, 0]);
        assert_eq!(d.status(), ACKNOWLEDGE);
        assert_eq!(d.cfg_read((cap + CAP_PCI_CFG_DATA) / 4), 0);
    }

    #[test]
    fn bad_bar_accesses_are_ignored() {
        let d = rng_driver();
        // Misfit sizes on common cfg fields.
        d.write(DEVICE_STATUS, 2, 0x0101);
        d.write(QUEUE_SIZE, 4, 16);
        d.write(QUEUE_DESC + 2, 4, 0x1000);
        d.write(0x100, 4, 1);
        assert_eq!(d.status(), 0);
        assert_eq!(d.read(QUEUE_SIZE, 1), 0);
        assert_eq!(d.read(0x37, 2), 0);
        // Straddling regions, read-only regions, the PBA, beyond the queues' notify slots.
        let mut buf = [0u8; 8];
        assert!(d.mmio.read(d.bar0 + 0xffc, &mut buf));
        assert_eq!(buf, [0; 8]);
        d.write(ISR, 1, 0xff);
        assert_eq!(d.read(ISR, 1), 0);
        d.write(MSIX_PBA, 8, u64::MAX);
        assert_eq!(d.read(MSIX_PBA, 8), 0);
        d.write(NOTIFY + 0x400, 2, 0);
        d.write(0x2000, 4, 0);
        assert_eq!(d.read(0x2000, 4), 0, "no device configuration");
        d.write(0x7ffc, 4, 1);
        assert!(!d.mmio.write(d.bar0 + 0x8000, &[1]), "past the BAR");
    }

    #[test]
    fn rings_outside_guest_memory_need_a_reset() {
        let d = rng_driver();
        d.route_vector(0, 0x71);
        d.write(CONFIG_MSIX_VECTOR, 2, 0);
        assert!(d.negotiate(VERSION_1));
        let outside = MEM_SIZE + 0x10_0000;
        d.setup_queue(0, 16, [outside, outside + 0x1000, outside + 0x2000], 1);
        d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        let status = d.status();
        assert_eq!(status & DRIVER_OK, 0);
        assert_ne!(status & NEEDS_RESET, 0);
        assert!(
            d.vm.wait_lapic_irr(0x71),
            "NEEDS_RESET comes with a config interrupt"
        );
        assert_eq!(d.read(ISR, 1), 2, "configuration change in the ISR");
        assert_eq!(d.read(ISR, 1), 0, "reading the ISR clears it");
        d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(d.status() & DRIVER_OK, 0, "stays stuck until reset");
        d.set_status(0);
        assert_eq!(d.status(), 0);
    }
}
