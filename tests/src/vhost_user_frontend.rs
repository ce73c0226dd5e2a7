//! A host-side vhost-user frontend that drives any vhost-user backend the way a VMM would,
//! without a guest: the test plays the virtio *driver*.
//!
//! - [`GuestMemory`]: "guest RAM", one memfd mapped with vm-memory, shared with the backend by
//!   SET_MEM_TABLE, with a bump allocator for rings and buffers.
//! - [`SplitQueue`]: the driver side of one split virtqueue (virtio 1.2 §2.7) laid out in that
//!   memory: add descriptor chains, publish them on the avail ring, kick the backend through an
//!   eventfd, and collect used entries (waiting on the call eventfd).
//! - [`VhostUserConnection`]: the vhost-user conversation (the `vhost` crate's `Frontend`):
//!   feature and protocol-feature negotiation, GET_QUEUE_NUM, the memory table, and SET_VRING_*
//!   / SET_VRING_ENABLE / GET_VRING_BASE per queue. Reconnecting is connecting again and
//!   starting each queue at its used index ([`SplitQueue::used_index`]).
//!
//! Nothing here knows a device type; device tests build their requests on top.
//!
//! ```no_run
//! use ferrovirt_tests::vhost_user_frontend::*;
//! let mut mem = GuestMemory::new(16 << 20).unwrap();
//! let mut q = SplitQueue::new(&mut mem, 0, 256).unwrap();
//! let mut conn = VhostUserConnection::connect("/tmp/dev.sock".as_ref(), 1, 1 << 32).unwrap();
//! conn.set_mem_table(&mem).unwrap();
//! conn.start_queue(&mem, &q, 0).unwrap();
//! let buf = mem.alloc(4096, 8).unwrap();
//! q.add_chain(&mem, &[Buffer::writable(buf, 4096)]).unwrap();
//! q.publish(&mem).unwrap();
//! q.kick().unwrap();
//! let used = q.wait_used(&mem, 1, std::time::Duration::from_secs(5)).unwrap();
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

pub use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
pub use vm_memory::GuestAddress;
use vm_memory::{Address, Bytes, FileOffset, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// virtio 1.2 §2.7.5: descriptor flags.
pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("cannot create or size the guest memory memfd")]
    Memfd(#[source] std::io::Error),
    #[error("cannot map the guest memory: {0}")]
    Map(String),
    #[error("guest memory is full: {wanted} more bytes do not fit in {size}; make it bigger")]
    OutOfMemory { wanted: u64, size: u64 },
    #[error("guest memory access at {0:#x} failed: {1}")]
    Access(u64, String),
    #[error("queue {queue} has {free} free descriptors, the chain needs {needed}")]
    QueueFull {
        queue: usize,
        free: usize,
        needed: usize,
    },
    #[error("a descriptor chain needs at least one buffer")]
    EmptyChain,
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("vhost-user request {request} failed")]
    VhostUser {
        request: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("waited {timeout:?} for {wanted} used entries on queue {queue}, got {got}")]
    Timeout {
        queue: usize,
        wanted: usize,
        got: usize,
        timeout: Duration,
    },
}

fn vu(request: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError {
    move |source| FrontendError::VhostUser { request, source }
}

fn access(addr: GuestAddress) -> impl FnOnce(vm_memory::GuestMemoryError) -> FrontendError {
    move |e| FrontendError::Access(addr.0, e.to_string())
}

/// Guest RAM at guest address 0: a memfd mapped shared, so the backend sees our writes.
pub struct GuestMemory {
    memfd: File,
    memory: GuestMemoryMmap<()>,
    size: u64,
    next_free: u64,
}

impl GuestMemory {
    /// `size` bytes of zeroed memory.
    pub fn new(size: usize) -> Result<Self, FrontendError> {
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked and owned below.
        let fd = unsafe { libc::memfd_create(c"vhost-user-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(FrontendError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(size as u64).map_err(FrontendError::Memfd)?;
        let clone = memfd.try_clone().map_err(FrontendError::Memfd)?;
        let memory = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size,
            Some(FileOffset::new(clone, 0)),
        )])
        .map_err(|e| FrontendError::Map(e.to_string()))?;
        Ok(Self {
            memfd,
            memory,
            size: size as u64,
            // Guest address 0 stays unused, so a zeroed descriptor never looks valid.
            next_free: 4096,
        })
    }

    /// Reserves `len` bytes aligned to `align` (a power of two); memory is never freed.
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<GuestAddress, FrontendError> {
        let start = self.next_free.next_multiple_of(align.max(1));
        let end = start.checked_add(len).filter(|&e| e <= self.size).ok_or(
            FrontendError::OutOfMemory {
                wanted: len,
                size: self.size,
            },
        )?;
        self.next_free = end;
        Ok(GuestAddress(start))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The vm-memory view, for anything the helpers below do not cover.
    pub fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.memory
    }

    pub fn write(&self, addr: GuestAddress, bytes: &[u8]) -> Result<(), FrontendError> {
        self.memory.write_slice(bytes, addr).map_err(access(addr))
    }

    pub fn read(&self, addr: GuestAddress, len: usize) -> Result<Vec<u8>, FrontendError> {
        let mut out = vec![0u8; len];
        self.memory
            .read_slice(&mut out, addr)
            .map_err(access(addr))?;
        Ok(out)
    }

    /// Our virtual address of guest address `addr` (vhost-user ring addresses are in the
    /// frontend's address space).
    pub fn host_address(&self, addr: GuestAddress) -> Result<u64, FrontendError> {
        self.memory
            .get_host_address(addr)
            .map(|p| p as u64)
            .map_err(access(addr))
    }

    fn region(&self) -> Result<VhostUserMemoryRegionInfo, FrontendError> {
        Ok(VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: self.host_address(GuestAddress(0))?,
            mmap_offset: 0,
            mmap_handle: self.memfd.as_raw_fd(),
        })
    }
}

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    pub addr: GuestAddress,
    pub len: u32,
    /// VRING_DESC_F_WRITE: the device writes it (RX buffers, status bytes).
    pub device_writable: bool,
}

impl Buffer {
    pub fn readable(addr: GuestAddress, len: u32) -> Self {
        Self {
            addr,
            len,
            device_writable: false,
        }
    }

    pub fn writable(addr: GuestAddress, len: u32) -> Self {
        Self {
            addr,
            len,
            device_writable: true,
        }
    }
}

/// An entry of the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElement {
    pub head: u16,
    pub len: u32,
}

/// The driver side of a split virtqueue.
pub struct SplitQueue {
    index: usize,
    size: u16,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    free: Vec<u16>,
    /// Descriptor ids of each chain the device has, by head.
    chains: HashMap<u16, Vec<u16>>,
    /// The avail index of the next chain we add (published or not).
    avail_idx: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
    notifications: u64,
}

impl SplitQueue {
    /// Lays out queue `index` of `size` entries (a power of two) in `memory`, rings zeroed.
    pub fn new(memory: &mut GuestMemory, index: usize, size: u16) -> Result<Self, FrontendError> {
        let n = u64::from(size);
        // virtio 1.2 §2.7: alignments 16 (descriptors), 2 (avail), 4 (used).
        let desc_table = memory.alloc(16 * n, 4096)?;
        let avail_ring = memory.alloc(6 + 2 * n, 4096)?;
        let used_ring = memory.alloc(6 + 8 * n, 4096)?;
        Ok(Self {
            index,
            size,
            desc_table,
            avail_ring,
            used_ring,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
            kick: EventFd::new(EFD_NONBLOCK).map_err(FrontendError::EventFd)?,
            call: EventFd::new(EFD_NONBLOCK).map_err(FrontendError::EventFd)?,
            notifications: 0,
        })
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptors not in any chain the device holds.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains added and not yet returned on the used ring.
    pub fn outstanding(&self) -> usize {
        self.chains.len()
    }

    /// Call-eventfd signals seen so far by [`Self::wait_used`].
    pub fn notifications(&self) -> u64 {
        self.notifications
    }

    /// Writes a chain of `buffers` and puts its head on the avail ring (not yet visible to the
    /// device: see [`Self::publish`]). Returns the head descriptor id.
    pub fn add_chain(
        &mut self,
        memory: &GuestMemory,
        buffers: &[Buffer],
    ) -> Result<u16, FrontendError> {
        let raw: Vec<(u64, u32, u16)> = buffers
            .iter()
            .map(|b| {
                let flags = if b.device_writable {
                    VRING_DESC_F_WRITE
                } else {
                    0
                };
                (b.addr.0, b.len, flags)
            })
            .collect();
        self.add_raw_chain(memory, &raw)
    }

    /// Like [`Self::add_chain`] with raw `(addr, len, flags)` descriptors, written as given
    /// (NEXT and the next index are filled in): for tests of hostile drivers.
    pub fn add_raw_chain(
        &mut self,
        memory: &GuestMemory,
        descriptors: &[(u64, u32, u16)],
    ) -> Result<u16, FrontendError> {
        if descriptors.is_empty() {
            return Err(FrontendError::EmptyChain);
        }
        if descriptors.len() > self.free.len() {
            return Err(FrontendError::QueueFull {
                queue: self.index,
                free: self.free.len(),
                needed: descriptors.len(),
            });
        }
        let ids: Vec<u16> = (0..descriptors.len())
            .filter_map(|_| self.free.pop())
            .collect();
        for (i, &(addr, len, flags)) in descriptors.iter().enumerate() {
            let (flags, next) = match ids.get(i + 1) {
                Some(&next) => (flags | VRING_DESC_F_NEXT, next),
                None => (flags & !VRING_DESC_F_NEXT, 0),
            };
            memory.write(
                self.desc_addr(ids[i]),
                &raw_descriptor(addr, len, flags, next),
            )?;
        }
        let head = ids[0];
        let slot = u64::from(self.avail_idx % self.size);
        memory.write(
            self.avail_ring.unchecked_add(4 + 2 * slot),
            &head.to_le_bytes(),
        )?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.chains.insert(head, ids);
        Ok(head)
    }

    /// Puts `buffers` in an indirect descriptor table at `table` (16 bytes per buffer, which
    /// the caller allocated) and adds a one-descriptor chain pointing at it (virtio 1.2
    /// §2.7.5.3; needs VIRTIO_RING_F_INDIRECT_DESC). Returns the head.
    pub fn add_indirect_chain(
        &mut self,
        memory: &GuestMemory,
        table: GuestAddress,
        buffers: &[Buffer],
    ) -> Result<u16, FrontendError> {
        if buffers.is_empty() {
            return Err(FrontendError::EmptyChain);
        }
        for (i, b) in buffers.iter().enumerate() {
            let mut flags = if b.device_writable {
                VRING_DESC_F_WRITE
            } else {
                0
            };
            let next = if i + 1 < buffers.len() {
                flags |= VRING_DESC_F_NEXT;
                i as u16 + 1
            } else {
                0
            };
            memory.write(
                table.unchecked_add(16 * i as u64),
                &raw_descriptor(b.addr.0, b.len, flags, next),
            )?;
        }
        let len = 16 * buffers.len() as u32;
        self.add_raw_chain(memory, &[(table.0, len, VRING_DESC_F_INDIRECT)])
    }

    fn desc_addr(&self, id: u16) -> GuestAddress {
        self.desc_table.unchecked_add(16 * u64::from(id))
    }

    /// Makes every chain added so far visible to the device (avail->idx, after a barrier).
    pub fn publish(&mut self, memory: &GuestMemory) -> Result<(), FrontendError> {
        fence(Ordering::Release);
        let addr = self.avail_ring.unchecked_add(2);
        memory
            .memory()
            .store(self.avail_idx.to_le(), addr, Ordering::Release)
            .map_err(access(addr))
    }

    /// Notifies the device (the VMM's ioeventfd).
    pub fn kick(&self) -> Result<(), FrontendError> {
        self.kick.write(1).map_err(FrontendError::EventFd)
    }

    /// used->idx as the device last wrote it.
    pub fn used_index(&self, memory: &GuestMemory) -> Result<u16, FrontendError> {
        let addr = self.used_ring.unchecked_add(2);
        let idx: u16 = memory
            .memory()
            .load(addr, Ordering::Acquire)
            .map_err(access(addr))?;
        Ok(u16::from_le(idx))
    }

    /// The used entries the device added since the last call; their descriptors are free again.
    pub fn take_used(&mut self, memory: &GuestMemory) -> Result<Vec<UsedElement>, FrontendError> {
        let used_idx = self.used_index(memory)?;
        let mut out = Vec::new();
        while self.last_used != used_idx {
            let slot = u64::from(self.last_used % self.size);
            let e = memory.read(self.used_ring.unchecked_add(4 + 8 * slot), 8)?;
            let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            let head = id as u16;
            if let Some(ids) = self.chains.remove(&head) {
                self.free.extend(ids);
            }
            out.push(UsedElement { head, len });
            self.last_used = self.last_used.wrapping_add(1);
        }
        Ok(out)
    }

    /// Collects used entries until there are at least `count`, waiting on the call eventfd.
    /// With VIRTIO_RING_F_EVENT_IDX this asks for a notification at every new entry
    /// (avail->used_event), so it works whether or not the feature was negotiated.
    pub fn wait_used(
        &mut self,
        memory: &GuestMemory,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<UsedElement>, FrontendError> {
        let deadline = Instant::now() + timeout;
        let mut out = self.take_used(memory)?;
        while out.len() < count {
            // virtio 1.2 §2.7.10: used_event lives after the avail ring.
            memory.write(
                self.avail_ring.unchecked_add(4 + 2 * u64::from(self.size)),
                &self.last_used.to_le_bytes(),
            )?;
            fence(Ordering::SeqCst);
            out.extend(self.take_used(memory)?);
            if out.len() >= count {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FrontendError::Timeout {
                    queue: self.index,
                    wanted: count,
                    got: out.len(),
                    timeout,
                });
            }
            let wait = (deadline - now).min(Duration::from_millis(20));
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as libc::c_int) };
            if self.call.read().is_ok() {
                self.notifications += 1;
            }
            out.extend(self.take_used(memory)?);
        }
        Ok(out)
    }
}

/// virtio 1.2 §2.7.5: struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
fn raw_descriptor(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// A vhost-user connection to a backend socket.
pub struct VhostUserConnection {
    frontend: Frontend,
    features: u64,
    protocol_features: VhostUserProtocolFeatures,
    queue_num: Option<u64>,
}

impl VhostUserConnection {
    /// Connects and negotiates: virtio features are `wanted_features & offered` (plus
    /// VHOST_USER_F_PROTOCOL_FEATURES when offered); protocol features MQ, REPLY_ACK and
    /// CONFIG when offered. `num_queues` is how many queues this connection may address.
    pub fn connect(
        socket: &Path,
        num_queues: usize,
        wanted_features: u64,
    ) -> Result<Self, FrontendError> {
        Self::connect_with(
            socket,
            num_queues,
            wanted_features,
            VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG,
        )
    }

    /// [`Self::connect`] with an explicit set of wanted protocol features.
    pub fn connect_with(
        socket: &Path,
        num_queues: usize,
        wanted_features: u64,
        wanted_protocol: VhostUserProtocolFeatures,
    ) -> Result<Self, FrontendError> {
        let mut frontend = Frontend::connect(socket, num_queues as u64).map_err(vu("connect"))?;
        frontend.set_owner().map_err(vu("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(vu("GET_FEATURES"))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        let mut queue_num = None;
        if offered & protocol_bit != 0 {
            let offered_protocol = frontend
                .get_protocol_features()
                .map_err(vu("GET_PROTOCOL_FEATURES"))?;
            protocol_features = offered_protocol & wanted_protocol;
            frontend
                .set_protocol_features(protocol_features)
                .map_err(vu("SET_PROTOCOL_FEATURES"))?;
            if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
                // Also limits the queues this Frontend addresses to what the backend has.
                queue_num = Some(frontend.get_queue_num().map_err(vu("GET_QUEUE_NUM"))?);
            }
        }
        let features = (wanted_features & offered) | (offered & protocol_bit);
        frontend
            .set_features(features)
            .map_err(vu("SET_FEATURES"))?;
        Ok(Self {
            frontend,
            features,
            protocol_features,
            queue_num,
        })
    }

    /// The virtio features this connection acknowledged.
    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn has_feature(&self, bit: u32) -> bool {
        self.features & (1 << bit) != 0
    }

    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// The backend's answer to GET_QUEUE_NUM, when MQ was negotiated.
    pub fn queue_num(&self) -> Option<u64> {
        self.queue_num
    }

    /// The underlying `vhost` frontend, for requests not wrapped here (GET_CONFIG, ...).
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// SET_MEM_TABLE with the single region of `memory`.
    pub fn set_mem_table(&mut self, memory: &GuestMemory) -> Result<(), FrontendError> {
        self.frontend
            .set_mem_table(&[memory.region()?])
            .map(drop)
            .map_err(vu("SET_MEM_TABLE"))
    }

    /// SET_VRING_NUM/ADDR/BASE/CALL/KICK for `queue`, starting at avail index `base`, then
    /// SET_VRING_ENABLE 1 when protocol features were negotiated (else the ring starts on the
    /// kick, as the spec says).
    pub fn start_queue(
        &mut self,
        memory: &GuestMemory,
        queue: &SplitQueue,
        base: u16,
    ) -> Result<(), FrontendError> {
        let i = queue.index;
        self.frontend
            .set_vring_num(i, queue.size)
            .map_err(vu("SET_VRING_NUM"))?;
        let config = VringConfigData {
            queue_max_size: queue.size,
            queue_size: queue.size,
            flags: 0,
            desc_table_addr: memory.host_address(queue.desc_table)?,
            used_ring_addr: memory.host_address(queue.used_ring)?,
            avail_ring_addr: memory.host_address(queue.avail_ring)?,
            log_addr: None,
        };
        self.frontend
            .set_vring_addr(i, &config)
            .map_err(vu("SET_VRING_ADDR"))?;
        self.frontend
            .set_vring_base(i, base)
            .map_err(vu("SET_VRING_BASE"))?;
        self.frontend
            .set_vring_call(i, &queue.call)
            .map_err(vu("SET_VRING_CALL"))?;
        self.frontend
            .set_vring_kick(i, &queue.kick)
            .map_err(vu("SET_VRING_KICK"))?;
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.set_queue_enabled(i, true)?;
        }
        Ok(())
    }

    /// SET_VRING_ENABLE.
    pub fn set_queue_enabled(&mut self, index: usize, enable: bool) -> Result<(), FrontendError> {
        self.frontend
            .set_vring_enable(index, enable)
            .map_err(vu("SET_VRING_ENABLE"))
    }

    /// GET_VRING_BASE: stops the ring; returns the next avail index the backend would read.
    pub fn stop_queue(&mut self, index: usize) -> Result<u16, FrontendError> {
        self.frontend
            .get_vring_base(index)
            .map(|b| b as u16)
            .map_err(vu("GET_VRING_BASE"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_written_by_the_driver_read_back_as_the_spec_lays_them_out() {
        let mut mem = GuestMemory::new(1 << 20).unwrap();
        let mut q = SplitQueue::new(&mut mem, 0, 8).unwrap();
        let a = mem.alloc(100, 8).unwrap();
        let b = mem.alloc(50, 8).unwrap();
        let head = q
            .add_chain(&mem, &[Buffer::readable(a, 100), Buffer::writable(b, 50)])
            .unwrap();
        q.publish(&mem).unwrap();
        let avail_idx = mem.read(q.avail_ring.unchecked_add(2), 2).unwrap();
        assert_eq!(avail_idx, 1u16.to_le_bytes());
        let ring0 = mem.read(q.avail_ring.unchecked_add(4), 2).unwrap();
        assert_eq!(u16::from_le_bytes([ring0[0], ring0[1]]), head);
        let d = mem.read(q.desc_addr(head), 16).unwrap();
        assert_eq!(u64::from_le_bytes(d[0..8].try_into().unwrap()), a.0);
        assert_eq!(u32::from_le_bytes(d[8..12].try_into().unwrap()), 100);
        assert_eq!(u16::from_le_bytes([d[12], d[13]]), VRING_DESC_F_NEXT);
        let next = u16::from_le_bytes([d[14], d[15]]);
        let d2 = mem.read(q.desc_addr(next), 16).unwrap();
        assert_eq!(u16::from_le_bytes([d2[12], d2[13]]), VRING_DESC_F_WRITE);
        assert_eq!(q.free_descriptors(), 6);

        // Play the device: one used entry frees both descriptors.
        let mut e = [0u8; 8];
        e[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        e[4..].copy_from_slice(&7u32.to_le_bytes());
        mem.write(q.used_ring.unchecked_add(4), &e).unwrap();
        mem.write(q.used_ring.unchecked_add(2), &1u16.to_le_bytes())
            .unwrap();
        let used = q.wait_used(&mem, 1, Duration::from_secs(1)).unwrap();
        assert_eq!(used, vec![UsedElement { head, len: 7 }]);
        assert_eq!(q.free_descriptors(), 8);
        assert_eq!(q.outstanding(), 0);
    }

    #[test]
    fn a_full_queue_refuses_a_chain_instead_of_overwriting() {
        let mut mem = GuestMemory::new(1 << 20).unwrap();
        let mut q = SplitQueue::new(&mut mem, 3, 2).unwrap();
        let a = mem.alloc(10, 8).unwrap();
        let three = [Buffer::readable(a, 10); 3];
        assert!(matches!(
            q.add_chain(&mem, &three),
            Err(FrontendError::QueueFull { needed: 3, .. })
        ));
        let err = q.wait_used(&mem, 1, Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, FrontendError::Timeout { queue: 3, .. }));
    }

    #[test]
    fn allocation_is_aligned_and_bounded() {
        let mut mem = GuestMemory::new(64 << 10).unwrap();
        let a = mem.alloc(3, 1).unwrap();
        let b = mem.alloc(8, 4096).unwrap();
        assert!(b.0.is_multiple_of(4096) && b.0 > a.0);
        assert!(matches!(
            mem.alloc(1 << 20, 8),
            Err(FrontendError::OutOfMemory { .. })
        ));
    }
}
