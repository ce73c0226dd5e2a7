//! The plugin binary in mode sriov against a fake sysfs tree whose VF netdev is a real veth:
//! the move, rename, addressing and return run for real; the PF-side VF settings go to the
//! recording PF (no SR-IOV NIC needed). Chained with Debian's host-local and tuning.

mod common;

use std::path::{Path, PathBuf};

use common::{Attachment, Network, call_plugin, debian_plugin, ip_output, plugin_binary};
use ferrovirt_cni_plugin::sriov::pf::{RECORDING_FILE, Recording, VfSettings};
use ferrovirt_cni_plugin::sriov::sysfs::SYSFS_ROOT_ENV;
use ferrovirt_tests::{Link, NetNs, ScratchDir, link_exists};
use serde_json::{Value, json};

const PF_PCI: &str = "0000:5e:00.0";
const VF_PCI: &str = "0000:5e:00.2";
const PF_NAME: &str = "fakepf0";
const VF_INDEX: u32 = 1;

/// A PF with two VFs; VF 1 is bound to `driver` and, for a net driver, its netdev is a veth.
struct FakeSriov {
    root: ScratchDir,
    vf: Option<Link>,
}

impl FakeSriov {
    fn new(driver: &str) -> FakeSriov {
        let root = ScratchDir::new("sysfs").unwrap();
        let devices = root.join("bus/pci/devices");
        let pf = devices.join(PF_PCI);
        std::fs::create_dir_all(pf.join("net").join(PF_NAME)).unwrap();
        std::fs::write(pf.join("sriov_numvfs"), "2\n").unwrap();
        std::fs::create_dir_all(root.join("bus/pci/drivers").join(driver)).unwrap();
        let mut vf_link = None;
        for (index, pci) in [(0, "0000:5e:00.1"), (VF_INDEX, VF_PCI)] {
            let vf = devices.join(pci);
            std::fs::create_dir_all(&vf).unwrap();
            std::os::unix::fs::symlink(format!("../{pci}"), pf.join(format!("virtfn{index}")))
                .unwrap();
            std::os::unix::fs::symlink(format!("../{PF_PCI}"), vf.join("physfn")).unwrap();
            if pci == VF_PCI {
                std::os::unix::fs::symlink(format!("../../drivers/{driver}"), vf.join("driver"))
                    .unwrap();
                if driver != "vfio-pci" {
                    let (link, _peer) = Link::veth("vf").unwrap();
                    std::fs::create_dir_all(vf.join("net").join(link.name())).unwrap();
                    vf_link = Some(link);
                }
            }
        }
        let fake = FakeSriov { root, vf: vf_link };
        // The VF's settings before the plugin touches them.
        let mut recording = Recording::default();
        recording
            .vfs
            .insert(format!("{PF_NAME}/{VF_INDEX}"), original());
        fake.store(&recording);
        fake
    }

    fn vf_netdev(&self) -> &str {
        self.vf.as_ref().map(Link::name).unwrap_or_default()
    }

    fn recording_path(&self) -> PathBuf {
        self.root.join(RECORDING_FILE)
    }

    fn recording(&self) -> Recording {
        serde_json::from_slice(&std::fs::read(self.recording_path()).unwrap()).unwrap()
    }

    fn store(&self, recording: &Recording) {
        std::fs::write(
            self.recording_path(),
            serde_json::to_vec(recording).unwrap(),
        )
        .unwrap();
    }

    fn vf_settings(&self) -> VfSettings {
        self.recording().vfs[&format!("{PF_NAME}/{VF_INDEX}")].clone()
    }

    fn root(&self) -> &Path {
        self.root.path()
    }
}

fn original() -> VfSettings {
    VfSettings {
        mac: "02:aa:00:00:00:01".parse().unwrap(),
        ..VfSettings::default()
    }
}

fn conf(net: &Network, extra: Value) -> Value {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": net.name,
        "type": "ferrovirt-cni",
        "mode": "sriov",
        "deviceID": VF_PCI,
        "stateDir": net.state_dir(),
        "ipam": net.host_local("10.79.0.0/24"),
        "vlan": 100, "vlanQoS": 2, "vlanProto": "802.1ad",
        "spoofchk": "off", "trust": "on", "link_state": "enable",
        "min_tx_rate": 10, "max_tx_rate": 1000,
        "runtimeConfig": {"mac": "02:bb:00:00:00:07"},
    });
    if let (Some(conf), Some(extra)) = (conf.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            conf.insert(k.clone(), v.clone());
        }
    }
    conf
}

fn call(fake: &FakeSriov, command: &str, a: &Attachment, conf: &Value) -> common::Reply {
    let root = fake.root().display().to_string();
    call_plugin(
        &plugin_binary(),
        command,
        Some(a),
        conf,
        &[(SYSFS_ROOT_ENV, &root)],
    )
}

fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut conf = conf.clone();
    conf["prevResult"] = prev.clone();
    conf
}

fn link_in(ns: &NetNs, name: &str) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", ns.name(), "-o", "addr", "show", "dev", name])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn host_mac(name: &str) -> String {
    std::fs::read_to_string(format!("/sys/class/net/{name}/address"))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn netdevice_vf_is_configured_moved_addressed_chained_with_tuning_and_restored() {
    let fake = FakeSriov::new("iavf");
    let vf = fake.vf_netdev().to_owned();
    let mac_before = host_mac(&vf);
    let ns = NetNs::create("sr").unwrap();
    let net = Network::new("sr-net");
    let a = Attachment::new(Some(ns.path()), "net1");
    let ours = conf(&net, json!({}));

    // The chain: ferrovirt-cni, then tuning (promiscuous mode) with our result as prevResult.
    let result = call(&fake, "ADD", &a, &ours).ok();
    let tuning_conf = json!({"cniVersion": "1.0.0", "name": net.name, "type": "tuning",
                             "promisc": true, "prevResult": result});
    let tuning = debian_plugin("tuning");
    let chained = call_plugin(&tuning, "ADD", Some(&a), &tuning_conf, &[]).ok();

    // The VF netdev is in the pod as net1 with the leased address and the requested MAC.
    assert!(!link_exists(&vf), "{vf} still in the host");
    let addr = link_in(&ns, "net1").expect("net1 in the pod");
    assert!(addr.contains("10.79.0."), "{addr}");
    let link = ip_output(&["-n", ns.name(), "link", "show", "net1"]);
    assert!(link.contains("02:bb:00:00:00:07"), "{link}");
    assert!(link.contains("PROMISC"), "tuning did not run: {link}");
    let routes = ip_output(&["-n", ns.name(), "route"]);
    assert!(routes.contains("default"), "{routes}");
    assert_eq!(
        result["interfaces"][0]["pciID"],
        json!(null),
        "1.0.0 form has no pciID"
    );
    assert_eq!(result["interfaces"][0]["name"], "net1");
    assert_eq!(
        result["interfaces"][0]["sandbox"],
        ns.path().display().to_string()
    );

    // The PF was told every setting of the config.
    let set = fake.vf_settings();
    assert_eq!(set.mac.to_string(), "02:bb:00:00:00:07");
    assert_eq!((set.vlan, set.qos), (100, 2));
    assert_eq!(set.spoofchk, Some(false));
    assert_eq!(set.trust, Some(true));
    assert_eq!((set.min_tx_rate, set.max_tx_rate), (10, 1000));

    // CHECK down the chain with the final result.
    call(&fake, "CHECK", &a, &with_prev(&ours, &chained)).ok();
    let mut tuning_check = tuning_conf.clone();
    tuning_check["prevResult"] = chained.clone();
    call_plugin(&tuning, "CHECK", Some(&a), &tuning_check, &[]).ok();

    // DEL in reverse order: tuning, then us.
    call_plugin(&tuning, "DEL", Some(&a), &tuning_check, &[]).ok();
    call(&fake, "DEL", &a, &with_prev(&ours, &chained)).ok();
    assert!(link_exists(&vf), "{vf} did not come back under its name");
    assert_eq!(host_mac(&vf), mac_before);
    assert!(link_in(&ns, "net1").is_none());
    assert_eq!(fake.vf_settings(), original());
    assert!(net.leases().is_empty());
    assert_eq!(net.records(), 0);
    call(&fake, "DEL", &a, &ours).ok();
}

#[test]
fn without_a_device_id_the_vf_is_the_pods_allocation_in_the_kubelet_checkpoint() {
    let fake = FakeSriov::new("vfio-pci");
    let ns = NetNs::create("sr").unwrap();
    let net = Network::new("sr-ckpt");
    let a = Attachment::new(Some(ns.path()), "net1");
    // The kubelet's device checkpoint, as a v1.34 kubelet writes it: our pod has the VF.
    let checkpoint = fake.root().join("kubelet_internal_checkpoint");
    std::fs::write(
        &checkpoint,
        json!({"Data": {"PodDeviceEntries": [
            {"PodUID": "other", "ContainerName": "compute", "ResourceName": "devices.ferrovirt.io/sriov-a",
             "DeviceIDs": {"-1": ["0000:5e:00.1"]}, "AllocResp": ""},
            {"PodUID": "pod-1", "ContainerName": "compute", "ResourceName": "devices.ferrovirt.io/sriov-a",
             "DeviceIDs": {"-1": [VF_PCI]}, "AllocResp": ""}],
            "RegisteredDevices": {}}, "Checksum": 0})
        .to_string(),
    )
    .unwrap();
    let mut c = conf(
        &net,
        json!({"resourceName": "devices.ferrovirt.io/sriov-a", "deviceCheckpoint": checkpoint}),
    );
    c["cniVersion"] = json!("1.1.0");
    if let Some(o) = c.as_object_mut() {
        o.remove("deviceID");
    }
    let root = fake.root().display().to_string();
    let run = |command: &str, pod_uid: &str| {
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=vm-a;K8S_POD_UID={pod_uid}"
        );
        call_plugin(
            &plugin_binary(),
            command,
            Some(&a),
            &c,
            &[(SYSFS_ROOT_ENV, &root), ("CNI_ARGS", &args)],
        )
    };
    // A pod without an allocation of the resource: a message, nothing touched.
    let (_, msg) = run("ADD", "pod-2").error();
    assert!(
        msg.contains("no free devices.ferrovirt.io/sriov-a device"),
        "{msg}"
    );
    assert_eq!(fake.vf_settings(), original());
    let result = run("ADD", "pod-1").ok();
    assert_eq!(result["interfaces"][0]["pciID"], VF_PCI);
    assert_eq!(fake.vf_settings().vlan, 100);
    run("DEL", "pod-1").ok();
    assert_eq!(fake.vf_settings(), original());
    assert!(net.leases().is_empty());
}

#[test]
fn vfio_vf_stays_put_and_the_result_carries_its_pci_address() {
    let fake = FakeSriov::new("vfio-pci");
    let ns = NetNs::create("sr").unwrap();
    let net = Network::new("sr-vfio");
    let a = Attachment::new(Some(ns.path()), "net1");
    let mut c = conf(&net, json!({}));
    c["cniVersion"] = json!("1.1.0");
    let result = call(&fake, "ADD", &a, &c).ok();
    assert_eq!(result["interfaces"][0]["pciID"], VF_PCI);
    assert_eq!(result["interfaces"][0]["mac"], "02:bb:00:00:00:07");
    assert_eq!(result["ips"][0]["interface"], 0);
    assert_eq!(fake.vf_settings().vlan, 100);
    call(&fake, "CHECK", &a, &with_prev(&c, &result)).ok();
    // CHECK notices the PF losing a setting.
    let mut recording = fake.recording();
    if let Some(vf) = recording.vfs.get_mut(&format!("{PF_NAME}/{VF_INDEX}")) {
        vf.trust = Some(false);
    }
    fake.store(&recording);
    let (code, msg) = call(&fake, "CHECK", &a, &with_prev(&c, &result)).error();
    assert_eq!(code, 100);
    assert!(msg.contains("the config asks for"), "{msg}");
    call(&fake, "DEL", &a, &c).ok();
    assert_eq!(fake.vf_settings(), original());
    assert!(net.leases().is_empty());
}

#[test]
fn a_pf_refusing_a_setting_undoes_the_earlier_ones_and_the_lease() {
    let fake = FakeSriov::new("iavf");
    let vf = fake.vf_netdev().to_owned();
    let mut recording = fake.recording();
    recording.fail_on = Some("trust".into());
    fake.store(&recording);
    let ns = NetNs::create("sr").unwrap();
    let net = Network::new("sr-pffail");
    let a = Attachment::new(Some(ns.path()), "net1");
    let (code, msg) = call(&fake, "ADD", &a, &conf(&net, json!({}))).error();
    assert_eq!(code, 100);
    assert!(msg.contains("trust"), "{msg}");
    // MAC and VLAN had been set before trust failed: they are back, and so is everything else.
    let calls = fake.recording().calls;
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert_eq!(fake.vf_settings(), original());
    assert!(link_exists(&vf));
    assert!(net.leases().is_empty());
    assert_eq!(net.records(), 0);
}

#[test]
fn a_missing_vf_and_a_taken_ifname_fail_without_touching_anything() {
    let fake = FakeSriov::new("iavf");
    let vf = fake.vf_netdev().to_owned();
    let ns = NetNs::create("sr").unwrap();
    let net = Network::new("sr-missing");
    let a = Attachment::new(Some(ns.path()), "net1");

    let (code, msg) = call(
        &fake,
        "ADD",
        &a,
        &conf(&net, json!({"deviceID": "0000:5e:00.7"})),
    )
    .error();
    assert_eq!(code, 7);
    assert!(
        msg.contains("0000:5e:00.7") && msg.contains("does not exist"),
        "{msg}"
    );

    common::ip_output(&["-n", ns.name(), "link", "add", "net1", "type", "bridge"]);
    let (code, msg) = call(&fake, "ADD", &a, &conf(&net, json!({}))).error();
    assert_eq!(code, 100);
    assert!(msg.contains("already exists"), "{msg}");

    assert!(fake.recording().calls.is_empty());
    assert!(link_exists(&vf));
    assert!(net.leases().is_empty());
    assert_eq!(net.records(), 0);
}

#[test]
fn del_after_the_netns_is_deleted_restores_the_vf_and_releases_the_lease() {
    let fake = FakeSriov::new("iavf");
    let ns = NetNs::create("sr").unwrap();
    let net = Network::new("sr-nsgone");
    let a = Attachment::new(Some(ns.path()), "net1");
    let c = conf(&net, json!({}));
    call(&fake, "ADD", &a, &c).ok();
    // The veth is destroyed with the namespace (a real VF would return to the host).
    drop(ns);
    let gone = Attachment {
        netns: None,
        ..a.clone()
    };
    call(&fake, "DEL", &gone, &c).ok();
    call(&fake, "DEL", &gone, &c).ok();
    assert_eq!(fake.vf_settings(), original());
    assert!(net.leases().is_empty());
    assert_eq!(net.records(), 0);
}

#[test]
fn status_needs_a_readable_sysfs() {
    let fake = FakeSriov::new("vfio-pci");
    let net = Network::new("sr-status");
    let mut c = conf(&net, json!({}));
    c["cniVersion"] = json!("1.1.0");
    let root = fake.root().display().to_string();
    call_plugin(
        &plugin_binary(),
        "STATUS",
        None,
        &c,
        &[(SYSFS_ROOT_ENV, &root)],
    )
    .ok();
    let missing = fake.root().join("nowhere").display().to_string();
    let reply = call_plugin(
        &plugin_binary(),
        "STATUS",
        None,
        &c,
        &[(SYSFS_ROOT_ENV, &missing)],
    );
    let (code, msg) = reply.error();
    assert_eq!(code, 50);
    assert!(msg.contains("bus/pci/devices"), "{msg}");
}
