//! The plugin binary in mode vhost-user, as a runtime runs it: real namespaces, real TAPs,
//! Debian's host-local IPAM.

mod common;

use common::{Attachment, Network, call_plugin, plugin_binary};
use ferrovirt_cni_plugin::vhost_user::tap_name;
use ferrovirt_tests::{Link, NetNs, link_exists};
use serde_json::{Value, json};
use std::os::unix::process::CommandExt;
use std::process::Command;

fn conf(net: &Network, version: &str, extra: Value) -> Value {
    let mut conf = json!({
        "cniVersion": version,
        "name": net.name,
        "type": "ferrovirt-cni",
        "mode": "vhost-user",
        "stateDir": net.state_dir(),
        "socketDir": net.dir.join("sockets"),
        "ipam": net.host_local("10.77.0.0/24"),
    });
    if let (Some(conf), Some(extra)) = (conf.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            conf.insert(k.clone(), v.clone());
        }
    }
    conf
}

fn call(command: &str, a: &Attachment, conf: &Value) -> common::Reply {
    call_plugin(&plugin_binary(), command, Some(a), conf, &[])
}

fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut conf = conf.clone();
    conf["prevResult"] = prev.clone();
    conf
}

fn tun_flags(name: &str) -> u32 {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/tun_flags")).unwrap();
    u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).unwrap()
}

#[test]
fn add_check_del_makes_and_removes_a_multiqueue_tap_with_a_lease() {
    let ns = NetNs::create("vu").unwrap();
    let net = Network::new("vu-acd");
    let a = Attachment::new(Some(ns.path()), "net1");
    let conf = conf(
        &net,
        "1.1.0",
        json!({"queues": 4, "mtu": 9000, "tapOwner": 107,
               "runtimeConfig": {"mac": "02:fe:00:00:00:01"}}),
    );
    let result = call("ADD", &a, &conf).ok();
    let tap = tap_name(&a.container_id, "net1");
    assert!(link_exists(&tap));
    let flags = tun_flags(&tap);
    assert_eq!(
        flags & libc::IFF_MULTI_QUEUE as u32,
        libc::IFF_MULTI_QUEUE as u32
    );
    assert_eq!(flags & libc::IFF_VNET_HDR as u32, libc::IFF_VNET_HDR as u32);
    assert_eq!(
        std::fs::read_to_string(format!("/sys/class/net/{tap}/mtu"))
            .unwrap()
            .trim(),
        "9000"
    );
    assert_eq!(
        std::fs::read_to_string(format!("/sys/class/net/{tap}/owner"))
            .unwrap()
            .trim(),
        "107"
    );

    // The VM's interface: MAC from runtimeConfig, the socket, the IP pointing at it.
    assert_eq!(result["cniVersion"], "1.1.0");
    let vm = &result["interfaces"][1];
    assert_eq!(vm["name"], "net1");
    assert_eq!(vm["mac"], "02:fe:00:00:00:01");
    assert_eq!(vm["sandbox"], ns.path().display().to_string());
    let socket = net.dir.join("sockets").join(format!("{tap}.sock"));
    assert_eq!(vm["socketPath"], socket.display().to_string());
    assert_eq!(result["interfaces"][0]["name"], tap.as_str());
    assert_eq!(result["ips"][0]["interface"], 1);
    assert!(
        result["ips"][0]["address"]
            .as_str()
            .unwrap()
            .starts_with("10.77.0.")
    );
    assert_eq!(net.leases(), vec![a.container_id.clone()]);

    call("CHECK", &a, &with_prev(&conf, &result)).ok();

    call("DEL", &a, &with_prev(&conf, &result)).ok();
    assert!(!link_exists(&tap), "{tap} left behind");
    assert!(net.leases().is_empty());
    assert_eq!(net.records(), 0);
    // DEL is idempotent.
    call("DEL", &a, &conf).ok();
}

#[test]
fn check_fails_when_the_tap_is_gone() {
    let ns = NetNs::create("vu").unwrap();
    let net = Network::new("vu-chk");
    let a = Attachment::new(Some(ns.path()), "net1");
    let conf = conf(&net, "1.1.0", json!({}));
    let result = call("ADD", &a, &conf).ok();
    let tap = tap_name(&a.container_id, "net1");
    ferrovirt_tests::names::ip(&["link", "del", &tap]).unwrap();
    let (code, msg) = call("CHECK", &a, &with_prev(&conf, &result)).error();
    assert_eq!(code, 100);
    assert!(msg.contains("is gone"), "{msg}");
    call("DEL", &a, &conf).ok();
    assert!(net.leases().is_empty());
}

#[test]
fn the_mac_is_deterministic_per_attachment_and_older_versions_get_their_form() {
    let ns = NetNs::create("vu").unwrap();
    let net = Network::new("vu-mac");
    let a = Attachment::new(Some(ns.path()), "net1");
    let conf = conf(&net, "0.4.0", json!({}));
    let first = call("ADD", &a, &conf).ok();
    assert_eq!(first["cniVersion"], "0.4.0");
    assert_eq!(first["ips"][0]["version"], "4");
    assert!(first["interfaces"][1].get("socketPath").is_none());
    call("DEL", &a, &conf).ok();
    let second = call("ADD", &a, &conf).ok();
    assert_eq!(
        first["interfaces"][1]["mac"],
        second["interfaces"][1]["mac"]
    );
    call("DEL", &a, &conf).ok();
}

#[test]
fn del_works_after_the_netns_is_deleted_and_twice() {
    let ns = NetNs::create("vu").unwrap();
    let net = Network::new("vu-nsgone");
    let a = Attachment::new(Some(ns.path()), "net1");
    let conf = conf(&net, "1.0.0", json!({}));
    call("ADD", &a, &conf).ok();
    drop(ns);
    // The runtime passes no CNI_NETNS once the namespace is gone.
    let gone = Attachment {
        netns: None,
        ..a.clone()
    };
    call("DEL", &gone, &conf).ok();
    call("DEL", &gone, &conf).ok();
    assert!(!link_exists(&tap_name(&a.container_id, "net1")));
    assert!(net.leases().is_empty());
}

#[test]
fn an_ipam_failure_leaves_no_tap_and_no_record() {
    let ns = NetNs::create("vu").unwrap();
    let net = Network::new("vu-ipamfail");
    // A range of one address: the second attachment cannot get one.
    let mut conf = conf(&net, "1.1.0", json!({}));
    conf["ipam"]["ranges"] =
        json!([[{"subnet": "10.78.0.0/24", "rangeStart": "10.78.0.9", "rangeEnd": "10.78.0.9"}]]);
    let first = Attachment::new(Some(ns.path()), "net1");
    let second = Attachment::new(Some(ns.path()), "net2");
    call("ADD", &first, &conf).ok();
    let (code, msg) = call("ADD", &second, &conf).error();
    assert!(msg.contains("host-local"), "{code} {msg}");
    assert!(!link_exists(&tap_name(&second.container_id, "net2")));
    assert_eq!(net.leases(), vec![first.container_id.clone()]);
    assert_eq!(net.records(), 1);
    call("DEL", &first, &conf).ok();
    assert!(net.leases().is_empty());
}

#[test]
fn a_taken_tap_name_fails_add_and_releases_the_lease() {
    let ns = NetNs::create("vu").unwrap();
    let net = Network::new("vu-taken");
    let a = Attachment::new(Some(ns.path()), "net1");
    let tap = tap_name(&a.container_id, "net1");
    let squatter = Link::bridge(&tap).unwrap();
    let conf = conf(&net, "1.1.0", json!({}));
    let (code, msg) = call("ADD", &a, &conf).error();
    assert_eq!(code, 100);
    assert!(msg.contains("already exists"), "{msg}");
    // The other link is untouched, the lease released, no record kept.
    assert!(link_exists(squatter.name()));
    assert!(std::fs::read_to_string(format!("/sys/class/net/{tap}/tun_flags")).is_err());
    assert!(net.leases().is_empty());
    assert_eq!(net.records(), 0);
}

#[test]
fn gc_removes_attachments_missing_from_valid_attachments() {
    let ns = NetNs::create("vu").unwrap();
    let net = Network::new("vu-gc");
    let conf = conf(&net, "1.1.0", json!({}));
    let keep = Attachment::new(Some(ns.path()), "net1");
    let stale = Attachment::new(Some(ns.path()), "net2");
    call("ADD", &keep, &conf).ok();
    call("ADD", &stale, &conf).ok();
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": keep.container_id, "ifname": "net1"}]);
    call_plugin(&plugin_binary(), "GC", None, &gc, &[]).ok();
    assert!(link_exists(&tap_name(&keep.container_id, "net1")));
    assert!(!link_exists(&tap_name(&stale.container_id, "net2")));
    assert_eq!(net.leases(), vec![keep.container_id.clone()]);
    assert_eq!(net.records(), 1);
    // GC on an older config version is refused with code 1.
    let mut old = gc.clone();
    old["cniVersion"] = json!("1.0.0");
    assert_eq!(
        call_plugin(&plugin_binary(), "GC", None, &old, &[])
            .error()
            .0,
        1
    );
    call("DEL", &keep, &conf).ok();
    assert!(net.leases().is_empty());
}

#[test]
fn status_is_ok_when_ready_and_code_50_without_the_ipam_plugin() {
    let net = Network::new("vu-status");
    let conf = conf(&net, "1.1.0", json!({}));
    let reply = call_plugin(&plugin_binary(), "STATUS", None, &conf, &[]);
    assert_eq!(reply.ok(), Value::Null);
    let mut broken = conf.clone();
    broken["ipam"]["type"] = json!("no-such-ipam");
    let (code, msg) = call_plugin(&plugin_binary(), "STATUS", None, &broken, &[]).error();
    assert_eq!(code, 50);
    assert!(msg.contains("no-such-ipam"), "{msg}");
}

/// A datapath in a pin directory of its own with network 7, destroyed on Drop.
struct TestDatapath {
    datapath: Option<ferrovirt_ebpf::Datapath>,
    pin_dir: std::path::PathBuf,
}

impl TestDatapath {
    fn load() -> TestDatapath {
        let pin_dir = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/ferrovirt-test-{}",
            ferrovirt_tests::unique_name("")
        ));
        let config = ferrovirt_ebpf::DatapathConfig {
            pin_dir: pin_dir.clone(),
        };
        let datapath = ferrovirt_ebpf::Datapath::open_or_load(&config).unwrap();
        datapath
            .add_network(7, &ferrovirt_ebpf::NetworkConfig { vlan: None })
            .unwrap();
        TestDatapath {
            datapath: Some(datapath),
            pin_dir,
        }
    }

    fn get(&self) -> &ferrovirt_ebpf::Datapath {
        self.datapath.as_ref().expect("present until drop")
    }

    /// The hooks (pin name prefixes) pinned for an interface called `ifname`.
    fn link_pins_for(&self, ifname: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.pin_dir.join("links")) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let hook = name.strip_suffix(&format!(":{ifname}"))?;
                Some(hook.split(':').next()?.to_owned())
            })
            .collect()
    }

    fn has_link_pin_for(&self, ifname: &str) -> bool {
        !self.link_pins_for(ifname).is_empty()
    }
}

impl Drop for TestDatapath {
    fn drop(&mut self) {
        if let Some(datapath) = self.datapath.take()
            && let Err(e) = datapath.destroy()
        {
            eprintln!("cannot destroy {}: {e}", self.pin_dir.display());
        }
    }
}

#[test]
fn the_tap_becomes_an_ebpf_endpoint_until_del() {
    let dp = TestDatapath::load();
    let ns = NetNs::create("vu").unwrap();
    let net = Network::new("vu-ebpf");
    let a = Attachment::new(Some(ns.path()), "net1");
    let conf = conf(
        &net,
        "1.1.0",
        json!({"networkId": 7, "bpfPinDir": dp.pin_dir}),
    );
    let result = call("ADD", &a, &conf).ok();
    let tap = tap_name(&a.container_id, "net1");
    let ifindex: u32 = std::fs::read_to_string(format!("/sys/class/net/{tap}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // ADD attaches a cls_bpf filter (no RCU grace period to wait for)...
    assert_eq!(dp.link_pins_for(&tap), ["endpoint-filter"]);
    let filters = Command::new("tc")
        .args(["filter", "show", "dev", &tap, "ingress"])
        .output()
        .unwrap();
    assert!(
        // The kernel keeps 15 bytes of a program's name.
        String::from_utf8_lossy(&filters.stdout).contains("fv_from_endpoin direct-action"),
        "{filters:?}"
    );
    dp.get().counters(&tap).unwrap();
    call("CHECK", &a, &with_prev(&conf, &result)).ok();
    // ...which the agent makes a TCX link before the VM runs; DEL removes either.
    assert!(dp.get().link_endpoint_filter(&tap).unwrap());
    assert_eq!(dp.link_pins_for(&tap), ["endpoint"]);

    call("DEL", &a, &conf).ok();
    assert!(!dp.has_link_pin_for(&tap), "endpoint link left pinned");
    assert!(
        dp.get().counters_by_ifindex(ifindex).is_err(),
        "endpoint maps left"
    );
    assert!(!link_exists(&tap));
    call("DEL", &a, &conf).ok();
}

#[test]
fn del_works_when_the_runtime_ignores_sigchld() {
    // An ignored SIGCHLD survives exec; unless the plugin restores it, the kernel reaps the
    // IPAM plugin and the TAP deleter before the plugin can read how they ended.
    let ns = NetNs::create("vu").unwrap();
    let net = Network::new("vu-sigchld");
    let a = Attachment::new(Some(ns.path()), "net1");
    let conf = conf(&net, "1.1.0", json!({}));
    call("ADD", &a, &conf).ok();
    let tap = tap_name(&a.container_id, "net1");
    assert!(link_exists(&tap));
    let mut del = common::plugin_command(&plugin_binary(), "DEL", Some(&a), &[]);
    // SAFETY: between fork and exec the child only calls signal(2), which is
    // async-signal-safe.
    unsafe {
        del.pre_exec(|| {
            if libc::signal(libc::SIGCHLD, libc::SIG_IGN) == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    common::run_plugin(del, &conf).ok();
    assert!(!link_exists(&tap), "TAP {tap} left");
}

#[test]
fn a_first_attachment_creates_its_network_and_a_refused_endpoint_leaks_nothing() {
    let dp = TestDatapath::load();
    let ns = NetNs::create("vu").unwrap();
    let net = Network::new("vu-ebpfbad");
    let first = Attachment::new(Some(ns.path()), "net1");
    let second = Attachment::new(Some(ns.path()), "net2");
    let conf = conf(
        &net,
        "1.1.0",
        json!({"networkId": 99, "bpfPinDir": dp.pin_dir, "runtimeConfig": {"mac": "02:00:00:00:99:01"}}),
    );
    // Network 99 does not exist on this node yet: the first attachment creates it.
    call("ADD", &first, &conf).ok();
    assert!(dp.has_link_pin_for(&tap_name(&first.container_id, "net1")));
    // A second endpoint with the same MAC on it: the switch refuses it, and nothing of the
    // second attachment stays (TAP, lease, endpoint, record).
    let reply = call("ADD", &second, &conf);
    let (code, msg) = reply.error();
    assert_eq!(code, 100);
    assert!(msg.contains("network 99"), "{msg}");
    // The cause is in the error object's details.
    assert!(reply.stdout.contains("already used"), "{}", reply.stdout);
    let tap = tap_name(&second.container_id, "net2");
    assert!(!link_exists(&tap));
    assert!(!dp.has_link_pin_for(&tap));
    assert_eq!(net.leases(), vec![first.container_id.clone()]);
    assert_eq!(net.records(), 1);
    call("DEL", &first, &conf).ok();
    assert!(net.leases().is_empty());
    assert_eq!(net.records(), 0);
}

#[test]
fn a_repeated_add_replaces_the_attachment_instead_of_leaking_one() {
    let ns = NetNs::create("vu").unwrap();
    let net = Network::new("vu-readd");
    let a = Attachment::new(Some(ns.path()), "net1");
    let conf = conf(&net, "1.1.0", json!({}));
    let first = call("ADD", &a, &conf).ok();
    let second = call("ADD", &a, &conf).ok();
    assert_eq!(
        first["interfaces"][0]["name"],
        second["interfaces"][0]["name"]
    );
    assert!(link_exists(&tap_name(&a.container_id, "net1")));
    assert_eq!(net.leases(), vec![a.container_id.clone()]);
    assert_eq!(net.records(), 1);
    call("DEL", &a, &conf).ok();
    assert!(net.leases().is_empty());
}
