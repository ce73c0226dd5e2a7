//! The virtio-rng device: one request queue, no configuration space.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::worker::RequestHandler;
use super::{RngError, RngMetrics};
use crate::devices::virtio::queue_worker::QueueWorker;
use crate::devices::virtio::{Activation, TYPE_RNG, VirtioDevice, VirtioError};

const QUEUE_SIZES: [u16; 1] = [256];
const REQUEST_QUEUE: u16 = 0;

pub struct Rng {
    source_path: PathBuf,
    source: File,
    metrics: Arc<RngMetrics>,
    worker: Option<QueueWorker>,
}

impl Rng {
    pub const DEFAULT_SOURCE: &'static str = "/dev/urandom";

    /// A device serving bytes read from `source` (a character device such as
    /// /dev/urandom, or a file). The source is opened now so that a bad path fails at
    /// VM creation, not when the guest driver loads.
    pub fn new(source: impl AsRef<Path>) -> Result<Rng, RngError> {
        let source_path = source.as_ref().to_path_buf();
        let source = File::open(&source_path).map_err(|e| RngError::OpenSource {
            path: source_path.clone(),
            source: e,
        })?;
        Ok(Rng {
            source_path,
            source,
            metrics: Arc::new(RngMetrics::default()),
            worker: None,
        })
    }

    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }

    pub fn source_path(&self) -> &Path {
        &self.source_path
    }

    fn start(&mut self, activation: Activation) -> Result<(), RngError> {
        let queue = activation
            .queues
            .into_iter()
            .find(|q| q.index == REQUEST_QUEUE);
        let Some(queue) = queue else {
            // Reported by the caller as a missing queue.
            return Ok(());
        };
        let handler = RequestHandler {
            mem: activation.mem,
            queue: queue.queue,
            queue_index: queue.index,
            interrupt: activation.interrupt,
            source: self.source.try_clone().map_err(RngError::CloneSource)?,
            metrics: self.metrics.clone(),
        };
        self.worker =
            Some(QueueWorker::spawn("virtio-rng", handler, queue.kick).map_err(RngError::Worker)?);
        Ok(())
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_RING_F_INDIRECT_DESC | 1 << VIRTIO_RING_F_EVENT_IDX
    }

    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        // A second DRIVER_OK without reset cannot happen through the transport; be safe.
        self.worker = None;
        if !activation.queues.iter().any(|q| q.index == REQUEST_QUEUE) {
            return Err(VirtioError::QueueMissing(REQUEST_QUEUE));
        }
        self.start(activation)
            .map_err(|e| VirtioError::Activate(Box::new(e)))?;
        RngMetrics::add(&self.metrics.activations, 1);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker stops and joins its thread.
        self.worker = None;
    }
}
