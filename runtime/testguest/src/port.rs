//! x86 port I/O. Ring 3 may use it because the boot code sets RFLAGS.IOPL=3.
//!
//! Each access is a VM exit (~25 us on our platform): callers batch and poll sparingly.

use core::arch::asm;

// SAFETY (for every function below): `in`/`out` touch no memory the compiler knows of and
// do not use the stack. Device side effects (e.g. DMA) are only programmed by the virtio
// module, with memory that it owns for the duration.

pub fn outb(port: u16, value: u8) {
    // SAFETY: see the module comment.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn outw(port: u16, value: u16) {
    // SAFETY: see the module comment.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: see the module comment.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: see the module comment.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}

pub fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: see the module comment.
    unsafe {
        asm!("in ax, dx", out("ax") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}

pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: see the module comment.
    unsafe {
        asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}
