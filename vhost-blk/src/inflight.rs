//! The inflight region (vhost-user spec, "Inflight I/O tracking", split virtqueues): shared
//! memory in which the backend records which descriptor chains it took and has not answered,
//! so that a backend started after a crash resubmits exactly those.
//!
//! The backend creates the region on GET_INFLIGHT_FD; the frontend keeps the file and hands it
//! to every backend it connects to with SET_INFLIGHT_FD. Only the backend reads the contents,
//! so the layout is ours; it follows the one QEMU and libvhost-user use. Per queue, at a
//! 64-byte aligned stride:
//!
//! ```text
//! u64 features; u16 version (= 1); u16 desc_num; u16 last_batch_head; u16 used_idx;
//! desc[desc_num] { u8 inflight; u8 padding[5]; u16 next; u64 counter }
//! ```
//!
//! Every store is an atomic store to shared memory, fenced so that a crash between any two of
//! them leaves a state [`QueueInflight::recover`] turns into "resubmit exactly the requests
//! the guest has not seen answered".

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use vhost::vhost_user::message::VhostUserInflight;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory, VolatileSlice};

/// The only layout version there is.
pub const REGION_VERSION: u16 = 1;
const QUEUE_HEADER_LEN: usize = 16;
const DESC_STATE_LEN: usize = 16;
const QUEUE_ALIGN: usize = 64;
// Offsets in a queue's header.
const VERSION: usize = 8;
const DESC_NUM: usize = 10;
const LAST_BATCH_HEAD: usize = 12;
const USED_IDX: usize = 14;
// Offsets in a descriptor's state.
const INFLIGHT: usize = 0;
const COUNTER: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error(
        "the frontend described {num_queues} queues of {queue_size} entries; this backend has \
         1 to {max_queues} queues of at most {max_queue_size} entries"
    )]
    Geometry {
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
        max_queue_size: u16,
    },
    #[error("cannot create the inflight memfd; is memfd_create allowed (seccomp)?")]
    Create(#[source] std::io::Error),
    #[error(
        "the inflight region is {given} bytes, smaller than the {needed} bytes its queues need; \
         pass back the region GET_INFLIGHT_FD described"
    )]
    TooSmall { given: u64, needed: u64 },
    #[error("the inflight file is shorter than offset + size the frontend described")]
    FileTooShort,
    #[error(
        "the inflight file is not sealed against shrinking, so the frontend could make the \
         backend fault; pass back the file GET_INFLIGHT_FD returned"
    )]
    NotSealed,
    #[error("cannot inspect the inflight file")]
    Stat(#[source] std::io::Error),
    #[error("cannot map the inflight region (is the offset page-aligned?)")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    #[error("queue {0}'s inflight region has layout version {1}, not {REGION_VERSION}")]
    Version(u16, u16),
}

/// The largest geometry the backend accepts, so a frontend cannot make it allocate more.
#[derive(Clone, Copy, Debug)]
pub struct InflightLimits {
    pub max_queues: u16,
    pub max_queue_size: u16,
}

impl InflightLimits {
    fn check(&self, num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
        if num_queues == 0
            || num_queues > self.max_queues
            || queue_size == 0
            || queue_size > self.max_queue_size
        {
            return Err(InflightError::Geometry {
                num_queues,
                queue_size,
                max_queues: self.max_queues,
                max_queue_size: self.max_queue_size,
            });
        }
        Ok(())
    }
}

/// Bytes of one queue's region.
pub fn queue_region_len(queue_size: u16) -> usize {
    let len = QUEUE_HEADER_LEN + DESC_STATE_LEN * usize::from(queue_size);
    len.next_multiple_of(QUEUE_ALIGN)
}

/// Creates a zeroed region for `num_queues` queues of `queue_size` entries (GET_INFLIGHT_FD):
/// a sealed memfd and the description to return with it.
pub fn create_region(
    num_queues: u16,
    queue_size: u16,
    limits: &InflightLimits,
) -> Result<(File, VhostUserInflight), InflightError> {
    limits.check(num_queues, queue_size)?;
    let stride = queue_region_len(queue_size);
    let len = stride * usize::from(num_queues);
    // SAFETY: a NUL-terminated name; the returned fd is checked and then owned by the File.
    let fd = unsafe {
        libc::memfd_create(
            c"vhost-blk-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(InflightError::Create(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64).map_err(InflightError::Create)?;
    for q in 0..usize::from(num_queues) {
        let mut header = [0u8; QUEUE_HEADER_LEN];
        header[VERSION..VERSION + 2].copy_from_slice(&REGION_VERSION.to_le_bytes());
        header[DESC_NUM..DESC_NUM + 2].copy_from_slice(&queue_size.to_le_bytes());
        file.write_all_at(&header, (q * stride) as u64)
            .map_err(InflightError::Create)?;
    }
    // Whoever maps the region later (a restarted backend) must not fault on a shrunk file.
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(InflightError::Create(std::io::Error::last_os_error()));
    }
    let info = VhostUserInflight::new(len as u64, 0, num_queues, queue_size);
    Ok((file, info))
}

/// A region mapped from the frontend's file (SET_INFLIGHT_FD).
pub struct InflightArea {
    region: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
    stride: usize,
}

impl std::fmt::Debug for InflightArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightArea")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl InflightArea {
    /// Maps `file` as described by `info`, after checking the description against `limits`,
    /// the file's size and its seals.
    pub fn map(
        file: File,
        info: &VhostUserInflight,
        limits: &InflightLimits,
    ) -> Result<Self, InflightError> {
        let (num_queues, queue_size) = (info.num_queues, info.queue_size);
        limits.check(num_queues, queue_size)?;
        let stride = queue_region_len(queue_size);
        let needed = stride * usize::from(num_queues);
        if info.mmap_size < needed as u64 {
            return Err(InflightError::TooSmall {
                given: info.mmap_size,
                needed: needed as u64,
            });
        }
        let file_len = file.metadata().map_err(InflightError::Stat)?.len();
        if info
            .mmap_offset
            .checked_add(needed as u64)
            .is_none_or(|end| end > file_len)
        {
            return Err(InflightError::FileTooShort);
        }
        // SAFETY: fcntl on a descriptor `file` owns, no pointer argument.
        let seals =
            unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed);
        }
        let region = MmapRegion::from_file(FileOffset::new(file, info.mmap_offset), needed)
            .map_err(InflightError::Map)?;
        let area = Self {
            region,
            num_queues,
            queue_size,
            stride,
        };
        for q in 0..num_queues {
            let version = area
                .header(q)
                .and_then(|h| h.load::<u16>(VERSION, Ordering::Relaxed).ok())
                .unwrap_or(0);
            if version != REGION_VERSION {
                return Err(InflightError::Version(q, version));
            }
        }
        Ok(area)
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Queue `queue`'s bytes; `None` only for a queue outside the region.
    fn header(&self, queue: u16) -> Option<VolatileSlice<'_>> {
        self.region
            .get_slice(usize::from(queue) * self.stride, self.stride)
            .ok()
    }

    /// The tracker of queue `index`, if the region has one.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<QueueInflight> {
        (index < self.num_queues).then(|| QueueInflight {
            area: self.clone(),
            index,
            counter: 0,
        })
    }
}

/// One queue's part of the region, as its worker writes it.
pub struct QueueInflight {
    area: Arc<InflightArea>,
    index: u16,
    /// The counter of the latest chain taken; resubmission order is counter order.
    counter: u64,
}

/// What a queue starting on a region with recorded work must do.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Heads to resubmit, oldest first.
    pub resubmit: Vec<u16>,
    /// Where to continue reading the available ring.
    pub next_avail: u16,
}

impl QueueInflight {
    fn slice(&self) -> Option<VolatileSlice<'_>> {
        self.area.header(self.index)
    }

    fn desc(&self, head: u16) -> Option<usize> {
        (head < self.area.queue_size).then(|| QUEUE_HEADER_LEN + DESC_STATE_LEN * usize::from(head))
    }

    /// Records that chain `head` was taken, before its I/O is submitted.
    pub fn begin(&mut self, head: u16) {
        self.counter += 1;
        let counter = self.counter;
        let (Some(at), Some(s)) = (self.desc(head), self.slice()) else {
            return;
        };
        let _ = s.store(counter, at + COUNTER, Ordering::Relaxed);
        let _ = s.store(1u8, at + INFLIGHT, Ordering::Release);
        // The I/O (and the used entry) must not be visible before the mark.
        fence(Ordering::SeqCst);
    }

    /// Step 1 of answering `head`: name it as the batch being published, before the used
    /// entry is written.
    pub fn before_used(&self, head: u16) {
        if let Some(s) = self.slice() {
            let _ = s.store(head, LAST_BATCH_HEAD, Ordering::Release);
        }
        fence(Ordering::SeqCst);
    }

    /// Step 2, after the used index was published as `used_idx`: clear the mark, then record
    /// the used index. A crash before the second store leaves region.used_idx != used->idx,
    /// which tells [`Self::recover`] to clear `last_batch_head`.
    pub fn after_used(&self, head: u16, used_idx: u16) {
        fence(Ordering::SeqCst);
        let Some(s) = self.slice() else { return };
        if let Some(at) = self.desc(head) {
            let _ = s.store(0u8, at + INFLIGHT, Ordering::Release);
        }
        fence(Ordering::SeqCst);
        let _ = s.store(used_idx, USED_IDX, Ordering::Release);
    }

    /// Brings the region in line with the used ring (whose index is `ring_used_idx` and size
    /// `ring_size`) and says which chains to resubmit, in the order they were taken.
    pub fn recover(&mut self, ring_used_idx: u16, ring_size: u16) -> Recovery {
        let Some(s) = self.slice() else {
            return Recovery {
                resubmit: Vec::new(),
                next_avail: ring_used_idx,
            };
        };
        let region_used = s.load::<u16>(USED_IDX, Ordering::Acquire).unwrap_or(0);
        if region_used != ring_used_idx {
            // The last backend published the batch but died before clearing its marks.
            let last = s
                .load::<u16>(LAST_BATCH_HEAD, Ordering::Acquire)
                .unwrap_or(0);
            if let Some(at) = self.desc(last) {
                let _ = s.store(0u8, at + INFLIGHT, Ordering::Release);
            }
            let _ = s.store(ring_used_idx, USED_IDX, Ordering::Release);
        }
        let mut pending = Vec::new();
        let mut max_counter = 0u64;
        for head in 0..self.area.queue_size {
            let Some(at) = self.desc(head) else { break };
            if s.load::<u8>(at + INFLIGHT, Ordering::Acquire).unwrap_or(0) != 1 {
                continue;
            }
            if head >= ring_size {
                // Not a head of this ring: a stale or hostile mark; forget it.
                let _ = s.store(0u8, at + INFLIGHT, Ordering::Release);
                continue;
            }
            let counter = s.load::<u64>(at + COUNTER, Ordering::Acquire).unwrap_or(0);
            max_counter = max_counter.max(counter);
            pending.push((counter, head));
        }
        pending.sort_unstable();
        self.counter = max_counter;
        fence(Ordering::SeqCst);
        Recovery {
            next_avail: ring_used_idx.wrapping_add(pending.len() as u16),
            resubmit: pending.into_iter().map(|(_, head)| head).collect(),
        }
    }
}

#[cfg(test)]
#[path = "inflight_tests.rs"]
mod tests;
