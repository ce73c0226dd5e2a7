//! Statically allocated memory shared with devices (virtqueues, I/O buffers).
//!
//! There is no allocator. A driver claims a `DmaCell` once and gets a raw pointer to it;
//! the identity map makes that pointer's value the guest-physical address devices use.

use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};

pub struct DmaCell<T> {
    taken: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the contents are reached only through the pointer `take` hands out once, so
// there is a single owner; `T: Send` lets that owner be any CPU.
unsafe impl<T: Send> Sync for DmaCell<T> {}

impl<T> DmaCell<T> {
    pub const fn new(value: T) -> Self {
        Self {
            taken: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Claims the memory; `None` if it was already claimed.
    pub fn take(&'static self) -> Option<NonNull<T>> {
        if self.taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        NonNull::new(self.value.get())
    }
}

/// The guest-physical address of memory in our image (identity-mapped).
pub fn phys_addr<T>(ptr: NonNull<T>) -> u64 {
    ptr.as_ptr() as u64
}

unsafe extern "C" {
    /// End of the loaded image, .bss and stacks (linker.ld).
    static __image_end: u8;
}

/// Scratch RAM starts this far above the image end (rounded up to it).
const SCRATCH_ALIGN: u64 = 0x10_0000;

static SCRATCH_TAKEN: AtomicBool = AtomicBool::new(false);

/// RAM above the image for large device-shared buffers, handed out front to back.
///
/// Large buffers do not go in `.bss`: the entry code zeroes `.bss` on every boot, and
/// each page touched there is a first-touch fault that the startup benchmark would pay
/// for. Scratch pages are touched only when a driver uses them, and nothing zeroes them:
/// users initialise what they read.
pub struct Scratch {
    next: u64,
    end: u64,
}

impl Scratch {
    /// Claims the RAM from the first MiB boundary above the image to the end of the
    /// memory-map RAM entry holding it (and below the identity map's end), stopping
    /// before any boot module. `None` if already claimed or there is no such RAM.
    pub fn claim(info: &crate::start_info::StartInfo) -> Option<Self> {
        let start = (&raw const __image_end as u64).next_multiple_of(SCRATCH_ALIGN);
        let ram = info
            .memmap()
            .find(|e| e.kind == 1 && e.addr <= start && start < e.addr.saturating_add(e.size))?;
        let mut end = ram.addr.saturating_add(ram.size);
        for m in info.modules() {
            if m.paddr >= start {
                end = end.min(m.paddr);
            } else if m.paddr.saturating_add(m.size) > start {
                return None;
            }
        }
        while end > start && !crate::phys::is_mapped(start, end - start) {
            end = start + (end - start) / 2;
        }
        if end <= start || SCRATCH_TAKEN.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(Self { next: start, end })
    }

    /// Bytes left.
    pub fn available(&self) -> u64 {
        self.end - self.next
    }

    /// `size_of::<T>()` bytes aligned for `T` (at least to 64 bytes), uninitialised.
    pub fn alloc<T>(&mut self) -> Option<NonNull<T>> {
        let align = core::mem::align_of::<T>().max(64) as u64;
        let addr = self.next.next_multiple_of(align);
        let end = addr.checked_add(core::mem::size_of::<T>() as u64)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        NonNull::new(addr as *mut T)
    }
}
