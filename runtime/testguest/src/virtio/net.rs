//! A polling virtio-net driver (virtio 1.2 §5.1) over the modern PCI transport.
//!
//! One queue pair: receiveq1 (queue 0) and transmitq1 (queue 1). Each queue has
//! `QUEUE_ENTRIES` buffers of `BUFFER_BYTES` in scratch RAM; every chain is one buffer
//! holding the 12-byte `virtio_net_hdr_v1` followed by the Ethernet frame.
//!
//! The receive queue is kept full: a buffer goes back to the device as soon as its frame
//! has been copied out, and the re-posted buffers are announced with one notification per
//! poll batch (`RxQueue::kick`). Transmit only publishes frames; `TxQueue::flush` notifies
//! once per batch. Both skip the notification while the device sets
//! VIRTQ_USED_F_NO_NOTIFY. MSI-X vectors are NO_VECTOR and the avail rings ask for no
//! used-buffer notifications: the driver polls the used rings (the guest has no IDT).
//!
//! Features: VERSION_1 plus MAC, STATUS and MRG_RXBUF when offered. Neither checksum nor
//! segmentation offloads are accepted, so frames travel whole and checksummed in both
//! directions. MQ is not negotiated (it needs the control queue): the device then uses
//! pair 0 only (§5.1.6.5.5).

use core::fmt;
use core::ptr::NonNull;

use super::pci::{QueueNotifier, VirtioPci};
use super::queue::{Buffer, QueueMemory, SplitQueue};
use super::{NO_VECTOR, VirtioError};
use crate::dma::{self, Scratch};
use crate::pci::{MmioAllocator, PciDevice};
use crate::tsc;

// §5.1.3: feature bits.
pub const F_MAC: u64 = 1 << 5;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
pub const F_MQ: u64 = 1 << 22;
/// What the driver accepts when offered (VERSION_1 is added by the transport).
const WANTED: u64 = F_MAC | F_MRG_RXBUF | F_STATUS;

// §5.1.4: struct virtio_net_config offsets.
const CFG_MAC: u32 = 0;
const CFG_STATUS: u32 = 6;
const CFG_MAX_VIRTQUEUE_PAIRS: u32 = 8;
/// §5.1.4: `status` bit: the link is up.
const S_LINK_UP: u16 = 1;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;

/// §5.1.6: struct virtio_net_hdr_v1 (flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers): 12 bytes with VERSION_1, with or without MRG_RXBUF.
pub const HEADER_BYTES: usize = 12;
const NUM_BUFFERS_OFFSET: usize = 10;
pub const QUEUE_ENTRIES: usize = 256;
/// One buffer: header plus a frame. §5.1.6.3.1: without MRG_RXBUF (and without guest
/// offloads) each receive buffer must hold at least 1526 bytes.
pub const BUFFER_BYTES: usize = 2048;
/// The largest frame the driver sends, or receives without merged buffers.
pub const MAX_FRAME: usize = BUFFER_BYTES - HEADER_BYTES;
/// How long `TxQueue::wait_idle` and a stuck transmit queue wait for the device.
pub const TX_TIMEOUT_US: u64 = 2_000_000;
/// How long the rest of a merged frame may take to appear after its first buffer.
const MERGE_TIMEOUT_US: u64 = 1_000_000;
/// `buffer_of` entry of a descriptor head that carries no buffer.
const NO_BUFFER: u16 = u16::MAX;

#[repr(C, align(4096))]
pub struct BufferArea([[u8; BUFFER_BYTES]; QUEUE_ENTRIES]);

/// Scratch RAM the device needs: two rings and two buffer areas (with alignment slack).
pub const SCRATCH_BYTES: u64 = (2 * core::mem::size_of::<QueueMemory<QUEUE_ENTRIES>>()
    + 2 * core::mem::size_of::<BufferArea>()
    + 4 * 4096) as u64;

#[derive(Debug, Clone, Copy)]
pub enum NetError {
    Virtio(VirtioError),
    /// Not enough scratch RAM above the image for the queues and buffers.
    NoQueueMemory {
        needed: u64,
        available: u64,
    },
    /// The device offers fewer than two queues.
    NoQueuePair(u16),
    /// The used ring returned a head we have no buffer for.
    UnknownHead {
        queue: u16,
        id: u32,
    },
    /// A used length that cannot be right: shorter than the header or longer than the buffer.
    UsedLength {
        queue: u16,
        len: u32,
    },
    /// A merged frame announced more buffers than the device delivered in time.
    MissingBuffers {
        expected: u16,
        got: u16,
    },
    FrameTooLarge(usize),
    /// Frames queued for transmission were not used by the device in time.
    TxTimeout {
        outstanding: u16,
        ms: u64,
    },
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Virtio(e) => write!(f, "{e}"),
            Self::NoQueueMemory { needed, available } => write!(
                f,
                "virtio-net queues need {needed} bytes of RAM above the test guest image, {available} are free; give the VM more memory"
            ),
            Self::NoQueuePair(n) => write!(
                f,
                "virtio-net device has {n} queue(s); a receive and a transmit queue are needed"
            ),
            Self::UnknownHead { queue, id } => write!(
                f,
                "queue {queue}: device returned used id {id}, which is not an outstanding buffer"
            ),
            Self::UsedLength { queue, len } => write!(
                f,
                "queue {queue}: used length {len} is shorter than the {HEADER_BYTES}-byte header or longer than the {BUFFER_BYTES}-byte buffer"
            ),
            Self::MissingBuffers { expected, got } => write!(
                f,
                "a merged receive frame announced num_buffers={expected} but only {got} buffer(s) arrived within {} ms",
                MERGE_TIMEOUT_US / 1000
            ),
            Self::FrameTooLarge(len) => {
                write!(f, "frame of {len} bytes exceeds the driver's {MAX_FRAME}")
            }
            Self::TxTimeout { outstanding, ms } => write!(
                f,
                "transmit queue: {outstanding} frame(s) not sent after {ms} ms; is the device's backend (TAP, vhost-user) running?"
            ),
        }
    }
}

impl From<VirtioError> for NetError {
    fn from(e: VirtioError) -> Self {
        Self::Virtio(e)
    }
}

/// What `RxQueue::receive` took off the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// A frame of this many bytes, copied to the caller's buffer.
    Frame(usize),
    /// A frame of this many bytes that did not fit the caller's buffer; dropped.
    Oversized(usize),
}

/// A queue's buffers: `buffer_of[head]` is the buffer the chain at `head` carries.
struct Buffers {
    area: NonNull<BufferArea>,
    buffer_of: [u16; QUEUE_ENTRIES],
}

impl Buffers {
    fn addr(&self, buffer: u16) -> u64 {
        dma::phys_addr(self.area) + u64::from(buffer) * BUFFER_BYTES as u64
    }

    /// The buffer, as bytes.
    ///
    /// # Safety
    /// `buffer` < QUEUE_ENTRIES, and the device must not be using it (not posted, or
    /// returned in the used ring) for as long as the slice lives.
    unsafe fn bytes(&mut self, buffer: u16) -> &mut [u8] {
        // SAFETY: the area is ours (claimed from scratch) and `buffer` is in range (caller);
        // the caller guarantees the device does not access it meanwhile.
        unsafe { core::slice::from_raw_parts_mut(self.addr(buffer) as *mut u8, BUFFER_BYTES) }
    }

    /// Takes the buffer recorded for a used `id`.
    fn take(&mut self, queue: u16, id: u32) -> Result<u16, NetError> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.buffer_of.get_mut(i))
            .map(|entry| core::mem::replace(entry, NO_BUFFER))
            .filter(|&b| b != NO_BUFFER)
            .ok_or(NetError::UnknownHead { queue, id })
    }
}

pub struct RxQueue {
    ring: SplitQueue<QUEUE_ENTRIES>,
    notifier: QueueNotifier,
    buffers: Buffers,
    mrg_rxbuf: bool,
    /// Buffers re-posted since the last `kick`.
    unkicked: u16,
    /// Notifications written to the device (each one is a VM exit).
    pub notifies: u64,
    pub frames: u64,
    /// Frames that spanned more than one buffer (MRG_RXBUF).
    pub merged: u64,
}

pub struct TxQueue {
    ring: SplitQueue<QUEUE_ENTRIES>,
    notifier: QueueNotifier,
    buffers: Buffers,
    /// Free buffers, one bit each.
    free: [u64; QUEUE_ENTRIES / 64],
    outstanding: u16,
    /// Frames published since the last `flush`.
    unkicked: u16,
    pub notifies: u64,
    pub frames: u64,
}

pub struct NetDevice {
    virtio: VirtioPci,
    /// What the device offered and what was negotiated.
    pub offered: u64,
    pub features: u64,
    pub mac: [u8; 6],
    /// `max_virtqueue_pairs` when the device offers MQ (only pair 0 is used), else 1.
    pub max_pairs: u16,
    pub queue_size: u16,
    pub rx: RxQueue,
    pub tx: TxQueue,
}

impl NetDevice {
    /// Brings `dev` up (§3.1.1, §5.1.5): negotiates the features the driver knows, reads
    /// the MAC (else uses `fallback_mac`), sets up queue pair 0 polled, fills the receive
    /// queue and sets DRIVER_OK. Memory comes from `scratch` (`SCRATCH_BYTES`).
    pub fn open(
        dev: PciDevice,
        alloc: &mut MmioAllocator,
        scratch: &mut Scratch,
        fallback_mac: [u8; 6],
    ) -> Result<Self, NetError> {
        let virtio = VirtioPci::probe(dev, alloc)?;
        let features = virtio.initialize(WANTED)?;
        let offered = virtio.device_features();
        match Self::configure(&virtio, features, scratch) {
            Ok((rx, tx, queue_size)) => {
                let mac = if features & F_MAC != 0 {
                    read_mac(&virtio).unwrap_or(fallback_mac)
                } else {
                    fallback_mac
                };
                let max_pairs = if offered & F_MQ != 0 {
                    virtio
                        .device_config_read16(CFG_MAX_VIRTQUEUE_PAIRS)
                        .unwrap_or(1)
                } else {
                    1
                };
                Ok(Self {
                    virtio,
                    offered,
                    features,
                    mac,
                    max_pairs,
                    queue_size,
                    rx,
                    tx,
                })
            }
            Err(e) => {
                // §3.1.1: tell the device the driver gave up.
                virtio.fail();
                Err(e)
            }
        }
    }

    fn configure(
        virtio: &VirtioPci,
        features: u64,
        scratch: &mut Scratch,
    ) -> Result<(RxQueue, TxQueue, u16), NetError> {
        let queues = virtio.num_queues();
        if queues < 2 {
            return Err(NetError::NoQueuePair(queues));
        }
        virtio.set_config_vector(NO_VECTOR)?;
        let available = scratch.available();
        let (Some(rx_mem), Some(tx_mem), Some(rx_area), Some(tx_area)) = (
            scratch.alloc::<QueueMemory<QUEUE_ENTRIES>>(),
            scratch.alloc::<QueueMemory<QUEUE_ENTRIES>>(),
            scratch.alloc::<BufferArea>(),
            scratch.alloc::<BufferArea>(),
        ) else {
            return Err(NetError::NoQueueMemory {
                needed: SCRATCH_BYTES,
                available,
            });
        };
        let mut rx_ring = SplitQueue::new(rx_mem, virtio.queue_max_size(RX_QUEUE));
        rx_ring.suppress_interrupts();
        let rx_notifier = virtio.setup_queue(RX_QUEUE, &rx_ring, NO_VECTOR)?;
        let mut tx_ring = SplitQueue::new(tx_mem, virtio.queue_max_size(TX_QUEUE));
        tx_ring.suppress_interrupts();
        let tx_notifier = virtio.setup_queue(TX_QUEUE, &tx_ring, NO_VECTOR)?;
        let queue_size = rx_ring.size().min(tx_ring.size());
        let mut rx = RxQueue {
            ring: rx_ring,
            notifier: rx_notifier,
            buffers: Buffers {
                area: rx_area,
                buffer_of: [NO_BUFFER; QUEUE_ENTRIES],
            },
            mrg_rxbuf: features & F_MRG_RXBUF != 0,
            unkicked: 0,
            notifies: 0,
            frames: 0,
            merged: 0,
        };
        // §5.1.6.3: fill the receive queue before DRIVER_OK.
        for buffer in 0..rx.ring.size() {
            rx.post(buffer)?;
        }
        let mut free = [0u64; QUEUE_ENTRIES / 64];
        for buffer in 0..usize::from(tx_ring.size()) {
            free[buffer / 64] |= 1 << (buffer % 64);
        }
        let tx = TxQueue {
            ring: tx_ring,
            notifier: tx_notifier,
            buffers: Buffers {
                area: tx_area,
                buffer_of: [NO_BUFFER; QUEUE_ENTRIES],
            },
            free,
            outstanding: 0,
            unkicked: 0,
            notifies: 0,
            frames: 0,
        };
        virtio.driver_ok()?;
        rx.kick();
        Ok((rx, tx, queue_size))
    }

    pub fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    pub fn device(&self) -> PciDevice {
        self.virtio.dev
    }

    /// The link state from the configuration's `status` (None without VIRTIO_NET_F_STATUS).
    pub fn link_up(&self) -> Option<bool> {
        if !self.has(F_STATUS) {
            return None;
        }
        self.virtio
            .device_config_read16(CFG_STATUS)
            .map(|s| s & S_LINK_UP != 0)
    }

    /// Resets the device (it stops using our memory).
    pub fn reset(&self) -> Result<(), NetError> {
        Ok(self.virtio.reset()?)
    }
}

/// The 6-byte MAC at offset 0 of the device configuration, as a 32- and a 16-bit read
/// (the transport reads aligned fields only).
fn read_mac(virtio: &VirtioPci) -> Option<[u8; 6]> {
    let low = virtio.device_config_read32(CFG_MAC)?.to_le_bytes();
    let high = virtio.device_config_read16(CFG_MAC + 4)?.to_le_bytes();
    Some([low[0], low[1], low[2], low[3], high[0], high[1]])
}

impl RxQueue {
    /// Gives `buffer` (whole, device-writable) to the device; `kick` announces it.
    fn post(&mut self, buffer: u16) -> Result<(), NetError> {
        let head = self.ring.push(&[Buffer {
            addr: self.buffers.addr(buffer),
            len: BUFFER_BYTES as u32,
            device_writable: true,
        }])?;
        let entry = self
            .buffers
            .buffer_of
            .get_mut(usize::from(head))
            .ok_or(NetError::Virtio(VirtioError::QueueFull))?;
        *entry = buffer;
        self.unkicked += 1;
        Ok(())
    }

    /// Takes one used buffer: (buffer, bytes written), validated.
    fn pop(&mut self) -> Result<Option<(u16, usize)>, NetError> {
        let Some(used) = self.ring.pop_used() else {
            return Ok(None);
        };
        let buffer = self.buffers.take(RX_QUEUE, used.id)?;
        let len = used.len as usize;
        if len > BUFFER_BYTES {
            // Give the buffer back before failing so the ring stays whole.
            self.post(buffer)?;
            return Err(NetError::UsedLength {
                queue: RX_QUEUE,
                len: used.len,
            });
        }
        Ok(Some((buffer, len)))
    }

    /// Copies the next received frame (without its virtio-net header) into `out` and
    /// re-posts its buffers. With MRG_RXBUF a frame may span `num_buffers` buffers; only
    /// the first carries the header.
    pub fn receive(&mut self, out: &mut [u8]) -> Result<Option<Received>, NetError> {
        let Some((buffer, len)) = self.pop()? else {
            return Ok(None);
        };
        if len < HEADER_BYTES {
            self.post(buffer)?;
            return Err(NetError::UsedLength {
                queue: RX_QUEUE,
                len: len as u32,
            });
        }
        // SAFETY: the device returned this buffer (it is in the used ring) and it is not
        // posted again until `post` below; `buffer` < QUEUE_ENTRIES (we recorded it).
        let bytes = unsafe { self.buffers.bytes(buffer) };
        let num_buffers = if self.mrg_rxbuf {
            u16::from_le_bytes([bytes[NUM_BUFFERS_OFFSET], bytes[NUM_BUFFERS_OFFSET + 1]]).max(1)
        } else {
            1
        };
        let mut total = len - HEADER_BYTES;
        let mut fits = total <= out.len();
        if fits {
            out[..total].copy_from_slice(&bytes[HEADER_BYTES..len]);
        }
        self.post(buffer)?;
        if num_buffers > 1 {
            self.merged += 1;
            let deadline = tsc::Deadline::after_us(MERGE_TIMEOUT_US);
            let mut got = 1;
            while got < num_buffers {
                let Some((buffer, len)) = self.pop()? else {
                    if deadline.passed() {
                        return Err(NetError::MissingBuffers {
                            expected: num_buffers,
                            got,
                        });
                    }
                    core::hint::spin_loop();
                    continue;
                };
                got += 1;
                // SAFETY: as above, for this used buffer.
                let bytes = unsafe { self.buffers.bytes(buffer) };
                if fits && total + len <= out.len() {
                    out[total..total + len].copy_from_slice(&bytes[..len]);
                } else {
                    fits = false;
                }
                total += len;
                self.post(buffer)?;
            }
        }
        self.frames += 1;
        Ok(Some(if fits {
            Received::Frame(total)
        } else {
            Received::Oversized(total)
        }))
    }

    /// Announces re-posted buffers with one notification, unless the device is polling.
    pub fn kick(&mut self) {
        if self.unkicked > 0 && self.ring.needs_notify() {
            self.notifier.notify();
            self.notifies += 1;
        }
        self.unkicked = 0;
    }
}

impl TxQueue {
    /// Returns the buffers of frames the device has sent to the free set.
    pub fn reclaim(&mut self) -> Result<(), NetError> {
        while let Some(used) = self.ring.pop_used() {
            let buffer = self.buffers.take(TX_QUEUE, used.id)?;
            self.free[usize::from(buffer) / 64] |= 1 << (buffer % 64);
            self.outstanding -= 1;
        }
        Ok(())
    }

    fn free_buffer(&self) -> Option<u16> {
        self.free
            .iter()
            .enumerate()
            .find(|(_, w)| **w != 0)
            .map(|(i, w)| (i * 64) as u16 + w.trailing_zeros() as u16)
    }

    /// Whether a frame can be published now (a free buffer and descriptor), reclaiming
    /// sent frames' buffers if needed.
    pub fn ready(&mut self) -> Result<bool, NetError> {
        if self.free_buffer().is_none() || self.ring.num_free() == 0 {
            self.reclaim()?;
        }
        Ok(self.free_buffer().is_some() && self.ring.num_free() > 0)
    }

    /// Publishes one frame of `len` bytes that `fill` writes (no notification: see
    /// `flush`). Returns false, without calling `fill`, while every buffer is in flight.
    pub fn try_send(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<bool, NetError> {
        if len > MAX_FRAME {
            return Err(NetError::FrameTooLarge(len));
        }
        if !self.ready()? {
            return Ok(false);
        }
        let Some(buffer) = self.free_buffer() else {
            return Ok(false);
        };
        // SAFETY: the buffer is free (its bit was set): the device does not use it until
        // the push below; `buffer` < QUEUE_ENTRIES.
        let bytes = unsafe { self.buffers.bytes(buffer) };
        // All-zero header: no checksum offload, no GSO (§5.1.6.2); num_buffers is unused
        // on transmit.
        bytes[..HEADER_BYTES].fill(0);
        fill(&mut bytes[HEADER_BYTES..HEADER_BYTES + len]);
        let head = self.ring.push(&[Buffer {
            addr: self.buffers.addr(buffer),
            len: (HEADER_BYTES + len) as u32,
            device_writable: false,
        }])?;
        let entry = self
            .buffers
            .buffer_of
            .get_mut(usize::from(head))
            .ok_or(NetError::Virtio(VirtioError::QueueFull))?;
        *entry = buffer;
        self.free[usize::from(buffer) / 64] &= !(1 << (buffer % 64));
        self.outstanding += 1;
        self.unkicked += 1;
        self.frames += 1;
        Ok(true)
    }

    /// Like `try_send`, but when every buffer is in flight it notifies and waits (up to
    /// `TX_TIMEOUT_US`) for the device to use some.
    pub fn send(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) -> Result<(), NetError> {
        if !self.ready()? {
            self.flush();
            let deadline = tsc::Deadline::after_us(TX_TIMEOUT_US);
            while !self.ready()? {
                if deadline.passed() {
                    return Err(NetError::TxTimeout {
                        outstanding: self.outstanding,
                        ms: TX_TIMEOUT_US / 1000,
                    });
                }
                core::hint::spin_loop();
            }
        }
        if self.try_send(len, fill)? {
            Ok(())
        } else {
            Err(NetError::Virtio(VirtioError::QueueFull))
        }
    }

    /// Notifies the device once for every frame published since the last flush, unless it
    /// said it is polling the ring.
    pub fn flush(&mut self) {
        if self.unkicked > 0 && self.ring.needs_notify() {
            self.notifier.notify();
            self.notifies += 1;
        }
        self.unkicked = 0;
    }

    /// Flushes and waits until the device has used every frame.
    pub fn wait_idle(&mut self, timeout_us: u64) -> Result<(), NetError> {
        self.flush();
        let deadline = tsc::Deadline::after_us(timeout_us);
        loop {
            self.reclaim()?;
            if self.outstanding == 0 {
                return Ok(());
            }
            if deadline.passed() {
                return Err(NetError::TxTimeout {
                    outstanding: self.outstanding,
                    ms: timeout_us / 1000,
                });
            }
            core::hint::spin_loop();
        }
    }
}
