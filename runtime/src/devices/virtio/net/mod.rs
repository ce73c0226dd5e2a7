//! virtio-net (device ID 1) served by a vhost-user-net backend (vhost-user spec; virtio 1.2
//! §5.1), as QEMU and Cloud Hypervisor do it: the VMM owns the configuration space (MAC,
//! link status, queue pairs, MTU) and answers the control queue itself; the backend gets
//! the data queues only (rx0, tx0, rx1, tx1, ...), shares guest memory and moves frames
//! through the rings with the queues' ioeventfds and irqfds. Frames never pass through the
//! VMM. Feature bits: what the backend offers of the data-path set, plus MAC, STATUS,
//! CTRL_VQ, MQ and MTU from the VMM. If the backend dies, the shared vhost-user monitor
//! reconnects and restores the rings.

mod control;
mod device;
mod metrics;

pub use device::{NetParams, VhostUserNet};
pub use metrics::NetMetrics;

use std::path::PathBuf;

use crate::devices::virtio::vhost_user::VhostUserError;

/// Entries per queue: QEMU's virtio-net default.
pub const QUEUE_SIZE: u16 = 256;
/// Pairs per device: 2 × pairs + the control queue fit the transport's queue limit.
pub const MAX_QUEUE_PAIRS: u16 = ((crate::devices::virtio::pci::MAX_QUEUES - 1) / 2) as u16;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    #[error("{0} queue pairs asked for; a virtio-net device here has 1..={MAX_QUEUE_PAIRS}")]
    QueuePairs(u16),
    #[error("the vhost-user-net backend at {} hung up during set-up; is it crashing?", .0.display())]
    Gone(PathBuf),
    #[error("cannot start the virtio-net control queue thread")]
    ControlWorker(#[source] std::io::Error),
}
