//! The vhost-user-net device: features, and one worker (RX and TX virtqueue, TAP queue,
//! io_uring) per queue pair, driven by vhost-user-backend's per-thread event loops.
//!
//! The VMM owns the config space and the control queue (as QEMU and Cloud Hypervisor do), so
//! the backend's queues are the data queues only: rx0, tx0, rx1, tx1, ...

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::frame::{
    Desc, DropReason, GSO_TYPE_OFFSET, NUM_BUFFERS_OFFSET, RxChain, Segment, VNET_HDR_LEN,
    parse_rx, parse_tx, scatter, spread_frame, tx_frame_fits,
};
use crate::metrics::Metrics;
use crate::tap::Tap;
use crate::uring::{Completion, TapRing, UringError};

pub type GuestMemoryAtomicMmap = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type MemoryGuard = GuestMemoryLoadGuard<GuestMemoryMmap<()>>;

/// Host RX buffers per queue pair: frames read from the TAP and not yet in the guest.
const RX_BUFFERS: usize = 16;
/// TX chains written per submit within one kick's batch; after each such group the written
/// chains go back to the driver at once (see `PairWorker::flush_tx`).
const TX_SUBMIT_BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot set up the io_uring of queue pair {0}")]
    Ring(u16, #[source] UringError),
    #[error("cannot duplicate the TAP queue of pair {0}")]
    DupTap(u16, #[source] std::io::Error),
}

/// Features offered to the VMM. Config-space features (MAC, STATUS, MTU, MQ) are offered so the
/// VMM may pass them on; the VMM implements them.
pub const OFFERED_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_RING_F_EVENT_IDX
    | 1 << VIRTIO_RING_F_INDIRECT_DESC
    | 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_MTU
    | 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_MRG_RXBUF
    | 1 << VIRTIO_NET_F_STATUS
    | 1 << VIRTIO_NET_F_MQ;

/// The TUNSETOFFLOAD flags for what the guest accepts on RX.
pub fn tap_offload_for(features: u64) -> u32 {
    let has = |bit: u32| features & (1 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        // GSO frames come with partial checksums: only with GUEST_CSUM.
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

/// The vhost-user-net backend of one VMM connection; clones share one device.
#[derive(Clone)]
pub struct NetBackend {
    shared: Arc<Shared>,
}

struct Shared {
    pairs: u16,
    queue_size: u16,
    mtu: u16,
    acked: AtomicU64,
    event_idx: AtomicBool,
    memory: RwLock<Option<GuestMemoryAtomicMmap>>,
    workers: Vec<Mutex<PairWorker>>,
    tap: Arc<Tap>,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn has(&self, bit: u32) -> bool {
        self.acked.load(Ordering::Relaxed) & (1 << bit) != 0
    }

    fn memory(&self) -> Option<MemoryGuard> {
        self.memory
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(GuestMemoryAtomic::memory)
    }
}

/// A TX chain whose frame the kernel is writing, by its sequence number.
struct InFlightTx {
    frame_len: usize,
    /// Keeps the mapping the iovecs point into alive until the write completes.
    _memory: MemoryGuard,
}

/// A frame read from the TAP, waiting for guest RX chains.
struct PendingFrame {
    buffer: usize,
    len: usize,
}

struct PairWorker {
    pair: u16,
    ring: TapRing,
    tx_in_flight: HashMap<u64, InFlightTx>,
    /// TX chains in the order the guest made them available, from sequence `tx_front_seq`:
    /// used entries are published in this order (like vhost-blk's order.rs), so a frontend
    /// that restarts the ring from its used index after a crash loses no chain.
    tx_order: VecDeque<TxSlot>,
    tx_front_seq: u64,
    tx_next_seq: u64,
    pending: VecDeque<PendingFrame>,
    /// RX chains popped from the avail ring and not yet filled (the latest popped, in order).
    stash: VecDeque<RxChain>,
    rx_unsignalled: bool,
    tx_unsignalled: bool,
    /// A merged frame was published with one used-index update, which the queue's
    /// notification bookkeeping does not see: signal regardless of EVENT_IDX.
    rx_force_signal: bool,
    /// The pair's RX ring as last seen by the event loop, for GET_VRING_BASE.
    rx_vring: Option<VringRwLock>,
    tx_vring: Option<VringRwLock>,
}

/// A TX chain between pop and used.
struct TxSlot {
    head: u16,
    done: bool,
}

impl NetBackend {
    /// A device over `tap` with one worker per TAP queue.
    pub fn new(
        tap: Arc<Tap>,
        queue_size: u16,
        mtu: u16,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BackendError> {
        let pairs = tap.queues.len() as u16;
        let workers = tap
            .queues
            .iter()
            .enumerate()
            .map(|(i, queue)| {
                let pair = i as u16;
                let ring = TapRing::new(queue, RX_BUFFERS, u32::from(queue_size).max(64))
                    .map_err(|e| BackendError::Ring(pair, e))?;
                Ok(Mutex::new(PairWorker {
                    pair,
                    ring,
                    tx_in_flight: HashMap::new(),
                    tx_order: VecDeque::new(),
                    tx_front_seq: 0,
                    tx_next_seq: 0,
                    pending: VecDeque::new(),
                    stash: VecDeque::new(),
                    rx_unsignalled: false,
                    tx_unsignalled: false,
                    rx_force_signal: false,
                    rx_vring: None,
                    tx_vring: None,
                }))
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        Ok(Self {
            shared: Arc::new(Shared {
                pairs,
                queue_size,
                mtu,
                acked: AtomicU64::new(0),
                event_idx: AtomicBool::new(false),
                memory: RwLock::new(None),
                workers,
                tap,
                metrics,
            }),
        })
    }

    /// The io_uring completion eventfd of pair `pair`, to register with that pair's worker
    /// event loop under [`Self::completion_event_id`].
    pub fn completion_fd(&self, pair: usize) -> Option<std::os::fd::RawFd> {
        let worker = self.shared.workers.get(pair)?;
        Some(lock(worker).ring.completion_fd())
    }

    /// The event id of completion eventfds: above the ids the library reserves.
    pub fn completion_event_id(&self) -> u64 {
        u64::from(self.shared.pairs) * 2 + 1
    }

    fn worker(&self, pair: usize) -> Option<MutexGuard<'_, PairWorker>> {
        self.shared.workers.get(pair).map(lock)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked left its state consistent enough to keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the frontend started and enabled the ring.
fn usable(vring: &VringRwLock) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.shared.pairs) * 2
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shared.queue_size)
    }

    fn features(&self) -> u64 {
        OFFERED_FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            // Legacy drivers use a 10-byte header without MRG_RXBUF; this backend speaks the
            // 12-byte virtio 1.x header only.
            tracing::error!("the VMM did not negotiate VIRTIO_F_VERSION_1; frames will be garbled");
        }
        self.shared.acked.store(features, Ordering::Relaxed);
        let offload = tap_offload_for(features);
        if let Err(e) = self.shared.tap.set_offload(offload) {
            tracing::error!(error = %e, "cannot match the TAP offloads to the guest's");
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.shared.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: GuestMemoryAtomicMmap) -> std::io::Result<()> {
        *self
            .shared
            .memory
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.shared.pairs).map(|p| 0b11u64 << (2 * p)).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .inspect_err(|e| tracing::error!(error = %e, "cannot create a worker exit event"))
            .ok()
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        let Some(mut worker) = self.worker(queue_index as usize / 2) else {
            return Ok(());
        };
        if queue_index % 2 == 1 {
            // GET_VRING_BASE on TX: every write must be done and its chain used before the
            // frontend reads the ring state.
            worker.drain_tx(&self.shared);
        } else {
            worker.return_stash();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        // Thread `p` serves pair `p`: its vrings are [rx, tx].
        let Some(mut worker) = self.worker(thread_id) else {
            return Ok(());
        };
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Ok(());
        };
        if worker.rx_vring.is_none() {
            worker.rx_vring = Some(rx.clone());
            worker.tx_vring = Some(tx.clone());
        }
        let Some(memory) = self.shared.memory() else {
            return Ok(());
        };
        if u64::from(device_event) == self.completion_event_id() {
            worker.ring.clear_completion_event();
        } else if device_event == 1 {
            worker.process_tx(&self.shared, &memory, tx);
        }
        // Every event: reap, fill the guest's RX chains, keep reads armed, tell the guest.
        worker.reap(&self.shared);
        worker.deliver_rx(&self.shared, &memory, rx);
        worker.arm_rx();
        worker.submit();
        worker.signal(&self.shared, rx, tx);
        Ok(())
    }
}

impl PairWorker {
    /// Takes every TX chain the guest made available and writes them to the TAP with one submit.
    fn process_tx(&mut self, shared: &Shared, memory: &MemoryGuard, tx: &VringRwLock) {
        if !usable(tx) {
            return;
        }
        let event_idx = shared.event_idx.load(Ordering::Relaxed);
        let mut queued = 0;
        loop {
            if event_idx {
                let _ = tx.disable_notification();
            }
            loop {
                let chain = {
                    let mut state = tx.get_mut();
                    let queue = state.get_queue_mut();
                    if !queue.is_valid(&**memory) {
                        break;
                    }
                    queue.pop_descriptor_chain(memory.clone())
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let descs: Vec<Desc> = chain
                    .map(|d| Desc {
                        addr: d.addr().raw_value(),
                        len: d.len(),
                        write_only: d.is_write_only(),
                    })
                    .collect();
                let seq = self.tx_next_seq;
                self.tx_next_seq += 1;
                self.tx_order.push_back(TxSlot { head, done: false });
                if let Err(reason) = self.start_tx(shared, memory, seq, &descs) {
                    shared.metrics.count_tx_drop(reason);
                    tracing::debug!(pair = self.pair, head, %reason, "dropped a TX chain");
                    self.complete_tx(seq);
                }
                queued += 1;
                if queued == TX_SUBMIT_BATCH {
                    queued = 0;
                    self.flush_tx(shared, tx);
                }
            }
            if !event_idx {
                break;
            }
            match tx.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(pair = self.pair, error = ?e, "guest broke the TX avail ring");
                    break;
                }
            }
        }
        self.submit_tx(shared);
        self.release_tx();
    }

    fn submit_tx(&mut self, shared: &Shared) {
        match self.ring.submit() {
            Ok(0) => {}
            Ok(_) => shared.metrics.count_tx_submit(),
            Err(e) => tracing::error!(pair = self.pair, error = %e, "io_uring submit failed"),
        }
    }

    /// Mid-batch: writes what is queued, returns the chains already written and tells the
    /// driver (if it asked), so it refills the ring while we go on with the rest of the batch
    /// instead of the two sides taking turns.
    fn flush_tx(&mut self, shared: &Shared, tx: &VringRwLock) {
        self.submit_tx(shared);
        self.reap(shared);
        let event_idx = shared.event_idx.load(Ordering::Relaxed);
        if std::mem::take(&mut self.tx_unsignalled)
            && (!event_idx || tx.needs_notification().unwrap_or(true))
            && let Err(e) = tx.signal_used_queue()
        {
            tracing::warn!(pair = self.pair, error = %e, "cannot signal the guest");
        }
    }

    fn start_tx(
        &mut self,
        shared: &Shared,
        memory: &MemoryGuard,
        seq: u64,
        descs: &[Desc],
    ) -> Result<(), DropReason> {
        let in_memory =
            |addr, len: u32| len == 0 || memory.check_range(GuestAddress(addr), len as usize);
        let chain = parse_tx(descs, in_memory)?;
        let header = gather_header(memory, &chain.segments).ok_or(DropReason::OutsideMemory)?;
        let frame_len = chain.len - VNET_HDR_LEN;
        let host_tso = shared.has(VIRTIO_NET_F_HOST_TSO4) || shared.has(VIRTIO_NET_F_HOST_TSO6);
        if !tx_frame_fits(frame_len, header[GSO_TYPE_OFFSET], host_tso, shared.mtu) {
            return Err(DropReason::FrameTooLong);
        }
        let iovecs = iovecs(memory, &chain.segments).ok_or(DropReason::OutsideMemory)?;
        if iovecs.len() > libc::UIO_MAXIOV as usize {
            return Err(DropReason::BadChain);
        }
        let tag = seq;
        self.tx_in_flight.insert(
            tag,
            InFlightTx {
                frame_len,
                _memory: memory.clone(),
            },
        );
        // SAFETY: the iovecs point into guest memory mapped by `memory`, a clone of which the
        // in-flight entry keeps until the completion is reaped; the guest gave these buffers
        // to the device and must not change them before the used ring returns them.
        if let Err(e) = unsafe { self.ring.push_tx(tag, iovecs) } {
            tracing::error!(pair = self.pair, error = %e, "cannot queue a TX write");
            self.tx_in_flight.remove(&tag);
            return Err(DropReason::TapError);
        }
        Ok(())
    }

    /// Marks TX chain `seq` finished; [`Self::release_tx`] publishes it in order.
    fn complete_tx(&mut self, seq: u64) {
        let Some(i) = seq.checked_sub(self.tx_front_seq) else {
            return;
        };
        if let Some(slot) = self.tx_order.get_mut(i as usize) {
            slot.done = true;
        }
    }

    /// Returns finished TX chains to the used ring, oldest first, up to the first unfinished.
    fn release_tx(&mut self) {
        let Some(tx) = self.tx_vring.clone() else {
            return;
        };
        while self.tx_order.front().is_some_and(|s| s.done) {
            let Some(slot) = self.tx_order.pop_front() else {
                break;
            };
            self.tx_front_seq += 1;
            // virtio 1.2 §5.1.6.2: TX buffers are returned with length 0 (nothing written).
            if let Err(e) = tx.add_used(slot.head, 0) {
                tracing::warn!(pair = self.pair, head = slot.head, error = ?e, "cannot return a TX chain");
            }
            self.tx_unsignalled = true;
        }
    }

    /// Takes every completion: TX writes are counted and their chains released in order, RX
    /// reads become frames waiting for guest chains.
    fn reap(&mut self, shared: &Shared) {
        let mut done = Vec::new();
        let pending = &mut self.pending;
        self.ring.reap(|c| match c {
            Completion::Tx { tag, result } => done.push((tag, result)),
            Completion::Rx { buffer, result } => {
                if result >= VNET_HDR_LEN as i32 {
                    pending.push_back(PendingFrame {
                        buffer,
                        len: result as usize,
                    });
                } else if result != -libc::ECANCELED {
                    tracing::debug!(buffer, result, "TAP read failed or short");
                }
            }
        });
        for (seq, result) in done {
            let Some(op) = self.tx_in_flight.remove(&seq) else {
                continue;
            };
            if result < 0 {
                shared.metrics.count_tx_drop(DropReason::TapError);
                tracing::debug!(pair = self.pair, errno = -result, "the TAP refused a frame");
            } else {
                shared.metrics.count_tx(op.frame_len);
            }
            self.complete_tx(seq);
        }
        self.release_tx();
    }

    /// GET_VRING_BASE on TX: waits for every write and returns every chain, so the base the
    /// frontend reads covers exactly the chains it got back.
    fn drain_tx(&mut self, shared: &Shared) {
        while !self.tx_in_flight.is_empty() {
            if let Err(e) = self.ring.submit_and_wait_one() {
                tracing::error!(pair = self.pair, error = %e, "cannot drain TX writes");
                return;
            }
            self.reap(shared);
        }
        self.release_tx();
        if std::mem::take(&mut self.tx_unsignalled)
            && let Some(tx) = &self.tx_vring
            && let Err(e) = tx.signal_used_queue()
        {
            tracing::warn!(pair = self.pair, error = %e, "cannot signal the guest");
        }
    }

    /// GET_VRING_BASE on RX: chains popped but not filled go back to the avail side, so the
    /// base the frontend reads is the first chain the device has not used.
    fn return_stash(&mut self) {
        let returned = self.stash.len() as u16;
        self.stash.clear();
        if let Some(rx) = &self.rx_vring
            && returned > 0
        {
            rx.set_queue_next_avail(rx.queue_next_avail().wrapping_sub(returned));
        }
    }

    /// Copies waiting frames into guest RX chains, in order, until frames or chains run out.
    fn deliver_rx(&mut self, shared: &Shared, memory: &MemoryGuard, rx: &VringRwLock) {
        if !usable(rx) {
            return;
        }
        let mergeable = shared.has(VIRTIO_NET_F_MRG_RXBUF);
        let event_idx = shared.event_idx.load(Ordering::Relaxed);
        while let Some(frame) = self.pending.front() {
            let total = frame.len;
            let buffer = frame.buffer;
            let parts = loop {
                let capacities: Vec<usize> = self.stash.iter().map(|c| c.capacity).collect();
                if let Some(parts) = spread_frame(total, &capacities, mergeable) {
                    break Some(parts);
                }
                if !mergeable && !capacities.is_empty() {
                    // The one chain a frame may use is too small: the frame cannot be delivered.
                    break None;
                }
                if !self.pop_rx_chain(shared, memory, rx, event_idx) {
                    // No RX buffers: keep the frame, stop reading the TAP until the guest
                    // kicks with more.
                    return;
                }
            };
            self.pending.pop_front();
            let Some(parts) = parts else {
                shared.metrics.count_rx_drop(DropReason::ChainTooSmall);
                continue;
            };
            self.fill_rx(shared, memory, rx, buffer, total, &parts, mergeable);
        }
    }

    /// Pops one valid RX chain into the stash; false when the guest has none available.
    fn pop_rx_chain(
        &mut self,
        shared: &Shared,
        memory: &MemoryGuard,
        rx: &VringRwLock,
        event_idx: bool,
    ) -> bool {
        loop {
            let chain = {
                let mut state = rx.get_mut();
                let queue = state.get_queue_mut();
                if !queue.is_valid(&**memory) {
                    return false;
                }
                queue.pop_descriptor_chain(memory.clone())
            };
            let Some(chain) = chain else {
                // Ask for a kick when buffers come; they may have come meanwhile.
                match rx.enable_notification() {
                    Ok(true) => continue,
                    _ => return false,
                }
            };
            if event_idx {
                let _ = rx.disable_notification();
            }
            let head = chain.head_index();
            let descs: Vec<Desc> = chain
                .map(|d| Desc {
                    addr: d.addr().raw_value(),
                    len: d.len(),
                    write_only: d.is_write_only(),
                })
                .collect();
            let in_memory =
                |addr, len: u32| len == 0 || memory.check_range(GuestAddress(addr), len as usize);
            match parse_rx(head, &descs, in_memory) {
                Ok(chain) => {
                    self.stash.push_back(chain);
                    return true;
                }
                Err(reason) => {
                    shared.metrics.count_rx_drop(reason);
                    tracing::debug!(pair = self.pair, head, %reason, "dropped an RX chain");
                    if let Err(e) = rx.add_used(head, 0) {
                        tracing::warn!(head, error = ?e, "cannot return an RX chain");
                    }
                    self.rx_unsignalled = true;
                }
            }
        }
    }

    /// Copies RX buffer `buffer` (`total` bytes, header first) into the first `parts.len()`
    /// stashed chains and publishes them with one used-index update.
    #[allow(clippy::too_many_arguments)]
    fn fill_rx(
        &mut self,
        shared: &Shared,
        memory: &MemoryGuard,
        rx: &VringRwLock,
        buffer: usize,
        total: usize,
        parts: &[usize],
        mergeable: bool,
    ) {
        let chains: Vec<RxChain> = self.stash.drain(..parts.len()).collect();
        let mut frame = self.ring.rx_data(buffer, total).to_vec();
        // virtio 1.2 §5.1.6.4: num_buffers is the number of chains used (1 without MRG_RXBUF).
        let num_buffers = if mergeable { parts.len() as u16 } else { 1 };
        frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());
        let mut offset = 0;
        let mut used = Vec::with_capacity(parts.len());
        for (chain, &n) in chains.iter().zip(parts) {
            let copied = scatter(
                &frame[offset..offset + n],
                &chain.segments,
                |bytes, addr| memory.write_slice(bytes, addr),
            );
            if copied.is_err() {
                // The ranges were checked; a failure means the memory map changed under us.
                shared.metrics.count_rx_drop(DropReason::OutsideMemory);
                used.push((chain.head, 0));
            } else {
                used.push((chain.head, n as u32));
            }
            offset += n;
        }
        self.publish_rx(rx, memory, &used);
        shared.metrics.count_rx(total - VNET_HDR_LEN);
    }

    /// Adds `entries` to the used ring so the guest sees them all at once: a merged frame
    /// whose first buffers show before the last is an error to a Linux guest.
    fn publish_rx(&mut self, rx: &VringRwLock, memory: &MemoryGuard, entries: &[(u16, u32)]) {
        let Some((&(last_head, last_len), earlier)) = entries.split_last() else {
            return;
        };
        let mut state = rx.get_mut();
        let queue = state.get_queue_mut();
        let size = queue.size();
        let start = queue.next_used();
        for (i, &(head, len)) in earlier.iter().enumerate() {
            let slot = u64::from(start.wrapping_add(i as u16) % size);
            let addr = GuestAddress(queue.used_ring()).checked_add(4 + slot * 8);
            if let Some(addr) = addr {
                // virtio 1.2 §2.7.8: struct virtq_used_elem { le32 id; le32 len; }
                let mut elem = [0u8; 8];
                elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
                elem[4..].copy_from_slice(&len.to_le_bytes());
                let _ = memory.write_slice(&elem, addr);
            }
        }
        if !earlier.is_empty() {
            queue.set_next_used(start.wrapping_add(earlier.len() as u16));
            self.rx_force_signal = true;
        }
        if let Err(e) = queue.add_used(&**memory, last_head, last_len) {
            tracing::warn!(pair = self.pair, error = ?e, "cannot add to the RX used ring");
        }
        self.rx_unsignalled = true;
    }

    /// Keeps a read armed on every free RX buffer, unless frames wait for guest buffers.
    fn arm_rx(&mut self) {
        if !self.pending.is_empty() {
            return;
        }
        for buffer in 0..self.ring.rx_buffers() {
            if !self.ring.rx_armed(buffer)
                && let Err(e) = self.ring.arm_rx(buffer)
            {
                tracing::error!(pair = self.pair, error = %e, "cannot arm a TAP read");
                return;
            }
        }
    }

    /// Hands armed reads (and anything else queued) to the kernel.
    fn submit(&mut self) {
        if let Err(e) = self.ring.submit() {
            tracing::error!(pair = self.pair, error = %e, "io_uring submit failed");
        }
    }

    fn signal(&mut self, shared: &Shared, rx: &VringRwLock, tx: &VringRwLock) {
        let event_idx = shared.event_idx.load(Ordering::Relaxed);
        let force_rx = std::mem::take(&mut self.rx_force_signal);
        for (vring, unsignalled, force) in [
            (rx, std::mem::take(&mut self.rx_unsignalled), force_rx),
            (tx, std::mem::take(&mut self.tx_unsignalled), false),
        ] {
            if !unsignalled {
                continue;
            }
            let needed = force || !event_idx || vring.needs_notification().unwrap_or(true);
            if needed && let Err(e) = vring.signal_used_queue() {
                tracing::warn!(pair = self.pair, error = %e, "cannot signal the guest");
            }
        }
    }
}

/// The first 12 bytes of a chain (the header may span descriptors).
fn gather_header(memory: &MemoryGuard, segments: &[Segment]) -> Option<[u8; VNET_HDR_LEN]> {
    let mut header = [0u8; VNET_HDR_LEN];
    let mut done = 0;
    for s in segments {
        if done == VNET_HDR_LEN {
            break;
        }
        let n = (s.len as usize).min(VNET_HDR_LEN - done);
        memory
            .read_slice(&mut header[done..done + n], s.addr)
            .ok()?;
        done += n;
    }
    (done == VNET_HDR_LEN).then_some(header)
}

/// Host iovecs for guest `segments`, split where a segment crosses memory regions.
fn iovecs(memory: &MemoryGuard, segments: &[Segment]) -> Option<Vec<libc::iovec>> {
    let mut out = Vec::with_capacity(segments.len());
    for s in segments {
        for slice in GuestMemoryBackend::get_slices(&**memory, s.addr, s.len as usize) {
            let slice = slice.ok()?;
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_offloads_follow_the_guest_features() {
        assert_eq!(tap_offload_for(0), 0);
        assert_eq!(
            tap_offload_for(1 << VIRTIO_NET_F_GUEST_TSO4),
            0,
            "no TSO without checksum offload"
        );
        let all = 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6;
        assert_eq!(
            tap_offload_for(all),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
    }
}
