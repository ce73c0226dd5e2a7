//! Virtio devices behind the modern virtio-pci transport (virtio 1.2 §4.1, no legacy).
//!
//! # Wiring (what the VMM calls)
//!
//! `vmm::Vm::start` does it like this:
//!
//! ```text
//! let root = PciRoot::new(mmio_bus.clone(), vm.clone());          // bus 0 + host bridge
//! pio_bus.insert(0xcf8, 8, root.config_io())?;                    // mechanism #1
//! let rng = Rng::new(Rng::DEFAULT_SOURCE)?;                       // opens /dev/urandom
//! let bdf = add_virtio_device(&root, Box::new(rng), &router, guest_memory.clone())?;
//! ```
//!
//! [`add_virtio_device`] wraps a [`VirtioDevice`] in a [`VirtioPciDevice`], allocates its
//! MSI-X vectors (one per queue plus one for configuration changes) from the
//! [`InterruptRouter`], plugs it into the next free slot of bus 0 and maps its BAR 0.
//! Queue notifications are KVM ioeventfds: a guest kick wakes the device's worker
//! without leaving the kernel. Used-buffer notifications are MSI-X irqfds.
//!
//! # Writing a device
//!
//! A device declares its type, queue sizes, features and configuration space. On
//! DRIVER_OK the transport calls [`VirtioDevice::activate`] with everything a worker
//! thread — or a vhost-user backend — needs: guest memory, the negotiated features, each
//! enabled queue (sizes and ring addresses in [`virtio_queue::Queue`]) with its kick
//! eventfd, and a [`VirtioInterrupt`] that raises the queue's vector or hands out its
//! irqfd. A status write of 0 calls [`VirtioDevice::reset`]: the device stops its
//! workers and forgets the queues; the transport resets its own state.
//!
//! Each device follows the same layout: `device.rs` (the [`VirtioDevice`]), `worker.rs`
//! (its event handling), `metrics.rs` (counters); persisted state comes with snapshots.

pub mod block;
pub mod net;
pub mod pci;
pub mod queue_worker;
pub mod rng;
#[cfg(test)]
mod testing;
pub mod vhost_user;

pub use pci::VirtioPciDevice;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::pci::{Msix, PciBdf, PciError, PciRoot};
use crate::memory::GuestMemoryAtomic;
use crate::vm::interrupt::{InterruptError, InterruptRouter};

/// Device IDs (virtio 1.2 §5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;

/// "No vector" in config_msix_vector / queue_msix_vector (virtio 1.2 §4.1.5.1.2).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// ISR status bits (virtio 1.2 §4.1.4.5).
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("cannot plug the virtio device into PCI bus 0")]
    Pci(#[source] PciError),
    #[error("cannot allocate MSI-X vectors for the virtio device")]
    Interrupt(#[source] InterruptError),
    #[error("cannot create or clone a queue notification eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("a virtio-pci device has 1..={max} queues here, not {0}", max = pci::MAX_QUEUES)]
    QueueCount(usize),
    #[error("queue {queue} offers maximum size {size}; it must be a power of two in 1..=32768")]
    QueueMaxSize { queue: usize, size: u16 },
    #[error("device configuration space of {0} bytes exceeds the 4 KiB region of the transport")]
    ConfigTooLarge(usize),
    #[error(
        "the driver enabled queue {0} with rings outside guest memory or misaligned; \
         the device needs a reset"
    )]
    QueueInvalid(u16),
    #[error("the device needs queue {0} enabled by the driver")]
    QueueMissing(u16),
    #[error("the virtio device failed to start")]
    Activate(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// Device ID (virtio 1.2 §5), e.g. [`TYPE_RNG`].
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (powers of two); the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device and ring feature bits offered. The transport adds VIRTIO_F_VERSION_1.
    fn features(&self) -> u64;
    /// Size of the device-specific configuration space in bytes.
    fn config_size(&self) -> usize {
        0
    }
    /// Reads device configuration; the transport keeps `offset + data.len()` within
    /// [`config_size`](Self::config_size).
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// Writes device configuration, within [`config_size`](Self::config_size).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device on DRIVER_OK. An error sets DEVICE_NEEDS_RESET.
    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError>;
    /// Stops the device (workers joined, backend told) and forgets the queues.
    fn reset(&mut self);
}

/// What a device gets on DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemoryAtomic,
    /// Features the driver accepted (FEATURES_OK).
    pub features: u64,
    /// Queues the driver enabled, in index order, validated against guest memory.
    pub queues: Vec<ActiveQueue>,
    pub interrupt: Arc<VirtioInterrupt>,
}

/// One enabled queue: `queue` carries size and ring addresses (desc_table(),
/// avail_ring(), used_ring(), size(), event_idx_enabled()).
pub struct ActiveQueue {
    pub index: u16,
    pub queue: Queue,
    /// Signalled by KVM on every guest kick of this queue (VHOST_USER_SET_VRING_KICK).
    pub kick: EventFd,
}

/// Raises a device's interrupts: its MSI-X vectors as the driver mapped them.
pub struct VirtioInterrupt {
    msix: Arc<Msix>,
    isr: Arc<AtomicU8>,
    config_generation: Arc<AtomicU8>,
    config_vector: u16,
    queue_vectors: Vec<u16>,
}

impl VirtioInterrupt {
    /// Tells the driver that queue `queue` has new used buffers.
    pub fn signal_used_queue(&self, queue: u16) -> Result<(), InterruptError> {
        self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
        match self.queue_vector(queue) {
            Some(v) => self.msix.trigger(v),
            None => Ok(()),
        }
    }

    /// Tells the driver that the device configuration changed.
    pub fn signal_config_change(&self) -> Result<(), InterruptError> {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
        match self.config_vector {
            VIRTIO_MSI_NO_VECTOR => Ok(()),
            v => self.msix.trigger(v),
        }
    }

    /// The irqfd that raises queue `queue`'s vector (VHOST_USER_SET_VRING_CALL), or
    /// `None` if the driver gave the queue no vector.
    pub fn queue_irqfd(&self, queue: u16) -> Option<&EventFd> {
        self.msix.irqfd(self.queue_vector(queue)?)
    }

    /// The irqfd of the configuration-change vector (VHOST_USER_SLAVE_CONFIG_CHANGE_MSG).
    pub fn config_irqfd(&self) -> Option<&EventFd> {
        self.msix.irqfd(self.config_vector)
    }

    fn queue_vector(&self, queue: u16) -> Option<u16> {
        self.queue_vectors
            .get(usize::from(queue))
            .copied()
            .filter(|v| *v != VIRTIO_MSI_NO_VECTOR)
    }
}

/// Plugs `device` into bus 0 behind a virtio-pci transport. Returns its address.
pub fn add_virtio_device(
    root: &PciRoot,
    device: Box<dyn VirtioDevice>,
    router: &Arc<InterruptRouter>,
    mem: GuestMemoryAtomic,
) -> Result<PciBdf, VirtioError> {
    let vectors = pci::msix_vectors_for(device.queue_max_sizes().len())?;
    let group = router
        .create_msi_group(vectors)
        .map_err(VirtioError::Interrupt)?;
    let msix = Msix::new(group).map_err(VirtioError::Pci)?;
    let transport = VirtioPciDevice::new(device, msix, mem)?;
    root.add_device(Arc::new(Mutex::new(transport)))
        .map_err(VirtioError::Pci)
}
