//! Split virtqueues (virtio 1.2 §2.7) in statically allocated, identity-mapped memory.
//!
//! The driver owns the descriptor table and the available ring; the device writes the
//! used ring. Every access to ring memory is volatile, and fences order the ring updates
//! against the device (which runs concurrently, as DMA would).

use core::ptr::{NonNull, addr_of, addr_of_mut};
use core::sync::atomic::{Ordering, fence};

use super::VirtioError;
use crate::dma;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// §2.7.7: the driver does not want used-buffer notifications (it polls).
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// §2.7.10: the device does not need available-buffer notifications right now.
const USED_F_NO_NOTIFY: u16 = 1;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Descriptor {
    const ZERO: Self = Self {
        addr: 0,
        len: 0,
        flags: 0,
        next: 0,
    };
}

#[repr(C)]
pub struct AvailRing<const N: usize> {
    flags: u16,
    idx: u16,
    ring: [u16; N],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UsedElem {
    /// Head descriptor of the chain the device finished.
    pub id: u32,
    /// Bytes the device wrote into the chain's writable buffers.
    pub len: u32,
}

#[repr(C, align(4))]
pub struct UsedRing<const N: usize> {
    flags: u16,
    idx: u16,
    ring: [UsedElem; N],
    avail_event: u16,
}

/// The three parts of a split queue of up to `N` entries (§2.7: 16-, 2- and 4-byte
/// alignment; a page keeps it simple).
#[repr(C, align(4096))]
pub struct QueueMemory<const N: usize> {
    desc: [Descriptor; N],
    avail: AvailRing<N>,
    used: UsedRing<N>,
}

impl<const N: usize> QueueMemory<N> {
    pub const fn new() -> Self {
        Self {
            desc: [Descriptor::ZERO; N],
            avail: AvailRing {
                flags: 0,
                idx: 0,
                ring: [0; N],
                used_event: 0,
            },
            used: UsedRing {
                flags: 0,
                idx: 0,
                ring: [UsedElem { id: 0, len: 0 }; N],
                avail_event: 0,
            },
        }
    }
}

impl<const N: usize> Default for QueueMemory<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// One buffer of a descriptor chain, by guest-physical address.
#[derive(Clone, Copy, Debug)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    /// The device writes it (device-readable otherwise).
    pub device_writable: bool,
}

/// Driver state of a split virtqueue of `size` (<= N, a power of two) entries.
pub struct SplitQueue<const N: usize> {
    mem: NonNull<QueueMemory<N>>,
    size: u16,
    free_head: u16,
    num_free: u16,
    next_avail: u16,
    last_used: u16,
}

impl<const N: usize> SplitQueue<N> {
    /// Takes over `mem` (claimed from a `DmaCell`) with `size` entries: `min(N, device
    /// maximum)`, rounded down to a power of two.
    pub fn new(mem: NonNull<QueueMemory<N>>, size: u16) -> Self {
        let size = size.min(N as u16).max(1);
        let size = 1 << (15 - size.leading_zeros());
        let m = mem.as_ptr();
        // SAFETY: `mem` is exclusively ours (claimed from a DmaCell) and the device has
        // not been given its address yet; every field written lies inside the allocation.
        unsafe {
            m.write_volatile(QueueMemory::new());
            for i in 0..size {
                let d = addr_of_mut!((*m).desc[usize::from(i)]);
                addr_of_mut!((*d).next).write_volatile(i + 1);
            }
        }
        Self {
            mem,
            size,
            free_head: 0,
            num_free: size,
            next_avail: 0,
            last_used: 0,
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Free descriptors: a chain of up to this many buffers can be pushed.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Asks the device not to send used-buffer notifications (a polling driver; §2.7.7).
    /// Only a hint: the device may still send them.
    pub fn suppress_interrupts(&mut self) {
        // SAFETY: the driver owns avail.flags, a field of our allocation.
        unsafe {
            addr_of_mut!((*self.mem.as_ptr()).avail.flags).write_volatile(AVAIL_F_NO_INTERRUPT)
        };
        fence(Ordering::SeqCst);
    }

    /// Whether the device wants a notification for buffers pushed so far: false while it
    /// sets VIRTQ_USED_F_NO_NOTIFY (it is polling the ring; §2.7.10). Call after `push`.
    pub fn needs_notify(&self) -> bool {
        // `push` ended with a fence, so avail.idx is visible before this read.
        // SAFETY: used.flags is a field of our allocation that the device writes; volatile.
        let flags = unsafe { addr_of!((*self.mem.as_ptr()).used.flags).read_volatile() };
        flags & USED_F_NO_NOTIFY == 0
    }

    pub fn desc_addr(&self) -> u64 {
        dma::phys_addr(self.mem)
    }

    pub fn avail_addr(&self) -> u64 {
        // SAFETY: only computes a field address inside our allocation.
        (unsafe { addr_of!((*self.mem.as_ptr()).avail) }) as u64
    }

    pub fn used_addr(&self) -> u64 {
        // SAFETY: only computes a field address inside our allocation.
        (unsafe { addr_of!((*self.mem.as_ptr()).used) }) as u64
    }

    /// Makes a chain of `buffers` available to the device; returns its head. The caller
    /// notifies the device afterwards and keeps the buffers alive until they are used.
    pub fn push(&mut self, buffers: &[Buffer]) -> Result<u16, VirtioError> {
        if buffers.is_empty() || buffers.len() > usize::from(self.num_free) {
            return Err(VirtioError::QueueFull);
        }
        let m = self.mem.as_ptr();
        let head = self.free_head;
        let mut idx = head;
        for (i, b) in buffers.iter().enumerate() {
            let last = i + 1 == buffers.len();
            // SAFETY: `idx` < size <= N (free-list entries are all < size); the descriptor
            // is free, so the device does not read it concurrently.
            unsafe {
                let d = addr_of_mut!((*m).desc[usize::from(idx)]);
                let next = addr_of!((*d).next).read_volatile();
                let flags = if b.device_writable { DESC_F_WRITE } else { 0 }
                    | if last { 0 } else { DESC_F_NEXT };
                addr_of_mut!((*d).addr).write_volatile(b.addr);
                addr_of_mut!((*d).len).write_volatile(b.len);
                addr_of_mut!((*d).flags).write_volatile(flags);
                if last {
                    self.free_head = next;
                } else {
                    idx = next;
                }
            }
        }
        self.num_free -= buffers.len() as u16;
        let slot = usize::from(self.next_avail % self.size);
        // SAFETY: `slot` < size <= N; the ring entry is not yet published.
        unsafe { addr_of_mut!((*m).avail.ring[slot]).write_volatile(head) };
        // §2.7.13: the descriptors and ring entry must be visible before the index.
        fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        // SAFETY: the driver owns avail.idx.
        unsafe { addr_of_mut!((*m).avail.idx).write_volatile(self.next_avail) };
        // The index must be visible before the caller's notify.
        fence(Ordering::SeqCst);
        Ok(head)
    }

    /// Takes the next chain the device has finished with, returning its descriptors to the
    /// free list.
    pub fn pop_used(&mut self) -> Option<UsedElem> {
        let m = self.mem.as_ptr();
        // SAFETY: used.idx is a field of our allocation that the device writes; volatile.
        let used_idx = unsafe { addr_of!((*m).used.idx).read_volatile() };
        if used_idx == self.last_used {
            return None;
        }
        // Read the element only after seeing the index that covers it.
        fence(Ordering::SeqCst);
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: `slot` < size <= N; the device published this element.
        let elem = unsafe { addr_of!((*m).used.ring[slot]).read_volatile() };
        self.last_used = self.last_used.wrapping_add(1);
        // Return the chain to the free list; a bad id from the device is ignored (the
        // descriptors leak rather than corrupt the list).
        let Ok(head) = u16::try_from(elem.id) else {
            return Some(elem);
        };
        if head >= self.size {
            return Some(elem);
        }
        let mut idx = head;
        let mut freed = 1;
        // SAFETY: `head` < size was checked and every `next` in a chain we built is < size;
        // the `freed` bound stops the walk even if the table were corrupt. The chain is ours
        // again now that the device has used it.
        unsafe {
            loop {
                let d = addr_of_mut!((*m).desc[usize::from(idx)]);
                let flags = addr_of!((*d).flags).read_volatile();
                if flags & DESC_F_NEXT == 0 || freed >= self.size {
                    addr_of_mut!((*d).next).write_volatile(self.free_head);
                    break;
                }
                // `next` was written by us (the device only reads descriptors).
                idx = addr_of!((*d).next).read_volatile();
                freed += 1;
            }
        }
        self.free_head = head;
        self.num_free += freed;
        Some(elem)
    }
}
