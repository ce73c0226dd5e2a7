//! Counters of one vhost-user connection, readable while it runs.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct VhostUserMetrics {
    /// Times the driver started the device (DRIVER_OK) and the rings went to the backend.
    pub activations: AtomicU64,
    /// Times the backend hung up (crash, restart).
    pub disconnects: AtomicU64,
    /// Times the VMM connected again after a hang-up and handed the rings back.
    pub reconnects: AtomicU64,
    /// vhost-user requests the backend failed or did not answer.
    pub backend_errors: AtomicU64,
}

impl VhostUserMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// (name, value) pairs for the API's vm.counters.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("activations", Self::get(&self.activations)),
            ("disconnects", Self::get(&self.disconnects)),
            ("reconnects", Self::get(&self.reconnects)),
            ("backend_errors", Self::get(&self.backend_errors)),
        ]
    }
}
