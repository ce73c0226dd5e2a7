//! The vhost-user frontend every vhost-user device of the VMM shares (vhost-user spec,
//! "Front-end message types"): connect to the backend's socket and negotiate (owner,
//! features, protocol features, queue count), share guest memory (SET_MEM_TABLE with the
//! memfd regions), hand over each ring with the queue's ioeventfd as KICK and its MSI-X
//! irqfd as CALL, take the rings back (GET_VRING_BASE), switch single rings on and off
//! (SET_VRING_ENABLE), and re-dial a backend that died, restoring the running rings.
//!
//! A device type plugs in with a [`FrontendSpec`] (queue size, the protocol features it
//! wants or needs, the queue count of a backend without the MQ protocol feature) and
//! [`BackendHooks`] (which feature bits go to the backend, what a (re)connected backend
//! must offer, how many queues an inflight region covers). The device owns its
//! configuration space and feature masks; this module only carries rings.
//!
//! Every exchange with the backend is bounded (3 s, [`REPLY_TIMEOUT`]): a backend that
//! accepts and never answers is disconnected and redialled instead of blocking a vCPU
//! thread forever. A device that lists INFLIGHT_SHMFD in its wanted protocol features gets
//! an inflight region (vhost-user spec, "Inflight I/O tracking"), created on the first
//! DRIVER_OK, handed to every backend that takes the rings over, and dropped on reset.
//!
//! ```text
//! let frontend = VhostUserFrontend::connect(socket, spec, hooks, metrics)?;  // handshake
//! frontend.with_connection(|c| c.features());        // offer the guest a subset
//! frontend.activate(Rings::new(mem, features, rings))?;  // on DRIVER_OK
//! frontend.reset();                                   // on status 0
//! ```

mod connection;
mod frontend;
mod metrics;
mod reconnect;
mod watchdog;

pub use connection::{Connection, REPLY_TIMEOUT, Ring, Rings};
pub use frontend::{RingControl, VhostUserFrontend};
pub use metrics::VhostUserMetrics;

use std::path::PathBuf;

use vhost::vhost_user::message::VhostUserProtocolFeatures;

/// What a device type asks of the shared frontend.
#[derive(Clone, Debug)]
pub struct FrontendSpec {
    /// The device's name in messages, logs and the monitor thread ("vhost-user-net").
    pub kind: &'static str,
    /// Maximum entries per queue (the queue_max_size the backend is told).
    pub queue_size: u16,
    /// Protocol features used when the backend offers them. INFLIGHT_SHMFD here asks for
    /// an inflight region (see [`BackendHooks::inflight_queue_count`]).
    pub wanted_protocol: VhostUserProtocolFeatures,
    /// Protocol features the device cannot work without, and why (for the error).
    pub required_protocol: VhostUserProtocolFeatures,
    pub required_protocol_reason: &'static str,
    /// Queues a backend without the MQ protocol feature is taken to have.
    pub default_queue_count: u64,
}

/// The device-specific steps of a connection, run at start and after every reconnect.
pub trait BackendHooks: Send + Sync + 'static {
    /// Checks a newly connected backend against what the guest was promised (queue
    /// count, feature bits). An error refuses the backend.
    fn check(&self, _connection: &Connection) -> Result<(), VhostUserError> {
        Ok(())
    }
    /// The virtio feature bits for SET_FEATURES, from those the driver accepted. The
    /// frontend adds VHOST_USER_F_PROTOCOL_FEATURES.
    fn backend_features(&self, connection: &Connection, driver_features: u64) -> u64;
    /// Queues the inflight region covers (GET_INFLIGHT_FD's num_queues): the device's queue
    /// count, which may exceed the rings a driver starts. Asked once per driver, when the
    /// first backend to run its rings negotiated INFLIGHT_SHMFD.
    fn inflight_queue_count(&self, connection: &Connection) -> u16 {
        connection.queue_count().min(u64::from(u16::MAX)) as u16
    }
    /// The backend hung up (`false`), or a new one is connected and runs the rings
    /// (`true`); virtio-net reports it as its link status.
    fn connection_changed(&self, _connected: bool) {}
}

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("cannot connect to {kind} socket {}; is the backend running?", .socket.display())]
    Connect {
        kind: &'static str,
        socket: PathBuf,
        #[source]
        source: vhost::Error,
    },
    #[error("the {kind} backend at {} failed {step}", .socket.display())]
    Handshake {
        kind: &'static str,
        socket: PathBuf,
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error(
        "the {kind} backend at {} does not offer VHOST_USER_F_PROTOCOL_FEATURES; the VMM \
         needs it to enable and disable rings", .socket.display()
    )]
    NoProtocolFeatures { kind: &'static str, socket: PathBuf },
    #[error(
        "the {kind} backend at {} does not offer the {missing:?} protocol feature; {reason}",
        .socket.display()
    )]
    MissingProtocolFeature {
        kind: &'static str,
        socket: PathBuf,
        missing: VhostUserProtocolFeatures,
        reason: &'static str,
    },
    #[error(
        "the {kind} backend at {} serves {have} queues but the device needs {need}; \
         start the backend with more queues or configure fewer", .socket.display()
    )]
    TooFewQueues {
        kind: &'static str,
        socket: PathBuf,
        have: u64,
        need: u64,
    },
    #[error("the {kind} backend at {} does not fit the device: {reason}", .socket.display())]
    Incompatible {
        kind: &'static str,
        socket: PathBuf,
        reason: String,
    },
    #[error(
        "guest RAM is not backed by a shared file (memfd), so a vhost-user backend cannot map it"
    )]
    NotSharedMemory,
    #[error("queue {0}'s rings are outside guest memory")]
    RingOutsideMemory(u16),
    #[error("queue {0} is not one of the rings handed to the backend")]
    UnknownRing(u16),
    #[error("cannot create an eventfd for a vhost-user device")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the vhost-user monitor thread")]
    Spawn(#[source] std::io::Error),
    #[error("cannot start the vhost-user reply watchdog")]
    Watchdog(#[source] std::io::Error),
    #[error(
        "the {kind} backend at {} did not answer {step} within 3 s; it is treated as \
         disconnected and redialled; check that the backend process is not stuck",
        .socket.display()
    )]
    Unresponsive {
        kind: &'static str,
        socket: PathBuf,
        step: &'static str,
    },
}

impl VhostUserError {
    /// The backend accepted a request and did not answer in time.
    pub fn is_unresponsive(&self) -> bool {
        matches!(self, VhostUserError::Unresponsive { .. })
    }
}
