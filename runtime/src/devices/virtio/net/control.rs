//! Event handling of virtio-net: the control queue, answered by the VMM itself (virtio 1.2
//! §5.1.6.5). The backend only sees the data queues; VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
//! becomes SET_VRING_ENABLE on its rings.

use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST,
    VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use super::NetMetrics;
use crate::devices::virtio::VirtioInterrupt;
use crate::devices::virtio::queue_worker::QueueHandler;
use crate::devices::virtio::vhost_user::{RingControl, VhostUserError};
use crate::memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// The largest command read: a MAC table of a few hundred entries. Longer chains are
/// refused before anything is allocated for them.
const MAX_COMMAND_BYTES: usize = 8 << 10;
const OK: u8 = VIRTIO_NET_OK as u8;
const ERR: u8 = VIRTIO_NET_ERR as u8;

/// What the control queue thread owns while the device runs.
pub(super) struct ControlQueue {
    pub mem: GuestMemoryAtomic,
    pub queue: Queue,
    pub queue_index: u16,
    pub interrupt: Arc<VirtioInterrupt>,
    pub rings: RingControl,
    /// Pairs the device has; VQ_PAIRS_SET may ask for 1..=queue_pairs.
    pub queue_pairs: u16,
    /// Whether the driver accepted VIRTIO_NET_F_MQ.
    pub multiqueue: bool,
    pub metrics: Arc<NetMetrics>,
}

impl QueueHandler for ControlQueue {
    /// Answers every available command, then interrupts the driver if it wants that.
    fn process_queue(&mut self) {
        let guard = self.mem.memory();
        let mem: &GuestMemoryMmap = &guard;
        let mut used = 0u32;
        loop {
            if let Err(e) = self.queue.disable_notification(mem) {
                tracing::debug!("cannot disable control queue notifications: {e}");
            }
            let mut progressed = false;
            while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
                progressed = true;
                let head = chain.head_index();
                let written = self.answer(chain, mem);
                if let Err(e) = self.queue.add_used(mem, head, written) {
                    // A head outside the table: already counted as a chain without an ack.
                    tracing::debug!(head, "cannot return a control queue buffer: {e}");
                    continue;
                }
                used += 1;
            }
            match self.queue.enable_notification(mem) {
                Ok(true) if progressed || self.avail_index_is_sane(mem) => continue,
                Ok(true) => {
                    // The avail index runs more than a queue ahead: nothing can be
                    // popped, and looping would spin. Wait for the next kick.
                    NetMetrics::add(&self.metrics.control_errors, 1);
                    tracing::debug!("control queue avail index is out of range; stalled");
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    tracing::debug!("cannot re-enable control queue notifications: {e}");
                    break;
                }
            }
        }
        if used > 0
            && self.queue.needs_notification(mem).unwrap_or(true)
            && let Err(e) = self.interrupt.signal_used_queue(self.queue_index)
        {
            tracing::warn!("cannot interrupt the guest for the control queue: {e}");
        }
    }
}

impl ControlQueue {
    fn avail_index_is_sane(&self, mem: &GuestMemoryMmap) -> bool {
        self.queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|idx| {
                (idx - std::num::Wrapping(self.queue.next_avail())).0 <= self.queue.size()
            })
    }

    /// Reads one command (device-readable descriptors), runs it and writes the ack byte
    /// into the first device-writable descriptor. Returns the bytes written.
    fn answer(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let mut command = Vec::new();
        let mut ack: Option<GuestAddress> = None;
        let mut malformed = false;
        for desc in chain {
            if desc.is_write_only() {
                if ack.is_none() && desc.len() >= 1 {
                    ack = Some(desc.addr());
                }
                continue;
            }
            // virtio 1.2 §2.7.4.2: readable descriptors come before writable ones.
            malformed |= ack.is_some();
            let len = desc.len() as usize;
            let start = command.len();
            // Once malformed, the rest of the chain is walked only to find the ack byte
            // (the walk is bounded by the queue size).
            if malformed || len > MAX_COMMAND_BYTES - start {
                malformed = true;
                continue;
            }
            command.resize(start + len, 0);
            if mem.read_slice(&mut command[start..], desc.addr()).is_err() {
                malformed = true;
            }
        }
        let Some(ack) = ack else {
            NetMetrics::add(&self.metrics.control_errors, 1);
            tracing::debug!("control command without a writable ack byte; dropped");
            return 0;
        };
        let status = if malformed {
            ERR
        } else {
            self.execute(&command)
        };
        if status == OK {
            NetMetrics::add(&self.metrics.control_commands, 1);
        } else {
            NetMetrics::add(&self.metrics.control_errors, 1);
        }
        match mem.write_obj(status, ack) {
            Ok(()) => 1,
            Err(e) => {
                tracing::debug!("cannot write the control ack byte: {e}");
                0
            }
        }
    }

    /// Runs `class, command, data...`; returns the ack.
    fn execute(&mut self, command: &[u8]) -> u8 {
        let [class, cmd, data @ ..] = command else {
            tracing::debug!(
                len = command.len(),
                "control command shorter than its header"
            );
            return ERR;
        };
        let (class, cmd) = (u32::from(*class), u32::from(*cmd));
        match (class, cmd) {
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) if self.multiqueue => {
                match <[u8; 2]>::try_from(data) {
                    Ok(pairs) => self.set_queue_pairs(u16::from_le_bytes(pairs)),
                    Err(_) => ERR,
                }
            }
            // Receive filtering is the backend's business (it sees every frame anyway);
            // the VMM takes the modes and tables so that drivers which send them work.
            (VIRTIO_NET_CTRL_RX, 0..=VIRTIO_NET_CTRL_RX_NOBCAST) if data.len() == 1 => OK,
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) if mac_tables_fit(data) => OK,
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) if data.len() == 6 => OK,
            (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) => OK,
            _ => {
                tracing::debug!(class, cmd, "unsupported control command");
                ERR
            }
        }
    }

    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (virtio 1.2 §5.1.6.5.5): pairs below `pairs` run,
    /// the others stop.
    fn set_queue_pairs(&mut self, pairs: u16) -> u8 {
        if pairs == 0 || pairs > self.queue_pairs {
            tracing::debug!(pairs, max = self.queue_pairs, "VQ_PAIRS_SET out of range");
            return ERR;
        }
        for pair in 0..self.queue_pairs {
            let enabled = pair < pairs;
            for index in [2 * pair, 2 * pair + 1] {
                match self.rings.set_ring_enabled(index, enabled) {
                    Ok(()) => {}
                    // A queue the driver never enabled cannot run; stopping it is moot.
                    Err(VhostUserError::UnknownRing(_)) if !enabled => {}
                    Err(e) => {
                        tracing::warn!(index, enabled, "cannot switch a backend ring: {e}");
                        return ERR;
                    }
                }
            }
        }
        self.metrics
            .active_queue_pairs
            .store(u64::from(pairs), std::sync::atomic::Ordering::Relaxed);
        OK
    }
}

/// Whether `data` is exactly two MAC tables (virtio 1.2 §5.1.6.5.2: le32 entries, then
/// entries × 6 bytes; unicast, then multicast).
fn mac_tables_fit(data: &[u8]) -> bool {
    let mut rest = data;
    for _ in 0..2 {
        let Some((count, tail)) = rest.split_first_chunk::<4>() else {
            return false;
        };
        let Some(bytes) = (u32::from_le_bytes(*count) as usize).checked_mul(6) else {
            return false;
        };
        let Some(tail) = tail.get(bytes..) else {
            return false;
        };
        rest = tail;
    }
    rest.is_empty()
}
