//! The launcher pod of a VMI: one pod per VMI, owned by it, whose container runs the VMM (the
//! node issue's `ferrovirt-launcher` image), so that pod limits, eviction and deletion apply to
//! the VM as to any pod.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, HostPathVolumeSource,
    ObjectFieldSelector, PersistentVolumeClaimVolumeSource, Pod, PodSpec, ResourceRequirements,
    Volume as PodVolume, VolumeDevice, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::crd::VirtualMachineInstance;
use crate::crd::spec::{HostDiskType, Volume};
use crate::crd::vmi::VirtualMachineInstanceSpec;
use crate::quantity;

/// Label on launcher pods: the VMI's UID (always a valid label value, unlike long names).
pub const LABEL_VMI_UID: &str = "ferrovirt.io/vmi-uid";
/// Label on launcher pods: the VMI's name, when it fits a label value.
pub const LABEL_VMI_NAME: &str = "ferrovirt.io/vmi";
/// Label on launcher pods: `launcher` for a VMI's pod, `migration-target` for a migration's.
pub const LABEL_ROLE: &str = "ferrovirt.io/role";
/// Multus' per-pod list of secondary networks.
pub const MULTUS_NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";
/// Multus' override of the pod's default network.
pub const MULTUS_DEFAULT_NETWORK: &str = "v1.multus-cni.io/default-network";
/// Where pod volumes of the VMI's disks are mounted in the launcher container.
pub const DISKS_DIR: &str = "/var/run/ferrovirt/disks";
/// The VMI's directory as the launcher container sees it: the node agent's backends put their
/// vhost-user sockets there and the VMM its API socket (`vmm.sock`).
pub const VMI_DIR: &str = "/var/run/ferrovirt/vmi";
/// The node's directory of per-VMI directories (`<VMIS_HOST_DIR>/<VMI UID>` is [`VMI_DIR`]).
pub const VMIS_HOST_DIR: &str = "/var/run/ferrovirt/vmis";
/// The launcher container's name; `fvctl console` attaches to it.
pub const COMPUTE: &str = "compute";
/// Where containerDisk containers find `ferrovirt-container-disk` (an emptyDir that an init
/// container of the launcher image fills).
pub const CONTAINER_DISK_BIN_DIR: &str = "/var/run/ferrovirt/container-disk";
/// `ferrovirt-container-disk` in the launcher image.
const CONTAINER_DISK_PROGRAM: &str = "ferrovirt-container-disk";

/// The name of the container that holds the image of the VMI's volume number `index` (in
/// `spec.volumes`), a containerDisk: a native sidecar (an init container that restarts
/// always), so it runs before the VMM and does not keep the pod up after it.
pub fn container_disk_container(index: usize) -> String {
    format!("volume-{index}")
}

/// Memory the launcher pod needs beyond guest RAM: the VMM (2.7 MiB RSS measured by the
/// `vmm-startup` suite) plus its vhost-user backends, io_uring rings and page tables, with room.
pub const OVERHEAD_BASE: u64 = 32 << 20;
/// Per vCPU: its thread's stack and KVM run structures.
pub const OVERHEAD_PER_VCPU: u64 = 2 << 20;
/// Per disk or NIC: a backend's queues and buffers.
pub const OVERHEAD_PER_DEVICE: u64 = 8 << 20;
/// CPU requested per vCPU (KubeVirt's default allocation ratio of 10).
pub const CPU_PER_VCPU_MILLI: u64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the VMI has no UID yet; it must be read back from the API server before a pod is made for it"
    )]
    NoUid,
    #[error(
        "the VMI has no guest memory: set spec.domain.memory.guest or spec.domain.resources.requests.memory"
    )]
    NoMemory,
    #[error("spec.domain memory: {0}")]
    Memory(#[from] quantity::Error),
}

/// How launcher pods are made (flags of `ferrovirt-controller run`).
#[derive(Debug, Clone)]
pub struct LauncherConfig {
    pub image: String,
    pub pull_policy: String,
    /// RuntimeClass whose containerd handler attaches the VM networks, if any.
    pub runtime_class: Option<String>,
    /// Extended resource for /dev/kvm from the node agent's device plugin ("" for none).
    pub kvm_resource: String,
}

/// The launcher pod's name for a VMI (deterministic, so a restarted controller finds it).
pub fn pod_name(vmi_name: &str) -> String {
    let prefix = "virt-launcher-";
    let room = 253 - prefix.len();
    let name: String = vmi_name.chars().take(room).collect();
    format!("{prefix}{}", name.trim_end_matches(['-', '.']))
}

/// Guest RAM in bytes: memory.guest, else resources.requests.memory.
pub fn guest_memory(vmi: &VirtualMachineInstance) -> Result<u64, Error> {
    spec_guest_memory(&vmi.spec)
}

/// Guest RAM in bytes of a VMI spec.
pub fn spec_guest_memory(spec: &VirtualMachineInstanceSpec) -> Result<u64, Error> {
    let domain = &spec.domain;
    let guest = domain
        .memory
        .as_ref()
        .and_then(|m| m.guest.as_ref())
        .or_else(|| {
            domain
                .resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("memory"))
        });
    let guest = guest.ok_or(Error::NoMemory)?;
    Ok(quantity::to_bytes(&guest.0)?)
}

/// vCPUs of the guest.
pub fn vcpus(vmi: &VirtualMachineInstance) -> u32 {
    vmi.spec.domain.cpu.as_ref().map_or(1, |c| c.vcpus())
}

fn overhead(vmi: &VirtualMachineInstance) -> u64 {
    let devices = vmi.spec.domain.devices.disks.len() + vmi.spec.domain.devices.interfaces.len();
    OVERHEAD_BASE + OVERHEAD_PER_VCPU * u64::from(vcpus(vmi)) + OVERHEAD_PER_DEVICE * devices as u64
}

fn resources(
    vmi: &VirtualMachineInstance,
    cfg: &LauncherConfig,
    devices: &BTreeMap<String, u64>,
) -> Result<ResourceRequirements, Error> {
    let overhead = overhead(vmi);
    let mut requests: BTreeMap<String, Quantity> = BTreeMap::new();
    let mut limits: BTreeMap<String, Quantity> = BTreeMap::new();
    let user = vmi.spec.domain.resources.clone().unwrap_or_default();
    for (k, v) in user.requests.unwrap_or_default() {
        requests.insert(k, v);
    }
    for (k, v) in user.limits.unwrap_or_default() {
        limits.insert(k, v);
    }
    let memory = guest_memory(vmi)?.max(match requests.get("memory") {
        Some(q) => quantity::to_bytes(&q.0)?,
        None => 0,
    });
    requests.insert(
        "memory".into(),
        Quantity(quantity::from_bytes(memory + overhead)),
    );
    if let Some(limit) = limits.get("memory") {
        let limit = quantity::to_bytes(&limit.0)?;
        limits.insert(
            "memory".into(),
            Quantity(quantity::from_bytes(limit + overhead)),
        );
    }
    requests
        .entry("cpu".into())
        .or_insert_with(|| Quantity(format!("{}m", CPU_PER_VCPU_MILLI * u64::from(vcpus(vmi)))));
    if !cfg.kvm_resource.is_empty() {
        // Extended resources must be requested and limited alike.
        requests.insert(cfg.kvm_resource.clone(), Quantity("1".into()));
        limits.insert(cfg.kvm_resource.clone(), Quantity("1".into()));
    }
    for (resource, count) in devices {
        requests.insert(resource.clone(), Quantity(count.to_string()));
        limits.insert(resource.clone(), Quantity(count.to_string()));
    }
    Ok(ResourceRequirements {
        requests: Some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..Default::default()
    })
}

/// Pod volumes (and their mounts in the compute container) for the VMI's volumes that the
/// kubelet provides: claims, host disks and empty disks. Container disks and cloud-init disks
/// are prepared by the node agent and need no pod volume.
/// Volumes named in `block` (claims with `volumeMode: Block`) become device nodes at
/// `DISKS_DIR/<volume>` instead of mounts.
fn volumes(
    vmi: &VirtualMachineInstance,
    block: &BTreeSet<String>,
) -> (Vec<PodVolume>, Vec<VolumeMount>, Vec<VolumeDevice>) {
    let mut pod_volumes = Vec::new();
    let mut mounts = Vec::new();
    let mut devices = Vec::new();
    for v in &vmi.spec.volumes {
        let Some(pod_volume) = pod_volume(v) else {
            continue;
        };
        let name = pod_volume.name.clone();
        let path = format!("{DISKS_DIR}/{}", v.name);
        if block.contains(&v.name) {
            devices.push(VolumeDevice {
                name,
                device_path: path,
            });
        } else {
            mounts.push(VolumeMount {
                name,
                mount_path: path,
                ..Default::default()
            });
        }
        pod_volumes.push(pod_volume);
    }
    (pod_volumes, mounts, devices)
}

fn pod_volume(v: &Volume) -> Option<PodVolume> {
    let name = format!("disk-{}", v.name);
    if let Some(pvc) = &v.persistent_volume_claim {
        return Some(PodVolume {
            name,
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc.claim_name.clone(),
                read_only: pvc.read_only,
            }),
            ..Default::default()
        });
    }
    if let Some(host) = &v.host_disk {
        let dir = std::path::Path::new(&host.path)
            .parent()
            .map_or_else(|| "/".to_owned(), |p| p.display().to_string());
        let type_ = match host.type_ {
            HostDiskType::Disk => "Directory",
            HostDiskType::DiskOrCreate => "DirectoryOrCreate",
        };
        return Some(PodVolume {
            name,
            host_path: Some(HostPathVolumeSource {
                path: dir,
                type_: Some(type_.into()),
            }),
            ..Default::default()
        });
    }
    if v.container_disk.is_some() {
        // The agent copies the image's disk here: the VM's writes are the pod's, and go
        // with it.
        return Some(PodVolume {
            name,
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
    }
    if let Some(empty) = &v.empty_disk {
        return Some(PodVolume {
            name,
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(empty.capacity.clone()),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    None
}

/// For containerDisk volumes: an init container that installs `ferrovirt-container-disk`
/// from the launcher image into a shared emptyDir, then one sidecar per volume running it in
/// the volume's image (which need hold nothing but the disk).
fn container_disk_containers(
    vmi: &VirtualMachineInstance,
    cfg: &LauncherConfig,
    pod_volumes: &mut Vec<PodVolume>,
) -> Option<Vec<Container>> {
    let bin = "container-disk-bin";
    let mount = |read_only| VolumeMount {
        name: bin.into(),
        mount_path: CONTAINER_DISK_BIN_DIR.into(),
        read_only: Some(read_only),
        ..Default::default()
    };
    let small = ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity("10m".into())),
            ("memory".to_owned(), Quantity("8Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            Quantity("32Mi".into()),
        )])),
        ..Default::default()
    };
    let mut containers = Vec::new();
    for (index, volume) in vmi.spec.volumes.iter().enumerate() {
        let Some(disk) = &volume.container_disk else {
            continue;
        };
        if containers.is_empty() {
            containers.push(Container {
                name: "container-disk-install".into(),
                image: Some(cfg.image.clone()),
                image_pull_policy: Some(cfg.pull_policy.clone()),
                command: Some(vec![
                    format!("/usr/bin/{CONTAINER_DISK_PROGRAM}"),
                    "install".into(),
                    CONTAINER_DISK_BIN_DIR.into(),
                ]),
                volume_mounts: Some(vec![mount(false)]),
                resources: Some(small.clone()),
                ..Default::default()
            });
        }
        let pull = disk.image_pull_policy.map(|p| format!("{p:?}"));
        containers.push(Container {
            name: container_disk_container(index),
            image: Some(disk.image.clone()),
            image_pull_policy: pull,
            command: Some(vec![
                format!("{CONTAINER_DISK_BIN_DIR}/{CONTAINER_DISK_PROGRAM}"),
                "serve".into(),
                "--disk".into(),
                disk.path.clone().unwrap_or_else(|| "/disk".into()),
            ]),
            restart_policy: Some("Always".into()),
            volume_mounts: Some(vec![mount(true)]),
            resources: Some(small.clone()),
            ..Default::default()
        });
    }
    if containers.is_empty() {
        return None;
    }
    pod_volumes.push(PodVolume {
        name: bin.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    });
    Some(containers)
}

/// Multus annotations for the VMI's `multus` networks: secondary ones as the `networks` list
/// (interface names net1, net2, ... in spec order, with the interface's MAC), a `default: true`
/// one as the default-network override.
fn multus_annotations(vmi: &VirtualMachineInstance, namespace: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut secondary = Vec::new();
    for net in &vmi.spec.networks {
        let Some(multus) = &net.multus else { continue };
        let (ns, name) = match multus.network_name.split_once('/') {
            Some((ns, name)) => (ns, name),
            None => (namespace, multus.network_name.as_str()),
        };
        if multus.default == Some(true) {
            out.insert(MULTUS_DEFAULT_NETWORK.to_owned(), format!("{ns}/{name}"));
            continue;
        }
        let mut entry = json!({
            "name": name,
            "namespace": ns,
            "interface": format!("net{}", secondary.len() + 1),
        });
        let mac = vmi
            .spec
            .domain
            .devices
            .interfaces
            .iter()
            .find(|i| i.name == net.name)
            .and_then(|i| i.mac_address.clone());
        if let Some(mac) = mac {
            entry["mac"] = json!(mac);
        }
        secondary.push(entry);
    }
    if !secondary.is_empty() {
        out.insert(
            MULTUS_NETWORKS.to_owned(),
            serde_json::Value::Array(secondary).to_string(),
        );
    }
    out
}

fn downward(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Labels every pod of `vmi` carries, with `role`.
pub fn pod_labels(vmi: &VirtualMachineInstance, role: &str) -> BTreeMap<String, String> {
    let mut labels = vmi.labels().clone();
    labels.insert(LABEL_VMI_UID.into(), vmi.uid().unwrap_or_default());
    let name = vmi.name_any();
    if name.len() <= 63 {
        labels.insert(LABEL_VMI_NAME.into(), name);
    }
    labels.insert(LABEL_ROLE.into(), role.into());
    labels
}

/// What a launcher pod needs to know from objects other than its VMI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInputs {
    /// Volumes whose claims have `volumeMode: Block`.
    pub block_volumes: BTreeSet<String>,
    /// Device-plugin resources the VMI's networks need (their definitions'
    /// `k8s.v1.cni.cncf.io/resourceName`, e.g. an SR-IOV pool) → how many.
    pub network_resources: BTreeMap<String, u64>,
}

/// The launcher pod of `vmi`, named `name`, with `role` (`launcher` or `migration-target`).
pub fn pod(
    vmi: &VirtualMachineInstance,
    name: &str,
    role: &str,
    cfg: &LauncherConfig,
    inputs: &PodInputs,
) -> Result<Pod, Error> {
    let block = &inputs.block_volumes;
    vmi.uid().ok_or(Error::NoUid)?;
    let namespace = vmi.namespace().unwrap_or_default();
    let spec = &vmi.spec;
    let (mut pod_volumes, mut mounts, devices) = volumes(vmi, block);
    pod_volumes.push(PodVolume {
        name: "vmi".into(),
        host_path: Some(HostPathVolumeSource {
            path: format!("{VMIS_HOST_DIR}/{}", vmi.uid().unwrap_or_default()),
            type_: Some("DirectoryOrCreate".into()),
        }),
        ..Default::default()
    });
    mounts.push(VolumeMount {
        name: "vmi".into(),
        mount_path: VMI_DIR.into(),
        ..Default::default()
    });
    let mut annotations = multus_annotations(vmi, &namespace);
    annotations.insert("ferrovirt.io/vmi".into(), vmi.name_any());
    let grace = spec.termination_grace_period_seconds.unwrap_or(30);
    let container = Container {
        name: COMPUTE.into(),
        image: Some(cfg.image.clone()),
        image_pull_policy: Some(cfg.pull_policy.clone()),
        env: Some(vec![
            EnvVar {
                name: "FERROVIRT_VMI_NAME".into(),
                value: Some(vmi.name_any()),
                ..Default::default()
            },
            EnvVar {
                name: "FERROVIRT_VMI_NAMESPACE".into(),
                value: Some(namespace.clone()),
                ..Default::default()
            },
            EnvVar {
                name: "FERROVIRT_VMI_UID".into(),
                value: vmi.uid(),
                ..Default::default()
            },
            downward("FERROVIRT_POD_NAME", "metadata.name"),
            downward("FERROVIRT_NODE_NAME", "spec.nodeName"),
        ]),
        resources: Some(resources(vmi, cfg, &inputs.network_resources)?),
        // The serial console rides on the container's terminal: `fvctl console` attaches to it.
        stdin: Some(true),
        tty: Some(true),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        volume_devices: (!devices.is_empty()).then_some(devices),
        ..Default::default()
    };
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace),
            labels: Some(pod_labels(vmi, role)),
            annotations: Some(annotations),
            owner_references: vmi.controller_owner_ref(&()).map(|r| vec![r]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            init_containers: container_disk_containers(vmi, cfg, &mut pod_volumes),
            containers: vec![container],
            restart_policy: Some("Never".into()),
            // The VMM gets the guest's grace period plus time to flush and exit.
            termination_grace_period_seconds: Some(grace + 15),
            runtime_class_name: cfg.runtime_class.clone(),
            node_selector: spec.node_selector.clone(),
            affinity: spec.affinity.clone(),
            tolerations: spec.tolerations.clone(),
            volumes: (!pod_volumes.is_empty()).then_some(pod_volumes),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmi(yaml: &str) -> VirtualMachineInstance {
        let mut vmi: VirtualMachineInstance = serde_yaml::from_str(yaml).expect("parse");
        vmi.metadata.uid = Some("0a0b0c0d-0000-4000-8000-000000000001".into());
        vmi
    }

    fn cfg() -> LauncherConfig {
        LauncherConfig {
            image: "ferrovirt-launcher:test".into(),
            pull_policy: "Never".into(),
            runtime_class: Some("ferrovirt".into()),
            kvm_resource: "devices.ferrovirt.io/kvm".into(),
        }
    }

    const VMI: &str = r#"
apiVersion: ferrovirt.io/v1alpha1
kind: VirtualMachineInstance
metadata: {name: web, namespace: prod, labels: {app: web}}
spec:
  domain:
    cpu: {cores: 2, sockets: 1, threads: 1}
    memory: {guest: 512Mi}
    devices:
      disks: [{name: root, disk: {bus: virtio}}, {name: scratch}, {name: data}]
      interfaces:
        - {name: default, masquerade: {}}
        - {name: fast, binding: {name: vhostuser}, macAddress: "02:00:00:00:00:07"}
  networks:
    - {name: default, pod: {}}
    - {name: fast, multus: {networkName: other/vhost-net}}
  volumes:
    - {name: root, hostDisk: {path: /var/lib/images/web.img, type: Disk}}
    - {name: scratch, emptyDisk: {capacity: 1Gi}}
    - {name: data, persistentVolumeClaim: {claimName: web-data}}
  nodeSelector: {disktype: ssd}
  terminationGracePeriodSeconds: 10
"#;

    #[test]
    fn the_pod_carries_resources_devices_networks_volumes_and_placement() {
        let vmi = vmi(VMI);
        let pod = pod(
            &vmi,
            &pod_name("web"),
            "launcher",
            &cfg(),
            &PodInputs::default(),
        )
        .expect("pod");
        let meta = &pod.metadata;
        assert_eq!(meta.name.as_deref(), Some("virt-launcher-web"));
        let labels = meta.labels.as_ref().expect("labels");
        assert_eq!(labels["app"], "web");
        assert_eq!(labels[LABEL_VMI_NAME], "web");
        assert_eq!(
            labels[LABEL_VMI_UID],
            "0a0b0c0d-0000-4000-8000-000000000001"
        );
        let owner = &meta.owner_references.as_ref().expect("owner")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("VirtualMachineInstance", Some(true))
        );
        let networks: serde_json::Value =
            serde_json::from_str(&meta.annotations.as_ref().expect("annotations")[MULTUS_NETWORKS])
                .expect("json");
        assert_eq!(
            networks,
            json!([{"name": "vhost-net", "namespace": "other", "interface": "net1", "mac": "02:00:00:00:00:07"}])
        );
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.runtime_class_name.as_deref(), Some("ferrovirt"));
        assert_eq!(spec.termination_grace_period_seconds, Some(25));
        assert_eq!(
            spec.node_selector.as_ref().expect("selector")["disktype"],
            "ssd"
        );
        let res = spec.containers[0].resources.as_ref().expect("resources");
        let requests = res.requests.as_ref().expect("requests");
        // 512 MiB guest + 32 base + 2×2 per vCPU + 5×8 per device.
        assert_eq!(requests["memory"].0, "588Mi");
        assert_eq!(requests["cpu"].0, "200m");
        assert_eq!(requests["devices.ferrovirt.io/kvm"].0, "1");
        assert_eq!(
            res.limits.as_ref().expect("limits")["devices.ferrovirt.io/kvm"].0,
            "1"
        );
        let volumes = spec.volumes.as_ref().expect("volumes");
        assert_eq!(volumes.len(), 4);
        assert_eq!(
            volumes[3]
                .host_path
                .as_ref()
                .expect("the VMI's directory")
                .path,
            "/var/run/ferrovirt/vmis/0a0b0c0d-0000-4000-8000-000000000001"
        );
        let host = volumes[0].host_path.as_ref().expect("hostPath");
        assert_eq!(
            (host.path.as_str(), host.type_.as_deref()),
            ("/var/lib/images", Some("Directory"))
        );
        assert!(volumes[1].empty_dir.is_some());
        assert_eq!(
            volumes[2]
                .persistent_volume_claim
                .as_ref()
                .expect("pvc")
                .claim_name,
            "web-data"
        );
        let mounts = spec.containers[0].volume_mounts.as_ref().expect("mounts");
        assert_eq!(mounts[2].mount_path, format!("{DISKS_DIR}/data"));
        assert_eq!(spec.containers[0].volume_devices, None);
    }

    #[test]
    fn block_mode_claims_become_devices_at_the_disk_path() {
        let vmi = vmi(VMI);
        let inputs = PodInputs {
            block_volumes: BTreeSet::from(["data".to_owned()]),
            network_resources: BTreeMap::from([("devices.ferrovirt.io/sriov-a".to_owned(), 2)]),
        };
        let pod = pod(&vmi, &pod_name("web"), "launcher", &cfg(), &inputs).expect("pod");
        let container = &pod.spec.expect("spec").containers[0];
        let devices = container.volume_devices.as_ref().expect("devices");
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].device_path, format!("{DISKS_DIR}/data"));
        assert_eq!(devices[0].name, "disk-data");
        let mounts = container.volume_mounts.as_ref().expect("mounts");
        assert!(mounts.iter().all(|m| m.name != "disk-data"), "{mounts:?}");
        // Each SR-IOV network's VF, requested and limited alike (an extended resource).
        let res = container.resources.as_ref().expect("resources");
        for side in [&res.requests, &res.limits] {
            let side = side.as_ref().expect("requests and limits");
            assert_eq!(side["devices.ferrovirt.io/sriov-a"].0, "2");
        }
    }

    #[test]
    fn memory_from_requests_and_limits_keep_the_overhead() {
        let mut vmi = vmi(VMI);
        vmi.spec.domain.memory = None;
        vmi.spec.domain.resources = Some(crate::crd::spec::ResourceRequirements {
            requests: Some([("memory".to_owned(), Quantity("1Gi".into()))].into()),
            limits: Some([("memory".to_owned(), Quantity("2Gi".into()))].into()),
        });
        assert_eq!(guest_memory(&vmi).expect("guest"), 1 << 30);
        let res = resources(&vmi, &cfg(), &BTreeMap::new()).expect("resources");
        assert_eq!(res.requests.expect("requests")["memory"].0, "1100Mi");
        assert_eq!(res.limits.expect("limits")["memory"].0, "2124Mi");
        vmi.spec.domain.resources = None;
        assert!(matches!(guest_memory(&vmi), Err(Error::NoMemory)));
    }

    #[test]
    fn pod_names_are_deterministic_and_bounded() {
        assert_eq!(pod_name("a"), "virt-launcher-a");
        let long = "x".repeat(300);
        assert_eq!(pod_name(&long).len(), 253);
    }
}
