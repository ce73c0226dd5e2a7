//! Test-protocol output: every line goes to COM1 as `testguest: <text>\n`, formatted into
//! a buffer first so the serial FIFO is filled in batches.

use core::fmt::{self, Write};

use crate::serial;

const PREFIX: &str = "testguest: ";

/// A line buffer that spills to the serial port when full.
struct LineWriter {
    buf: [u8; 256],
    len: usize,
}

impl LineWriter {
    const fn new() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }

    fn flush(&mut self) {
        serial::write(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Write for LineWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

/// Prints one protocol line; use the `say!` macro.
pub fn say(args: fmt::Arguments) {
    let mut line = LineWriter::new();
    // Writing into LineWriter cannot fail; a failing Display impl only truncates the line.
    let _ = line.write_str(PREFIX);
    let _ = line.write_fmt(args);
    let _ = line.write_str("\n");
    line.flush();
}

/// `say!("fmt", args...)` prints `testguest: <formatted>\n` on COM1.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::console::say(format_args!($($arg)*)) };
}

/// Displays bytes as lowercase hex.
pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Displays a byte string, replacing non-printable bytes with '?'.
pub struct Ascii<'a>(pub &'a [u8]);

impl fmt::Display for Ascii<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            let c = if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            };
            f.write_char(c)?;
        }
        Ok(())
    }
}

/// Displays a list of integers as `a,b,c`.
pub struct List<'a>(pub &'a [u32]);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_char(',')?;
            }
            write!(f, "{v}")?;
        }
        Ok(())
    }
}

/// A short formatted message kept without an allocator (truncated at 160 bytes).
#[derive(Clone, Copy)]
pub struct Message {
    buf: [u8; 160],
    len: usize,
}

impl Message {
    pub fn new(args: fmt::Arguments) -> Self {
        let mut m = Self {
            buf: [0; 160],
            len: 0,
        };
        let _ = m.write_fmt(args);
        m
    }
}

impl Write for Message {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                break;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Ascii(&self.buf[..self.len]).fmt(f)
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
