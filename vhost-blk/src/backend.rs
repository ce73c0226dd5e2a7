//! The vhost-user-blk device: features, config space, and one worker (virtqueue + io_uring) per
//! queue, driven by vhost-user-backend's per-thread event loops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::config::Disk;
use crate::inflight::{InflightLimits, QueueInflight};
use crate::io::{IoEngine, IoError, IoOp};
use crate::metrics::Metrics;
use crate::order::{CompletionOrder, UsedEntry};
use crate::relay::InflightSlot;
use crate::request::{
    DeviceLimits, Operation, Rejection, Request, RequestType, SECTOR_SHIFT, Segment,
    VIRTIO_BLK_ID_BYTES, parse_request, parse_request_at,
};

pub type GuestMemoryAtomicMmap = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type MemoryGuard = GuestMemoryLoadGuard<GuestMemoryMmap<()>>;

/// Largest data descriptor (SIZE_MAX) and data descriptors per request (SEG_MAX, within IOV_MAX).
const SIZE_MAX: u32 = 1 << 20;
const MAX_DISCARD_SEG: u32 = 32;
/// Keeps one fallocate bounded (u32 sectors would allow 2 TiB).
const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> SECTOR_SHIFT;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot set up the io_uring of queue {0}")]
    Engine(u16, #[source] IoError),
    #[error("cannot create the exit event of a worker")]
    ExitEvent(#[source] std::io::Error),
}

/// The vhost-user-blk backend; clones share one device.
#[derive(Clone)]
pub struct BlkBackend {
    shared: Arc<Shared>,
}

struct Shared {
    limits: DeviceLimits,
    features: u64,
    config_space: Vec<u8>,
    serial: Vec<u8>,
    num_queues: u16,
    queue_size: u16,
    event_idx: AtomicBool,
    memory: RwLock<Option<GuestMemoryAtomicMmap>>,
    workers: Vec<Mutex<QueueWorker>>,
    metrics: Arc<Metrics>,
    /// The inflight region the frontend attached (through the relay), if any.
    inflight: InflightSlot,
}

/// A request the kernel is working on.
struct InFlightRequest {
    head: u16,
    /// Position in the order the guest made requests available.
    sequence: u64,
    status: GuestAddress,
    kind: RequestType,
    ops_left: u32,
    failed: bool,
    /// What each operation must return to count as complete (bytes for read/write, else 0).
    expected_result: i32,
    /// Bytes the device writes into guest buffers, status byte excluded.
    written_to_guest: u32,
    bytes: u64,
    /// Keeps the guest memory mapping the iovecs point into alive until completion.
    memory: MemoryGuard,
}

struct QueueWorker {
    engine: IoEngine,
    vring: Option<VringRwLock>,
    requests: Vec<Option<InFlightRequest>>,
    free: Vec<usize>,
    /// Used ring in available order, for frontends without an inflight region.
    order: CompletionOrder,
    /// With an inflight region the used ring is filled as requests finish, and the region
    /// says which to resubmit after a crash.
    tracker: Option<QueueInflight>,
    /// The queue was started (region attached, recorded work resubmitted) since the last
    /// GET_VRING_BASE.
    started: bool,
    /// Used entries were added since the guest was last signalled.
    unsignalled: bool,
}

impl BlkBackend {
    /// A backend for `disk` with `num_queues` workers; the device reads from and writes to the
    /// guest memory the frontend shares later.
    pub fn new(
        disk: &Disk,
        num_queues: u16,
        queue_size: u16,
        serial: Vec<u8>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BackendError> {
        let read_only = disk.read_only;
        let limits = DeviceLimits {
            capacity_sectors: disk.size >> SECTOR_SHIFT,
            read_only,
            // Within IOV_MAX (1024), since one request is one readv/writev.
            seg_max: u32::from(queue_size).saturating_sub(2).clamp(1, 1022),
            size_max: SIZE_MAX,
            discard: !read_only,
            write_zeroes: !read_only,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
        };
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ;
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let config_space = config_space(&limits, num_queues);
        let workers = (0..num_queues)
            .map(|q| {
                let engine = IoEngine::new(&disk.file, u32::from(queue_size))
                    .map_err(|e| BackendError::Engine(q, e))?;
                Ok(Mutex::new(QueueWorker {
                    engine,
                    vring: None,
                    requests: Vec::new(),
                    free: Vec::new(),
                    order: CompletionOrder::default(),
                    tracker: None,
                    started: false,
                    unsignalled: false,
                }))
            })
            .collect::<Result<Vec<_>, BackendError>>()?;
        Ok(Self {
            shared: Arc::new(Shared {
                limits,
                features,
                config_space,
                serial,
                num_queues,
                queue_size,
                event_idx: AtomicBool::new(false),
                memory: RwLock::new(None),
                workers,
                metrics,
                inflight: InflightSlot::default(),
            }),
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Where SET_INFLIGHT_FD puts the frontend's region; queues starting later use it.
    pub fn inflight_slot(&self) -> InflightSlot {
        self.shared.inflight.clone()
    }

    /// The largest inflight region geometry this device accepts.
    pub fn inflight_limits(&self) -> InflightLimits {
        InflightLimits {
            max_queues: self.shared.num_queues,
            max_queue_size: self.shared.queue_size,
        }
    }

    /// The eventfd of queue `queue`'s io_uring completions, to register with that queue's
    /// worker event loop under [`Self::completion_event_id`].
    pub fn completion_fd(&self, queue: usize) -> Option<std::os::fd::RawFd> {
        let worker = self.shared.workers.get(queue)?;
        Some(lock(worker).engine.completion_fd())
    }

    /// The event-loop id of completion eventfds: above the ids the library reserves for queues.
    pub fn completion_event_id(&self) -> u64 {
        u64::from(self.shared.num_queues) + 1
    }

    fn worker(&self, queue: usize) -> Option<MutexGuard<'_, QueueWorker>> {
        self.shared.workers.get(queue).map(lock)
    }
}

/// Counts a submission of `ops` operations, or logs why it failed.
fn count_submit(shared: &Shared, queue: usize, ops: Result<usize, IoError>) {
    match ops {
        Ok(0) => {}
        Ok(ops) => shared.metrics.count_submit(ops),
        Err(e) => tracing::error!(queue, error = %e, "io_uring submit failed"),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked left its state consistent enough to keep serving other requests.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `struct virtio_blk_config` (virtio 1.2 §5.2.4) up to `write_zeroes_may_unmap`.
fn config_space(limits: &DeviceLimits, num_queues: u16) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&limits.capacity_sectors.to_le_bytes());
    c[8..12].copy_from_slice(&limits.size_max.to_le_bytes());
    c[12..16].copy_from_slice(&limits.seg_max.to_le_bytes());
    c[20..24].copy_from_slice(&512u32.to_le_bytes()); // blk_size
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    c[36..40].copy_from_slice(&limits.max_discard_sectors.to_le_bytes());
    c[40..44].copy_from_slice(&limits.max_discard_seg.to_le_bytes());
    c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
    c[48..52].copy_from_slice(&limits.max_write_zeroes_sectors.to_le_bytes());
    c[52..56].copy_from_slice(&limits.max_write_zeroes_seg.to_le_bytes());
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.shared.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shared.queue_size)
    }

    fn features(&self) -> u64 {
        self.shared.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            // Answered by the relay in front of the daemon (see `relay`).
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        self.shared.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = &self.shared.config_space;
        let start = (offset as usize).min(space.len());
        let end = start.saturating_add(size as usize).min(space.len());
        let mut out = space[start..end].to_vec();
        // Reads past our struct (later spec fields) see zeroes.
        out.resize(size as usize, 0);
        out
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
        (0..self.shared.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .inspect_err(|e| tracing::error!(error = %e, "cannot create a worker exit event"))
            .ok()
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        // GET_VRING_BASE: every request the kernel still has must complete and be returned to
        // the used ring before the frontend reads the ring state.
        let Some(mut worker) = self.worker(queue_index as usize) else {
            return Ok(());
        };
        while worker.engine.in_flight() > 0 {
            if let Err(e) = worker.engine.submit_and_wait_one() {
                tracing::error!(queue = queue_index, error = %e, "cannot drain the io_uring");
                break;
            }
            worker.reap_completions(&self.shared);
        }
        worker.signal_guest(&self.shared);
        // The next start reads the (possibly new) region again.
        worker.started = false;
        worker.tracker = None;
        worker.order = CompletionOrder::default();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        // One queue per worker thread, so the thread id is the queue index and the thread's
        // only vring is event 0.
        let Some(mut worker) = self.worker(thread_id) else {
            return Ok(());
        };
        if u64::from(device_event) == self.completion_event_id() {
            worker.engine.clear_completion_event();
            worker.reap_completions(&self.shared);
            worker.signal_guest(&self.shared);
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        worker.vring = Some(vring.clone());
        if !worker.started {
            worker.start_queue(&self.shared, thread_id);
        }
        worker.process_queue(&self.shared, thread_id);
        Ok(())
    }
}

impl QueueWorker {
    /// Takes every available chain, queues its I/O, and submits the batch in a ramp of
    /// doubling submissions (see [`crate::io`]): the first request reaches the device at once.
    fn process_queue(&mut self, shared: &Shared, queue: usize) {
        let Some(vring) = self.vring.clone() else {
            return;
        };
        let Some(atomic) = shared
            .memory
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return;
        };
        let memory = atomic.memory();
        let event_idx = shared.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            loop {
                let chain = {
                    let mut state = vring.get_mut();
                    let queue = state.get_queue_mut();
                    if !queue.is_valid(&*memory) {
                        break;
                    }
                    queue.pop_descriptor_chain(memory.clone())
                };
                let Some(chain) = chain else { break };
                if let Some(tracker) = self.tracker.as_mut() {
                    tracker.begin(chain.head_index());
                }
                let sequence = self.order.take();
                match parse_request(chain, &shared.limits) {
                    Ok(request) => {
                        shared
                            .metrics
                            .count_request(request.operation.request_type());
                        self.start_request(shared, &memory, request, sequence);
                    }
                    Err(rejection) => {
                        self.reject(shared, &memory, rejection, sequence);
                    }
                }
                let submitted = self.engine.submit_ramp();
                count_submit(shared, queue, submitted);
            }
            if !event_idx {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    shared.metrics.count_queue_error();
                    tracing::warn!(queue, error = ?e, "guest broke the available ring");
                    break;
                }
            }
        }
        let submitted = self.engine.submit();
        count_submit(shared, queue, submitted);
        // Completions that are already there save a trip through the event loop.
        self.reap_completions(shared);
        self.signal_guest(shared);
    }

    /// Attaches the inflight region to this queue, if the frontend set one, and resubmits
    /// the chains a previous backend took and never answered, oldest first, before any new
    /// chain is taken.
    fn start_queue(&mut self, shared: &Shared, queue: usize) {
        self.started = true;
        self.order = CompletionOrder::default();
        let area = shared
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.tracker = area.and_then(|a| a.queue(queue as u16));
        let (Some(tracker), Some(vring)) = (self.tracker.as_mut(), self.vring.clone()) else {
            return;
        };
        let Some(atomic) = shared
            .memory
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return;
        };
        let memory = atomic.memory();
        let (used_idx, size, desc_table) = {
            let state = vring.get_ref();
            let q = state.get_queue();
            (
                q.used_idx(&*memory, Ordering::Acquire),
                q.size(),
                q.desc_table(),
            )
        };
        let used_idx = match used_idx {
            Ok(idx) => idx.0,
            Err(e) => {
                shared.metrics.count_queue_error();
                tracing::warn!(queue, error = ?e, "cannot read the used index; not tracking in-flight requests");
                self.tracker = None;
                return;
            }
        };
        let recovery = tracker.recover(used_idx, size);
        vring.set_queue_next_avail(recovery.next_avail);
        vring.set_queue_next_used(used_idx);
        if recovery.resubmit.is_empty() {
            return;
        }
        tracing::info!(
            queue,
            requests = recovery.resubmit.len(),
            next_avail = recovery.next_avail,
            "resubmitting requests in flight when the previous backend stopped"
        );
        for head in recovery.resubmit {
            if let Some(tracker) = self.tracker.as_mut() {
                tracker.begin(head);
            }
            shared.metrics.count_resubmitted();
            let sequence = self.order.take();
            match parse_request_at(
                &*memory,
                GuestAddress(desc_table),
                size,
                head,
                &shared.limits,
            ) {
                Ok(request) => {
                    shared
                        .metrics
                        .count_request(request.operation.request_type());
                    self.start_request(shared, &memory, request, sequence);
                }
                Err(rejection) => self.reject(shared, &memory, rejection, sequence),
            }
        }
    }

    /// Hands a completed request to the used ring: at once when an inflight region tracks
    /// the queue, else once every request made available before it is there.
    fn publish(&mut self, sequence: u64, head: u16, len: u32) {
        if let Some(tracker) = &self.tracker {
            let Some(vring) = &self.vring else { return };
            // vhost-user spec, "Inflight I/O tracking": name the batch, publish it, clear its
            // marks, record the used index; each step fenced (see `inflight`).
            tracker.before_used(head);
            if let Err(e) = vring.add_used(head, len) {
                tracing::warn!(head, error = ?e, "cannot return a request to the used ring");
                return;
            }
            let used = vring.get_ref().get_queue().next_used();
            tracker.after_used(head, used);
            self.unsignalled = true;
            return;
        }
        self.order.complete(sequence, UsedEntry { head, len });
        let Some(vring) = &self.vring else { return };
        for entry in self.order.release() {
            self.unsignalled = true;
            if let Err(e) = vring.add_used(entry.head, entry.len) {
                tracing::warn!(head = entry.head, error = ?e, "cannot return a request to the used ring");
            }
        }
    }

    fn reject(&mut self, shared: &Shared, memory: &MemoryGuard, r: Rejection, sequence: u64) {
        shared.metrics.count_request(r.request_type);
        shared.metrics.count_rejected(r.reason);
        tracing::debug!(head = r.head, reason = %r.reason, "rejected guest request");
        if let Some(status) = r.status {
            // The status address was checked to be in guest memory.
            let _ = memory.write_obj(r.reason.status(), status);
        }
        let len = u32::from(r.status.is_some());
        self.publish(sequence, r.head, len);
    }

    fn complete_now(
        &mut self,
        memory: &MemoryGuard,
        request: &Request,
        sequence: u64,
        status: u32,
        written: u32,
    ) {
        let _ = memory.write_obj(status as u8, request.status);
        self.publish(sequence, request.head, written + 1);
    }

    /// Queues the I/O of `request`; returns true when it completed without I/O.
    fn start_request(
        &mut self,
        shared: &Shared,
        memory: &MemoryGuard,
        request: Request,
        sequence: u64,
    ) -> bool {
        let kind = request.operation.request_type();
        let (ops, expected_result, written_to_guest, bytes) = match &request.operation {
            Operation::GetId { segments } => {
                let written = write_serial(memory, segments, &shared.serial);
                self.complete_now(memory, &request, sequence, VIRTIO_BLK_S_OK, written);
                return true;
            }
            Operation::Read {
                offset,
                len,
                segments,
            } => match iovecs(memory, segments) {
                Some(iovecs) => (
                    vec![IoOp::Readv {
                        offset: *offset,
                        iovecs,
                    }],
                    *len as i32,
                    *len as u32,
                    *len,
                ),
                None => {
                    self.complete_now(memory, &request, sequence, VIRTIO_BLK_S_IOERR, 0);
                    return true;
                }
            },
            Operation::Write {
                offset,
                len,
                segments,
            } => match iovecs(memory, segments) {
                Some(iovecs) => (
                    vec![IoOp::Writev {
                        offset: *offset,
                        iovecs,
                    }],
                    *len as i32,
                    0,
                    *len,
                ),
                None => {
                    self.complete_now(memory, &request, sequence, VIRTIO_BLK_S_IOERR, 0);
                    return true;
                }
            },
            Operation::Flush => (vec![IoOp::Flush], 0, 0, 0),
            Operation::Discard(ranges) | Operation::WriteZeroes(ranges) => {
                let mode = if kind == RequestType::Discard {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                let ops = ranges
                    .iter()
                    .map(|r| IoOp::Fallocate {
                        offset: r.byte_offset(),
                        len: r.byte_len(),
                        mode,
                    })
                    .collect();
                (ops, 0, 0, 0)
            }
        };
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.requests.push(None);
                self.requests.len() - 1
            }
        };
        self.requests[slot] = Some(InFlightRequest {
            head: request.head,
            sequence,
            status: request.status,
            kind,
            ops_left: ops.len() as u32,
            failed: false,
            expected_result,
            written_to_guest,
            bytes,
            memory: memory.clone(),
        });
        for op in ops {
            // SAFETY: the iovecs point into guest memory mapped by `memory`, whose clone is kept
            // in the request slot until its last completion is reaped; the guest gave these
            // buffers to the device and must not touch them before the used ring says so.
            if let Err(e) = unsafe { self.engine.push(slot as u64, op) } {
                tracing::error!(error = %e, "cannot queue I/O");
                if let Some(r) = self.requests[slot].as_mut() {
                    r.failed = true;
                    r.ops_left -= 1;
                }
            }
        }
        if self.requests[slot]
            .as_ref()
            .is_some_and(|r| r.ops_left == 0)
        {
            self.finish(shared, slot);
            return true;
        }
        false
    }

    fn reap_completions(&mut self, shared: &Shared) {
        let mut done = Vec::new();
        let requests = &mut self.requests;
        self.engine.reap(|tag, result| {
            let Some(Some(r)) = requests.get_mut(tag as usize) else {
                return;
            };
            if result != r.expected_result {
                if result < 0 {
                    tracing::warn!(head = r.head, errno = -result, "I/O failed");
                } else {
                    tracing::warn!(
                        head = r.head,
                        result,
                        expected = r.expected_result,
                        "short I/O"
                    );
                }
                r.failed = true;
            }
            r.ops_left -= 1;
            if r.ops_left == 0 {
                done.push(tag as usize);
            }
        });
        for slot in done {
            self.finish(shared, slot);
        }
    }

    /// Writes the status of a request whose I/O all completed and returns it to the guest.
    fn finish(&mut self, shared: &Shared, slot: usize) {
        let Some(r) = self.requests.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        let (status, written) = if r.failed {
            shared.metrics.count_io_error();
            (VIRTIO_BLK_S_IOERR, 0)
        } else {
            match r.kind {
                RequestType::Read => shared.metrics.add_bytes_read(r.bytes),
                RequestType::Write => shared.metrics.add_bytes_written(r.bytes),
                _ => {}
            }
            (VIRTIO_BLK_S_OK, r.written_to_guest)
        };
        let _ = r.memory.write_obj(status as u8, r.status);
        self.publish(r.sequence, r.head, written + 1);
    }

    fn signal_guest(&mut self, shared: &Shared) {
        if !std::mem::take(&mut self.unsignalled) {
            return;
        }
        let Some(vring) = &self.vring else { return };
        let needed = if shared.event_idx.load(Ordering::Relaxed) {
            vring.needs_notification().unwrap_or(true)
        } else {
            true
        };
        if needed && let Err(e) = vring.signal_used_queue() {
            tracing::warn!(error = %e, "cannot signal the guest");
        }
    }
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

/// Writes the serial (virtio 1.2 §5.2.6: at most 20 bytes, zero-padded) into `segments`.
fn write_serial(memory: &MemoryGuard, segments: &[Segment], serial: &[u8]) -> u32 {
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
    id[..serial.len().min(VIRTIO_BLK_ID_BYTES)]
        .copy_from_slice(&serial[..serial.len().min(VIRTIO_BLK_ID_BYTES)]);
    let mut written = 0usize;
    for s in segments {
        if written == id.len() {
            break;
        }
        let n = (s.len as usize).min(id.len() - written);
        if memory
            .write_slice(&id[written..written + n], s.addr)
            .is_err()
        {
            break;
        }
        written += n;
    }
    written as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_reports_capacity_and_queues() {
        let limits = DeviceLimits {
            capacity_sectors: 2048,
            read_only: false,
            seg_max: 126,
            size_max: SIZE_MAX,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: 8,
            max_discard_seg: 1,
            max_write_zeroes_sectors: 8,
            max_write_zeroes_seg: 1,
        };
        let c = config_space(&limits, 2);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
    }
}

#[cfg(test)]
#[path = "backend_tests.rs"]
mod hostile_guest_tests;
