//! The virtio-net device whose data path is a vhost-user-net backend: the VMM owns the
//! configuration space (MAC, link status, queue pairs, MTU) and the control queue, and
//! hands the data rings (rx0, tx0, rx1, tx1, ...) to the backend.

use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::control::ControlQueue;
use super::{MAX_QUEUE_PAIRS, NetError, NetMetrics, QUEUE_SIZE};
use crate::devices::virtio::queue_worker::QueueWorker;
use crate::devices::virtio::vhost_user::{
    BackendHooks, Connection, FrontendSpec, Ring, Rings, VhostUserError, VhostUserFrontend,
};
use crate::devices::virtio::{Activation, TYPE_NET, VirtioDevice, VirtioError, VirtioInterrupt};

/// struct virtio_net_config up to `mtu` (virtio 1.2 §5.1.4): mac[6], status,
/// max_virtqueue_pairs, mtu. Speed, duplex and RSS fields follow; their features are not
/// offered.
pub(super) const CONFIG_SIZE: usize = 12;
const CONFIG_STATUS: usize = 6;
const CONFIG_MAX_PAIRS: usize = 8;
const CONFIG_MTU: usize = 10;

/// Features the backend decides about and the guest sees when the backend offers them:
/// offloads, mergeable receive buffers and the split-ring features the transport handles.
pub(super) const BACKEND_GUEST_FEATURES: u64 = 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_MRG_RXBUF
    | 1 << VIRTIO_RING_F_INDIRECT_DESC
    | 1 << VIRTIO_RING_F_EVENT_IDX;

/// Features the VMM provides itself: the configuration space and the control queue.
#[cfg(test)]
pub(super) const VMM_FEATURES: u64 = 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_STATUS
    | 1 << VIRTIO_NET_F_MTU
    | 1 << VIRTIO_NET_F_MQ
    | 1 << VIRTIO_NET_F_CTRL_VQ;

/// What goes to the backend in SET_FEATURES (when it offered them): the data-path bits,
/// virtio 1 (its header layout), and MQ (the backend serves several pairs). MAC, STATUS,
/// MTU and CTRL_VQ stay in the VMM.
const BACKEND_FEATURES: u64 =
    BACKEND_GUEST_FEATURES | 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MQ;

/// Drops offloads whose prerequisite is missing (virtio 1.2 §5.1.3.1: the TSO features
/// need the matching checksum feature), so a careless backend cannot make the offer
/// invalid.
fn consistent_offloads(mut features: u64) -> u64 {
    if features & 1 << VIRTIO_NET_F_GUEST_CSUM == 0 {
        features &= !(1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO6);
    }
    if features & 1 << VIRTIO_NET_F_CSUM == 0 {
        features &= !(1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_HOST_TSO6);
    }
    features
}

/// The device as the user configured it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetParams {
    pub mac: [u8; 6],
    pub queue_pairs: u16,
    pub mtu: Option<u16>,
}

fn spec() -> FrontendSpec {
    FrontendSpec {
        kind: "vhost-user-net",
        queue_size: QUEUE_SIZE,
        wanted_protocol: VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK,
        required_protocol: VhostUserProtocolFeatures::empty(),
        required_protocol_reason: "",
        // Without GET_QUEUE_NUM a vhost-user-net backend serves one pair.
        default_queue_count: 2,
    }
}

/// The device-specific checks of every (re)connected backend, and the link status that
/// follows the connection.
struct NetHooks {
    queue_pairs: u16,
    /// The backend features the guest was offered, fixed at the first connection; a
    /// replacement backend must offer them all.
    promised: OnceLock<u64>,
    /// The config space `status` field: VIRTIO_NET_S_LINK_UP while a backend is connected.
    status: AtomicU16,
    /// The running driver's interrupts, for the configuration change notification.
    interrupt: Mutex<Option<Arc<VirtioInterrupt>>>,
}

impl NetHooks {
    fn set_interrupt(&self, interrupt: Option<Arc<VirtioInterrupt>>) {
        *self.interrupt.lock().unwrap_or_else(|p| p.into_inner()) = interrupt;
    }
}

impl BackendHooks for NetHooks {
    fn check(&self, connection: &Connection) -> Result<(), VhostUserError> {
        let need = 2 * u64::from(self.queue_pairs);
        if connection.queue_count() < need {
            return Err(VhostUserError::TooFewQueues {
                kind: connection.kind(),
                socket: connection.socket().to_owned(),
                have: connection.queue_count(),
                need,
            });
        }
        let offered = connection.features();
        let incompatible = |reason: String| VhostUserError::Incompatible {
            kind: connection.kind(),
            socket: connection.socket().to_owned(),
            reason,
        };
        if offered & 1 << VIRTIO_F_VERSION_1 == 0 {
            return Err(incompatible(
                "it does not offer VIRTIO_F_VERSION_1 and the device has no legacy interface"
                    .into(),
            ));
        }
        if let Some(promised) = self.promised.get() {
            let missing = promised & !offered;
            if missing != 0 {
                return Err(incompatible(format!(
                    "it lacks feature bits {missing:#x} the guest was offered"
                )));
            }
        }
        Ok(())
    }

    fn backend_features(&self, connection: &Connection, driver_features: u64) -> u64 {
        driver_features & connection.features() & BACKEND_FEATURES
    }

    /// As QEMU does for vhost-user-net: no backend, no link (virtio 1.2 §5.1.4.2: the
    /// device tells the driver of a status change with a configuration change interrupt).
    fn connection_changed(&self, connected: bool) {
        let status = if connected { LINK_UP } else { 0 };
        self.status.store(status, Ordering::Release);
        let interrupt = self.interrupt.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(interrupt) = interrupt.as_ref()
            && let Err(e) = interrupt.signal_config_change()
        {
            tracing::warn!("cannot tell the driver the link changed: {e}");
        }
    }
}

const LINK_UP: u16 = VIRTIO_NET_S_LINK_UP as u16;

/// A virtio-net device served by the vhost-user-net backend behind a socket.
pub struct VhostUserNet {
    frontend: VhostUserFrontend,
    hooks: Arc<NetHooks>,
    params: NetParams,
    queue_sizes: Vec<u16>,
    features: u64,
    config: [u8; CONFIG_SIZE],
    metrics: Arc<NetMetrics>,
    control: Option<QueueWorker>,
}

impl VhostUserNet {
    /// Connects to the backend listening on `socket`, checks that it serves
    /// `params.queue_pairs` pairs and settles the features the guest is offered.
    pub fn new(socket: impl AsRef<Path>, params: NetParams) -> Result<VhostUserNet, NetError> {
        if params.queue_pairs == 0 || params.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(NetError::QueuePairs(params.queue_pairs));
        }
        let hooks = Arc::new(NetHooks {
            queue_pairs: params.queue_pairs,
            promised: OnceLock::new(),
            status: AtomicU16::new(LINK_UP),
            interrupt: Mutex::new(None),
        });
        let metrics = Arc::new(NetMetrics::default());
        let frontend =
            VhostUserFrontend::connect(socket, spec(), hooks.clone(), metrics.connection.clone())?;
        let backend = frontend
            .with_connection(|c| c.features())
            .ok_or_else(|| NetError::Gone(frontend.socket().to_owned()))?;
        let from_backend = consistent_offloads(backend & BACKEND_GUEST_FEATURES);
        let _ = hooks.promised.set(from_backend);
        let mut features = from_backend
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_CTRL_VQ;
        if params.queue_pairs > 1 {
            features |= 1 << VIRTIO_NET_F_MQ;
        }
        if params.mtu.is_some() {
            features |= 1 << VIRTIO_NET_F_MTU;
        }
        let mut config = [0u8; CONFIG_SIZE];
        config[..6].copy_from_slice(&params.mac);
        config[CONFIG_MAX_PAIRS..CONFIG_MAX_PAIRS + 2]
            .copy_from_slice(&params.queue_pairs.to_le_bytes());
        config[CONFIG_MTU..CONFIG_MTU + 2]
            .copy_from_slice(&params.mtu.unwrap_or(1500).to_le_bytes());
        // rx/tx per pair, then the control queue.
        let queue_sizes = vec![QUEUE_SIZE; 2 * usize::from(params.queue_pairs) + 1];
        tracing::debug!(
            socket = %frontend.socket().display(),
            backend_features = format_args!("{backend:#x}"),
            guest_features = format_args!("{features:#x}"),
            "vhost-user-net device ready"
        );
        Ok(VhostUserNet {
            frontend,
            hooks,
            params,
            queue_sizes,
            features,
            config,
            metrics,
            control: None,
        })
    }

    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    pub fn socket(&self) -> &Path {
        self.frontend.socket()
    }

    pub fn params(&self) -> &NetParams {
        &self.params
    }

    /// Whether the backend is connected right now.
    pub fn is_connected(&self) -> bool {
        self.frontend.is_connected()
    }

    /// A handle on the running rings, for tests to look at from outside the transport.
    #[cfg(test)]
    pub(super) fn ring_control(&self) -> crate::devices::virtio::vhost_user::RingControl {
        self.frontend.ring_control()
    }

    fn control_queue_index(&self) -> u16 {
        2 * self.params.queue_pairs
    }

    fn start(&mut self, activation: Activation) -> Result<(), NetError> {
        let Activation {
            mem,
            features,
            queues,
            interrupt,
        } = activation;
        let control_index = self.control_queue_index();
        let mut control = None;
        let mut rings = Vec::with_capacity(queues.len());
        for queue in queues {
            if queue.index == control_index {
                control = Some(queue);
                continue;
            }
            // virtio 1.2 §5.1.6.5.5: the driver starts on pair 0 alone and asks for more
            // with VQ_PAIRS_SET.
            let enabled = queue.index < 2;
            let index = queue.index;
            rings.push(Ring::from_queue(queue, index, &interrupt, enabled)?);
        }
        self.hooks.set_interrupt(Some(interrupt.clone()));
        self.frontend
            .activate(Rings::new(mem.clone(), features, rings))?;
        self.metrics.active_queue_pairs.store(1, Ordering::Relaxed);
        if let Some(queue) = control
            && features & 1 << VIRTIO_NET_F_CTRL_VQ != 0
        {
            let worker = ControlQueue {
                mem,
                queue: queue.queue,
                queue_index: queue.index,
                interrupt,
                rings: self.frontend.ring_control(),
                queue_pairs: self.params.queue_pairs,
                multiqueue: features & 1 << VIRTIO_NET_F_MQ != 0,
                metrics: self.metrics.clone(),
            };
            self.control = Some(
                QueueWorker::spawn("virtio-net-ctrl", worker, queue.kick)
                    .map_err(NetError::ControlWorker)?,
            );
        }
        Ok(())
    }
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The transport keeps offset + len within config_size.
        let mut config = self.config;
        config[CONFIG_STATUS..CONFIG_STATUS + 2]
            .copy_from_slice(&self.hooks.status.load(Ordering::Acquire).to_le_bytes());
        let start = offset as usize;
        match config.get(start..start + data.len()) {
            Some(bytes) => data.copy_from_slice(bytes),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // virtio 1.2 §5.1.4: every field is read-only for a modern driver (the MAC changes
        // through VIRTIO_NET_CTRL_MAC_ADDR_SET).
        tracing::debug!(
            offset,
            len = data.len(),
            "ignoring a virtio-net config write"
        );
    }

    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        self.control = None;
        for needed in [0, 1] {
            if !activation.queues.iter().any(|q| q.index == needed) {
                return Err(VirtioError::QueueMissing(needed));
            }
        }
        self.start(activation)
            .map_err(|e| VirtioError::Activate(Box::new(e)))
    }

    fn reset(&mut self) {
        // The control queue first: it must not switch rings the frontend is taking back.
        self.control = None;
        self.hooks.set_interrupt(None);
        self.frontend.reset();
        self.metrics.active_queue_pairs.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tso_without_checksum_offload_is_not_offered() {
        let tso = 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6;
        assert_eq!(
            consistent_offloads(tso | 1 << VIRTIO_NET_F_MRG_RXBUF),
            1 << VIRTIO_NET_F_MRG_RXBUF
        );
        let csum = 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_GUEST_CSUM;
        assert_eq!(consistent_offloads(tso | csum), tso | csum);
        assert_eq!(
            consistent_offloads(tso | 1 << VIRTIO_NET_F_CSUM),
            1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4 | 1 << VIRTIO_NET_F_HOST_TSO6
        );
    }
}
