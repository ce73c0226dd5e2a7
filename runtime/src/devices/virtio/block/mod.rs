//! virtio-blk (device ID 2) served by a vhost-user-blk backend (vhost-user spec, "Back-end
//! message types"; virtio 1.2 §5.2): the VMM connects to the backend's socket through the
//! shared vhost-user frontend, reads the disk's configuration from it (GET_CONFIG) and, on
//! DRIVER_OK, shares guest memory and hands over each ring with the queue's ioeventfd as
//! kick and its MSI-X irqfd as call. Requests never pass through the VMM. The backend keeps
//! an inflight region when it offers INFLIGHT_SHMFD; if it dies, the shared monitor
//! reconnects and replays the ring state.

mod device;

pub use device::VhostUserBlk;

use std::path::PathBuf;

use crate::devices::virtio::vhost_user::VhostUserError;

/// Entries per queue. QEMU's vhost-user-blk default; backends size seg_max for it.
pub const QUEUE_SIZE: u16 = 128;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    #[error("the vhost-user-blk backend at {} hung up during set-up; is it crashing?", .0.display())]
    Gone(PathBuf),
    #[error(
        "the vhost-user-blk backend at {} sent {got} bytes of configuration, fewer than the \
         {} of a virtio-blk device; is it a block backend?", .socket.display(), device::CONFIG_SIZE
    )]
    ShortConfig { socket: PathBuf, got: usize },
}

impl BlockError {
    /// The backend accepted the request and did not answer in time.
    pub fn is_unresponsive(&self) -> bool {
        matches!(self, BlockError::VhostUser(e) if e.is_unresponsive())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, Instant};

    use ferrovirt_tests::{ScratchDir, StorageDaemon, VhostBlkBackend};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::testing::*;
    use crate::devices::virtio::vhost_user::VhostUserMetrics;
    use crate::devices::virtio::{TYPE_BLOCK, VirtioDevice};
    use crate::memory::GuestRam;

    const IMAGE_SIZE: u64 = 8 << 20;
    const QUEUE_AT: u64 = 0x1_0000;
    /// Request headers, data and status bytes of request `n` live at REQUESTS + n * 16 KiB.
    const REQUESTS: u64 = 0x10_0000;
    const APIC_VECTOR: u8 = 0x51;
    const ALL_OK: u8 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
    const SECTOR: u64 = 512;

    /// A raw image and qemu-storage-daemon serving it.
    struct Disk {
        dir: ScratchDir,
        daemon: Option<StorageDaemon>,
    }

    impl Disk {
        fn start(label: &str, queues: u16) -> Disk {
            let dir = ScratchDir::new(label).unwrap();
            let image = std::fs::File::create(dir.join("disk.img")).unwrap();
            image.set_len(IMAGE_SIZE).unwrap();
            let mut disk = Disk { dir, daemon: None };
            disk.restart(queues);
            disk
        }

        fn restart(&mut self, queues: u16) {
            let daemon =
                StorageDaemon::start(&self.image(), &self.socket(), queues).expect("daemon");
            self.daemon = Some(daemon);
        }

        fn crash(&mut self) {
            self.daemon.take().unwrap().crash().unwrap();
        }

        fn image(&self) -> std::path::PathBuf {
            self.dir.join("disk.img")
        }

        fn socket(&self) -> std::path::PathBuf {
            self.dir.join("disk.sock")
        }

        fn read_image(&self, offset: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            std::fs::File::open(self.image())
                .unwrap()
                .read_exact_at(&mut buf, offset)
                .unwrap();
            buf
        }
    }

    /// A driver on a real KVM VM whose RAM is a memfd the backend can map.
    fn driver(device: VhostUserBlk) -> (TestDriver, GuestRam) {
        TestDriver::with_shared_memory(Box::new(device))
    }

    /// Writes request `n` (descriptors 3n..3n+2: header, one sector of data, status) and
    /// publishes it in the avail ring.
    fn submit(d: &TestDriver, q: &DriverQueue<'_>, n: u16, kind: u32, sector: u64, data: &[u8]) {
        let guest = d.guest();
        let base = REQUESTS + u64::from(n) * 0x4000;
        let (header, buffer, status) = (base, base + 0x1000, base + 0x2000);
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        guest.write_slice(&hdr, GuestAddress(header)).unwrap();
        guest.write_slice(data, GuestAddress(buffer)).unwrap();
        guest.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let data_flags = if kind == VIRTIO_BLK_T_IN {
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE
        } else {
            VRING_DESC_F_NEXT
        };
        let first = 3 * n;
        q.desc
            .store(first, desc(header, 16, VRING_DESC_F_NEXT, first + 1))
            .unwrap();
        q.desc
            .store(
                first + 1,
                desc(buffer, SECTOR as u32, data_flags, first + 2),
            )
            .unwrap();
        q.desc
            .store(first + 2, desc(status, 1, VRING_DESC_F_WRITE, 0))
            .unwrap();
        let idx = q.avail.idx().load();
        q.avail
            .ring()
            .ref_at(usize::from(idx) % 16)
            .unwrap()
            .store(first);
        q.avail.idx().store(idx.wrapping_add(1));
    }

    /// Waits for `count` used entries; returns request `n`'s status byte.
    fn complete(d: &TestDriver, q: &DriverQueue<'_>, count: u16, n: u16) -> u8 {
        assert!(
            d.wait_for(|| q.used.idx().load() == count),
            "the backend did not answer request {n}"
        );
        let status = REQUESTS + u64::from(n) * 0x4000 + 0x2000;
        d.guest().read_obj(GuestAddress(status)).unwrap()
    }

    fn start_queue(d: &TestDriver, q: &DriverQueue<'_>) {
        d.route_vector(1, APIC_VECTOR);
        assert!(d.negotiate(VERSION_1));
        d.setup_queue(0, 16, q.rings, 1);
        d.set_status(ALL_OK);
        assert_eq!(d.status(), ALL_OK, "DRIVER_OK accepted");
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_disk_size_comes_from_the_backend() {
        let disk = Disk::start("blk-config", 1);
        let blk = VhostUserBlk::new(disk.socket()).unwrap();
        assert_eq!(blk.device_type(), TYPE_BLOCK);
        let mut capacity = [0u8; 8];
        blk.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), IMAGE_SIZE / SECTOR);
        assert_eq!(blk.capacity(), IMAGE_SIZE / SECTOR);
        assert_eq!(blk.queue_max_sizes(), &[super::QUEUE_SIZE]);
        assert_eq!(
            blk.features() & !device::GUEST_FEATURES,
            0,
            "only features the transport handles reach the guest"
        );
    }

    #[test]
    fn queues_follow_the_backend() {
        let disk = Disk::start("blk-mq", 3);
        let blk = VhostUserBlk::new(disk.socket()).unwrap();
        assert_eq!(blk.queue_max_sizes().len(), 3);
        let mut num_queues = [0u8; 2];
        blk.read_config(34, &mut num_queues);
        assert_eq!(u16::from_le_bytes(num_queues), 3);
    }

    #[test]
    fn a_missing_socket_is_a_clear_error() {
        let dir = ScratchDir::new("blk-missing").unwrap();
        let socket = dir.join("nobody.sock");
        let err = VhostUserBlk::new(&socket).err().expect("no backend");
        let msg = err.to_string();
        assert!(
            matches!(err, BlockError::VhostUser(VhostUserError::Connect { .. })),
            "{msg}"
        );
        assert!(msg.contains(socket.to_str().unwrap()), "{msg}");
        assert!(msg.contains("is the backend running?"), "{msg}");
    }

    #[test]
    fn a_backend_that_accepts_and_never_answers_is_a_timeout_not_a_hang() {
        let dir = ScratchDir::new("blk-silent").unwrap();
        let socket = dir.join("silent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        // Accepts, then keeps the connection open without reading or answering.
        let silent = std::thread::spawn(move || listener.accept().map(|(stream, _)| stream));
        let started = Instant::now();
        let err = VhostUserBlk::new(&socket)
            .err()
            .expect("connected to a silent backend");
        assert!(err.is_unresponsive(), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(silent.join().unwrap());
    }

    #[test]
    fn guest_writes_reach_the_image_and_read_back() {
        let disk = Disk::start("blk-io", 1);
        let blk = VhostUserBlk::new(disk.socket()).unwrap();
        let metrics = blk.metrics();
        let (d, _ram) = driver(blk);
        let guest = d.guest();
        let q = DriverQueue::new(&guest, QUEUE_AT, 16);
        start_queue(&d, &q);
        assert_eq!(VhostUserMetrics::get(&metrics.activations), 1);

        let pattern: Vec<u8> = (0..SECTOR).map(|i| (i * 7 + 3) as u8).collect();
        submit(&d, &q, 0, VIRTIO_BLK_T_OUT, 2, &pattern);
        d.write(NOTIFY, 2, 0);
        assert_eq!(complete(&d, &q, 1, 0), 0, "VIRTIO_BLK_S_OK");
        assert_eq!(disk.read_image(2 * SECTOR, SECTOR as usize), pattern);
        assert!(
            d.vm.wait_lapic_irr(APIC_VECTOR),
            "the backend raised the queue's MSI through its irqfd"
        );

        submit(&d, &q, 1, VIRTIO_BLK_T_IN, 2, &[0; SECTOR as usize]);
        d.write(NOTIFY, 2, 0);
        assert_eq!(complete(&d, &q, 2, 1), 0);
        let mut back = vec![0u8; SECTOR as usize];
        guest
            .read_slice(&mut back, GuestAddress(REQUESTS + 0x4000 + 0x1000))
            .unwrap();
        assert_eq!(back, pattern);

        // Reset takes the rings back (GET_VRING_BASE answers); a new driver starts again
        // from index 0 on fresh rings.
        d.set_status(0);
        assert_eq!(d.status(), 0);
        let fresh = DriverQueue::new(&guest, QUEUE_AT + 0x4000, 16);
        start_queue(&d, &fresh);
        submit(&d, &fresh, 2, VIRTIO_BLK_T_OUT, 3, &[0x5a; SECTOR as usize]);
        d.write(NOTIFY, 2, 0);
        assert_eq!(complete(&d, &fresh, 1, 2), 0);
        assert_eq!(disk.read_image(3 * SECTOR, SECTOR as usize), [0x5a; 512]);
        assert_eq!(VhostUserMetrics::get(&metrics.activations), 2);
        assert_eq!(VhostUserMetrics::get(&metrics.backend_errors), 0);
    }

    #[test]
    fn io_goes_on_after_the_backend_restarts() {
        let mut disk = Disk::start("blk-restart", 1);
        let blk = VhostUserBlk::new(disk.socket()).unwrap();
        let metrics = blk.metrics();
        let (d, _ram) = driver(blk);
        let guest = d.guest();
        let q = DriverQueue::new(&guest, QUEUE_AT, 16);
        start_queue(&d, &q);
        submit(&d, &q, 0, VIRTIO_BLK_T_OUT, 0, &[0x11; SECTOR as usize]);
        d.write(NOTIFY, 2, 0);
        assert_eq!(complete(&d, &q, 1, 0), 0);

        disk.crash();
        wait_until("hang-up noticed", || {
            VhostUserMetrics::get(&metrics.disconnects) == 1
        });
        // The guest goes on submitting while nobody serves the disk.
        submit(&d, &q, 1, VIRTIO_BLK_T_OUT, 1, &[0x22; SECTOR as usize]);
        d.write(NOTIFY, 2, 0);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(q.used.idx().load(), 1, "no backend, no answer");

        disk.restart(1);
        assert_eq!(complete(&d, &q, 2, 1), 0, "answered by the new backend");
        // The new backend may answer (the guest's kick from the outage is still pending on
        // the eventfd it is handed) before the monitor thread has counted the reconnect.
        wait_until("reconnect counted", || {
            VhostUserMetrics::get(&metrics.reconnects) == 1
        });
        assert_eq!(disk.read_image(SECTOR, SECTOR as usize), vec![0x22; 512]);

        submit(&d, &q, 2, VIRTIO_BLK_T_OUT, 2, &[0x33; SECTOR as usize]);
        d.write(NOTIFY, 2, 0);
        assert_eq!(complete(&d, &q, 3, 2), 0);
        assert_eq!(disk.read_image(0, 3 * 512)[1024..], [0x33; 512]);
        assert_eq!(disk.read_image(0, 512), vec![0x11; 512]);
    }

    #[test]
    fn the_inflight_region_lives_as_long_as_the_driver_and_across_reconnects() {
        // Our backend offers INFLIGHT_SHMFD (qemu-storage-daemon does not).
        let dir = ScratchDir::new("blk-inflight").unwrap();
        let (image, socket) = (dir.join("disk.img"), dir.join("disk.sock"));
        std::fs::File::create(&image)
            .unwrap()
            .set_len(IMAGE_SIZE)
            .unwrap();
        let backend = VhostBlkBackend::start(&image, &socket, &[]).unwrap();
        let blk = VhostUserBlk::new(&socket).unwrap();
        let rings = blk.ring_control();
        let metrics = blk.metrics();
        let (d, _ram) = driver(blk);
        let guest = d.guest();
        assert_eq!(rings.inflight_region(), None, "no driver, no region");
        let q = DriverQueue::new(&guest, QUEUE_AT, 16);
        start_queue(&d, &q);
        let first = rings
            .inflight_region()
            .expect("the backend offers INFLIGHT_SHMFD and got a region at DRIVER_OK");

        backend.crash().unwrap();
        wait_until("hang-up noticed", || {
            VhostUserMetrics::get(&metrics.disconnects) == 1
        });
        let backend = VhostBlkBackend::start(&image, &socket, &[]).unwrap();
        wait_until("reconnected", || {
            VhostUserMetrics::get(&metrics.reconnects) == 1
        });
        assert_eq!(
            rings.inflight_region(),
            Some(first),
            "the new backend gets the region its predecessor recorded into"
        );
        submit(&d, &q, 0, VIRTIO_BLK_T_OUT, 0, &[0x44; SECTOR as usize]);
        d.write(NOTIFY, 2, 0);
        assert_eq!(complete(&d, &q, 1, 0), 0);

        d.set_status(0);
        assert_eq!(rings.inflight_region(), None, "reset drops the region");
        let fresh = DriverQueue::new(&guest, QUEUE_AT + 0x4000, 16);
        start_queue(&d, &fresh);
        let second = rings
            .inflight_region()
            .expect("a region for the new driver");
        assert_ne!(second, first, "a new driver starts on a clean region");
        drop(backend);
    }
}
