//! A VMM-like frontend (memfd guest memory, a split ring written by the driver side) kills the
//! backend while a large batch of writes is in flight, restarts it, reconnects from the used
//! index as the runtime's frontend does, and checks every request completes exactly once, with
//! status OK, and every byte is in the image: once without an inflight region (the backend
//! answers in available order), once with one, where the writes are held in flight by a
//! frozen file system so the crash deterministically catches them.

use ferrovirt_tests::ScratchDir;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
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
        Self::spawn_logging(image, socket, None)
    }

    /// Like `spawn`, with the backend's log going to `log`.
    fn spawn_logging(image: &Path, socket: &Path, log: Option<&Path>) -> Self {
        let stderr = match log {
            Some(path) => Stdio::from(File::create(path).unwrap()),
            None => Stdio::null(),
        };
        let child = Command::new(env!("CARGO_BIN_EXE_ferrovirt-vhost-blk"))
            .args([
                "--image",
                image.to_str().unwrap(),
                "--socket",
                socket.to_str().unwrap(),
            ])
            .stderr(stderr)
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
        self.connect_tracking(socket, queue, base, None)
    }

    /// `connect`, sharing `inflight` (or creating it on the first connect, as the runtime does)
    /// when given.
    fn connect_tracking(
        &self,
        socket: &Path,
        queue: &MockSplitQueue<GuestMemoryMmap<()>>,
        base: u16,
        inflight: Option<&mut Option<(VhostUserInflight, File)>>,
    ) -> Frontend {
        let mut f = Frontend::connect(socket, 1).unwrap();
        f.set_owner().unwrap();
        let offered = f.get_features().unwrap();
        assert_ne!(
            offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        let protocol = f.get_protocol_features().unwrap();
        let mut wanted = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ;
        if inflight.is_some() {
            assert!(protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
            wanted |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        f.set_protocol_features(protocol & wanted).unwrap();
        f.set_features(1 << VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .unwrap();
        if let Some(inflight) = inflight {
            let (info, file) = inflight.get_or_insert_with(|| {
                f.get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QUEUE_SIZE))
                    .unwrap()
            });
            f.set_inflight_fd(info, file.as_raw_fd()).unwrap();
        }
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

/// Request `i`: a write of `pattern(i)` at byte i * CHUNK, in descriptors 3i..3i+2.
fn write_request(guest: &Guest, i: u16) -> [RawDescriptor; 3] {
    let header = GuestAddress(HEADERS + u64::from(i) * 16);
    let memory = &guest.memory;
    memory.write_obj(VIRTIO_BLK_T_OUT.to_le(), header).unwrap();
    memory.write_obj(0u32, header.unchecked_add(4)).unwrap();
    let sector = (u64::from(i) * CHUNK as u64) >> 9;
    memory
        .write_obj(sector.to_le(), header.unchecked_add(8))
        .unwrap();
    let data = GuestAddress(DATA + u64::from(i) * CHUNK as u64);
    memory.write_slice(&pattern(i), data).unwrap();
    let status = GuestAddress(STATUSES + u64::from(i));
    memory.write_obj(0xFFu8, status).unwrap();
    let d = 3 * i;
    let next = VRING_DESC_F_NEXT as u16;
    [
        RawDescriptor::from(Descriptor::new(header.0, 16, next, d + 1)),
        RawDescriptor::from(Descriptor::new(data.0, CHUNK as u32, next, d + 2)),
        RawDescriptor::from(Descriptor::new(status.0, 1, VRING_DESC_F_WRITE as u16, 0)),
    ]
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
    let descriptors: Vec<RawDescriptor> = (0..REQUESTS)
        .flat_map(|i| write_request(&guest, i))
        .collect();
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

/// Checks requests 0..count completed once each, with status OK, and their data is in `image`.
fn assert_all_answered_once(
    guest: &Guest,
    queue: &MockSplitQueue<GuestMemoryMmap<()>>,
    count: u16,
    image: &Path,
) {
    assert_eq!(guest.used_idx(queue), count, "no request completed twice");
    let mut heads: Vec<u32> = (0..count)
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
        (0..count).map(|i| 3 * u32::from(i)).collect::<Vec<_>>()
    );
    for i in 0..count {
        let status: u8 = guest
            .memory
            .read_obj(GuestAddress(STATUSES + u64::from(i)))
            .unwrap();
        assert_eq!(status, 0, "request {i}");
    }
    let on_disk = std::fs::read(image).unwrap();
    for i in 0..count {
        let at = usize::from(i) * CHUNK;
        assert!(
            on_disk[at..at + CHUNK] == pattern(i)[..],
            "request {i} data"
        );
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An ext4 file system on a loop device over a file in a scratch directory, mounted there;
/// thawed, unmounted and detached on drop.
struct LoopFs {
    mount: PathBuf,
    device: String,
}

impl LoopFs {
    fn new(scratch: &ScratchDir) -> Self {
        let backing = scratch.join("fs.img");
        File::create(&backing).unwrap().set_len(64 << 20).unwrap();
        run("mkfs.ext4", &["-q", backing.to_str().unwrap()]);
        let device = run("losetup", &["--find", "--show", backing.to_str().unwrap()]);
        let mount = scratch.join("mnt");
        std::fs::create_dir(&mount).unwrap();
        let fs = Self { mount, device };
        run("mount", &[&fs.device, fs.mount.to_str().unwrap()]);
        fs
    }

    /// Blocks every write to the file system until the guard drops (fsfreeze).
    fn freeze(&self) -> Frozen<'_> {
        run("fsfreeze", &["--freeze", self.mount.to_str().unwrap()]);
        Frozen(self)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let mount = self.mount.to_str().unwrap();
        let _ = Command::new("fsfreeze")
            .args(["--unfreeze", mount])
            .output();
        // io_uring releases a dead backend's registered image asynchronously: retry a busy
        // unmount for a while, then detach it lazily so nothing is left mounted.
        for _ in 0..50 {
            match Command::new("umount").arg(mount).output() {
                Ok(out) if out.status.success() => break,
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let _ = Command::new("umount").args(["--lazy", mount]).output();
        let _ = Command::new("losetup").args(["-d", &self.device]).output();
    }
}

struct Frozen<'a>(&'a LoopFs);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .args(["--unfreeze", self.0.mount.to_str().unwrap()])
            .output();
    }
}

/// Whether descriptor `head` of queue 0 is marked in flight in the region.
fn marked_in_flight(region: &File, head: u16) -> bool {
    let mut b = [0u8];
    region
        .read_exact_at(&mut b, 16 + 16 * u64::from(head))
        .unwrap();
    b[0] == 1
}

#[test]
fn writes_in_flight_at_a_crash_are_resubmitted_from_the_inflight_region() {
    const FIRST: u16 = 8;
    const TOTAL: u16 = 16;
    let scratch = ScratchDir::new("inflight").unwrap();
    let fs = LoopFs::new(&scratch);
    let image = fs.mount.join("disk.img");
    std::fs::write(&image, vec![0u8; IMAGE_SIZE]).unwrap();
    let socket = scratch.join("blk.sock");
    let log = scratch.join("second-backend.log");

    let guest = Guest::new();
    let queue = MockSplitQueue::new(&guest.memory, QUEUE_SIZE);
    let mut inflight = None;
    let mut backend = BackendProcess::spawn(&image, &socket);
    let frontend = guest.connect_tracking(&socket, &queue, 0, Some(&mut inflight));
    let first: Vec<RawDescriptor> = (0..FIRST).flat_map(|i| write_request(&guest, i)).collect();
    queue.add_desc_chains(&first, 0).unwrap();
    guest.kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while guest.used_idx(&queue) < FIRST {
        assert!(Instant::now() < deadline, "the first batch never completed");
        std::thread::sleep(Duration::from_millis(5));
    }

    // The second batch cannot reach the image while the file system is frozen.
    let frozen = fs.freeze();
    let second: Vec<RawDescriptor> = (FIRST..TOTAL)
        .flat_map(|i| write_request(&guest, i))
        .collect();
    queue.add_desc_chains(&second, 3 * FIRST).unwrap();
    guest.kick.write(1).unwrap();
    let region = inflight.as_ref().unwrap().1.try_clone().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(FIRST..TOTAL).all(|i| marked_in_flight(&region, 3 * i)) {
        assert!(
            Instant::now() < deadline,
            "the backend never took the second batch"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // SIGKILL; the process cannot finish exiting before its blocked writes return, so thaw
    // before reaping it.
    backend.0.kill().unwrap();
    drop(frozen);
    backend.0.wait().unwrap();
    drop(frontend);
    assert_eq!(
        guest.used_idx(&queue),
        FIRST,
        "a write was answered before the crash"
    );

    let _backend = BackendProcess::spawn_logging(&image, &socket, Some(&log));
    // Rewound to the used index as the runtime does; no kick from the guest: the backend must
    // find the work on its own.
    let _frontend = guest.connect_tracking(&socket, &queue, FIRST, Some(&mut inflight));
    let deadline = Instant::now() + Duration::from_secs(20);
    while guest.used_idx(&queue) < TOTAL {
        assert!(
            Instant::now() < deadline,
            "stuck at {} of {TOTAL}",
            guest.used_idx(&queue)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_all_answered_once(&guest, &queue, TOTAL, &image);
    let logged = strip_colours(&std::fs::read_to_string(&log).unwrap());
    assert!(
        logged.contains("resubmitting") && logged.contains("requests=8"),
        "{logged}"
    );
    for i in 0..TOTAL {
        assert!(
            !marked_in_flight(&region, 3 * i),
            "request {i} still marked"
        );
    }
}

/// The log without ANSI colour sequences (ESC [ ... m).
fn strip_colours(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut in_escape = false;
    for c in log.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (false, c) => out.push(c),
            (true, 'm') => in_escape = false,
            (true, _) => {}
        }
    }
    out
}
