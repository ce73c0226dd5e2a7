//! A stock Debian cloud kernel starts on ferrovirt and talks on our serial port.
//!
//! On these machines guest ring-0 code is emulated about 1000x slower than on hardware,
//! so the kernel does not get far (see the README): these tests assert what it prints in
//! its first seconds — its banner, the e820 map and the ACPI tables we built — and stop it.

use std::time::Duration;

use ferrovirt_tests::{VmmProcess, debian_kernel_info};

const BANNER_TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn debian_kernel_prints_its_banner_e820_map_and_our_acpi_tables() {
    let kernel = debian_kernel_info().expect("fetch the Debian cloud kernel (apt-get download)");
    let mut vmm = VmmProcess::spawn(
        "linux",
        [
            "--kernel",
            kernel.vmlinux.to_str().unwrap(),
            "--memory",
            "512",
            "--cmdline",
            "console=ttyS0 earlyprintk=ttyS0",
        ],
    )
    .unwrap();
    let out = vmm
        .wait_for_output("ACPI: XSDT", BANNER_TIMEOUT)
        .unwrap_or_else(|e| panic!("the kernel did not get as far as ACPI: {e}"));
    assert!(out.contains("Linux version 6."), "{out}");
    assert!(
        out.contains("Command line: console=ttyS0 earlyprintk=ttyS0"),
        "{out}"
    );
    // The e820 map, exactly as the VMM described 512 MiB of RAM.
    for line in [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    assert!(out.contains("Hypervisor detected: KVM"), "{out}");
    assert!(out.contains("ACPI: RSDP 0x00000000000E0000"), "{out}");
}

#[test]
fn debian_bzimage_is_loaded_and_its_vcpu_runs() {
    // The bzImage decompresses itself in ring 0 before printing anything, which takes far
    // longer than a test here may run. What this shows: the image loads through the
    // 64-bit boot protocol, the VM runs, and the VMM stays healthy while it does.
    let kernel = debian_kernel_info().expect("fetch the Debian cloud kernel (apt-get download)");
    let mut vmm = VmmProcess::builder("bzimage")
        .unwrap()
        .args([
            "--kernel",
            kernel.bzimage.to_str().unwrap(),
            "--memory",
            "512",
        ])
        .with_api_socket()
        .spawn()
        .unwrap();
    vmm.wait_for_api(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (status, body) = vmm.api("GET", "/api/v1/vm.info", None).unwrap();
    assert_eq!(status, 200, "{body}\n{}", vmm.stderr_output());
    assert!(body.contains("\"Running\""), "{body}");
    assert!(
        vmm.process_mut().try_exit().unwrap().is_none(),
        "the VMM exited: {}",
        vmm.stderr_output()
    );
}
