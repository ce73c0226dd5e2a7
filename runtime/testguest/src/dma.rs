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
