//! Hostile guest input through the real queue worker: chains are written into guest memory
//! from the host (virtio-queue's mock driver), the worker runs them on a real io_uring over a
//! real image, and the tests check the status byte, the used ring and the counters.

use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::*;
use crate::config::{BackendConfig, Disk};
use crate::metrics::MetricsSnapshot;
use crate::request::RejectReason;

const QUEUE_SIZE: u16 = 64;
const MEM_SIZE: usize = 1 << 20;
const IMAGE_SIZE: usize = 1 << 20;
const HEADER: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const DEVICE_WRITES: u16 = VRING_DESC_F_WRITE as u16;

/// One descriptor of a test chain: address, length, device-writable.
#[derive(Clone, Copy)]
struct Desc(u64, u32, bool);

fn readable(addr: u64, len: u32) -> Desc {
    Desc(addr, len, false)
}

fn writable(addr: u64, len: u32) -> Desc {
    Desc(addr, len, true)
}

struct Rig {
    memory: &'static GuestMemoryMmap<()>,
    queue: MockSplitQueue<'static, GuestMemoryMmap<()>>,
    vring: VringRwLock,
    backend: BlkBackend,
    image: PathBuf,
    next_desc: u16,
    used_seen: u16,
}

impl Rig {
    fn new(read_only: bool) -> Self {
        Self::with_event_idx(read_only, false)
    }

    fn with_event_idx(read_only: bool, event_idx: bool) -> Self {
        let image = std::env::temp_dir().join(format!(
            "ferrovirt-vhost-blk-unit-{}-{}.img",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::write(&image, vec![0x11u8; IMAGE_SIZE]).unwrap();
        let mut config = BackendConfig::new(&image);
        config.read_only = read_only;
        let disk = Disk::open(&config).unwrap();
        let backend = BlkBackend::new(
            &disk,
            1,
            QUEUE_SIZE,
            b"ferrovirt-serial".to_vec(),
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let memory: &'static GuestMemoryMmap<()> = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let atomic = GuestMemoryAtomic::new(memory.clone());
        backend.update_memory(atomic.clone()).unwrap();
        let queue = MockSplitQueue::new(memory, QUEUE_SIZE);
        let vring = VringRwLock::new(atomic, QUEUE_SIZE).unwrap();
        vring.set_queue_size(QUEUE_SIZE);
        vring
            .set_queue_info(
                queue.desc_table_addr().0,
                queue.avail_addr().0,
                queue.used_addr().0,
            )
            .unwrap();
        vring.set_queue_event_idx(event_idx);
        backend.set_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Self {
            memory,
            queue,
            vring,
            backend,
            image,
            next_desc: 0,
            used_seen: 0,
        }
    }

    fn header(&self, request_type: u32, sector: u64) {
        self.memory
            .write_obj(request_type.to_le(), GuestAddress(HEADER))
            .unwrap();
        self.memory
            .write_obj(0u32, GuestAddress(HEADER + 4))
            .unwrap();
        self.memory
            .write_obj(sector.to_le(), GuestAddress(HEADER + 8))
            .unwrap();
    }

    /// Makes `chain` available, kicks the worker, waits for its I/O, and returns the used
    /// ring entry's length and the status byte (0xFF if the device did not write it).
    fn run(&mut self, chain: &[Desc]) -> (u32, u8) {
        let _ = self.memory.write_obj(0xFFu8, GuestAddress(STATUS));
        let first = self.next_desc;
        let raw: Vec<RawDescriptor> = chain
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let last = i + 1 == chain.len();
                let mut flags = if d.2 { DEVICE_WRITES } else { 0 };
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = if last { 0 } else { first + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(d.0, d.1, flags, next))
            })
            .collect();
        self.queue.add_desc_chains(&raw, first).unwrap();
        self.next_desc = (first + chain.len() as u16) % (QUEUE_SIZE - 8);
        self.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
        // GET_VRING_BASE's drain: waits for every in-flight request.
        self.backend.stop_vring(0).unwrap();
        let used_idx = self.queue.used().idx().load();
        assert_eq!(
            used_idx,
            self.used_seen.wrapping_add(1),
            "one used entry per chain"
        );
        let elem = self
            .queue
            .used()
            .ring()
            .ref_at(usize::from(self.used_seen % QUEUE_SIZE))
            .unwrap()
            .load();
        self.used_seen = used_idx;
        assert_eq!(elem.id(), u32::from(first), "used entry names the head");
        let status = self
            .memory
            .read_obj::<u8>(GuestAddress(STATUS))
            .unwrap_or(0xFF);
        (elem.len(), status)
    }

    fn metrics(&self) -> MetricsSnapshot {
        self.backend.metrics().snapshot()
    }

    fn image_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Name, request type, sector, chain, expected (used len, status byte), counted reason.
type HostileCase = (&'static str, u32, u64, Vec<Desc>, (u32, u8), RejectReason);

fn status_desc() -> Desc {
    writable(STATUS, 1)
}

#[test]
fn valid_read_returns_image_bytes_and_status_ok() {
    let mut rig = Rig::new(false);
    rig.header(VIRTIO_BLK_T_IN, 3);
    let (len, status) = rig.run(&[readable(HEADER, 16), writable(DATA, 1024), status_desc()]);
    assert_eq!((len, status), (1025, VIRTIO_BLK_S_OK as u8));
    let mut buf = [0u8; 1024];
    rig.memory.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
    let m = rig.metrics();
    assert_eq!(m.requests_of(RequestType::Read), 1);
    assert_eq!(m.bytes_read, 1024);
}

#[test]
fn hostile_chains_get_error_statuses_and_counters_and_the_device_keeps_serving() {
    let mut rig = Rig::new(false);
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    let cases: Vec<HostileCase> = vec![
        (
            "only a status byte",
            VIRTIO_BLK_T_IN,
            0,
            vec![status_desc()],
            (1, ioerr),
            RejectReason::ChainTooShort,
        ),
        (
            "header device-writable",
            VIRTIO_BLK_T_IN,
            0,
            vec![writable(HEADER, 16), writable(DATA, 512), status_desc()],
            (1, ioerr),
            RejectReason::HeaderWrongDirection,
        ),
        (
            "header too short",
            VIRTIO_BLK_T_IN,
            0,
            vec![readable(HEADER, 8), writable(DATA, 512), status_desc()],
            (1, ioerr),
            RejectReason::HeaderTooShort,
        ),
        (
            "header outside memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                readable(0x4000_0000, 16),
                writable(DATA, 512),
                status_desc(),
            ],
            (1, ioerr),
            RejectReason::HeaderOutsideMemory,
        ),
        (
            "status byte device-readable",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                readable(HEADER, 16),
                writable(DATA, 512),
                readable(STATUS, 1),
            ],
            (0, 0xFF),
            RejectReason::NoStatusByte,
        ),
        (
            "status byte outside memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                readable(HEADER, 16),
                writable(DATA, 512),
                writable(0x4000_0000, 1),
            ],
            (0, 0xFF),
            RejectReason::StatusOutsideMemory,
        ),
        (
            "read into a device-readable buffer",
            VIRTIO_BLK_T_IN,
            0,
            vec![readable(HEADER, 16), readable(DATA, 512), status_desc()],
            (1, ioerr),
            RejectReason::DataWrongDirection,
        ),
        (
            "write from a device-writable buffer",
            VIRTIO_BLK_T_OUT,
            0,
            vec![readable(HEADER, 16), writable(DATA, 512), status_desc()],
            (1, ioerr),
            RejectReason::DataWrongDirection,
        ),
        (
            "data outside memory",
            VIRTIO_BLK_T_OUT,
            0,
            vec![
                readable(HEADER, 16),
                readable(MEM_SIZE as u64 - 256, 512),
                status_desc(),
            ],
            (1, ioerr),
            RejectReason::DataOutsideMemory,
        ),
        (
            "absurd length",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                readable(HEADER, 16),
                writable(DATA, 0xFFFF_F000),
                status_desc(),
            ],
            (1, ioerr),
            RejectReason::DataOutsideMemory,
        ),
        (
            "length not a sector multiple",
            VIRTIO_BLK_T_OUT,
            0,
            vec![readable(HEADER, 16), readable(DATA, 100), status_desc()],
            (1, ioerr),
            RejectReason::BadLength,
        ),
        (
            "write past the end",
            VIRTIO_BLK_T_OUT,
            (IMAGE_SIZE / 512) as u64 - 1,
            vec![readable(HEADER, 16), readable(DATA, 1024), status_desc()],
            (1, ioerr),
            RejectReason::SectorOutOfRange,
        ),
        (
            "sector overflowing u64",
            VIRTIO_BLK_T_IN,
            u64::MAX,
            vec![readable(HEADER, 16), writable(DATA, 512), status_desc()],
            (1, ioerr),
            RejectReason::SectorOutOfRange,
        ),
        (
            "unknown request type",
            0x99,
            0,
            vec![readable(HEADER, 16), status_desc()],
            (1, VIRTIO_BLK_S_UNSUPP as u8),
            RejectReason::Unsupported,
        ),
    ];
    rig.memory
        .write_slice(&[0x77u8; 1024], GuestAddress(DATA))
        .unwrap();
    for (name, request_type, sector, chain, expected, reason) in &cases {
        let before = rig.metrics();
        rig.header(*request_type, *sector);
        assert_eq!(rig.run(chain), *expected, "{name}");
        let after = rig.metrics();
        assert_eq!(
            after.rejected_for(*reason),
            before.rejected_for(*reason) + 1,
            "{name}"
        );
        assert_eq!(
            after.total_rejected(),
            before.total_rejected() + 1,
            "{name}"
        );
    }
    assert!(
        rig.image_bytes().iter().all(|&b| b == 0x11),
        "no hostile chain wrote the image"
    );
    assert_eq!(rig.metrics().io_errors, 0);

    // Still serving: a valid write after all of that lands.
    rig.header(VIRTIO_BLK_T_OUT, 2);
    let ok = rig.run(&[readable(HEADER, 16), readable(DATA, 1024), status_desc()]);
    assert_eq!(ok, (1, VIRTIO_BLK_S_OK as u8));
    assert!(rig.image_bytes()[1024..2048].iter().all(|&b| b == 0x77));
}

#[test]
fn writes_to_a_read_only_disk_fail_without_touching_it() {
    let mut rig = Rig::new(true);
    rig.header(VIRTIO_BLK_T_OUT, 0);
    let out = rig.run(&[readable(HEADER, 16), readable(DATA, 512), status_desc()]);
    assert_eq!(out, (1, VIRTIO_BLK_S_IOERR as u8));
    assert_eq!(rig.metrics().rejected_for(RejectReason::ReadOnly), 1);
    assert!(rig.image_bytes().iter().all(|&b| b == 0x11));
}

#[test]
fn discard_with_unknown_flags_is_unsupported() {
    let mut rig = Rig::new(false);
    rig.header(VIRTIO_BLK_T_DISCARD, 0);
    // sector 0, 8 sectors, flags = UNMAP (not allowed on discard)
    rig.memory.write_obj(0u64, GuestAddress(DATA)).unwrap();
    rig.memory.write_obj(8u32, GuestAddress(DATA + 8)).unwrap();
    rig.memory.write_obj(1u32, GuestAddress(DATA + 12)).unwrap();
    let out = rig.run(&[readable(HEADER, 16), readable(DATA, 16), status_desc()]);
    assert_eq!(out, (1, VIRTIO_BLK_S_UNSUPP as u8));
    assert!(rig.image_bytes().iter().all(|&b| b == 0x11));
}

#[test]
fn get_id_returns_the_serial() {
    let mut rig = Rig::new(false);
    rig.header(VIRTIO_BLK_T_GET_ID, 0);
    let out = rig.run(&[readable(HEADER, 16), writable(DATA, 20), status_desc()]);
    assert_eq!(out, (21, VIRTIO_BLK_S_OK as u8));
    let mut id = [0u8; 20];
    rig.memory.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..16], b"ferrovirt-serial");
    assert_eq!(&id[16..], &[0; 4]);
}

#[test]
fn with_event_idx_every_chain_of_a_kick_is_served() {
    let mut rig = Rig::with_event_idx(false, true);
    for sector in 0..4 {
        rig.header(VIRTIO_BLK_T_IN, sector);
        let out = rig.run(&[readable(HEADER, 16), writable(DATA, 512), status_desc()]);
        assert_eq!(out, (513, VIRTIO_BLK_S_OK as u8));
    }
    assert_eq!(rig.metrics().requests_of(RequestType::Read), 4);
}
