//! A polling virtio-blk driver (virtio 1.2 §5.2) over the modern PCI transport.
//!
//! Every queue the device has (up to `MAX_QUEUES`) gets a split virtqueue, `MAX_SLOTS`
//! request slots (header, discard range, id buffer and status byte in DMA memory) and a
//! `DATA_PER_QUEUE` data area. A request is a chain of header → data (optional) → status.
//! Interrupts are not used: MSI-X vectors are NO_VECTOR, the avail ring asks for no used
//! notifications, and callers poll with `BlkQueue::poll`. Notifications to the device are
//! batched: `submit` only publishes, `kick` notifies once (and not at all while the device
//! says it is polling, VIRTQ_USED_F_NO_NOTIFY).

use core::fmt;
use core::ptr::{NonNull, addr_of, addr_of_mut};

use super::pci::{QueueNotifier, VirtioPci};
use super::queue::{Buffer, QueueMemory, SplitQueue};
use super::{NO_VECTOR, VirtioError};
use crate::dma::{self, Scratch};
use crate::pci::{MmioAllocator, PciDevice};
use crate::tsc;

// §5.2.3: feature bits.
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;
/// What the driver accepts when offered (VERSION_1 is added by the transport).
const WANTED: u64 = F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_MQ | F_DISCARD | F_WRITE_ZEROES;

// §5.2.4: struct virtio_blk_config offsets.
const CFG_CAPACITY: u32 = 0;
const CFG_SEG_MAX: u32 = 12;
const CFG_BLK_SIZE: u32 = 20;
const CFG_NUM_QUEUES: u32 = 34;
const CFG_MAX_DISCARD_SECTORS: u32 = 36;
const CFG_MAX_DISCARD_SEG: u32 = 40;
const CFG_DISCARD_SECTOR_ALIGNMENT: u32 = 44;
const CFG_MAX_WRITE_ZEROES_SECTORS: u32 = 48;
const CFG_MAX_WRITE_ZEROES_SEG: u32 = 52;

// §5.2.6: request types and status values.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Written to the status byte before submission: a device that completes a request
/// without writing its status is caught.
const STATUS_UNWRITTEN: u8 = 0xff;
const WRITE_ZEROES_F_UNMAP: u32 = 1;

/// Request sector units are always 512 bytes (§5.2.6), whatever `blk_size` says.
pub const SECTOR_SIZE: usize = 512;
pub const ID_BYTES: usize = 20;
pub const QUEUE_ENTRIES: usize = 256;
pub const MAX_QUEUES: usize = 4;
/// Requests in flight per queue.
pub const MAX_SLOTS: usize = 64;
pub const DATA_PER_QUEUE: usize = 256 * 1024;
/// Descriptors per request: header, data, status.
const DESCS_PER_REQUEST: u16 = 3;

/// One request's memory: what the device reads and writes, then the driver's own record
/// (kept here, in static memory, so that `BlkDevice` stays small on the 64 KiB stack).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Slot {
    /// struct virtio_blk_req header: type, reserved, sector.
    kind: u32,
    reserved: u32,
    sector: u64,
    /// struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags.
    range_sector: u64,
    range_sectors: u32,
    range_flags: u32,
    id: [u8; ID_BYTES],
    status: u8,
    /// Driver only: the caller's tag and the request, for its completion.
    tag: u32,
    request: Request,
}

#[repr(C, align(4096))]
pub struct DataArea([u8; DATA_PER_QUEUE]);

/// Scratch RAM one queue needs: ring, slots and data area (with alignment slack).
pub const SCRATCH_PER_QUEUE: u64 = (core::mem::size_of::<QueueMemory<QUEUE_ENTRIES>>()
    + core::mem::size_of::<[Slot; MAX_SLOTS]>()
    + DATA_PER_QUEUE
    + 2 * 4096) as u64;

/// A block request. `offset`/`len` locate the data in the queue's data area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Read {
        sector: u64,
        offset: usize,
        len: usize,
    },
    Write {
        sector: u64,
        offset: usize,
        len: usize,
    },
    Flush,
    GetId,
    Discard {
        sector: u64,
        sectors: u32,
    },
    WriteZeroes {
        sector: u64,
        sectors: u32,
        unmap: bool,
    },
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Read { .. } => "read",
            Self::Write { .. } => "write",
            Self::Flush => "flush",
            Self::GetId => "get-id",
            Self::Discard { .. } => "discard",
            Self::WriteZeroes { .. } => "write-zeroes",
        }
    }

    /// Bytes the device may write: data of reads, the id of GET_ID, plus the status byte.
    fn writable_len(&self) -> u32 {
        let data = match self {
            Self::Read { len, .. } => *len as u32,
            Self::GetId => ID_BYTES as u32,
            _ => 0,
        };
        data + 1
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ok => "OK",
            Self::IoErr => "IOERR",
            Self::Unsupp => "UNSUPP",
        })
    }
}

/// A finished request.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub tag: u32,
    pub request: Request,
    pub status: Status,
    /// The device's id string (GET_ID with status OK), NUL-padded.
    pub id: [u8; ID_BYTES],
}

#[derive(Debug, Clone, Copy)]
pub enum BlkError {
    Virtio(VirtioError),
    /// The device has no device-specific configuration structure.
    NoDeviceConfig,
    /// Not enough scratch RAM above the image for the queues.
    NoQueueMemory {
        needed: u64,
        available: u64,
    },
    /// A request's data lies outside the queue's data area or is not whole sectors.
    BadBuffer {
        offset: usize,
        len: usize,
    },
    /// No free slot or descriptors: the caller submitted more than `can_submit` allowed.
    QueueBusy(u16),
    /// The used ring returned a head we have no request for.
    UnknownHead {
        queue: u16,
        id: u32,
    },
    UsedLength {
        queue: u16,
        request: &'static str,
        len: u32,
        expected: u32,
    },
    BadStatus {
        queue: u16,
        request: &'static str,
        status: u8,
    },
    Timeout {
        queue: u16,
        in_flight: u16,
        ms: u64,
    },
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Virtio(e) => write!(f, "{e}"),
            Self::NoDeviceConfig => write!(
                f,
                "virtio-blk capacity unreadable: no device configuration capability, or its config_generation never settled"
            ),
            Self::NoQueueMemory { needed, available } => write!(
                f,
                "virtio-blk queues need {needed} bytes of RAM above the test guest image, {available} are free; give the VM more memory"
            ),
            Self::BadBuffer { offset, len } => write!(
                f,
                "request data at offset {offset} len {len} is not whole sectors inside the {DATA_PER_QUEUE}-byte data area"
            ),
            Self::QueueBusy(q) => write!(f, "queue {q}: no free request slot or descriptors"),
            Self::UnknownHead { queue, id } => write!(
                f,
                "queue {queue}: device returned used id {id}, which is not an outstanding request head"
            ),
            Self::UsedLength {
                queue,
                request,
                len,
                expected,
            } => write!(
                f,
                "queue {queue}: {request} completed with used len {len}, expected {expected} (data bytes written + status byte)"
            ),
            Self::BadStatus {
                queue,
                request,
                status,
            } => {
                if *status == STATUS_UNWRITTEN {
                    write!(
                        f,
                        "queue {queue}: {request} completed but the device did not write its status byte"
                    )
                } else {
                    write!(
                        f,
                        "queue {queue}: {request} completed with invalid status {status:#x}"
                    )
                }
            }
            Self::Timeout {
                queue,
                in_flight,
                ms,
            } => write!(
                f,
                "queue {queue}: {in_flight} request(s) outstanding and no completion for {ms} ms; is the backend serving the queue?"
            ),
        }
    }
}

impl From<VirtioError> for BlkError {
    fn from(e: VirtioError) -> Self {
        Self::Virtio(e)
    }
}

/// Limits from the device configuration (zero when the feature is not negotiated).
#[derive(Debug, Clone, Copy, Default)]
pub struct BlkConfig {
    pub capacity: u64,
    pub blk_size: u32,
    pub seg_max: u32,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

/// `BlkQueue::in_flight` entry of a descriptor head with no request.
const NO_SLOT: u8 = u8::MAX;

pub struct BlkQueue {
    pub index: u16,
    ring: SplitQueue<QUEUE_ENTRIES>,
    notifier: QueueNotifier,
    slots: NonNull<[Slot; MAX_SLOTS]>,
    data: NonNull<DataArea>,
    free_slots: u64,
    /// The slot of the request whose chain starts at each descriptor head.
    in_flight: [u8; QUEUE_ENTRIES],
    outstanding: u16,
    /// Chains pushed since the last `kick`.
    unkicked: u16,
    /// Notifications written to the device (each one is a VM exit).
    pub notifies: u64,
}

pub struct BlkDevice {
    virtio: VirtioPci,
    pub features: u64,
    pub config: BlkConfig,
    queues: [Option<BlkQueue>; MAX_QUEUES],
}

impl BlkDevice {
    /// Brings `dev` up (§3.1.1): negotiates the features the driver knows, reads the
    /// configuration and sets up every queue (up to `MAX_QUEUES`), polled.
    /// Queue memory comes from `scratch` (`SCRATCH_PER_QUEUE` bytes per queue).
    pub fn open(
        dev: PciDevice,
        alloc: &mut MmioAllocator,
        scratch: &mut Scratch,
    ) -> Result<Self, BlkError> {
        let virtio = VirtioPci::probe(dev, alloc)?;
        let features = virtio.initialize(WANTED)?;
        match Self::configure(&virtio, features, scratch) {
            Ok((config, queues)) => Ok(Self {
                virtio,
                features,
                config,
                queues,
            }),
            Err(e) => {
                // §3.1.1: tell the device the driver gave up.
                virtio.fail();
                Err(e)
            }
        }
    }

    /// Reads the configuration, sets up the queues and sets DRIVER_OK.
    #[allow(clippy::type_complexity)]
    fn configure(
        virtio: &VirtioPci,
        features: u64,
        scratch: &mut Scratch,
    ) -> Result<(BlkConfig, [Option<BlkQueue>; MAX_QUEUES]), BlkError> {
        let has = |f: u64| features & f != 0;
        let capacity = virtio
            .device_config_read64(CFG_CAPACITY)
            .ok_or(BlkError::NoDeviceConfig)?;
        let read32 = |off| virtio.device_config_read32(off).unwrap_or(0);
        let mut config = BlkConfig {
            capacity,
            blk_size: if has(F_BLK_SIZE) {
                read32(CFG_BLK_SIZE)
            } else {
                0
            },
            seg_max: if has(F_SEG_MAX) {
                read32(CFG_SEG_MAX)
            } else {
                0
            },
            num_queues: 1,
            ..BlkConfig::default()
        };
        if has(F_MQ) {
            config.num_queues = virtio
                .device_config_read16(CFG_NUM_QUEUES)
                .unwrap_or(1)
                .max(1);
        }
        if has(F_DISCARD) {
            config.max_discard_sectors = read32(CFG_MAX_DISCARD_SECTORS);
            config.max_discard_seg = read32(CFG_MAX_DISCARD_SEG);
            config.discard_sector_alignment = read32(CFG_DISCARD_SECTOR_ALIGNMENT);
        }
        if has(F_WRITE_ZEROES) {
            config.max_write_zeroes_sectors = read32(CFG_MAX_WRITE_ZEROES_SECTORS);
            config.max_write_zeroes_seg = read32(CFG_MAX_WRITE_ZEROES_SEG);
        }
        virtio.set_config_vector(NO_VECTOR)?;
        let count = usize::from(config.num_queues.min(virtio.num_queues().max(1))).min(MAX_QUEUES);
        let mut queues = [const { None }; MAX_QUEUES];
        for (i, q) in queues.iter_mut().enumerate().take(count) {
            let index = i as u16;
            let available = scratch.available();
            let (Some(mem), Some(slots), Some(data)) = (
                scratch.alloc::<QueueMemory<QUEUE_ENTRIES>>(),
                scratch.alloc::<[Slot; MAX_SLOTS]>(),
                scratch.alloc::<DataArea>(),
            ) else {
                return Err(BlkError::NoQueueMemory {
                    needed: SCRATCH_PER_QUEUE * (count - i) as u64,
                    available,
                });
            };
            let mut ring = SplitQueue::new(mem, virtio.queue_max_size(index));
            ring.suppress_interrupts();
            let notifier = virtio.setup_queue(index, &ring, NO_VECTOR)?;
            *q = Some(BlkQueue {
                index,
                ring,
                notifier,
                slots,
                data,
                free_slots: u64::MAX,
                in_flight: [NO_SLOT; QUEUE_ENTRIES],
                outstanding: 0,
                unkicked: 0,
                notifies: 0,
            });
        }
        virtio.driver_ok()?;
        Ok((config, queues))
    }

    pub fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    /// Queues set up (at most `MAX_QUEUES`, even if the device has more).
    pub fn queue_count(&self) -> usize {
        self.queues.iter().flatten().count()
    }

    pub fn device(&self) -> PciDevice {
        self.virtio.dev
    }

    pub fn queue(&mut self, index: usize) -> Option<&mut BlkQueue> {
        self.queues.get_mut(index)?.as_mut()
    }

    /// Submits `request` on `queue`, notifies and waits for it.
    pub fn run_one(
        &mut self,
        queue: usize,
        request: Request,
        timeout_us: u64,
    ) -> Result<Completion, BlkError> {
        let q = self
            .queues
            .get_mut(queue)
            .and_then(Option::as_mut)
            .ok_or(BlkError::Virtio(VirtioError::NoSuchQueue(queue as u16)))?;
        q.submit(request, 0)?;
        q.kick();
        q.wait(timeout_us)
    }

    /// Resets the device (it stops using our memory).
    pub fn reset(&self) -> Result<(), BlkError> {
        Ok(self.virtio.reset()?)
    }
}

impl BlkQueue {
    /// Whether one more request fits (a free slot and three descriptors).
    pub fn can_submit(&self) -> bool {
        self.free_slots != 0 && self.ring.num_free() >= DESCS_PER_REQUEST
    }

    pub fn outstanding(&self) -> u16 {
        self.outstanding
    }

    /// The data area's address, for filling write buffers and checking read buffers.
    pub fn data(&self) -> *mut u8 {
        self.data.as_ptr().cast::<u8>()
    }

    /// Publishes `request` in the avail ring (no notification: see `kick`). `tag` comes
    /// back in its completion.
    pub fn submit(&mut self, request: Request, tag: u32) -> Result<(), BlkError> {
        if !self.can_submit() {
            return Err(BlkError::QueueBusy(self.index));
        }
        let slot = self.free_slots.trailing_zeros();
        // SAFETY: `slot` < 64 = MAX_SLOTS; the slot is free, so the device does not use it.
        let s = unsafe { addr_of_mut!((*self.slots.as_ptr())[slot as usize]) };
        let (kind, sector, data) = match request {
            Request::Read {
                sector,
                offset,
                len,
            } => (T_IN, sector, Some((offset, len, true))),
            Request::Write {
                sector,
                offset,
                len,
            } => (T_OUT, sector, Some((offset, len, false))),
            Request::Flush => (T_FLUSH, 0, None),
            Request::GetId => (T_GET_ID, 0, None),
            Request::Discard { .. } => (T_DISCARD, 0, None),
            Request::WriteZeroes { .. } => (T_WRITE_ZEROES, 0, None),
        };
        let mut buffers = [Buffer {
            addr: 0,
            len: 0,
            device_writable: false,
        }; DESCS_PER_REQUEST as usize];
        buffers[0] = Buffer {
            addr: s as u64,
            len: 16,
            device_writable: false,
        };
        let mut n = 1;
        if let Some((offset, len, device_writable)) = data {
            let inside = len > 0
                && len.is_multiple_of(SECTOR_SIZE)
                && offset
                    .checked_add(len)
                    .is_some_and(|end| end <= DATA_PER_QUEUE);
            if !inside {
                return Err(BlkError::BadBuffer { offset, len });
            }
            buffers[n] = Buffer {
                addr: dma::phys_addr(self.data) + offset as u64,
                len: len as u32,
                device_writable,
            };
            n += 1;
        }
        // SAFETY: `s` points into our claimed slot array; the slot is free (see above).
        unsafe {
            addr_of_mut!((*s).kind).write_volatile(kind);
            addr_of_mut!((*s).reserved).write_volatile(0);
            addr_of_mut!((*s).sector).write_volatile(sector);
            addr_of_mut!((*s).status).write_volatile(STATUS_UNWRITTEN);
            addr_of_mut!((*s).tag).write(tag);
            addr_of_mut!((*s).request).write(request);
            match request {
                Request::Discard { sector, sectors }
                | Request::WriteZeroes {
                    sector, sectors, ..
                } => {
                    let flags = match request {
                        Request::WriteZeroes { unmap: true, .. } => WRITE_ZEROES_F_UNMAP,
                        _ => 0,
                    };
                    addr_of_mut!((*s).range_sector).write_volatile(sector);
                    addr_of_mut!((*s).range_sectors).write_volatile(sectors);
                    addr_of_mut!((*s).range_flags).write_volatile(flags);
                    buffers[n] = Buffer {
                        addr: addr_of!((*s).range_sector) as u64,
                        len: 16,
                        device_writable: false,
                    };
                    n += 1;
                }
                Request::GetId => {
                    addr_of_mut!((*s).id).write_volatile([0; ID_BYTES]);
                    buffers[n] = Buffer {
                        addr: addr_of!((*s).id) as u64,
                        len: ID_BYTES as u32,
                        device_writable: true,
                    };
                    n += 1;
                }
                _ => {}
            }
            buffers[n] = Buffer {
                addr: addr_of!((*s).status) as u64,
                len: 1,
                device_writable: true,
            };
        }
        n += 1;
        let head = self.ring.push(&buffers[..n])?;
        let entry = self
            .in_flight
            .get_mut(usize::from(head))
            .ok_or(BlkError::QueueBusy(self.index))?;
        *entry = slot as u8;
        self.free_slots &= !(1 << slot);
        self.outstanding += 1;
        self.unkicked += 1;
        Ok(())
    }

    /// Notifies the device once for everything submitted since the last kick, unless it
    /// said it is polling the ring.
    pub fn kick(&mut self) {
        if self.unkicked > 0 && self.ring.needs_notify() {
            self.notifier.notify();
            self.notifies += 1;
        }
        self.unkicked = 0;
    }

    /// Takes one finished request, if any, after validating what the device returned.
    pub fn poll(&mut self) -> Result<Option<Completion>, BlkError> {
        let Some(used) = self.ring.pop_used() else {
            return Ok(None);
        };
        let slot = usize::try_from(used.id)
            .ok()
            .and_then(|id| self.in_flight.get_mut(id))
            .map(|entry| core::mem::replace(entry, NO_SLOT))
            .filter(|&slot| slot != NO_SLOT)
            .ok_or(BlkError::UnknownHead {
                queue: self.index,
                id: used.id,
            })?;
        self.outstanding -= 1;
        self.free_slots |= 1 << slot;
        // SAFETY: `slot` < MAX_SLOTS (we stored it) and is ours again (its chain was used);
        // volatile for the fields the device wrote.
        let (status, id, tag, request) = unsafe {
            let s = addr_of!((*self.slots.as_ptr())[usize::from(slot)]);
            (
                addr_of!((*s).status).read_volatile(),
                addr_of!((*s).id).read_volatile(),
                addr_of!((*s).tag).read(),
                addr_of!((*s).request).read(),
            )
        };
        let status = match status {
            S_OK => Status::Ok,
            S_IOERR => Status::IoErr,
            S_UNSUPP => Status::Unsupp,
            other => {
                return Err(BlkError::BadStatus {
                    queue: self.index,
                    request: request.name(),
                    status: other,
                });
            }
        };
        // A successful read must report every data byte plus the status byte; other
        // requests at least the status byte and no more than their writable buffers.
        let expected = request.writable_len();
        let len_ok = match (request, status) {
            (Request::Read { .. }, Status::Ok) => used.len == expected,
            _ => (1..=expected).contains(&used.len),
        };
        if !len_ok {
            return Err(BlkError::UsedLength {
                queue: self.index,
                request: request.name(),
                len: used.len,
                expected,
            });
        }
        Ok(Some(Completion {
            tag,
            request,
            status,
            id: if request == Request::GetId && status == Status::Ok {
                id
            } else {
                [0; ID_BYTES]
            },
        }))
    }

    /// Polls until one request finishes; fails after `timeout_us` without one.
    pub fn wait(&mut self, timeout_us: u64) -> Result<Completion, BlkError> {
        let deadline = tsc::Deadline::after_us(timeout_us);
        loop {
            if let Some(c) = self.poll()? {
                return Ok(c);
            }
            if deadline.passed() {
                return Err(BlkError::Timeout {
                    queue: self.index,
                    in_flight: self.outstanding,
                    ms: timeout_us / 1000,
                });
            }
            core::hint::spin_loop();
        }
    }
}
