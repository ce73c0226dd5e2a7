//! The VMM boots the ring-3 test guest and the guest proves, over serial, what it saw:
//! memory map, ACPI, every vCPU, PCI and a virtio-rng device with MSI-X.

use std::time::Duration;

use ferrovirt_tests::{VmmProcess, testguest};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Boots the test guest with `scenario` and extra flags; returns (exit code, serial output).
fn run_guest(name: &str, scenario: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let guest = testguest();
    let mut args = vec![
        "--kernel".to_string(),
        guest.display().to_string(),
        "--cmdline".into(),
        format!("scenario={scenario}"),
        "--memory".into(),
        "128".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut vmm = VmmProcess::spawn(name, &args).expect("spawn ferrovirt-vmm");
    let status = vmm
        .wait_timeout(BOOT_TIMEOUT)
        .expect("the guest must end the VM");
    (status.code(), vmm.serial_output(), vmm.stderr_output())
}

#[test]
fn testguest_boots_and_reports_its_memory_map_over_serial() {
    let (code, out, err) = run_guest("hello", "hello", &[]);
    assert_eq!(code, Some(0), "serial:\n{out}\nstderr:\n{err}");
    assert!(out.contains("testguest: PASS hello"), "{out}");
    // The PVH memory map the VMM wrote: RAM, the BIOS hole, RAM up to 128 MiB.
    assert!(
        out.contains("memmap 0x0000000000-0x000009fc00 ram"),
        "{out}"
    );
    assert!(
        out.contains("memmap 0x0000100000-0x0008000000 ram"),
        "{out}"
    );
    assert!(out.contains("cmdline \"scenario=hello\""), "{out}");
    assert!(out.contains("cpus=1 apic_ids=0"), "{out}");
}

#[test]
fn every_vcpu_runs_guest_code() {
    let (code, out, err) = run_guest("smp", "smp", &["--cpus", "4"]);
    assert_eq!(code, Some(0), "serial:\n{out}\nstderr:\n{err}");
    assert!(out.contains("smp cpus=4 apic_ids=0,1,2,3"), "{out}");
    assert!(out.contains("testguest: PASS smp"), "{out}");
}

#[test]
fn virtio_rng_bytes_come_from_the_host_source_through_pci_with_msix() {
    let dir = ferrovirt_tests::ScratchDir::new("rng-src").unwrap();
    let src = dir.join("entropy");
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&src, &pattern).unwrap();
    let rng = format!("src={}", src.display());
    let (code, out, err) = run_guest("rng", "rng", &["--rng", &rng]);
    assert_eq!(code, Some(0), "serial:\n{out}\nstderr:\n{err}");
    let expected: String = pattern[..64].iter().map(|b| format!("{b:02x}")).collect();
    assert!(
        out.contains(&format!("rng bytes={expected}")),
        "the guest must read the host file's bytes:\n{out}"
    );
    assert!(out.contains("rng msix=delivered"), "{out}");
    assert!(out.contains("testguest: PASS rng"), "{out}");
}

#[test]
fn pci_bus_lists_the_host_bridge_and_virtio_rng() {
    let (code, out, err) = run_guest("pci", "pci", &["--rng"]);
    assert_eq!(code, Some(0), "serial:\n{out}\nstderr:\n{err}");
    assert!(out.contains("pci 00:00.0 8086:0d57 class=060000"), "{out}");
    assert!(out.contains("1af4:1044"), "{out}");
    assert!(out.contains("pci devices=2"), "{out}");
}

#[test]
fn a_guest_without_the_device_it_needs_fails_with_its_status() {
    // No --rng: the guest reports the missing device and exits 32 through debug-exit.
    let (code, out, _) = run_guest("no-rng", "rng", &[]);
    assert_eq!(code, Some(32), "{out}");
    assert!(out.contains("testguest: FAIL rng"), "{out}");
}

#[test]
fn first_guest_instruction_reaches_the_debug_console() {
    let dir = ferrovirt_tests::ScratchDir::new("debugcon").unwrap();
    let debugcon = dir.join("debugcon");
    let path = debugcon.display().to_string();
    let (code, out, err) = run_guest(
        "debugcon",
        "exit",
        &["--debugcon", &path, "--serial", "off"],
    );
    assert_eq!(code, Some(0), "serial:\n{out}\nstderr:\n{err}");
    assert_eq!(std::fs::read(&debugcon).unwrap().len(), 1);
    assert!(out.is_empty(), "--serial off must print nothing: {out}");
}

#[test]
fn a_json_config_file_boots_the_same_vm_as_flags() {
    let dir = ferrovirt_tests::ScratchDir::new("config").unwrap();
    let serial = dir.join("serial.log");
    let config = serde_json::json!({
        "cpus": {"boot_vcpus": 2},
        "memory": {"size_mib": 64},
        "payload": {"kernel": testguest(), "cmdline": "scenario=smp"},
        "serial": {"mode": "file", "path": serial},
    });
    let config_path = dir.join("vm.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let mut vmm = VmmProcess::spawn("config", ["--config", config_path.to_str().unwrap()]).unwrap();
    let status = vmm.wait_timeout(BOOT_TIMEOUT).unwrap();
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{log}\n{}", vmm.stderr_output());
    assert!(log.contains("smp cpus=2 apic_ids=0,1"), "{log}");
}

#[test]
fn hugepage_backed_guest_runs() {
    let _reservation = match HugepageReservation::reserve(64) {
        Some(r) => r,
        None => panic!("cannot reserve 64 hugepages: /proc/sys/vm/nr_hugepages did not grow"),
    };
    let (code, out, err) = run_guest("huge", "hello", &["--hugepages"]);
    assert_eq!(code, Some(0), "serial:\n{out}\nstderr:\n{err}");
    assert!(out.contains("PASS hello"), "{out}");
}

/// Raises the host's 2 MiB hugepage pool for one test and puts it back on drop.
struct HugepageReservation {
    before: u64,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugepageReservation {
    fn reserve(extra: u64) -> Option<HugepageReservation> {
        let read = || -> u64 {
            std::fs::read_to_string(NR_HUGEPAGES)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        let before = read();
        std::fs::write(NR_HUGEPAGES, (before + extra).to_string()).ok()?;
        (read() >= before + extra).then_some(HugepageReservation { before })
    }
}

impl Drop for HugepageReservation {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.before.to_string());
    }
}

#[test]
fn the_readme_example_manifest_boots() {
    // scripts/run-example.sh runs `ferrovirt-vmm --config examples/testguest-vm.json` from
    // the repository root; its kernel path must be where the test guest is built.
    let root = ferrovirt_tests::repo_root();
    let text = std::fs::read_to_string(root.join("examples/testguest-vm.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    let kernel = root.join(config["payload"]["kernel"].as_str().unwrap());
    assert_eq!(kernel, testguest(), "the example names another kernel path");
    config["payload"]["kernel"] = kernel.display().to_string().into();
    let dir = ferrovirt_tests::ScratchDir::new("example").unwrap();
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut vmm = VmmProcess::spawn("example", ["--config", path.to_str().unwrap()]).unwrap();
    let status = vmm.wait_timeout(BOOT_TIMEOUT).unwrap();
    let out = vmm.serial_output();
    assert_eq!(status.code(), Some(0), "{out}\n{}", vmm.stderr_output());
    assert!(out.contains("testguest: PASS"), "{out}");
}

#[test]
fn acpi_s5_from_the_guest_powers_the_vm_off() {
    // The guest finds the sleep control register in our FADT and SLP_TYP in our DSDT's
    // \_S5, as Linux does; it has no debug-exit fallback on this path.
    let (code, out, err) = run_guest("poweroff", "poweroff", &[]);
    assert!(
        out.contains("poweroff sleep_control=0x600 slp_typ=5"),
        "{out}"
    );
    assert!(!out.contains("FAIL"), "{out}");
    assert_eq!(code, Some(0), "serial:\n{out}\nstderr:\n{err}");
}

#[test]
fn i8042_reset_ends_the_vmm_with_the_reset_status() {
    let (code, out, err) = run_guest("reset", "reset", &[]);
    assert!(out.contains("reset via i8042"), "{out}");
    assert_eq!(code, Some(3), "serial:\n{out}\nstderr:\n{err}");
}

#[test]
fn a_triple_fault_is_reported_as_a_crash() {
    let (code, out, err) = run_guest("fault", "fault", &[]);
    assert!(out.contains("fault: executing ud2 in ring 3"), "{out}");
    assert_eq!(code, Some(4), "serial:\n{out}\nstderr:\n{err}");
    assert!(err.contains("triple-faulted"), "{err}");
}

#[test]
fn the_initramfs_reaches_the_guest_as_a_pvh_module() {
    let dir = ferrovirt_tests::ScratchDir::new("initramfs").unwrap();
    let initramfs = dir.join("initrd.img");
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 31 + 7) as u8).collect();
    std::fs::write(&initramfs, &bytes).unwrap();
    let path = initramfs.display().to_string();
    let (code, out, err) = run_guest("initramfs", "hello", &["--initramfs", &path]);
    assert_eq!(code, Some(0), "serial:\n{out}\nstderr:\n{err}");
    let head: String = bytes[..16].iter().map(|b| format!("{b:02x}")).collect();
    let line = out
        .lines()
        .find(|l| l.starts_with("testguest: module 0 "))
        .unwrap_or_else(|| panic!("no module line:\n{out}"));
    assert!(
        line.contains(&format!("size={} head={head}", bytes.len())),
        "{line}"
    );
    assert!(out.contains("modules=1"), "{out}");
}
