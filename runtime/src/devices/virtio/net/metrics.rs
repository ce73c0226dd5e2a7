//! Counters of one vhost-user-net device, readable while it runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::devices::virtio::vhost_user::VhostUserMetrics;

#[derive(Debug, Default)]
pub struct NetMetrics {
    /// The backend connection: activations, disconnects, reconnects, backend errors.
    pub connection: Arc<VhostUserMetrics>,
    /// Control queue commands answered VIRTIO_NET_OK.
    pub control_commands: AtomicU64,
    /// Control queue commands answered VIRTIO_NET_ERR, or too malformed to answer.
    pub control_errors: AtomicU64,
    /// Queue pairs the backend serves now (1 until the driver asks for more).
    pub active_queue_pairs: AtomicU64,
}

impl NetMetrics {
    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// (name, value) pairs for the API's vm.counters.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let mut all = self.connection.snapshot();
        all.extend([
            ("control_commands", Self::get(&self.control_commands)),
            ("control_errors", Self::get(&self.control_errors)),
            ("active_queue_pairs", Self::get(&self.active_queue_pairs)),
        ]);
        all
    }
}
