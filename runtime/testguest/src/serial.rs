//! COM1 16550 UART, transmit only, polled.
//!
//! With the FIFO enabled the transmitter takes 16 bytes once the line status register says
//! it is empty, so we read LSR once per 16 bytes instead of once per byte (each port access
//! is a VM exit).

use crate::port::{inb, outb};

const COM1: u16 = 0x3f8;
const THR: u16 = COM1;
const IER: u16 = COM1 + 1;
const FCR: u16 = COM1 + 2;
const LCR: u16 = COM1 + 3;
const LSR: u16 = COM1 + 5;
/// LSR bit 5: transmit holding register (FIFO) empty.
const LSR_THR_EMPTY: u8 = 1 << 5;
const FIFO_DEPTH: usize = 16;
/// Give up waiting for the transmitter after this many LSR reads and write anyway: losing
/// a byte is better than hanging a test.
const MAX_LSR_POLLS: u32 = 100_000;

/// Puts the UART in 8N1 with interrupts off and FIFOs enabled and cleared.
pub fn init() {
    outb(IER, 0x00);
    outb(LCR, 0x03);
    outb(FCR, 0x07);
}

fn wait_transmitter_empty() {
    for _ in 0..MAX_LSR_POLLS {
        if inb(LSR) & LSR_THR_EMPTY != 0 {
            return;
        }
        core::hint::spin_loop();
    }
}

/// Writes bytes as they are (no newline translation).
pub fn write(bytes: &[u8]) {
    for chunk in bytes.chunks(FIFO_DEPTH) {
        wait_transmitter_empty();
        for &b in chunk {
            outb(THR, b);
        }
    }
}
