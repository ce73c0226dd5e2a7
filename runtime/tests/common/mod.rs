//! What the VMM process tests share: reading API replies and booting a ticker guest with
//! vhost-user devices through the API. Each test binary uses part of it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use ferrovirt_tests::{VmmProcess, testguest};

pub const TIMEOUT: Duration = Duration::from_secs(60);

pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Starts a VMM with an API socket and creates and boots, through the API, a 64 MiB ticker
/// guest whose config holds `devices` under `key` ("disks", "nets").
pub fn boot_ticker_through_the_api(
    label: &str,
    key: &str,
    devices: serde_json::Value,
) -> VmmProcess {
    let mut vmm = VmmProcess::builder(label)
        .unwrap()
        .with_api_socket()
        .spawn()
        .unwrap();
    vmm.wait_for_api(TIMEOUT).unwrap();
    let mut config = serde_json::json!({
        "memory": {"size_mib": 64},
        "payload": {"kernel": testguest(), "cmdline": "scenario=ticker"},
    });
    config[key] = devices;
    let (status, body) = vmm
        .api("PUT", "/api/v1/vm.create", Some(&config.to_string()))
        .unwrap();
    assert_eq!(status, 204, "{body}");
    let (status, body) = vmm.api("PUT", "/api/v1/vm.boot", None).unwrap();
    assert_eq!(status, 204, "{body}");
    vmm
}

/// Polls `vm.counters` until `<group>.<counter>` (`disk0.reconnects`) reaches `value`.
pub fn wait_for_counter(vmm: &VmmProcess, group: &str, counter: &str, value: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = vmm.api("GET", "/api/v1/vm.counters", None).unwrap();
        if json(&body)[group][counter] == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{group}.{counter} never reached {value}: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
