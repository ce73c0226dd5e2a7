//! Small port devices: the i8042 reset line, the debug console (0xE9), the debug-exit
//! port (0xF4) and the ACPI sleep control register (poweroff).

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use vm_superio::{I8042Device, Trigger};

use super::bus::BusDevice;
use crate::boot::acpi::S5_SLEEP_TYPE;
use crate::vm::{ExitNotifier, GuestExit};

/// Tells the VMM that the guest pulsed the reset line.
pub struct ResetTrigger(pub ExitNotifier);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)(GuestExit::Reset);
        Ok(())
    }
}

/// The keyboard controller, only as far as guests use it to reset (ports 0x60..0x64).
pub struct I8042(Mutex<I8042Device<ResetTrigger>>);

impl I8042 {
    pub fn new(on_exit: ExitNotifier) -> I8042 {
        I8042(Mutex::new(I8042Device::new(ResetTrigger(on_exit))))
    }
    fn dev(&self) -> MutexGuard<'_, I8042Device<ResetTrigger>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BusDevice for I8042 {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() == 1 {
            data[0] = self.dev().read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }
    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            // Infallible: ResetTrigger cannot fail.
            let _ = self.dev().write(offset as u8, data[0]);
        }
    }
}

/// Bochs/QEMU debug console: bytes go to an optional file; the first one is timestamped
/// in the log, since test guests write it as their very first instruction.
pub struct DebugConsole {
    out: Mutex<Option<File>>,
    started: Instant,
    pub bytes: AtomicU64,
}

impl DebugConsole {
    pub fn new(out: Option<File>, started: Instant) -> DebugConsole {
        DebugConsole {
            out: Mutex::new(out),
            started,
            bytes: AtomicU64::new(0),
        }
    }
}

impl BusDevice for DebugConsole {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Reading 0xE9 returns 0xE9: how guests detect the port (Bochs convention).
        data.fill(0xe9);
    }
    fn write(&self, _base: u64, _offset: u64, data: &[u8]) {
        if self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed) == 0 {
            let usage =
                nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).ok();
            let cpu_us = usage.map_or(0, |u| {
                let t = u.user_time() + u.system_time();
                t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64
            });
            tracing::info!(
                elapsed_us = self.started.elapsed().as_micros() as u64,
                cpu_us,
                "first debug console byte from the guest"
            );
        }
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = out.as_mut()
            && let Err(e) = file.write_all(data)
        {
            tracing::warn!("debug console output failed, dropping it: {e}");
            *out = None;
        }
    }
}

/// QEMU's isa-debug-exit location: the byte written ends the VMM with that status.
pub struct DebugExit(pub ExitNotifier);

impl BusDevice for DebugExit {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _base: u64, _offset: u64, data: &[u8]) {
        if let Some(&code) = data.first() {
            (self.0)(GuestExit::DebugExit(code));
        }
    }
}

/// ferrovirt's guest-idle port ([`crate::layout::GUEST_IDLE_PORT`]): the writing vCPU sleeps
/// for the value written, in milliseconds, capped so that pause and shutdown stay prompt.
pub struct GuestIdle;

/// The longest one write parks a vCPU.
pub const GUEST_IDLE_MAX_MS: u64 = 100;

impl BusDevice for GuestIdle {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _base: u64, _offset: u64, data: &[u8]) {
        let ms = data
            .iter()
            .take(2)
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        std::thread::sleep(std::time::Duration::from_millis(ms.min(GUEST_IDLE_MAX_MS)));
    }
}

/// ACPI 6.5 §4.8.3.7 sleep control register (hardware-reduced ACPI).
pub struct AcpiSleepControl(pub ExitNotifier);

const SLP_EN: u8 = 1 << 5;

impl BusDevice for AcpiSleepControl {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        // Byte 0 is the control register; SLP_TYP is bits 4:2.
        if offset == 0
            && let Some(&v) = data.first()
            && v & SLP_EN != 0
            && (v >> 2) & 0x7 == S5_SLEEP_TYPE
        {
            (self.0)(GuestExit::PowerOff);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    #[test]
    fn the_idle_port_parks_the_vcpu_for_the_value_written_capped() {
        let t = std::time::Instant::now();
        GuestIdle.write(0, 0, &[30, 0]);
        assert!(t.elapsed() >= std::time::Duration::from_millis(30));
        let t = std::time::Instant::now();
        GuestIdle.write(0, 0, &[0xff, 0xff]);
        let slept = t.elapsed();
        assert!(slept >= std::time::Duration::from_millis(GUEST_IDLE_MAX_MS));
        assert!(
            slept < std::time::Duration::from_millis(GUEST_IDLE_MAX_MS * 3),
            "{slept:?}"
        );
    }

    use super::*;

    fn recorder() -> (ExitNotifier, Arc<Mutex<Vec<GuestExit>>>) {
        let seen = Arc::new(Mutex::new(vec![]));
        let s = seen.clone();
        (Arc::new(move |e| s.lock().unwrap().push(e)), seen)
    }

    #[test]
    fn i8042_pulse_reset_command_resets_the_guest() {
        let (notify, seen) = recorder();
        let dev = I8042::new(notify);
        dev.write(0x60, 4, &[0xfe]);
        assert_eq!(*seen.lock().unwrap(), vec![GuestExit::Reset]);
    }

    #[test]
    fn only_s5_with_slp_en_powers_off() {
        let (notify, seen) = recorder();
        let dev = AcpiSleepControl(notify);
        dev.write(0x600, 0, &[S5_SLEEP_TYPE << 2]); // SLP_EN missing
        dev.write(0x600, 0, &[(3 << 2) | SLP_EN]); // S3
        assert!(seen.lock().unwrap().is_empty());
        dev.write(0x600, 0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(*seen.lock().unwrap(), vec![GuestExit::PowerOff]);
    }

    #[test]
    fn debug_exit_carries_the_guest_status() {
        let (notify, seen) = recorder();
        DebugExit(notify).write(0xf4, 0, &[33, 0, 0, 0]);
        assert_eq!(*seen.lock().unwrap(), vec![GuestExit::DebugExit(33)]);
    }
}
