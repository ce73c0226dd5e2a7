//! Event handling of virtio-rng: requests served on a [`QueueWorker`] thread.
//!
//! [`QueueWorker`]: crate::devices::virtio::queue_worker::QueueWorker

use std::fs::File;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddressSpace};

use super::RngMetrics;
use crate::devices::virtio::VirtioInterrupt;
use crate::devices::virtio::queue_worker::QueueHandler;
use crate::memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Bytes served per request at most. The device may fill less than offered (virtio 1.2
/// §5.4.6.1); the cap keeps one huge chain from occupying the worker.
const MAX_REQUEST_BYTES: u32 = 64 << 10;

/// What the worker thread owns while the device runs.
pub(super) struct RequestHandler {
    pub mem: GuestMemoryAtomic,
    pub queue: Queue,
    pub queue_index: u16,
    pub interrupt: Arc<VirtioInterrupt>,
    pub source: File,
    pub metrics: Arc<RngMetrics>,
}

impl QueueHandler for RequestHandler {
    /// Answers every available request, then interrupts the driver if it wants that.
    fn process_queue(&mut self) {
        let guard = self.mem.memory();
        let mem: &GuestMemoryMmap = &guard;
        let mut used = 0u32;
        loop {
            if let Err(e) = self.queue.disable_notification(mem) {
                tracing::debug!("cannot disable virtio-rng notifications: {e}");
            }
            let mut progressed = false;
            while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
                progressed = true;
                let head = chain.head_index();
                let len = self.fill(chain, mem);
                if let Err(e) = self.queue.add_used(mem, head, len) {
                    RngMetrics::add(&self.metrics.errors, 1);
                    tracing::debug!(head, "cannot return a virtio-rng buffer: {e}");
                    continue;
                }
                RngMetrics::add(&self.metrics.requests, 1);
                used += 1;
            }
            match self.queue.enable_notification(mem) {
                Ok(true) if progressed || self.avail_index_is_sane(mem) => continue,
                Ok(true) => {
                    // The driver's avail index runs more than a queue ahead: nothing can
                    // be popped, and looping would spin. Wait for the next kick (a reset
                    // is the driver's way out).
                    RngMetrics::add(&self.metrics.errors, 1);
                    tracing::debug!("virtio-rng avail index is out of range; queue stalled");
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    tracing::debug!("cannot re-enable virtio-rng notifications: {e}");
                    break;
                }
            }
        }
        if used == 0 {
            return;
        }
        // On an error reading used_event, interrupt anyway: a spurious interrupt is
        // harmless, a missing one stalls the driver.
        if self.queue.needs_notification(mem).unwrap_or(true)
            && let Err(e) = self.interrupt.signal_used_queue(self.queue_index)
        {
            RngMetrics::add(&self.metrics.interrupt_failures, 1);
            tracing::warn!("cannot interrupt the guest for virtio-rng: {e}");
        }
    }
}

impl RequestHandler {
    /// Whether the driver's avail index is at most a queue size ahead of ours.
    fn avail_index_is_sane(&self, mem: &GuestMemoryMmap) -> bool {
        self.queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|idx| {
                (idx - std::num::Wrapping(self.queue.next_avail())).0 <= self.queue.size()
            })
    }

    /// Fills the chain's device-writable buffers; returns the bytes written.
    fn fill(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let mut written = 0u32;
        for desc in chain {
            if !desc.is_write_only() {
                // virtio 1.2 §5.4.6: requests carry device-writable buffers only.
                RngMetrics::add(&self.metrics.errors, 1);
                tracing::debug!(
                    addr = desc.addr().0,
                    "skipping a device-readable rng buffer"
                );
                continue;
            }
            let want = desc.len().min(MAX_REQUEST_BYTES - written) as usize;
            if want == 0 {
                break;
            }
            match mem.read_volatile_from(desc.addr(), &mut self.source, want) {
                Ok(n) => {
                    written += n as u32;
                    RngMetrics::add(&self.metrics.bytes, n as u64);
                    if n < want {
                        // Source exhausted (a regular file at its end).
                        break;
                    }
                }
                Err(e) => {
                    RngMetrics::add(&self.metrics.errors, 1);
                    tracing::debug!(
                        addr = desc.addr().0,
                        len = desc.len(),
                        "cannot fill an rng buffer: {e}"
                    );
                    break;
                }
            }
        }
        written
    }
}
