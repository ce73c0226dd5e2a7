//! Boot: the PVH entry, the static page tables and GDT, the drop to ring 3, and the
//! application-processor (AP) trampoline.
//!
//! Guest ring-0 code is emulated about 1000x slower than ring 3 on our platform, so ring 0
//! does the minimum: load the GDT and the (static, pre-assembled) page tables, enable long
//! mode and SSE, and `iretq` to ring 3 with IOPL=3 (port I/O allowed) and IF=0. Every Rust
//! function runs in ring 3. There is no IDT (the BSP loads one with limit 0): an exception
//! triple-faults, which the VMM reports as a crash.
//!
//! Layout facts relied on elsewhere:
//! * the low 4 GiB are identity-mapped with 2 MiB user pages (MMIO above 3 GiB uncached),
//!   so a guest-physical address below 4 GiB is also a valid pointer;
//! * the AP trampoline is copied to `AP_TRAMPOLINE_ADDR` (SIPI vector 0x10) by the BSP.

use core::sync::atomic::{AtomicU64, Ordering};

/// Physical address the AP trampoline is copied to; the SIPI vector is its page number.
pub const AP_TRAMPOLINE_ADDR: u64 = 0x1_0000;
/// Stack size of each application processor.
pub const AP_STACK_SIZE: u64 = 16 * 1024;
/// Most CPUs the guest handles (BSP included).
pub const MAX_CPUS: usize = 64;

// Selectors, also used by the assembly below (as literals):
// 0x08 ring-0 64-bit code, 0x10 ring-0 data, 0x18 ring-3 data (SS 0x1b),
// 0x20 ring-3 64-bit code (CS 0x23).
//
// CR4 = PAE | OSFXSR | OSXMMEXCPT = 0x620.
// CR0 = PG | NE | ET | MP | PE = 0x80000033 (EM, TS, CD, NW clear: SSE usable, caches on).
// EFER = LME = 0x100. RFLAGS in ring 3 = IOPL 3 | reserved bit 1 = 0x3002 (IF clear).
core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* namesz: "Xen\0" */
    .long 8                 /* descsz: QEMU reads a 64-bit value, linux-loader >= 4 bytes */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_entry

    /* PAE and SSE (CR4), the static page tables (CR3), LME (EFER), then paging and
       protection (CR0): the same steps from 32-bit protected mode (BSP) and from 16-bit
       real mode (APs, with PE and PG set together); the assembler sizes the operands. */
    .macro enable_long_mode
    movl $0x620, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    movl $0x100, %eax
    xorl %edx, %edx
    wrmsr
    movl $0x80000033, %eax
    movl %eax, %cr0
    .endm

    .section .text.pvh_entry, "ax"
    .code32
    .global pvh_entry
pvh_entry:
    /* First instruction: the startup benchmark times the arrival of this byte. */
    outb %al, $0xe9
    lgdt gdt_pointer
    lidt idt_pointer
    enable_long_mode
    ljmp $0x08, $bsp_long_mode

    .code64
bsp_long_mode:
    /* EBX = hvm_start_info; the upper halves of registers are undefined after the switch. */
    movl %ebx, %ebx
    movq $bsp_stack_top, %rsp
    pushq $0x1b
    pushq $bsp_stack_top
    pushq $0x3002
    pushq $0x23
    pushq $bsp_ring3_entry
    iretq

    .section .text.ring3_entry, "ax"
bsp_ring3_entry:
    /* Ring 3 from here on. Zero .bss (stacks live outside it). */
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    cld
    rep stosb
    movl %ebx, %edi
    call bsp_main
    ud2

    /* AP: arrives here in 64-bit ring 0 from the trampoline. Each AP takes the next stack
       by atomically moving ap_stack_next down (the BSP sets it before sending SIPIs). */
ap_long_mode:
    movq $-{ap_stack_size}, %rax
    lock xaddq %rax, ap_stack_next(%rip)
    movq %rax, %rsp
    pushq $0x1b
    pushq %rax
    pushq $0x3002
    pushq $0x23
    pushq $ap_ring3_entry
    iretq
ap_ring3_entry:
    call ap_main
    ud2

    /* Copied to 0x10000 and started by SIPI in real mode with CS=0x1000, IP=0. It goes
       straight from real mode to long mode (PE and PG set together), reusing the BSP's
       page tables and GDT. Only cs-relative data inside the copy is used. */
    .section .text.ap_trampoline, "ax"
    .code16
    .global ap_trampoline_start
    .global ap_trampoline_end
ap_trampoline_start:
    cli
    lgdtl %cs:(ap_gdt_pointer - ap_trampoline_start)
    enable_long_mode
    ljmpl $0x08, $ap_long_mode
    .balign 8
ap_gdt_pointer:
    .word gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:
    .code64

    .section .data.page_tables, "aw"
    .balign 4096
pml4:
    .quad pdpt + 0x7                /* present, writable, user */
    .fill 511, 8, 0
pdpt:
    .quad page_directories + 0x0007
    .quad page_directories + 0x1007
    .quad page_directories + 0x2007
    .quad page_directories + 0x3007
    .fill 508, 8, 0
page_directories:
    /* 0..3 GiB: RAM, write-back. 2 MiB pages: present, writable, user, PS. */
    .set pt_addr, 0
    .rept 1536
    .quad pt_addr + 0x87
    .set pt_addr, pt_addr + 0x200000
    .endr
    /* 3..4 GiB: PCI MMIO window, IOAPIC, LAPIC: also PWT|PCD (uncached). */
    .rept 512
    .quad pt_addr + 0x9f
    .set pt_addr, pt_addr + 0x200000
    .endr

    .section .data.gdt, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9b000000ffff        /* 0x08: ring-0 64-bit code */
    .quad 0x00cf93000000ffff        /* 0x10: ring-0 data */
    .quad 0x00cff3000000ffff        /* 0x18: ring-3 data */
    .quad 0x00affb000000ffff        /* 0x20: ring-3 64-bit code */
gdt_end:
    .balign 8
gdt_pointer:
    .word gdt_end - gdt - 1
    .quad gdt

    /* An empty IDT: every exception fails to deliver and ends in a triple fault, whatever
       the IDTR held at entry (reset state: base 0, limit 0xffff over whatever is at 0). */
    .balign 8
idt_pointer:
    .word 0
    .quad 0

    .section .stacks, "aw", @nobits
    .balign 4096
    .skip 65536
bsp_stack_top:
    .global ap_stacks_bottom
    .global ap_stacks_top
ap_stacks_bottom:
    .skip {ap_stacks_size}
ap_stacks_top:

    .text
    "#,
    ap_stack_size = const AP_STACK_SIZE,
    ap_stacks_size = const AP_STACK_SIZE * (MAX_CPUS as u64 - 1),
    options(att_syntax)
);

/// Top of the next free AP stack; each AP moves it down by `AP_STACK_SIZE` (in
/// `ap_long_mode` above).
#[unsafe(export_name = "ap_stack_next")]
static AP_STACK_NEXT: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static ap_stacks_bottom: u8;
    static ap_stacks_top: u8;
}

/// Copies the AP trampoline to `AP_TRAMPOLINE_ADDR` and hands out fresh AP stacks;
/// returns the SIPI vector that starts it.
pub fn install_ap_trampoline() -> u8 {
    let start = &raw const ap_trampoline_start;
    let end = &raw const ap_trampoline_end;
    let len = end as usize - start as usize;
    // SAFETY: the trampoline bytes lie inside our image (linker symbols bracket them);
    // the destination 0x10000..0x1ffff is RAM the VMM leaves free for the guest, is
    // identity-mapped and writable from ring 3, and overlaps no Rust object.
    unsafe {
        core::ptr::copy_nonoverlapping(start, AP_TRAMPOLINE_ADDR as *mut u8, len);
    }
    AP_STACK_NEXT.store(&raw const ap_stacks_top as u64, Ordering::SeqCst);
    (AP_TRAMPOLINE_ADDR >> 12) as u8
}

/// How many AP stacks are left (an AP that finds none would run off the end).
pub fn ap_stacks_left() -> u64 {
    let bottom = &raw const ap_stacks_bottom as u64;
    AP_STACK_NEXT.load(Ordering::SeqCst).saturating_sub(bottom) / AP_STACK_SIZE
}
