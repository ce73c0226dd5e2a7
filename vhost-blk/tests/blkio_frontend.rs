//! The backend against a real vhost-user-blk frontend (libblkio's virtio-blk-vhost-user driver)
//! over a real UNIX socket and a real image file.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use ferrovirt_tests::ScratchDir;
use ferrovirt_vhost_blk::request::RequestType;
use ferrovirt_vhost_blk::{BackendConfig, Metrics, Server};

const MIB: usize = 1 << 20;

/// A raw image of `size` bytes of `fill` in `dir`.
fn image(dir: &ScratchDir, size: usize, fill: u8) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::write(&path, vec![fill; size]).unwrap();
    path
}

/// A backend serving `connections` connections on a thread.
struct Backend {
    socket: PathBuf,
    metrics: Arc<Metrics>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    fn start(config: BackendConfig, socket: PathBuf, connections: usize) -> Self {
        let mut server = Server::bind(config, &socket).expect("bind backend");
        let metrics = server.metrics();
        let thread = std::thread::spawn(move || {
            for _ in 0..connections {
                server.serve_connection().expect("serve connection");
            }
        });
        Self {
            socket,
            metrics,
            thread: Some(thread),
        }
    }

    /// Waits for the backend to finish its connections (the frontend must be dropped first).
    fn join(mut self) {
        self.thread.take().unwrap().join().expect("backend thread");
    }
}

/// A connected and started blkio frontend with one shared buffer.
struct Frontend {
    queues: Vec<Blkioq>,
    buffer: MemoryRegion,
    blkio: Blkio,
}

impl Frontend {
    fn connect(socket: &Path, num_queues: i32, read_only: bool) -> blkio::Result<Self> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", socket.to_str().unwrap())?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", num_queues)?;
        let started = blkio.start()?;
        let buffer = blkio.alloc_mem_region(4 * MIB)?;
        blkio.map_mem_region(&buffer)?;
        // libblkio sends the region (VHOST_USER_ADD_MEM_REG) without waiting for the
        // backend to apply it, and a kick travels on another channel (the kick eventfd, seen
        // by another backend thread): a request sent at once can reach the queue worker
        // before the region is mapped and fail with EIO (seen about once in 100 runs under
        // load). Our VMM sends its memory table before it starts the rings, so only this
        // test frontend needs the pause.
        std::thread::sleep(std::time::Duration::from_millis(20));
        Ok(Self {
            queues: started.queues,
            buffer,
            blkio,
        })
    }

    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a private mapping of `len` bytes owned by `self.blkio` and lives
        // as long as `self`; tests touch it only while no request using it is in flight.
        unsafe { std::slice::from_raw_parts_mut(self.buffer.addr as *mut u8, self.buffer.len) }
    }

    fn ptr(&self, offset: usize) -> *mut u8 {
        (self.buffer.addr + offset) as *mut u8
    }
}

/// Waits for `n` completions on `q` and returns their `ret` values in user_data order.
fn wait_all(q: &mut Blkioq, n: usize) -> Vec<i32> {
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..n).map(|_| MaybeUninit::uninit()).collect();
    let mut results = vec![i32::MIN; n];
    let mut got = 0;
    while got < n {
        let done = q
            .do_io(&mut completions[..n - got], n - got, None, None)
            .expect("do_io");
        for c in &completions[..done] {
            // SAFETY: do_io initialised the first `done` completions.
            let c = unsafe { c.assume_init_ref() };
            results[c.user_data] = c.ret;
        }
        got += done;
    }
    results
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn batched_writes_read_back_and_land_in_the_image_file() {
    let scratch = ScratchDir::new("rw").unwrap();
    let image = image(&scratch, 8 * MIB, 0);
    let backend = Backend::start(BackendConfig::new(&image), scratch.join("blk.sock"), 1);
    let mut front = Frontend::connect(&backend.socket, 1, false).expect("frontend");
    assert_eq!(front.blkio.get_u64("capacity").unwrap(), 8 * MIB as u64);

    // Eight writes of 64 KiB queued before one do_io: the backend sees them in one kick.
    let chunk = 64 * 1024;
    let data = pattern(7, 8 * chunk);
    front.buf()[..data.len()].copy_from_slice(&data);
    let mut q = front.queues.remove(0);
    for i in 0..8 {
        let disk_offset = (MIB + 3 * i * chunk) as u64;
        q.write(
            disk_offset,
            front.ptr(i * chunk),
            chunk,
            i,
            ReqFlags::empty(),
        );
    }
    assert!(wait_all(&mut q, 8).iter().all(|&r| r == 0));
    q.flush(0, ReqFlags::empty());
    assert_eq!(wait_all(&mut q, 1), vec![0]);

    front.buf()[..data.len()].fill(0xEE);
    for i in 0..8 {
        let disk_offset = (MIB + 3 * i * chunk) as u64;
        q.read(
            disk_offset,
            front.ptr(i * chunk),
            chunk,
            i,
            ReqFlags::empty(),
        );
    }
    assert!(wait_all(&mut q, 8).iter().all(|&r| r == 0));
    assert_eq!(&front.buf()[..data.len()], &data[..]);

    drop(q);
    drop(front);
    let metrics = backend.metrics.snapshot();
    backend.join();
    assert_eq!(metrics.requests_of(RequestType::Write), 8);
    assert_eq!(metrics.requests_of(RequestType::Read), 8);
    assert_eq!(metrics.requests_of(RequestType::Flush), 1);
    assert_eq!(metrics.bytes_written, 8 * chunk as u64);
    assert_eq!(metrics.total_rejected(), 0);
    assert_eq!(metrics.io_ops_submitted, 17);
    // Each batch of 8 is submitted as 1, 2, 4 and the last 1 (see `io`), the flush alone:
    // 9 at most, where a submit per request would be 17.
    assert!(
        metrics.io_submits <= 9,
        "17 requests in 3 batches took {} submits",
        metrics.io_submits
    );

    let on_disk = std::fs::read(&image).unwrap();
    for i in 0..8 {
        let at = MIB + 3 * i * chunk;
        assert_eq!(&on_disk[at..at + chunk], &data[i * chunk..(i + 1) * chunk]);
        assert!(on_disk[at + chunk..at + 3 * chunk].iter().all(|&b| b == 0));
    }
    assert!(on_disk[..MIB].iter().all(|&b| b == 0));
}

#[test]
fn discard_and_write_zeroes_read_back_zeroes() {
    let scratch = ScratchDir::new("zero").unwrap();
    let image = image(&scratch, 4 * MIB, 0xAB);
    let backend = Backend::start(BackendConfig::new(&image), scratch.join("blk.sock"), 1);
    let mut front = Frontend::connect(&backend.socket, 1, false).expect("frontend");
    let mut q = front.queues.remove(0);

    q.discard(0, 64 * 1024, 0, ReqFlags::empty());
    q.write_zeroes(MIB as u64, 128 * 1024, 1, ReqFlags::empty());
    assert_eq!(wait_all(&mut q, 2), vec![0, 0]);

    q.read(0, front.ptr(0), 256 * 1024, 0, ReqFlags::empty());
    q.read(MIB as u64, front.ptr(MIB), 256 * 1024, 1, ReqFlags::empty());
    assert_eq!(wait_all(&mut q, 2), vec![0, 0]);
    let buf = front.buf();
    assert!(buf[..64 * 1024].iter().all(|&b| b == 0));
    assert!(buf[64 * 1024..256 * 1024].iter().all(|&b| b == 0xAB));
    assert!(buf[MIB..MIB + 128 * 1024].iter().all(|&b| b == 0));
    assert!(
        buf[MIB + 128 * 1024..MIB + 256 * 1024]
            .iter()
            .all(|&b| b == 0xAB)
    );

    drop(q);
    drop(front);
    backend.join();
    let on_disk = std::fs::read(&image).unwrap();
    assert_eq!(on_disk.len(), 4 * MIB, "discard keeps the image size");
    assert!(on_disk[..64 * 1024].iter().all(|&b| b == 0));
    assert!(on_disk[MIB..MIB + 128 * 1024].iter().all(|&b| b == 0));
    assert!(on_disk[2 * MIB..].iter().all(|&b| b == 0xAB));
}

#[test]
fn read_only_device_serves_reads_and_refuses_writes() {
    let scratch = ScratchDir::new("ro").unwrap();
    let image = image(&scratch, MIB, 0x5A);
    let mut config = BackendConfig::new(&image);
    config.read_only = true;
    let backend = Backend::start(config, scratch.join("blk.sock"), 2);

    // A frontend that wants to write is refused at start: the device offers VIRTIO_BLK_F_RO.
    let err = Frontend::connect(&backend.socket, 1, false)
        .err()
        .expect("a writable frontend must not start on a read-only device");
    assert!(err.message().contains("read-only"), "{}", err.message());

    let mut front = Frontend::connect(&backend.socket, 1, true).expect("read-only frontend");
    let mut q = front.queues.remove(0);
    q.read(0, front.ptr(0), 4096, 0, ReqFlags::empty());
    assert_eq!(wait_all(&mut q, 1), vec![0]);
    assert!(front.buf()[..4096].iter().all(|&b| b == 0x5A));
    front.buf()[..4096].fill(1);
    q.write(0, front.ptr(0), 4096, 0, ReqFlags::empty());
    assert_ne!(
        wait_all(&mut q, 1),
        vec![0],
        "write to a read-only disk succeeded"
    );

    drop(q);
    drop(front);
    backend.join();
    assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == 0x5A));
}

#[test]
fn two_queues_serve_concurrent_writers() {
    let scratch = ScratchDir::new("mq").unwrap();
    let image = image(&scratch, 8 * MIB, 0);
    let mut config = BackendConfig::new(&image);
    config.num_queues = 2;
    let backend = Backend::start(config, scratch.join("blk.sock"), 1);
    let mut front = Frontend::connect(&backend.socket, 2, false).expect("frontend");
    assert_eq!(front.queues.len(), 2);
    let chunk = 32 * 1024;
    let rounds = 32;
    let base = front.buffer.addr;
    let handles: Vec<_> = front
        .queues
        .drain(..)
        .enumerate()
        .map(|(qi, mut q)| {
            std::thread::spawn(move || {
                let data = pattern(qi as u8 + 1, chunk);
                let buf = base + qi * MIB;
                // SAFETY: each thread uses its own MiB of the mapped 4 MiB region.
                unsafe { std::slice::from_raw_parts_mut(buf as *mut u8, chunk) }
                    .copy_from_slice(&data);
                for round in 0..rounds {
                    let offset = ((qi * rounds + round) * chunk) as u64;
                    q.write(offset, buf as *const u8, chunk, 0, ReqFlags::empty());
                    assert_eq!(wait_all(&mut q, 1), vec![0]);
                }
                q
            })
        })
        .collect();
    let queues: Vec<Blkioq> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    drop(queues);
    drop(front);
    backend.join();
    let on_disk = std::fs::read(&image).unwrap();
    for qi in 0..2 {
        let data = pattern(qi as u8 + 1, chunk);
        for round in 0..rounds {
            let at = (qi * rounds + round) * chunk;
            assert_eq!(
                &on_disk[at..at + chunk],
                &data[..],
                "queue {qi} round {round}"
            );
        }
    }
}

#[test]
fn a_reconnecting_frontend_sees_what_the_previous_connection_wrote() {
    let scratch = ScratchDir::new("reconnect").unwrap();
    let image = image(&scratch, MIB, 0);
    let backend = Backend::start(BackendConfig::new(&image), scratch.join("blk.sock"), 2);
    let data = pattern(42, 8192);
    {
        let mut front = Frontend::connect(&backend.socket, 1, false).expect("first frontend");
        let mut q = front.queues.remove(0);
        front.buf()[..8192].copy_from_slice(&data);
        q.write(8192, front.ptr(0), 8192, 0, ReqFlags::empty());
        assert_eq!(wait_all(&mut q, 1), vec![0]);
    }
    let mut front = Frontend::connect(&backend.socket, 1, false).expect("second frontend");
    let mut q = front.queues.remove(0);
    q.read(8192, front.ptr(0), 8192, 0, ReqFlags::empty());
    assert_eq!(wait_all(&mut q, 1), vec![0]);
    assert_eq!(&front.buf()[..8192], &data[..]);
    drop(q);
    drop(front);
    backend.join();
}

/// The backend binary on `socket`, killed on drop.
struct BackendProcess(std::process::Child);

impl BackendProcess {
    fn spawn(image: &Path, socket: &Path) -> Self {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_ferrovirt-vhost-blk"))
            .args([
                "--image",
                image.to_str().unwrap(),
                "--socket",
                socket.to_str().unwrap(),
            ])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn ferrovirt-vhost-blk");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // Not a probe connection: that would be a client the backend serves first.
        while !ferrovirt_tests::process::unix_socket_listening(socket) {
            assert!(
                std::time::Instant::now() < deadline,
                "backend never listened on {socket:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Self(child)
    }

    fn kill(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_killed_backend_restarts_on_its_stale_socket_and_serves_what_was_written() {
    let scratch = ScratchDir::new("kill").unwrap();
    let image = image(&scratch, 2 * MIB, 0);
    let socket = scratch.join("blk.sock");
    let data = pattern(99, 64 * 1024);

    let backend = BackendProcess::spawn(&image, &socket);
    let mut front = Frontend::connect(&socket, 1, false).expect("frontend");
    let mut q = front.queues.remove(0);
    front.buf()[..data.len()].copy_from_slice(&data);
    q.write(MIB as u64, front.ptr(0), data.len(), 0, ReqFlags::empty());
    assert_eq!(wait_all(&mut q, 1), vec![0]);
    // Killed with the frontend still connected: the socket file stays behind.
    backend.kill();
    drop(q);
    drop(front);
    assert!(socket.exists());

    let _backend = BackendProcess::spawn(&image, &socket);
    let mut front = Frontend::connect(&socket, 1, false).expect("frontend after restart");
    let mut q = front.queues.remove(0);
    q.read(MIB as u64, front.ptr(0), data.len(), 0, ReqFlags::empty());
    assert_eq!(wait_all(&mut q, 1), vec![0]);
    assert_eq!(&front.buf()[..data.len()], &data[..]);
}

#[test]
fn direct_io_writes_reach_the_image() {
    let scratch = ScratchDir::new("direct").unwrap();
    let image = image(&scratch, 2 * MIB, 0);
    let mut config = BackendConfig::new(&image);
    config.direct = true;
    let backend = Backend::start(config, scratch.join("blk.sock"), 1);
    let mut front = Frontend::connect(&backend.socket, 1, false).expect("frontend");
    let mut q = front.queues.remove(0);
    let data = pattern(3, 128 * 1024);
    front.buf()[..data.len()].copy_from_slice(&data);
    q.write(64 * 1024, front.ptr(0), data.len(), 0, ReqFlags::empty());
    assert_eq!(wait_all(&mut q, 1), vec![0]);
    front.buf()[..data.len()].fill(0);
    q.read(64 * 1024, front.ptr(0), data.len(), 0, ReqFlags::empty());
    assert_eq!(wait_all(&mut q, 1), vec![0]);
    assert_eq!(&front.buf()[..data.len()], &data[..]);
    drop(q);
    drop(front);
    backend.join();
    assert_eq!(
        &std::fs::read(&image).unwrap()[64 * 1024..192 * 1024],
        &data[..]
    );
}
