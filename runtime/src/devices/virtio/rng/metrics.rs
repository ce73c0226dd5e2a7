//! Counters of one virtio-rng device, readable while it runs.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct RngMetrics {
    /// Times the driver started the device (DRIVER_OK).
    pub activations: AtomicU64,
    /// Descriptor chains the worker answered.
    pub requests: AtomicU64,
    /// Random bytes written into guest buffers.
    pub bytes: AtomicU64,
    /// Bad descriptors (device-readable, outside guest memory) and failed source reads.
    pub errors: AtomicU64,
    /// Interrupts the worker could not raise.
    pub interrupt_failures: AtomicU64,
}

impl RngMetrics {
    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
