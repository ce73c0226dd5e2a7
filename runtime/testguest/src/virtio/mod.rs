//! Virtio 1.2 drivers' shared parts: the modern PCI transport (§4.1) and split
//! virtqueues (§2.7). Device drivers (rng, blk, net) build on these.

pub mod blk;
pub mod net;
pub mod pci;
pub mod queue;

use core::fmt;

use crate::msix::MsixError;
use crate::pci::PciError;

pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern (non-transitional) PCI device IDs are 0x1040 + virtio device ID (§4.1.2.1).
pub const fn modern_pci_device_id(virtio_device_id: u16) -> u16 {
    0x1040 + virtio_device_id
}
pub const VIRTIO_ID_NET: u16 = 1;
pub const VIRTIO_ID_BLOCK: u16 = 2;
pub const VIRTIO_ID_RNG: u16 = 4;

/// §6: the device complies with virtio 1.0+ (required by the modern transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// §4.1.4.3 / §4.1.5.1.2: "no MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;

#[derive(Debug, Clone, Copy)]
pub enum VirtioError {
    Pci(PciError),
    Msix(MsixError),
    /// A required virtio PCI capability (common/notify/isr) is absent or outside its BAR.
    MissingCapability(&'static str),
    ResetTimeout,
    NoVersion1,
    FeaturesRejected,
    NoSuchQueue(u16),
    QueueTooLarge {
        queue: u16,
        size: u16,
        max: u16,
    },
    /// The device answered NO_VECTOR when given an MSI-X vector.
    VectorRejected {
        queue: Option<u16>,
        vector: u16,
    },
    QueueFull,
    /// The device needs a reset (status bit 6).
    DeviceNeedsReset,
}

impl fmt::Display for VirtioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pci(e) => write!(f, "{e}"),
            Self::Msix(e) => write!(f, "{e}"),
            Self::MissingCapability(which) => {
                write!(
                    f,
                    "virtio {which} capability missing or outside its BAR; is this a modern virtio-pci device (disable-legacy=on)?"
                )
            }
            Self::ResetTimeout => write!(f, "device status did not read 0 after reset"),
            Self::NoVersion1 => write!(f, "device does not offer VIRTIO_F_VERSION_1"),
            Self::FeaturesRejected => {
                write!(f, "device cleared FEATURES_OK after feature negotiation")
            }
            Self::NoSuchQueue(q) => write!(f, "device has no queue {q}"),
            Self::QueueTooLarge { queue, size, max } => {
                write!(
                    f,
                    "queue {queue}: driver size {size} exceeds the device maximum {max}"
                )
            }
            Self::VectorRejected {
                queue: Some(q),
                vector,
            } => {
                write!(
                    f,
                    "device rejected MSI-X vector {vector} for queue {q}; is MSI-X enabled?"
                )
            }
            Self::VectorRejected {
                queue: None,
                vector,
            } => {
                write!(
                    f,
                    "device rejected MSI-X vector {vector} for config changes"
                )
            }
            Self::QueueFull => write!(f, "no free descriptors in the virtqueue"),
            Self::DeviceNeedsReset => write!(f, "device set DEVICE_NEEDS_RESET"),
        }
    }
}

impl From<PciError> for VirtioError {
    fn from(e: PciError) -> Self {
        Self::Pci(e)
    }
}

impl From<MsixError> for VirtioError {
    fn from(e: MsixError) -> Self {
        Self::Msix(e)
    }
}
