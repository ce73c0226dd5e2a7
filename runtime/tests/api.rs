//! The REST API drives a real VM through its lifecycle, and refuses what does not fit.

use std::time::{Duration, Instant};

use common::json;
use ferrovirt_tests::{VmmProcess, testguest};

mod common;

const TIMEOUT: Duration = Duration::from_secs(30);

fn ticker_config() -> String {
    serde_json::json!({
        "cpus": {"boot_vcpus": 2},
        "memory": {"size_mib": 64},
        "payload": {"kernel": testguest(), "cmdline": "scenario=ticker"},
        "serial": {"mode": "tty"},
    })
    .to_string()
}

fn api_vmm(name: &str) -> VmmProcess {
    let mut vmm = VmmProcess::builder(name)
        .unwrap()
        .with_api_socket()
        .spawn()
        .unwrap();
    vmm.wait_for_api(TIMEOUT).unwrap();
    vmm
}

/// `PUT /vm.create` of a 64 MiB VM booting `kernel` with `cmdline`; asserts 204.
fn create(vmm: &VmmProcess, kernel: &std::path::Path, cmdline: &str) {
    let config = serde_json::json!({
        "memory": {"size_mib": 64},
        "payload": {"kernel": kernel, "cmdline": cmdline},
    })
    .to_string();
    let (status, body) = vmm.api("PUT", "/api/v1/vm.create", Some(&config)).unwrap();
    assert_eq!(status, 204, "{body}");
}

fn ticks(out: &str) -> usize {
    out.matches("testguest: tick ").count()
}

/// Waits until the serial output holds more ticks than `after`.
fn wait_for_ticks_beyond(vmm: &mut VmmProcess, after: usize) -> usize {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let n = ticks(&vmm.serial_output());
        if n > after {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "the guest stopped ticking at {n}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn api_creates_boots_pauses_resumes_and_shuts_down_a_vm() {
    let mut vmm = api_vmm("lifecycle");
    let (status, body) = vmm.api("GET", "/api/v1/vmm.ping", None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(json(&body)["pid"], vmm.pid());

    let (status, _) = vmm
        .api("PUT", "/api/v1/vm.create", Some(&ticker_config()))
        .unwrap();
    assert_eq!(status, 204);
    let (status, body) = vmm.api("GET", "/api/v1/vm.info", None).unwrap();
    assert_eq!(
        (status, json(&body)["state"].as_str()),
        (200, Some("Created"))
    );

    assert_eq!(vmm.api("PUT", "/api/v1/vm.boot", None).unwrap().0, 204);
    wait_for_ticks_beyond(&mut vmm, 2);
    let (_, body) = vmm.api("GET", "/api/v1/vm.info", None).unwrap();
    let info = json(&body);
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2);

    // Paused: no guest code runs, so no tick is printed.
    assert_eq!(vmm.api("PUT", "/api/v1/vm.pause", None).unwrap().0, 204);
    let (_, body) = vmm.api("GET", "/api/v1/vm.info", None).unwrap();
    assert_eq!(json(&body)["state"], "Paused");
    let (_, counters) = vmm.api("GET", "/api/v1/vm.counters", None).unwrap();
    let at_pause = ticks(&vmm.serial_output());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ticks(&vmm.serial_output()),
        at_pause,
        "a paused guest ticked"
    );
    let (_, counters_later) = vmm.api("GET", "/api/v1/vm.counters", None).unwrap();
    assert_eq!(
        json(&counters)["serial"]["tx_bytes"],
        json(&counters_later)["serial"]["tx_bytes"]
    );
    assert!(json(&counters)["vcpu0"]["io_exits"].as_u64().unwrap() > 0);

    assert_eq!(vmm.api("PUT", "/api/v1/vm.resume", None).unwrap().0, 204);
    wait_for_ticks_beyond(&mut vmm, at_pause);

    assert_eq!(vmm.api("PUT", "/api/v1/vm.shutdown", None).unwrap().0, 204);
    let status = vmm.wait_timeout(TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        !vmm.api_socket().unwrap().exists(),
        "the API socket must be removed at exit"
    );
}

#[test]
fn api_refuses_calls_in_the_wrong_state_with_409_and_404() {
    let vmm = api_vmm("wrong-state");
    let (status, body) = vmm.api("PUT", "/api/v1/vm.boot", None).unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("vm.create"));
    assert_eq!(vmm.api("GET", "/api/v1/vm.info", None).unwrap().0, 404);

    let config = ticker_config();
    assert_eq!(
        vmm.api("PUT", "/api/v1/vm.create", Some(&config))
            .unwrap()
            .0,
        204
    );
    let (status, body) = vmm.api("PUT", "/api/v1/vm.create", Some(&config)).unwrap();
    assert_eq!(status, 409, "{body}");
    let (status, body) = vmm.api("PUT", "/api/v1/vm.pause", None).unwrap();
    assert_eq!(status, 409, "pausing a VM that never booted: {body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("Created"));

    assert_eq!(vmm.api("PUT", "/api/v1/vm.boot", None).unwrap().0, 204);
    let (status, _) = vmm.api("PUT", "/api/v1/vm.boot", None).unwrap();
    assert_eq!(status, 409);
    let (status, _) = vmm.api("PUT", "/api/v1/vm.resume", None).unwrap();
    assert_eq!(status, 409, "resuming a running VM");
}

#[test]
fn api_rejects_malformed_and_invalid_configs_with_400() {
    let vmm = api_vmm("bad-json");
    let (status, body) = vmm
        .api("PUT", "/api/v1/vm.create", Some("{\"payload\": "))
        .unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, body) = vmm
        .api(
            "PUT",
            "/api/v1/vm.create",
            Some(r#"{"payload":{"kernel":"/k"},"memory":{"size_mb":64}}"#),
        )
        .unwrap();
    assert_eq!(status, 400);
    assert!(
        body.contains("size_mb"),
        "the unknown field must be named: {body}"
    );
    let (status, body) = vmm
        .api(
            "PUT",
            "/api/v1/vm.create",
            Some(r#"{"payload":{"kernel":"/nonexistent/vmlinux"}}"#),
        )
        .unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("/nonexistent/vmlinux"), "{body}");
    // Nothing was created by the refused requests.
    assert_eq!(vmm.api("GET", "/api/v1/vm.info", None).unwrap().0, 404);
}

#[test]
fn a_vm_that_fails_to_boot_reports_why_and_the_vmm_stays_up() {
    let vmm = api_vmm("boot-fails");
    create(&vmm, std::path::Path::new("/etc/hostname"), "");
    let (status, body) = vmm.api("PUT", "/api/v1/vm.boot", None).unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("neither an ELF vmlinux nor a bzImage"),
        "{body}"
    );
    assert_eq!(vmm.api("GET", "/api/v1/vmm.ping", None).unwrap().0, 200);
}

#[test]
fn guest_exit_ends_an_api_driven_vmm_with_the_guest_status() {
    let mut vmm = api_vmm("guest-exit");
    create(&vmm, &testguest(), "scenario=nonexistent");
    assert_eq!(vmm.api("PUT", "/api/v1/vm.boot", None).unwrap().0, 204);
    // The test guest answers an unknown scenario with debug-exit 34.
    assert_eq!(vmm.wait_timeout(TIMEOUT).unwrap().code(), Some(34));
}
