//! COM1: a 16550 UART (vm-superio) whose interrupt is an irqfd on IOAPIC pin 4, and
//! whose output goes to stdout, a file, a UNIX socket or nowhere.
//!
//! With a socket console, one client at a time is attached: what it sends is the guest's
//! input, what the guest prints is sent to it (and dropped while nobody is attached).

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::config::ConsoleConfig;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot open serial output file {path}")]
    OpenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on console socket {path}; is another VMM using it?")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the console socket thread")]
    Thread(#[source] std::io::Error),
}

/// Raises the UART's interrupt line through its irqfd.
pub struct IrqfdTrigger(pub EventFd);

impl Trigger for IrqfdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Serial counters, for the API.
#[derive(Default)]
pub struct SerialCounters {
    pub tx_bytes: AtomicU64,
    pub tx_lost_bytes: AtomicU64,
    pub rx_bytes: AtomicU64,
}

/// The UART's event hook, counting into shared counters.
pub struct CountingEvents(Arc<SerialCounters>);

impl SerialEvents for CountingEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {
        self.0.tx_bytes.fetch_add(1, Ordering::Relaxed);
    }
    fn tx_lost_byte(&self) {
        self.0.tx_lost_bytes.fetch_add(1, Ordering::Relaxed);
    }
    fn in_buffer_empty(&self) {}
}

/// Where the guest's output goes.
type ConsoleOut = Box<dyn Write + Send>;

/// Output to whichever socket client is attached; nothing while none is.
#[derive(Clone, Default)]
struct AttachedClient(Arc<Mutex<Option<UnixStream>>>);

impl Write for AttachedClient {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut client = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stream) = client.as_mut()
            && stream.write_all(buf).is_err()
        {
            *client = None;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

type Uart = Serial<IrqfdTrigger, CountingEvents, ConsoleOut>;

/// COM1 on the port bus.
pub struct SerialDevice {
    uart: Mutex<Uart>,
    pub counters: Arc<SerialCounters>,
    socket: Option<PathBuf>,
}

impl SerialDevice {
    pub fn new(console: &ConsoleConfig, irq: EventFd) -> Result<Arc<SerialDevice>, SerialError> {
        let counters = Arc::new(SerialCounters::default());
        let client = AttachedClient::default();
        let (out, socket): (ConsoleOut, _) = match console {
            ConsoleConfig::Tty => (Box::new(std::io::stdout()), None),
            ConsoleConfig::Off => (Box::new(std::io::sink()), None),
            ConsoleConfig::File(path) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| SerialError::OpenFile {
                        path: path.clone(),
                        source,
                    })?;
                (Box::new(file), None)
            }
            ConsoleConfig::Socket(path) => (Box::new(client.clone()), Some(path.clone())),
        };
        let device = Arc::new(SerialDevice {
            uart: Mutex::new(Serial::with_events(
                IrqfdTrigger(irq),
                CountingEvents(counters.clone()),
                out,
            )),
            counters,
            socket: socket.clone(),
        });
        if let Some(path) = socket {
            let listener = UnixListener::bind(&path).map_err(|source| SerialError::Listen {
                path: path.clone(),
                source,
            })?;
            let weak = Arc::downgrade(&device);
            std::thread::Builder::new()
                .name("console".into())
                .spawn(move || serve_console_socket(listener, client, weak))
                .map_err(SerialError::Thread)?;
        }
        Ok(device)
    }

    fn uart(&self) -> MutexGuard<'_, Uart> {
        self.uart.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues input for the guest; returns how many bytes fit in the UART's FIFO.
    pub fn enqueue_input(&self, input: &[u8]) -> usize {
        match self.uart().enqueue_raw_bytes(input) {
            Ok(n) => {
                self.counters
                    .rx_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
                n
            }
            Err(e) => {
                tracing::debug!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl Drop for SerialDevice {
    fn drop(&mut self) {
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn serve_console_socket(
    listener: UnixListener,
    client: AttachedClient,
    device: std::sync::Weak<SerialDevice>,
) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let Ok(reader) = stream.try_clone() else {
            continue;
        };
        *client.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
        feed_input(reader, &device);
        if device.upgrade().is_none() {
            return;
        }
    }
}

/// Copies a client's bytes into the UART until it hangs up, waiting while the FIFO is full.
fn feed_input(mut reader: UnixStream, device: &std::sync::Weak<SerialDevice>) {
    let mut buf = [0u8; 64];
    while let Ok(n) = reader.read(&mut buf) {
        if n == 0 {
            return;
        }
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let Some(dev) = device.upgrade() else { return };
            let taken = dev.enqueue_input(pending);
            pending = &pending[taken..];
            if taken == 0 {
                // The guest has not drained the FIFO yet.
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart().read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() == 1
            && offset < 8
            && let Err(e) = self.uart().write(offset as u8, data[0])
        {
            tracing::debug!("serial write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    #[test]
    fn guest_output_reaches_the_file_and_raises_no_error() {
        let path = std::env::temp_dir().join(format!("fv-serial-{}.log", std::process::id()));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(&ConsoleConfig::File(path.clone()), irq).unwrap();
        for b in b"hi\n" {
            dev.write(0x3f8, 0, &[*b]);
        }
        drop(dev);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(text, "hi\n");
    }

    #[test]
    fn socket_client_sees_output_and_its_input_reaches_the_guest() {
        let path = std::env::temp_dir().join(format!("fv-console-{}.sock", std::process::id()));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(&ConsoleConfig::Socket(path.clone()), irq).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"x").unwrap();
        // Wait until the console thread attached the client and queued its byte.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while dev.counters.rx_bytes.load(Ordering::Relaxed) == 0 {
            assert!(std::time::Instant::now() < deadline, "input never arrived");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let mut rbr = [0u8];
        dev.read(0x3f8, 0, &mut rbr);
        assert_eq!(rbr[0], b'x');
        dev.write(0x3f8, 0, b"y");
        let mut got = [0u8];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got[0], b'y');
        drop(dev);
        assert!(!path.exists(), "socket file must be removed");
    }
}
