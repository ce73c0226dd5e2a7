//! The virtio-blk device whose data path is a vhost-user backend: the VMM only reads the
//! disk's configuration and sets the rings up through the shared vhost-user frontend;
//! requests go from the guest to the backend and back through eventfds.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::{BlockError, QUEUE_SIZE};
use crate::devices::virtio::pci::MAX_QUEUES;
use crate::devices::virtio::vhost_user::{
    BackendHooks, Connection, FrontendSpec, Ring, Rings, VhostUserError, VhostUserFrontend,
    VhostUserMetrics,
};
use crate::devices::virtio::{Activation, TYPE_BLOCK, VirtioDevice, VirtioError};

/// struct virtio_blk_config up to and including the write-zeroes fields (virtio 1.2
/// §5.2.4); secure-erase and zoned fields follow, and their features are not offered.
pub(super) const CONFIG_SIZE: usize = 60;
/// Offset of `num_queues` in the configuration space.
const CONFIG_NUM_QUEUES: usize = 34;
/// Offset of `writeback` (VIRTIO_BLK_F_CONFIG_WCE).
const CONFIG_WRITEBACK: usize = 32;

/// Feature bits passed from the backend to the guest: the virtio-blk features whose
/// configuration fields fit [`CONFIG_SIZE`], and the split-ring features the transport
/// handles. No packed rings and no ACCESS_PLATFORM: the transport has neither.
pub(super) const GUEST_FEATURES: u64 = 1 << VIRTIO_BLK_F_SIZE_MAX
    | 1 << VIRTIO_BLK_F_SEG_MAX
    | 1 << VIRTIO_BLK_F_GEOMETRY
    | 1 << VIRTIO_BLK_F_RO
    | 1 << VIRTIO_BLK_F_BLK_SIZE
    | 1 << VIRTIO_BLK_F_FLUSH
    | 1 << VIRTIO_BLK_F_TOPOLOGY
    | 1 << VIRTIO_BLK_F_CONFIG_WCE
    | 1 << VIRTIO_BLK_F_MQ
    | 1 << VIRTIO_BLK_F_DISCARD
    | 1 << VIRTIO_BLK_F_WRITE_ZEROES
    | 1 << VIRTIO_RING_F_INDIRECT_DESC
    | 1 << VIRTIO_RING_F_EVENT_IDX;

fn spec() -> FrontendSpec {
    FrontendSpec {
        kind: "vhost-user-blk",
        queue_size: QUEUE_SIZE,
        // INFLIGHT_SHMFD: a restarted backend resubmits the requests its predecessor had
        // in flight, in any order, instead of relying on in-order completion.
        wanted_protocol: VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::CONFIG,
        required_protocol: VhostUserProtocolFeatures::CONFIG,
        required_protocol_reason: "the VMM needs it to read the disk's size",
        default_queue_count: 1,
    }
}

/// The virtio-blk steps of every (re)connection.
struct BlockHooks {
    /// The device's queue count, settled at the first connection: what the inflight
    /// region covers.
    queue_count: OnceLock<u16>,
}

impl BackendHooks for BlockHooks {
    fn backend_features(&self, connection: &Connection, driver_features: u64) -> u64 {
        driver_features & (connection.features() | GUEST_FEATURES | 1 << VIRTIO_F_VERSION_1)
    }

    fn inflight_queue_count(&self, connection: &Connection) -> u16 {
        match self.queue_count.get() {
            Some(&count) => count,
            None => connection.queue_count().clamp(1, MAX_QUEUES as u64) as u16,
        }
    }
}

/// A vhost-user-blk disk: a virtio-blk device served by the backend behind a socket.
pub struct VhostUserBlk {
    frontend: VhostUserFrontend,
    queue_sizes: Vec<u16>,
    features: u64,
    config: [u8; CONFIG_SIZE],
}

impl VhostUserBlk {
    /// Connects to the backend listening on `socket`, negotiates with it and reads the
    /// disk's configuration (capacity, block size, queue count).
    pub fn new(socket: impl AsRef<Path>) -> Result<VhostUserBlk, BlockError> {
        let hooks = Arc::new(BlockHooks {
            queue_count: OnceLock::new(),
        });
        let metrics = Arc::new(VhostUserMetrics::default());
        let frontend = VhostUserFrontend::connect(socket, spec(), hooks.clone(), metrics)?;
        let (bytes, backend_features, backend_queues) = frontend
            .with_connection(|c| {
                let bytes = c.get_config(CONFIG_SIZE)?;
                Ok::<_, VhostUserError>((bytes, c.features(), c.queue_count()))
            })
            .ok_or_else(|| BlockError::Gone(frontend.socket().to_owned()))??;
        let mut config = [0u8; CONFIG_SIZE];
        match bytes.get(..CONFIG_SIZE) {
            Some(bytes) => config.copy_from_slice(bytes),
            None => {
                return Err(BlockError::ShortConfig {
                    socket: frontend.socket().to_owned(),
                    got: bytes.len(),
                });
            }
        }

        let config_queues = if backend_features & 1 << VIRTIO_BLK_F_MQ != 0 {
            let at = CONFIG_NUM_QUEUES;
            u64::from(u16::from_le_bytes([config[at], config[at + 1]]))
        } else {
            1
        };
        let queue_count = config_queues
            .min(backend_queues)
            .clamp(1, MAX_QUEUES as u64) as u16;
        let _ = hooks.queue_count.set(queue_count);
        // The guest sees exactly the queues the device has.
        config[CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2]
            .copy_from_slice(&queue_count.to_le_bytes());
        let features = backend_features & GUEST_FEATURES;
        tracing::debug!(
            socket = %frontend.socket().display(),
            features = format_args!("{features:#x}"),
            queues = queue_count,
            "vhost-user-blk device ready"
        );
        Ok(VhostUserBlk {
            frontend,
            queue_sizes: vec![QUEUE_SIZE; usize::from(queue_count)],
            features,
            config,
        })
    }

    pub fn metrics(&self) -> Arc<VhostUserMetrics> {
        self.frontend.metrics()
    }

    pub fn socket(&self) -> &Path {
        self.frontend.socket()
    }

    /// The disk size in 512-byte sectors, as the backend reported it.
    pub fn capacity(&self) -> u64 {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&self.config[..8]);
        u64::from_le_bytes(bytes)
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

    fn start(&self, activation: Activation) -> Result<(), BlockError> {
        let Activation {
            mem,
            features,
            queues,
            interrupt,
        } = activation;
        let mut rings = Vec::with_capacity(queues.len());
        for queue in queues {
            let index = queue.index;
            rings.push(Ring::from_queue(queue, index, &interrupt, true)?);
        }
        self.frontend
            .activate(Rings::new(mem, features, rings))
            .map_err(BlockError::from)
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
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
        let start = offset as usize;
        match self.config.get(start..start + data.len()) {
            Some(bytes) => data.copy_from_slice(bytes),
            None => data.fill(0),
        }
    }

    /// Forwards a driver's write of the `writeback` byte (the only writable field).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let writable = offset == CONFIG_WRITEBACK as u64
            && data.len() == 1
            && self.features & 1 << VIRTIO_BLK_F_CONFIG_WCE != 0;
        if !writable {
            tracing::debug!(
                offset,
                len = data.len(),
                "ignoring a read-only config write"
            );
            return;
        }
        match self.frontend.request(|c| c.set_config(offset as u32, data)) {
            Some(Ok(())) => self.config[CONFIG_WRITEBACK] = data[0],
            // Counted and logged by the frontend.
            Some(Err(_)) => {}
            None => tracing::warn!("vhost-user-blk backend is disconnected; config write dropped"),
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        self.start(activation)
            .map_err(|e| VirtioError::Activate(Box::new(e)))
    }

    fn reset(&mut self) {
        self.frontend.reset();
    }
}
