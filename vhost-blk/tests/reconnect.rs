//! A VMM-like frontend (memfd guest memory, a split ring written by the driver side) kills the
//! backend while a large batch of writes is in flight, restarts it, reconnects from the used
//! index as the runtime's frontend does, and checks every request completes exactly once, with
//! status OK, and every byte is in the image.

use ferrovirt_tests::ScratchDir;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 32 << 20;
const QUEUE_SIZE: u16 = 256;
const REQUESTS: u16 = 80; // three descriptors each, within QUEUE_SIZE
const CHUNK: usize = 256 * 1024;
const HEADERS: u64 = 0x10_0000;
const STATUSES: u64 = 0x20_0000;
const DATA: u64 = 0x40_0000;
const IMAGE_SIZE: usize = 32 << 20;

struct BackendProcess(Child);

impl BackendProcess {
    fn spawn(image: &Path, socket: &Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_ferrovirt-vhost-blk"))
            .args([
                "--image",
                image.to_str().unwrap(),
                "--socket",
                socket.to_str().unwrap(),
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Not a probe connection: that would be a client the backend serves first.
        while !ferrovirt_tests::process::unix_socket_listening(socket) {
            assert!(Instant::now() < deadline, "backend never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self(child)
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Guest {
    memory: GuestMemoryMmap<()>,
    memfd: File,
    kick: EventFd,
    call: EventFd,
}

impl Guest {
    fn new() -> Self {
        // SAFETY: memfd_create with a NUL-terminated name; the returned fd is checked and then
        // owned by the File.
        let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh, owned file descriptor.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(MEM_SIZE as u64).unwrap();
        let memory = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(memfd.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        Self {
            memory,
            memfd,
            kick: EventFd::new(0).unwrap(),
            call: EventFd::new(0).unwrap(),
        }
    }

    fn host(&self, addr: GuestAddress) -> u64 {
        self.memory.get_host_address(addr).unwrap() as u64
    }

    fn used_idx(&self, queue: &MockSplitQueue<GuestMemoryMmap<()>>) -> u16 {
        self.memory
            .read_obj::<u16>(queue.used_addr().unchecked_add(2))
            .unwrap()
    }

    /// What the runtime's frontend does on (re)connect, starting the ring at `base`.
    fn connect(
        &self,
        socket: &Path,
        queue: &MockSplitQueue<GuestMemoryMmap<()>>,
        base: u16,
    ) -> Frontend {
        let mut f = Frontend::connect(socket, 1).unwrap();
        f.set_owner().unwrap();
        let offered = f.get_features().unwrap();
        assert_ne!(
            offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        let protocol = f.get_protocol_features().unwrap();
        f.set_protocol_features(
            protocol & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ),
        )
        .unwrap();
        f.set_features(1 << VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .unwrap();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: self.host(GuestAddress(0)),
            mmap_offset: 0,
            mmap_handle: self.memfd.as_raw_fd(),
        };
        f.set_mem_table(&[region]).unwrap();
        f.set_vring_num(0, QUEUE_SIZE).unwrap();
        f.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: self.host(queue.desc_table_addr()),
                used_ring_addr: self.host(queue.used_addr()),
                avail_ring_addr: self.host(queue.avail_addr()),
                log_addr: None,
            },
        )
        .unwrap();
        f.set_vring_base(0, base).unwrap();
        f.set_vring_call(0, &self.call).unwrap();
        f.set_vring_kick(0, &self.kick).unwrap();
        f.set_vring_enable(0, true).unwrap();
        f
    }
}

fn pattern(i: u16) -> Vec<u8> {
    (0..CHUNK)
        .map(|b| (b as u8) ^ (i as u8).wrapping_mul(37))
        .collect()
}

#[test]
fn writes_in_flight_when_the_backend_is_killed_complete_exactly_once_after_restart() {
    let scratch = ScratchDir::new("reconnect").unwrap();
    let image = scratch.join("disk.img");
    std::fs::write(&image, vec![0u8; IMAGE_SIZE]).unwrap();
    let socket = scratch.join("blk.sock");

    let guest = Guest::new();
    let queue = MockSplitQueue::new(&guest.memory, QUEUE_SIZE);
    let mut descriptors = Vec::new();
    for i in 0..REQUESTS {
        let header = GuestAddress(HEADERS + u64::from(i) * 16);
        guest
            .memory
            .write_obj(VIRTIO_BLK_T_OUT.to_le(), header)
            .unwrap();
        guest
            .memory
            .write_obj(0u32, header.unchecked_add(4))
            .unwrap();
        let sector = (u64::from(i) * CHUNK as u64) >> 9;
        guest
            .memory
            .write_obj(sector.to_le(), header.unchecked_add(8))
            .unwrap();
        let data = GuestAddress(DATA + u64::from(i) * CHUNK as u64);
        guest.memory.write_slice(&pattern(i), data).unwrap();
        let status = GuestAddress(STATUSES + u64::from(i));
        guest.memory.write_obj(0xFFu8, status).unwrap();
        let d = 3 * i;
        let next = VRING_DESC_F_NEXT as u16;
        descriptors.push(RawDescriptor::from(Descriptor::new(
            header.0,
            16,
            next,
            d + 1,
        )));
        descriptors.push(RawDescriptor::from(Descriptor::new(
            data.0,
            CHUNK as u32,
            next,
            d + 2,
        )));
        descriptors.push(RawDescriptor::from(Descriptor::new(
            status.0,
            1,
            VRING_DESC_F_WRITE as u16,
            0,
        )));
    }
    queue.add_desc_chains(&descriptors, 0).unwrap();

    let backend = BackendProcess::spawn(&image, &socket);
    let frontend = guest.connect(&socket, &queue, 0);
    guest.kick.write(1).unwrap();
    // Kill as soon as the first completions show: the rest are queued or in flight.
    let deadline = Instant::now() + Duration::from_secs(10);
    while guest.used_idx(&queue) == 0 {
        assert!(Instant::now() < deadline, "no request completed");
        std::hint::spin_loop();
    }
    drop(backend);
    drop(frontend);
    let used_at_crash = guest.used_idx(&queue);

    let _backend = BackendProcess::spawn(&image, &socket);
    let _frontend = guest.connect(&socket, &queue, used_at_crash);
    guest.kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while guest.used_idx(&queue) < REQUESTS {
        assert!(
            Instant::now() < deadline,
            "stuck at {} of {REQUESTS}",
            guest.used_idx(&queue)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        guest.used_idx(&queue),
        REQUESTS,
        "no request completed twice"
    );

    let mut heads: Vec<u32> = (0..REQUESTS)
        .map(|i| {
            queue
                .used()
                .ring()
                .ref_at(usize::from(i))
                .unwrap()
                .load()
                .id()
        })
        .collect();
    heads.sort_unstable();
    assert_eq!(
        heads,
        (0..REQUESTS).map(|i| 3 * u32::from(i)).collect::<Vec<_>>()
    );
    for i in 0..REQUESTS {
        let status: u8 = guest
            .memory
            .read_obj(GuestAddress(STATUSES + u64::from(i)))
            .unwrap();
        assert_eq!(status, 0, "request {i}");
    }
    let on_disk = std::fs::read(&image).unwrap();
    for i in 0..REQUESTS {
        let at = usize::from(i) * CHUNK;
        assert!(
            on_disk[at..at + CHUNK] == pattern(i)[..],
            "request {i} data"
        );
    }
    eprintln!("killed with {used_at_crash} of {REQUESTS} requests answered");
}
