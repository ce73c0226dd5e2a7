//! Bad input to ferrovirt-vmm ends it with a clear message and a non-zero status, never a
//! panic.

use std::time::Duration;

use ferrovirt_tests::{ScratchDir, VmmProcess, testguest};

/// Runs the VMM with `args`; returns (exit code, stderr).
fn vmm_fails(name: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut vmm = VmmProcess::spawn(name, args).unwrap();
    let status = vmm.wait_timeout(Duration::from_secs(30)).unwrap();
    let stderr = vmm.stderr_output();
    assert!(!stderr.contains("panicked"), "the VMM panicked:\n{stderr}");
    (status.code(), stderr)
}

#[test]
fn a_missing_kernel_is_named() {
    let (code, err) = vmm_fails("no-kernel", &["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");
}

#[test]
fn a_corrupt_kernel_is_refused() {
    let dir = ScratchDir::new("corrupt").unwrap();
    // An ELF header cut short after its magic.
    let truncated = dir.join("truncated-elf");
    let guest = std::fs::read(testguest()).unwrap();
    std::fs::write(&truncated, &guest[..40]).unwrap();
    let (code, err) = vmm_fails("truncated", &["--kernel", truncated.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot load kernel"), "{err}");

    let garbage = dir.join("garbage");
    std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
    let (code, err) = vmm_fails("garbage", &["--kernel", garbage.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("neither an ELF vmlinux nor a bzImage"),
        "{err}"
    );
}

#[test]
fn a_kernel_larger_than_memory_is_refused() {
    // The test guest loads at 1 MiB; 2 MiB of RAM leaves no room for it and its stack.
    let guest = testguest();
    let (code, err) = vmm_fails(
        "too-small",
        &["--kernel", guest.to_str().unwrap(), "--memory", "2"],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("MiB"), "{err}");
    assert!(err.contains("memory"), "{err}");
}

#[test]
fn zero_and_absurd_memory_sizes_are_refused() {
    let guest = testguest();
    let guest = guest.to_str().unwrap();
    let (code, err) = vmm_fails("mem0", &["--kernel", guest, "--memory", "0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("memory size 0 MiB is out of range"), "{err}");
    let (code, err) = vmm_fails("memhuge", &["--kernel", guest, "--memory", "1000000"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("this host has only"), "{err}");
}

#[test]
fn more_vcpus_than_possible_are_refused() {
    let guest = testguest();
    let (code, err) = vmm_fails(
        "cpus",
        &["--kernel", guest.to_str().unwrap(), "--cpus", "1000"],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("1000 vCPUs asked for"), "{err}");
    let (code, err) = vmm_fails(
        "cpus0",
        &["--kernel", guest.to_str().unwrap(), "--cpus", "0"],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("at least 1"), "{err}");
}

#[test]
fn bad_flags_and_config_files_are_explained() {
    let (code, err) = vmm_fails("bad-serial", &["--kernel", "/k", "--serial", "pipe"]);
    assert_eq!(code, Some(2), "usage errors exit 2");
    assert!(err.contains("tty, off, file=PATH or socket=PATH"), "{err}");

    let (code, err) = vmm_fails("nothing", &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("nothing to run"), "{err}");

    let dir = ScratchDir::new("badcfg").unwrap();
    let cfg = dir.join("vm.json");
    std::fs::write(
        &cfg,
        r#"{"payload":{"kernel":"/k"},"cpu":{"boot_vcpus":2}}"#,
    )
    .unwrap();
    let (code, err) = vmm_fails("bad-config", &["--config", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("unknown field `cpu`"), "{err}");
}

#[test]
fn a_rng_source_that_does_not_exist_is_named() {
    let guest = testguest();
    let (code, err) = vmm_fails(
        "rng-src",
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--rng",
            "src=/nonexistent/entropy",
        ],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("/nonexistent/entropy"), "{err}");
}
