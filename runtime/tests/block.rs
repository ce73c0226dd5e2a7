//! vhost-user-blk disks: the VMM connects to a real backend (qemu-storage-daemon), the
//! disk shows up on the guest's PCI bus, the API reports its counters, and bad disk input
//! ends the VMM with a clear message.

use std::path::PathBuf;

use common::{TIMEOUT, boot_ticker_through_the_api, json, wait_for_counter};
use ferrovirt_tests::{ScratchDir, StorageDaemon, VmmProcess, testguest};

mod common;

const IMAGE_SIZE: u64 = 4 << 20;

/// A raw image in a scratch directory and qemu-storage-daemon serving it.
struct Disk {
    daemon: Option<StorageDaemon>,
    image: PathBuf,
    socket: PathBuf,
    _dir: ScratchDir,
}

fn disk(label: &str) -> Disk {
    let dir = ScratchDir::new(label).unwrap();
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(IMAGE_SIZE)
        .unwrap();
    let socket = dir.join("disk.sock");
    let daemon = StorageDaemon::start(&image, &socket, 1).expect("qemu-storage-daemon");
    Disk {
        daemon: Some(daemon),
        image,
        socket,
        _dir: dir,
    }
}

#[test]
fn a_disk_flag_puts_a_virtio_blk_function_on_the_guest_pci_bus() {
    let a = disk("blk-pci-a");
    let b = disk("blk-pci-b");
    let args = [
        "--kernel".to_string(),
        testguest().display().to_string(),
        "--cmdline".into(),
        "scenario=pci".into(),
        "--memory".into(),
        "64".into(),
        "--disk".into(),
        format!("socket={}", a.socket.display()),
        "--disk".into(),
        format!("socket={}", b.socket.display()),
    ];
    let mut vmm = VmmProcess::spawn("blk-pci", &args).unwrap();
    let status = vmm.wait_timeout(TIMEOUT).unwrap();
    let (out, err) = (vmm.serial_output(), vmm.stderr_output());
    assert_eq!(status.code(), Some(0), "serial:\n{out}\nstderr:\n{err}");
    assert_eq!(out.matches("1af4:1042").count(), 2, "{out}");
    assert!(out.contains("pci devices=3"), "{out}");
}

#[test]
fn disks_from_the_api_report_their_counters() {
    let d = disk("blk-api");
    let mut vmm = boot_ticker_through_the_api(
        "blk-api",
        "disks",
        serde_json::json!([{"socket": d.socket}]),
    );
    let (_, body) = vmm.api("GET", "/api/v1/vm.info", None).unwrap();
    assert_eq!(
        json(&body)["config"]["disks"][0]["socket"],
        d.socket.to_str().unwrap()
    );
    let (status, body) = vmm.api("GET", "/api/v1/vm.counters", None).unwrap();
    assert_eq!(status, 200, "{body}");
    let disk0 = &json(&body)["disk0"];
    for counter in ["activations", "disconnects", "reconnects", "backend_errors"] {
        assert_eq!(disk0[counter], 0, "{counter} in {body}");
    }
    assert_eq!(vmm.api("PUT", "/api/v1/vmm.shutdown", None).unwrap().0, 204);
    vmm.wait_timeout(TIMEOUT).unwrap();
}

#[test]
fn the_vmm_survives_a_backend_crash_and_reconnects_to_its_successor() {
    let mut d = disk("blk-crash");
    let mut vmm = VmmProcess::builder("blk-crash")
        .unwrap()
        .with_api_socket()
        .args([
            "--kernel".to_string(),
            testguest().display().to_string(),
            "--cmdline".into(),
            "scenario=ticker".into(),
            "--memory".into(),
            "64".into(),
            "--disk".into(),
            format!("socket={}", d.socket.display()),
        ])
        .spawn()
        .unwrap();
    vmm.wait_for_api(TIMEOUT).unwrap();

    d.daemon.take().unwrap().crash().unwrap();
    wait_for_counter(&vmm, "disk0", "disconnects", 1);
    let (status, _) = vmm.api("GET", "/api/v1/vm.info", None).unwrap();
    assert_eq!(status, 200, "the VM runs on without its backend");

    d.daemon = Some(StorageDaemon::start(&d.image, &d.socket, 1).unwrap());
    wait_for_counter(&vmm, "disk0", "reconnects", 1);
    assert_eq!(vmm.api("PUT", "/api/v1/vmm.shutdown", None).unwrap().0, 204);
    let status = vmm.wait_timeout(TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(0), "{}", vmm.stderr_output());
}

#[test]
fn a_malformed_disk_flag_is_bad_usage() {
    for bad in ["path=/run/disk.sock", "socket=", "/run/disk.sock"] {
        let args = [
            "--kernel".to_string(),
            testguest().display().to_string(),
            "--disk".into(),
            bad.into(),
        ];
        let mut vmm = VmmProcess::spawn("blk-malformed", &args).unwrap();
        let status = vmm.wait_timeout(TIMEOUT).unwrap();
        let err = vmm.stderr_output();
        assert_eq!(status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains("use --disk socket=PATH"), "{bad}: {err}");
    }
}
