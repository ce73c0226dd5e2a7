//! Guest → VMM → backend → file: the test guest's virtio-blk driver, ferrovirt-vmm's
//! vhost-user-blk frontend and ferrovirt-vhost-blk on io_uring, checked byte for byte in
//! the image file on the host.

use std::path::PathBuf;
use std::time::Duration;

use ferrovirt_tests::blk_pattern::{SECTOR, first_mismatch, sector_bytes};
use ferrovirt_tests::{ScratchDir, VhostBlkBackend, VmmProcess, testguest};

const TIMEOUT: Duration = Duration::from_secs(120);
const IMAGE_MIB: u64 = 64;

struct Disk {
    _dir: ScratchDir,
    image: PathBuf,
    socket: PathBuf,
}

fn disk(name: &str) -> Disk {
    let dir = ScratchDir::new(name).unwrap();
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(IMAGE_MIB << 20)
        .unwrap();
    let socket = dir.join("disk.sock");
    Disk {
        _dir: dir,
        image,
        socket,
    }
}

/// Boots the test guest with `cmdline` and one disk on `socket`; returns (status, serial).
fn boot_with_disk(name: &str, socket: &std::path::Path, cmdline: &str) -> (Option<i32>, String) {
    let guest = testguest();
    let disk = format!("socket={}", socket.display());
    let mut vmm = VmmProcess::spawn(
        name,
        [
            "--kernel",
            guest.to_str().unwrap(),
            "--memory",
            "128",
            "--cmdline",
            cmdline,
            "--disk",
            &disk,
        ],
    )
    .unwrap();
    let status = vmm.wait_timeout(TIMEOUT).unwrap();
    let out = format!(
        "{}\n--- stderr ---\n{}",
        vmm.serial_output(),
        vmm.stderr_output()
    );
    (status.code(), out)
}

#[test]
fn guest_writes_land_in_the_image_file_through_vmm_and_backend() {
    let d = disk("blk-rw");
    let backend = VhostBlkBackend::start(&d.image, &d.socket, &["--serial", "fvdisk0"]).unwrap();
    let (code, out) = boot_with_disk(
        "blk-rw",
        backend.socket(),
        "scenario=blk blk_seed=7 blk_sectors=4096 blk_req=16 blk_depth=16",
    );
    assert_eq!(code, Some(0), "{out}\n{}", backend.stderr());
    assert!(
        out.contains(&format!("capacity={}", (IMAGE_MIB << 20) / 512)),
        "{out}"
    );
    assert!(out.contains("serial=fvdisk0"), "{out}");
    assert!(
        out.contains("wrote=4096 read=4096 verified=4096 flushed=1"),
        "{out}"
    );
    drop(backend);
    let image = std::fs::read(&d.image).unwrap();
    assert_eq!(first_mismatch(&image, 7, 0..4096), None, "pattern on disk");
    assert!(
        image[4096 * SECTOR..].iter().all(|&b| b == 0),
        "nothing written past the range"
    );
}

#[test]
fn two_queues_carry_io_at_once() {
    let d = disk("blk-mq");
    let backend = VhostBlkBackend::start(&d.image, &d.socket, &["--num-queues", "2"]).unwrap();
    let (code, out) = boot_with_disk("blk-mq", backend.socket(), "scenario=blk-mq blk_seed=3");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("blk-mq queue=0 sectors=0..1024"), "{out}");
    assert!(out.contains("blk-mq queue=1 sectors=1024..2048"), "{out}");
    drop(backend);
    let image = std::fs::read(&d.image).unwrap();
    assert_eq!(first_mismatch(&image, 3, 0..2048), None);
}

#[test]
fn discard_and_write_zeroes_leave_zeroes_on_disk() {
    let d = disk("blk-discard");
    let backend = VhostBlkBackend::start(&d.image, &d.socket, &[]).unwrap();
    let (code, out) = boot_with_disk(
        "blk-discard",
        backend.socket(),
        "scenario=blk-discard blk_seed=5",
    );
    assert_eq!(code, Some(0), "{out}");
    drop(backend);
    let image = std::fs::read(&d.image).unwrap();
    // The guest discards sectors 512..1024 and zeroes 1024..1536 of 0..2048.
    assert!(image[512 * SECTOR..1536 * SECTOR].iter().all(|&b| b == 0));
    assert_eq!(first_mismatch(&image, 5, 0..512), None);
    assert_eq!(first_mismatch(&image, 5, 1536..2048), None);
}

#[test]
fn a_read_only_disk_refuses_the_guest_writes() {
    let d = disk("blk-ro");
    let original = sector_bytes(9, 0);
    std::fs::write(&d.image, {
        let mut v = vec![0u8; (IMAGE_MIB << 20) as usize];
        v[..SECTOR].copy_from_slice(&original);
        v
    })
    .unwrap();
    let backend = VhostBlkBackend::start(&d.image, &d.socket, &["--read-only"]).unwrap();
    let (code, out) = boot_with_disk("blk-ro", backend.socket(), "scenario=blk-ro");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("blk-ro write status=IOERR"), "{out}");
    drop(backend);
    assert_eq!(&std::fs::read(&d.image).unwrap()[..SECTOR], &original[..]);
}

#[test]
fn data_written_survives_a_backend_crash_and_restart() {
    let d = disk("blk-restart");
    let backend = VhostBlkBackend::start(&d.image, &d.socket, &[]).unwrap();
    let (code, out) = boot_with_disk(
        "blk-write",
        backend.socket(),
        "scenario=blk blk_seed=11 blk_mode=write",
    );
    assert_eq!(code, Some(0), "{out}");
    backend.crash().unwrap();
    // A new backend on the same (now stale) socket path serves a new VM the same data.
    let backend = VhostBlkBackend::start(&d.image, &d.socket, &[]).unwrap();
    let (code, out) = boot_with_disk(
        "blk-verify",
        backend.socket(),
        "scenario=blk blk_seed=11 blk_mode=verify",
    );
    assert_eq!(code, Some(0), "{out}\n{}", backend.stderr());
    assert!(out.contains("verified=2048"), "{out}");
}

#[test]
fn a_backend_killed_mid_workload_is_replaced_and_the_guest_io_goes_on() {
    let dir = ScratchDir::new("blk-crash").unwrap();
    let image = dir.join("disk.img");
    const SECTORS: u64 = 1 << 20; // 512 MiB: about a second of guest writes here
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SECTORS * SECTOR as u64)
        .unwrap();
    let socket = dir.join("disk.sock");
    let backend = VhostBlkBackend::start(&image, &socket, &[]).unwrap();
    let guest = testguest();
    let disk = format!("socket={}", socket.display());
    let cmdline = format!("scenario=blk blk_seed=21 blk_sectors={SECTORS} blk_req=64 blk_depth=8");
    let mut vmm = VmmProcess::spawn(
        "blk-crash",
        [
            "--kernel",
            guest.to_str().unwrap(),
            "--memory",
            "256",
            "--cmdline",
            &cmdline,
            "--disk",
            &disk,
        ],
    )
    .unwrap();
    vmm.wait_for_output("testguest: blk capacity=", TIMEOUT)
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    backend.crash().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let backend = VhostBlkBackend::start(&image, &socket, &[]).unwrap();
    let status = vmm.wait_timeout(TIMEOUT).unwrap();
    let (out, err) = (vmm.serial_output(), vmm.stderr_output());
    assert!(
        err.contains("hung up; reconnecting"),
        "the backend must have died under the running workload:\n{err}"
    );
    assert_eq!(status.code(), Some(0), "{out}\n{err}\n{}", backend.stderr());
    assert!(
        out.contains(&format!(
            "wrote={SECTORS} read={SECTORS} verified={SECTORS}"
        )),
        "{out}"
    );
    drop(backend);
    let on_disk = std::fs::read(&image).unwrap();
    assert_eq!(
        first_mismatch(&on_disk, 21, 0..SECTORS),
        None,
        "every acknowledged write is on disk"
    );
}
