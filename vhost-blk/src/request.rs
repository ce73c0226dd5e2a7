//! Parsing and validation of virtio-blk requests from descriptor chains (virtio 1.2 §5.2.6).
//!
//! Everything here is pure: it reads guest memory but does no I/O, so hostile chains can be
//! tested by writing guest memory from the host. A chain is either a [`Request`] ready for the
//! I/O engine or a [`Rejection`] that says which status byte to write (if the chain has a usable
//! one) and why.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemory, Permissions};

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// virtio 1.2 §5.2.6: the GET_ID answer is at most 20 bytes, not NUL-terminated if 20 long.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// `struct virtio_blk_req` header: type, reserved, sector.
const HEADER_LEN: u32 = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
const DISCARD_SEGMENT_LEN: usize = 16;
const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct RequestHeader {
    request_type: u32,
    reserved: u32,
    sector: u64,
}
// SAFETY: plain old data of integers without padding; any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// The request types the device counts separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported,
}

impl RequestType {
    pub const COUNT: usize = 7;

    pub fn index(self) -> usize {
        self as usize
    }

    fn from_raw(raw: u32) -> Self {
        match raw {
            VIRTIO_BLK_T_IN => Self::Read,
            VIRTIO_BLK_T_OUT => Self::Write,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            _ => Self::Unsupported,
        }
    }
}

/// What the device offers, against which requests are checked.
#[derive(Clone, Debug)]
pub struct DeviceLimits {
    pub capacity_sectors: u64,
    pub read_only: bool,
    /// VIRTIO_BLK_F_SEG_MAX: data descriptors per request.
    pub seg_max: u32,
    /// VIRTIO_BLK_F_SIZE_MAX: bytes per data descriptor.
    pub size_max: u32,
    pub discard: bool,
    pub write_zeroes: bool,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

/// A guest buffer the device reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A sector range of a discard or write-zeroes request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    pub sector: u64,
    pub num_sectors: u32,
}

impl SectorRange {
    pub fn byte_offset(&self) -> u64 {
        self.sector << SECTOR_SHIFT
    }

    pub fn byte_len(&self) -> u64 {
        u64::from(self.num_sectors) << SECTOR_SHIFT
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Read `len` bytes at byte `offset` of the image into `segments`.
    Read {
        offset: u64,
        len: u64,
        segments: Vec<Segment>,
    },
    /// Write the bytes of `segments` at byte `offset` of the image.
    Write {
        offset: u64,
        len: u64,
        segments: Vec<Segment>,
    },
    Flush,
    GetId {
        segments: Vec<Segment>,
    },
    Discard(Vec<SectorRange>),
    WriteZeroes(Vec<SectorRange>),
}

impl Operation {
    pub fn request_type(&self) -> RequestType {
        match self {
            Self::Read { .. } => RequestType::Read,
            Self::Write { .. } => RequestType::Write,
            Self::Flush => RequestType::Flush,
            Self::GetId { .. } => RequestType::GetId,
            Self::Discard(_) => RequestType::Discard,
            Self::WriteZeroes(_) => RequestType::WriteZeroes,
        }
    }
}

/// A validated request: every address in it lies in guest memory, every range in the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Head descriptor index, returned in the used ring.
    pub head: u16,
    /// Guest address of the status byte.
    pub status: GuestAddress,
    pub operation: Operation,
}

/// Why a chain was refused without I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("the chain has no device-writable status byte at its end")]
    NoStatusByte,
    #[error("the status byte lies outside guest memory")]
    StatusOutsideMemory,
    #[error("the chain is too short for a header and a status byte")]
    ChainTooShort,
    #[error("the request header is device-writable")]
    HeaderWrongDirection,
    #[error("the request header descriptor is shorter than 16 bytes")]
    HeaderTooShort,
    #[error("the request header lies outside guest memory")]
    HeaderOutsideMemory,
    #[error("a data descriptor has the wrong direction for the request type")]
    DataWrongDirection,
    #[error("a data descriptor lies outside guest memory")]
    DataOutsideMemory,
    #[error("more data descriptors than SEG_MAX")]
    TooManySegments,
    #[error("a data descriptor is longer than SIZE_MAX")]
    SegmentTooLong,
    #[error("the data length is zero or not a multiple of 512")]
    BadLength,
    #[error("the request reaches past the end of the disk")]
    SectorOutOfRange,
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("malformed discard or write-zeroes segments")]
    BadRangeSegments,
    #[error("unknown request type or flags")]
    Unsupported,
}

impl RejectReason {
    pub const COUNT: usize = 15;

    pub fn index(self) -> usize {
        self as usize
    }

    /// The status byte the guest gets (virtio 1.2 §5.2.6.1).
    pub fn status(self) -> u8 {
        match self {
            Self::Unsupported => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A refused chain: the device writes `reason.status()` at `status` when there is one, and
/// returns `head` to the used ring either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub head: u16,
    pub status: Option<GuestAddress>,
    pub reason: RejectReason,
    pub request_type: RequestType,
}

#[derive(Clone, Copy, Debug)]
struct RawDescriptor {
    addr: GuestAddress,
    len: u32,
    write_only: bool,
}

/// Parses and validates one descriptor chain.
///
/// Layout accepted: the 16-byte header at the start of the first (device-readable) descriptor,
/// data in the descriptors between, and the status byte as the last byte of the last
/// (device-writable) descriptor, whose earlier bytes, if any, count as data.
pub fn parse_request<M>(
    chain: DescriptorChain<M>,
    limits: &DeviceLimits,
) -> Result<Request, Rejection>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let mem = chain.memory();
    let descriptors: Vec<RawDescriptor> = chain
        .clone()
        .map(|d| RawDescriptor {
            addr: d.addr(),
            len: d.len(),
            write_only: d.is_write_only(),
        })
        .collect();
    parse_descriptors(head, mem, descriptors, limits)
}

/// Parses the chain starting at descriptor `head` of the table at `desc_table` (a split ring
/// of `queue_size` entries), as [`parse_request`] does a popped one. Used to resubmit a chain
/// recorded in the inflight region, which is not in the available ring any more.
pub fn parse_request_at<Mem>(
    mem: &Mem,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    limits: &DeviceLimits,
) -> Result<Request, Rejection>
where
    Mem: GuestMemory + ?Sized,
{
    let descriptors = walk_chain(mem, desc_table, queue_size, head);
    parse_descriptors(head, mem, descriptors, limits)
}

// virtio 1.2 §2.7.5: struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }.
const DESC_LEN: u64 = 16;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;

/// The descriptors of the chain at `head`, following NEXT and one level of INDIRECT (virtio
/// 1.2 §2.7.5.3) the way virtio-queue's `DescriptorChain` does: a descriptor outside memory or
/// the table, a nested indirect table, a loop (more links than entries) or more than 4 GiB
/// of buffers ends the chain.
fn walk_chain<Mem>(
    mem: &Mem,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Vec<RawDescriptor>
where
    Mem: GuestMemory + ?Sized,
{
    let mut out = Vec::new();
    let (mut table, mut entries, mut index) = (desc_table, u32::from(queue_size), u32::from(head));
    let mut ttl = entries;
    let mut indirect = false;
    let mut yielded = 0u32;
    while index < entries && ttl > 0 {
        ttl -= 1;
        let mut raw = [0u8; DESC_LEN as usize];
        let Some(at) = table.checked_add(u64::from(index) * DESC_LEN) else {
            break;
        };
        if mem.read_slice(&mut raw, at).is_err() {
            break;
        }
        let addr = u64::from_le_bytes([
            raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
        ]);
        let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        if flags & DESC_F_INDIRECT != 0 {
            if indirect || len == 0 || u64::from(len) % DESC_LEN != 0 {
                break;
            }
            let count = u64::from(len) / DESC_LEN;
            if count > u64::from(u16::MAX) {
                break;
            }
            indirect = true;
            table = GuestAddress(addr);
            entries = count as u32;
            ttl = entries;
            index = 0;
            continue;
        }
        // The chain's bytes must fit the used entry's u32 length.
        let Some(total) = yielded.checked_add(len) else {
            break;
        };
        yielded = total;
        out.push(RawDescriptor {
            addr: GuestAddress(addr),
            len,
            write_only: flags & DESC_F_WRITE != 0,
        });
        if flags & DESC_F_NEXT == 0 {
            break;
        }
        index = u32::from(next);
    }
    out
}

fn parse_descriptors<Mem>(
    head: u16,
    mem: &Mem,
    descriptors: Vec<RawDescriptor>,
    limits: &DeviceLimits,
) -> Result<Request, Rejection>
where
    Mem: GuestMemory + ?Sized,
{
    let reject = |status, reason, request_type| Rejection {
        head,
        status,
        reason,
        request_type,
    };

    let Some(last) = descriptors.last() else {
        return Err(reject(
            None,
            RejectReason::NoStatusByte,
            RequestType::Unsupported,
        ));
    };
    if !last.write_only || last.len == 0 {
        return Err(reject(
            None,
            RejectReason::NoStatusByte,
            RequestType::Unsupported,
        ));
    }
    let Some(status) = last.addr.checked_add(u64::from(last.len) - 1) else {
        return Err(reject(
            None,
            RejectReason::StatusOutsideMemory,
            RequestType::Unsupported,
        ));
    };
    if !mem.check_range(status, 1, Permissions::Write) {
        return Err(reject(
            None,
            RejectReason::StatusOutsideMemory,
            RequestType::Unsupported,
        ));
    }
    let status_addr = status;
    let status = Some(status_addr);
    if descriptors.len() < 2 {
        return Err(reject(
            status,
            RejectReason::ChainTooShort,
            RequestType::Unsupported,
        ));
    }

    let first = descriptors[0];
    if first.write_only {
        return Err(reject(
            status,
            RejectReason::HeaderWrongDirection,
            RequestType::Unsupported,
        ));
    }
    if first.len < HEADER_LEN {
        return Err(reject(
            status,
            RejectReason::HeaderTooShort,
            RequestType::Unsupported,
        ));
    }
    let header: RequestHeader = mem.read_obj(first.addr).map_err(|_| {
        reject(
            status,
            RejectReason::HeaderOutsideMemory,
            RequestType::Unsupported,
        )
    })?;
    let request_type = RequestType::from_raw(u32::from_le(header.request_type));
    let sector = u64::from_le(header.sector);
    let reject = |reason| reject(status, reason, request_type);

    // Data: the descriptors between header and status, then the status descriptor's bytes
    // before the status byte.
    let mut data: Vec<RawDescriptor> = descriptors[1..descriptors.len() - 1].to_vec();
    if last.len > 1 {
        data.push(RawDescriptor {
            addr: last.addr,
            len: last.len - 1,
            write_only: true,
        });
    }
    for d in &data {
        if !mem.check_range(
            d.addr,
            d.len as usize,
            if d.write_only {
                Permissions::Write
            } else {
                Permissions::Read
            },
        ) {
            return Err(reject(RejectReason::DataOutsideMemory));
        }
    }
    let segments_in = |device_writes: bool| -> Result<Vec<Segment>, Rejection> {
        data.iter()
            .map(|d| {
                if d.write_only == device_writes {
                    Ok(Segment {
                        addr: d.addr,
                        len: d.len,
                    })
                } else {
                    Err(reject(RejectReason::DataWrongDirection))
                }
            })
            .collect()
    };

    let operation = match request_type {
        RequestType::Read | RequestType::Write => {
            let is_write = request_type == RequestType::Write;
            if is_write && limits.read_only {
                return Err(reject(RejectReason::ReadOnly));
            }
            let segments = segments_in(!is_write)?;
            if segments.len() > limits.seg_max as usize {
                return Err(reject(RejectReason::TooManySegments));
            }
            if segments.iter().any(|s| s.len > limits.size_max) {
                return Err(reject(RejectReason::SegmentTooLong));
            }
            let len: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
            if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
                return Err(reject(RejectReason::BadLength));
            }
            check_sectors(sector, len >> SECTOR_SHIFT, limits)
                .ok_or_else(|| reject(RejectReason::SectorOutOfRange))?;
            let offset = sector << SECTOR_SHIFT;
            if is_write {
                Operation::Write {
                    offset,
                    len,
                    segments,
                }
            } else {
                Operation::Read {
                    offset,
                    len,
                    segments,
                }
            }
        }
        RequestType::Flush => Operation::Flush,
        RequestType::GetId => Operation::GetId {
            segments: segments_in(true)?,
        },
        RequestType::Discard | RequestType::WriteZeroes => {
            let is_discard = request_type == RequestType::Discard;
            let (offered, max_sectors, max_seg) = if is_discard {
                (
                    limits.discard,
                    limits.max_discard_sectors,
                    limits.max_discard_seg,
                )
            } else {
                (
                    limits.write_zeroes,
                    limits.max_write_zeroes_sectors,
                    limits.max_write_zeroes_seg,
                )
            };
            if !offered {
                return Err(reject(if limits.read_only {
                    RejectReason::ReadOnly
                } else {
                    RejectReason::Unsupported
                }));
            }
            let segments = segments_in(false)?;
            let mut bytes = Vec::new();
            for s in &segments {
                let start = bytes.len();
                let len = s.len as usize;
                if start + len > max_seg as usize * DISCARD_SEGMENT_LEN {
                    return Err(reject(RejectReason::BadRangeSegments));
                }
                bytes.resize(start + len, 0);
                mem.read_slice(&mut bytes[start..], s.addr)
                    .map_err(|_| reject(RejectReason::DataOutsideMemory))?;
            }
            if bytes.is_empty() || !bytes.len().is_multiple_of(DISCARD_SEGMENT_LEN) {
                return Err(reject(RejectReason::BadRangeSegments));
            }
            let mut ranges = Vec::with_capacity(bytes.len() / DISCARD_SEGMENT_LEN);
            for raw in bytes.chunks_exact(DISCARD_SEGMENT_LEN) {
                let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
                let num_sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
                let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
                // virtio 1.2 §5.2.6.2: unknown flags, or UNMAP on a discard, are UNSUPP.
                let allowed = if is_discard {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if flags & !allowed != 0 {
                    return Err(reject(RejectReason::Unsupported));
                }
                if num_sectors == 0 || num_sectors > max_sectors {
                    return Err(reject(RejectReason::BadRangeSegments));
                }
                check_sectors(sector, u64::from(num_sectors), limits)
                    .ok_or_else(|| reject(RejectReason::SectorOutOfRange))?;
                ranges.push(SectorRange {
                    sector,
                    num_sectors,
                });
            }
            if is_discard {
                Operation::Discard(ranges)
            } else {
                Operation::WriteZeroes(ranges)
            }
        }
        RequestType::Unsupported => return Err(reject(RejectReason::Unsupported)),
    };
    Ok(Request {
        head,
        status: status_addr,
        operation,
    })
}

/// `Some(())` when sectors `sector..sector + count` lie inside the disk.
fn check_sectors(sector: u64, count: u64, limits: &DeviceLimits) -> Option<()> {
    let end = sector.checked_add(count)?;
    (end <= limits.capacity_sectors).then_some(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const MEM_SIZE: u64 = 0x10_0000;

    fn limits() -> DeviceLimits {
        DeviceLimits {
            capacity_sectors: 2048,
            read_only: false,
            seg_max: 4,
            size_max: 0x8000,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: 64,
            max_discard_seg: 2,
            max_write_zeroes_sectors: 64,
            max_write_zeroes_seg: 2,
        }
    }

    fn descriptor() -> impl Strategy<Value = (u64, u32, bool)> {
        (
            prop_oneof![
                0x1_0000u64..MEM_SIZE,
                MEM_SIZE - 0x1000..MEM_SIZE + 0x1000,
                any::<u64>(),
            ],
            prop_oneof![1u32..=16, Just(512u32), 0u32..0x4000, any::<u32>()],
            any::<bool>(),
        )
    }

    fn request_type() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(VIRTIO_BLK_T_IN),
            Just(VIRTIO_BLK_T_OUT),
            Just(VIRTIO_BLK_T_FLUSH),
            Just(VIRTIO_BLK_T_GET_ID),
            Just(VIRTIO_BLK_T_DISCARD),
            Just(VIRTIO_BLK_T_WRITE_ZEROES),
            any::<u32>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever the guest puts in a chain, parsing never panics, and an accepted request
        /// only names guest memory that exists, with the right direction, inside the disk.
        #[test]
        fn accepted_requests_stay_inside_memory_and_disk(
            descs in proptest::collection::vec(descriptor(), 1..6),
            request_type in request_type(),
            sector in prop_oneof![0u64..2100, any::<u64>()],
            segment_bytes in proptest::collection::vec(any::<u8>(), 32),
        ) {
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
            let queue = MockSplitQueue::new(&mem, 16);
            // The first descriptor's memory holds a header when it is in range.
            let header = RequestHeader { request_type: request_type.to_le(), reserved: 0, sector: sector.to_le() };
            let _ = mem.write_obj(header, GuestAddress(descs[0].0));
            if let Some(d) = descs.get(1) {
                let _ = mem.write_slice(&segment_bytes, GuestAddress(d.0));
            }
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .map(|&(addr, len, w)| {
                    let flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
                })
                .collect();
            let chain = queue.build_desc_chain(&raw).unwrap();
            let limits = limits();
            // A chain resubmitted from the inflight region parses exactly as when popped.
            let by_head = parse_request_at(&mem, queue.desc_table_addr(), 16, chain.head_index(), &limits);
            let parsed = parse_request(chain, &limits);
            prop_assert_eq!(&parsed, &by_head);
            match parsed {
                Ok(request) => {
                    prop_assert!(mem.check_range(request.status, 1, Permissions::Write));
                    let (segments, device_writes, range) = match &request.operation {
                        Operation::Read { offset, len, segments } => (segments.clone(), true, Some((*offset, *len))),
                        Operation::Write { offset, len, segments } => (segments.clone(), false, Some((*offset, *len))),
                        Operation::GetId { segments } => (segments.clone(), true, None),
                        Operation::Flush => (Vec::new(), true, None),
                        Operation::Discard(ranges) | Operation::WriteZeroes(ranges) => {
                            for r in ranges {
                                prop_assert!(r.sector + u64::from(r.num_sectors) <= limits.capacity_sectors);
                            }
                            (Vec::new(), true, None)
                        }
                    };
                    for s in &segments {
                        prop_assert!(mem.check_range(s.addr, s.len as usize, Permissions::Read));
                        let d = descs.iter().find(|d| d.0 == s.addr.0).unwrap();
                        prop_assert_eq!(d.2, device_writes);
                    }
                    if let Some((offset, len)) = range {
                        prop_assert!(len > 0 && len % SECTOR_SIZE == 0);
                        prop_assert!(offset + len <= limits.capacity_sectors * SECTOR_SIZE);
                        prop_assert!(segments.len() <= limits.seg_max as usize);
                    }
                }
                Err(rejection) => {
                    if let Some(status) = rejection.status {
                        prop_assert!(mem.check_range(status, 1, Permissions::Write));
                    }
                    let status = rejection.reason.status();
                    prop_assert!(status == VIRTIO_BLK_S_IOERR as u8 || status == VIRTIO_BLK_S_UNSUPP as u8);
                }
            }
        }
    }

    #[test]
    fn a_request_ending_in_a_read_only_descriptor_has_no_status_byte() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let queue = MockSplitQueue::new(&mem, 16);
        let raw = [
            RawDescriptor::from(SplitDescriptor::new(0x1_0000, 16, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x2_0000, 1, 0, 0)),
        ];
        let rejection =
            parse_request(queue.build_desc_chain(&raw).unwrap(), &limits()).unwrap_err();
        assert_eq!(rejection.status, None);
        assert_eq!(rejection.reason, RejectReason::NoStatusByte);
    }

    fn write_desc(mem: &GuestMemoryMmap<()>, table: u64, index: u64, d: (u64, u32, u16, u16)) {
        let at = GuestAddress(table + index * 16);
        mem.write_obj(d.0.to_le(), at).unwrap();
        mem.write_obj(d.1.to_le(), at.unchecked_add(8)).unwrap();
        mem.write_obj(d.2.to_le(), at.unchecked_add(12)).unwrap();
        mem.write_obj(d.3.to_le(), at.unchecked_add(14)).unwrap();
    }

    #[test]
    fn a_chain_found_by_head_follows_an_indirect_table() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let (table, indirect) = (0x1000, 0x2000);
        let write = VRING_DESC_F_WRITE as u16;
        let next = VRING_DESC_F_NEXT as u16;
        write_desc(&mem, table, 3, (indirect, 48, DESC_F_INDIRECT, 0));
        write_desc(&mem, indirect, 0, (0x1_0000, 16, next, 1));
        write_desc(&mem, indirect, 1, (0x2_0000, 512, next | write, 2));
        write_desc(&mem, indirect, 2, (0x3_0000, 1, write, 0));
        let header = RequestHeader {
            request_type: VIRTIO_BLK_T_IN.to_le(),
            reserved: 0,
            sector: 4u64.to_le(),
        };
        mem.write_obj(header, GuestAddress(0x1_0000)).unwrap();
        let request = parse_request_at(&mem, GuestAddress(table), 16, 3, &limits()).unwrap();
        assert_eq!(request.head, 3);
        assert_eq!(request.status, GuestAddress(0x3_0000));
        assert_eq!(
            request.operation,
            Operation::Read {
                offset: 4 * SECTOR_SIZE,
                len: 512,
                segments: vec![Segment {
                    addr: GuestAddress(0x2_0000),
                    len: 512
                }],
            }
        );
    }

    #[test]
    fn a_looping_or_out_of_table_chain_found_by_head_ends_without_hanging() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let table = 0x1000;
        let next = VRING_DESC_F_NEXT as u16;
        // 0 -> 1 -> 0 -> ...
        write_desc(&mem, table, 0, (0x1_0000, 16, next, 1));
        write_desc(&mem, table, 1, (0x2_0000, 16, next, 0));
        assert_eq!(walk_chain(&mem, GuestAddress(table), 16, 0).len(), 16);
        // A head outside the ring, and a next outside it.
        assert!(walk_chain(&mem, GuestAddress(table), 16, 16).is_empty());
        write_desc(&mem, table, 2, (0x2_0000, 16, next, 400));
        assert_eq!(walk_chain(&mem, GuestAddress(table), 16, 2).len(), 1);
        // A table outside guest memory.
        assert!(walk_chain(&mem, GuestAddress(u64::MAX - 8), 16, 0).is_empty());
        // Nested indirect tables are refused.
        write_desc(&mem, table, 4, (0x4000, 16, DESC_F_INDIRECT, 0));
        write_desc(&mem, 0x4000, 0, (0x5000, 16, DESC_F_INDIRECT, 0));
        assert!(walk_chain(&mem, GuestAddress(table), 16, 4).is_empty());
    }
}
