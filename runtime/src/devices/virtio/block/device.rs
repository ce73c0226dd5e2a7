//! The virtio-blk device whose data path is a vhost-user backend: the VMM only sets the
//! rings up; requests go from the guest to the backend and back through eventfds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::backend::{Backend, CONFIG_SIZE, Ring, Rings};
use super::reconnect::Monitor;
use super::{BlockError, BlockMetrics, QUEUE_SIZE};
use crate::devices::virtio::{Activation, TYPE_BLOCK, VirtioDevice, VirtioError};

/// The connection and the running rings, shared with the reconnect thread.
pub(super) struct Session {
    /// `None` while the backend is gone and the reconnect thread is knocking.
    pub backend: Option<Backend>,
    /// The driver's rings from DRIVER_OK until reset, handed to every new connection.
    pub rings: Option<Rings>,
}

pub(super) struct Shared {
    pub socket: PathBuf,
    pub session: Mutex<Session>,
    pub metrics: Arc<BlockMetrics>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Session> {
        // A panic elsewhere while holding the lock leaves consistent data: every field is
        // replaced whole.
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Session {
    /// Counts a failed request to the backend; one that timed out disconnects it, so the
    /// monitor redials it and hands it the rings as after a crash.
    pub fn backend_failed(&mut self, metrics: &BlockMetrics, error: &BlockError) {
        BlockMetrics::add(&metrics.backend_errors, 1);
        tracing::warn!("{error}");
        if error.is_unresponsive()
            && let Some(backend) = self.backend.take()
        {
            backend.abandon();
        }
    }
}

/// A vhost-user-blk disk: a virtio-blk device served by the backend behind a socket.
pub struct VhostUserBlk {
    shared: Arc<Shared>,
    queue_sizes: Vec<u16>,
    features: u64,
    config: [u8; CONFIG_SIZE],
    /// Watches the connection and reconnects; stopped and joined on drop.
    _monitor: Monitor,
}

impl VhostUserBlk {
    /// Connects to the backend listening on `socket`, negotiates with it and reads the
    /// disk's configuration (capacity, block size, queue count).
    pub fn new(socket: impl AsRef<Path>) -> Result<VhostUserBlk, BlockError> {
        let socket = socket.as_ref().to_path_buf();
        let backend = Backend::connect(&socket)?;
        let queue_sizes = vec![QUEUE_SIZE; backend.queue_count()];
        let features = backend.guest_features();
        let config = *backend.config();
        let shared = Arc::new(Shared {
            socket,
            session: Mutex::new(Session {
                backend: Some(backend),
                rings: None,
            }),
            metrics: Arc::new(BlockMetrics::default()),
        });
        let monitor = Monitor::spawn(shared.clone())?;
        Ok(VhostUserBlk {
            shared,
            queue_sizes,
            features,
            config,
            _monitor: monitor,
        })
    }

    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.shared.metrics.clone()
    }

    pub fn socket(&self) -> &Path {
        &self.shared.socket
    }

    /// The disk size in 512-byte sectors, as the backend reported it.
    pub fn capacity(&self) -> u64 {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&self.config[..8]);
        u64::from_le_bytes(bytes)
    }

    /// Whether the backend is connected right now.
    pub fn is_connected(&self) -> bool {
        self.shared.lock().backend.is_some()
    }

    fn rings(activation: Activation) -> Result<Rings, BlockError> {
        let mut queues = Vec::with_capacity(activation.queues.len());
        for q in activation.queues {
            let call = match activation.interrupt.queue_irqfd(q.index) {
                Some(irqfd) => irqfd.try_clone(),
                // No vector: the driver polls; the backend signals an eventfd nobody reads.
                None => EventFd::new(EFD_NONBLOCK),
            }
            .map_err(BlockError::EventFd)?;
            queues.push(Ring {
                index: q.index,
                size: q.queue.size(),
                desc: q.queue.desc_table(),
                avail: q.queue.avail_ring(),
                used: q.queue.used_ring(),
                next_avail: q.queue.next_avail(),
                kick: q.kick,
                call,
            });
        }
        Ok(Rings {
            mem: activation.mem,
            features: activation.features,
            queues,
            inflight: None,
        })
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

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut session = self.shared.lock();
        let Some(backend) = session.backend.as_mut() else {
            tracing::warn!("vhost-user-blk backend is disconnected; config write dropped");
            return;
        };
        match backend.write_config(offset, data) {
            Ok(()) => self.config = *backend.config(),
            Err(e) => session.backend_failed(&self.shared.metrics, &e),
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        let mut rings = Self::rings(activation).map_err(|e| VirtioError::Activate(Box::new(e)))?;
        let mut session = self.shared.lock();
        session.rings = None;
        match session.backend.as_mut() {
            Some(backend) => {
                if let Err(e) = backend.start(&mut rings) {
                    if !e.is_unresponsive() {
                        BlockMetrics::add(&self.shared.metrics.backend_errors, 1);
                        return Err(VirtioError::Activate(Box::new(e)));
                    }
                    // Like a backend that is away: the rings start when one answers.
                    session.backend_failed(&self.shared.metrics, &e);
                }
            }
            None => tracing::warn!(
                socket = %self.shared.socket.display(),
                "vhost-user-blk backend is disconnected; the rings start when it is back"
            ),
        }
        session.rings = Some(rings);
        BlockMetrics::add(&self.shared.metrics.activations, 1);
        Ok(())
    }

    fn reset(&mut self) {
        let mut session = self.shared.lock();
        let Some(mut rings) = session.rings.take() else {
            return;
        };
        if let Some(backend) = session.backend.as_mut()
            && let Err(e) = backend.stop(&mut rings)
        {
            tracing::warn!("cannot stop the vhost-user-blk rings");
            session.backend_failed(&self.shared.metrics, &e);
        }
        // Dropping the rings drops the inflight region too: a new driver starts clean.
    }
}
