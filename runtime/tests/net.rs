//! vhost-user-net interfaces: the VMM connects to a real backend (DPDK's testpmd with its
//! vhost PMD), the interface shows up on the guest's PCI bus, the API reports its counters
//! and survives a backend restart, and bad net input ends the VMM with a clear message.

use std::path::PathBuf;

use common::{TIMEOUT, boot_ticker_through_the_api, json, wait_for_counter};
use ferrovirt_tests::{NetNs, ScratchDir, Testpmd, VmmProcess, testguest};

mod common;

/// testpmd in its own netns, its socket in a scratch directory.
struct Backend {
    pmd: Option<Testpmd>,
    socket: PathBuf,
    netns: NetNs,
    _dir: ScratchDir,
}

fn backend(label: &str) -> Backend {
    let dir = ScratchDir::new(label).unwrap();
    let netns = NetNs::create("vmnet").unwrap();
    let socket = dir.join("net.sock");
    let pmd = Testpmd::start(&netns, &socket, 1).unwrap_or_else(|e| panic!("{e}"));
    Backend {
        pmd: Some(pmd),
        socket,
        netns,
        _dir: dir,
    }
}

#[test]
fn a_net_flag_puts_a_virtio_net_function_on_the_guest_pci_bus() {
    let b = backend("net-pci");
    let args = [
        "--kernel".to_string(),
        testguest().display().to_string(),
        "--cmdline".into(),
        "scenario=pci".into(),
        "--memory".into(),
        "64".into(),
        "--net".into(),
        format!(
            "socket={},mac=52:54:00:00:00:07,mtu=1400",
            b.socket.display()
        ),
    ];
    let mut vmm = VmmProcess::spawn("net-pci", &args).unwrap();
    let status = vmm.wait_timeout(TIMEOUT).unwrap();
    let (out, err) = (vmm.serial_output(), vmm.stderr_output());
    assert_eq!(status.code(), Some(0), "serial:\n{out}\nstderr:\n{err}");
    assert_eq!(out.matches("1af4:1041").count(), 1, "{out}");
    assert!(out.contains("class=020000"), "a network controller: {out}");
    assert!(out.contains("pci devices=2"), "{out}");
}

#[test]
fn nets_from_the_api_report_their_counters_across_a_backend_restart() {
    let mut b = backend("net-api");
    let mut vmm =
        boot_ticker_through_the_api("net-api", "nets", serde_json::json!([{"socket": b.socket}]));
    let (_, body) = vmm.api("GET", "/api/v1/vm.info", None).unwrap();
    let net0 = &json(&body)["config"]["nets"][0];
    assert_eq!(net0["socket"], b.socket.to_str().unwrap());
    assert_eq!(net0["queue_pairs"], 1, "{body}");
    let (status, body) = vmm.api("GET", "/api/v1/vm.counters", None).unwrap();
    assert_eq!(status, 200, "{body}");
    let counters = &json(&body)["net0"];
    for counter in [
        "activations",
        "disconnects",
        "reconnects",
        "backend_errors",
        "control_commands",
        "control_errors",
        "active_queue_pairs",
    ] {
        assert_eq!(counters[counter], 0, "{counter} in {body}");
    }

    b.pmd.take().unwrap().crash().unwrap();
    wait_for_counter(&vmm, "net0", "disconnects", 1);
    b.pmd = Some(Testpmd::start(&b.netns, &b.socket, 1).unwrap_or_else(|e| panic!("{e}")));
    wait_for_counter(&vmm, "net0", "reconnects", 1);
    assert_eq!(vmm.api("PUT", "/api/v1/vmm.shutdown", None).unwrap().0, 204);
    let status = vmm.wait_timeout(TIMEOUT).unwrap();
    assert_eq!(status.code(), Some(0), "{}", vmm.stderr_output());
}

#[test]
fn a_malformed_net_flag_is_bad_usage() {
    for (bad, why) in [
        ("mac=52:54:00:00:00:01", "has no socket"),
        ("socket=", "\"socket=\" is not a net option"),
        ("/run/net.sock", "is not a net option"),
        ("socket=/run/n.sock,colour=red", "is not a net option"),
        ("socket=/run/n.sock,mac=01:00:5e:00:00:01", "multicast"),
        (
            "socket=/run/n.sock,mac=00:00:00:00:00:00",
            "not a usable MAC",
        ),
        ("socket=/run/n.sock,mac=52:54:00", "six hex bytes"),
        (
            "socket=/run/n.sock,queues=two",
            "not a number of queue pairs",
        ),
        ("socket=/run/n.sock,mtu=-1", "not an MTU"),
    ] {
        let args = [
            "--kernel".to_string(),
            testguest().display().to_string(),
            "--net".into(),
            bad.into(),
        ];
        let mut vmm = VmmProcess::spawn("net-malformed", &args).unwrap();
        let status = vmm.wait_timeout(TIMEOUT).unwrap();
        let err = vmm.stderr_output();
        assert_eq!(status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains(why), "{bad}: {err}");
        assert!(err.contains("use --net socket=PATH"), "{bad}: {err}");
    }
}

#[test]
fn out_of_range_queue_pairs_and_mtu_are_refused_before_connecting() {
    for (option, why) in [
        ("queues=0", "asks for 0 queue pairs"),
        ("queues=128", "asks for 128 queue pairs"),
        ("mtu=60", "has MTU 60"),
    ] {
        let args = [
            "--kernel".to_string(),
            testguest().display().to_string(),
            "--net".into(),
            format!("socket=/nonexistent/net.sock,{option}"),
        ];
        let mut vmm = VmmProcess::spawn("net-range", &args).unwrap();
        let status = vmm.wait_timeout(TIMEOUT).unwrap();
        let err = vmm.stderr_output();
        assert_eq!(status.code(), Some(1), "{option}: {err}");
        assert!(err.contains(why), "{option}: {err}");
        assert!(!err.contains("cannot connect"), "{option}: {err}");
    }
}

#[test]
fn a_backend_with_too_few_queues_for_the_pairs_fails_the_start_with_exit_1() {
    let b = backend("net-toofew");
    let args = [
        "--kernel".to_string(),
        testguest().display().to_string(),
        "--net".into(),
        format!("socket={},queues=127", b.socket.display()),
    ];
    let mut vmm = VmmProcess::spawn("net-toofew", &args).unwrap();
    let status = vmm.wait_timeout(TIMEOUT).unwrap();
    let err = vmm.stderr_output();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("cannot set up net 0"), "{err}");
    assert!(err.contains("the device needs 254"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
