//! The virtio 1.2 modern PCI transport (§4.1): locating the common, notify, ISR and
//! device configuration structures through vendor capabilities, the device status
//! handshake (§3.1.1), feature negotiation, and virtqueue setup and notification.

use super::queue::SplitQueue;
use super::{NO_VECTOR, VIRTIO_F_VERSION_1, VirtioError};
use crate::msix::Msix;
use crate::pci::{Bar, BarKind, MmioAllocator, PciDevice};
use crate::phys;
use crate::tsc;

const CAP_ID_VENDOR: u8 = 0x09;
/// §4.1.4: `cfg_type` values.
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

// §4.1.4.3: struct virtio_pci_common_cfg offsets.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
const COMMON_CFG_MIN_LEN: u32 = 0x38;

// §2.1: device status bits.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 64;
pub const STATUS_FAILED: u8 = 128;

const RESET_TIMEOUT_US: u64 = 1_000_000;
const CONFIG_READ_TRIES: u32 = 100;

/// A configuration structure located in a BAR.
#[derive(Debug, Clone, Copy)]
struct Region {
    addr: u64,
    len: u32,
}

/// Where to write to notify one queue (§4.1.4.4).
#[derive(Debug, Clone, Copy)]
pub struct QueueNotifier {
    queue: u16,
    addr: u64,
}

impl QueueNotifier {
    /// Tells the device new buffers are available in the queue (§4.1.5.2).
    pub fn notify(&self) {
        phys::write::<u16>(self.addr, self.queue);
    }
}

#[derive(Debug)]
#[allow(
    dead_code,
    reason = "transport API for the virtio-blk/net drivers to come"
)]
pub struct VirtioPci {
    pub dev: PciDevice,
    common: u64,
    notify: Region,
    notify_multiplier: u32,
    isr: u64,
    device_cfg: Option<Region>,
    msix: Option<Msix>,
}

fn find_region(
    dev: &PciDevice,
    bars: &[Option<Bar>; 6],
    cfg_type: u8,
) -> Result<Option<(Region, u8)>, VirtioError> {
    Ok(dev.find_capability(CAP_ID_VENDOR, |cap| {
        if dev.address.read8(cap + 3) != cfg_type {
            return None;
        }
        let bar = bars
            .get(usize::from(dev.address.read8(cap + 4)))
            .copied()
            .flatten()?;
        let offset = u64::from(dev.address.read32(cap + 8));
        let len = dev.address.read32(cap + 12);
        let inside = bar.kind != BarKind::Io
            && offset + u64::from(len) <= bar.size
            && phys::is_mapped(bar.addr + offset, u64::from(len));
        inside.then_some((
            Region {
                addr: bar.addr + offset,
                len,
            },
            cap,
        ))
    })?)
}

impl VirtioPci {
    /// Assigns the device's BARs if needed, enables memory decoding and bus mastering and
    /// locates its virtio structures and MSI-X table. Does not touch the device status.
    pub fn probe(dev: PciDevice, alloc: &mut MmioAllocator) -> Result<Self, VirtioError> {
        let bars = dev.assign_memory_bars(alloc)?;
        dev.enable_memory_and_bus_master();
        let (common, _) = find_region(&dev, &bars, CFG_COMMON)?
            .filter(|(r, _)| r.len >= COMMON_CFG_MIN_LEN)
            .ok_or(VirtioError::MissingCapability("common config"))?;
        let (notify, notify_cap) = find_region(&dev, &bars, CFG_NOTIFY)?
            .ok_or(VirtioError::MissingCapability("notify"))?;
        let notify_multiplier = dev.address.read32(notify_cap + 16);
        let (isr, _) =
            find_region(&dev, &bars, CFG_ISR)?.ok_or(VirtioError::MissingCapability("ISR"))?;
        let device_cfg = find_region(&dev, &bars, CFG_DEVICE)?.map(|(r, _)| r);
        let msix = match Msix::find(dev, &bars) {
            Ok(m) => Some(m),
            Err(crate::msix::MsixError::NoCapability) => None,
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            dev,
            common: common.addr,
            notify,
            notify_multiplier,
            isr: isr.addr,
            device_cfg,
            msix,
        })
    }

    pub fn msix(&self) -> Option<&Msix> {
        self.msix.as_ref()
    }

    fn read8(&self, off: u64) -> u8 {
        phys::read::<u8>(self.common + off)
    }
    fn read16(&self, off: u64) -> u16 {
        phys::read::<u16>(self.common + off)
    }
    fn read32(&self, off: u64) -> u32 {
        phys::read::<u32>(self.common + off)
    }
    fn write8(&self, off: u64, v: u8) {
        phys::write::<u8>(self.common + off, v)
    }
    fn write16(&self, off: u64, v: u16) {
        phys::write::<u16>(self.common + off, v)
    }
    fn write32(&self, off: u64, v: u32) {
        phys::write::<u32>(self.common + off, v)
    }
    /// 64-bit fields as two 32-bit writes, low half first (§4.1.3.1 allows this).
    fn write64(&self, off: u64, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }

    pub fn status(&self) -> u8 {
        self.read8(DEVICE_STATUS)
    }

    fn add_status(&self, bits: u8) {
        let s = self.status();
        self.write8(DEVICE_STATUS, s | bits);
    }

    /// §4.1.4.3.2: writes 0 and waits until the device reads back 0.
    pub fn reset(&self) -> Result<(), VirtioError> {
        self.write8(DEVICE_STATUS, 0);
        if tsc::poll_until(RESET_TIMEOUT_US, || self.status() == 0) {
            Ok(())
        } else {
            Err(VirtioError::ResetTimeout)
        }
    }

    /// Marks the device FAILED (§3.1.1 step 8 on error).
    pub fn fail(&self) {
        self.add_status(STATUS_FAILED);
    }

    pub fn num_queues(&self) -> u16 {
        self.read16(NUM_QUEUES)
    }

    pub fn device_features(&self) -> u64 {
        self.write32(DEVICE_FEATURE_SELECT, 0);
        let low = self.read32(DEVICE_FEATURE);
        self.write32(DEVICE_FEATURE_SELECT, 1);
        let high = self.read32(DEVICE_FEATURE);
        u64::from(low) | (u64::from(high) << 32)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, then accept `wanted ∩ offered` plus VERSION_1 and set
    /// FEATURES_OK (§3.1.1 steps 1-6). Returns the accepted features.
    pub fn initialize(&self, wanted: u64) -> Result<u64, VirtioError> {
        self.reset()?;
        self.add_status(STATUS_ACKNOWLEDGE);
        self.add_status(STATUS_DRIVER);
        let offered = self.device_features();
        if offered & VIRTIO_F_VERSION_1 == 0 {
            self.fail();
            return Err(VirtioError::NoVersion1);
        }
        let accepted = offered & (wanted | VIRTIO_F_VERSION_1);
        self.write32(DRIVER_FEATURE_SELECT, 0);
        self.write32(DRIVER_FEATURE, accepted as u32);
        self.write32(DRIVER_FEATURE_SELECT, 1);
        self.write32(DRIVER_FEATURE, (accepted >> 32) as u32);
        self.add_status(STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            self.fail();
            return Err(VirtioError::FeaturesRejected);
        }
        Ok(accepted)
    }

    /// Routes configuration-change interrupts to MSI-X `vector` (or NO_VECTOR).
    pub fn set_config_vector(&self, vector: u16) -> Result<(), VirtioError> {
        self.write16(CONFIG_MSIX_VECTOR, vector);
        if vector != NO_VECTOR && self.read16(CONFIG_MSIX_VECTOR) != vector {
            return Err(VirtioError::VectorRejected {
                queue: None,
                vector,
            });
        }
        Ok(())
    }

    /// The largest size the device allows for `queue` (0: no such queue).
    pub fn queue_max_size(&self, queue: u16) -> u16 {
        self.write16(QUEUE_SELECT, queue);
        self.read16(QUEUE_SIZE)
    }

    /// Gives `queue` its memory and MSI-X vector and enables it (§4.1.5.1.3).
    pub fn setup_queue<const N: usize>(
        &self,
        queue: u16,
        ring: &SplitQueue<N>,
        msix_vector: u16,
    ) -> Result<QueueNotifier, VirtioError> {
        let max = self.queue_max_size(queue);
        if max == 0 {
            return Err(VirtioError::NoSuchQueue(queue));
        }
        if ring.size() > max {
            return Err(VirtioError::QueueTooLarge {
                queue,
                size: ring.size(),
                max,
            });
        }
        self.write16(QUEUE_SIZE, ring.size());
        self.write16(QUEUE_MSIX_VECTOR, msix_vector);
        if msix_vector != NO_VECTOR && self.read16(QUEUE_MSIX_VECTOR) != msix_vector {
            return Err(VirtioError::VectorRejected {
                queue: Some(queue),
                vector: msix_vector,
            });
        }
        self.write64(QUEUE_DESC, ring.desc_addr());
        self.write64(QUEUE_DRIVER, ring.avail_addr());
        self.write64(QUEUE_DEVICE, ring.used_addr());
        let notify_off = u64::from(self.read16(QUEUE_NOTIFY_OFF));
        let offset = notify_off * u64::from(self.notify_multiplier);
        if offset + 2 > u64::from(self.notify.len) {
            return Err(VirtioError::MissingCapability(
                "notify (queue offset outside it)",
            ));
        }
        self.write16(QUEUE_ENABLE, 1);
        Ok(QueueNotifier {
            queue,
            addr: self.notify.addr + offset,
        })
    }

    /// Sets DRIVER_OK: the device is live (§3.1.1 step 8).
    pub fn driver_ok(&self) -> Result<(), VirtioError> {
        self.add_status(STATUS_DRIVER_OK);
        if self.status() & STATUS_DEVICE_NEEDS_RESET != 0 {
            return Err(VirtioError::DeviceNeedsReset);
        }
        Ok(())
    }

    /// Tells the device new buffers are available in the queue (§4.1.5.2).
    pub fn notify(&self, notifier: &QueueNotifier) {
        notifier.notify();
    }

    /// Reads (and thereby clears) the ISR status byte (§4.1.4.5).
    pub fn read_isr(&self) -> u8 {
        phys::read::<u8>(self.isr)
    }

    /// Reads a 16- or 32-bit field of the device-specific configuration: `None` if
    /// the device has none or the field lies outside it (or is misaligned).
    fn device_config_read<T: Copy>(&self, offset: u32) -> Option<T> {
        let cfg = self.device_cfg?;
        let size = core::mem::size_of::<T>() as u32;
        (offset.is_multiple_of(size) && offset.checked_add(size)? <= cfg.len)
            .then(|| phys::read::<T>(cfg.addr + u64::from(offset)))
    }

    pub fn device_config_read16(&self, offset: u32) -> Option<u16> {
        self.device_config_read::<u16>(offset)
    }

    pub fn device_config_read32(&self, offset: u32) -> Option<u32> {
        self.device_config_read::<u32>(offset)
    }

    /// Reads a 64-bit field as two 32-bit reads, retried until `config_generation` is the
    /// same before and after (§4.1.4.3.1: the halves then belong together). `None` also
    /// if the generation never settles within `CONFIG_READ_TRIES` tries.
    pub fn device_config_read64(&self, offset: u32) -> Option<u64> {
        for _ in 0..CONFIG_READ_TRIES {
            let generation = self.read8(CONFIG_GENERATION);
            let low = self.device_config_read32(offset)?;
            let high = self.device_config_read32(offset.checked_add(4)?)?;
            if self.read8(CONFIG_GENERATION) == generation {
                return Some(u64::from(low) | (u64::from(high) << 32));
            }
        }
        None
    }
}
